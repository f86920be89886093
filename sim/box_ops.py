"""Box operations for the whole stack, in one place.

Boxes are always ``(M, 7)`` in mmdet3d's LiDAR convention (see docs/architecture.md): x, y, z of
the **bottom** centre, dx (length, along the heading), dy (width), dz (height), yaw
counter-clockwise from +x, radians. Every function accepts numpy arrays or torch tensors and
answers in kind: numpy in, numpy out; torch in, torch out (on the input's device). Mixing the two
in one call is a ``ValueError``. None of these is differentiable.

Where the work is done:

- Points in boxes: mmcv's ``points_in_boxes_cpu`` (``points_in_boxes_all`` for CUDA tensors),
  float32, imported lazily so that ``import sim`` stays light. mmcv's compiled ops exist only for
  the torch / CUDA pairs OpenMMLab builds wheels for (none for recent torch or CUDA 13); where
  they cannot be imported, the same test (same float32 arithmetic and strict/closed bounds) runs
  as a few torch expressions on the tensors' device, checked equal to mmcv's kernel in
  tests/sim/test_box_ops.py.
- BEV overlap (``bev_iou``, ``iou_3d``, ``nms_bev``): an exact float64 clipping of the two
  footprints written here. mmcv 2.1's ``box_iou_rotated`` (and ``nms_rotated``, which shares its
  kernel, and mmdet3d's ``overlaps``/``nms_bev`` built on them) returns wrong values when two
  boxes have collinear edges: same-heading vehicles one behind the other or side by side, boxes
  that share an edge, even axis-aligned ones. On random pairs of that kind about 1 in 60 is off by
  more than 0.01 IoU, some by more than 0.5 (tests/sim/test_box_ops.py keeps one such case).
  shapely is exact but costs about 24 us per pair; the vectorised clipping here costs about 4 us
  per pair (mmcv's CPU kernel: about 2 us), and pairs whose bounding circles do not meet are
  skipped outright.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sim.geometry import box_corners

if TYPE_CHECKING:
    import torch

__all__ = [
    "bev_intersection_area",
    "bev_iou",
    "bev_overlap",
    "count_points_in_boxes",
    "iou_3d",
    "nms_bev",
    "points_in_boxes",
]

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

# bev_overlap: separating-axis depths beyond these (metres) decide a pair without clipping; float64
# rounding on world coordinates is around 1e-13 m, so the exact clipping agrees beyond them
_APART_M = 1e-6
_OVERLAP_M = 1e-2
# Pairs of boxes clipped per vectorised batch: bounds the temporary arrays to a few tens of MB.
_PAIRS_PER_CHUNK = 1 << 16
# nms_bev computes the full pairwise IoU matrix up to this many boxes (8 MiB of float64)
_NMS_MATRIX_MAX = 1024


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def _is_torch(x: object) -> bool:
    """True for a torch tensor, without importing torch when nobody has."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(x, torch_module.Tensor)


def _check_kinds(arrays: tuple[Any, ...], names: tuple[str, ...]) -> bool:
    """Whether the inputs are torch tensors; ValueError when numpy and torch are mixed."""
    kinds = [_is_torch(a) for a in arrays]
    if any(kinds) and not all(kinds):
        given = ", ".join(f"{n}={'torch' if k else 'numpy'}" for n, k in zip(names, kinds, strict=True))
        raise ValueError(f"pass all numpy arrays or all torch tensors, not a mix ({given})")
    return all(kinds)


def _check_boxes(boxes: Any, name: str) -> None:
    shape = tuple(boxes.shape)
    if len(shape) != 2 or shape[1] != 7:
        raise ValueError(f"{name} must be (M, 7) boxes [x, y, z_bottom, dx, dy, dz, yaw], got shape {shape}")


def _check_points(points: Any) -> None:
    shape = tuple(points.shape)
    if len(shape) != 2 or shape[1] < 3:
        raise ValueError(f"points must be (N, 3 + F) with xyz first, got shape {shape}")


def _numpy_f64(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def _check_sizes(boxes: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{name} has non-finite values")
    if np.any(boxes[:, 3:6] < 0):
        raise ValueError(f"{name} has negative sizes (dx, dy, dz must be >= 0)")


def _result_like(values: np.ndarray, like: Any) -> np.ndarray | torch.Tensor:
    """``values`` (float64) as the kind and floating dtype of ``like`` (float64 if it has none)."""
    if _is_torch(like):
        import torch

        dtype = like.dtype if like.dtype.is_floating_point else torch.float64
        return torch.from_numpy(values).to(device=like.device, dtype=dtype)
    dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64
    return values.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# Points in boxes (mmcv)
# --------------------------------------------------------------------------------------------------


def points_in_boxes(points: ArrayT, boxes: ArrayT) -> ArrayT:
    """Which boxes contain each point.

    A point is inside when it lies strictly within the box's footprint (in the box's own frame,
    ``|x| < dx/2`` and ``|y| < dy/2``) and within its height (``z_bottom <= z <= z_bottom + dz``),
    computed in float32: mmcv's ``points_in_boxes_cpu`` (``points_in_boxes_all`` on CUDA).

    Args:
        points: (N, 3 + F) points, xyz in the boxes' frame; extra columns are ignored.
        boxes: (M, 7) bottom-centre boxes.

    Returns:
        (N, M) bool, ``out[i, j]`` true when point i is in box j.
    """
    import torch

    _check_points(points)
    _check_boxes(boxes, "boxes")
    as_torch = _check_kinds((points, boxes), ("points", "boxes"))
    if as_torch:
        device = points.device
        points_t = points[:, :3].detach().to(dtype=torch.float32)
        boxes_t = boxes.detach().to(device=device, dtype=torch.float32)
    else:
        device = torch.device("cpu")
        points_t = torch.from_numpy(np.ascontiguousarray(np.asarray(points)[:, :3], dtype=np.float32))
        boxes_t = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
    n, m = points_t.shape[0], boxes_t.shape[0]
    if n == 0 or m == 0:
        inside = torch.zeros((n, m), dtype=torch.bool, device=device)
    else:
        kernel = _mmcv_points_in_boxes(points_t.is_cuda)
        if kernel is None:
            inside = _points_in_boxes_torch(points_t, boxes_t)
        else:
            # mmcv takes a batch: points (1, N, 3), boxes (1, M, 7) -> (1, N, M) int
            inside = kernel(points_t[None].contiguous(), boxes_t[None].contiguous())[0].bool()
    return inside if as_torch else inside.numpy()


def _mmcv_points_in_boxes(cuda: bool) -> Callable[..., Any] | None:
    """mmcv's points-in-boxes kernel for the device, or None where mmcv's compiled ops are missing."""
    try:
        from mmcv.ops import points_in_boxes_all, points_in_boxes_cpu
    except ImportError:  # mmcv absent, or mmcv-lite / a build without ops (ModuleNotFoundError included)
        return None
    return points_in_boxes_all if cuda else points_in_boxes_cpu


def _points_in_boxes_torch(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """mmcv's ``check_pt_in_box3d`` as torch expressions, for machines without mmcv's compiled ops.

    Written here only because mmcv ships no kernel for every torch / CUDA pair; the arithmetic
    follows mmcv's (float32, rotation by ``-yaw``, open footprint, closed height), so the two can
    differ only for points within float32 rounding of a box face.

    Args:
        points: (N, 3) float32 points.
        boxes: (M, 7) float32 bottom-centre boxes.

    Returns:
        (N, M) bool.
    """
    import torch

    half = boxes[:, 3:6] / 2.0  # (M, 3)
    centre_z = boxes[:, 2] + half[:, 2]
    within_z = (points[:, None, 2] - centre_z[None, :]).abs() <= half[None, :, 2]
    shift_x = points[:, None, 0] - boxes[None, :, 0]  # (N, M)
    shift_y = points[:, None, 1] - boxes[None, :, 1]
    cos_a, sin_a = torch.cos(-boxes[:, 6]), torch.sin(-boxes[:, 6])
    local_x = shift_x * cos_a + shift_y * (-sin_a)
    local_y = shift_x * sin_a + shift_y * cos_a
    return (
        within_z
        & (local_x > -half[None, :, 0])
        & (local_x < half[None, :, 0])
        & (local_y > -half[None, :, 1])
        & (local_y < half[None, :, 1])
    )


def count_points_in_boxes(points: ArrayT, boxes: ArrayT) -> ArrayT:
    """Number of points in each box, with :func:`points_in_boxes`'s rule.

    Args:
        points: (N, 3 + F) points, xyz in the boxes' frame.
        boxes: (M, 7) bottom-centre boxes.

    Returns:
        (M,) int64 counts.
    """
    inside = points_in_boxes(points, boxes)
    return inside.sum(0) if _is_torch(inside) else inside.sum(axis=0, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Exact BEV intersection (float64)
# --------------------------------------------------------------------------------------------------


def _clip_rectangles(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Area of the intersection of pairs of counter-clockwise quadrilaterals, (P, 4, 2) each -> (P,).

    Sutherland-Hodgman, vectorised over pairs: ``subject`` is clipped by each of ``clip``'s four
    edges in turn (inside = on the left of a counter-clockwise edge, boundary included). A convex
    polygon cut by a half-plane gains at most one vertex, so the working polygons stay small; the
    arrays are resized to the largest vertex count after each cut. Coordinates are taken relative
    to the pair's mid-point so that far-from-origin boxes keep their precision.
    """
    n_pairs = len(subject)
    centre = 0.5 * (subject.mean(axis=1) + clip.mean(axis=1))  # (P, 2)
    poly = subject - centre[:, None]  # (P, V, 2) working polygon, first `count` slots valid
    clip = clip - centre[:, None]
    count = np.full(n_pairs, 4)
    rows = np.arange(n_pairs)[:, None]
    for e in range(4):
        start = clip[:, e][:, None]  # (P, 1, 2)
        edge = clip[:, (e + 1) % 4][:, None] - start
        slot = np.arange(poly.shape[1])[None]
        valid = slot < count[:, None]  # (P, V)
        # cross(edge, vertex - start) >= 0: vertex on the inner side of this edge
        side = edge[..., 0] * (poly[..., 1] - start[..., 1]) - edge[..., 1] * (poly[..., 0] - start[..., 0])
        nxt = (slot + 1) % np.maximum(count, 1)[:, None]
        poly_next, side_next = poly[rows, nxt], side[rows, nxt]
        inside, inside_next = side >= 0, side_next >= 0
        crossing = valid & (inside != inside_next)
        t = np.where(crossing, side / np.where(crossing, side - side_next, 1.0), 0.0)
        cut = poly + t[..., None] * (poly_next - poly)
        # each edge (v -> next) emits its crossing point, then `next` if inside: 2 slots per edge
        candidates = np.stack([cut, poly_next], axis=2).reshape(n_pairs, -1, 2)
        kept = np.stack([crossing, valid & inside_next], axis=2).reshape(n_pairs, -1)
        dest = np.cumsum(kept, axis=1) - 1
        count = dest[:, -1] + 1
        poly = np.zeros((n_pairs, max(int(count.max()), 1), 2))
        r, c = np.nonzero(kept)
        poly[r, dest[r, c]] = candidates[r, c]
    # shoelace over the valid vertices; empty slots repeat vertex 0 and add nothing
    slot = np.arange(poly.shape[1])[None]
    poly = np.where((slot < count[:, None])[..., None], poly, poly[:, :1])
    closed = np.concatenate([poly, poly[:, :1]], axis=1)
    x, y = closed[..., 0], closed[..., 1]
    twice_area = (x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]).sum(axis=1)
    return np.where(count >= 3, 0.5 * np.abs(twice_area), 0.0)


def _bev_intersection_f64(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(M, K) footprint intersection areas of float64 (M, 7) and (K, 7) boxes."""
    m, k = len(boxes_a), len(boxes_b)
    out = np.zeros((m, k))
    if m == 0 or k == 0:
        return out
    # only pairs whose circumscribed circles meet can overlap
    radius_a = 0.5 * np.hypot(boxes_a[:, 3], boxes_a[:, 4])
    radius_b = 0.5 * np.hypot(boxes_b[:, 3], boxes_b[:, 4])
    gap = np.hypot(boxes_a[:, None, 0] - boxes_b[None, :, 0], boxes_a[:, None, 1] - boxes_b[None, :, 1])
    ia, ib = np.nonzero(gap < radius_a[:, None] + radius_b[None, :])
    if len(ia) == 0:
        return out
    footprint_a = box_corners(boxes_a)[:, :4, :2]  # (M, 4, 2) counter-clockwise
    footprint_b = box_corners(boxes_b)[:, :4, :2]
    for s in range(0, len(ia), _PAIRS_PER_CHUNK):
        pa, pb = ia[s : s + _PAIRS_PER_CHUNK], ib[s : s + _PAIRS_PER_CHUNK]
        out[pa, pb] = _clip_rectangles(footprint_a[pa], footprint_b[pb])
    return out


def _bev_iou_f64(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    inter = _bev_intersection_f64(boxes_a, boxes_b)
    area_a = boxes_a[:, 3] * boxes_a[:, 4]
    area_b = boxes_b[:, 3] * boxes_b[:, 4]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).clip(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Public overlap functions
# --------------------------------------------------------------------------------------------------


def bev_intersection_area(boxes_a: ArrayT, boxes_b: ArrayT) -> ArrayT:
    """Area of the intersection of the boxes' footprints seen from above, square metres.

    Args:
        boxes_a: (M, 7) bottom-centre boxes.
        boxes_b: (K, 7) bottom-centre boxes, same frame.

    Returns:
        (M, K) areas, in ``boxes_a``'s floating dtype (float64 otherwise).
    """
    a, b = _prepare_pair(boxes_a, boxes_b)
    return _result_like(_bev_intersection_f64(a, b), boxes_a)


def bev_iou(boxes_a: ArrayT, boxes_b: ArrayT) -> ArrayT:
    """Intersection over union of the boxes' footprints seen from above (z and dz ignored).

    Args:
        boxes_a: (M, 7) bottom-centre boxes.
        boxes_b: (K, 7) bottom-centre boxes, same frame.

    Returns:
        (M, K) IoU in [0, 1] (0 where both footprints are empty), in ``boxes_a``'s floating
        dtype (float64 otherwise).
    """
    a, b = _prepare_pair(boxes_a, boxes_b)
    return _result_like(_bev_iou_f64(a, b), boxes_a)


def bev_overlap(boxes_a: ArrayT, boxes_b: ArrayT) -> ArrayT:
    """Whether the footprints of ``boxes_a[p]`` and ``boxes_b[p]`` intersect with a positive area,
    pair by pair (the diagonal of ``bev_intersection_area(boxes_a, boxes_b) > 0``).

    A separating-axis test on the four edge normals decides the pairs that are clearly apart or
    clearly overlapping (by more than a micrometre / a centimetre along every axis); only the
    rest, boxes touching or nearly so, go through the exact clipping. Collision checks, where
    nearly every pair is clearly apart, cost a few array operations instead of a clipping.

    Args:
        boxes_a: (P, 7) bottom-centre boxes.
        boxes_b: (P, 7) bottom-centre boxes, same frame.

    Returns:
        (P,) bool.
    """
    a, b = _prepare_pair(boxes_a, boxes_b)
    if len(a) != len(b):
        raise ValueError(f"boxes_a and boxes_b must pair up, got {len(a)} and {len(b)} boxes")
    ca, sa, cb, sb = np.cos(a[:, 6]), np.sin(a[:, 6]), np.cos(b[:, 6]), np.sin(b[:, 6])
    # (4, P, 2) the unit normals of both footprints' edges
    axes = np.stack(
        [np.stack([ca, sa], 1), np.stack([-sa, ca], 1), np.stack([cb, sb], 1), np.stack([-sb, cb], 1)]
    )

    def half_extent(c: np.ndarray, s: np.ndarray, box: np.ndarray) -> np.ndarray:
        """(4, P) half the width of a footprint heading (c, s) seen along each axis u:
        |u . heading| length / 2 + |u . left| width / 2."""
        along = np.abs(axes[..., 0] * c + axes[..., 1] * s)
        across = np.abs(axes[..., 1] * c - axes[..., 0] * s)
        return along * (box[:, 3] / 2.0) + across * (box[:, 4] / 2.0)

    # (P,) how far the footprints overlap along the axis where they overlap least (< 0: apart)
    centre_gap = np.abs(np.einsum("kpd,pd->kp", axes, b[:, :2] - a[:, :2]))  # (4, P)
    depth = (half_extent(ca, sa, a) + half_extent(cb, sb, b) - centre_gap).min(axis=0)
    overlap = depth > _OVERLAP_M
    unsure = np.flatnonzero((depth >= -_APART_M) & ~overlap)
    if len(unsure):
        footprint_a = box_corners(a[unsure])[:, :4, :2]  # (U, 4, 2) counter-clockwise
        footprint_b = box_corners(b[unsure])[:, :4, :2]
        overlap[unsure] = _clip_rectangles(footprint_a, footprint_b) > 0.0
    if _is_torch(boxes_a):
        import torch

        return torch.from_numpy(overlap).to(device=boxes_a.device)
    return overlap


def iou_3d(boxes_a: ArrayT, boxes_b: ArrayT) -> ArrayT:
    """Intersection over union of upright boxes as volumes.

    Intersection = BEV intersection area x overlap of the height intervals
    ``[z_bottom, z_bottom + dz]``; union = volume_a + volume_b - intersection.

    Args:
        boxes_a: (M, 7) bottom-centre boxes.
        boxes_b: (K, 7) bottom-centre boxes, same frame.

    Returns:
        (M, K) IoU in [0, 1] (0 where the union is empty), in ``boxes_a``'s floating dtype
        (float64 otherwise).
    """
    a, b = _prepare_pair(boxes_a, boxes_b)
    inter_bev = _bev_intersection_f64(a, b)  # (M, K)
    top = np.minimum(a[:, None, 2] + a[:, None, 5], b[None, :, 2] + b[None, :, 5])
    bottom = np.maximum(a[:, None, 2], b[None, :, 2])
    inter = inter_bev * np.clip(top - bottom, 0.0, None)
    volume_a = a[:, 3] * a[:, 4] * a[:, 5]
    volume_b = b[:, 3] * b[:, 4] * b[:, 5]
    union = volume_a[:, None] + volume_b[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).clip(0.0, 1.0)
    return _result_like(iou, boxes_a)


def _prepare_pair(boxes_a: Any, boxes_b: Any) -> tuple[np.ndarray, np.ndarray]:
    _check_boxes(boxes_a, "boxes_a")
    _check_boxes(boxes_b, "boxes_b")
    _check_kinds((boxes_a, boxes_b), ("boxes_a", "boxes_b"))
    a, b = _numpy_f64(boxes_a), _numpy_f64(boxes_b)
    _check_sizes(a, "boxes_a")
    _check_sizes(b, "boxes_b")
    return a, b


def _overlaps_after(boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """(M, M) bool: ``[i, j]`` is True when j > i and BEV IoU(i, j) > ``iou_threshold``.

    Only the pairs i < j whose bounding circles meet are clipped (one vectorised pass): half the
    work of the full matrix, which is all greedy NMS over score-sorted boxes needs.
    """
    m = len(boxes)
    out = np.zeros((m, m), dtype=bool)
    radius = 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])
    gap = np.hypot(boxes[:, None, 0] - boxes[None, :, 0], boxes[:, None, 1] - boxes[None, :, 1])
    ia, ib = np.nonzero(np.triu(gap < radius[:, None] + radius[None, :], k=1))
    if len(ia) == 0:
        return out
    footprint = box_corners(boxes)[:, :4, :2]  # (M, 4, 2) counter-clockwise
    area = boxes[:, 3] * boxes[:, 4]
    for s in range(0, len(ia), _PAIRS_PER_CHUNK):
        pa, pb = ia[s : s + _PAIRS_PER_CHUNK], ib[s : s + _PAIRS_PER_CHUNK]
        inter = _clip_rectangles(footprint[pa], footprint[pb])
        union = area[pa] + area[pb] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).clip(0.0, 1.0)
        out[pa, pb] = iou > iou_threshold
    return out


def nms_bev(boxes: ArrayT, scores: ArrayT, iou_threshold: float) -> ArrayT:
    """Greedy non-maximum suppression on :func:`bev_iou`.

    Boxes are visited by decreasing score (ties: lower index first); a box is dropped when its
    BEV IoU with a box already kept is greater than ``iou_threshold``. Up to
    ``_NMS_MATRIX_MAX`` boxes, the IoU of every pair is computed in one vectorised pass (pairs
    whose bounding circles do not meet cost nothing) and the greedy walk runs over that matrix;
    above it, each kept box is compared with the boxes still standing (memory grows with M, not
    M^2). Both give the same result. mmcv's ``nms_rotated`` (which mmdet3d's ``nms_bev`` wraps
    after converting our (x, y, dx, dy, yaw) to corners and back) is not used because it shares
    ``box_iou_rotated``'s collinear-edge error (see the module docstring).

    Args:
        boxes: (M, 7) bottom-centre boxes.
        scores: (M,) confidence, higher is better.
        iou_threshold: suppress above this BEV IoU, in [0, 1].

    Returns:
        (K,) int64 indices into ``boxes`` of the kept boxes, by decreasing score.
    """
    _check_boxes(boxes, "boxes")
    as_torch = _check_kinds((boxes, scores), ("boxes", "scores"))
    if tuple(scores.shape) != (boxes.shape[0],):
        raise ValueError(f"scores must be ({boxes.shape[0]},) to match boxes, got {tuple(scores.shape)}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    boxes_np, scores_np = _numpy_f64(boxes), _numpy_f64(scores)
    _check_sizes(boxes_np, "boxes")

    order = np.argsort(-scores_np, kind="stable")
    keep: list[int] = []
    if len(order) <= _NMS_MATRIX_MAX:
        overlaps = _overlaps_after(boxes_np[order], iou_threshold)  # (M, M) in score order
        suppressed = np.zeros(len(order), dtype=bool)
        for i in range(len(order)):
            if not suppressed[i]:
                keep.append(int(order[i]))
                suppressed |= overlaps[i]
    else:
        standing = order
        while len(standing) > 0:
            best, rest = standing[0], standing[1:]
            keep.append(int(best))
            iou = _bev_iou_f64(boxes_np[best : best + 1], boxes_np[rest])[0]
            standing = rest[iou <= iou_threshold]
    keep_np = np.asarray(keep, dtype=np.int64)
    if as_torch:
        import torch

        return torch.from_numpy(keep_np).to(boxes.device)
    return keep_np
