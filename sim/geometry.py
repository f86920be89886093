"""Pure geometry: poses, transforms, boxes, and the CARLA/OPV2V left-handed boundary.

Conventions (see docs/architecture.md):

- Frames are right-handed, x forward, y left, z up; metres and radians.
- A pose is a 4x4 float64 homogeneous matrix named ``T_<to>_from_<from>``: it maps coordinates
  expressed in frame ``<from>`` to frame ``<to>``, so ``p_to = T_to_from_from @ p_from`` and
  ``T_a_from_c = T_a_from_b @ T_b_from_c``.
- Boxes are ``(M, 7)`` in mmdet3d's LiDAR convention: x, y, z of the **bottom** centre, dx (length,
  along the box's heading), dy (width), dz (height), yaw counter-clockwise from +x.
- Rotations are built and decomposed through numpy-quaternion.
- CARLA (and therefore OPV2V) is left-handed (x forward, y right, z up) with degrees and its
  poses written ``[x, y, z, roll, yaw, pitch]`` by OPV2V. Conversion happens only here and only at
  that boundary: a CARLA matrix ``M_lh`` becomes ours by mirroring the y axis on both sides,
  ``T_rh = S @ M_lh @ S`` with ``S = diag(1, -1, 1, 1)``.
"""

from __future__ import annotations

import numpy as np
import quaternion  # numpy-quaternion

__all__ = [
    "S_MIRROR_Y",
    "T_from_carla_pose",
    "T_from_rotation_translation",
    "T_from_xyz_rpy",
    "T_from_xyz_yaw",
    "box_corners",
    "boxes_from_carla",
    "boxes_to_carla",
    "carla_matrix",
    "carla_pose_from_T",
    "invert_T",
    "rotation_from_rpy",
    "rpy_from_rotation",
    "transform_boxes",
    "transform_points",
    "wrap_angle",
    "yaw_of",
]

# Mirrors y: maps CARLA's left-handed coordinates to ours and back (it is its own inverse).
S_MIRROR_Y = np.diag([1.0, -1.0, 1.0, 1.0])


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    """Wrap radians to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi


# --------------------------------------------------------------------------------------------------
# Rotations and poses (right-handed, radians)
# --------------------------------------------------------------------------------------------------


def rotation_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation matrix ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (intrinsic z-y'-x''), shape (3, 3).

    Composed as quaternions: q = q_z(yaw) * q_y(pitch) * q_x(roll).
    """
    qx = quaternion.from_rotation_vector([roll, 0.0, 0.0])
    qy = quaternion.from_rotation_vector([0.0, pitch, 0.0])
    qz = quaternion.from_rotation_vector([0.0, 0.0, yaw])
    return quaternion.as_rotation_matrix(qz * qy * qx)


def rpy_from_rotation(R: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_rpy`: ``(roll, pitch, yaw)`` with pitch in [-pi/2, pi/2].

    At gimbal lock (|pitch| = pi/2) roll is set to 0 and yaw absorbs the remaining rotation.
    """
    R = np.asarray(R, dtype=np.float64)
    # R[2, 0] = -sin(pitch)
    pitch = float(np.arcsin(np.clip(-R[2, 0], -1.0, 1.0)))
    if abs(R[2, 0]) < 1.0 - 1e-12:
        roll = float(np.arctan2(R[2, 1], R[2, 2]))
        yaw = float(np.arctan2(R[1, 0], R[0, 0]))
    else:
        roll = 0.0
        yaw = float(np.arctan2(-R[0, 1], R[1, 1]))
    return roll, pitch, yaw


def T_from_rotation_translation(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 pose from a (3, 3) rotation and a (3,) translation."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def T_from_xyz_rpy(x: float, y: float, z: float, roll: float, pitch: float, yaw: float) -> np.ndarray:
    """4x4 pose from a position and roll/pitch/yaw in radians (right-handed)."""
    return T_from_rotation_translation(rotation_from_rpy(roll, pitch, yaw), np.array([x, y, z], float))


def T_from_xyz_yaw(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    """4x4 pose of a frame on flat ground: rotation about z only. Cheaper than the quaternion path."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0, x], [s, c, 0.0, y], [0.0, 0.0, 1.0, z], [0.0, 0.0, 0.0, 1.0]])


def invert_T(T_a_from_b: np.ndarray) -> np.ndarray:
    """``T_b_from_a`` for a rigid transform, in closed form (R^T, -R^T t). Accepts (..., 4, 4)."""
    T = np.asarray(T_a_from_b, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def yaw_of(T: np.ndarray) -> float:
    """Heading of a pose's x axis projected on the ground plane, radians."""
    return float(np.arctan2(T[1, 0], T[0, 0]))


def transform_points(T_b_from_a: np.ndarray, points_a: np.ndarray) -> np.ndarray:
    """Move points from frame a to frame b.

    Args:
        T_b_from_a: (4, 4) pose.
        points_a: (N, 3 + F) array; columns after xyz (intensity, ...) are carried unchanged.

    Returns:
        (N, 3 + F) array of the same dtype, xyz computed in float64 then cast back.
    """
    pts = np.asarray(points_a)
    xyz = pts[:, :3].astype(np.float64) @ T_b_from_a[:3, :3].T + T_b_from_a[:3, 3]
    out = pts.copy()
    out[:, :3] = xyz.astype(pts.dtype, copy=False)
    return out


def transform_boxes(T_b_from_a: np.ndarray, boxes_a: np.ndarray) -> np.ndarray:
    """Move (M, 7) bottom-centre boxes from frame a to frame b.

    The bottom centre is transformed as a point and the box's heading vector is rotated, so the
    new yaw is the heading's angle on b's ground plane. Boxes stay upright (mmdet3d boxes carry
    no roll or pitch), which is exact when ``T_b_from_a`` rotates about z only and the usual
    approximation otherwise.
    """
    boxes = np.asarray(boxes_a, dtype=np.float64)
    out = boxes.copy()
    if len(boxes) == 0:
        return out.reshape(0, 7)
    out[:, :3] = boxes[:, :3] @ T_b_from_a[:3, :3].T + T_b_from_a[:3, 3]
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], axis=1)
    heading_b = heading @ T_b_from_a[:3, :3].T
    out[:, 6] = np.arctan2(heading_b[:, 1], heading_b[:, 0])
    return out


# box_corners' corner signs (half sizes along x, y; bottom or top)
_CORNER_X = np.array([1, -1, -1, 1, 1, -1, -1, 1], dtype=np.float64) * 0.5
_CORNER_Y = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float64) * 0.5
_CORNER_Z = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.float64)


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Corners of (M, 7) bottom-centre boxes, shape (M, 8, 3).

    Order: the bottom face counter-clockwise seen from above starting at front-left
    (+dx/2, +dy/2), then the top face in the same order.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    local_x = boxes[:, 3:4] * _CORNER_X  # (M, 8) in the box's frame
    local_y = boxes[:, 4:5] * _CORNER_Y
    local_z = boxes[:, 5:6] * _CORNER_Z
    c, s = np.cos(boxes[:, 6:7]), np.sin(boxes[:, 6:7])
    x = c * local_x - s * local_y
    y = s * local_x + c * local_y
    return np.stack([x, y, local_z], axis=-1) + boxes[:, None, :3]


# --------------------------------------------------------------------------------------------------
# CARLA / OPV2V boundary (left-handed, degrees)
# --------------------------------------------------------------------------------------------------


def carla_matrix(x: float, y: float, z: float, roll: float, yaw: float, pitch: float) -> np.ndarray:
    """CARLA's own ``Transform.get_matrix()`` for a pose in CARLA coordinates (degrees).

    Left-handed; the same matrix OpenCOOD's ``x_to_world`` builds from an OPV2V ``lidar_pose``.
    """
    cr, sr = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    cy, sy = np.cos(np.radians(yaw)), np.sin(np.radians(yaw))
    cp, sp = np.cos(np.radians(pitch)), np.sin(np.radians(pitch))
    return np.array(
        [
            [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr, x],
            [sy * cp, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr, y],
            [sp, -cp * sr, cp * cr, z],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def T_from_carla_pose(pose: np.ndarray | list[float]) -> np.ndarray:
    """Our right-handed ``T_world_from_x`` from an OPV2V/CARLA pose ``[x, y, z, roll, yaw, pitch]``.

    ``pose`` is in CARLA's left-handed world with angles in degrees, as OPV2V's ``lidar_pose``.
    """
    x, y, z, roll, yaw, pitch = (float(v) for v in pose)
    return S_MIRROR_Y @ carla_matrix(x, y, z, roll, yaw, pitch) @ S_MIRROR_Y


def carla_pose_from_T(T_world_from_x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`T_from_carla_pose`: ``[x, y, z, roll, yaw, pitch]``, CARLA frame, degrees."""
    M = S_MIRROR_Y @ np.asarray(T_world_from_x, dtype=np.float64) @ S_MIRROR_Y
    pitch = np.degrees(np.arcsin(np.clip(M[2, 0], -1.0, 1.0)))
    if abs(M[2, 0]) < 1.0 - 1e-12:
        yaw = np.degrees(np.arctan2(M[1, 0], M[0, 0]))
        roll = np.degrees(np.arctan2(-M[2, 1], M[2, 2]))
    else:  # gimbal lock: put everything in yaw
        roll = 0.0
        yaw = np.degrees(np.arctan2(-M[0, 1], M[1, 1]))
    return np.array([M[0, 3], M[1, 3], M[2, 3], roll, yaw, pitch], dtype=np.float64)


def boxes_to_carla(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our (M, 7) world boxes as OPV2V ``vehicles`` fields in CARLA's frame.

    Returns:
        location: (M, 3) box geometric centre, CARLA frame (``location + center`` in OPV2V, with
            ``center`` taken as zero by the caller or split off as it likes).
        angle: (M, 3) ``[roll, yaw, pitch]`` in degrees.
        extent: (M, 3) half sizes ``[dx/2, dy/2, dz/2]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    location = np.stack([boxes[:, 0], -boxes[:, 1], boxes[:, 2] + boxes[:, 5] / 2.0], axis=1)
    angle = np.stack([np.zeros(len(boxes)), -np.degrees(boxes[:, 6]), np.zeros(len(boxes))], axis=1)
    extent = boxes[:, 3:6] / 2.0
    return location, angle, extent


def boxes_from_carla(location: np.ndarray, angle: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Inverse of :func:`boxes_to_carla`; roll and pitch are dropped (boxes are upright).

    Args:
        location: (M, 3) geometric centre in CARLA's frame (OPV2V ``location + center``).
        angle: (M, 3) ``[roll, yaw, pitch]`` in degrees.
        extent: (M, 3) half sizes.
    """
    location = np.asarray(location, dtype=np.float64).reshape(-1, 3)
    angle = np.asarray(angle, dtype=np.float64).reshape(-1, 3)
    extent = np.asarray(extent, dtype=np.float64).reshape(-1, 3)
    size = 2.0 * extent
    yaw = wrap_angle(-np.radians(angle[:, 1]))
    return np.concatenate(
        [
            location[:, :1],
            -location[:, 1:2],
            location[:, 2:3] - size[:, 2:3] / 2.0,
            size,
            np.asarray(yaw).reshape(-1, 1),
        ],
        axis=1,
    )
