"""mmdet3d's v2 info files for KITTI-style trees: what ``KittiDataset`` (mmdet3d 1.4) loads.

An info file is a pickle ``{"metainfo": ..., "data_list": [...]}`` with one dict per frame::

    sample_idx      the KITTI index
    images          CAM0..CAM3: ``cam2img`` (4x4 P_i), ``lidar2img``; CAM2 also ``lidar2cam``
                    (= R0_rect @ Tr_velo_to_cam), ``img_path``, ``height``, ``width``; ``R0_rect`` (4x4)
    lidar_points    ``num_pts_feats`` (4), ``lidar_path`` (relative to the dataset's ``data_prefix.pts``),
                    ``Tr_velo_to_cam``, ``Tr_imu_to_velo`` (4x4)
    instances       one dict per label line: ``bbox_3d`` (camera ``[x, y, z, l, h, w, ry]``, bottom
                    centre), ``bbox_label_3d`` / ``bbox_label`` (index in ``metainfo["categories"]``,
                    -1 for DontCare), ``num_lidar_pts``, ``bbox``, ``truncated``, ``occluded``,
                    ``alpha``, ``difficulty``, ``score``, ``index``, ``group_id``, ``center_2d``, ``depth``

``KittiDataset`` turns ``bbox_3d`` into LiDAR boxes with ``CameraInstance3DBoxes(...).convert_to(LiDAR,
inv(lidar2cam))``, which :func:`lidar_boxes_of_entry` repeats. Infos written here point at
``<root>/training/velodyne/<index:06d>.bin``: load them with
``KittiDataset(data_root=<root>, ann_file="kitti_infos_<split>.pkl", data_prefix={"pts": "training/velodyne"})``.

``num_lidar_pts`` is counted with mmcv's points-in-boxes (:func:`sim.box_ops.count_points_in_boxes`)
over the frame's whole velodyne file. mmdet3d's own converter counts over the points in the
camera's field of view (its ``velodyne_reduced``); on a file already cropped to it, as
``kitti_000008`` of the shared samples, the two agree point for point, while on a full 360 degree
sweep ours also counts the points outside the camera's view.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datasets.io import atomic_path
from datasets.kitti import (
    IMAGE_SIZE,
    KittiCalib,
    KittiFrame,
    KittiLabels,
    boxes_camera_to_lidar,
    read_velodyne,
)
from sim.box_ops import count_points_in_boxes
from sim.geometry import wrap_angle

__all__ = [
    "INFO_VERSION",
    "KITTI_CLASSES",
    "build_info_entry",
    "calib_of_entry",
    "classes_of",
    "entry_problems",
    "frame_of_entry",
    "info_file_name",
    "kitti_difficulty",
    "labels_of_entry",
    "lidar_boxes_of_entry",
    "make_infos",
    "read_infos",
    "resolve_lidar_path",
    "sample_index",
    "write_infos",
]

KITTI_CLASSES = ("Pedestrian", "Cyclist", "Car", "Van", "Truck", "Person_sitting", "Tram", "Misc")
"""mmdet3d 1.4 ``KittiDataset.METAINFO["classes"]``, in its order (label = index here)."""

INFO_VERSION = "1.1"
"""``metainfo["info_version"]`` of mmdet3d 1.x's converters."""


def info_file_name(split: str) -> str:
    """``kitti_infos_<split>.pkl``, mmdet3d's name for a KITTI split's infos."""
    return f"kitti_infos_{split}.pkl"


def _mat4(M: np.ndarray) -> list[list[float]]:
    T = np.eye(4)
    T[: M.shape[0], : M.shape[1]] = M
    return [[float(v) for v in row] for row in T]


def kitti_difficulty(bbox: np.ndarray, occluded: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    """KITTI's difficulty per object: 0 easy, 1 moderate, 2 hard, -1 none (mmdet3d's rule).

    Easy: image box at least 40 px high, fully visible, truncation <= 0.15; moderate: 25 px,
    occlusion <= 1, truncation <= 0.3; hard: 25 px, occlusion <= 2, truncation <= 0.5.
    """
    height = np.asarray(bbox, np.float64).reshape(-1, 4)[:, 3] - np.asarray(bbox, np.float64).reshape(-1, 4)[:, 1]
    occluded = np.asarray(occluded)
    truncated = np.asarray(truncated)
    out = np.full(len(height), -1, dtype=np.int64)
    for level, (min_h, max_occ, max_trunc) in reversed(list(enumerate(((40, 0, 0.15), (25, 1, 0.3), (25, 2, 0.5))))):
        ok = (height >= min_h) & (occluded <= max_occ) & (truncated <= max_trunc)
        out[ok] = level
    return out


def build_info_entry(
    frame: KittiFrame,
    lidar_path: str,
    image_size: tuple[int, int] = IMAGE_SIZE,
    classes: tuple[str, ...] = KITTI_CLASSES,
) -> dict[str, Any]:
    """One ``data_list`` entry for a KITTI frame (plain Python types only).

    Args:
        frame: the frame, with labels (an unlabelled frame gets no instances).
        lidar_path: the velodyne file relative to the dataset's ``data_prefix["pts"]``.
        image_size: (width, height) recorded for CAM2.
        classes: the category list labels index into.
    """
    calib = frame.calib
    lidar2cam = calib.T_rect_from_velo
    images: dict[str, Any] = {}
    for i in range(4):
        cam2img = np.eye(4)
        cam2img[:3, :4] = getattr(calib, f"P{i}")
        images[f"CAM{i}"] = {"cam2img": _mat4(cam2img), "lidar2img": _mat4(cam2img @ lidar2cam)}
    images["CAM2"].update(
        img_path=f"{frame.index:06d}.png", height=int(image_size[1]), width=int(image_size[0]), lidar2cam=_mat4(lidar2cam)
    )
    images["R0_rect"] = _mat4(calib.R0_rect)
    instances = []
    labels = frame.labels if frame.labels is not None else KittiLabels.empty()
    care = labels.care
    counts = np.full(len(labels), -1, dtype=np.int64)
    if care.any():
        boxes_lidar = boxes_camera_to_lidar(labels.boxes_camera[care], calib)
        counts[care] = count_points_in_boxes(frame.points, boxes_lidar)
    difficulty = np.where(care, kitti_difficulty(labels.bbox, labels.occluded, labels.truncated), -1)
    gravity = labels.boxes_camera[:, :3].copy()
    gravity[:, 1] -= labels.boxes_camera[:, 4] / 2.0  # camera y points down: centre is h/2 above the bottom
    uv, depth = calib.project_rect_to_image(gravity)
    care_index = np.cumsum(care) - 1
    for i in range(len(labels)):
        kind = str(labels.types[i])
        label = classes.index(kind) if kind in classes else -1
        instances.append(
            {
                "bbox": [float(v) for v in labels.bbox[i]],
                "bbox_label": int(label),
                "bbox_3d": [float(v) for v in labels.boxes_camera[i]],
                "bbox_label_3d": int(label),
                "depth": float(depth[i]),
                "center_2d": [float(v) for v in uv[i]],
                "num_lidar_pts": int(counts[i]),
                "difficulty": int(difficulty[i]),
                "truncated": float(labels.truncated[i]),
                "occluded": int(labels.occluded[i]),
                "alpha": float(labels.alpha[i]),
                "score": float(labels.score[i]) if labels.score is not None else 0.0,
                "index": int(care_index[i]) if care[i] else -1,
                "group_id": int(i),
            }
        )
    return {
        "sample_idx": int(frame.index),
        "images": images,
        "lidar_points": {
            "num_pts_feats": 4,
            "lidar_path": str(lidar_path),
            "Tr_velo_to_cam": _mat4(calib.Tr_velo_to_cam),
            "Tr_imu_to_velo": _mat4(calib.Tr_imu_to_velo),
        },
        "instances": instances,
    }


def make_infos(entries: list[dict[str, Any]], classes: tuple[str, ...] = KITTI_CLASSES) -> dict[str, Any]:
    """The info file's dict: ``metainfo`` (categories, dataset, version) and ``data_list``."""
    return {
        "metainfo": {
            "categories": {name: i for i, name in enumerate(classes)},
            "dataset": "kitti",
            "info_version": INFO_VERSION,
        },
        "data_list": entries,
    }


def write_infos(path: Path | str, infos: dict[str, Any]) -> Path:
    """Pickle ``infos`` atomically (protocol 4, plain types: any Python 3.8+ loads it)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(infos, f, protocol=4)
    return Path(path)


class _InfoUnpickler(pickle.Unpickler):
    """Loads dicts, lists, numbers, strings and numpy arrays/scalars, nothing that runs code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how numpy pickles the bytes of an array
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"info files may hold plain data only, not {module}.{name}")


def read_infos(path: Path | str) -> dict[str, Any]:
    """Load an info file (plain data and numpy values only; no arbitrary objects).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a pickle, a truncated one, objects other than data, or not
            ``{"metainfo", "data_list"}``; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no info file {path}")
    try:
        with open(path, "rb") as f:
            infos = _InfoUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable info pickle ({err})") from err
    if not isinstance(infos, dict) or not isinstance(infos.get("data_list"), list):
        raise ValueError(f"{path}: not an mmdet3d v2 info file (no data_list)")
    if not isinstance(infos.get("metainfo", {}), dict):
        raise ValueError(f"{path}: metainfo must be a dict")
    return infos


def classes_of(infos: dict[str, Any]) -> tuple[str, ...]:
    """Category names by label index: ``metainfo["categories"]``, else mmdet3d's KITTI classes."""
    categories = (infos.get("metainfo") or {}).get("categories")
    if not categories:
        return KITTI_CLASSES
    by_index = sorted((int(i), str(name)) for name, i in categories.items())
    return tuple(name for _, name in by_index)


def calib_of_entry(entry: dict[str, Any]) -> KittiCalib:
    """The KITTI calibration an entry records (P_i from ``cam2img``; without ``Tr_velo_to_cam`` the
    CAM2 ``lidar2cam`` is used with an identity ``R0_rect``)."""
    images = entry.get("images") or {}
    lidar = entry.get("lidar_points") or {}
    P = {}
    for i in range(4):
        cam = images.get(f"CAM{i}") or images.get("CAM2") or {}
        if "cam2img" not in cam:
            raise ValueError(f"entry {entry.get('sample_idx', entry.get('sample_id'))}: no cam2img for CAM{i} or CAM2")
        P[f"P{i}"] = np.asarray(cam["cam2img"], dtype=np.float64)[:3, :4]
        if P[f"P{i}"].shape != (3, 4):  # a 3x3 intrinsic matrix
            K = np.zeros((3, 4))
            K[:3, :3] = np.asarray(cam["cam2img"], dtype=np.float64)[:3, :3]
            P[f"P{i}"] = K
    if "Tr_velo_to_cam" in lidar:
        R0 = np.asarray(images.get("R0_rect", np.eye(4)), dtype=np.float64)[:3, :3]
        Tr = np.asarray(lidar["Tr_velo_to_cam"], dtype=np.float64)[:3, :4]
    else:
        R0 = np.eye(3)
        Tr = np.asarray(images["CAM2"]["lidar2cam"], dtype=np.float64)[:3, :4]
    Tr_imu = np.asarray(lidar.get("Tr_imu_to_velo", np.eye(4)), dtype=np.float64)[:3, :4]
    calib = KittiCalib(R0_rect=R0, Tr_velo_to_cam=Tr, Tr_imu_to_velo=Tr_imu, **P)
    calib.validate()
    return calib


def labels_of_entry(entry: dict[str, Any], classes: tuple[str, ...] = KITTI_CLASSES) -> KittiLabels:
    """The entry's instances as KITTI labels (label -1 is ``DontCare``; absent fields default to
    truncation 0, occlusion 3 (unknown), an empty image box, alpha from the box)."""
    instances = entry.get("instances") or []
    if not instances:
        return KittiLabels.empty()
    m = len(instances)
    types = []
    for inst in instances:
        label = int(inst.get("bbox_label_3d", inst.get("bbox_label", -1)))
        types.append(classes[label] if 0 <= label < len(classes) else "DontCare")
    boxes = np.array([inst["bbox_3d"] for inst in instances], dtype=np.float64).reshape(m, 7)
    default_alpha = np.asarray(wrap_angle(boxes[:, 6] - np.arctan2(boxes[:, 0], boxes[:, 2])))
    scores = [inst.get("score") for inst in instances]
    return KittiLabels(
        types=np.array(types, dtype="<U14"),
        truncated=np.array([float(inst.get("truncated", 0.0)) for inst in instances]),
        occluded=np.array([int(inst.get("occluded", 3)) for inst in instances], dtype=np.int64),
        alpha=np.array([float(inst.get("alpha", default_alpha[i])) for i, inst in enumerate(instances)]),
        bbox=np.array([inst.get("bbox", [0.0, 0.0, 0.0, 0.0]) for inst in instances], dtype=np.float64).reshape(m, 4),
        boxes_camera=boxes,
        score=None if all(s is None or s == 0.0 for s in scores) else np.array([float(s or 0.0) for s in scores]),
    )


def lidar_boxes_of_entry(
    entry: dict[str, Any], classes: tuple[str, ...] = KITTI_CLASSES
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """LiDAR boxes of an entry's instances with a class (label >= 0), as ``KittiDataset`` makes them.

    Returns:
        boxes: (K, 7) float64 LiDAR boxes (``CameraInstance3DBoxes.convert_to(LiDAR, inv(lidar2cam))``,
            with CAM2's ``lidar2cam``).
        names: (K,) class names.
        num_lidar_pts: (K,) int64 the counts the entry records (-1 where absent).
    """
    instances = [i for i in entry.get("instances") or [] if int(i.get("bbox_label_3d", -1)) >= 0]
    if not instances:
        return np.zeros((0, 7)), [], np.zeros(0, dtype=np.int64)
    boxes_cam = np.array([i["bbox_3d"] for i in instances], dtype=np.float64).reshape(-1, 7)
    images = entry.get("images") or {}
    if "CAM2" in images and "lidar2cam" in images["CAM2"]:
        lidar2cam = np.asarray(images["CAM2"]["lidar2cam"], dtype=np.float64)
        from mmdet3d.structures import Box3DMode

        boxes = np.asarray(Box3DMode.convert(boxes_cam, Box3DMode.CAM, Box3DMode.LIDAR, rt_mat=np.linalg.inv(lidar2cam)))
    else:
        boxes = boxes_camera_to_lidar(boxes_cam, calib_of_entry(entry))
    names = [classes[int(i["bbox_label_3d"])] for i in instances]
    counts = np.array([int(i.get("num_lidar_pts", -1)) for i in instances], dtype=np.int64)
    return boxes, names, counts


def sample_index(entry: dict[str, Any]) -> int:
    """An entry's frame index: ``sample_idx`` (``sample_id`` in some of mmdet3d's demo files)."""
    value = entry.get("sample_idx", entry.get("sample_id"))
    if value is None:
        raise ValueError("entry has no sample_idx")
    return int(value)


def resolve_lidar_path(lidar_path: str, root: Path, info_path: Path) -> Path:
    """Where an entry's ``lidar_path`` lies: under ``<root>/training/velodyne``, ``<root>`` or the info
    file's folder (first that exists; the first candidate when none does)."""
    candidates = [root / "training" / "velodyne" / lidar_path, root / lidar_path, info_path.parent / lidar_path]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def frame_of_entry(
    entry: dict[str, Any], points_path: Path | str, classes: tuple[str, ...] = KITTI_CLASSES
) -> KittiFrame:
    """A :class:`datasets.kitti.KittiFrame` from an entry and its velodyne file."""
    dim = int((entry.get("lidar_points") or {}).get("num_pts_feats", 4))
    points = read_velodyne(points_path, dim)[:, :4]
    if points.shape[1] < 4:
        raise ValueError(f"{points_path}: needs x y z and intensity, has {points.shape[1]} values a point")
    return KittiFrame(
        index=sample_index(entry),
        points=np.ascontiguousarray(points, dtype=np.float32),
        calib=calib_of_entry(entry),
        labels=labels_of_entry(entry, classes),
    )


def entry_problems(entry: Any, position: int) -> list[str]:
    """Problems of one ``data_list`` entry's structure and boxes (not its files)."""
    where = f"data_list[{position}]"
    if not isinstance(entry, dict):
        return [f"{where}: not a dict"]
    problems = []
    if "sample_idx" not in entry and "sample_id" not in entry:
        problems.append(f"{where}: no sample_idx")
    lidar = entry.get("lidar_points")
    if not isinstance(lidar, dict) or "lidar_path" not in lidar:
        problems.append(f"{where}: no lidar_points.lidar_path")
    try:
        calib_of_entry(entry)
    except (KeyError, ValueError, TypeError) as err:
        problems.append(f"{where}: bad calibration ({err})")
    for j, inst in enumerate(entry.get("instances") or []):
        try:
            box = np.asarray(inst["bbox_3d"], dtype=np.float64)
            label = int(inst.get("bbox_label_3d", -1))
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{where}.instances[{j}]: bad instance ({err!r})")
            continue
        if box.shape != (7,):
            problems.append(f"{where}.instances[{j}]: bbox_3d must be 7 numbers, got {box.shape}")
        elif label >= 0 and not np.all(np.isfinite(box)):
            problems.append(f"{where}.instances[{j}]: bbox_3d holds NaN or infinity")
        elif label >= 0 and np.any(box[3:6] <= 0):
            problems.append(f"{where}.instances[{j}]: box with non-positive size {box[3:6].tolist()}")
    return problems
