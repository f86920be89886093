"""Detection and segmentation metrics: average precision and BEV segmentation IoU.

**AP.** Per frame, detections are visited by decreasing score and each is matched to the
remaining (not yet matched) ground-truth box with which it has the largest IoU; it is a true
positive if that IoU reaches the threshold, otherwise a false positive. IoU is
:func:`sim.box_ops.bev_iou` (BEV) or :func:`sim.box_ops.iou_3d` (3D), exact rotated overlaps.
Then the detections of **all frames are sorted together by score** (stable), precision and recall
are accumulated over that order, and AP is the area under the precision envelope with **VOC's
all-point interpolation** (VOC 2010 onwards): ``sum over recall steps of (r_i - r_{i-1}) * p_i``
with ``p_i`` the highest precision at recall ``>= r_i``.

Where this differs from OpenCOOD's default evaluation (``opencood/utils/eval_utils.py`` with
``inference.py``'s ``--global_sort_detections`` left off): OpenCOOD concatenates the detections
frame after frame, each frame's sorted by score, and accumulates precision and recall in that order
without a global sort, so a confident false positive in a late frame costs less than it should
(the flag, when given, does what is done here). OpenCOOD also computes BEV IoU only (shapely
polygons of the box footprints); 3D AP here uses the volume IoU of upright boxes. The matching
rule and the all-point interpolation are the same.

**Subsets.** AP on a subset of the ground truth (e.g. boxes only the other agents see) counts as
positives only the subset's boxes; a detection matched (by the rule above, against all boxes) to a
box outside the subset is neither a true nor a false positive and is left out, as KITTI treats
"don't care" boxes.

**Segmentation IoU.** Per class ``TP / (TP + FP + FN)`` over every labelled cell of every frame,
cells labelled 255 left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sim.box_ops import bev_iou, iou_3d

__all__ = [
    "APResult",
    "DetectionEvaluator",
    "SegmentationEvaluator",
    "match_frame",
    "voc_ap_all_points",
]

IOU_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"bev": bev_iou, "3d": iou_3d}


def voc_ap_all_points(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC all-point interpolation).

    Args:
        recall: (N,) non-decreasing recall after each detection (global score order).
        precision: (N,) precision after each detection.
    """
    mrec = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    mpre = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at recall >= r
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def match_frame(
    pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, iou_kind: str, thresholds: tuple[float, ...]
) -> np.ndarray:
    """Greedy matching of one frame, for several IoU thresholds.

    Args:
        pred_boxes: (M, 7) detections.
        scores: (M,) their scores.
        gt_boxes: (G, 7) ground truth, same frame.
        iou_kind: ``"bev"`` or ``"3d"``.
        thresholds: T IoU thresholds.

    Returns:
        (T, M) int64: index of the ground-truth box each detection is matched to at each
        threshold, -1 for a false positive. Detections keep their input order.
    """
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 7)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
    m, g = len(pred_boxes), len(gt_boxes)
    out = np.full((len(thresholds), m), -1, dtype=np.int64)
    if m == 0 or g == 0:
        return out
    iou = IOU_FUNCTIONS[iou_kind](pred_boxes, gt_boxes)  # (M, G)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    for t, threshold in enumerate(thresholds):
        free = np.ones(g, dtype=bool)
        for i in order:
            if not free.any():
                break
            candidates = np.where(free, iou[i], -1.0)
            j = int(np.argmax(candidates))
            if candidates[j] >= threshold:
                out[t, i] = j
                free[j] = False
    return out


@dataclass
class APResult:
    """AP of one (IoU kind, threshold, subset).

    Attributes:
        ap: average precision in [0, 1], NaN when the subset has no boxes.
        num_gt: positives (boxes of the subset).
        num_detections: detections counted (true + false positives).
        true_positives: of those, matched to a subset box.
    """

    ap: float
    num_gt: int
    num_detections: int
    true_positives: int


@dataclass
class DetectionEvaluator:
    """Accumulates frames, then computes AP for every IoU kind, threshold and subset.

    Attributes:
        thresholds: IoU thresholds.
        iou_kinds: ``"bev"`` and/or ``"3d"``.
    """

    thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    iou_kinds: tuple[str, ...] = ("bev", "3d")
    _scores: list[np.ndarray] = field(default_factory=list)
    _matches: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _gt_groups: list[np.ndarray] = field(default_factory=list)

    def add(self, pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, gt_groups: np.ndarray) -> None:
        """One frame.

        Args:
            pred_boxes: (M, 7) detections.
            scores: (M,) scores.
            gt_boxes: (G, 7) ground truth.
            gt_groups: (G,) int group of each box (e.g. its visibility), for subset APs.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(np.asarray(pred_boxes).reshape(-1, 7)) != len(scores):
            raise ValueError("pred_boxes and scores disagree in length")
        gt_groups = np.asarray(gt_groups, dtype=np.int64).reshape(-1)
        if len(np.asarray(gt_boxes).reshape(-1, 7)) != len(gt_groups):
            raise ValueError("gt_boxes and gt_groups disagree in length")
        self._scores.append(scores)
        self._gt_groups.append(gt_groups)
        for kind in self.iou_kinds:
            self._matches.setdefault(kind, []).append(match_frame(pred_boxes, scores, gt_boxes, kind, self.thresholds))

    @property
    def num_frames(self) -> int:
        return len(self._scores)

    def average_precision(self, iou_kind: str, threshold: float, groups: tuple[int, ...] | None = None) -> APResult:
        """AP over all frames added so far.

        Args:
            iou_kind: ``"bev"`` or ``"3d"``.
            threshold: one of :attr:`thresholds`.
            groups: the ground-truth groups that count as positives (None: all boxes).
        """
        t = self.thresholds.index(threshold)
        scores, flags = [], []
        num_gt = 0
        for frame, frame_scores in enumerate(self._scores):
            matched = self._matches[iou_kind][frame][t]  # (M,)
            groups_of_gt = self._gt_groups[frame]
            in_subset = np.ones(len(groups_of_gt), bool) if groups is None else np.isin(groups_of_gt, groups)
            num_gt += int(in_subset.sum())
            # 1 true positive, 0 false positive, -1 matched outside the subset (left out)
            flag = np.zeros(len(matched), np.int64)
            hit = matched >= 0
            flag[hit] = np.where(in_subset[matched[hit]], 1, -1)
            scores.append(frame_scores)
            flags.append(flag)
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        all_flags = np.concatenate(flags) if flags else np.zeros(0, np.int64)
        counted = all_flags >= 0
        all_scores, all_flags = all_scores[counted], all_flags[counted]
        order = np.argsort(-all_scores, kind="stable")
        tp = np.cumsum(all_flags[order] == 1)
        fp = np.cumsum(all_flags[order] == 0)
        if num_gt == 0:
            return APResult(float("nan"), 0, len(all_flags), 0)
        if len(all_flags) == 0:
            return APResult(0.0, num_gt, 0, 0)
        recall = tp / num_gt
        precision = tp / np.maximum(tp + fp, 1)
        return APResult(voc_ap_all_points(recall, precision), num_gt, len(all_flags), int(tp[-1]))


@dataclass
class SegmentationEvaluator:
    """Confusion matrix of BEV labels over frames; IoU per class.

    Attributes:
        num_classes: classes (labels 0 .. num_classes - 1; anything else is ignored).
    """

    num_classes: int = 3
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, predicted: np.ndarray, target: np.ndarray) -> None:
        """(H, W) predicted and target labels of one frame."""
        predicted = np.asarray(predicted).reshape(-1)
        target = np.asarray(target).reshape(-1)
        keep = (target >= 0) & (target < self.num_classes)
        index = target[keep].astype(np.int64) * self.num_classes + predicted[keep].astype(np.int64)
        self.confusion += np.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """(num_classes,) IoU, NaN for a class absent from both prediction and target."""
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(axis=0) + self.confusion.sum(axis=1) - tp
        return np.divide(tp, union, out=np.full(self.num_classes, np.nan), where=union > 0)
