"""OPV2V / V2XSet trees as OpenCOOD reads them, beyond what :mod:`datasets.native` writes.

The layout and the per-frame yaml are :mod:`datasets.native`'s (it *is* OPV2V's layout); this
module adds what foreign trees and conversions need:

- PCD checks that name the file: Open3D reads a truncated binary file as zero points and pads a
  truncated ASCII file without a word, so :func:`pcd_problems` compares the header with the data
  (line count for ``ascii``, byte count for ``binary``, the compressed block's sizes for
  ``binary_compressed``) and looks for NaN or infinite coordinates. PCDs with an ``intensity``
  field instead of ``rgb`` (other cooperative datasets write those) are read too.
- :func:`read_agent`: :func:`datasets.native.read_agent_frame` behind those checks.
- :func:`write_agent_frame`: writes a :class:`datasets.native.NativeAgentFrame` (from any source)
  as OPV2V files, with or without our sidecar; yaml keys the reader does not interpret (camera
  entries, ``plan_trajectory``) are written back unchanged, ``predicted_ego_pos`` too.
- :func:`complete_agent`: fills what a foreign frame lacks before it becomes native data (the
  sidecar's per-point labels and visibility, derived from the boxes; see its docstring).
- ``data_protocol.yaml`` (OpenCDA's settings, in an OPV2V scenario folder) is read and copied.

Ids: OPV2V names a cav folder by its CARLA actor id; V2XSet gives road-side units negative ids.
OpenCOOD takes the first cav folder in sorted order, road-side units last, as the ego
(:func:`opencood_ego_id`). Vehicle boxes: ``location + center`` with ``angle`` = roll/yaw/pitch in
degrees and ``extent`` half sizes, CARLA's left-handed world (:func:`sim.geometry.boxes_from_carla`);
roll and pitch are dropped on reading (boxes are upright, as mmdet3d's), so they are not written
back.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datasets.io import atomic_write_bytes, atomic_write_text, write_npz_deterministic
from datasets.native import (
    KMH_PER_MPS,
    SIDECAR_FORMAT,
    SIDECAR_KEYS,
    NativeAgentFrame,
    agent_frame_paths,
    dump_yaml,
    load_yaml,
    read_agent_frame,
    read_pcd,
    write_pcd,
)
from sim.box_ops import points_in_boxes
from sim.geometry import (
    S_MIRROR_Y,
    boxes_to_carla,
    carla_pose_from_T,
    invert_T,
    transform_boxes,
    transform_points,
)
from sim.types import ActorKind, Semantic

__all__ = [
    "DATA_PROTOCOL_NAME",
    "RSU_KIND",
    "UNKNOWN",
    "PcdHeader",
    "agent_yaml",
    "complete_agent",
    "copy_data_protocol",
    "opencood_ego_id",
    "pcd_problems",
    "read_agent",
    "read_data_protocol",
    "read_pcd_header",
    "read_pcd_points",
    "sidecar_arrays",
    "write_agent_frame",
]

DATA_PROTOCOL_NAME = "data_protocol.yaml"
UNKNOWN = "unknown"
"""Role (and kind, where nothing better is known) written for what the source does not say."""
RSU_KIND = "rsu"
"""``agent_kind`` of a road-side unit (a negative cav id in V2XSet)."""


# --------------------------------------------------------------------------------------------------
# PCD
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PcdHeader:
    """The header of a PCD file.

    Attributes:
        fields: field names (``x y z rgb`` in OPV2V).
        sizes: bytes per value of each field.
        types: ``F`` float, ``U`` unsigned, ``I`` signed, per field.
        counts: values per field.
        points: number of points (``POINTS``).
        data: ``ascii``, ``binary`` or ``binary_compressed``.
        data_offset: byte offset of the data after the ``DATA`` line.
    """

    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    points: int
    data: str
    data_offset: int

    @property
    def row_bytes(self) -> int:
        return sum(s * c for s, c in zip(self.sizes, self.counts, strict=True))


def read_pcd_header(path: Path | str) -> PcdHeader:
    """Parse a PCD header; ValueError naming the file if it is not one."""
    path = Path(path)
    values: dict[str, list[str]] = {}
    offset = 0
    with open(path, "rb") as f:
        for _ in range(64):  # a PCD header has about 11 lines; a file without DATA is not a PCD
            raw = f.readline()
            if not raw:
                break
            offset += len(raw)
            line = raw.decode("ascii", errors="replace").strip()
            if not line or line.startswith("#"):
                continue
            key, *rest = line.split()
            values[key.upper()] = rest
            if key.upper() == "DATA":
                break
    if "DATA" not in values:
        raise ValueError(f"{path}: not a PCD file (no DATA line in the header)")
    try:
        fields = tuple(values["FIELDS"])
        n = len(fields)
        sizes = tuple(int(v) for v in values.get("SIZE", ["4"] * n))
        types = tuple(values.get("TYPE", ["F"] * n))
        counts = tuple(int(v) for v in values.get("COUNT", ["1"] * n))
        if "POINTS" in values:
            points = int(values["POINTS"][0])
        else:
            points = int(values["WIDTH"][0]) * int(values.get("HEIGHT", ["1"])[0])
        data = values["DATA"][0].lower()
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{path}: malformed PCD header ({err!r})") from err
    if not (len(sizes) == len(types) == len(counts) == n):
        raise ValueError(f"{path}: PCD header's FIELDS, SIZE, TYPE and COUNT differ in length")
    if data not in ("ascii", "binary", "binary_compressed"):
        raise ValueError(f"{path}: unknown PCD DATA encoding {data!r}")
    if points < 0:
        raise ValueError(f"{path}: negative POINTS")
    return PcdHeader(fields, sizes, types, counts, points, data, offset)


def _structure_problems(path: Path, header: PcdHeader) -> list[str]:
    """Does the data after the header hold ``POINTS`` points? (without decoding it)"""
    problems = []
    if not {"x", "y", "z"} <= set(header.fields):
        problems.append(f"PCD has no x y z fields (fields {' '.join(header.fields)})")
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        body = f.read()
    if header.data == "ascii":
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        if len(lines) != header.points:
            problems.append(f"truncated or corrupt: header says {header.points} points, the file has {len(lines)} lines")
        elif lines:
            want = sum(header.counts)
            for where, line in (("first", lines[0]), ("last", lines[-1])):
                if len(line.split()) != want:
                    problems.append(f"truncated or corrupt: {where} data line has {len(line.split())} values, not {want}")
    elif header.data == "binary":
        need = header.points * header.row_bytes
        if len(body) < need:
            problems.append(f"truncated: {len(body)} data bytes for {header.points} points of {header.row_bytes} bytes")
    elif header.points > 0:  # binary_compressed: two uint32 sizes, then the LZF block
        if len(body) < 8:
            problems.append("truncated: no compressed block after the header")
        else:
            compressed, uncompressed = struct.unpack("<II", body[:8])
            if uncompressed != header.points * header.row_bytes:
                problems.append(
                    f"corrupt: compressed block unpacks to {uncompressed} bytes, not {header.points} points "
                    f"of {header.row_bytes} bytes"
                )
            if len(body) - 8 < compressed:
                problems.append(f"truncated: compressed block has {len(body) - 8} of its {compressed} bytes")
    return problems


def _read_xyz_intensity(path: Path, header: PcdHeader) -> tuple[np.ndarray, np.ndarray | None]:
    """Open3D's read; intensity from the red channel, else from an ``intensity`` field, else None."""
    import open3d as o3d

    if "intensity" in header.fields and not {"rgb", "rgba"} & set(header.fields):
        pcd = o3d.t.io.read_point_cloud(str(path), format="pcd")
        xyz = pcd.point.positions.numpy().astype(np.float32).reshape(-1, 3)
        intensity = pcd.point["intensity"].numpy().astype(np.float32).reshape(-1)
        return xyz, intensity
    return read_pcd(path)


def pcd_problems(path: Path | str) -> list[str]:
    """Every problem of a PCD file: unreadable, not a PCD, truncated, point count, NaN/inf."""
    path = Path(path)
    try:
        header = read_pcd_header(path)
    except OSError as err:
        return [f"cannot read ({err})"]
    except ValueError as err:
        return [str(err).removeprefix(f"{path}: ")]
    problems = _structure_problems(path, header)
    if problems or header.points == 0:
        return problems
    try:
        xyz, _ = _read_xyz_intensity(path, header)
    except (ValueError, RuntimeError) as err:
        return [f"unreadable point data ({err})"]
    if len(xyz) != header.points:
        problems.append(f"corrupt: read {len(xyz)} points, the header says {header.points}")
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        problems.append(f"{int(bad.sum())} points with NaN or infinity (first at row {int(np.argmax(bad))})")
    return problems


def read_pcd_points(path: Path | str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PCD's points as stored, after checking it.

    Returns:
        xyz: (N, 3) float32 as stored (CARLA's left-handed sensor frame for OPV2V).
        intensity: (N,) float32, the red channel in [0, 1], or an ``intensity`` field as stored,
            or None when the file has neither.

    Raises:
        FileNotFoundError: no such file.
        ValueError: any problem of :func:`pcd_problems`; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no point cloud file {path}")
    header = read_pcd_header(path)
    problems = _structure_problems(path, header)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    if header.points == 0:
        return np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.float32)
    xyz, intensity = _read_xyz_intensity(path, header)
    _check_points_read(path, header, xyz)
    return xyz, intensity


def _check_points_read(path: Path, header: PcdHeader, xyz: np.ndarray) -> None:
    if len(xyz) != header.points:
        raise ValueError(f"{path}: corrupt: read {len(xyz)} points, the header says {header.points}")
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} points with NaN or infinity (first at row {int(np.argmax(bad))})")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_agent(yaml_path: Path | str) -> NativeAgentFrame:
    """:func:`datasets.native.read_agent_frame` after checking the PCD (see :func:`pcd_problems`).

    A PCD with an ``intensity`` field (and no colour) gives that intensity when there is no sidecar.

    Raises:
        FileNotFoundError: the yaml or its pcd is missing.
        ValueError: a malformed yaml, a truncated or corrupt pcd, NaN/inf points, a sidecar that
            does not match; the message names the file.
    """
    yaml_path = Path(yaml_path)
    pcd_path = yaml_path.with_suffix(".pcd")
    if not pcd_path.is_file():
        raise FileNotFoundError(f"no point cloud file {pcd_path} for {yaml_path}")
    header = read_pcd_header(pcd_path)
    problems = _structure_problems(pcd_path, header)
    if problems:
        raise ValueError(f"{pcd_path}: " + "; ".join(problems))
    try:
        agent = read_agent_frame(yaml_path)
    except yaml.YAMLError as err:
        raise ValueError(f"{yaml_path}: bad yaml ({str(err).splitlines()[0]})") from err
    except (TypeError, AttributeError, KeyError) as err:  # yaml of the wrong shape inside a field
        raise ValueError(f"{yaml_path}: malformed frame yaml ({err!r})") from err
    _check_points_read(pcd_path, header, agent.points[:, :3])
    if "intensity" in header.fields and "rgb" not in header.fields and agent.instance_id is None:
        agent.points[:, 3] = _read_xyz_intensity(pcd_path, header)[1]
    return agent


def read_data_protocol(run: Path | str) -> dict[str, Any] | None:
    """``<run>/data_protocol.yaml`` as a dict, or None when absent; ValueError naming a bad file."""
    path = Path(run) / DATA_PROTOCOL_NAME
    if not path.is_file():
        return None
    try:
        data = load_yaml(path)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: bad yaml ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def copy_data_protocol(src_run: Path | str, dst_run: Path | str) -> Path | None:
    """Copy ``data_protocol.yaml`` byte for byte (after checking it parses), if the source has one."""
    if read_data_protocol(src_run) is None:
        return None
    Path(dst_run).mkdir(parents=True, exist_ok=True)
    data = (Path(src_run) / DATA_PROTOCOL_NAME).read_bytes()
    return atomic_write_bytes(Path(dst_run) / DATA_PROTOCOL_NAME, data)


def opencood_ego_id(cav_ids: list[int]) -> int:
    """The cav OpenCOOD makes the ego: first folder name in string order, road-side units last."""
    if not cav_ids:
        raise ValueError("no cav ids")
    names = sorted(str(c) for c in cav_ids)
    vehicles = [n for n in names if not n.startswith("-")]
    return int((vehicles or names)[0])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _floats(values: np.ndarray | list[float], what: str) -> list[float]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} is not finite: {arr.tolist()}")
    return [float(v) for v in arr]


def agent_yaml(agent: NativeAgentFrame) -> dict[str, Any]:
    """OPV2V's per-frame yaml for one cav (plain Python types), as :mod:`datasets.native` writes it.

    ``vehicles`` get ``center = [0, 0, dz/2]`` (box centre above the bottom-centre ``location``);
    keys of ``agent.extra_yaml`` are written unchanged; ``predicted_ego_pos`` is
    ``T_world_from_agent_predicted`` when known, else the true pose.
    """
    vehicles: dict[int, dict[str, Any]] = {}
    if len(agent.vehicle_ids):
        centre, angle, extent = boxes_to_carla(agent.boxes_world)  # (M, 3) each, CARLA frame
        center = np.zeros_like(centre)
        center[:, 2] = extent[:, 2]
        location = centre - center
        for i, vid in enumerate(agent.vehicle_ids.tolist()):
            vehicles[int(vid)] = {
                "angle": _floats(angle[i], f"angle of vehicle {vid}"),
                "center": _floats(center[i], f"center of vehicle {vid}"),
                "extent": _floats(extent[i], f"extent of vehicle {vid}"),
                "location": _floats(location[i], f"location of vehicle {vid}"),
                "speed": _floats([agent.vehicle_speed_mps[i] * KMH_PER_MPS], f"speed of vehicle {vid}")[0],
            }
    ego_pos = _floats(carla_pose_from_T(agent.T_world_from_agent), f"pose of cav {agent.cav_id}")
    predicted = (
        ego_pos
        if agent.T_world_from_agent_predicted is None
        else _floats(carla_pose_from_T(agent.T_world_from_agent_predicted), f"predicted pose of cav {agent.cav_id}")
    )
    doc = dict(agent.extra_yaml)
    doc.update(
        ego_speed=_floats([agent.ego_speed_mps * KMH_PER_MPS], "ego_speed")[0],
        lidar_pose=_floats(carla_pose_from_T(agent.T_world_from_sensor), f"sensor pose of cav {agent.cav_id}"),
        predicted_ego_pos=predicted,
        true_ego_pos=ego_pos,
        vehicles=vehicles,
    )
    return doc


def sidecar_arrays(agent: NativeAgentFrame) -> dict[str, np.ndarray]:
    """The sidecar ``.npz`` arrays of :data:`datasets.native.SIDECAR_KEYS`, in native's key order.

    Raises:
        ValueError: a field the sidecar needs is None (see :func:`complete_agent`).
    """
    missing = [
        name
        for name in ("instance_id", "semantic", "num_points", "kinds", "roles", "agent_kind", "agent_extent")
        if getattr(agent, name) is None
    ]
    if missing:
        raise ValueError(f"cav {agent.cav_id} frame {agent.frame}: no {', '.join(missing)} for the sidecar")
    assert agent.kinds is not None and agent.roles is not None  # for type checkers
    width = max([len(k) for k in agent.kinds] + [len(r) for r in agent.roles] + [1])
    arrays = {
        "format_version": np.array(SIDECAR_FORMAT, dtype=np.int64),
        "time_s": np.array(np.nan if agent.time_s is None else agent.time_s, dtype=np.float64),
        "scene_ego_id": np.array(agent.cav_id if agent.scene_ego_id is None else agent.scene_ego_id, dtype=np.int64),
        "intensity": agent.points[:, 3].astype(np.float32),
        "instance_id": np.asarray(agent.instance_id).astype(np.int32),
        "semantic": np.asarray(agent.semantic).astype(np.uint8),
        "vehicle_ids": agent.vehicle_ids.astype(np.int64),
        "num_points": np.asarray(agent.num_points).astype(np.int32),
        "kinds": np.array(agent.kinds, dtype=f"<U{width}"),
        "roles": np.array(agent.roles, dtype=f"<U{width}"),
        "agent_kind": np.array(agent.agent_kind),
        "agent_extent": np.asarray(agent.agent_extent, dtype=np.float64).reshape(3),
    }
    assert list(arrays) == list(SIDECAR_KEYS)
    return arrays


def write_agent_frame(
    run: Path | str, agent: NativeAgentFrame, sidecar: bool, pcd_encoding: str = "binary_compressed"
) -> list[Path]:
    """Write one cav's frame as ``<run>/<cav_id>/<frame:06d>.pcd`` (+ ``.npz``) + ``.yaml``.

    Same order and atomicity as :func:`datasets.native.write_scene_frame`: the yaml is withdrawn
    first and written last, so it exists only over a complete frame. Without ``sidecar`` (plain
    OPV2V) a sidecar left by an earlier write is removed, since it would not match.

    Args:
        run: the run folder (created as needed).
        agent: the frame; with ``sidecar`` every sidecar field must be set (:func:`complete_agent`).
        sidecar: write our ``.npz`` (native) or not (OPV2V).
        pcd_encoding: see :data:`datasets.native.PCD_ENCODINGS`.

    Returns:
        The paths written, in order.
    """
    agent.validate()
    if not np.all(np.isfinite(agent.points)):
        raise ValueError(f"cav {agent.cav_id} frame {agent.frame}: points hold NaN or infinity")
    yaml_text = dump_yaml(agent_yaml(agent))  # before any file is touched
    arrays = sidecar_arrays(agent) if sidecar else None
    paths = agent_frame_paths(run, agent.cav_id, agent.frame)
    paths.yaml.parent.mkdir(parents=True, exist_ok=True)
    paths.yaml.unlink(missing_ok=True)
    points_carla = transform_points(S_MIRROR_Y, agent.points)  # (N, 4) CARLA's left-handed sensor frame
    written = [write_pcd(paths.pcd, points_carla[:, :3], agent.points[:, 3], encoding=pcd_encoding)]
    if arrays is not None:
        written.append(write_npz_deterministic(paths.sidecar, arrays))
    else:
        paths.sidecar.unlink(missing_ok=True)
    written.append(atomic_write_text(paths.yaml, yaml_text))
    return written


def _semantic_of(kind: str) -> int:
    try:
        return int(Semantic.of_kind(ActorKind(kind)))
    except ValueError:
        return int(Semantic.CAR)  # CARLA tags every vehicle class it does not know as a car


def complete_agent(
    agent: NativeAgentFrame,
    run_cav_ids: list[int],
    frame_agents: dict[int, NativeAgentFrame] | None = None,
) -> NativeAgentFrame:
    """A copy of ``agent`` with every sidecar field set, for writing native data from foreign data.

    What the source did not hold is derived or marked unknown:

    - ``num_points``, ``instance_id``: from the boxes (mmcv's points-in-boxes in the sensor
      frame); a point inside several boxes goes to the first by increasing id. A simulated LiDAR
      hits box faces exactly, and mmcv's strict test puts such points on either side, so on our
      own data these counts run a few percent below the simulator's.
    - ``semantic``: the vehicle class of points on a vehicle, ``Semantic.NONE`` elsewhere.
    - ``kinds``: ``car`` (OPV2V does not tell classes; OpenCOOD trains one vehicle class).
    - ``roles``: ``connected`` for vehicles with a cav folder in the run, else ``unknown``.
    - ``agent_kind``: ``car``, or ``rsu`` for a negative (road-side unit) id; ``agent_extent``: from
      another cav's listing of this cav in the same frame (``frame_agents``), else NaN.
    - ``time_s``: NaN; ``scene_ego_id``: :func:`opencood_ego_id` of the run's cavs.
    """
    m = len(agent.vehicle_ids)
    updates: dict[str, Any] = {}
    need_inside = agent.num_points is None or agent.instance_id is None or agent.semantic is None
    inside = np.zeros((len(agent.points), m), dtype=bool)
    if need_inside and m and len(agent.points):
        boxes_sensor = transform_boxes(invert_T(agent.T_world_from_sensor), agent.boxes_world)
        inside = points_in_boxes(agent.points, boxes_sensor)  # (N, M)
    kinds = agent.kinds if agent.kinds is not None else ["car"] * m
    if agent.kinds is None:
        updates["kinds"] = kinds
    if agent.num_points is None:
        updates["num_points"] = inside.sum(axis=0).astype(np.int32)
    on_vehicle = inside.any(axis=1)
    first = np.argmax(inside, axis=1) if m else np.zeros(len(agent.points), dtype=np.int64)
    if agent.instance_id is None:
        ids = agent.vehicle_ids.astype(np.int32)
        updates["instance_id"] = np.where(on_vehicle, ids[first] if m else -1, -1).astype(np.int32)
    if agent.semantic is None:
        classes = np.array([_semantic_of(k) for k in kinds], dtype=np.uint8)
        updates["semantic"] = np.where(on_vehicle, classes[first] if m else 0, int(Semantic.NONE)).astype(np.uint8)
    if agent.roles is None:
        cavs = set(run_cav_ids)
        updates["roles"] = ["connected" if int(v) in cavs else UNKNOWN for v in agent.vehicle_ids.tolist()]
    if agent.agent_kind is None:
        updates["agent_kind"] = RSU_KIND if agent.cav_id < 0 else "car"
    if agent.agent_extent is None:
        extent = np.full(3, np.nan)
        for other in (frame_agents or {}).values():
            hit = np.flatnonzero(other.vehicle_ids == agent.cav_id)
            if len(hit):
                extent = other.boxes_world[hit[0], 3:6].copy()
                break
        updates["agent_extent"] = extent
    if agent.time_s is None:
        updates["time_s"] = math.nan
    if agent.scene_ego_id is None:
        updates["scene_ego_id"] = opencood_ego_id(list(run_cav_ids) or [agent.cav_id])
    return dataclasses.replace(agent, **updates)
