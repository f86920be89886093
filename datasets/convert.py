"""Conversion between dataset formats, and a validator for trees of any of them.

Formats (:data:`FORMATS`):

- ``native``: ours, OPV2V's layout plus a sidecar ``.npz`` per cav frame (:mod:`datasets.native`).
- ``opv2v``: plain OPV2V / V2XSet (no sidecar, no manifest), as OpenCOOD reads it.
- ``kitti``: a KITTI object tree, one frame per view (:mod:`datasets.kitti`).
- ``mmdet3d``: a KITTI tree plus mmdet3d v2 info files (:mod:`datasets.mmdet3d_info`).
- ``nuscenes``: ``.pcd.bin`` sweeps, with boxes where an mmdet3d nuScenes info file names them
  (read only).

Every pair with a writable destination converts (:func:`convert`). The unit of work is a source
*frame*: a scene frame of a run (all its cavs) for native/OPV2V sources, one KITTI frame (or
sweep) otherwise. What the destination cannot hold is left out and counted
(:attr:`ConversionSummary.dropped`): OPV2V and native hold vehicles only, so KITTI pedestrians
and cyclists are dropped; KITTI labels only vehicles that at least one point hit.

- native/OPV2V -> KITTI/mmdet3d: each cav's sweep at each frame becomes one KITTI frame
  (``kitti_view="cav"``), or each frame becomes one KITTI frame of every cav's sweep moved into
  the ego's LiDAR frame (``"fused"``; the ego is the scenario's, else OpenCOOD's choice). Indices
  run over splits, runs, frames and cavs in sorted order; ``frames.yaml`` records them and the
  per-frame meta keeps what KITTI cannot hold, so the tree converts back to runs.
- KITTI/mmdet3d/nuScenes -> native/OPV2V: each KITTI frame becomes a cav frame at the place its
  ``frames.yaml`` entry names (a fused frame becomes its ego's frame, fused cloud and all), else
  at ``<split>/<format>/0/<index>`` with the world frame at the sensor and vehicle ids 1, 2, ...
  in label order.
- native <-> OPV2V: file by file; a native tree made from OPV2V gets its sidecar derived
  (:func:`datasets.opv2v.complete_agent`) and no manifest (it records generation settings, and
  converted data has none). ``data_protocol.yaml`` is copied.

Resuming and atomicity: every file is written atomically and a frame's completion mark is written
last (a cav's yaml, a KITTI label file); frames already complete in the destination are skipped,
so an interrupted conversion is resumed by running it again. Index files (``frames.yaml``,
``ImageSets``, mmdet3d's infos) are written whole, the infos after every frame is complete.
"""

from __future__ import annotations

import re
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from datasets import kitti as kt
from datasets import mmdet3d_info as mi
from datasets import nuscenes as ns
from datasets import opv2v as ov
from datasets.io import TEMP_MARKER, atomic_write_text, is_temporary
from datasets.native import (
    MANIFEST_NAME,
    SIDECAR_FORMAT,
    SIDECAR_KEYS,
    NativeAgentFrame,
    agent_frame_paths,
    find_runs,
    list_cavs,
    list_frames,
    load_yaml,
    read_manifest,
    recount_run,
)
from sim.box_ops import count_points_in_boxes
from sim.geometry import invert_T, transform_boxes, transform_points
from sim.types import ActorKind

__all__ = [
    "FORMATS",
    "KITTI_VIEWS",
    "WRITABLE_FORMATS",
    "ConversionSummary",
    "Problem",
    "agent_from_kitti_frame",
    "check_tree",
    "convert",
    "detect_format",
    "kitti_frame_of_agent",
    "kitti_frame_of_fused",
]

FORMATS = ("native", "opv2v", "kitti", "mmdet3d", "nuscenes")
WRITABLE_FORMATS = ("native", "opv2v", "kitti", "mmdet3d")
KITTI_VIEWS = ("cav", "fused")
_VEHICLE_KINDS = frozenset(k.value for k in ActorKind)
_RUN_FORMATS = ("native", "opv2v")
_KITTI_FORMATS = ("kitti", "mmdet3d")


@dataclass(frozen=True)
class Problem:
    """One problem found in a tree: the file it is in and what is wrong."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ConversionSummary:
    """What one :func:`convert` call did.

    Attributes:
        src_format, dst_format: the formats.
        frames: source frames converted by this call.
        frames_skipped: source frames already complete in the destination.
        views: cav frames (native/OPV2V) or KITTI frames written by this call.
        agents: viewpoints of the whole conversion: cavs over all runs for a native/OPV2V
            destination, KITTI frames (one viewpoint each) for a KITTI/mmdet3d one.
        boxes: class -> boxes written (our kinds for native/OPV2V, KITTI types for KITTI/mmdet3d);
            for native/OPV2V each vehicle once per scene frame.
        dropped: class -> boxes the destination cannot hold.
        seconds: wall time.
    """

    src_format: str
    dst_format: str
    frames: int = 0
    frames_skipped: int = 0
    views: int = 0
    agents: int = 0
    boxes: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        """A few human-readable lines."""
        boxes = ", ".join(f"{k} {v}" for k, v in sorted(self.boxes.items())) or "none"
        lines = [
            f"{self.src_format} -> {self.dst_format}: {self.frames} frames converted, "
            f"{self.frames_skipped} already complete, {self.views} views, {self.agents} agents, "
            f"{self.seconds:.1f} s",
            f"boxes: {boxes}",
        ]
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        return "\n".join(lines)


def _add(counter: dict[str, int], items: Any) -> None:
    for key, n in Counter(str(i) for i in items).items():
        counter[key] = counter.get(key, 0) + n


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def _info_files(root: Path, loose: bool = False) -> list[Path]:
    """``*infos*.pkl`` at the top of ``root`` (``root`` itself if it is a pickle); with ``loose``,
    any ``*.pkl`` there when no file is named so (mmdet3d's demo frames are ``<index>.pkl``)."""
    if root.is_file():
        return [root] if root.suffix == ".pkl" else []
    files = sorted(p for p in root.glob("*infos*.pkl") if p.is_file())
    if not files and loose:
        files = sorted(p for p in root.glob("*.pkl") if p.is_file())
    return files


def _candidate_runs(root: Path) -> list[Path]:
    """Folders with integer-named sub-folders holding frame files, at most three levels down."""
    found = []
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        subs = [p for p in d.iterdir() if p.is_dir()] if d.is_dir() else []
        if any(
            _is_cav_name(p.name) and any(q.suffix in (".yaml", ".pcd", ".npz") for q in p.iterdir()) for p in subs
        ):
            found.append(d)
            continue
        if depth < 3:
            stack.extend((p, depth + 1) for p in subs)
    return sorted(found)


def _is_cav_name(name: str) -> bool:
    """Whether a folder name is a cav id (an integer, negative for road-side units)."""
    return re.fullmatch(r"-?\d+", name) is not None


def detect_format(path: Path | str) -> str:
    """Guess a tree's format from its files.

    nuscenes: ``*.pcd.bin`` files; mmdet3d: ``*infos*.pkl`` at the top (or any ``*.pkl`` there
    when no KITTI folder is); kitti: a ``velodyne`` folder (at the top or in
    ``training``/``testing``); native: run folders with a sidecar ``.npz`` or a manifest; opv2v:
    run folders without.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: none of these.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such folder {root}")
    if ns.list_sweeps(root):  # before info files: nuScenes trees have theirs too
        return "nuscenes"
    if _info_files(root):
        return "mmdet3d"
    if root.is_dir() and kt.kitti_split_dirs(root):
        return "kitti"
    if _info_files(root, loose=True):
        return "mmdet3d"
    runs = _candidate_runs(root) if root.is_dir() else []
    if runs:
        native = any((run / MANIFEST_NAME).is_file() or any(run.glob("*/*.npz")) for run in runs)
        return "native" if native else "opv2v"
    raise ValueError(f"cannot tell the format of {root}: no runs, KITTI folders, info files or sweeps")


# --------------------------------------------------------------------------------------------------
# View conversions (pure: arrays in, arrays out)
# --------------------------------------------------------------------------------------------------


def kitti_frame_of_agent(
    agent: NativeAgentFrame, index: int, calib: kt.KittiCalib | None = None
) -> kt.KittiFrame:
    """One cav's sweep as a KITTI frame: its points, the vehicles it saw, a synthetic calibration.

    Vehicles with at least one point are labelled (``num_points`` from the sidecar, else counted
    with mmcv's points-in-boxes); kinds map through :data:`datasets.kitti.KIND_TO_KITTI` (OPV2V
    vehicles, whose kind is unknown, are ``Car``); occlusion is judged from this sweep.
    """
    calib = calib or kt.synthetic_calib()
    T_sensor_from_world = invert_T(agent.T_world_from_sensor)
    boxes = transform_boxes(T_sensor_from_world, agent.boxes_world)  # (M, 7) sensor frame
    m = len(boxes)
    counts = agent.num_points if agent.num_points is not None else count_points_in_boxes(agent.points, boxes)
    keep = np.flatnonzero(np.asarray(counts) >= 1)
    kinds = list(agent.kinds) if agent.kinds is not None else ["car"] * m
    kept_kinds = [kinds[i] for i in keep]
    types = [kt.KIND_TO_KITTI.get(k, "Misc") for k in kept_kinds]
    labels = kt.labels_from_lidar_boxes(
        boxes[keep], types, calib, visibility_points=agent.points, points_on_box=np.asarray(counts)[keep]
    )
    meta = kt.ViewMeta(
        T_world_from_sensor=agent.T_world_from_sensor,
        T_world_from_agent=agent.T_world_from_agent,
        T_world_from_agent_predicted=agent.T_world_from_agent_predicted,
        ego_speed_mps=agent.ego_speed_mps,
        object_ids=agent.vehicle_ids[keep],
        kinds=kept_kinds,
        roles=None if agent.roles is None else [agent.roles[i] for i in keep],
        speeds_mps=agent.vehicle_speed_mps[keep],
        agent_kind=agent.agent_kind,
        agent_extent=agent.agent_extent,
        time_s=agent.time_s,
        scene_ego_id=agent.scene_ego_id,
        extra_yaml=agent.extra_yaml,
    )
    return kt.KittiFrame(index=index, points=agent.points, calib=calib, labels=labels, meta=meta)


def kitti_frame_of_fused(
    agents: dict[int, NativeAgentFrame], ego_id: int, index: int, calib: kt.KittiCalib | None = None
) -> kt.KittiFrame:
    """Every cav's sweep of one frame in the ego's LiDAR frame, as one KITTI frame.

    Points: the ego's, then the other cavs' (increasing id) moved by
    ``inv(T_world_from_ego_sensor) @ T_world_from_cav_sensor``. Boxes: every vehicle any cav lists
    (the first listing by cav order wins; a cav not listed by another enters with its own box when
    its size is known), labelled when at least one fused point lies in it. Occlusion is judged from
    the ego's own sweep (a fused cloud has no single ray origin).
    """
    calib = calib or kt.synthetic_calib()
    ego = agents[ego_id]
    T_ego_from_world = invert_T(ego.T_world_from_sensor)
    order = [ego_id, *sorted(c for c in agents if c != ego_id)]
    clouds = [ego.points]
    ids: list[int] = []
    boxes_world: list[np.ndarray] = []
    kinds: list[str] = []
    speeds: list[float] = []
    roles: list[str] = []
    for cav in order:
        a = agents[cav]
        if cav != ego_id:
            clouds.append(transform_points(T_ego_from_world @ a.T_world_from_sensor, a.points))
        for i, vid in enumerate(a.vehicle_ids.tolist()):
            if vid not in ids:
                ids.append(int(vid))
                boxes_world.append(a.boxes_world[i])
                kinds.append(a.kinds[i] if a.kinds is not None else "car")
                speeds.append(float(a.vehicle_speed_mps[i]))
                roles.append(a.roles[i] if a.roles is not None else ov.UNKNOWN)
    for cav in order:
        box = agents[cav].agent_box_world
        if cav not in ids and box is not None and np.all(np.isfinite(box)):
            ids.append(cav)
            boxes_world.append(box)
            kinds.append(agents[cav].agent_kind or "car")
            speeds.append(agents[cav].ego_speed_mps)
            roles.append("connected")
    points = np.concatenate(clouds, axis=0).astype(np.float32)
    boxes = transform_boxes(T_ego_from_world, np.array(boxes_world).reshape(-1, 7))
    counts = count_points_in_boxes(points, boxes)
    keep = np.flatnonzero(counts >= 1)
    types = [kt.KIND_TO_KITTI.get(kinds[i], "Misc") for i in keep]
    labels = kt.labels_from_lidar_boxes(boxes[keep], types, calib, visibility_points=ego.points)
    meta = kt.ViewMeta(
        T_world_from_sensor=ego.T_world_from_sensor,
        T_world_from_agent=ego.T_world_from_agent,
        T_world_from_agent_predicted=ego.T_world_from_agent_predicted,
        ego_speed_mps=ego.ego_speed_mps,
        object_ids=np.array(ids, dtype=np.int64)[keep],
        kinds=[kinds[i] for i in keep],
        roles=[roles[i] for i in keep],
        speeds_mps=np.array(speeds)[keep],
        agent_kind=ego.agent_kind,
        agent_extent=ego.agent_extent,
        time_s=ego.time_s,
        scene_ego_id=ego.scene_ego_id,
        extra_yaml=ego.extra_yaml,
    )
    return kt.KittiFrame(index=index, points=points, calib=calib, labels=labels, meta=meta)


def agent_from_kitti_frame(
    frame: kt.KittiFrame, cav_id: int, frame_number: int
) -> tuple[NativeAgentFrame, dict[str, int]]:
    """A KITTI frame as one cav's frame: its points, its vehicle boxes in the world frame.

    With meta (a tree written here) poses, ids, kinds and speeds come back; without, the world frame
    is the sensor frame, ids are 1, 2, ... in label order, kinds from
    :data:`datasets.kitti.KITTI_TO_KIND` and speeds 0. Labels that are no vehicle kind of ours
    are dropped.

    Returns:
        The frame (sidecar fields unset where unknown) and type -> dropped count.
    """
    boxes_lidar, types = frame.boxes_lidar()
    meta = frame.meta
    care = frame.labels.care if frame.labels is not None else np.zeros(0, dtype=bool)
    k = len(boxes_lidar)
    if meta is not None and len(meta.object_ids) == len(care):
        ids = meta.object_ids[care]
        kinds = [meta.kinds[i] for i in np.flatnonzero(care)]
        speeds = meta.speeds_mps[care]
        roles = None if meta.roles is None else [meta.roles[i] for i in np.flatnonzero(care)]
    else:
        meta = None if meta is None or len(meta.object_ids) != len(care) else meta
        ids = np.arange(1, k + 1, dtype=np.int64)
        kinds = [kt.KITTI_TO_KIND.get(str(t), str(t)) for t in types]
        speeds = np.zeros(k)
        roles = None
    vehicle = np.array([kd in _VEHICLE_KINDS for kd in kinds], dtype=bool).reshape(-1)
    dropped = dict(Counter(str(t) for t in np.asarray(types)[~vehicle])) if k else {}
    keep = vehicle & (np.asarray(ids) != cav_id)  # a fused view labels its ego; a cav never lists itself
    order = keep.nonzero()[0][np.argsort(ids[keep], kind="stable")]
    T_world_from_sensor = meta.T_world_from_sensor if meta is not None else np.eye(4)
    agent = NativeAgentFrame(
        cav_id=int(cav_id),
        frame=int(frame_number),
        points=np.ascontiguousarray(frame.points[:, :4], dtype=np.float32),
        instance_id=None,
        semantic=None,
        T_world_from_sensor=T_world_from_sensor,
        T_world_from_agent=meta.T_world_from_agent if meta is not None else T_world_from_sensor.copy(),
        ego_speed_mps=meta.ego_speed_mps if meta is not None else 0.0,
        vehicle_ids=np.asarray(ids, dtype=np.int64)[order],
        boxes_world=transform_boxes(T_world_from_sensor, boxes_lidar[order]).reshape(-1, 7),
        vehicle_speed_mps=np.asarray(speeds, dtype=np.float64)[order],
        kinds=[kinds[i] for i in order],
        roles=None if roles is None else [roles[i] for i in order],
        num_points=None,
        agent_kind=meta.agent_kind if meta is not None else None,
        agent_extent=meta.agent_extent if meta is not None else None,
        time_s=meta.time_s if meta is not None else None,
        scene_ego_id=meta.scene_ego_id if meta is not None else None,
        extra_yaml=dict(meta.extra_yaml) if meta is not None else {},
        T_world_from_agent_predicted=meta.T_world_from_agent_predicted if meta is not None else None,
    )
    agent.validate()
    return agent, dropped


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    path: Path
    split: str
    name: str
    cavs: list[int]
    frames: list[int]


def _runs_of(src: Path) -> list[_Run]:
    runs = []
    for run in find_runs(src):
        rel = run.relative_to(src).parts
        if len(rel) >= 2:
            split = rel[-2]
        elif len(rel) == 1:
            split = src.name
        else:
            split = src.parent.name
        cavs = list_cavs(run)
        runs.append(_Run(run, split, run.name, cavs, list_frames(run, cavs)))
    if not runs:
        raise ValueError(f"{src}: no runs (folders of integer-named cav folders with frame yamls)")
    return runs


@dataclass
class _KittiSource:
    """A source of KITTI frames: ``load(i)`` reads the i-th, ``entries[i]`` says where it goes."""

    entries: list[kt.FrameIndexEntry]
    load: Callable[[int], kt.KittiFrame]


def _split_of_imagesets(root: Path) -> dict[int, str]:
    image_sets = root / "ImageSets"
    out: dict[int, str] = {}
    if not image_sets.is_dir():
        return out
    lists = sorted(image_sets.glob("*.txt"), key=lambda p: (p.stem not in ("train", "val", "test"), p.stem))
    for lst in lists:
        if lst.stem == "trainval":
            continue
        for line in lst.read_text(encoding="utf-8").split():
            if line.isdigit():
                out.setdefault(int(line), lst.stem)
    return out


def _default_entries(indices: list[int], splits: dict[int, str], run: str) -> list[kt.FrameIndexEntry]:
    return [kt.FrameIndexEntry(index=i, split=splits.get(i, "train"), run=run, cav=0, frame=i) for i in indices]


def _kitti_source(root: Path) -> _KittiSource:
    split_dirs = kt.kitti_split_dirs(root)
    if not split_dirs:
        raise ValueError(f"{root}: no KITTI velodyne folder (in it, or in training/ or testing/)")
    split_dir = split_dirs[0]  # training (with labels) when there is one
    indices = kt.list_kitti_frames(split_dir)
    index_root = root if split_dir != root else root.parent
    by_index = {e.index: e for e in (kt.read_frames_index(index_root) or [])}
    defaults = _default_entries(indices, _split_of_imagesets(index_root), "kitti")
    entries = [by_index.get(e.index, e) for e in defaults]
    labelled = split_dir.name != "testing"
    return _KittiSource(entries, lambda i: kt.read_kitti_frame(split_dir, i, labels=labelled))


def _mmdet3d_source(root: Path) -> _KittiSource:
    files = _info_files(root, loose=True)
    if not files:
        raise ValueError(f"{root}: no mmdet3d info file (*infos*.pkl)")
    base = root if root.is_dir() else root.parent
    found: dict[int, tuple[dict[str, Any], Path, tuple[str, ...], str]] = {}
    # per-split files first, so a trainval file does not decide the split
    for path in sorted(files, key=lambda p: "trainval" in p.stem):
        infos = mi.read_infos(path)
        classes = mi.classes_of(infos)
        split = path.stem.split("infos_")[-1] if "infos_" in path.stem else "train"
        for entry in infos["data_list"]:
            idx = mi.sample_index(entry)
            if idx not in found:
                lidar_path = (entry.get("lidar_points") or {}).get("lidar_path", f"{idx:06d}.bin")
                found[idx] = (entry, mi.resolve_lidar_path(str(lidar_path), base, path), classes, split)
    indices = sorted(found)
    by_index = {e.index: e for e in (kt.read_frames_index(base) or [])}
    splits = {i: found[i][3] for i in indices}
    entries = [by_index.get(e.index, e) for e in _default_entries(indices, splits, "mmdet3d")]
    split_dirs = kt.kitti_split_dirs(base) if base.is_dir() else []

    def load(idx: int) -> kt.KittiFrame:
        entry, points_path, classes, _ = found[idx]
        frame = mi.frame_of_entry(entry, points_path, classes)
        if split_dirs:
            frame.meta = kt.read_meta(kt.kitti_frame_paths(split_dirs[0], idx).meta)
        return frame

    return _KittiSource(entries, load)


def _nuscenes_source(root: Path) -> _KittiSource:
    sweeps = ns.list_sweeps(root)
    if not sweeps:
        raise ValueError(f"{root}: no nuScenes .pcd.bin sweeps")
    boxes_by_name: dict[str, dict[str, Any]] = {}
    base = root if root.is_dir() else root.parent
    for info in sorted(base.glob("*.pkl")):
        try:
            infos = mi.read_infos(info)
        except ValueError:
            continue
        if (infos.get("metainfo") or {}).get("dataset") != "nuscenes":
            continue
        for entry in infos["data_list"]:
            name = Path(str((entry.get("lidar_points") or {}).get("lidar_path", ""))).name
            boxes_by_name.setdefault(name, entry)
    entries = [
        kt.FrameIndexEntry(index=i, split="train", run="nuscenes", cav=0, frame=i) for i in range(len(sweeps))
    ]

    def load(idx: int) -> kt.KittiFrame:
        sweep = ns.read_sweep(sweeps[idx])  # (N, 5)
        points = sweep[:, :4].copy()
        points[:, 3] = np.clip(points[:, 3] / 255.0, 0.0, 1.0)  # nuScenes intensity 0-255 -> [0, 1]
        calib = kt.synthetic_calib()
        entry = boxes_by_name.get(sweeps[idx].name)
        boxes, names = ns.lidar_boxes_of_entry(entry) if entry is not None else (np.zeros((0, 7)), [])
        keep = [i for i, n in enumerate(names) if n in ns.NUSCENES_TO_KITTI]
        labels = kt.labels_from_lidar_boxes(
            boxes[keep], [ns.NUSCENES_TO_KITTI[names[i]] for i in keep], calib, visibility_points=points
        )
        kinds = [ns.NUSCENES_TO_KIND.get(names[i], names[i]) for i in keep]
        meta = kt.ViewMeta(
            T_world_from_sensor=np.eye(4),
            T_world_from_agent=np.eye(4),
            ego_speed_mps=0.0,
            object_ids=np.arange(1, len(keep) + 1, dtype=np.int64),
            kinds=kinds,
            speeds_mps=np.zeros(len(keep)),
        )
        return kt.KittiFrame(index=idx, points=points, calib=calib, labels=labels, meta=meta)

    return _KittiSource(entries, load)


def _kitti_like_source(src: Path, fmt: str) -> _KittiSource:
    if fmt == "kitti":
        return _kitti_source(src)
    if fmt == "mmdet3d":
        return _mmdet3d_source(src)
    return _nuscenes_source(src)


# --------------------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------------------


def _kitti_split_dir(dst: Path) -> Path:
    return dst / "training"


def _prepare_kitti_dst(dst: Path, entries: list[kt.FrameIndexEntry]) -> None:
    """Write ``frames.yaml`` (or check that the one there describes the same conversion)."""
    existing = kt.read_frames_index(dst)
    if existing is not None and existing != entries:
        raise ValueError(
            f"{dst / kt.FRAMES_INDEX_NAME} describes another conversion; write into an empty folder"
        )
    dst.mkdir(parents=True, exist_ok=True)
    if existing is None:
        kt.write_frames_index(dst, entries)


def _finish_kitti_dst(dst: Path, entries: list[kt.FrameIndexEntry], with_infos: bool) -> None:
    """``ImageSets/<split>.txt`` for every split, and for mmdet3d ``kitti_infos_<split>.pkl``."""
    by_split: dict[str, list[int]] = {}
    for e in entries:
        by_split.setdefault(e.split, []).append(e.index)
    (dst / "ImageSets").mkdir(parents=True, exist_ok=True)
    for split, indices in sorted(by_split.items()):
        atomic_write_text(dst / "ImageSets" / f"{split}.txt", "".join(f"{i:06d}\n" for i in sorted(indices)))
    if not with_infos:
        return
    split_dir = _kitti_split_dir(dst)
    for split, indices in sorted(by_split.items()):
        infos = [
            mi.build_info_entry(kt.read_kitti_frame(split_dir, i), lidar_path=f"{i:06d}.bin") for i in sorted(indices)
        ]
        mi.write_infos(dst / mi.info_file_name(split), mi.make_infos(infos))


def _native_counts(agents: dict[int, NativeAgentFrame]) -> list[str]:
    """Kind of every vehicle of a scene frame once (the cavs through their own kind)."""
    kinds: dict[int, str] = {}
    for a in agents.values():
        for i, vid in enumerate(a.vehicle_ids.tolist()):
            kinds.setdefault(int(vid), a.kinds[i] if a.kinds is not None else ov.UNKNOWN)
    for cav, a in agents.items():
        kinds.setdefault(cav, a.agent_kind or ov.UNKNOWN)
    return list(kinds.values())


def _write_run_frame(
    dst_run: Path, agents: dict[int, NativeAgentFrame], run_cavs: list[int], dst_format: str, pcd_encoding: str
) -> dict[int, NativeAgentFrame]:
    """Write a scene frame's cavs (completed for a native destination); returns what was written."""
    native = dst_format == "native"
    written = {}
    for cav in sorted(agents):
        agent = ov.complete_agent(agents[cav], run_cavs, agents) if native else agents[cav]
        ov.write_agent_frame(dst_run, agent, sidecar=native, pcd_encoding=pcd_encoding)
        written[cav] = agent
    return written


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def convert(
    src: Path | str,
    src_format: str,
    dst: Path | str,
    dst_format: str,
    kitti_view: str = "cav",
    pcd_encoding: str = "binary_compressed",
    progress: bool = True,
) -> ConversionSummary:
    """Convert the tree at ``src`` into ``dst`` (see the module docstring for what each pair does).

    Args:
        src: source tree (dataset root, split folder or run for native/OPV2V; KITTI root or split
            folder; mmdet3d root or info file; nuScenes folder or sweep).
        src_format: one of :data:`FORMATS`.
        dst: destination root (created; a partial earlier conversion into it is resumed).
        dst_format: one of :data:`WRITABLE_FORMATS`, not ``src_format``.
        kitti_view: ``"cav"`` or ``"fused"`` for native/OPV2V -> KITTI/mmdet3d.
        pcd_encoding: PCD data encoding for native/OPV2V destinations.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: bad arguments, a destination holding another conversion, or a corrupt source
            file (the message names it); frames written before stay complete.
        FileNotFoundError: a missing source tree or file.
    """
    if src_format not in FORMATS:
        raise ValueError(f"unknown source format {src_format!r}; formats: {', '.join(FORMATS)}")
    if dst_format not in WRITABLE_FORMATS:
        raise ValueError(f"cannot write {dst_format!r}; writable formats: {', '.join(WRITABLE_FORMATS)}")
    if src_format == dst_format:
        raise ValueError(f"source and destination are both {src_format}")
    if kitti_view not in KITTI_VIEWS:
        raise ValueError(f"kitti_view must be one of {KITTI_VIEWS}, got {kitti_view!r}")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"no source {src}")
    src_abs, dst_abs = src.resolve(), dst.resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents or dst_abs in src_abs.parents:
        raise ValueError(f"destination {dst} and source {src} must not contain one another")
    summary = ConversionSummary(src_format, dst_format)
    start = time.perf_counter()
    bar = lambda total: tqdm(  # noqa: E731
        total=total, desc=f"{src_format} -> {dst_format}", unit="frame", disable=not progress
    )
    if src_format in _RUN_FORMATS:
        runs = _runs_of(src)
        if dst_format in _RUN_FORMATS:
            _runs_to_runs(runs, dst, dst_format, pcd_encoding, summary, bar)
        else:
            _runs_to_kitti(runs, dst, dst_format, kitti_view, summary, bar)
    else:
        source = _kitti_like_source(src, src_format)
        if dst_format in _RUN_FORMATS:
            _kitti_to_runs(source, dst, dst_format, pcd_encoding, summary, bar)
        else:
            _kitti_to_kitti(source, dst, dst_format, summary, bar)
    summary.seconds = time.perf_counter() - start
    return summary


def _runs_to_runs(runs: list[_Run], dst: Path, dst_format: str, pcd_encoding: str, summary, bar) -> None:
    cav_keys: set[tuple[str, str, int]] = set()
    with bar(sum(len(r.frames) for r in runs)) as progress:
        for run in runs:
            dst_run = dst / run.split / run.name
            dst_run.mkdir(parents=True, exist_ok=True)
            ov.copy_data_protocol(run.path, dst_run)
            for frame in run.frames:
                progress.update(1)
                cav_keys.update((run.split, run.name, c) for c in run.cavs)
                if all(agent_frame_paths(dst_run, c, frame).yaml.is_file() for c in run.cavs):
                    summary.frames_skipped += 1
                    continue
                agents = {c: ov.read_agent(agent_frame_paths(run.path, c, frame).yaml) for c in run.cavs}
                written = _write_run_frame(dst_run, agents, run.cavs, dst_format, pcd_encoding)
                summary.frames += 1
                summary.views += len(written)
                _add(summary.boxes, _native_counts(written))
    summary.agents = len(cav_keys)


def _runs_to_kitti(runs: list[_Run], dst: Path, dst_format: str, view: str, summary, bar) -> None:
    entries: list[kt.FrameIndexEntry] = []
    for run in sorted(runs, key=lambda r: (r.split, r.name)):
        for frame in run.frames:
            if view == "fused":
                ego = _ego_of(run)
                entries.append(kt.FrameIndexEntry(len(entries), run.split, run.name, ego, frame, "fused"))
            else:
                base = len(entries)
                entries += [
                    kt.FrameIndexEntry(base + k, run.split, run.name, c, frame, "cav") for k, c in enumerate(run.cavs)
                ]
    _prepare_kitti_dst(dst, entries)
    split_dir = _kitti_split_dir(dst)
    by_name = {(r.split, r.name): r for r in runs}
    with bar(len(entries)) as progress:
        for e in entries:
            progress.update(1)
            if kt.kitti_frame_paths(split_dir, e.index).label.is_file():
                summary.frames_skipped += 1
                continue
            run = by_name[(e.split, e.run)]
            if view == "fused":
                agents = {c: ov.read_agent(agent_frame_paths(run.path, c, e.frame).yaml) for c in run.cavs}
                frame = kitti_frame_of_fused(agents, e.cav, e.index)
            else:
                frame = kitti_frame_of_agent(ov.read_agent(agent_frame_paths(run.path, e.cav, e.frame).yaml), e.index)
            kt.write_kitti_frame(split_dir, frame)
            summary.frames += 1
            summary.views += 1
            assert frame.labels is not None
            _add(summary.boxes, frame.labels.types)
    summary.agents = len(entries)
    _finish_kitti_dst(dst, entries, with_infos=dst_format == "mmdet3d")


def _ego_of(run: _Run) -> int:
    """The scenario's ego when a sidecar names it, else OpenCOOD's choice."""
    if run.frames:
        sidecar = agent_frame_paths(run.path, run.cavs[0], run.frames[0]).sidecar
        if sidecar.is_file():
            with np.load(sidecar, allow_pickle=False) as npz:
                ego = int(npz["scene_ego_id"])
            if ego in run.cavs:
                return ego
    return ov.opencood_ego_id(run.cavs)


def _kitti_to_runs(source: _KittiSource, dst: Path, dst_format: str, pcd_encoding: str, summary, bar) -> None:
    cavs_of_run: dict[tuple[str, str], set[int]] = {}
    for e in source.entries:
        cavs_of_run.setdefault((e.split, e.run), set()).add(e.cav)
    with bar(len(source.entries)) as progress:
        for e in source.entries:
            progress.update(1)
            dst_run = dst / e.split / e.run
            if agent_frame_paths(dst_run, e.cav, e.frame).yaml.is_file():
                summary.frames_skipped += 1
                continue
            agent, dropped = agent_from_kitti_frame(source.load(e.index), e.cav, e.frame)
            _write_run_frame(dst_run, {e.cav: agent}, sorted(cavs_of_run[(e.split, e.run)]), dst_format, pcd_encoding)
            summary.frames += 1
            summary.views += 1
            _add(summary.boxes, agent.kinds or [])  # the vehicles this view holds
            for k, n in dropped.items():
                summary.dropped[k] = summary.dropped.get(k, 0) + n
    summary.agents = sum(len(c) for c in cavs_of_run.values())


def _kitti_to_kitti(source: _KittiSource, dst: Path, dst_format: str, summary, bar) -> None:
    _prepare_kitti_dst(dst, source.entries)
    split_dir = _kitti_split_dir(dst)
    with bar(len(source.entries)) as progress:
        for e in source.entries:
            progress.update(1)
            if kt.kitti_frame_paths(split_dir, e.index).label.is_file():
                summary.frames_skipped += 1
                continue
            frame = source.load(e.index)
            kt.write_kitti_frame(split_dir, frame)
            summary.frames += 1
            summary.views += 1
            if frame.labels is not None:
                _add(summary.boxes, frame.labels.types[frame.labels.care])
    summary.agents = len(source.entries)
    _finish_kitti_dst(dst, source.entries, with_infos=dst_format == "mmdet3d")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def check_tree(path: Path | str, fmt: str | None = None) -> list[Problem]:
    """Every problem of a tree, each with the file it is in (empty list: the tree is fine).

    Looks for missing files, incomplete frames and leftover temporary files of an interrupted
    write, unreadable, truncated or corrupt point clouds, NaN/inf points, bad yaml, calibration
    or label files, sidecars and info files that do not match their frame, and boxes with a
    non-positive size.

    Args:
        path: the tree.
        fmt: its format, or None to detect it (:func:`detect_format`).
    """
    root = Path(path)
    if not root.exists():
        return [Problem(root, "no such file or folder")]
    if fmt is None:
        try:
            fmt = detect_format(root)
        except ValueError as err:
            return [Problem(root, str(err))]
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if fmt in _RUN_FORMATS:
        problems = _check_runs(root, native=fmt == "native")
    elif fmt == "kitti":
        problems = _check_kitti(root)
    elif fmt == "mmdet3d":
        problems = _check_mmdet3d(root)
    else:
        problems = _check_nuscenes(root)
    if root.is_dir():
        problems += [
            Problem(p, "leftover temporary file of an interrupted write (safe to delete)")
            for p in sorted(root.rglob(f"*{TEMP_MARKER}*"))
            if is_temporary(p)
        ]
    return problems


def _vector_problem(value: Any, n: int, what: str) -> str | None:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return f"{what} must be {n} numbers, got {value!r}"
    if arr.shape != (n,):
        return f"{what} must be {n} numbers, got {value!r}"
    if not np.all(np.isfinite(arr)):
        return f"{what} holds NaN or infinity"
    return None


def _yaml_problems(path: Path) -> tuple[list[str], set[int]]:
    """Problems of a frame yaml, and the vehicle ids it lists."""
    try:
        data = load_yaml(path)
    except yaml.YAMLError as err:
        return [f"bad yaml ({str(err).splitlines()[0]})"], set()
    if not isinstance(data, dict):
        return ["bad yaml: not a mapping"], set()
    problems = []
    if "lidar_pose" not in data:
        problems.append("no lidar_pose")
    for key in ("lidar_pose", "true_ego_pos", "predicted_ego_pos"):
        if key in data and (msg := _vector_problem(data[key], 6, key)):
            problems.append(msg)
    if "ego_speed" in data and (msg := _vector_problem([data["ego_speed"]], 1, "ego_speed")):
        problems.append(msg)
    vehicles = data.get("vehicles") or {}
    ids: set[int] = set()
    if not isinstance(vehicles, dict):
        return [*problems, "vehicles must be a mapping id -> fields"], ids
    for vid, fields in vehicles.items():
        try:
            ids.add(int(vid))
        except (TypeError, ValueError):
            problems.append(f"vehicle id {vid!r} is not an integer")
            continue
        if not isinstance(fields, dict):
            problems.append(f"vehicle {vid}: fields must be a mapping")
            continue
        for key in ("location", "angle", "extent"):
            if key not in fields:
                problems.append(f"vehicle {vid}: no {key}")
            elif msg := _vector_problem(fields[key], 3, f"vehicle {vid} {key}"):
                problems.append(msg)
        if "center" in fields and (msg := _vector_problem(fields["center"], 3, f"vehicle {vid} center")):
            problems.append(msg)
        if "extent" in fields and _vector_problem(fields["extent"], 3, "") is None:
            extent = np.asarray(fields["extent"], dtype=np.float64)
            if np.any(extent <= 0):
                problems.append(f"vehicle {vid}: box with non-positive size (extent {extent.tolist()})")
    return problems, ids


def _sidecar_problems(path: Path, n_points: int | None, yaml_ids: set[int]) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return [f"corrupt or truncated sidecar ({err})"]
    missing = sorted(set(SIDECAR_KEYS) - set(data))
    if missing:
        return [f"sidecar lacks {', '.join(missing)}"]
    problems = []
    if int(data["format_version"]) != SIDECAR_FORMAT:
        problems.append(f"sidecar format {int(data['format_version'])}, expected {SIDECAR_FORMAT}")
    if n_points is not None:
        for key in ("intensity", "instance_id", "semantic"):
            if data[key].shape != (n_points,):
                problems.append(f"{key} has shape {data[key].shape}, the pcd has {n_points} points")
    if not np.all(np.isfinite(data["intensity"])):
        problems.append("intensity holds NaN or infinity")
    m = len(data["vehicle_ids"])
    for key in ("num_points", "kinds", "roles"):
        if data[key].shape != (m,):
            problems.append(f"{key} has shape {data[key].shape}, vehicle_ids has {m}")
    absent = sorted(yaml_ids - set(data["vehicle_ids"].astype(np.int64).tolist()))
    if absent:
        problems.append(f"no entry for vehicles {absent} of the yaml")
    return problems


def _manifest_problems(run: Path) -> list[Problem]:
    path = run / MANIFEST_NAME
    try:
        manifest = read_manifest(run)
        manifest.validate()
    except yaml.YAMLError as err:
        return [Problem(path, f"bad yaml ({str(err).splitlines()[0]})")]
    except (ValueError, KeyError, TypeError) as err:
        return [Problem(path, f"bad manifest ({err})")]
    try:
        on_disk = recount_run(run, manifest.cavs).frames_written
    except (ValueError, FileNotFoundError):
        return []  # a damaged frame file: reported with that file
    if manifest.counts.frames_written != on_disk:
        return [Problem(path, f"counts.frames_written is {manifest.counts.frames_written}, the run has {on_disk}")]
    return []


def _check_runs(root: Path, native: bool) -> list[Problem]:
    runs = _candidate_runs(root) if root.is_dir() else []
    if not runs:
        return [Problem(root, "no run folders (integer-named cav folders holding frame files)")]
    problems: list[Problem] = []
    for run in runs:
        if (run / MANIFEST_NAME).is_file():
            problems += _manifest_problems(run)
        try:
            ov.read_data_protocol(run)
        except ValueError as err:
            problems.append(Problem(run / ov.DATA_PROTOCOL_NAME, str(err).split(": ", 1)[-1]))
        cav_dirs = sorted((p for p in run.iterdir() if p.is_dir() and _is_cav_name(p.name)), key=lambda p: int(p.name))
        frames_of: dict[Path, set[int]] = {}
        for cav_dir in cav_dirs:
            stems: dict[str, set[str]] = {}
            for p in cav_dir.iterdir():
                if p.is_file() and not is_temporary(p) and p.stem.isdigit():
                    stems.setdefault(p.stem, set()).add(p.suffix)
            frames_of[cav_dir] = {int(s) for s, sfx in stems.items() if ".yaml" in sfx}
            for stem, suffixes in sorted(stems.items()):
                problems += _check_cav_frame(cav_dir, stem, suffixes, native)
        all_frames = set().union(*frames_of.values()) if frames_of else set()
        for cav_dir, frames in frames_of.items():
            for frame in sorted(all_frames - frames):
                problems.append(
                    Problem(cav_dir / f"{frame:06d}.yaml", "missing: other cavs of the run have this frame")
                )
    return problems


def _check_cav_frame(cav_dir: Path, stem: str, suffixes: set[str], native: bool) -> list[Problem]:
    yaml_path, pcd_path, npz_path = (cav_dir / f"{stem}{s}" for s in (".yaml", ".pcd", ".npz"))
    if ".yaml" not in suffixes:
        if ".pcd" in suffixes or ".npz" in suffixes:
            return [Problem(yaml_path, "missing: incomplete frame (the pcd or sidecar has no yaml; interrupted write?)")]
        return []
    problems = []
    yaml_msgs, ids = _yaml_problems(yaml_path)
    problems += [Problem(yaml_path, m) for m in yaml_msgs]
    n_points = None
    if ".pcd" not in suffixes:
        problems.append(Problem(pcd_path, "missing point cloud"))
    else:
        pcd_msgs = ov.pcd_problems(pcd_path)
        problems += [Problem(pcd_path, m) for m in pcd_msgs]
        if not pcd_msgs:
            n_points = ov.read_pcd_header(pcd_path).points
    if ".npz" in suffixes:
        problems += [Problem(npz_path, m) for m in _sidecar_problems(npz_path, n_points, ids)]
    elif native:
        problems.append(Problem(npz_path, "missing sidecar (native trees have one per cav frame)"))
    return problems


def _check_kitti(root: Path, index_root: Path | None = None) -> list[Problem]:
    try:
        split_dirs = kt.kitti_split_dirs(root)
    except FileNotFoundError as err:
        return [Problem(root, str(err))]
    if not split_dirs:
        return [Problem(root / "training" / "velodyne", "missing: no velodyne folder (nor at the top)")]
    problems: list[Problem] = []
    known: set[int] = set()
    for split_dir in split_dirs:
        labelled = split_dir.name != "testing"
        folders = {"velodyne": ".bin", "calib": ".txt", "label_2": ".txt", kt.META_DIR: ".yaml"}
        stems: dict[str, set[int]] = {}
        for folder, suffix in folders.items():
            d = split_dir / folder
            stems[folder] = set()
            if d.is_dir():
                stems[folder] = {int(p.stem) for p in d.glob(f"*{suffix}") if p.stem.isdigit() and not is_temporary(p)}
        indices = set().union(*stems.values())
        known |= stems["velodyne"]
        for idx in sorted(indices):
            paths = kt.kitti_frame_paths(split_dir, idx)
            unfinished = " (incomplete frame: interrupted write?)" if labelled and idx not in stems["label_2"] else ""
            if idx not in stems["velodyne"]:
                problems.append(Problem(paths.velodyne, "missing velodyne file" + unfinished))
            else:
                problems += [Problem(paths.velodyne, m) for m in kt.velodyne_problems(paths.velodyne)]
            if idx not in stems["calib"]:
                problems.append(Problem(paths.calib, "missing calibration file" + unfinished))
            else:
                problems += [Problem(paths.calib, m) for m in kt.calib_problems(paths.calib)]
            n_labels = None
            if idx in stems["label_2"]:
                msgs = kt.label_problems(paths.label)
                problems += [Problem(paths.label, m) for m in msgs]
                if not msgs:
                    n_labels = len(kt.read_labels(paths.label))
            elif labelled:
                problems.append(Problem(paths.label, "missing label file (incomplete frame: interrupted write?)"))
            if idx in stems[kt.META_DIR]:
                try:
                    meta = kt.read_meta(paths.meta)
                    if meta is not None and n_labels is not None and len(meta.object_ids) != n_labels:
                        problems.append(
                            Problem(paths.meta, f"{len(meta.object_ids)} objects for {n_labels} label lines")
                        )
                except ValueError as err:
                    problems.append(Problem(paths.meta, str(err).split(": ", 1)[-1]))
    index_root = index_root or (root if split_dirs[0] == root else split_dirs[0].parent)
    try:
        entries = kt.read_frames_index(index_root)
        for e in entries or []:
            if e.index not in known:
                problems.append(
                    Problem(index_root / kt.FRAMES_INDEX_NAME, f"index {e.index} has no velodyne file (conversion not finished?)")
                )
    except ValueError as err:
        problems.append(Problem(index_root / kt.FRAMES_INDEX_NAME, str(err).split(": ", 1)[-1]))
    image_sets = index_root / "ImageSets"
    if image_sets.is_dir():
        for lst in sorted(image_sets.glob("*.txt")):
            words = lst.read_text(encoding="utf-8", errors="replace").split()
            absent = [w for w in words if not w.isdigit() or int(w) not in known]
            if absent:
                problems.append(Problem(lst, f"{len(absent)} entries without a velodyne file, e.g. {absent[0]}"))
    return problems


def _check_mmdet3d(root: Path) -> list[Problem]:
    files = _info_files(root, loose=True)
    if not files:
        return [Problem(root, "missing: no mmdet3d info file (*infos*.pkl)")]
    base = root if root.is_dir() else root.parent
    problems: list[Problem] = []
    checked: set[Path] = set()
    for path in files:
        try:
            infos = mi.read_infos(path)
        except ValueError as err:
            problems.append(Problem(path, str(err).split(": ", 1)[-1]))
            continue
        for pos, entry in enumerate(infos["data_list"]):
            problems += [Problem(path, m) for m in mi.entry_problems(entry, pos)]
            lidar = entry.get("lidar_points") if isinstance(entry, dict) else None
            if not isinstance(lidar, dict) or "lidar_path" not in lidar:
                continue
            points = mi.resolve_lidar_path(str(lidar["lidar_path"]), base, path)
            if points in checked:
                continue
            checked.add(points)
            if not points.is_file():
                problems.append(Problem(points, f"missing point file named by {path.name} data_list[{pos}]"))
            else:
                dim = int(lidar.get("num_pts_feats", 4))
                problems += [Problem(points, m) for m in kt.velodyne_problems(points, dim)]
    if base.is_dir() and kt.kitti_split_dirs(base):
        problems += [p for p in _check_kitti(base) if p not in problems]
    return problems


def _check_nuscenes(root: Path) -> list[Problem]:
    sweeps = ns.list_sweeps(root)
    if not sweeps:
        return [Problem(root, "missing: no .pcd.bin sweeps")]
    problems = [Problem(s, m) for s in sweeps for m in ns.sweep_problems(s)]
    base = root if root.is_dir() else root.parent
    for info in sorted(base.glob("*.pkl")):
        try:
            mi.read_infos(info)
        except ValueError as err:
            problems.append(Problem(info, str(err).split(": ", 1)[-1]))
    return problems

