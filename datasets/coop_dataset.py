"""Cooperative-perception samples over the native (OPV2V-layout) dataset.

A sample is one frame seen by one ego vehicle and the connected vehicles within communication range
of it. The **ego frame** is the ego's LiDAR sensor frame (as OpenCOOD's): every pose is
``T_ego_from_agent = invert_T(T_world_from_ego_sensor) @ T_world_from_agent_sensor`` and every
ground-truth box is expressed in it. Each agent's points stay in its own sensor frame; what the
ego gets of them is decided by the fusion method and the V2X link (:mod:`models.comm`).

What a sample holds and how it is made (:class:`CoopDataset`):

1. **Ego choice** (``ego``): ``"scene"`` the scenario's ego vehicle (sidecar ``scene_ego_id``, the
   lowest cav id without one); ``"lowest_id"`` the lowest cav id (OpenCOOD's choice on OPV2V);
   ``"all"`` every cav in turn (one sample per cav and frame).
2. **Connected agents**: the run's other cavs whose sensors are within ``comm_range_m`` of the
   ego's at that frame, nearest first, at most ``max_agents`` including the ego.
3. **Data age** (``delay_frames``): the other agents' data are taken from ``frame - delay_frames``
   (clamped to the run's first frame): what a receiver has when messages take that long. Their
   transforms use the pose of the frame actually read, so the geometry stays exact and only the
   scene has moved.
4. **Ground truth**: the vehicles listed in the ego's yaml at ``frame`` (ours lists every other
   vehicle), joined with those listed by the other agents whose data are from ``frame``; boxes
   with their bottom centre inside ``gt_range`` (x/y, ego frame). Class labels come from the
   vehicle kinds (``classes``); a vehicle whose kind is unknown (OPV2V data) gets class 0.
5. **Visibility** per box (:class:`Visibility`), from the sidecar point counts: seen by the ego
   (at least ``min_points`` of its points), else by at least one other agent of the sample, else by
   none; boxes seen by nobody are dropped unless ``keep_invisible`` (OPV2V keeps only boxes some
   agent's LiDAR hit). Without sidecars (OPV2V data, which list only hit vehicles) a vehicle in the
   ego's list counts as seen by the ego.
6. **Pose noise** (``pose_noise``): every agent's sensor pose, the ego's included, is measured with
   :class:`v2x.pose_noise.PoseNoise`, drawn from ``default_rng([seed, epoch, index, agent_id])`` so
   an agent's draw does not depend on the others; ``T_ego_from_agent_measured`` is what the
   receiver computes from the two measured poses.
7. **Augmentation** (``augment``, training): one :class:`datasets.augment.GlobalAugmentation` for
   the whole sample, applied consistently to every agent (see that module).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch.utils.data

from datasets.augment import AugmentConfig, GlobalAugmentation
from datasets.native import (
    NativeAgentFrame,
    agent_frame_paths,
    find_runs,
    list_cavs,
    list_frames,
    read_agent_frame,
)
from sim.geometry import invert_T, transform_boxes
from v2x.pose_noise import PoseNoise

__all__ = [
    "DEFAULT_CLASSES",
    "CoopDataset",
    "CoopDatasetConfig",
    "CoopSample",
    "PoseNoiseConfig",
    "SampleKey",
    "Visibility",
    "partners_in_range",
]

DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {"car": ("car", "van"), "truck": ("truck", "bus")}
"""Detection classes -> the :class:`sim.types.ActorKind` values they gather."""


class Visibility(enum.IntEnum):
    """Who can see a ground-truth box (at least ``min_points`` LiDAR points on it)."""

    EGO = 0
    """the ego's own scan hits it"""
    OTHERS_ONLY = 1
    """the ego's scan does not, another agent's of the sample does: only cooperation reveals it"""
    NONE = 2
    """no agent of the sample sees it"""


@dataclass(frozen=True)
class PoseNoiseConfig:
    """Localisation error of every agent's sensor pose (OpenCOOD's Gaussian model).

    Attributes:
        std_xyz_m: standard deviation of the position error along world x, y, z, metres.
        std_yaw_rad: standard deviation of the heading error, radians.
    """

    std_xyz_m: float = 0.0
    std_yaw_rad: float = 0.0

    def model(self) -> PoseNoise:
        return PoseNoise(std_xyz_m=self.std_xyz_m, std_yaw_rad=self.std_yaw_rad)


@dataclass(frozen=True)
class CoopDatasetConfig:
    """What samples to make from a native dataset.

    Attributes:
        root: dataset root, split folder or run folder.
        split: split folder under ``root`` (``""``: use ``root`` as given).
        ego: ego choice, see the module docstring.
        comm_range_m: other cavs farther than this from the ego's sensor are not connected.
        max_agents: agents per sample, the ego included (nearest first).
        delay_frames: age of the other agents' data, frames.
        frame_stride: use every n-th frame of each run.
        gt_range: ``(x_min, y_min, x_max, y_max)`` of the ground truth, ego frame, metres; None
            keeps every box (experiments set it to the model grid's x-y range).
        min_points: LiDAR points on a box for an agent to see it.
        keep_invisible: keep boxes no agent of the sample sees.
        classes: class name -> vehicle kinds; index order = label order.
        pose_noise: localisation error of every agent.
        augment: global augmentation (applied only when ``training``).
        training: draw augmentations.
        seed: base seed of every random draw.
        cache_frames: agent frames kept in memory (0: read every time).
    """

    root: str = ""
    split: str = "train"
    ego: Literal["scene", "lowest_id", "all"] = "scene"
    comm_range_m: float = 70.0
    max_agents: int = 5
    delay_frames: int = 0
    frame_stride: int = 1
    gt_range: tuple[float, float, float, float] | None = None
    min_points: int = 1
    keep_invisible: bool = False
    classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_CLASSES))
    pose_noise: PoseNoiseConfig = field(default_factory=PoseNoiseConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    training: bool = False
    seed: int = 0
    cache_frames: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not self.comm_range_m > 0:
            problems.append(f"comm_range_m must be > 0, got {self.comm_range_m}")
        if self.max_agents < 1:
            problems.append(f"max_agents must be >= 1, got {self.max_agents}")
        if self.delay_frames < 0:
            problems.append(f"delay_frames must be >= 0, got {self.delay_frames}")
        if self.frame_stride < 1:
            problems.append(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.gt_range is not None and not (
            len(self.gt_range) == 4 and self.gt_range[0] < self.gt_range[2] and self.gt_range[1] < self.gt_range[3]
        ):
            problems.append(f"gt_range must be (x_min, y_min, x_max, y_max), got {self.gt_range}")
        if self.min_points < 1:
            problems.append(f"min_points must be >= 1, got {self.min_points}")
        if not self.classes:
            problems.append("classes must name at least one class")
        kinds = [k for ks in self.classes.values() for k in ks]
        if len(kinds) != len(set(kinds)):
            problems.append(f"a vehicle kind is in two classes: {self.classes}")
        if self.cache_frames < 0:
            problems.append(f"cache_frames must be >= 0, got {self.cache_frames}")
        if problems:
            raise ValueError("invalid CoopDatasetConfig: " + "; ".join(problems))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def label_of_kind(self, kind: str | None) -> int:
        """Class index of a vehicle kind; -1 for a kind no class gathers; 0 when unknown (None)."""
        if kind is None:
            return 0
        for index, kinds in enumerate(self.classes.values()):
            if kind in kinds:
                return index
        return -1


def partners_in_range(
    ego_xyz: np.ndarray, others: Mapping[int, np.ndarray], comm_range_m: float, max_agents: int
) -> list[int]:
    """The connected vehicles an ego fuses with: the ids of ``others`` (id -> (3,) sensor position,
    the ego's own excluded) within ``comm_range_m`` of the ego's sensor at ``ego_xyz``, nearest
    first (ties by id), at most ``max_agents - 1``."""
    candidates = []
    for other, xyz in others.items():
        distance = float(np.linalg.norm(np.asarray(xyz) - ego_xyz))
        if distance <= comm_range_m:
            candidates.append((distance, other))
    candidates.sort()
    return [other for _, other in candidates[: max_agents - 1]]


@dataclass(frozen=True)
class SampleKey:
    """Which sample: a run folder, a frame and the ego cav."""

    run: Path
    frame: int
    ego_id: int


@dataclass
class CoopSample:
    """One ego's view of one frame with its connected agents. A = agents (ego first), M = boxes.

    Attributes:
        run: run folder name.
        frame: frame index of the ego's data.
        ego_id: the ego cav.
        agent_ids: (A,) int64, ego first, then by distance to the ego.
        data_frames: (A,) int64 frame each agent's data come from (``frame - delay`` for others).
        position_m: (A, 3) float64 true sensor positions in the ego frame before augmentation
            (the ego's is 0): what the radio channel sees.
        points: A arrays (N_a, 4) float32 x, y, z, intensity in each agent's own sensor frame.
        semantic: A arrays (N_a,) uint8 :class:`sim.types.Semantic` of each point (0 unknown).
        T_ego_from_agent: (A, 4, 4) float64 true poses (identity for the ego).
        T_ego_from_agent_measured: (A, 4, 4) float64 poses from the measured (noisy) localisation.
        gt_boxes: (M, 7) float64 ego-frame boxes, mmdet3d LiDAR convention.
        gt_labels: (M,) int64 class index.
        gt_visibility: (M,) int8 :class:`Visibility`.
        gt_ids: (M,) int64 vehicle ids.
        augmentation: what was applied (identity when not training).
    """

    run: str
    frame: int
    ego_id: int
    agent_ids: np.ndarray
    data_frames: np.ndarray
    position_m: np.ndarray
    points: list[np.ndarray]
    semantic: list[np.ndarray]
    T_ego_from_agent: np.ndarray
    T_ego_from_agent_measured: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_visibility: np.ndarray
    gt_ids: np.ndarray
    augmentation: GlobalAugmentation = field(default_factory=GlobalAugmentation)

    @property
    def num_agents(self) -> int:
        return len(self.agent_ids)

    @classmethod
    def single_agent(
        cls,
        points: np.ndarray,
        name: str = "single",
        gt_boxes: np.ndarray | None = None,
        gt_labels: np.ndarray | None = None,
        semantic: np.ndarray | None = None,
    ) -> CoopSample:
        """A one-agent sample from one scan in its own sensor frame (e.g. a KITTI velodyne file).

        Boxes, when given, are (M, 7) in the sensor frame and count as seen by the ego.
        """
        pts = np.ascontiguousarray(points, dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] != 4:
            raise ValueError(f"points must be (N, 4) x, y, z, intensity, got {pts.shape}")
        boxes = np.zeros((0, 7)) if gt_boxes is None else np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
        labels = np.zeros(len(boxes), np.int64) if gt_labels is None else np.asarray(gt_labels, np.int64)
        sem = np.zeros(len(pts), np.uint8) if semantic is None else np.asarray(semantic, np.uint8)
        sample = cls(
            run=name,
            frame=0,
            ego_id=0,
            agent_ids=np.zeros(1, np.int64),
            data_frames=np.zeros(1, np.int64),
            position_m=np.zeros((1, 3)),
            points=[pts],
            semantic=[sem],
            T_ego_from_agent=np.eye(4)[None].copy(),
            T_ego_from_agent_measured=np.eye(4)[None].copy(),
            gt_boxes=boxes,
            gt_labels=labels,
            gt_visibility=np.zeros(len(boxes), np.int8),
            gt_ids=np.arange(len(boxes), dtype=np.int64),
        )
        sample.validate()
        return sample

    def validate(self) -> None:
        """Check shapes and dtypes; raises ValueError."""
        a, m = len(self.agent_ids), len(self.gt_boxes)
        problems = []
        if a < 1 or self.agent_ids.shape != (a,):
            problems.append("agent_ids must be (A,) with A >= 1")
        if self.data_frames.shape != (a,):
            problems.append(f"data_frames must be ({a},)")
        if self.position_m.shape != (a, 3):
            problems.append(f"position_m must be ({a}, 3)")
        if len(self.points) != a or len(self.semantic) != a:
            problems.append(f"points and semantic must hold {a} arrays")
        for i, (pts, sem) in enumerate(zip(self.points, self.semantic, strict=False)):
            if pts.ndim != 2 or pts.shape[1] != 4 or pts.dtype != np.float32:
                problems.append(f"points[{i}] must be (N, 4) float32, got {pts.shape} {pts.dtype}")
            elif sem.shape != (len(pts),) or sem.dtype != np.uint8:
                problems.append(f"semantic[{i}] must be ({len(pts)},) uint8")
        for name in ("T_ego_from_agent", "T_ego_from_agent_measured"):
            value = getattr(self, name)
            if value.shape != (a, 4, 4) or value.dtype != np.float64:
                problems.append(f"{name} must be ({a}, 4, 4) float64, got {value.shape} {value.dtype}")
        if self.gt_boxes.shape != (m, 7):
            problems.append(f"gt_boxes must be (M, 7), got {self.gt_boxes.shape}")
        for name, dtype in (("gt_labels", np.int64), ("gt_visibility", np.int8), ("gt_ids", np.int64)):
            value = getattr(self, name)
            if value.shape != (m,) or value.dtype != dtype:
                problems.append(f"{name} must be ({m},) {np.dtype(dtype)}, got {value.shape} {value.dtype}")
        if problems:
            raise ValueError(f"invalid CoopSample {self.run}/{self.frame}/{self.ego_id}: " + "; ".join(problems))


class CoopDataset(torch.utils.data.Dataset):
    """PyTorch dataset of :class:`CoopSample` over the runs of a native dataset.

    Random draws (augmentation, pose noise) come from ``numpy.random.default_rng`` seeded with
    ``(config.seed, epoch, index[, agent_id])``; call :meth:`set_epoch` each epoch for new draws.
    The same configuration, epoch and index always give the same sample.
    """

    def __init__(self, config: CoopDatasetConfig) -> None:
        if not config.root:
            raise ValueError("CoopDatasetConfig.root is empty: give the dataset folder")
        self.config = config
        base = Path(config.root) / config.split if config.split else Path(config.root)
        if not base.exists():
            raise FileNotFoundError(f"no dataset folder {base}")
        self.runs = find_runs(base)
        if not self.runs:
            raise FileNotFoundError(f"no runs (folders of cav folders with frame yamls) under {base}")
        self.keys: list[SampleKey] = []
        self._cavs: dict[Path, list[int]] = {}
        self._first_frame: dict[Path, int] = {}
        for run in self.runs:
            cavs = list_cavs(run)
            frames = list_frames(run, cavs)
            if not frames:
                continue
            self._cavs[run] = cavs
            self._first_frame[run] = frames[0]
            egos = self._egos(run, cavs, frames[0])
            for frame in frames[:: config.frame_stride]:
                self.keys.extend(SampleKey(run, frame, ego) for ego in egos)
        if not self.keys:
            raise FileNotFoundError(f"no complete frames under {base}")
        self.epoch = 0
        self._cache: OrderedDict[tuple[Path, int, int], NativeAgentFrame] = OrderedDict()

    def _egos(self, run: Path, cavs: list[int], first_frame: int) -> list[int]:
        match self.config.ego:
            case "all":
                return list(cavs)
            case "lowest_id":
                return [cavs[0]]
            case "scene":
                frame = read_agent_frame(agent_frame_paths(run, cavs[0], first_frame).yaml)
                ego = frame.scene_ego_id
                return [ego if ego is not None and ego in cavs else cavs[0]]
        raise ValueError(f"unknown ego choice {self.config.ego!r}")

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, run: Path, cav: int, frame: int) -> NativeAgentFrame:
        key = (run, cav, frame)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = read_agent_frame(agent_frame_paths(run, cav, frame).yaml)
        if self.config.cache_frames > 0:
            self._cache[key] = data
            while len(self._cache) > self.config.cache_frames:
                self._cache.popitem(last=False)
        return data

    def __getitem__(self, index: int) -> CoopSample:
        if not 0 <= index < len(self.keys):
            raise IndexError(f"sample {index} out of range [0, {len(self.keys)})")
        return self.make_sample(self.keys[index], index)

    def make_sample(self, key: SampleKey, index: int) -> CoopSample:
        """Build the sample of ``key``; ``index`` seeds its random draws."""
        cfg = self.config
        run, frame, ego_id = key.run, key.frame, key.ego_id
        ego = self._read(run, ego_id, frame)
        T_sensor_from_world_ego = invert_T(ego.T_world_from_sensor)

        # connected agents: within range at this frame, nearest first (ties by id)
        others = {
            cav: self._read(run, cav, frame).T_world_from_sensor[:3, 3] for cav in self._cavs[run] if cav != ego_id
        }
        chosen = partners_in_range(ego.T_world_from_sensor[:3, 3], others, cfg.comm_range_m, cfg.max_agents)

        data_frame = max(self._first_frame[run], frame - cfg.delay_frames)
        frames = [ego] + [self._read(run, cav, data_frame) for cav in chosen]
        agent_ids = np.array([ego_id, *chosen], dtype=np.int64)

        T_true = np.stack([T_sensor_from_world_ego @ f.T_world_from_sensor for f in frames])  # (A, 4, 4)
        positions = T_true[:, :3, 3].copy()
        noise = cfg.pose_noise.model()
        measured = []
        for agent_id, f in zip(agent_ids, frames, strict=True):
            rng = np.random.default_rng([cfg.seed, self.epoch, index, int(agent_id)])
            measured.append(f.T_world_from_sensor if noise.is_zero else noise.apply(f.T_world_from_sensor, rng))
        T_measured = np.stack([invert_T(measured[0]) @ T for T in measured])

        boxes, labels, visibility, ids = self._ground_truth(frames, frame, T_sensor_from_world_ego)

        augmentation = GlobalAugmentation.identity()
        if cfg.training:
            augmentation = GlobalAugmentation.sample(cfg.augment, np.random.default_rng([cfg.seed, self.epoch, index]))
        points = [augmentation.apply_points(f.points) for f in frames]
        semantic = [
            f.semantic.copy() if f.semantic is not None else np.zeros(len(f.points), np.uint8) for f in frames
        ]
        T_true = augmentation.apply_pose(T_true)
        T_measured = augmentation.apply_pose(T_measured)
        T_true[0] = np.eye(4)  # exact, whatever rounding the conjugation left
        T_measured[0] = np.eye(4)
        boxes = augmentation.apply_boxes(boxes)

        keep = labels >= 0
        if cfg.gt_range is not None:
            x0, y0, x1, y1 = cfg.gt_range
            keep &= (boxes[:, 0] >= x0) & (boxes[:, 0] < x1) & (boxes[:, 1] >= y0) & (boxes[:, 1] < y1)
        if not cfg.keep_invisible:
            keep &= visibility != Visibility.NONE
        sample = CoopSample(
            run=run.name,
            frame=frame,
            ego_id=ego_id,
            agent_ids=agent_ids,
            data_frames=np.array([frame] + [data_frame] * len(chosen), dtype=np.int64),
            position_m=positions,
            points=points,
            semantic=semantic,
            T_ego_from_agent=T_true,
            T_ego_from_agent_measured=T_measured,
            gt_boxes=boxes[keep],
            gt_labels=labels[keep],
            gt_visibility=visibility[keep],
            gt_ids=ids[keep],
            augmentation=augmentation,
        )
        sample.validate()
        return sample

    def _ground_truth(
        self, frames: list[NativeAgentFrame], frame: int, T_sensor_from_world_ego: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (M, 7) in the ego frame, labels (M,), visibility (M,) int8, ids (M,).

        Vehicles come from the ego's list, then from the lists of agents whose data are from
        ``frame`` (ids not seen yet); the agents themselves are never their own ground truth.
        """
        cfg = self.config
        ego = frames[0]
        world_boxes: dict[int, np.ndarray] = {}
        kinds: dict[int, str | None] = {}
        for f in frames:
            if f.frame != frame:
                continue
            for i, vid in enumerate(f.vehicle_ids.tolist()):
                if vid == ego.cav_id or vid in world_boxes:
                    continue
                world_boxes[vid] = f.boxes_world[i]
                kinds[vid] = None if f.kinds is None else f.kinds[i]
        ids = np.array(sorted(world_boxes), dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, 7)), np.zeros(0, np.int64), np.zeros(0, np.int8), ids

        seen_by_ego = np.zeros(len(ids), bool)
        seen_by_other = np.zeros(len(ids), bool)
        where = {int(v): i for i, v in enumerate(ids)}
        for agent_index, f in enumerate(frames):
            listed = np.zeros(len(ids), bool)
            counts = np.zeros(len(ids), np.int64)
            for i, vid in enumerate(f.vehicle_ids.tolist()):
                if vid in where:
                    listed[where[vid]] = True
                    counts[where[vid]] = f.num_points[i] if f.num_points is not None else cfg.min_points
            seen = listed & (counts >= cfg.min_points)
            if agent_index == 0:
                seen_by_ego |= seen
            else:
                seen_by_other |= seen
        visibility = np.where(
            seen_by_ego, Visibility.EGO, np.where(seen_by_other, Visibility.OTHERS_ONLY, Visibility.NONE)
        ).astype(np.int8)
        boxes = transform_boxes(T_sensor_from_world_ego, np.stack([world_boxes[int(v)] for v in ids]))
        labels = np.array([cfg.label_of_kind(kinds[int(v)]) for v in ids], dtype=np.int64)
        return boxes, labels, visibility, ids
