"""Detection head (anchors, box coding, assignment, loss, decoding with BEV NMS) and the BEV
segmentation targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.bev import BevGrid
from models.heads.detection import (
    AnchorClassConfig,
    DetectionHead,
    DetectionHeadConfig,
    DetectionMaps,
    decode_boxes,
    encode_boxes,
)
from models.heads.segmentation import IGNORE_INDEX, bev_semantic_targets
from models.losses import sigmoid_focal_loss
from sim.box_ops import bev_iou
from sim.types import Semantic

GRID = BevGrid(-16.0, -16.0, 0.8, 0.8, 40, 40)


def head(**changes) -> DetectionHead:
    torch.manual_seed(0)
    return DetectionHead(DetectionHeadConfig(**changes), 8, GRID)


def test_anchor_layout_is_row_column_anchor():
    h = head()
    a = h.config.anchors_per_cell
    assert h.anchors.shape == (40 * 40 * a, 7)
    i, j, k = 7, 11, 3  # row (y), column (x), anchor
    anchor = h.anchors[(i * 40 + j) * a + k]
    assert anchor[0].item() == pytest.approx(-16 + (j + 0.5) * 0.8)
    assert anchor[1].item() == pytest.approx(-16 + (i + 0.5) * 0.8)
    cls = h.config.classes[k // len(h.config.rotations)]
    assert tuple(anchor[3:6].tolist()) == pytest.approx(cls.size)
    assert anchor[6].item() == pytest.approx(h.config.rotations[k % len(h.config.rotations)])
    assert h.anchor_class[(i * 40 + j) * a + k].item() == k // len(h.config.rotations)


def test_box_coding_round_trips():
    rng = np.random.default_rng(0)
    anchors = torch.tensor(np.concatenate([rng.uniform(-10, 10, (20, 3)), rng.uniform(1, 5, (20, 3)), rng.uniform(-3, 3, (20, 1))], 1), dtype=torch.float64)
    boxes = torch.tensor(np.concatenate([rng.uniform(-10, 10, (20, 3)), rng.uniform(1, 5, (20, 3)), rng.uniform(-3, 3, (20, 1))], 1), dtype=torch.float64)
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes)


def test_assignment_follows_bev_iou_per_class():
    h = head()
    anchors = h.anchors.numpy().astype(np.float64)
    a = h.config.anchors_per_cell
    car = anchors[(10 * 40 + 10) * a + 0].copy()  # a car anchor, yaw 0
    truck = np.array([5.2, -3.6, -1.9, 10.0, 2.5, 3.4, 1.5707963267948966])
    state, matched = h.assign(np.stack([car, truck]), np.array([0, 1]))
    assert state[(10 * 40 + 10) * a + 0] == 1 and matched[(10 * 40 + 10) * a + 0] == 0
    positives = np.flatnonzero(state == 1)
    classes = h.anchor_class.numpy()
    for index in positives:
        box = np.stack([car, truck])[matched[index]]
        assert classes[index] == matched[index]  # a box only matches anchors of its class
        iou = bev_iou(anchors[index : index + 1], box[None])[0, 0]
        best = h.config.classes[classes[index]].matched_iou
        assert iou >= best or iou == bev_iou(anchors[classes == classes[index]], box[None]).max()
    far = np.hypot(anchors[:, 0] - car[0], anchors[:, 1] - car[1]) > 10
    far &= np.hypot(anchors[:, 0] - truck[0], anchors[:, 1] - truck[1]) > 12
    assert (state[far] == 0).all()
    assert (state == -1).any()  # partial overlaps are ignored
    assert (h.assign(np.zeros((0, 7)), np.zeros(0, np.int64))[0] == 0).all()


def perfect_maps(h: DetectionHead, boxes: np.ndarray) -> DetectionMaps:
    """Head outputs that encode ``boxes`` exactly at their best anchors (others very negative)."""
    k = h.anchors.shape[0]
    cls = torch.full((1, k), -20.0)
    deltas = torch.zeros(1, k, 7)
    direction = torch.zeros(1, k, 2)
    anchors = h.anchors.double()
    for box in boxes:
        iou = bev_iou(anchors.numpy(), box[None])[:, 0]
        index = int(np.argmax(iou))
        cls[0, index] = 8.0
        target = encode_boxes(torch.tensor(box[None]), anchors[index : index + 1])[0]
        # the regressed angle is only known up to pi; the direction bin restores it
        yaw = target[6].item()
        deltas[0, index] = target.float()
        deltas[0, index, 6] = float((yaw + math.pi / 2) % math.pi - math.pi / 2)
        offset = (box[6] - h.config.dir_offset) % (2 * math.pi)
        direction[0, index, int(offset // math.pi)] = 5.0
    return DetectionMaps(cls, deltas, direction)


def test_decoding_perfect_maps_gives_the_boxes_back():
    h = head()
    boxes = np.array(
        [
            [3.0, 2.0, -1.9, 4.6, 1.9, 1.5, 0.4],
            [-8.0, 5.0, -1.8, 4.2, 1.8, 1.6, -2.9],  # heading in the other half-turn
            [9.0, -9.0, -1.9, 9.5, 2.5, 3.3, 1.2],  # a truck
        ]
    )
    detections = h.decode(perfect_maps(h, boxes))[0]
    assert len(detections) == 3
    order = np.argsort(detections.boxes[:, 0])
    expected = boxes[np.argsort(boxes[:, 0])]
    np.testing.assert_allclose(detections.boxes[order][:, :6], expected[:, :6], atol=1e-4)
    yaw_error = (detections.boxes[order][:, 6] - expected[:, 6] + math.pi) % (2 * math.pi) - math.pi
    np.testing.assert_allclose(yaw_error, 0.0, atol=1e-4)
    assert sorted(detections.labels.tolist()) == [0, 0, 1]
    assert (detections.scores > 0.99).all()


def test_nms_removes_duplicates_of_one_box():
    h = head(score_threshold=0.1)
    box = np.array([[1.0, 1.0, -1.9, 4.6, 1.9, 1.5, 0.0]])
    maps = perfect_maps(h, box)
    # a second, weaker anchor next to it regressing the same box
    iou = bev_iou(h.anchors.double().numpy(), box)[:, 0]
    second = int(np.argsort(-iou)[1])
    maps.cls_logits[0, second] = 4.0
    maps.box_deltas[0, second] = encode_boxes(torch.tensor(box), h.anchors[second : second + 1].double())[0].float()
    detections = h.decode(maps)[0]
    assert len(detections) == 1 and detections.scores[0] > 0.99


def test_loss_is_low_for_perfect_maps_and_gradients_flow():
    h = head()
    boxes = np.array([[3.0, 2.0, -1.9, 4.6, 1.9, 1.5, 0.4]])
    good = h.loss(perfect_maps(h, boxes), [(boxes, np.array([0]))])
    maps = h(torch.randn(1, 8, 40, 40, requires_grad=True))
    bad = h.loss(maps, [(boxes, np.array([0]))])
    assert good.box.item() < 0.05 and bad.total.item() > good.total.item()
    bad.total.backward()
    assert h.cls.weight.grad.abs().sum() > 0 and h.box.weight.grad.abs().sum() > 0


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([2.0, -1.0, 0.5])
    targets = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = torch.stack(
        [-0.25 * (1 - p[0]) ** 2 * torch.log(p[0]), -0.75 * p[1] ** 2 * torch.log(1 - p[1]), -0.75 * p[2] ** 2 * torch.log(1 - p[2])]
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected)


def test_segmentation_targets_vehicle_road_free_and_unobserved():
    grid = BevGrid(0.0, 0.0, 1.0, 1.0, 4, 6)
    points = torch.tensor([[0.5, 0.5, -1.9], [1.5, 0.5, -1.9], [4.5, 3.5, 0.0], [2.5, 2.5, -1.0]])
    semantic = torch.tensor([int(Semantic.ROAD), int(Semantic.SIDEWALK), int(Semantic.BUILDING), int(Semantic.CAR)], dtype=torch.uint8)
    boxes = torch.tensor([[2.5, 2.5, -1.9, 1.8, 0.8, 1.5, 0.0]])  # covers only cell (2, 2)'s centre
    labels = bev_semantic_targets(grid, points, semantic, boxes)
    assert labels[0, 0] == 2  # road point
    assert labels[0, 1] == 0  # sidewalk: observed, free
    assert labels[3, 4] == 0  # building: free
    assert labels[2, 2] == 1  # inside the box
    assert (labels == IGNORE_INDEX).sum() == 4 * 6 - 4


def test_anchor_settings_are_validated():
    with pytest.raises(ValueError, match="size"):
        AnchorClassConfig(size=(0.0, 1.9, 1.6))
    with pytest.raises(ValueError, match="unmatched_iou <= matched_iou"):
        AnchorClassConfig(matched_iou=0.3, unmatched_iou=0.5)
