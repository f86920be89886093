"""AP (greedy matching, global sort, VOC all-point interpolation, subsets) and segmentation IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datasets.evaluation import DetectionEvaluator, SegmentationEvaluator, match_frame, voc_ap_all_points


def box(x: float, y: float = 0.0, z: float = -1.9, yaw: float = 0.0) -> list[float]:
    return [x, y, z, 4.0, 2.0, 1.5, yaw]


def test_voc_all_point_interpolation_by_hand():
    # detections: TP, FP, TP with 2 positives -> recall 0.5, 0.5, 1; precision 1, 0.5, 2/3
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2.0 / 3.0])
    assert voc_ap_all_points(recall, precision) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0 / 3.0)
    assert voc_ap_all_points(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert voc_ap_all_points(np.zeros(0), np.zeros(0)) == 0.0


def test_matching_takes_the_best_remaining_box_by_score():
    gt = np.array([box(0.0), box(10.0)])
    pred = np.array([box(0.2), box(0.1), box(30.0)])
    scores = np.array([0.5, 0.9, 0.8])
    matched = match_frame(pred, scores, gt, "bev", (0.5,))
    # the 0.9 box takes gt 0; the 0.5 box finds no free overlapping box; the far one is false
    assert matched.tolist() == [[-1, 0, -1]]


def test_perfect_detections_give_ap_one_and_misses_lower_recall():
    evaluator = DetectionEvaluator(thresholds=(0.5, 0.7))
    gt = np.array([box(0.0), box(10.0), box(20.0)])
    evaluator.add(gt, np.array([0.9, 0.8, 0.7]), gt, np.zeros(3))
    assert evaluator.average_precision("bev", 0.7).ap == pytest.approx(1.0)
    assert evaluator.average_precision("3d", 0.7).ap == pytest.approx(1.0)
    evaluator.add(np.zeros((0, 7)), np.zeros(0), np.array([box(5.0)]), np.zeros(1))
    result = evaluator.average_precision("bev", 0.5)
    assert result.ap == pytest.approx(0.75) and result.num_gt == 4 and result.true_positives == 3


def test_detections_are_sorted_globally_across_frames():
    """Frame 1 holds a confident false positive, frame 2 a weaker true positive. Sorted globally the
    false positive comes first: precision 1/2 at recall 1 (frame order would give 1 at recall 1/2)."""
    evaluator = DetectionEvaluator(thresholds=(0.5,), iou_kinds=("bev",))
    evaluator.add(np.array([box(0.0), box(50.0)]), np.array([0.3, 0.95]), np.array([box(0.0)]), np.zeros(1))
    evaluator.add(np.array([box(0.0)]), np.array([0.6]), np.array([box(0.0)]), np.zeros(1))
    # global order: FP (0.95), TP (0.6), TP (0.3): precision 0, 1/2, 2/3 at recall 0, 1/2, 1
    expected = 0.5 * (2.0 / 3.0) + 0.5 * (2.0 / 3.0)
    assert evaluator.average_precision("bev", 0.5).ap == pytest.approx(expected)
    # OpenCOOD's default (frame order, each frame by score): FP, TP, TP as well here, but
    # swapping the frames shows the difference: frame order TP(0.6), FP(0.95), TP(0.3)
    swapped = DetectionEvaluator(thresholds=(0.5,), iou_kinds=("bev",))
    swapped.add(np.array([box(0.0)]), np.array([0.6]), np.array([box(0.0)]), np.zeros(1))
    swapped.add(np.array([box(0.0), box(50.0)]), np.array([0.3, 0.95]), np.array([box(0.0)]), np.zeros(1))
    assert swapped.average_precision("bev", 0.5).ap == pytest.approx(expected)  # order of frames is irrelevant
    frame_order_ap = voc_ap_all_points(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2.0 / 3.0]))
    assert not math.isclose(frame_order_ap, expected)


def test_subset_ap_ignores_detections_of_other_boxes():
    evaluator = DetectionEvaluator(thresholds=(0.5,), iou_kinds=("bev",))
    gt = np.array([box(0.0), box(10.0), box(20.0)])
    groups = np.array([0, 1, 1])  # box 0 seen by the ego, boxes 1 and 2 only by others
    evaluator.add(np.array([box(0.0), box(10.0), box(40.0)]), np.array([0.9, 0.8, 0.7]), gt, groups)
    hidden = evaluator.average_precision("bev", 0.5, groups=(1,))
    # the detection of box 0 is left out; then TP (box 1), FP: precision 1, 1/2 at recall 1/2
    assert hidden.num_gt == 2 and hidden.num_detections == 2 and hidden.true_positives == 1
    assert hidden.ap == pytest.approx(0.5)
    assert evaluator.average_precision("bev", 0.5, groups=(0,)).ap == pytest.approx(1.0)
    assert math.isnan(evaluator.average_precision("bev", 0.5, groups=(7,)).ap)


def test_3d_iou_is_stricter_than_bev_for_height_errors():
    evaluator = DetectionEvaluator(thresholds=(0.7,))
    evaluator.add(np.array([box(0.0, z=-1.2)]), np.array([0.9]), np.array([box(0.0)]), np.zeros(1))
    assert evaluator.average_precision("bev", 0.7).ap == pytest.approx(1.0)
    assert evaluator.average_precision("3d", 0.7).ap == 0.0


def test_segmentation_iou_from_the_confusion_matrix():
    seg = SegmentationEvaluator(3)
    target = np.array([[0, 1, 2, 255], [2, 2, 1, 0]])
    predicted = np.array([[0, 1, 1, 2], [2, 2, 1, 1]])
    seg.add(predicted, target)
    iou = seg.iou()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 1/2; class 2: TP 2, FN 1 -> 2/3
    np.testing.assert_allclose(iou, [0.5, 0.5, 2.0 / 3.0])
