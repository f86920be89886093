"""The KITTI object format: velodyne scans, calibration, labels, and the camera <-> LiDAR conversion.

Layout of a KITTI tree (``<root>/training`` holds labels, ``<root>/testing`` does not; a folder
that holds ``velodyne/`` directly is read as one split folder too)::

    <split>/velodyne/<index:06d>.bin   float32 (N, 4): x, y, z, reflectance, LiDAR frame
    <split>/calib/<index:06d>.txt      P0..P3 (3x4), R0_rect (3x3), Tr_velo_to_cam, Tr_imu_to_velo (3x4)
    <split>/label_2/<index:06d>.txt    one object a line (see :class:`KittiLabels`)

Trees written here add two files of ours, which KITTI tools ignore:

    <root>/frames.yaml                 index -> (split, run, cav, frame, view) of the source data
    <split>/meta/<index:06d>.yaml      what KITTI cannot hold (world poses, vehicle ids and kinds,
                                       speeds), so that a KITTI tree converts back to native runs

KITTI's LiDAR frame is ours (x forward, y left, z up). Labels are in the *rectified camera frame*
(x right, y down, z forward): ``h w l`` sizes, ``x y z`` the **bottom** centre, ``rotation_y`` about
the camera's y axis. A point goes from LiDAR to rectified camera by
``T_rect_from_velo = R0_rect @ Tr_velo_to_cam``; a box by mmdet3d's
``Box3DMode.convert(..., Box3DMode.LIDAR, Box3DMode.CAM, rt_mat=T_rect_from_velo)``, which moves the
bottom centre as a point, reorders the sizes ``(l, w, h) -> (l, h, w)`` and sets
``rotation_y = -yaw - pi/2`` (and back: ``yaw = -rotation_y - pi/2``), which is the convention of
mmdet3d's ``KittiDataset`` and OpenPCDet. Boxes here are ``(M, 7)``: LiDAR ``[x, y, z_bottom, dx,
dy, dz, yaw]`` (docs/architecture.md) and camera ``[x, y, z, l, h, w, rotation_y]`` (mmdet3d's
``CameraInstance3DBoxes`` order).

Precision: label files hold 2 decimals (KITTI's own files do), so a box written and read back moves
by up to 0.005 m along each camera axis, 0.005 m in each size and 0.005 rad in yaw. With the
synthetic calibration of :func:`synthetic_calib` (a pure axis permutation) each LiDAR coordinate is
one camera coordinate, so the same bounds hold per LiDAR coordinate. Velodyne files are float32, so
points are exact.

Classes: our vehicle kinds map to KITTI types as :data:`KIND_TO_KITTI` (a bus becomes ``Truck``:
KITTI has no bus class, and ``Truck`` is its class for large road vehicles; the meta file keeps the
kind, so converting back restores ``bus``). Reading foreign KITTI labels, :data:`KITTI_TO_KIND` gives
the vehicle kinds; a ``Tram`` becomes a ``bus`` (the long passenger vehicle we have), and
``Pedestrian``, ``Person_sitting``, ``Cyclist``, ``Misc`` and ``DontCare`` have no kind of ours.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datasets.io import atomic_path, atomic_write_text
from datasets.native import dump_yaml, load_yaml
from sim.box_ops import count_points_in_boxes, points_in_boxes
from sim.geometry import box_corners, transform_points, wrap_angle

__all__ = [
    "FRAMES_INDEX_NAME",
    "IMAGE_SIZE",
    "KIND_TO_KITTI",
    "KITTI_TO_KIND",
    "KITTI_TYPES",
    "FrameIndexEntry",
    "KittiCalib",
    "KittiFrame",
    "KittiFramePaths",
    "KittiLabels",
    "ViewMeta",
    "boxes_camera_to_lidar",
    "boxes_lidar_to_camera",
    "calib_problems",
    "image_boxes_and_truncation",
    "kitti_frame_paths",
    "kitti_split_dirs",
    "label_problems",
    "labels_from_lidar_boxes",
    "list_kitti_frames",
    "occlusion_levels",
    "parse_calib",
    "parse_labels",
    "read_calib",
    "read_frames_index",
    "read_kitti_frame",
    "read_labels",
    "read_meta",
    "read_velodyne",
    "synthetic_calib",
    "velodyne_problems",
    "write_calib",
    "write_frames_index",
    "write_kitti_frame",
    "write_labels",
    "write_velodyne",
]

KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
"""Object types a KITTI label line may hold."""

KIND_TO_KITTI = {"car": "Car", "van": "Van", "truck": "Truck", "bus": "Truck"}
"""Our :class:`sim.types.ActorKind` values -> KITTI type (no bus in KITTI: see the module docstring)."""

KITTI_TO_KIND = {"Car": "car", "Van": "van", "Truck": "truck", "Tram": "bus"}
"""KITTI vehicle types -> our kind; the other types are not vehicles of ours."""

IMAGE_SIZE = (1242, 375)
"""(width, height) in pixels of the synthetic camera: KITTI's image size."""

FRAMES_INDEX_NAME = "frames.yaml"
META_DIR = "meta"
_NEAR_PLANE = 0.1  # metres: corners closer to the camera plane than this do not project
_STEM_RE = re.compile(r"^(\d+)$")
_CALIB_SHAPES = {
    "P0": (3, 4),
    "P1": (3, 4),
    "P2": (3, 4),
    "P3": (3, 4),
    "R0_rect": (3, 3),
    "Tr_velo_to_cam": (3, 4),
    "Tr_imu_to_velo": (3, 4),
}
# names used by KITTI's tracking and raw calibration files for the same matrices
_CALIB_ALIASES = {"R_rect": "R0_rect", "Tr_velo_cam": "Tr_velo_to_cam", "Tr_imu_velo": "Tr_imu_to_velo"}


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def _homogeneous(M: np.ndarray) -> np.ndarray:
    """A (3, 3) or (3, 4) matrix as (4, 4) with ``[0, 0, 0, 1]`` below."""
    T = np.eye(4)
    T[: M.shape[0], : M.shape[1]] = M
    return T


@dataclass
class KittiCalib:
    """A KITTI calibration file.

    Attributes:
        P0, P1, P2, P3: (3, 4) float64 projection matrices of the rectified cameras (P2: left colour).
        R0_rect: (3, 3) float64 rectifying rotation of camera 0.
        Tr_velo_to_cam: (3, 4) float64 rigid transform LiDAR -> (unrectified) camera 0.
        Tr_imu_to_velo: (3, 4) float64 rigid transform IMU -> LiDAR.
    """

    P0: np.ndarray
    P1: np.ndarray
    P2: np.ndarray
    P3: np.ndarray
    R0_rect: np.ndarray
    Tr_velo_to_cam: np.ndarray
    Tr_imu_to_velo: np.ndarray

    @property
    def T_rect_from_velo(self) -> np.ndarray:
        """(4, 4) LiDAR -> rectified camera: ``R0_rect @ Tr_velo_to_cam`` (mmdet3d's ``lidar2cam``)."""
        return _homogeneous(self.R0_rect) @ _homogeneous(self.Tr_velo_to_cam)

    @property
    def T_velo_from_rect(self) -> np.ndarray:
        """(4, 4) rectified camera -> LiDAR (a general inverse: ``R0_rect`` need not be exact)."""
        return np.linalg.inv(self.T_rect_from_velo)

    def points_velo_to_rect(self, points_velo: np.ndarray) -> np.ndarray:
        """(N, 3 + F) LiDAR points -> rectified camera frame; extra columns carried."""
        return transform_points(self.T_rect_from_velo, points_velo)

    def points_rect_to_velo(self, points_rect: np.ndarray) -> np.ndarray:
        """(N, 3 + F) rectified camera points -> LiDAR frame; extra columns carried."""
        return transform_points(self.T_velo_from_rect, points_rect)

    def project_rect_to_image(self, points_rect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates through P2: (N, 2) ``(u, v)`` and (N,) depth (camera z plus P2's offset).

        Points at depth <= 0 get infinite or meaningless pixels; callers mask them.
        """
        xyz1 = np.concatenate([np.asarray(points_rect, np.float64)[:, :3], np.ones((len(points_rect), 1))], 1)
        uvw = xyz1 @ self.P2.T  # (N, 3)
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = uvw[:, :2] / uvw[:, 2:3]
        return uv, uvw[:, 2]

    def to_text(self) -> str:
        """The calibration file's text: ``KEY: v v v ...`` with 12 significant digits, KITTI's layout."""
        lines = []
        for key in _CALIB_SHAPES:
            values = np.asarray(getattr(self, key), dtype=np.float64).reshape(-1)
            lines.append(f"{key}: " + " ".join(f"{v:.12e}" for v in values))
        return "\n".join(lines) + "\n"

    def validate(self) -> None:
        """Shapes, finite values, invertible rectified transform; raises ValueError."""
        problems = _calib_value_problems({k: getattr(self, k) for k in _CALIB_SHAPES})
        if problems:
            raise ValueError("invalid KittiCalib: " + "; ".join(problems))


def _calib_value_problems(matrices: dict[str, np.ndarray]) -> list[str]:
    problems = []
    for key, shape in _CALIB_SHAPES.items():
        M = np.asarray(matrices[key])
        if M.shape != shape:
            problems.append(f"{key} must be {shape[0]}x{shape[1]}, got shape {M.shape}")
        elif not np.all(np.isfinite(M)):
            problems.append(f"{key} holds NaN or infinity")
    if not problems:
        for key in ("R0_rect", "Tr_velo_to_cam"):
            R = np.asarray(matrices[key])[:3, :3]
            if abs(abs(np.linalg.det(R)) - 1.0) > 1e-2:
                problems.append(f"{key} is not a rotation (det {np.linalg.det(R):.4g})")
    return problems


def synthetic_calib() -> KittiCalib:
    """Calibration of a camera at the LiDAR's origin looking along its +x (level, no offset).

    All four projection matrices carry KITTI's usual left-colour-camera intrinsics (focal length
    721.5377 px, principal point (609.5593, 172.854) for a 1242 x 375 image) and no stereo
    baseline; only P2 matters to LiDAR detectors (FOV filtering, image projection). R0_rect is the
    identity and Tr_velo_to_cam the axis permutation LiDAR (x fwd, y left, z up) -> camera (x right,
    y down, z fwd), so boxes convert without any tilt.
    """
    K = np.array([[721.5377, 0.0, 609.5593, 0.0], [0.0, 721.5377, 172.854, 0.0], [0.0, 0.0, 1.0, 0.0]])
    return KittiCalib(
        P0=K.copy(),
        P1=K.copy(),
        P2=K.copy(),
        P3=K.copy(),
        R0_rect=np.eye(3),
        Tr_velo_to_cam=np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),
        Tr_imu_to_velo=np.eye(3, 4),
    )


def parse_calib(text: str) -> tuple[KittiCalib | None, list[str]]:
    """Parse a calibration file's text; returns the calibration (None if unusable) and every problem."""
    found: dict[str, np.ndarray] = {}
    problems = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        key, sep, rest = line.partition(":")
        key = _CALIB_ALIASES.get(key.strip(), key.strip())
        if not sep:
            problems.append(f"line {line_no}: expected 'KEY: numbers', got {raw[:40]!r}")
            continue
        if key not in _CALIB_SHAPES:
            continue  # other keys (e.g. the raw data's) are allowed and ignored
        try:
            values = np.array([float(v) for v in rest.split()], dtype=np.float64)
        except ValueError:
            problems.append(f"line {line_no}: {key} holds a non-number")
            continue
        shape = _CALIB_SHAPES[key]
        if values.size != shape[0] * shape[1]:
            problems.append(f"line {line_no}: {key} needs {shape[0] * shape[1]} numbers, got {values.size}")
            continue
        found[key] = values.reshape(shape)
    if "Tr_imu_to_velo" not in found and "Tr_velo_to_cam" in found:
        found["Tr_imu_to_velo"] = np.eye(3, 4)  # not used by LiDAR tools; some files leave it out
    missing = [k for k in _CALIB_SHAPES if k not in found]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
        return None, problems
    problems += _calib_value_problems(found)
    if problems:
        return None, problems
    return KittiCalib(**found), problems


def calib_problems(path: Path | str) -> list[str]:
    """Every problem of a calibration file (empty list: fine)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [f"cannot read ({err})"]
    return parse_calib(text)[1]


def read_calib(path: Path | str) -> KittiCalib:
    """Read a calibration file; ValueError naming the file lists its problems."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file {path}")
    calib, problems = parse_calib(path.read_text(encoding="utf-8"))
    if calib is None or problems:
        raise ValueError(f"{path}: bad calibration: " + "; ".join(problems))
    return calib


def write_calib(path: Path | str, calib: KittiCalib) -> Path:
    """Write a calibration file atomically."""
    calib.validate()
    return atomic_write_text(path, calib.to_text())


# --------------------------------------------------------------------------------------------------
# Boxes: camera <-> LiDAR through mmdet3d's box modes
# --------------------------------------------------------------------------------------------------


def boxes_camera_to_lidar(boxes_camera: np.ndarray, calib: KittiCalib) -> np.ndarray:
    """(M, 7) camera ``[x, y, z, l, h, w, ry]`` (bottom centre) -> (M, 7) LiDAR boxes, float64.

    mmdet3d's ``Box3DMode.convert`` (float64 in, float64 out), as its ``KittiDataset`` does: the
    bottom centre moves through ``inv(R0_rect @ Tr_velo_to_cam)`` and ``yaw = -ry - pi/2``.
    """
    boxes = np.asarray(boxes_camera, dtype=np.float64).reshape(-1, 7)
    if len(boxes) == 0:
        return np.zeros((0, 7))
    from mmdet3d.structures import Box3DMode  # heavy import, only where boxes are converted

    return np.asarray(Box3DMode.convert(boxes, Box3DMode.CAM, Box3DMode.LIDAR, rt_mat=calib.T_velo_from_rect))


def boxes_lidar_to_camera(boxes_lidar: np.ndarray, calib: KittiCalib) -> np.ndarray:
    """Inverse of :func:`boxes_camera_to_lidar`: ``rotation_y = -yaw - pi/2`` wrapped to [-pi, pi)."""
    boxes = np.asarray(boxes_lidar, dtype=np.float64).reshape(-1, 7)
    if len(boxes) == 0:
        return np.zeros((0, 7))
    from mmdet3d.structures import Box3DMode

    return np.asarray(Box3DMode.convert(boxes, Box3DMode.LIDAR, Box3DMode.CAM, rt_mat=calib.T_rect_from_velo))


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


@dataclass
class KittiLabels:
    """The lines of a ``label_2`` file, as arrays (M objects).

    Attributes:
        types: (M,) str, one of :data:`KITTI_TYPES`.
        truncated: (M,) float64 in [0, 1], fraction of the object outside the image (-1 DontCare).
        occluded: (M,) int64, 0 fully visible, 1 partly, 2 largely occluded, 3 unknown (-1 DontCare).
        alpha: (M,) float64 observation angle, radians.
        bbox: (M, 4) float64 image box ``[left, top, right, bottom]``, pixels.
        boxes_camera: (M, 7) float64 ``[x, y, z, l, h, w, rotation_y]``, rectified camera frame,
            bottom centre (the file's ``h w l x y z ry`` reordered to mmdet3d's camera boxes).
        score: (M,) float64 detection score (the optional 16th field), or None.
    """

    types: np.ndarray
    truncated: np.ndarray
    occluded: np.ndarray
    alpha: np.ndarray
    bbox: np.ndarray
    boxes_camera: np.ndarray
    score: np.ndarray | None = None

    @classmethod
    def empty(cls) -> KittiLabels:
        return cls(
            types=np.zeros(0, dtype="<U14"),
            truncated=np.zeros(0),
            occluded=np.zeros(0, dtype=np.int64),
            alpha=np.zeros(0),
            bbox=np.zeros((0, 4)),
            boxes_camera=np.zeros((0, 7)),
        )

    def __len__(self) -> int:
        return len(self.types)

    @property
    def care(self) -> np.ndarray:
        """(M,) bool, False for ``DontCare`` regions (which carry no 3D box)."""
        return self.types != "DontCare"

    def select(self, mask: np.ndarray) -> KittiLabels:
        """The labels where ``mask`` (M,) is True."""
        return KittiLabels(
            types=self.types[mask],
            truncated=self.truncated[mask],
            occluded=self.occluded[mask],
            alpha=self.alpha[mask],
            bbox=self.bbox[mask],
            boxes_camera=self.boxes_camera[mask],
            score=None if self.score is None else self.score[mask],
        )

    def validate(self) -> None:
        """Shapes, known types, finite values and positive sizes; raises ValueError."""
        m = len(self.types)
        problems = []
        for name, shape in (
            ("truncated", (m,)),
            ("occluded", (m,)),
            ("alpha", (m,)),
            ("bbox", (m, 4)),
            ("boxes_camera", (m, 7)),
        ):
            if np.shape(getattr(self, name)) != shape:
                problems.append(f"{name} must have shape {shape}, got {np.shape(getattr(self, name))}")
        if self.score is not None and np.shape(self.score) != (m,):
            problems.append(f"score must have shape ({m},)")
        unknown = sorted(set(self.types.tolist()) - set(KITTI_TYPES))
        if unknown:
            problems.append(f"unknown types {unknown}")
        if not problems:
            care = self.care
            if not np.all(np.isfinite(self.boxes_camera[care])):
                problems.append("boxes hold NaN or infinity")
            elif np.any(self.boxes_camera[care][:, 3:6] <= 0):
                problems.append("boxes with non-positive size")
        if problems:
            raise ValueError("invalid KittiLabels: " + "; ".join(problems))

    def to_text(self) -> str:
        """Label file text, 2 decimals as KITTI's files (``score`` with 4)."""
        self.validate()
        lines = []
        for i in range(len(self.types)):
            x, y, z, length, h, w, ry = self.boxes_camera[i]
            fields = [
                str(self.types[i]),
                f"{self.truncated[i]:.2f}",
                f"{int(self.occluded[i]):d}",
                f"{self.alpha[i]:.2f}",
                *(f"{v:.2f}" for v in self.bbox[i]),
                *(f"{v:.2f}" for v in (h, w, length, x, y, z, ry)),
            ]
            if self.score is not None:
                fields.append(f"{self.score[i]:.4f}")
            lines.append(" ".join(fields))
        return "".join(line + "\n" for line in lines)


def parse_labels(text: str) -> tuple[KittiLabels, list[str]]:
    """Parse label text; returns the good lines as labels and every problem (``line N: ...``).

    A line has 15 fields (16 with a score): type, truncated, occluded, alpha, 4 bbox values,
    h, w, l, x, y, z, rotation_y. Problems: wrong field count, non-numbers, unknown types, NaN or
    infinity, non-positive sizes, occlusion outside 0-3 and truncation outside [0, 1] (except for
    ``DontCare``, whose fields are -1 by convention).
    """
    rows: list[tuple[str, list[float]]] = []
    problems = []
    n_fields = set()
    for line_no, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) not in (15, 16):
            problems.append(f"line {line_no}: expected 15 or 16 fields, got {len(parts)}")
            continue
        kind = parts[0]
        if kind not in KITTI_TYPES:
            problems.append(f"line {line_no}: unknown type {kind!r}")
            continue
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError:
            problems.append(f"line {line_no}: non-numeric field")
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(f"line {line_no}: NaN or infinity")
            continue
        if kind != "DontCare":
            h, w, length = values[7:10]
            if min(h, w, length) <= 0:
                problems.append(f"line {line_no}: {kind} box with non-positive size h={h} w={w} l={length}")
                continue
            if not 0 <= int(values[1]) <= 3 or values[1] != int(values[1]):
                problems.append(f"line {line_no}: occluded must be 0, 1, 2 or 3, got {parts[2]}")
                continue
            if not 0.0 <= values[0] <= 1.0:
                problems.append(f"line {line_no}: truncated must be in [0, 1], got {parts[1]}")
                continue
        n_fields.add(len(parts))
        rows.append((kind, values))
    if len(n_fields) > 1:
        problems.append("some lines have a score and some do not")
        rows = []
    if not rows:
        return KittiLabels.empty(), problems
    v = np.array([r[1] for r in rows], dtype=np.float64)  # (M, 14 or 15)
    labels = KittiLabels(
        types=np.array([r[0] for r in rows], dtype="<U14"),
        truncated=v[:, 0],
        occluded=v[:, 1].astype(np.int64),
        alpha=v[:, 2],
        bbox=v[:, 3:7],
        boxes_camera=v[:, [10, 11, 12, 9, 7, 8, 13]],  # h w l x y z ry -> x y z l h w ry
        score=v[:, 14] if v.shape[1] == 15 else None,
    )
    return labels, problems


def label_problems(path: Path | str) -> list[str]:
    """Every problem of a label file (empty list: fine)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [f"cannot read ({err})"]
    return parse_labels(text)[1]


def read_labels(path: Path | str) -> KittiLabels:
    """Read a label file; ValueError naming the file lists every bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no label file {path}")
    labels, problems = parse_labels(path.read_text(encoding="utf-8"))
    if problems:
        raise ValueError(f"{path}: bad labels: " + "; ".join(problems))
    return labels


def write_labels(path: Path | str, labels: KittiLabels) -> Path:
    """Write a label file atomically (an empty file for no objects, as KITTI)."""
    return atomic_write_text(path, labels.to_text())


def image_boxes_and_truncation(
    boxes_lidar: np.ndarray, calib: KittiCalib, image_size: tuple[int, int] = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Image boxes and KITTI truncation of LiDAR boxes seen through P2.

    The box's 8 corners, plus the points where its 12 edges cross the plane 0.1 m in front of the
    camera, are projected; the image box is their extent clipped to the image, and truncation is the
    fraction of the unclipped extent's area outside the image (KITTI: "object leaving image
    boundaries"). A box entirely behind that plane gets truncation 1 and an empty image box
    ``[0, 0, 0, 0]``.

    Args:
        boxes_lidar: (M, 7) LiDAR boxes.
        calib: the frame's calibration.
        image_size: (width, height) in pixels.

    Returns:
        bbox: (M, 4) ``[left, top, right, bottom]`` in pixels, within the image.
        truncated: (M,) in [0, 1].
    """
    boxes = np.asarray(boxes_lidar, dtype=np.float64).reshape(-1, 7)
    m = len(boxes)
    if m == 0:
        return np.zeros((0, 4)), np.zeros(0)
    width, height = image_size
    corners = calib.points_velo_to_rect(box_corners(boxes).reshape(-1, 3)).reshape(m, 8, 3)
    edges = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]])
    a, b = corners[:, edges[:, 0]], corners[:, edges[:, 1]]  # (M, 12, 3)
    da, db = a[..., 2] - _NEAR_PLANE, b[..., 2] - _NEAR_PLANE
    crosses = (da > 0) != (db > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crosses, da / (da - db), 0.0)
    cut = a + t[..., None] * (b - a)  # (M, 12, 3), on the near plane where ``crosses``
    candidates = np.concatenate([corners, cut], axis=1)  # (M, 20, 3)
    valid = np.concatenate([corners[..., 2] > _NEAR_PLANE, crosses], axis=1)  # (M, 20)
    candidates[..., 2] = np.where(valid, np.maximum(candidates[..., 2], _NEAR_PLANE), 1.0)
    uv, _ = calib.project_rect_to_image(candidates.reshape(-1, 3))
    uv = uv.reshape(m, 20, 2)
    lo = np.where(valid[..., None], uv, np.inf).min(axis=1)  # (M, 2)
    hi = np.where(valid[..., None], uv, -np.inf).max(axis=1)
    seen = valid.any(axis=1)
    lo_c = np.clip(lo, 0.0, [width - 1.0, height - 1.0])
    hi_c = np.clip(hi, 0.0, [width - 1.0, height - 1.0])
    full = np.where(seen, np.prod(np.maximum(hi - lo, 0.0), axis=1), 0.0)
    inside = np.where(seen, np.prod(np.maximum(hi_c - lo_c, 0.0), axis=1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        truncated = np.where(full > 0, 1.0 - inside / full, 1.0)
    bbox = np.concatenate([lo_c, hi_c], axis=1)
    bbox[inside <= 0] = 0.0
    truncated[inside <= 0] = 1.0
    return bbox, np.clip(truncated, 0.0, 1.0)


def occlusion_levels(
    points_lidar: np.ndarray, boxes_lidar: np.ndarray, points_on_box: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """KITTI occlusion levels from what the LiDAR saw, with the sensor at the origin.

    For each box, the rays whose direction falls in the box's angular window (the range of azimuth
    and elevation of its corners) either hit the box, hit something nearer than the box's nearest
    corner (an occluder), or pass beside it. The occluded fraction is
    ``nearer / (nearer + on the box)``; levels are 0 below 0.1 (fully visible), 1 below 0.5 (partly
    occluded), 2 above (largely occluded) and 3 when no ray hit the box or anything in front of it
    (unknown). Those thresholds are this module's choice; KITTI's levels were set by annotators.

    Args:
        points_lidar: (N, 3 + F) points of one sweep, sensor frame.
        boxes_lidar: (M, 7) boxes, same frame.
        points_on_box: (M,) points of the sweep on each box if known (e.g. the simulator's
            visibility counts), else counted with mmcv's points-in-boxes.

    Returns:
        levels: (M,) int64 in {0, 1, 2, 3}.
        occluded_fraction: (M,) float64 in [0, 1] (NaN for level 3).
    """
    boxes = np.asarray(boxes_lidar, dtype=np.float64).reshape(-1, 7)
    m = len(boxes)
    if m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    xyz = np.asarray(points_lidar, dtype=np.float64)[:, :3]
    rng = np.linalg.norm(xyz, axis=1)
    order = np.argsort(rng, kind="stable")  # sorted by range, "nearer than" is a prefix
    xyz, rng_sorted = xyz[order], rng[order]
    az_all = np.arctan2(xyz[:, 1], xyz[:, 0])
    el_all = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    if points_on_box is None:
        on_box = count_points_in_boxes(np.asarray(points_lidar, dtype=np.float32)[:, :3], boxes)
    else:
        on_box = np.asarray(points_on_box).reshape(m)
    corners = box_corners(boxes)  # (M, 8, 3)
    fraction = np.full(m, np.nan)
    for j in range(m):
        c = corners[j]
        k = int(np.searchsorted(rng_sorted, np.linalg.norm(c, axis=1).min()))  # nearer than every corner
        nearer = 0
        if k:
            az0 = math.atan2(boxes[j, 1], boxes[j, 0])
            rel_c = np.asarray(wrap_angle(np.arctan2(c[:, 1], c[:, 0]) - az0))
            el_c = np.arctan2(c[:, 2], np.hypot(c[:, 0], c[:, 1]))
            el = el_all[:k]
            window = (el >= el_c.min()) & (el <= el_c.max())
            rel = np.asarray(wrap_angle(az_all[:k][window] - az0))
            inner = (rel >= rel_c.min()) & (rel <= rel_c.max())
            if inner.any():  # a point on the near face can be nearer than the corners: not an occluder
                candidates = xyz[:k][window][inner].astype(np.float32)
                nearer = int(np.count_nonzero(~points_in_boxes(candidates, boxes[j : j + 1])[:, 0]))
        total = int(on_box[j]) + nearer
        if total > 0:
            fraction[j] = nearer / total
    levels = np.full(m, 3, dtype=np.int64)
    known = ~np.isnan(fraction)
    levels[known] = np.where(fraction[known] < 0.1, 0, np.where(fraction[known] < 0.5, 1, 2))
    return levels, fraction


def labels_from_lidar_boxes(
    boxes_lidar: np.ndarray,
    types: list[str] | np.ndarray,
    calib: KittiCalib,
    visibility_points: np.ndarray | None = None,
    image_size: tuple[int, int] = IMAGE_SIZE,
    points_on_box: np.ndarray | None = None,
) -> KittiLabels:
    """KITTI labels for LiDAR boxes: camera boxes, image boxes, truncation, occlusion and alpha.

    Args:
        boxes_lidar: (M, 7) LiDAR boxes.
        types: (M,) KITTI types.
        calib: the frame's calibration.
        visibility_points: (N, 3 + F) the sweep the occlusion is judged from (sensor at the
            origin), or None to write occlusion 3 (unknown).
        image_size: (width, height) of the camera image.
        points_on_box: (M,) points of ``visibility_points`` on each box, if known (see
            :func:`occlusion_levels`).
    """
    boxes = np.asarray(boxes_lidar, dtype=np.float64).reshape(-1, 7)
    types_arr = np.asarray(list(types), dtype="<U14")
    if len(types_arr) != len(boxes):
        raise ValueError(f"{len(types_arr)} types for {len(boxes)} boxes")
    if len(boxes) == 0:
        return KittiLabels.empty()
    boxes_cam = boxes_lidar_to_camera(boxes, calib)
    bbox, truncated = image_boxes_and_truncation(boxes, calib, image_size)
    if visibility_points is None:
        occluded = np.full(len(boxes), 3, dtype=np.int64)
    else:
        occluded = occlusion_levels(visibility_points, boxes, points_on_box)[0]
    # KITTI's observation angle: rotation_y minus the ray's angle to the object (camera x-z plane)
    alpha = np.asarray(wrap_angle(boxes_cam[:, 6] - np.arctan2(boxes_cam[:, 0], boxes_cam[:, 2])))
    labels = KittiLabels(
        types=types_arr,
        truncated=truncated,
        occluded=occluded,
        alpha=alpha,
        bbox=bbox,
        boxes_camera=boxes_cam,
    )
    labels.validate()
    return labels


# --------------------------------------------------------------------------------------------------
# Velodyne scans
# --------------------------------------------------------------------------------------------------


def velodyne_problems(path: Path | str, dim: int = 4) -> list[str]:
    """Problems of a float32 ``(N, dim)`` point file: unreadable, truncated, NaN or infinity."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        return [f"cannot read ({err})"]
    row = 4 * dim
    if size % row:
        return [f"truncated or corrupt: {size} bytes is not a whole number of {dim}-float points ({row} bytes)"]
    points = np.fromfile(path, dtype=np.float32).reshape(-1, dim)
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        return [f"{int(bad.sum())} points with NaN or infinity (first at row {int(np.argmax(bad))})"]
    return []


def read_velodyne(path: Path | str, dim: int = 4) -> np.ndarray:
    """Read a float32 point file as (N, dim) (KITTI: dim 4, x y z reflectance).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a size that is not a whole number of points, or NaN/inf values (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no point file {path}")
    problems = velodyne_problems(path, dim)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return np.fromfile(path, dtype=np.float32).reshape(-1, dim)


def write_velodyne(path: Path | str, points: np.ndarray) -> Path:
    """Write (N, 4) points as float32 atomically."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 4:
        raise ValueError(f"points must be (N, 4), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points hold NaN or infinity")
    with atomic_path(path, keep_suffix=False) as tmp:
        points.tofile(tmp)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Our additions: the frame index and per-frame meta
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameIndexEntry:
    """Where KITTI frame ``index`` came from.

    Attributes:
        index: the KITTI frame number.
        split: the source split folder (``train``, ...), also the ``ImageSets`` list it is in.
        run: the source run (OPV2V scenario folder), or the source format for foreign trees.
        cav: the connected vehicle whose view this is (the ego for a fused view).
        frame: the source frame number.
        view: ``"cav"`` (one vehicle's sweep) or ``"fused"`` (every cav's sweep in the ego's frame).
    """

    index: int
    split: str
    run: str
    cav: int
    frame: int
    view: str = "cav"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": int(self.index),
            "split": str(self.split),
            "run": str(self.run),
            "cav": int(self.cav),
            "frame": int(self.frame),
            "view": str(self.view),
        }


def write_frames_index(root: Path | str, entries: list[FrameIndexEntry]) -> Path:
    """Write ``<root>/frames.yaml`` atomically."""
    indices = [e.index for e in entries]
    if len(set(indices)) != len(indices):
        raise ValueError("frame index entries must have unique indices")
    text = dump_yaml({"format_version": 1, "frames": [e.to_dict() for e in entries]})
    return atomic_write_text(Path(root) / FRAMES_INDEX_NAME, text)


def read_frames_index(root: Path | str) -> list[FrameIndexEntry] | None:
    """Entries of ``<root>/frames.yaml``, or None when there is none (a foreign KITTI tree)."""
    path = Path(root) / FRAMES_INDEX_NAME
    if not path.is_file():
        return None
    try:
        entries = [FrameIndexEntry(**e) for e in load_yaml(path)["frames"]]
    except (KeyError, TypeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not a frame index ({err!r})") from err
    return entries


@dataclass
class ViewMeta:
    """What a KITTI frame written from native data cannot hold, aligned with its label lines.

    Attributes:
        T_world_from_sensor: (4, 4) float64 LiDAR pose.
        T_world_from_agent: (4, 4) float64 pose of the viewing vehicle's bottom centre.
        T_world_from_agent_predicted: (4, 4) float64 localised pose, or None.
        ego_speed_mps: speed of the viewing vehicle.
        object_ids: (K,) int64 vehicle id of each label line.
        kinds: (K,) our kind of each label line (``car``, ``bus``, ...).
        roles: (K,) role of each, or None.
        speeds_mps: (K,) float64 speed of each.
        agent_kind: the viewing vehicle's kind, or None.
        agent_extent: (3,) float64 its size, or None.
        time_s: simulation time, or None.
        scene_ego_id: the scenario's ego, or None.
        extra_yaml: the source yaml's other keys (cameras, ``plan_trajectory``...), passed through.
    """

    T_world_from_sensor: np.ndarray
    T_world_from_agent: np.ndarray
    ego_speed_mps: float
    object_ids: np.ndarray
    kinds: list[str]
    speeds_mps: np.ndarray
    roles: list[str] | None = None
    T_world_from_agent_predicted: np.ndarray | None = None
    agent_kind: str | None = None
    agent_extent: np.ndarray | None = None
    time_s: float | None = None
    scene_ego_id: int | None = None
    extra_yaml: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def mat(T: np.ndarray | None) -> list[list[float]] | None:
            return None if T is None else [[float(v) for v in row] for row in np.asarray(T, np.float64)]

        return {
            "T_world_from_sensor": mat(self.T_world_from_sensor),
            "T_world_from_agent": mat(self.T_world_from_agent),
            "T_world_from_agent_predicted": mat(self.T_world_from_agent_predicted),
            "ego_speed_mps": float(self.ego_speed_mps),
            "object_ids": [int(v) for v in self.object_ids],
            "kinds": [str(v) for v in self.kinds],
            "roles": None if self.roles is None else [str(v) for v in self.roles],
            "speeds_mps": [float(v) for v in self.speeds_mps],
            "agent_kind": self.agent_kind,
            "agent_extent": None if self.agent_extent is None else [float(v) for v in self.agent_extent],
            "time_s": None if self.time_s is None or not math.isfinite(self.time_s) else float(self.time_s),
            "scene_ego_id": None if self.scene_ego_id is None else int(self.scene_ego_id),
            "extra_yaml": self.extra_yaml,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewMeta:
        def mat(v: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=np.float64).reshape(4, 4)

        meta = cls(
            T_world_from_sensor=np.asarray(data["T_world_from_sensor"], dtype=np.float64).reshape(4, 4),
            T_world_from_agent=np.asarray(data["T_world_from_agent"], dtype=np.float64).reshape(4, 4),
            T_world_from_agent_predicted=mat(data.get("T_world_from_agent_predicted")),
            ego_speed_mps=float(data["ego_speed_mps"]),
            object_ids=np.asarray(data["object_ids"], dtype=np.int64).reshape(-1),
            kinds=[str(v) for v in data["kinds"]],
            roles=None if data.get("roles") is None else [str(v) for v in data["roles"]],
            speeds_mps=np.asarray(data["speeds_mps"], dtype=np.float64).reshape(-1),
            agent_kind=data.get("agent_kind"),
            agent_extent=None
            if data.get("agent_extent") is None
            else np.asarray(data["agent_extent"], np.float64).reshape(3),
            time_s=None if data.get("time_s") is None else float(data["time_s"]),
            scene_ego_id=None if data.get("scene_ego_id") is None else int(data["scene_ego_id"]),
            extra_yaml=dict(data.get("extra_yaml") or {}),
        )
        k = len(meta.object_ids)
        if len(meta.kinds) != k or len(meta.speeds_mps) != k or (meta.roles is not None and len(meta.roles) != k):
            raise ValueError("object_ids, kinds, roles and speeds_mps must have the same length")
        return meta


def read_meta(path: Path | str) -> ViewMeta | None:
    """A frame's meta file, or None when it has none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return ViewMeta.from_dict(load_yaml(path))
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: bad frame meta ({err})") from err


# --------------------------------------------------------------------------------------------------
# Frames and trees
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KittiFramePaths:
    """The files of KITTI frame ``index`` in one split folder."""

    velodyne: Path
    calib: Path
    label: Path
    meta: Path


def kitti_frame_paths(split_dir: Path | str, index: int) -> KittiFramePaths:
    """Paths of frame ``index`` (existing or not)."""
    if index < 0:
        raise ValueError(f"KITTI index must be >= 0, got {index}")
    d = Path(split_dir)
    name = f"{int(index):06d}"
    return KittiFramePaths(
        velodyne=d / "velodyne" / f"{name}.bin",
        calib=d / "calib" / f"{name}.txt",
        label=d / "label_2" / f"{name}.txt",
        meta=d / META_DIR / f"{name}.yaml",
    )


def kitti_split_dirs(root: Path | str) -> list[Path]:
    """Split folders of a KITTI tree: ``root`` itself if it holds ``velodyne/``, else its
    ``training`` and ``testing`` folders that do."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no KITTI folder {root}")
    if (root / "velodyne").is_dir():
        return [root]
    return [root / s for s in ("training", "testing") if (root / s / "velodyne").is_dir()]


def list_kitti_frames(split_dir: Path | str) -> list[int]:
    """Indices of the velodyne files of a split folder, increasing."""
    velodyne = Path(split_dir) / "velodyne"
    if not velodyne.is_dir():
        raise FileNotFoundError(f"no velodyne folder {velodyne}")
    return sorted(int(p.stem) for p in velodyne.glob("*.bin") if _STEM_RE.match(p.stem))


@dataclass
class KittiFrame:
    """One KITTI frame.

    Attributes:
        index: frame number.
        points: (N, 4) float32 x, y, z, reflectance, LiDAR frame.
        calib: the calibration.
        labels: the labels, or None (``testing`` split).
        meta: our per-frame meta, or None (foreign trees).
    """

    index: int
    points: np.ndarray
    calib: KittiCalib
    labels: KittiLabels | None
    meta: ViewMeta | None = None

    def boxes_lidar(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, 7) LiDAR boxes and (K,) types of the labels that are not ``DontCare``."""
        if self.labels is None:
            return np.zeros((0, 7)), np.zeros(0, dtype="<U14")
        care = self.labels.select(self.labels.care)
        return boxes_camera_to_lidar(care.boxes_camera, self.calib), care.types


def read_kitti_frame(split_dir: Path | str, index: int, labels: bool = True) -> KittiFrame:
    """Read frame ``index`` of a split folder (labels if ``labels`` and the file exists).

    Raises:
        FileNotFoundError: a missing velodyne or calibration file.
        ValueError: a corrupt file; the message names it.
    """
    paths = kitti_frame_paths(split_dir, index)
    points = read_velodyne(paths.velodyne)
    calib = read_calib(paths.calib)
    label = read_labels(paths.label) if labels and paths.label.is_file() else None
    return KittiFrame(index=index, points=points, calib=calib, labels=label, meta=read_meta(paths.meta))


def write_kitti_frame(split_dir: Path | str, frame: KittiFrame) -> list[Path]:
    """Write a frame's velodyne, calib, meta (if any) and, last, its label file, each atomically.

    The label file is the frame's completion mark: a frame whose label exists is complete.
    A frame without labels gets an empty label file.
    """
    paths = kitti_frame_paths(split_dir, frame.index)
    for d in (paths.velodyne, paths.calib, paths.label, paths.meta):
        d.parent.mkdir(parents=True, exist_ok=True)
    labels = frame.labels if frame.labels is not None else KittiLabels.empty()
    label_text = labels.to_text()  # formats (and validates) before anything is written
    paths.label.unlink(missing_ok=True)  # a rewrite first withdraws the completion mark
    written = [write_velodyne(paths.velodyne, frame.points), write_calib(paths.calib, frame.calib)]
    if frame.meta is not None:
        if len(frame.meta.object_ids) != len(labels):
            raise ValueError(f"meta has {len(frame.meta.object_ids)} objects for {len(labels)} label lines")
        written.append(atomic_write_text(paths.meta, dump_yaml(frame.meta.to_dict())))
    written.append(atomic_write_text(paths.label, label_text))
    return written

