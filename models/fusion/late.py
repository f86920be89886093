"""Late fusion: every agent detects on its own; the boxes travel, the ego merges them with BEV NMS.

Received boxes (sender frame, :class:`v2x.codecs.DetectionSet`) are moved into the ego frame with
the pose from the message header, pooled with the ego's own, and suppressed per class with
:func:`sim.box_ops.nms_bev` (OpenCOOD's late fusion does the same with its NMS).
"""

from __future__ import annotations

import numpy as np

from models.heads.detection import Detections
from sim.box_ops import nms_bev
from sim.geometry import transform_boxes
from v2x.codecs import DetectionSet

__all__ = ["detection_set", "merge_detections"]


def detection_set(detections: Detections) -> DetectionSet:
    """What a sender puts in a DETECTIONS payload."""
    return DetectionSet(detections.boxes.astype(np.float32), detections.scores.astype(np.float32), detections.labels)


def merge_detections(
    ego: Detections,
    received: list[tuple[np.ndarray, DetectionSet]],
    nms_iou: float,
    max_detections: int,
) -> Detections:
    """Pool the ego's detections with the received ones and suppress duplicates.

    Args:
        ego: the ego's own detections (ego frame).
        received: (T_ego_from_sender (4, 4), detections in the sender's frame) per message.
        nms_iou: BEV IoU above which the lower-scored box of a class is dropped.
        max_detections: detections kept, best first.
    """
    boxes = [ego.boxes.astype(np.float64)]
    scores = [ego.scores]
    labels = [ego.labels]
    for T_ego_from_sender, dets in received:
        boxes.append(transform_boxes(T_ego_from_sender, dets.boxes))
        scores.append(np.asarray(dets.scores, np.float32))
        labels.append(np.asarray(dets.labels, np.int64))
    all_boxes = np.concatenate(boxes).reshape(-1, 7)
    all_scores = np.concatenate(scores).astype(np.float32)
    all_labels = np.concatenate(labels).astype(np.int64)
    if len(all_scores) == 0:
        return Detections.empty()
    keep = []
    for c in np.unique(all_labels):
        index = np.flatnonzero(all_labels == c)
        keep.append(index[nms_bev(all_boxes[index], all_scores[index], nms_iou)])
    keep_idx = np.concatenate(keep)
    keep_idx = keep_idx[np.argsort(-all_scores[keep_idx], kind="stable")][:max_detections]
    return Detections(all_boxes[keep_idx].astype(np.float32), all_scores[keep_idx], all_labels[keep_idx])
