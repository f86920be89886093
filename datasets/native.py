"""The native on-disk dataset format: OPV2V's layout, so OpenCOOD's tools read it as is.

Layout (one folder per connected vehicle, one file triple per frame)::

    DIR/<split>/<run_name>/manifest.yaml             generation settings and counts (ours)
    DIR/<split>/<run_name>/<cav_id>/<frame:06d>.pcd  LiDAR sweep, OPV2V's PCD
    DIR/<split>/<run_name>/<cav_id>/<frame:06d>.npz  sidecar: what OPV2V's files cannot hold (ours)
    DIR/<split>/<run_name>/<cav_id>/<frame:06d>.yaml OPV2V's per-frame yaml, written last

What the OPV2V files hold, in CARLA's left-handed world (x forward, y right, z up, degrees):

- ``<frame>.yaml``: ``lidar_pose`` and ``true_ego_pos`` = ``[x, y, z, roll, yaw, pitch]`` of the
  sensor and of the vehicle (our bottom-centre agent frame, where CARLA puts a vehicle's origin);
  ``predicted_ego_pos`` (= ``true_ego_pos``: the simulator has no GNSS error); ``ego_speed`` in
  km/h; ``vehicles``: every *other* vehicle of the frame (the vehicle itself is not listed, as in
  OPV2V) as ``{id: {location, center, angle, extent, speed}}``, where ``location`` is the actor
  origin (our bottom centre), ``center`` the offset from it to the box centre (we write
  ``[0, 0, dz/2]``), ``angle`` ``[roll, yaw, pitch]``, ``extent`` half sizes and ``speed`` km/h.
  OpenCOOD places a box at ``location + center`` (``x_to_world`` of that pose), and so does
  :func:`read_agent_frame`, which accepts any split between the two.
- ``<frame>.pcd``: fields ``x y z rgb``, points in the sensor frame *as CARLA gives them*, i.e.
  left-handed (our y negated), so that OpenCOOD's ``x_to_world(lidar_pose) @ p`` lands them in
  CARLA's world; intensity in the red channel (8 bit), green and blue zero. Written
  binary-compressed by Open3D; OpenCOOD's ``pcd_to_np`` (``open3d.io.read_point_cloud``, then
  ``colors[:, 0]``) reads it.

Note one difference from the OPV2V release: its ``vehicles`` holds only the vehicles that at least
one LiDAR point of that agent hit, while ours lists every other vehicle and records how many points
hit each one in the sidecar (``num_points``); filter on ``num_points > 0`` to get OPV2V's set.

The sidecar ``<frame>.npz`` (numpy arrays, no pickles) holds full-precision intensity, per-point
``instance_id`` and ``semantic``, the visibility ground truth and the vehicles' kinds and roles;
see :data:`SIDECAR_KEYS`. Reading works without it (plain OPV2V data): the intensity is then the
8-bit red channel / 255 and the per-point labels are None.

Every file is written atomically (:mod:`datasets.io`), and a cav's yaml after its pcd and sidecar, so
a yaml on disk means that cav's frame is complete; a frame is complete when every cav's yaml exists
(:func:`frame_complete`). All outputs are byte-identical for the same input.

Inside the stack everything is right-handed (docs/architecture.md); the left-handed conversion
happens only through ``sim.geometry``'s CARLA helpers and :data:`sim.geometry.S_MIRROR_Y`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import yaml

from datasets.io import atomic_path, atomic_write_text, write_npz_deterministic
from sim.geometry import (
    S_MIRROR_Y,
    T_from_carla_pose,
    boxes_from_carla,
    boxes_to_carla,
    carla_pose_from_T,
    transform_points,
)
from sim.types import LidarConfig, SceneFrame

__all__ = [
    "GENERATOR_VERSION",
    "KMH_PER_MPS",
    "MANIFEST_NAME",
    "PCD_ENCODINGS",
    "SIDECAR_KEYS",
    "Manifest",
    "ManifestCounts",
    "NativeAgentFrame",
    "agent_frame_paths",
    "counts_of_scene_frame",
    "dump_yaml",
    "find_runs",
    "frame_complete",
    "is_run_dir",
    "lidar_dict",
    "list_cavs",
    "list_frames",
    "list_runs",
    "list_splits",
    "load_yaml",
    "read_agent_frame",
    "read_manifest",
    "read_pcd",
    "recount_run",
    "run_path",
    "start_run",
    "write_manifest",
    "write_pcd",
    "write_scene_frame",
]

GENERATOR_VERSION = "1"
"""Version of what the writer puts on disk; bump it whenever the content of a frame changes, so a
resumed run never mixes frames of two versions (see :func:`write_manifest`)."""

KMH_PER_MPS = 3.6
"""OPV2V writes speeds in km/h (OpenCDA's ``get_speed``); the stack uses m/s."""

MANIFEST_NAME = "manifest.yaml"
SIDECAR_FORMAT = 1

SIDECAR_KEYS = {
    "format_version": "() int64, version of this sidecar layout",
    "time_s": "() float64, simulation time of the frame",
    "scene_ego_id": "() int64, the scenario's ego vehicle",
    "intensity": "(N,) float32, full-precision intensity, aligned with the pcd's points",
    "instance_id": "(N,) int32, id of the vehicle each point hit, -1 for none",
    "semantic": "(N,) uint8, sim.types.Semantic class of each point",
    "vehicle_ids": "(M,) int64, the yaml's vehicles in increasing id order",
    "num_points": "(M,) int32, points of this cav's scan on each vehicle (visibility)",
    "kinds": "(M,) str, sim.types.ActorKind value of each vehicle",
    "roles": "(M,) str, sim.types.Role value of each vehicle",
    "agent_kind": "() str, kind of the cav itself",
    "agent_extent": "(3,) float64, full box size of the cav itself (dx, dy, dz)",
}
"""Arrays of the sidecar ``<frame>.npz`` and what they mean."""

_YAML_RE = re.compile(r"^(\d+)\.yaml$")
_CAV_RE = re.compile(r"^-?\d+$")
_KNOWN_YAML_KEYS = ("ego_speed", "lidar_pose", "predicted_ego_pos", "true_ego_pos", "vehicles")


# --------------------------------------------------------------------------------------------------
# YAML: fixed formatting on write, OpenCOOD's float rule on read
# --------------------------------------------------------------------------------------------------


class _Opv2vLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that also reads ``1e-05``-style floats as floats, like OpenCOOD's ``load_yaml``
    (PyYAML's YAML 1.1 rule wants a dot in the mantissa). A subclass, so PyYAML's own loaders are
    left untouched."""


_Opv2vLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path: Path | str) -> Any:
    """Load a yaml file safely (no object construction), with OpenCOOD's float rule."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Opv2vLoader)  # a SafeLoader subclass: no object construction


def dump_yaml(data: Any) -> str:
    """Deterministic yaml text: keys sorted, block style, floats as Python's shortest round-trip repr.

    Only plain Python types are accepted (``yaml.SafeDumper`` raises on numpy scalars), so no numpy
    tags can slip in. Floats use standard notation (``1.0e-05``), which OpenCOOD's loader reads.
    """
    return yaml.dump(
        data,
        Dumper=yaml.SafeDumper,  # the pure-Python dumper: same text wherever the C one is missing
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=False,
        width=110,
    )


def _floats(values: np.ndarray, what: str) -> list[float]:
    """Plain Python floats from an array; NaN or infinity is an error (yaml would write ``.nan``)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} is not finite: {arr.tolist()}")
    return [float(v) for v in arr]


def _pose6(value: Any, what: str, path: Path) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64) if value is not None else np.zeros(0)
    if arr.shape != (6,):
        raise ValueError(f"{path}: {what} must be 6 numbers [x, y, z, roll, yaw, pitch], got {value!r}")
    return arr


# --------------------------------------------------------------------------------------------------
# PCD
# --------------------------------------------------------------------------------------------------


PCD_ENCODINGS = ("binary_compressed", "binary", "ascii")
"""Data encodings :func:`write_pcd` can write (the PCD ``DATA`` line); Open3D reads all three."""


def write_pcd(path: Path | str, xyz: np.ndarray, red: np.ndarray, encoding: str = "binary_compressed") -> Path:
    """Write OPV2V's PCD (``x y z rgb``, binary LZF-compressed by default) atomically.

    Args:
        path: destination ``.pcd``.
        xyz: (N, 3) coordinates, stored as float32.
        red: (N,) red channel in [0, 1], stored as ``round(255 * red)`` (clipped); green and blue 0.
        encoding: one of :data:`PCD_ENCODINGS` (``"ascii"`` is what OpenCDA, which recorded OPV2V, writes).

    Open3D's tensor and legacy writers give the same bytes here (checked); the tensor one takes the
    float32 positions and uint8 colours without copies. Open3D refuses to write an empty cloud, so
    for N = 0 the (ASCII) header is written directly; Open3D reads it back as zero points.
    """
    if encoding not in PCD_ENCODINGS:
        raise ValueError(f"PCD encoding must be one of {PCD_ENCODINGS}, got {encoding!r}")
    xyz = np.ascontiguousarray(xyz, dtype=np.float32).reshape(-1, 3)
    red = np.asarray(red, dtype=np.float32).reshape(-1)
    if len(red) != len(xyz):
        raise ValueError(f"red has {len(red)} values for {len(xyz)} points")
    if len(xyz) == 0:
        return atomic_write_text(path, _EMPTY_PCD)
    colors = np.zeros((len(xyz), 3), dtype=np.uint8)
    colors[:, 0] = np.round(np.clip(red, 0.0, 1.0) * 255.0).astype(np.uint8)
    pcd = o3d.t.geometry.PointCloud(o3d.core.Tensor(xyz))
    pcd.point.colors = o3d.core.Tensor(colors)
    with atomic_path(path) as tmp:
        ascii_, compressed = encoding == "ascii", encoding == "binary_compressed"
        if not o3d.t.io.write_point_cloud(str(tmp), pcd, write_ascii=ascii_, compressed=compressed):
            raise OSError(f"Open3D could not write {path}")
    return Path(path)


_EMPTY_PCD = (
    "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\n"
    "TYPE F F F U\nCOUNT 1 1 1 1\nWIDTH 0\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 0\nDATA ascii\n"
)


def read_pcd(path: Path | str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PCD the way OpenCOOD does (``open3d.io.read_point_cloud``).

    Returns:
        xyz: (N, 3) float32 coordinates as stored.
        red: (N,) float32 red channel in [0, 1], or None when the file has no colour.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no point cloud file {path}")
    if _pcd_point_count(path) == 0:  # Open3D reads it too, but warns that it "failed"
        return np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.float32)
    pcd = o3d.io.read_point_cloud(str(path), format="pcd")
    xyz = np.asarray(pcd.points, dtype=np.float32).reshape(-1, 3)
    if len(xyz) == 0:
        raise ValueError(f"Open3D could not read any point from {path}")
    red = np.asarray(pcd.colors, dtype=np.float32)[:, 0] if pcd.has_colors() else None
    return xyz, red


def _pcd_point_count(path: Path) -> int:
    """``POINTS`` from a PCD header, without reading the data."""
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("ascii", errors="replace").strip()
            if line.startswith("POINTS"):
                return int(line.split()[1])
            if line.startswith("DATA"):
                break
    raise ValueError(f"{path}: PCD header has no POINTS line")


# --------------------------------------------------------------------------------------------------
# Paths and listings
# --------------------------------------------------------------------------------------------------


def run_path(root: Path | str, split: str, run_name: str) -> Path:
    """``root/split/run_name``; names must be single, non-hidden path components."""
    for what, name in (("split", split), ("run_name", run_name)):
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{what} must be a plain folder name, got {name!r}")
    return Path(root) / split / run_name


@dataclass(frozen=True)
class AgentFramePaths:
    """The three files of one cav at one frame (``<frame:06d>.yaml`` / ``.pcd`` / ``.npz``)."""

    yaml: Path
    pcd: Path
    sidecar: Path


def agent_frame_paths(run: Path | str, cav_id: int, frame: int) -> AgentFramePaths:
    """Paths of ``run/<cav_id>/<frame:06d>.{yaml,pcd,npz}`` (existing or not)."""
    if frame < 0:
        raise ValueError(f"frame index must be >= 0, got {frame}")
    stem = Path(run) / str(int(cav_id)) / f"{int(frame):06d}"
    return AgentFramePaths(stem.with_suffix(".yaml"), stem.with_suffix(".pcd"), stem.with_suffix(".npz"))


def list_cavs(run: Path | str) -> list[int]:
    """Ids of the cav folders of a run (integer-named sub-folders), increasing."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder {run}")
    return sorted(int(p.name) for p in run.iterdir() if p.is_dir() and _CAV_RE.match(p.name))


def _frames_of_cav(cav_dir: Path) -> set[int]:
    if not cav_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in cav_dir.iterdir() if (m := _YAML_RE.match(p.name))}


def list_frames(run: Path | str, cav_ids: list[int] | None = None) -> list[int]:
    """Frames whose yaml exists for every cav in ``cav_ids`` (default: every cav folder), increasing.

    These are the complete frames (see :func:`frame_complete`).
    """
    cavs = list_cavs(run) if cav_ids is None else list(cav_ids)
    if not cavs:
        return []
    common = _frames_of_cav(Path(run) / str(cavs[0]))
    for cav in cavs[1:]:
        common &= _frames_of_cav(Path(run) / str(cav))
    return sorted(common)


def is_run_dir(path: Path | str) -> bool:
    """Whether ``path`` looks like a run: a folder with an integer-named cav folder holding a yaml."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(
        p.is_dir() and _CAV_RE.match(p.name) and any(_YAML_RE.match(q.name) for q in p.iterdir())
        for p in path.iterdir()
    )


def list_runs(root: Path | str, split: str) -> list[str]:
    """Names of the runs of ``root/split``, sorted (OpenCOOD's scenario order)."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no split folder {split_dir}")
    return sorted(p.name for p in split_dir.iterdir() if is_run_dir(p))


def list_splits(root: Path | str) -> list[str]:
    """Names of the split folders of a dataset root that hold at least one run, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(is_run_dir(q) for q in p.iterdir()))


def find_runs(path: Path | str) -> list[Path]:
    """Run folders at or below ``path``: itself if it is a run, else its runs (a split folder, or an
    OPV2V-style folder of scenarios), else the runs of its splits (a dataset root). Sorted."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no folder {path}")
    if is_run_dir(path):
        return [path]
    runs = sorted(p for p in path.iterdir() if is_run_dir(p))
    if runs:
        return runs
    return sorted(q for p in path.iterdir() if p.is_dir() for q in p.iterdir() if is_run_dir(q))


def frame_complete(root: Path | str, split: str, run_name: str, cav_ids: list[int], frame_idx: int) -> bool:
    """True when every cav in ``cav_ids`` has its yaml (written last) for ``frame_idx``."""
    run = run_path(root, split, run_name)
    return all(agent_frame_paths(run, cav, frame_idx).yaml.is_file() for cav in cav_ids)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _check_scene_frame(frame: SceneFrame) -> None:
    ids = [a.id for a in frame.agents]
    if ids != sorted(set(ids)):
        raise ValueError("SceneFrame.agents must have unique ids in increasing order")
    if frame.frame < 0:
        raise ValueError(f"frame index must be >= 0, got {frame.frame}")
    for cav_id, scan in frame.scans.items():
        if cav_id not in ids:
            raise ValueError(f"scan of agent {cav_id}, which is not in the frame's agents")
        n = len(scan.points)
        if scan.points.shape != (n, 4) or scan.points.dtype != np.float32:
            raise ValueError(f"scan {cav_id}: points must be (N, 4) float32, got {scan.points.shape}")
        if scan.instance_id.shape != (n,) or scan.semantic.shape != (n,):
            raise ValueError(f"scan {cav_id}: instance_id and semantic must have shape ({n},)")
        if not np.all(np.isfinite(scan.points)):
            raise ValueError(f"scan {cav_id}: points contain NaN or infinity")
        counts = frame.points_in_box.get(cav_id)
        if counts is None or np.shape(counts) != (len(ids),):
            raise ValueError(f"points_in_box[{cav_id}] must have shape ({len(ids)},)")


def _agent_yaml(frame: SceneFrame, cav_id: int) -> dict[str, Any]:
    """OPV2V's yaml content for one cav (plain Python types only)."""
    agent = frame.agent(cav_id)
    scan = frame.scans[cav_id]
    others = [a for a in frame.agents if a.id != cav_id]
    vehicles: dict[int, dict[str, Any]] = {}
    if others:
        boxes = np.stack([a.box for a in others])  # (M, 7) world, ours
        centre_carla, angle, extent = boxes_to_carla(boxes)  # (M, 3) each, CARLA frame
        center = np.zeros_like(centre_carla)
        center[:, 2] = extent[:, 2]  # box centre sits dz/2 above the bottom-centre origin
        location = centre_carla - center
        for i, other in enumerate(others):
            vehicles[int(other.id)] = {
                "angle": _floats(angle[i], f"angle of vehicle {other.id}"),
                "center": _floats(center[i], f"center of vehicle {other.id}"),
                "extent": _floats(extent[i], f"extent of vehicle {other.id}"),
                "location": _floats(location[i], f"location of vehicle {other.id}"),
                "speed": float(other.speed * KMH_PER_MPS),
            }
    ego_pos = _floats(carla_pose_from_T(agent.T_world_from_agent), f"pose of agent {cav_id}")
    return {
        "ego_speed": float(agent.speed * KMH_PER_MPS),
        "lidar_pose": _floats(carla_pose_from_T(scan.T_world_from_sensor), f"sensor pose of {cav_id}"),
        "predicted_ego_pos": list(ego_pos),
        "true_ego_pos": ego_pos,
        "vehicles": vehicles,
    }


def _agent_sidecar(frame: SceneFrame, cav_id: int) -> dict[str, np.ndarray]:
    agent = frame.agent(cav_id)
    scan = frame.scans[cav_id]
    keep = [i for i, a in enumerate(frame.agents) if a.id != cav_id]
    others = [frame.agents[i] for i in keep]
    counts = np.asarray(frame.points_in_box[cav_id]).astype(np.int32)[keep]
    width = max([len(a.kind.value) for a in others] + [len(a.role.value) for a in others] + [1])
    return {
        "format_version": np.array(SIDECAR_FORMAT, dtype=np.int64),
        "time_s": np.array(frame.time_s, dtype=np.float64),
        "scene_ego_id": np.array(frame.ego_id, dtype=np.int64),
        "intensity": scan.points[:, 3].astype(np.float32),
        "instance_id": scan.instance_id.astype(np.int32),
        "semantic": scan.semantic.astype(np.uint8),
        "vehicle_ids": np.array([a.id for a in others], dtype=np.int64),
        "num_points": counts,
        "kinds": np.array([a.kind.value for a in others], dtype=f"<U{width}"),
        "roles": np.array([a.role.value for a in others], dtype=f"<U{width}"),
        "agent_kind": np.array(agent.kind.value),
        "agent_extent": np.asarray(agent.extent, dtype=np.float64).reshape(3),
    }


def write_scene_frame(root: Path | str, split: str, run_name: str, frame: SceneFrame) -> list[Path]:
    """Write one frame for every connected vehicle that has a scan in ``frame``.

    For each cav (increasing id) the pcd, then the sidecar, then the yaml are written, each
    atomically; a cav's yaml therefore exists only if its other two files are complete. Writing a
    frame again first removes the cav's yaml, then replaces the files (with the same bytes for the
    same frame).

    Args:
        root: dataset root; ``root/split/run_name/<cav_id>/`` folders are created as needed.
        split: e.g. ``"train"``.
        run_name: the run (OPV2V's scenario folder).
        frame: the simulator's frame; ``frame.frame`` names the files.

    Returns:
        The paths written, in writing order.

    Raises:
        ValueError: inconsistent frame (shapes, ids, non-finite values).
    """
    _check_scene_frame(frame)
    run = run_path(root, split, run_name)
    # every yaml is formatted before any file is touched, so bad values leave the disk unchanged
    yaml_texts = {cav_id: dump_yaml(_agent_yaml(frame, cav_id)) for cav_id in sorted(frame.scans)}
    written: list[Path] = []
    for cav_id, yaml_text in yaml_texts.items():
        scan = frame.scans[cav_id]
        paths = agent_frame_paths(run, cav_id, frame.frame)
        paths.yaml.parent.mkdir(parents=True, exist_ok=True)
        # a rewrite first withdraws the yaml: it must never vouch for a pcd it was not written with
        paths.yaml.unlink(missing_ok=True)
        points_carla = transform_points(S_MIRROR_Y, scan.points)  # (N, 4) CARLA's left-handed sensor frame
        written.append(write_pcd(paths.pcd, points_carla[:, :3], points_carla[:, 3]))
        written.append(write_npz_deterministic(paths.sidecar, _agent_sidecar(frame, cav_id)))
        written.append(atomic_write_text(paths.yaml, yaml_text))
    return written


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class NativeAgentFrame:
    """What one cav folder holds for one frame, in the stack's right-handed conventions.

    Attributes:
        cav_id: the connected vehicle (folder name).
        frame: frame index (file name).
        points: (N, 4) float32 x, y, z, intensity in the sensor frame (right-handed). Intensity at
            full precision from the sidecar if there is one, else the pcd's 8-bit red channel / 255.
        instance_id: (N,) int32 actor hit by each point (-1 none), or None without a sidecar.
        semantic: (N,) uint8 :class:`sim.types.Semantic` class of each point, or None.
        T_world_from_sensor: (4, 4) float64, from ``lidar_pose``.
        T_world_from_agent: (4, 4) float64, from ``true_ego_pos`` (the vehicle's bottom centre; for
            OPV2V data the CARLA actor origin, which is close to it).
        ego_speed_mps: the cav's speed, m/s.
        vehicle_ids: (M,) int64 ids of the other vehicles listed in the yaml, increasing.
        boxes_world: (M, 7) float64 boxes of those vehicles, mmdet3d convention, world frame.
        vehicle_speed_mps: (M,) float64 their speeds, m/s.
        kinds: their :class:`sim.types.ActorKind` values, or None without a sidecar.
        roles: their :class:`sim.types.Role` values, or None without a sidecar.
        num_points: (M,) int32 points of *this* cav's scan on each vehicle, or None without a
            sidecar (in OPV2V data every listed vehicle has at least one).
        agent_kind: kind of the cav itself, or None.
        agent_extent: (3,) float64 full size of the cav's own box, or None.
        time_s: simulation time, or None.
        scene_ego_id: the scenario's ego vehicle, or None.
        extra_yaml: yaml keys this reader does not interpret (cameras, ``plan_trajectory``, ...).
        T_world_from_agent_predicted: (4, 4) float64, from ``predicted_ego_pos`` (OPV2V's localised
            pose, noisy in its release; equal to ``T_world_from_agent`` in ours), or None if absent.
    """

    cav_id: int
    frame: int
    points: np.ndarray
    instance_id: np.ndarray | None
    semantic: np.ndarray | None
    T_world_from_sensor: np.ndarray
    T_world_from_agent: np.ndarray
    ego_speed_mps: float
    vehicle_ids: np.ndarray
    boxes_world: np.ndarray
    vehicle_speed_mps: np.ndarray
    kinds: list[str] | None = None
    roles: list[str] | None = None
    num_points: np.ndarray | None = None
    agent_kind: str | None = None
    agent_extent: np.ndarray | None = None
    time_s: float | None = None
    scene_ego_id: int | None = None
    extra_yaml: dict[str, Any] = field(default_factory=dict)
    T_world_from_agent_predicted: np.ndarray | None = None

    @property
    def agent_box_world(self) -> np.ndarray | None:
        """(7,) the cav's own world box (bottom centre at ``T_world_from_agent``), or None when its
        size is unknown (no sidecar)."""
        if self.agent_extent is None:
            return None
        T = self.T_world_from_agent
        yaw = math.atan2(T[1, 0], T[0, 0])
        return np.array([*T[:3, 3], *self.agent_extent, yaw], dtype=np.float64)

    def validate(self) -> None:
        """Check shapes and dtypes; raises ValueError."""
        n, m = len(self.points), len(self.vehicle_ids)
        problems = []
        if self.points.shape != (n, 4) or self.points.dtype != np.float32:
            problems.append(f"points must be (N, 4) float32, got {self.points.shape} {self.points.dtype}")
        for name, arr, dtype in (
            ("instance_id", self.instance_id, np.int32),
            ("semantic", self.semantic, np.uint8),
        ):
            if arr is not None and (arr.shape != (n,) or arr.dtype != dtype):
                problems.append(f"{name} must be ({n},) {np.dtype(dtype)}, got {arr.shape} {arr.dtype}")
        for name in ("T_world_from_sensor", "T_world_from_agent"):
            if getattr(self, name).shape != (4, 4):
                problems.append(f"{name} must be (4, 4)")
        if self.boxes_world.shape != (m, 7):
            problems.append(f"boxes_world must be ({m}, 7), got {self.boxes_world.shape}")
        if self.vehicle_speed_mps.shape != (m,):
            problems.append(f"vehicle_speed_mps must be ({m},)")
        if self.num_points is not None and self.num_points.shape != (m,):
            problems.append(f"num_points must be ({m},)")
        for name in ("kinds", "roles"):
            values = getattr(self, name)
            if values is not None and len(values) != m:
                problems.append(f"{name} must have {m} entries")
        if problems:
            raise ValueError(
                f"invalid NativeAgentFrame cav {self.cav_id} frame {self.frame}: " + "; ".join(problems)
            )


def _parse_vehicles(vehicles: Any, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OPV2V ``vehicles`` -> ids (M,), world boxes (M, 7) ours, speeds (M,) m/s, by increasing id."""
    if vehicles is None:
        vehicles = {}
    if not isinstance(vehicles, dict):
        raise ValueError(f"{path}: 'vehicles' must be a mapping id -> fields")
    ids = sorted(int(k) for k in vehicles)
    by_id = {int(k): v for k, v in vehicles.items()}
    centre, angle, extent, speed = [], [], [], []
    for vid in ids:
        fields = by_id[vid]
        try:
            location = np.asarray(fields["location"], dtype=np.float64).reshape(3)
            center = np.asarray(fields.get("center", [0.0, 0.0, 0.0]), dtype=np.float64).reshape(3)
            angle.append(np.asarray(fields["angle"], dtype=np.float64).reshape(3))
            extent.append(np.asarray(fields["extent"], dtype=np.float64).reshape(3))
            speed.append(float(fields.get("speed", 0.0)) / KMH_PER_MPS)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: vehicle {vid} has bad fields ({err!r})") from err
        centre.append(location + center)  # OpenCOOD's box centre: location + center
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 7)), np.zeros(0)
    boxes = boxes_from_carla(np.stack(centre), np.stack(angle), np.stack(extent))
    return np.array(ids, dtype=np.int64), boxes, np.array(speed, dtype=np.float64)


def _read_sidecar(path: Path, n_points: int, vehicle_ids: np.ndarray) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    version = int(data.get("format_version", -1))
    if version != SIDECAR_FORMAT:
        raise ValueError(f"{path}: sidecar format {version}, this reader knows {SIDECAR_FORMAT}")
    for key in ("intensity", "instance_id", "semantic"):
        if data[key].shape != (n_points,):
            raise ValueError(f"{path}: {key} has shape {data[key].shape}, the pcd has {n_points} points")
    side_ids = data["vehicle_ids"].astype(np.int64)
    where = {int(v): i for i, v in enumerate(side_ids)}
    missing = [int(v) for v in vehicle_ids if int(v) not in where]
    if missing:
        raise ValueError(f"{path}: no sidecar entry for vehicles {missing} of the yaml")
    order = np.array([where[int(v)] for v in vehicle_ids], dtype=np.int64)
    return {
        "intensity": data["intensity"].astype(np.float32),
        "instance_id": data["instance_id"].astype(np.int32),
        "semantic": data["semantic"].astype(np.uint8),
        "num_points": data["num_points"].astype(np.int32)[order] if len(order) else np.zeros(0, np.int32),
        "kinds": [str(s) for s in data["kinds"][order]] if len(order) else [],
        "roles": [str(s) for s in data["roles"][order]] if len(order) else [],
        "agent_kind": str(data["agent_kind"]),
        "agent_extent": data["agent_extent"].astype(np.float64).reshape(3),
        "time_s": float(data["time_s"]),
        "scene_ego_id": int(data["scene_ego_id"]),
    }


def read_agent_frame(yaml_path: Path | str) -> NativeAgentFrame:
    """Read one cav's frame from ``<run>/<cav_id>/<frame>.yaml`` and its ``.pcd`` (and ``.npz``).

    Works on our files and on OPV2V's (no sidecar; any ``location``/``center`` split).

    Raises:
        FileNotFoundError: the yaml or its pcd is missing.
        ValueError: a malformed file, or names that are not ``<int>/<int>.yaml``.
    """
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise FileNotFoundError(f"no frame yaml {yaml_path}")
    match = _YAML_RE.match(yaml_path.name)
    if match is None or not _CAV_RE.match(yaml_path.parent.name):
        raise ValueError(f"{yaml_path}: expected <run>/<cav_id>/<frame>.yaml with integer names")
    cav_id, frame_idx = int(yaml_path.parent.name), int(match.group(1))

    data = load_yaml(yaml_path)
    if not isinstance(data, dict) or "lidar_pose" not in data:
        raise ValueError(f"{yaml_path}: not an OPV2V frame yaml (no 'lidar_pose')")
    lidar_pose = _pose6(data["lidar_pose"], "lidar_pose", yaml_path)
    ego_pose = _pose6(data.get("true_ego_pos", data["lidar_pose"]), "true_ego_pos", yaml_path)
    try:
        ego_speed_kmh = float(data.get("ego_speed", 0.0))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{yaml_path}: ego_speed must be one number (km/h), got {data['ego_speed']!r}"
        ) from err
    vehicle_ids, boxes_world, speeds = _parse_vehicles(data.get("vehicles"), yaml_path)

    xyz_carla, red = read_pcd(yaml_path.with_suffix(".pcd"))  # (N, 3) left-handed sensor frame
    n = len(xyz_carla)
    points = np.zeros((n, 4), dtype=np.float32)
    points[:, :3] = transform_points(S_MIRROR_Y, xyz_carla)  # back to our right-handed sensor frame
    side = None
    sidecar_path = yaml_path.with_suffix(".npz")
    if sidecar_path.is_file():
        side = _read_sidecar(sidecar_path, n, vehicle_ids)
        points[:, 3] = side["intensity"]
    elif red is not None:
        points[:, 3] = red

    out = NativeAgentFrame(
        cav_id=cav_id,
        frame=frame_idx,
        points=points,
        instance_id=None if side is None else side["instance_id"],
        semantic=None if side is None else side["semantic"],
        T_world_from_sensor=T_from_carla_pose(lidar_pose),
        T_world_from_agent=T_from_carla_pose(ego_pose),
        ego_speed_mps=ego_speed_kmh / KMH_PER_MPS,
        vehicle_ids=vehicle_ids,
        boxes_world=boxes_world,
        vehicle_speed_mps=speeds,
        kinds=None if side is None else side["kinds"],
        roles=None if side is None else side["roles"],
        num_points=None if side is None else side["num_points"],
        agent_kind=None if side is None else side["agent_kind"],
        agent_extent=None if side is None else side["agent_extent"],
        time_s=None if side is None else side["time_s"],
        scene_ego_id=None if side is None else side["scene_ego_id"],
        extra_yaml={k: v for k, v in data.items() if k not in _KNOWN_YAML_KEYS},
        T_world_from_agent_predicted=(
            None
            if data.get("predicted_ego_pos") is None
            else T_from_carla_pose(_pose6(data["predicted_ego_pos"], "predicted_ego_pos", yaml_path))
        ),
    )
    out.validate()
    return out


# --------------------------------------------------------------------------------------------------
# Manifest: one per run folder
# --------------------------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        return importlib.metadata.version("coopstack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def lidar_dict(config: LidarConfig) -> dict[str, Any]:
    """A :class:`LidarConfig` as the plain dict the manifest stores."""
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in dataclasses.asdict(config).items()}


@dataclass
class ManifestCounts:
    """What a run holds so far.

    Attributes:
        frames_written: complete frames.
        points: LiDAR points over every cav and frame.
        boxes: kind -> ground-truth boxes over frames (every vehicle of a frame once per frame);
            ``"unknown"`` for vehicles of foreign data without a sidecar.
    """

    frames_written: int = 0
    points: int = 0
    boxes: dict[str, int] = field(default_factory=dict)

    def add(self, other: ManifestCounts) -> None:
        """Accumulate ``other`` into this one."""
        self.frames_written += other.frames_written
        self.points += other.points
        for kind, n in other.boxes.items():
            self.boxes[kind] = self.boxes.get(kind, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames_written": int(self.frames_written),
            "points": int(self.points),
            "boxes": {str(k): int(v) for k, v in sorted(self.boxes.items())},
        }


def counts_of_scene_frame(frame: SceneFrame) -> ManifestCounts:
    """Counts one written frame adds: its scans' points and its agents' boxes by kind."""
    boxes: dict[str, int] = {}
    for agent in frame.agents:
        boxes[agent.kind.value] = boxes.get(agent.kind.value, 0) + 1
    points = sum(len(scan.points) for scan in frame.scans.values())
    return ManifestCounts(frames_written=1, points=int(points), boxes=boxes)


@dataclass
class Manifest:
    """Settings and counts of one run, stored as ``<run>/manifest.yaml``.

    One manifest per run folder rather than per dataset root: each run has its own scenario, seed
    and cavs, runs can be generated in parallel without sharing a file, and a run folder copied
    elsewhere stays self-describing. OpenCOOD only lists the folders of a run, so the file does not
    disturb it.

    Attributes:
        scenario: scenario name.
        seed: the World's seed (same seed, same frames).
        frames: number of frames the run is meant to hold.
        cavs: ids of the connected vehicles that get a folder.
        lidar: :func:`lidar_dict` of the sensor configuration.
        dt: seconds per tick.
        params: scenario parameters (``sim.scenarios.ScenarioParams`` fields) used by the World.
        generator_version: :data:`GENERATOR_VERSION` of the writer.
        created_by: ``"coopstack <version>"``.
        counts: what is on disk (see :func:`start_run`).
    """

    scenario: str
    seed: int
    frames: int
    cavs: list[int]
    lidar: dict[str, Any]
    dt: float
    params: dict[str, Any] = field(default_factory=dict)
    generator_version: str = GENERATOR_VERSION
    created_by: str = field(default_factory=lambda: f"coopstack {_package_version()}")
    counts: ManifestCounts = field(default_factory=ManifestCounts)

    _IDENTITY = ("scenario", "seed", "frames", "cavs", "lidar", "dt", "params", "generator_version")

    def validate(self) -> None:
        """Check values; raises ValueError (also for a lidar dict LidarConfig rejects)."""
        problems = []
        if self.frames < 0:
            problems.append(f"frames must be >= 0, got {self.frames}")
        if len(set(self.cavs)) != len(self.cavs):
            problems.append(f"cavs must be unique, got {self.cavs}")
        if not self.dt > 0:
            problems.append(f"dt must be > 0, got {self.dt}")
        try:
            LidarConfig(**self.lidar).validate()
        except TypeError as err:
            problems.append(f"lidar has unknown keys ({err})")
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("invalid Manifest: " + "; ".join(problems))

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a run to be resumed (everything but counts and created_by)."""
        return {k: v for k, v in self.to_dict().items() if k in self._IDENTITY}

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": str(self.scenario),
            "seed": int(self.seed),
            "frames": int(self.frames),
            "cavs": [int(c) for c in self.cavs],
            "lidar": {str(k): v for k, v in self.lidar.items()},
            "dt": float(self.dt),
            "params": {str(k): v for k, v in sorted(self.params.items())},
            "generator_version": str(self.generator_version),
            "created_by": str(self.created_by),
            "counts": self.counts.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown manifest keys {sorted(unknown)}")
        counts = data.get("counts") or {}
        return cls(
            scenario=str(data["scenario"]),
            seed=int(data["seed"]),
            frames=int(data["frames"]),
            cavs=[int(c) for c in data["cavs"]],
            lidar=dict(data["lidar"]),
            dt=float(data["dt"]),
            params=dict(data.get("params") or {}),
            generator_version=str(data["generator_version"]),
            created_by=str(data["created_by"]),
            counts=ManifestCounts(
                frames_written=int(counts.get("frames_written", 0)),
                points=int(counts.get("points", 0)),
                boxes={str(k): int(v) for k, v in (counts.get("boxes") or {}).items()},
            ),
        )


def read_manifest(run: Path | str) -> Manifest:
    """Read ``<run>/manifest.yaml``."""
    path = Path(run) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path}")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a manifest")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: malformed manifest ({err!r})") from err


def write_manifest(run: Path | str, manifest: Manifest) -> Path:
    """Write ``<run>/manifest.yaml`` atomically (creating ``run``).

    If a manifest is already there it must describe the same generation (:meth:`Manifest.identity`):
    a run is never continued with other settings.

    Raises:
        ValueError: invalid manifest, or one that disagrees with the manifest on disk.
    """
    manifest.validate()
    run = Path(run)
    path = run / MANIFEST_NAME
    if path.is_file():
        old = read_manifest(run).identity()
        new = Manifest.from_dict(load_yaml_text(dump_yaml(manifest.to_dict()))).identity()
        if old != new:
            diff = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(
                f"{path} was generated with other settings ({', '.join(diff)}); use another run name"
            )
    run.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, dump_yaml(manifest.to_dict()))


def load_yaml_text(text: str) -> Any:
    """Parse yaml text with the same loader as :func:`load_yaml`."""
    return yaml.load(text, Loader=_Opv2vLoader)  # a SafeLoader subclass: no object construction


def recount_run(run: Path | str, cav_ids: list[int] | None = None) -> ManifestCounts:
    """Counts of the complete frames on disk, from the pcd headers and sidecars (not the points)."""
    counts = ManifestCounts()
    cavs = list_cavs(run) if cav_ids is None else list(cav_ids)
    for frame_idx in list_frames(run, cavs):
        kinds: dict[int, str] = {}
        points = 0
        for cav in cavs:
            paths = agent_frame_paths(run, cav, frame_idx)
            points += _pcd_point_count(paths.pcd)
            if paths.sidecar.is_file():
                with np.load(paths.sidecar, allow_pickle=False) as npz:
                    kinds.update(zip(npz["vehicle_ids"].tolist(), npz["kinds"].tolist(), strict=True))
                    kinds[cav] = str(npz["agent_kind"])
            else:
                kinds.update(
                    dict.fromkeys((int(k) for k in (load_yaml(paths.yaml).get("vehicles") or {})), "unknown")
                )
                kinds.setdefault(cav, "unknown")
        boxes: dict[str, int] = {}
        for kind in kinds.values():
            boxes[kind] = boxes.get(kind, 0) + 1
        counts.add(ManifestCounts(frames_written=1, points=points, boxes=boxes))
    return counts


def start_run(root: Path | str, split: str, run_name: str, manifest: Manifest) -> tuple[Manifest, list[int]]:
    """Start a run, or resume it where it stopped.

    A new run gets its folder and ``manifest``. An existing one must have been started with the
    same settings (else ValueError, see :func:`write_manifest`); its counts are recomputed from the
    complete frames on disk, so a frame that was finished after the last manifest update is
    counted and a half-written one is not, and the manifest is rewritten with them.

    The caller writes every frame not in the returned list, adding
    :func:`counts_of_scene_frame` to ``manifest.counts`` and calling :func:`write_manifest` as it
    goes; calling this again with the same arguments then continues where it stopped.

    Returns:
        The manifest to keep updating, and the indices of the frames already complete.
    """
    run = run_path(root, split, run_name)
    manifest = dataclasses.replace(manifest, counts=ManifestCounts())
    write_manifest(run, manifest)  # checks the settings against an existing manifest first
    done = list_frames(run, manifest.cavs) if manifest.cavs else []
    manifest.counts = recount_run(run, manifest.cavs) if done else ManifestCounts()
    write_manifest(run, manifest)
    return manifest, done
