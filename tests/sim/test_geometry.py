"""Property tests for sim/geometry.py: poses, point and box transforms, the CARLA boundary."""

from __future__ import annotations

import numpy as np
import pytest
import quaternion  # numpy-quaternion
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sim.geometry import (
    S_MIRROR_Y,
    T_from_carla_pose,
    T_from_rotation_translation,
    T_from_xyz_rpy,
    T_from_xyz_yaw,
    box_corners,
    boxes_from_carla,
    boxes_to_carla,
    carla_matrix,
    carla_pose_from_T,
    invert_T,
    rotation_from_rpy,
    rpy_from_rotation,
    transform_boxes,
    transform_points,
    wrap_angle,
    yaw_of,
)

# Hypothesis runs are kept short: these are pure numpy functions, 60 examples each is plenty.
FAST = settings(max_examples=60, deadline=None)

coord = st.floats(-200.0, 200.0, allow_nan=False, allow_infinity=False)
angle = st.floats(-np.pi, np.pi, allow_nan=False, allow_infinity=False)
size = st.floats(0.1, 20.0, allow_nan=False, allow_infinity=False)


@st.composite
def rotations(draw: st.DrawFn) -> np.ndarray:
    """A proper rotation (3, 3) from a random quaternion (any axis, any angle)."""
    q = draw(arrays(np.float64, 4, elements=st.floats(-1.0, 1.0, allow_nan=False)))
    norm = float(np.linalg.norm(q))
    if norm < 0.1:  # too close to zero to normalise reliably: fall back to a fixed axis
        q = np.array([1.0, 0.3, -0.2, 0.5])
        norm = float(np.linalg.norm(q))
    return quaternion.as_rotation_matrix(quaternion.from_float_array(q / norm))


@st.composite
def poses(draw: st.DrawFn) -> np.ndarray:
    """A rigid transform (4, 4) with any rotation and a translation within +-200 m."""
    t = np.array([draw(coord), draw(coord), draw(coord)])
    return T_from_rotation_translation(draw(rotations()), t)


@st.composite
def yaw_poses(draw: st.DrawFn) -> np.ndarray:
    """A rigid transform (4, 4) that rotates about z only."""
    return T_from_xyz_yaw(draw(coord), draw(coord), draw(coord), draw(angle))


@st.composite
def boxes(draw: st.DrawFn, max_boxes: int = 6) -> np.ndarray:
    """(M, 7) bottom-centre boxes, M in [1, max_boxes]."""
    m = draw(st.integers(1, max_boxes))
    rows = [
        [draw(coord), draw(coord), draw(coord), draw(size), draw(size), draw(size), draw(angle)]
        for _ in range(m)
    ]
    return np.array(rows, dtype=np.float64)


@st.composite
def points(draw: st.DrawFn) -> np.ndarray:
    """(N, 4) float64 points: xyz plus an intensity column that transforms must carry unchanged."""
    n = draw(st.integers(1, 20))
    return draw(arrays(np.float64, (n, 4), elements=coord))


def angle_diff_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest absolute difference between angles in degrees, modulo 360."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


# ------------------------------------------------------------------------------------------------
# Poses
# ------------------------------------------------------------------------------------------------


@FAST
@given(poses())
def test_invert_T_round_trips(T_a_from_b: np.ndarray) -> None:
    T_b_from_a = invert_T(T_a_from_b)
    np.testing.assert_allclose(T_a_from_b @ T_b_from_a, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(T_b_from_a @ T_a_from_b, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(invert_T(T_b_from_a), T_a_from_b, atol=1e-9)
    np.testing.assert_allclose(T_b_from_a, np.linalg.inv(T_a_from_b), atol=1e-9)


@FAST
@given(st.lists(poses(), min_size=1, max_size=4))
def test_invert_T_is_batched(Ts: list[np.ndarray]) -> None:
    stack = np.stack(Ts)  # (B, 4, 4)
    inv = invert_T(stack)
    assert inv.shape == stack.shape
    for T, T_inv in zip(Ts, inv, strict=True):
        np.testing.assert_allclose(T_inv, invert_T(T), atol=1e-12)


@FAST
@given(poses(), poses(), points())
def test_transform_points_composes(T_a_from_b: np.ndarray, T_b_from_c: np.ndarray, pts_c: np.ndarray) -> None:
    """Applying T_ab @ T_bc at once equals applying T_bc then T_ab; extra columns are carried."""
    at_once = transform_points(T_a_from_b @ T_b_from_c, pts_c)
    sequential = transform_points(T_a_from_b, transform_points(T_b_from_c, pts_c))
    np.testing.assert_allclose(at_once, sequential, atol=1e-8)
    np.testing.assert_array_equal(at_once[:, 3], pts_c[:, 3])
    # and back again
    np.testing.assert_allclose(transform_points(invert_T(T_a_from_b @ T_b_from_c), at_once), pts_c, atol=1e-8)


def test_transform_points_keeps_float32_and_intensity() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 4)).astype(np.float32)
    T = T_from_xyz_rpy(1.0, -2.0, 0.5, 0.1, -0.2, 1.3)
    out = transform_points(T, pts)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 3], pts[:, 3])
    expected = pts[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    np.testing.assert_allclose(out[:, :3], expected, atol=1e-5)


@FAST
@given(angle, st.floats(-1.5, 1.5), angle)
def test_rpy_round_trips_away_from_gimbal_lock(roll: float, pitch: float, yaw: float) -> None:
    R = rotation_from_rpy(roll, pitch, yaw)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    r2, p2, y2 = rpy_from_rotation(R)
    assert p2 == pytest.approx(pitch, abs=1e-9)
    assert abs(wrap_angle(r2 - roll)) < 1e-9
    assert abs(wrap_angle(y2 - yaw)) < 1e-9


@FAST
@given(rotations())
def test_rpy_reconstructs_any_rotation(R: np.ndarray) -> None:
    """Even at or near gimbal lock, the decomposed angles rebuild the same matrix."""
    np.testing.assert_allclose(rotation_from_rpy(*rpy_from_rotation(R)), R, atol=1e-6)


def test_rotation_from_rpy_axes() -> None:
    """Yaw turns x towards y (counter-clockwise from above), pitch turns x towards -z (nose up is
    negative pitch in this z-up, right-handed frame: Ry), roll turns y towards z."""
    np.testing.assert_allclose(rotation_from_rpy(0.0, 0.0, np.pi / 2) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(rotation_from_rpy(0.0, np.pi / 2, 0.0) @ [1, 0, 0], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(rotation_from_rpy(np.pi / 2, 0.0, 0.0) @ [0, 1, 0], [0, 0, 1], atol=1e-12)


@FAST
@given(coord, coord, coord, angle)
def test_T_from_xyz_yaw_matches_rpy_path(x: float, y: float, z: float, yaw: float) -> None:
    T = T_from_xyz_yaw(x, y, z, yaw)
    np.testing.assert_allclose(T, T_from_xyz_rpy(x, y, z, 0.0, 0.0, yaw), atol=1e-12)
    assert abs(wrap_angle(yaw_of(T) - yaw)) < 1e-12


# ------------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------------


@FAST
@given(yaw_poses(), boxes())
def test_transform_boxes_moves_corners_like_points(T_b_from_a: np.ndarray, boxes_a: np.ndarray) -> None:
    """For a rotation about z, transforming boxes and then taking corners equals taking corners and
    transforming them as points, corner by corner (the order is tied to the heading)."""
    boxes_b = transform_boxes(T_b_from_a, boxes_a)
    assert boxes_b.shape == boxes_a.shape
    np.testing.assert_array_equal(boxes_b[:, 3:6], boxes_a[:, 3:6])
    corners_a = box_corners(boxes_a)  # (M, 8, 3)
    moved = transform_points(T_b_from_a, corners_a.reshape(-1, 3)).reshape(-1, 8, 3)
    np.testing.assert_allclose(box_corners(boxes_b), moved, atol=1e-8)
    assert np.all(np.abs(boxes_b[:, 6]) <= np.pi)


@FAST
@given(poses(), boxes())
def test_transform_boxes_keeps_sizes_and_moves_bottom_centre(
    T_b_from_a: np.ndarray, boxes_a: np.ndarray
) -> None:
    boxes_b = transform_boxes(T_b_from_a, boxes_a)
    np.testing.assert_array_equal(boxes_b[:, 3:6], boxes_a[:, 3:6])
    np.testing.assert_allclose(boxes_b[:, :3], transform_points(T_b_from_a, boxes_a[:, :3]), atol=1e-9)


def test_transform_boxes_empty() -> None:
    out = transform_boxes(np.eye(4), np.zeros((0, 7)))
    assert out.shape == (0, 7)


@FAST
@given(boxes())
def test_box_corners_ordering(bxs: np.ndarray) -> None:
    """Bottom face counter-clockwise from above starting front-left, top face = bottom + dz."""
    corners = box_corners(bxs)
    assert corners.shape == (len(bxs), 8, 3)
    np.testing.assert_allclose(corners[:, 4:, :2], corners[:, :4, :2], atol=1e-12)
    np.testing.assert_allclose(corners[:, 4:, 2] - corners[:, :4, 2], np.repeat(bxs[:, 5:6], 4, 1), atol=1e-9)
    np.testing.assert_allclose(corners[:, :4, 2], np.repeat(bxs[:, 2:3], 4, 1), atol=1e-12)
    # counter-clockwise: every turn of the bottom polygon has a positive cross product
    bottom = corners[:, :4, :2]
    edges = np.roll(bottom, -1, axis=1) - bottom  # (M, 4, 2)
    nxt = np.roll(edges, -1, axis=1)
    cross = edges[..., 0] * nxt[..., 1] - edges[..., 1] * nxt[..., 0]
    assert np.all(cross > 0)
    # corner 0 is front-left in the box's own frame
    local = (corners[:, 0, :2] - bxs[:, :2])[:, :, None]  # (M, 2, 1)
    c, s = np.cos(bxs[:, 6]), np.sin(bxs[:, 6])
    R_box_from_frame = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], 1)  # (M, 2, 2)
    local = (R_box_from_frame @ local)[..., 0]
    np.testing.assert_allclose(local, bxs[:, 3:5] / 2.0, atol=1e-9)
    # edge lengths are dx and dy
    np.testing.assert_allclose(np.linalg.norm(edges[:, 0], axis=-1), bxs[:, 3], rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(edges[:, 1], axis=-1), bxs[:, 4], rtol=1e-9)


def test_box_corners_match_mmdet3d() -> None:
    """Our corners are the same 8 points as mmdet3d's LiDARInstance3DBoxes(boxes).corners."""
    from mmdet3d.structures import LiDARInstance3DBoxes

    rng = np.random.default_rng(7)
    m = 32
    bxs = np.concatenate(
        [
            rng.uniform(-50, 50, (m, 3)),
            rng.uniform(0.5, 10, (m, 3)),
            rng.uniform(-np.pi, np.pi, (m, 1)),
        ],
        axis=1,
    )
    ours = box_corners(bxs)
    theirs = LiDARInstance3DBoxes(bxs.astype(np.float32)).corners.numpy().astype(np.float64)
    assert theirs.shape == ours.shape
    for i in range(m):
        a = ours[i][np.lexsort(ours[i].T[::-1])]
        b = theirs[i][np.lexsort(theirs[i].T[::-1])]
        np.testing.assert_allclose(a, b, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# CARLA boundary
# ------------------------------------------------------------------------------------------------


@FAST
@given(poses())
def test_carla_pose_round_trip_from_T(T: np.ndarray) -> None:
    pose = carla_pose_from_T(T)
    assert pose.shape == (6,)
    np.testing.assert_allclose(T_from_carla_pose(pose), T, atol=1e-6)


carla_deg = st.floats(-720.0, 720.0, allow_nan=False)


@FAST
@given(coord, coord, coord, carla_deg, carla_deg, st.floats(-89.0, 89.0))
def test_T_round_trip_from_carla_pose(
    x: float, y: float, z: float, roll: float, yaw: float, pitch: float
) -> None:
    pose = np.array([x, y, z, roll, yaw, pitch])
    back = carla_pose_from_T(T_from_carla_pose(pose))
    np.testing.assert_allclose(back[:3], pose[:3], atol=1e-9)
    assert np.all(angle_diff_deg(back[3:], pose[3:]) < 1e-6)


@FAST
@given(coord, coord, coord, carla_deg, carla_deg, st.floats(-89.0, 89.0))
def test_T_from_carla_pose_is_a_proper_rotation(
    x: float, y: float, z: float, roll: float, yaw: float, pitch: float
) -> None:
    """CARLA's matrix is a proper rotation in its own left-handed frame; mirroring keeps it proper."""
    M = carla_matrix(x, y, z, roll, yaw, pitch)
    T = T_from_carla_pose([x, y, z, roll, yaw, pitch])
    for R in (M[:3, :3], T[:3, :3]):
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(T, S_MIRROR_Y @ M @ S_MIRROR_Y, atol=0)


def test_carla_right_is_our_minus_y() -> None:
    """A point one metre along CARLA's +y (to the right) is one metre along our -y."""
    T = T_from_carla_pose([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(T[:3, 3], [0.0, -1.0, 0.0], atol=1e-12)
    # the same point seen from a sensor frame placed by CARLA: sensor at CARLA (10, 0, 2) facing +x
    T_world_from_sensor = T_from_carla_pose([10.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    p_carla_world = np.array([[10.0, 1.0, 2.0]])
    p_ours_world = (S_MIRROR_Y[:3, :3] @ p_carla_world.T).T
    p_sensor = transform_points(invert_T(T_world_from_sensor), p_ours_world)
    np.testing.assert_allclose(p_sensor, [[0.0, -1.0, 0.0]], atol=1e-12)
    location, _, _ = boxes_to_carla(np.array([[0.0, -1.0, 0.0, 4.0, 2.0, 1.5, 0.0]]))
    np.testing.assert_allclose(location[0, :2], [0.0, 1.0], atol=1e-12)


def test_carla_yaw_plus_90_is_our_minus_90() -> None:
    """CARLA yaw +90 deg turns from +x towards CARLA's +y (right): that is our -90 deg."""
    T = T_from_carla_pose([0.0, 0.0, 0.0, 0.0, 90.0, 0.0])
    assert yaw_of(T) == pytest.approx(-np.pi / 2)
    np.testing.assert_allclose(T[:3, 0], [0.0, -1.0, 0.0], atol=1e-12)  # heading points to our right
    bxs = boxes_from_carla(np.zeros((1, 3)), np.array([[0.0, 90.0, 0.0]]), np.ones((1, 3)))
    assert bxs[0, 6] == pytest.approx(-np.pi / 2)


@FAST
@given(carla_deg, carla_deg, carla_deg)
def test_carla_angles_map_to_our_rpy(roll: float, yaw: float, pitch: float) -> None:
    """CARLA ``[roll, yaw, pitch]`` (degrees) is our ``(roll, -pitch, -yaw)`` (radians): mirroring y
    flips the sense of rotations about z and about y and keeps the one about x."""
    T = T_from_carla_pose([0.0, 0.0, 0.0, roll, yaw, pitch])
    expected = rotation_from_rpy(np.radians(roll), -np.radians(pitch), -np.radians(yaw))
    np.testing.assert_allclose(T[:3, :3], expected, atol=1e-9)


def test_carla_pitch_up_is_nose_up() -> None:
    """CARLA positive pitch raises the nose (x towards +z) in both frames (z is not mirrored)."""
    T = T_from_carla_pose([0.0, 0.0, 0.0, 0.0, 0.0, 30.0])
    assert T[2, 0] == pytest.approx(np.sin(np.radians(30.0)))


@FAST
@given(boxes())
def test_boxes_carla_round_trip(bxs: np.ndarray) -> None:
    location, angles, extent = boxes_to_carla(bxs)
    assert location.shape == angles.shape == extent.shape == (len(bxs), 3)
    back = boxes_from_carla(location, angles, extent)
    np.testing.assert_allclose(back[:, :6], bxs[:, :6], atol=1e-9)
    assert np.all(np.abs(wrap_angle(back[:, 6] - bxs[:, 6])) < 1e-9)


@FAST
@given(boxes())
def test_boxes_from_carla_agree_with_pose_conversion(bxs: np.ndarray) -> None:
    """A box's CARLA pose converted with T_from_carla_pose gives the same centre and heading as
    boxes_from_carla (the two boundary paths agree)."""
    location, angles, extent = boxes_to_carla(bxs)
    back = boxes_from_carla(location, angles, extent)
    for i in range(len(bxs)):
        T = T_from_carla_pose([*location[i], angles[i, 0], angles[i, 1], angles[i, 2]])
        centre = back[i, :3] + [0.0, 0.0, back[i, 5] / 2.0]
        np.testing.assert_allclose(T[:3, 3], centre, atol=1e-9)
        assert abs(wrap_angle(yaw_of(T) - back[i, 6])) < 1e-9
