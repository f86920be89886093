"""sim/box_ops.py against brute-force references written here, hand cases and a real KITTI frame."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sim import box_ops
from sim.box_ops import (
    bev_intersection_area,
    bev_iou,
    bev_overlap,
    count_points_in_boxes,
    iou_3d,
    nms_bev,
    points_in_boxes,
)
from sim.geometry import box_corners

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


# ------------------------------------------------------------------------------------------------
# Brute-force references (float64, plain numpy; no shapely)
# ------------------------------------------------------------------------------------------------


def ref_points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, M) inside flags by rotating points into each box's frame, and (N, M) distance to the
    nearest face (signed: positive inside), to tell clear cases from float32 ties."""
    d = points[:, None, :3] - boxes[None, :, :3]  # (N, M, 3)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    local_x = c * d[..., 0] + s * d[..., 1]
    local_y = -s * d[..., 0] + c * d[..., 1]
    margin = np.minimum.reduce(
        [
            boxes[:, 3] / 2 - np.abs(local_x),
            boxes[:, 4] / 2 - np.abs(local_y),
            d[..., 2],
            boxes[:, 5] - d[..., 2],
        ]
    )
    return margin > 0, margin


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a (K, 2) polygon (0 for fewer than 3 vertices)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of polygon ``subject`` inside convex counter-clockwise ``clip``."""
    out = list(subject)
    for i in range(len(clip)):
        a, b = clip[i], clip[(i + 1) % len(clip)]

        def side(p: np.ndarray, a: np.ndarray = a, b: np.ndarray = b) -> float:
            """Cross product of the clip edge a->b with a->p: >= 0 on the inner (left) side."""
            return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])

        inp, out = out, []
        for j in range(len(inp)):
            p, q = inp[j], inp[(j + 1) % len(inp)]
            fp, fq = side(p), side(q)
            if fq >= 0:
                if fp < 0:
                    out.append(p + fp / (fp - fq) * (q - p))
                out.append(q)
            elif fp >= 0:
                out.append(p + fp / (fp - fq) * (q - p))
        if not out:
            break
    return np.array(out).reshape(-1, 2)


def ref_bev_intersection(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(M, K) footprint intersection areas by polygon clipping of box_corners' bottom faces."""
    fa = box_corners(boxes_a)[:, :4, :2]  # counter-clockwise footprints
    fb = box_corners(boxes_b)[:, :4, :2]
    return np.array([[polygon_area(clip_convex(p, q)) for q in fb] for p in fa]).reshape(len(fa), len(fb))


def ref_bev_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    inter = ref_bev_intersection(boxes_a, boxes_b)
    area_a = boxes_a[:, 3] * boxes_a[:, 4]
    area_b = boxes_b[:, 3] * boxes_b[:, 4]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def ref_iou_3d(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    inter_bev = ref_bev_intersection(boxes_a, boxes_b)
    top = np.minimum(boxes_a[:, None, 2] + boxes_a[:, None, 5], boxes_b[None, :, 2] + boxes_b[None, :, 5])
    bottom = np.maximum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    inter = inter_bev * np.clip(top - bottom, 0.0, None)
    vol_a = np.prod(boxes_a[:, 3:6], axis=1)
    vol_b = np.prod(boxes_b[:, 3:6], axis=1)
    return inter / (vol_a[:, None] + vol_b[None, :] - inter)


def ref_greedy_nms(iou: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for i in order:
        if all(iou[i, j] <= threshold for j in kept):
            kept.append(int(i))
    return kept


def random_boxes(rng: np.random.Generator, m: int, spread: float = 6.0) -> np.ndarray:
    """(M, 7) boxes crowded in a small area so that many pairs overlap."""
    return np.concatenate(
        [
            rng.uniform(-spread, spread, (m, 2)),
            rng.uniform(-1.0, 1.0, (m, 1)),
            rng.uniform(0.5, 6.0, (m, 2)),
            rng.uniform(0.5, 3.0, (m, 1)),
            rng.uniform(-np.pi, np.pi, (m, 1)),
        ],
        axis=1,
    )


def test_reference_clipping_hand_case() -> None:
    """The test's own reference: two unit squares offset by half a side overlap by 0.5."""
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    shift = np.array([0.5, 0.0])
    assert polygon_area(clip_convex(square, square + shift)) == pytest.approx(0.5)
    assert polygon_area(clip_convex(square, square + 4 * shift)) == 0.0
    diamond = np.array([[0.5, -0.2], [1.2, 0.5], [0.5, 1.2], [-0.2, 0.5]])
    area = polygon_area(clip_convex(square, diamond))
    assert area == pytest.approx(polygon_area(clip_convex(diamond, square)))
    assert 0.5 < area < 1.0


# ------------------------------------------------------------------------------------------------
# points in boxes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_points_in_boxes_matches_rotation_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 12)
    points = np.concatenate(
        [rng.uniform(-9.0, 9.0, (4000, 2)), rng.uniform(-1.5, 4.5, (4000, 1)), rng.uniform(0, 1, (4000, 1))],
        axis=1,
    ).astype(np.float32)
    inside = points_in_boxes(points, boxes)
    assert isinstance(inside, np.ndarray)
    assert inside.shape == (4000, 12)
    assert inside.dtype == np.bool_
    expected, margin = ref_points_in_boxes(points.astype(np.float64), boxes)
    clear = np.abs(margin) > 1e-4  # float32 kernel: leave out points within 0.1 mm of a face
    assert clear.mean() > 0.99
    assert expected[clear].sum() > 200  # the case is not trivially empty
    np.testing.assert_array_equal(inside[clear], expected[clear])
    counts = count_points_in_boxes(points, boxes)
    assert counts.shape == (12,)
    np.testing.assert_array_equal(counts, inside.sum(axis=0))


def test_points_in_boxes_hand_case() -> None:
    """A 4 x 2 x 1.5 box turned 90 degrees: its length now runs along y, and z starts at its bottom."""
    box = np.array([[10.0, 5.0, -1.0, 4.0, 2.0, 1.5, np.pi / 2]])
    pts = np.array(
        [
            [10.0, 6.9, -0.9],  # along the (now y) length: inside
            [11.9, 5.0, -0.9],  # 1.9 m along x, but the width is only 2: outside
            [10.5, 5.0, 0.4],  # under the roof
            [10.5, 5.0, 0.6],  # above the roof
            [10.5, 5.0, -1.1],  # below the bottom
        ]
    )
    np.testing.assert_array_equal(points_in_boxes(pts, box)[:, 0], [True, False, True, False, False])
    assert count_points_in_boxes(pts, box).tolist() == [2]


def test_points_in_boxes_torch_in_torch_out() -> None:
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 5)
    pts = rng.uniform(-8, 8, (500, 3))
    out = points_in_boxes(torch.from_numpy(pts), torch.from_numpy(boxes))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    np.testing.assert_array_equal(out.numpy(), points_in_boxes(pts, boxes))
    counts = count_points_in_boxes(torch.from_numpy(pts), torch.from_numpy(boxes))
    assert isinstance(counts, torch.Tensor)
    np.testing.assert_array_equal(counts.numpy(), out.numpy().sum(0))


@pytest.mark.parametrize("seed", [0, 1])
def test_points_in_boxes_torch_fallback_matches_mmcv(seed: int) -> None:
    """The fallback for machines without mmcv's compiled ops gives mmcv's answer: random boxes and
    points, plus points exactly on the faces of axis-aligned boxes (open footprint, closed height)."""
    from mmcv.ops import points_in_boxes_cpu

    from sim.box_ops import _points_in_boxes_torch

    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 10)
    axis_aligned = np.array([[1.0, -2.0, -1.0, 4.0, 2.0, 1.5, 0.0], [-3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 0.0]])
    boxes = np.concatenate([boxes, axis_aligned]).astype(np.float32)
    on_faces = np.array(
        [
            [3.0, -2.0, -0.5],
            [-1.0, -2.0, -0.5],
            [1.0, -1.0, -0.5],
            [1.0, -2.0, -1.0],
            [1.0, -2.0, 0.5],
            [-3.0, 4.0, 1.0],
            [-2.0, 3.0, 1.0],
            [-3.0, 3.0, 0.0],
            [-3.0, 3.0, 2.0],
            [-3.0, 3.0, 2.0001],
        ],
        dtype=np.float32,
    )
    points = np.concatenate([rng.uniform(-8.0, 8.0, (3000, 3)).astype(np.float32), on_faces])
    points_t, boxes_t = torch.from_numpy(points), torch.from_numpy(boxes)
    ours = _points_in_boxes_torch(points_t, boxes_t)
    theirs = points_in_boxes_cpu(points_t[None], boxes_t[None])[0].bool()
    assert theirs[:3000].sum() > 100 and theirs[3000:].any() and not theirs[3000:].all()
    assert torch.equal(ours, theirs)


def test_points_in_boxes_without_mmcv_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``mmcv.ops`` cannot be imported (no mmcv, or no kernel built for this torch / CUDA),
    points_in_boxes answers the same through the torch fallback."""
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 6)
    pts = rng.uniform(-8, 8, (800, 3))
    with_mmcv = points_in_boxes(pts, boxes)
    monkeypatch.setitem(sys.modules, "mmcv.ops", None)  # makes `from mmcv.ops import ...` raise ImportError
    without = points_in_boxes(pts, boxes)
    assert with_mmcv.sum() > 20
    np.testing.assert_array_equal(without, with_mmcv)


def test_points_in_boxes_empty_and_bad_input() -> None:
    assert points_in_boxes(np.zeros((0, 4)), np.ones((3, 7))).shape == (0, 3)
    assert points_in_boxes(np.zeros((5, 3)), np.zeros((0, 7))).shape == (5, 0)
    assert count_points_in_boxes(np.zeros((5, 3)), np.zeros((0, 7))).shape == (0,)
    with pytest.raises(ValueError, match="boxes"):
        points_in_boxes(np.zeros((5, 3)), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="points"):
        points_in_boxes(np.zeros((5, 2)), np.zeros((2, 7)))
    with pytest.raises(ValueError, match="mix"):
        points_in_boxes(torch.zeros((5, 3)), np.zeros((2, 7)))


# ------------------------------------------------------------------------------------------------
# IoU
# ------------------------------------------------------------------------------------------------


def test_bev_iou_hand_cases() -> None:
    a = np.array([[1.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.3]])
    far = a.copy()
    far[0, 0] += 20.0
    assert bev_iou(a, a)[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert bev_iou(a, far)[0, 0] == 0.0
    # dx = 2 dy against itself turned 90 degrees: a dy x dy square in common, IoU = 1 / (2 + 2 - 1)
    b = np.array([[0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0]])
    b90 = b.copy()
    b90[0, 6] = np.pi / 2
    assert bev_iou(b, b90)[0, 0] == pytest.approx(1.0 / 3.0, abs=1e-12)
    # a box turned by pi is the same footprint
    b180 = b.copy()
    b180[0, 6] = np.pi
    assert bev_iou(b, b180)[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert bev_intersection_area(b, b90)[0, 0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_bev_overlap_agrees_with_the_exact_intersection_area(seed: int) -> None:
    """The separating-axis shortcut must give the same answer as clipping, including for boxes
    that touch along an edge, nearly touch, or sit a hair inside each other."""
    rng = np.random.default_rng(seed)
    n = 2000
    a = np.column_stack(
        [
            rng.uniform(-50, 50, (n, 2)),
            np.zeros(n),
            rng.uniform(1, 12, (n, 2)),
            np.ones(n),
            rng.uniform(-np.pi, np.pi, n),
        ]
    )
    b = a.copy()
    heading = np.column_stack([np.cos(a[:, 6]), np.sin(a[:, 6])])
    # b sits ahead of a along a's heading with a bumper gap of -1 cm .. +1 cm; a third are random
    gap = rng.choice([-1e-2, -1e-7, 0.0, 1e-7, 1e-2], n)
    b[:, 3] = rng.uniform(1, 12, n)
    b[:, :2] = a[:, :2] + heading * ((a[:, 3] + b[:, 3]) / 2 + gap)[:, None]
    loose = rng.uniform(size=n) < 1 / 3
    b[loose, :2] = a[loose, :2] + rng.uniform(-8, 8, (loose.sum(), 2))
    b[loose, 6] = rng.uniform(-np.pi, np.pi, loose.sum())
    exact = np.array([bev_intersection_area(a[i : i + 1], b[i : i + 1])[0, 0] > 0.0 for i in range(n)])
    fast = bev_overlap(a, b)
    assert fast.dtype == bool and fast.shape == (n,)
    assert np.array_equal(fast, exact)
    assert 0 < exact.sum() < n  # both answers occur
    with pytest.raises(ValueError, match="pair up"):
        bev_overlap(a[:3], b[:2])


def test_bev_iou_angle_sign() -> None:
    """Pins the angle convention: two 4 x 1 boxes headed at +45 degrees, the second moved 1 m
    along that heading, overlap over 3 x 1 (IoU 3 / 5). Were the yaw read clockwise, the boxes
    would lie across the offset and only touch (IoU 0)."""
    yaw = np.pi / 4
    a = np.array([[0.0, 0.0, 0.0, 4.0, 1.0, 1.0, yaw]])
    b = np.array([[np.cos(yaw), np.sin(yaw), 0.0, 4.0, 1.0, 1.0, yaw]])
    assert bev_iou(a, b)[0, 0] == pytest.approx(0.6, abs=1e-12)
    assert ref_bev_iou(a, b)[0, 0] == pytest.approx(0.6, abs=1e-12)
    assert iou_3d(a, b)[0, 0] == pytest.approx(0.6, abs=1e-12)


def collinear_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of boxes (n, 7) x 2 with parallel, often collinear, edges: same or opposite heading,
    or turned 90 degrees with swapped sizes, shifted along and across so that sides line up."""
    a = np.concatenate(
        [
            rng.uniform(-80, 80, (n, 2)),
            rng.uniform(-1, 1, (n, 1)),
            rng.uniform(0.5, 12.0, (n, 2)),
            rng.uniform(0.5, 3.0, (n, 1)),
            rng.uniform(-np.pi, np.pi, (n, 1)),
        ],
        axis=1,
    )
    b = a.copy()
    resize = rng.uniform(size=n) < 0.5
    b[resize, 3:5] = rng.uniform(0.5, 12.0, (int(resize.sum()), 2))
    along = rng.uniform(-8, 8, n)
    side = rng.choice([-1.0, 1.0], n)
    lateral = np.select(
        [rng.uniform(size=n) < 0.5, rng.uniform(size=n) < 0.5],
        [side * (a[:, 4] - b[:, 4]) / 2, side * (a[:, 4] + b[:, 4]) / 2],  # flush inside, or touching
        rng.uniform(-4, 4, n),
    )
    c, s = np.cos(a[:, 6]), np.sin(a[:, 6])
    b[:, 0] += along * c - lateral * s
    b[:, 1] += along * s + lateral * c
    turn = rng.choice([0.0, np.pi / 2, np.pi, -np.pi / 2], n)
    b[:, 6] += turn + rng.choice([0.0, 1e-9, 1e-6], n)
    quarter = np.isclose(np.abs(turn), np.pi / 2)
    b[quarter, 3], b[quarter, 4] = b[quarter, 4].copy(), b[quarter, 3].copy()
    return a, b


def test_bev_iou_collinear_edges_are_exact() -> None:
    """Boxes with collinear edges, where mmcv 2.1's box_iou_rotated goes wrong: ours matches the
    polygon-clipping reference to rounding."""
    rng = np.random.default_rng(11)
    a, b = collinear_pairs(rng, 400)
    ours = np.array([bev_iou(a[i : i + 1], b[i : i + 1])[0, 0] for i in range(len(a))])
    expected = np.array([ref_bev_iou(a[i : i + 1], b[i : i + 1])[0, 0] for i in range(len(a))])
    assert (expected > 0.01).mean() > 0.3
    np.testing.assert_allclose(ours, expected, atol=1e-9)
    # the whole matrix at once gives the same diagonal as pair by pair
    np.testing.assert_allclose(np.diag(bev_iou(a[:50], b[:50])), ours[:50], atol=1e-12)


def test_mmcv_box_iou_rotated_is_wrong_on_collinear_edges() -> None:
    """Why bev_iou does not call mmcv: two 4 x 2 cars headed 0.5 rad, one 3 m behind the other,
    share 1 x 2 of footprint (IoU 1/7). mmcv 2.1 answers about 0.45. If this starts failing,
    mmcv has been fixed and box_ops could go back to it."""
    from mmcv.ops import box_iou_rotated

    yaw = 0.5
    a = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, yaw]])
    b = np.array([[-3.0 * np.cos(yaw), -3.0 * np.sin(yaw), 0.0, 4.0, 2.0, 1.5, yaw]])
    assert bev_iou(a, b)[0, 0] == pytest.approx(1.0 / 7.0, abs=1e-12)
    bev_columns = [0, 1, 3, 4, 6]
    theirs = box_iou_rotated(
        torch.from_numpy(a[:, bev_columns]).float(), torch.from_numpy(b[:, bev_columns]).float()
    )
    assert abs(theirs.item() - 1.0 / 7.0) > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_bev_iou_matches_polygon_clipping_and_mmcv(seed: int) -> None:
    """Random boxes: equal to the test's reference, and to mmcv (angle convention included) to
    mmcv's float32 precision, since generic pairs do not hit mmcv's collinear-edge error."""
    from mmcv.ops import box_iou_rotated

    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 15), random_boxes(rng, 11)
    iou = bev_iou(a, b)
    assert isinstance(iou, np.ndarray) and iou.shape == (15, 11) and iou.dtype == np.float64
    expected = ref_bev_iou(a, b)
    assert (expected > 0.05).sum() > 10  # plenty of real overlaps
    np.testing.assert_allclose(iou, expected, atol=1e-9)
    bev_columns = [0, 1, 3, 4, 6]
    theirs = box_iou_rotated(
        torch.from_numpy(a[:, bev_columns]).float(), torch.from_numpy(b[:, bev_columns]).float()
    )
    np.testing.assert_allclose(iou, theirs.numpy(), atol=1e-4)
    np.testing.assert_allclose(bev_intersection_area(a, b), ref_bev_intersection(a, b), atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_iou_3d_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed + 10)
    a, b = random_boxes(rng, 13, spread=4.0), random_boxes(rng, 9, spread=4.0)
    a[:, 2] = rng.uniform(-1.0, 1.0, len(a))
    iou = iou_3d(a, b)
    expected = ref_iou_3d(a, b)
    assert (expected > 0.05).sum() > 5
    np.testing.assert_allclose(iou, expected, atol=1e-9)
    assert np.all(iou <= bev_iou(a, b) + 1e-12)  # height overlap can only shrink it


def test_iou_3d_hand_case_and_mmdet3d() -> None:
    """Same footprint, heights [0, 2] and [1, 3]: a third. Then agreement with mmdet3d's own on
    generic random boxes."""
    a = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.7]])
    b = np.array([[0.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.7]])
    assert iou_3d(a, b)[0, 0] == pytest.approx(1.0 / 3.0, abs=1e-12)
    above = a.copy()
    above[0, 2] += 2.5
    assert iou_3d(a, above)[0, 0] == 0.0

    from mmdet3d.structures import LiDARInstance3DBoxes

    rng = np.random.default_rng(5)
    ra, rb = random_boxes(rng, 8, spread=4.0), random_boxes(rng, 7, spread=4.0)
    theirs = LiDARInstance3DBoxes.overlaps(
        LiDARInstance3DBoxes(torch.from_numpy(ra).float()), LiDARInstance3DBoxes(torch.from_numpy(rb).float())
    )
    assert (theirs > 0.05).sum() > 3
    np.testing.assert_allclose(iou_3d(ra, rb), theirs.numpy(), atol=1e-4)


def test_iou_torch_in_torch_out_and_bad_input() -> None:
    rng = np.random.default_rng(4)
    a, b = random_boxes(rng, 4), random_boxes(rng, 3)
    for fn in (bev_iou, iou_3d, bev_intersection_area):
        out = fn(torch.from_numpy(a).float(), torch.from_numpy(b).float())
        assert isinstance(out, torch.Tensor) and out.shape == (4, 3) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), fn(a.astype(np.float32), b.astype(np.float32)), atol=0)
        assert fn(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32
        assert fn(a, np.zeros((0, 7))).shape == (4, 0)
        with pytest.raises(ValueError, match="boxes_b"):
            fn(a, b[:, :5])
        with pytest.raises(ValueError, match="mix"):
            fn(a, torch.from_numpy(b))
        with pytest.raises(ValueError, match="negative"):
            fn(a, b * [1, 1, 1, -1, 1, 1, 1])


def test_bev_iou_far_from_origin_and_degenerate() -> None:
    """Boxes a few km out keep full precision; zero-area boxes give 0, not NaN."""
    yaw = 0.5
    offset = np.array([[3000.0, -2000.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    a = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, yaw]])
    b = np.array([[-3.0 * np.cos(yaw), -3.0 * np.sin(yaw), 0.0, 4.0, 2.0, 1.5, yaw]])
    assert bev_iou(a + offset, b + offset)[0, 0] == pytest.approx(1.0 / 7.0, abs=1e-9)
    flat = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert bev_iou(flat, flat)[0, 0] == 0.0
    assert iou_3d(flat, a)[0, 0] == 0.0


# ------------------------------------------------------------------------------------------------
# NMS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_bev_matches_greedy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # clusters of jittered copies, as a detector's raw output looks
    centres = random_boxes(rng, 6, spread=15.0)
    boxes = np.repeat(centres, 5, axis=0)
    boxes[:, :2] += rng.normal(0, 0.4, (len(boxes), 2))
    boxes[:, 6] += rng.normal(0, 0.15, len(boxes))
    scores = rng.uniform(0, 1, len(boxes))
    threshold = 0.3
    iou = ref_bev_iou(boxes, boxes)
    off_diagonal = iou[~np.eye(len(boxes), dtype=bool)]
    assert np.all(np.abs(off_diagonal - threshold) > 1e-6), "test case too close to the threshold"
    expected = ref_greedy_nms(iou, scores, threshold)
    assert 1 < len(expected) < len(boxes)  # something kept, something suppressed

    keep = nms_bev(boxes, scores, threshold)
    assert isinstance(keep, np.ndarray) and keep.dtype == np.int64
    assert keep.tolist() == expected

    keep_t = nms_bev(torch.from_numpy(boxes), torch.from_numpy(scores), threshold)
    assert isinstance(keep_t, torch.Tensor) and keep_t.dtype == torch.int64
    assert keep_t.tolist() == expected


def test_nms_bev_matrix_and_streaming_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    centres = random_boxes(rng, 20, spread=30.0)
    boxes = np.repeat(centres, 15, axis=0)  # 300 candidates, as the detection head's pre-NMS cap
    boxes[:, :2] += rng.normal(0, 0.5, (len(boxes), 2))
    boxes[:, 6] += rng.normal(0, 0.2, len(boxes))
    scores = rng.uniform(0, 1, len(boxes))
    expected = ref_greedy_nms(ref_bev_iou(boxes, boxes), scores, 0.2)
    assert nms_bev(boxes, scores, 0.2).tolist() == expected
    monkeypatch.setattr(box_ops, "_NMS_MATRIX_MAX", 10)  # force the per-kept-box path
    assert nms_bev(boxes, scores, 0.2).tolist() == expected


def test_nms_bev_edges() -> None:
    boxes = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], [0.1, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    scores = np.array([0.2, 0.9])
    assert nms_bev(boxes, scores, 0.5).tolist() == [1]
    assert nms_bev(boxes, scores, 1.0).tolist() == [1, 0]  # nothing is above an IoU of 1
    assert nms_bev(boxes, np.array([0.5, 0.5]), 0.5).tolist() == [0]  # ties: lower index first
    # the collinear case mmcv gets wrong: IoU 1/7 must survive a 0.3 threshold
    yaw = 0.5
    pair = np.array(
        [[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, yaw], [-3 * np.cos(yaw), -3 * np.sin(yaw), 0.0, 4.0, 2.0, 1.5, yaw]]
    )
    assert nms_bev(pair, scores, 0.3).tolist() == [1, 0]
    assert nms_bev(np.zeros((0, 7)), np.zeros(0), 0.5).shape == (0,)
    with pytest.raises(ValueError, match="scores"):
        nms_bev(boxes, scores[:1], 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_bev(boxes, scores, 1.5)


# ------------------------------------------------------------------------------------------------
# Real data: KITTI 000008 with mmdet3d's own point counts
# ------------------------------------------------------------------------------------------------


def test_count_points_matches_kitti_num_lidar_pts() -> None:
    """Camera boxes converted to LiDAR by mmdet3d; our counts equal the info's ``num_lidar_pts``."""
    from mmdet3d.structures import Box3DMode, CameraInstance3DBoxes

    folder = DATA / "kitti_000008"
    bin_path, info_path = folder / "000008.bin", folder / "000008.pkl"
    assert bin_path.is_file() and info_path.is_file(), (
        f"KITTI sample missing: expected {bin_path} and {info_path} (shared test data, see its README)"
    )
    points = np.fromfile(bin_path, dtype=np.float32).reshape(-1, 4)
    with info_path.open("rb") as f:
        info = pickle.load(f)["data_list"][0]
    instances = [inst for inst in info["instances"] if inst["num_lidar_pts"] >= 0]  # drop DontCare
    assert len(instances) >= 5
    boxes_cam = torch.tensor([inst["bbox_3d"] for inst in instances], dtype=torch.float32)
    T_cam_from_lidar = np.array(info["images"]["CAM2"]["lidar2cam"], dtype=np.float64)
    boxes_lidar = (
        CameraInstance3DBoxes(boxes_cam)
        .convert_to(Box3DMode.LIDAR, rt_mat=torch.from_numpy(np.linalg.inv(T_cam_from_lidar)).float())
        .tensor.numpy()
    )
    # the conversion is the documented one: yaw = -ry - pi/2, sizes (l, h, w) -> (l, w, h)
    ry = boxes_cam[:, 6].numpy()
    np.testing.assert_allclose(np.cos(boxes_lidar[:, 6]), np.cos(-ry - np.pi / 2), atol=1e-5)
    np.testing.assert_allclose(np.sin(boxes_lidar[:, 6]), np.sin(-ry - np.pi / 2), atol=1e-5)
    np.testing.assert_allclose(boxes_lidar[:, 3:6], boxes_cam[:, [3, 5, 4]].numpy(), atol=1e-6)

    counts = count_points_in_boxes(points, boxes_lidar)
    expected = [inst["num_lidar_pts"] for inst in instances]
    assert counts.tolist() == expected
