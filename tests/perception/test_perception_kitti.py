"""Real data: the ego-only model on KITTI velodyne frames, end to end.

The frames are ../shared/data/kitti_sample (three full KITTI object frames, float32 x, y, z,
reflectance). The model is untrained, so the check is about the pipeline, not accuracy: real scans
voxelise on the grid, run through the sparse and dense backbones and all heads, the loss against
the frames' own labels (moved from the camera to the LiDAR frame) is finite, and every decoded box
is a valid box of the grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from perception_helpers import SHARED_DATA

from datasets.collate import CoopCollate
from datasets.coop_dataset import DEFAULT_CLASSES, CoopSample
from datasets.kitti import KITTI_TO_KIND, boxes_camera_to_lidar, read_calib, read_labels, read_velodyne
from models.comm import LinkConfig, V2XLink
from models.heads.detection import DetectionHeadConfig
from models.perception import CooperativePerception, PerceptionModelConfig

KITTI = SHARED_DATA / "kitti_sample"
FRAMES = ("000000", "000001", "000002")


def kitti_sample(frame: str) -> CoopSample:
    if not (KITTI / "velodyne" / f"{frame}.bin").is_file():
        pytest.fail(f"the real KITTI sample is missing: expected {KITTI}/velodyne/{frame}.bin (shared data folder)")
    points = read_velodyne(KITTI / "velodyne" / f"{frame}.bin")
    labels = read_labels(KITTI / "label_2" / f"{frame}.txt")
    calib = read_calib(KITTI / "calib" / f"{frame}.txt")
    class_of_kind = {kind: i for i, kinds in enumerate(DEFAULT_CLASSES.values()) for kind in kinds}
    keep = np.array([KITTI_TO_KIND.get(str(t)) in class_of_kind for t in labels.types], dtype=bool)
    boxes = boxes_camera_to_lidar(labels.boxes_camera[keep], calib)
    classes = np.array([class_of_kind[KITTI_TO_KIND[str(t)]] for t in labels.types[keep]], dtype=np.int64)
    return CoopSample.single_agent(points, name=f"kitti_{frame}", gt_boxes=boxes, gt_labels=classes)


def test_ego_only_model_runs_on_kitti_frames():
    torch.manual_seed(0)
    # score threshold 0: the untrained head still returns its best boxes, so they can be checked
    config = PerceptionModelConfig(detection=DetectionHeadConfig(score_threshold=0.0))
    model = CooperativePerception(config).eval()
    samples = [kitti_sample(f) for f in FRAMES]
    assert [len(s.points[0]) for s in samples] == [115384, 120268, 126891]  # the README's counts
    assert sum(len(s.gt_boxes) for s in samples) > 0
    batch = CoopCollate(config.grid)(samples)
    assert batch.voxel_features.shape[0] > 10000  # a real scan fills many voxels
    with torch.no_grad():
        output, loss = model(batch, V2XLink(LinkConfig()), with_loss=True, with_detections=True)
    assert torch.isfinite(loss.total) and loss.total > 0
    x0, y0, z0, x1, y1, z1 = config.grid.point_cloud_range
    cell = config.grid.voxel_size[0] * config.encoder.sparse.bev_stride
    for detections in output.detections:
        detections.validate()
        assert len(detections) == config.detection.max_detections
        boxes = detections.boxes
        assert np.isfinite(boxes).all()
        assert (boxes[:, 0] > x0 - cell).all() and (boxes[:, 0] < x1 + cell).all()
        assert (boxes[:, 1] > y0 - cell).all() and (boxes[:, 1] < y1 + cell).all()
        assert (boxes[:, 2] > z0 - 2).all() and (boxes[:, 2] < z1).all()
        assert (boxes[:, 3:6] > 0.1).all() and (boxes[:, 3:6] < 30).all()
        assert (boxes[:, 6] >= -math.pi - 1e-5).all() and (boxes[:, 6] < math.pi + 1e-5).all()
        assert ((detections.scores >= 0) & (detections.scores <= 1)).all()
        assert np.all(np.diff(detections.scores) <= 0)
        assert set(detections.labels.tolist()) <= {0, 1}
