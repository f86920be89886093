"""nuScenes LiDAR sweeps (``.pcd.bin``) and the boxes of mmdet3d's nuScenes info files (read only).

A nuScenes ``LIDAR_TOP`` file is float32 ``(N, 5)``: x, y, z in the sensor frame, intensity
(0-255) and the laser ring index (0-31). Despite its name it is not a PCD file. A tree is any
folder holding such files (``samples/LIDAR_TOP/*.pcd.bin``, ``sweeps/...``); boxes come from an
mmdet3d v2 info file (``nuscenes_infos_*.pkl``), whose entries name their sweep in
``lidar_points.lidar_path``.

Boxes in those infos are ``[x, y, z, dx, dy, dz, yaw]`` in the LiDAR frame with z at the box's
**gravity centre** (mmdet3d's ``NuScenesDataset`` wraps them with ``origin=(0.5, 0.5, 0.5)``);
:func:`lidar_boxes_of_entry` moves z to the bottom centre of the stack's convention. On the shared
sample sweep the points inside the converted boxes (mmcv's rule) equal the ``num_lidar_pts`` that
nuScenes records for most boxes and differ by a few points at the boundaries of the others
(nuScenes counts with its own geometry); without the shift most counts would be far off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datasets.kitti import read_velodyne, velodyne_problems

__all__ = [
    "NUSCENES_CLASSES",
    "NUSCENES_POINT_DIM",
    "NUSCENES_TO_KIND",
    "NUSCENES_TO_KITTI",
    "lidar_boxes_of_entry",
    "list_sweeps",
    "read_sweep",
    "sweep_problems",
]

NUSCENES_POINT_DIM = 5
"""Floats per point: x, y, z, intensity, ring."""

NUSCENES_CLASSES = (
    "car",
    "truck",
    "trailer",
    "bus",
    "construction_vehicle",
    "bicycle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "barrier",
)
"""mmdet3d's nuScenes detection classes (label = index)."""

NUSCENES_TO_KIND = {"car": "car", "truck": "truck", "bus": "bus", "trailer": "truck", "construction_vehicle": "truck"}
"""nuScenes vehicle classes -> our kinds (a trailer or construction vehicle is a truck-sized box)."""

NUSCENES_TO_KITTI = {
    "car": "Car",
    "truck": "Truck",
    "bus": "Truck",
    "trailer": "Misc",
    "construction_vehicle": "Misc",
    "bicycle": "Cyclist",
    "motorcycle": "Cyclist",
    "pedestrian": "Pedestrian",
}
"""nuScenes classes -> KITTI types (cones and barriers have none and are left out)."""

_SUFFIX = ".pcd.bin"


def sweep_problems(path: Path | str) -> list[str]:
    """Problems of a ``.pcd.bin``: unreadable, not a whole number of 5-float points, NaN/inf."""
    return velodyne_problems(path, NUSCENES_POINT_DIM)


def read_sweep(path: Path | str) -> np.ndarray:
    """Read a nuScenes ``.pcd.bin`` as (N, 5) float32 ``x, y, z, intensity, ring``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a size that is not a whole number of 20-byte points, or NaN/inf (names the file).
    """
    return read_velodyne(path, NUSCENES_POINT_DIM)


def list_sweeps(root: Path | str) -> list[Path]:
    """Every ``*.pcd.bin`` at or below ``root``, sorted by path."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name.endswith(_SUFFIX) else []
    if not root.is_dir():
        raise FileNotFoundError(f"no nuScenes folder {root}")
    return sorted(p for p in root.rglob(f"*{_SUFFIX}") if p.is_file())


def lidar_boxes_of_entry(entry: dict[str, Any], classes: tuple[str, ...] = NUSCENES_CLASSES) -> tuple[np.ndarray, list[str]]:
    """Bottom-centre LiDAR boxes and class names of an mmdet3d nuScenes info entry.

    Instances with label -1 (classes outside the 10) are left out.

    Returns:
        boxes: (M, 7) float64 ``[x, y, z_bottom, dx, dy, dz, yaw]``.
        names: (M,) class names.
    """
    instances = [i for i in entry.get("instances") or [] if int(i.get("bbox_label_3d", -1)) >= 0]
    if not instances:
        return np.zeros((0, 7)), []
    boxes = np.array([i["bbox_3d"][:7] for i in instances], dtype=np.float64).reshape(-1, 7)
    boxes[:, 2] -= boxes[:, 5] / 2.0  # gravity centre -> bottom centre
    names = [classes[int(i["bbox_label_3d"])] for i in instances]
    return boxes, names
