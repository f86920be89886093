"""Observation sources of the driving env: which other vehicles each agent knows about.

An agent's observation lists the K nearest vehicles it knows about. Who those are depends on the
source, chosen by ``EnvConfig.obs``:

- ``oracle``: every vehicle (ground truth).
- ``ego_only``: the vehicles its own coarse LiDAR puts at least ``min_points`` returns on
  (:mod:`sim.env_visibility`); nothing is shared.
- ``visible``: those, plus the vehicles any other connected vehicle saw, as far as its message
  arrived: every connected vehicle broadcasts its visible vehicles as a ``DETECTIONS`` message
  (:class:`v2x.codecs.DetectionsCodec`, boxes in its sensor frame, its measured pose in the
  header) through the :class:`v2x.bus.BroadcastBus` (range, fading, airtime, latency). A receiver
  decodes each message, moves the boxes into the world frame with the header pose and matches
  them to vehicles by nearest centre; the matched vehicles' states are then taken from ground
  truth. The mode answers "which vehicles are known through sensing and the channel"; how well
  their states are estimated is the ``perception`` mode's question.
- ``perception`` (:mod:`sim.env_perception`): a trained cooperative perception checkpoint
  (:class:`PerceptionObsConfig`) runs on full LiDAR scans of the agent (as the ego) and of the
  connected vehicles within the checkpoint's communication range, its messages going through
  :class:`models.comm.V2XLink` over the env's channel; what an agent observes are the detected
  boxes and the velocities a small tracker estimates from them (:meth:`ObservationSource.estimates`),
  not ground-truth states. ``visible`` is the fast mode to train with, ``perception`` the honest
  one to evaluate with.

Every source implements :class:`ObservationSource`. ``known`` answers which vehicles an observer
knows; a source that estimates their states itself (``perception``) also answers ``estimates``, and
the env then builds observations from those estimates; the others return None there and the env
reads the known vehicles' states from ground truth. Rewards, collisions and episode ends are
always ground truth.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from sim.env_visibility import VisibilityCaster, VisibilityConfig
from sim.geometry import T_from_xyz_yaw, invert_T, transform_boxes
from sim.lidar import LIDAR_PRESETS
from sim.types import ActorKind, SceneFrame
from v2x.bus import Delivery
from v2x.codecs import DetectionsCodec, DetectionSet
from v2x.message import CodecId, DecodeError, Message, decode, encode
from v2x.pose_noise import PoseNoise

__all__ = [
    "GroundTruthSource",
    "LinkTraffic",
    "ObjectEstimates",
    "ObsMode",
    "ObservationSource",
    "PerceptionObsConfig",
    "VisibleSource",
    "frame_boxes",
    "make_source",
    "nearest_within",
    "sensor_pose",
]


class ObsMode(str, enum.Enum):
    """Where an agent's knowledge of other vehicles comes from (see the module docstring)."""

    ORACLE = "oracle"
    EGO_ONLY = "ego_only"
    VISIBLE = "visible"
    PERCEPTION = "perception"


@dataclass(frozen=True)
class PerceptionObsConfig:
    """The cooperative perception checkpoint behind the ``perception`` mode (:mod:`sim.env_perception`)."""

    checkpoint: str | None = None
    """run folder of tools/train.py (``config.yaml`` + ``checkpoint.pt``) or its ``checkpoint.pt``;
    required for obs=perception"""
    lidar: str | None = None
    """LiDAR preset (sim.lidar.LIDAR_PRESETS) the vehicles scan with; None: the sensor recorded in
    the manifests of the checkpoint's training data (an error when that data is not on this
    machine: the model only works on the kind of scans it was trained on)"""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    score_threshold: float = 0.3
    """detections scoring below this are not observed (the checkpoints decode down to 0.05 with
    up to 60 boxes for AP; a planner needs the confident ones)"""
    track_gate_m: float = 2.0
    """a detection continues a track whose predicted centre is this close (plus, for a track seen
    once and so without a velocity yet, the distance a 25 m/s vehicle covers in between)"""
    track_smoothing: float = 0.5
    """weight of the newest finite-difference velocity in a track's velocity (1: no smoothing)"""

    def paths(self) -> tuple[Path, Path]:
        """(run folder, checkpoint file) of ``checkpoint``."""
        if not self.checkpoint:
            raise ValueError("no perception checkpoint given")
        path = Path(self.checkpoint)
        if path.suffix == ".pt":
            return path.parent, path
        return path, path / "checkpoint.pt"

    def validate(self, required: bool) -> None:
        """Check the settings; with ``required`` (obs=perception) also that the checkpoint's files
        exist. Raises ValueError."""
        problems = []
        if self.lidar is not None and self.lidar not in LIDAR_PRESETS:
            problems.append(
                f"perception.lidar {self.lidar!r} is no LiDAR preset; valid: {sorted(LIDAR_PRESETS)}"
            )
        if self.device not in ("cpu", "cuda", "auto"):
            problems.append(f"perception.device must be cpu, cuda or auto, got {self.device!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            problems.append(f"perception.score_threshold must be in [0, 1], got {self.score_threshold}")
        if not self.track_gate_m > 0:
            problems.append(f"perception.track_gate_m must be > 0, got {self.track_gate_m}")
        if not 0.0 < self.track_smoothing <= 1.0:
            problems.append(f"perception.track_smoothing must be in (0, 1], got {self.track_smoothing}")
        if required:
            if not self.checkpoint:
                problems.append(
                    "obs=perception needs perception.checkpoint: a cooperative perception run folder "
                    "of tools/train.py (config.yaml and checkpoint.pt)"
                )
            else:
                run, checkpoint = self.paths()
                if not checkpoint.is_file() or not (run / "config.yaml").is_file():
                    problems.append(
                        f"perception.checkpoint {self.checkpoint}: no checkpoint.pt and config.yaml "
                        "of a tools/train.py run there"
                    )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class ObjectEstimates:
    """What an observer's own estimation says about the vehicles around it now, world frame.

    Attributes:
        boxes: (K, 7) float64 bottom-centre boxes (mmdet3d convention).
        velocities: (K, 2) float64 world x, y velocities, m/s.
        scores: (K,) float64 detection confidence.
    """

    boxes: np.ndarray
    velocities: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> ObjectEstimates:
        return cls(np.zeros((0, 7)), np.zeros((0, 2)), np.zeros(0))

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class LinkTraffic:
    """What a source sent in one decision over a link of its own rather than the env's bus
    (the perception model's messages go through :class:`models.comm.V2XLink`)."""

    bytes_on_air: int = 0
    messages: int = 0


def frame_boxes(frame: SceneFrame) -> np.ndarray:
    """(M, 7) ``frame.boxes_world`` (the same values), built from all agents at once: the property
    builds one box per agent, and the env asks for them several times a decision."""
    if not frame.agents:
        return np.zeros((0, 7))
    T = np.stack([a.T_world_from_agent for a in frame.agents])  # (M, 4, 4)
    extent = np.stack([a.extent for a in frame.agents])  # (M, 3)
    yaw = np.arctan2(T[:, 1, 0], T[:, 0, 0])  # sim.geometry.yaw_of, as AgentState.box
    return np.concatenate([T[:, :3, 3], extent, yaw[:, None]], axis=1).astype(np.float64, copy=False)


def sensor_pose(frame: SceneFrame, index: int, mount_z: float) -> np.ndarray:
    """(4, 4) ``T_world_from_sensor`` of ``frame.agents[index]``: roof centre + ``mount_z``."""
    agent = frame.agents[index]
    return agent.T_world_from_agent @ T_from_xyz_yaw(0.0, 0.0, float(agent.extent[2]) + mount_z, 0.0)


def nearest_within(points: np.ndarray, targets: np.ndarray, gate_m: float) -> np.ndarray:
    """(D,) int64 index of the nearest of ``targets`` (T, 2) to each of ``points`` (D, 2), or -1
    where none is within ``gate_m``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    targets = np.asarray(targets, dtype=np.float64).reshape(-1, 2)
    if len(points) == 0 or len(targets) == 0:
        return np.full(len(points), -1, dtype=np.int64)
    d = np.linalg.norm(points[:, None, :] - targets[None, :, :], axis=-1)  # (D, T)
    nearest = np.argmin(d, axis=1)
    return np.where(d[np.arange(len(points)), nearest] <= gate_m, nearest, -1).astype(np.int64)


class ObservationSource(Protocol):
    """What the env asks of a source, once per decision: ``sense``, then ``known``, then
    ``link_traffic`` and, while building observations, ``estimates``."""

    mode: ObsMode

    def reset(self, world, seed: int) -> None:
        """Start an episode on ``world`` (an :class:`sim.world.EmbeddedWorld` just reset)."""

    def sense(self, frame: SceneFrame, observer_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        """Sense ``frame`` and return the messages to broadcast, ``(sender id, wire bytes)``."""

    def known(
        self, frame: SceneFrame, observer_ids: Sequence[int], received: Mapping[int, list[Delivery]]
    ) -> dict[int, np.ndarray]:
        """Observer id -> (M,) bool over ``frame.agents``: the vehicles it knows about now.

        ``received`` holds this decision's deliveries per receiver (all codecs; a source picks
        its own). An observer never "knows" itself.
        """

    def estimates(self, observer: int) -> ObjectEstimates | None:
        """The observer's own estimates of the vehicles it knows, from the last ``sense``; None
        when the source makes none (the env then takes the known vehicles' ground-truth states)."""

    def link_traffic(self) -> LinkTraffic:
        """Bytes and messages the last ``sense`` sent outside the env's bus (counted in the env's
        ``bytes_sent``)."""


class GroundTruthSource:
    """``oracle``: every vehicle is known; nothing is sent."""

    mode = ObsMode.ORACLE

    def reset(self, world, seed: int) -> None:
        pass

    def sense(self, frame: SceneFrame, observer_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        return []

    def known(
        self, frame: SceneFrame, observer_ids: Sequence[int], received: Mapping[int, list[Delivery]]
    ) -> dict[int, np.ndarray]:
        ids = frame.agent_ids
        return {o: ids != o for o in observer_ids}

    def estimates(self, observer: int) -> ObjectEstimates | None:
        return None

    def link_traffic(self) -> LinkTraffic:
        return LinkTraffic()


class VisibleSource:
    """``ego_only`` (``cooperative=False``) and ``visible`` (``cooperative=True``).

    Args:
        cooperative: whether connected vehicles share what they see.
        visibility: the coarse LiDAR.
        pose_noise: localisation error on the pose each sender puts in its header.
        match_gate_m: a received box is matched to the nearest vehicle within this distance
            (plus 30 m/s times the message's age).
    """

    def __init__(
        self,
        cooperative: bool,
        visibility: VisibilityConfig,
        pose_noise: PoseNoise | None = None,
        match_gate_m: float = 3.0,
    ) -> None:
        self.mode = ObsMode.VISIBLE if cooperative else ObsMode.EGO_ONLY
        self.cooperative = cooperative
        self.visibility = visibility
        self.pose_noise = pose_noise or PoseNoise()
        self.match_gate_m = float(match_gate_m)
        self.codec = DetectionsCodec()
        self._caster: VisibilityCaster | None = None
        self._seed = 0
        self._seq: dict[int, int] = {}
        self._own: dict[int, np.ndarray] = {}
        self._boxes_of: tuple[SceneFrame | None, np.ndarray] = (None, np.zeros((0, 7)))

    def reset(self, world, seed: int) -> None:
        self._caster = VisibilityCaster(world.static_geometry(), self.visibility)
        self._seed = int(seed)
        self._seq = {}
        self._own = {}
        self._boxes_of = (None, np.zeros((0, 7)))

    def _boxes(self, frame: SceneFrame) -> np.ndarray:
        """(M, 7) world boxes of ``frame``, worked out once for sense() and known()."""
        if self._boxes_of[0] is not frame:
            self._boxes_of = (frame, frame_boxes(frame))
        return self._boxes_of[1]

    def sense(self, frame: SceneFrame, observer_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        assert self._caster is not None, "reset() first"
        ids = frame.agent_ids
        boxes_world = self._boxes(frame)
        index_of = {int(i): k for k, i in enumerate(ids)}
        sensing = frame.connected_ids if self.cooperative else [o for o in observer_ids if o in index_of]
        observers = np.array([index_of[s] for s in sensing], dtype=np.int64)
        visible = self._caster.visible(boxes_world, observers)  # (S, M)
        self._own = {s: visible[k] for k, s in enumerate(sensing)}
        if not self.cooperative:
            return []
        outgoing = []
        labels = np.array([_KIND_LABELS[a.kind] for a in frame.agents], dtype=np.int64)
        noisy = not self.pose_noise.is_zero
        for k, sender in enumerate(sensing):
            T_true = sensor_pose(frame, int(observers[k]), self.visibility.mount_z)
            T_measured = T_true
            if noisy:
                rng = np.random.default_rng([self._seed, frame.frame, sender])
                T_measured = self.pose_noise.apply(T_true, rng)
            mask = visible[k]
            # the sender describes what it saw in its own (true) sensor frame
            boxes_sensor = transform_boxes(invert_T(T_true), boxes_world[mask])
            payload = self.codec.encode(DetectionSet(boxes_sensor, np.ones(int(mask.sum())), labels[mask]))
            seq = self._seq.get(sender, 0)
            self._seq[sender] = seq + 1
            message = Message.from_pose(
                sender, seq, round(frame.time_s * 1e6), T_measured, CodecId.DETECTIONS, payload
            )
            outgoing.append((sender, encode(message)))
        return outgoing

    def known(
        self, frame: SceneFrame, observer_ids: Sequence[int], received: Mapping[int, list[Delivery]]
    ) -> dict[int, np.ndarray]:
        ids = frame.agent_ids
        m = len(ids)
        centres = self._boxes(frame)[:, :2] if m else np.zeros((0, 2))
        out = {}
        matches: dict[bytes, np.ndarray | None] = {}  # a broadcast reaches several receivers: decode once
        for observer in observer_ids:
            known = self._own.get(observer, np.zeros(m, dtype=bool)).copy()
            if self.cooperative:
                for delivery in received.get(observer, []):
                    if delivery.data not in matches:
                        matches[delivery.data] = self._match(delivery.data, frame.time_s, centres)
                    matched = matches[delivery.data]
                    if matched is not None:
                        known[matched] = True
            known &= ids != observer
            out[observer] = known
        return out

    def estimates(self, observer: int) -> ObjectEstimates | None:
        return None

    def link_traffic(self) -> LinkTraffic:
        return LinkTraffic()  # its detections go on the env's bus

    def _match(self, data: bytes, now_s: float, centres: np.ndarray) -> np.ndarray | None:
        """Indices of the vehicles a detections message describes, or None for other messages."""
        try:
            message = decode(data)
        except DecodeError:
            return None
        if message.codec is not CodecId.DETECTIONS or len(centres) == 0:
            return None
        detections = self.codec.decode(message.payload)
        if len(detections.boxes) == 0:
            return np.zeros(0, dtype=np.int64)
        boxes_world = transform_boxes(_pose_of(message), detections.boxes.astype(np.float64))
        gate = self.match_gate_m + 30.0 * max(now_s - message.timestamp_s, 0.0)
        nearest = nearest_within(boxes_world[:, :2], centres, gate)
        return nearest[nearest >= 0]


def _pose_of(message: Message) -> np.ndarray:
    """The header pose as a matrix; the flat-ground case without the quaternion path (exact)."""
    x, y, z, roll, pitch, yaw = message.pose_xyzrpy
    if roll == 0.0 and pitch == 0.0:
        return T_from_xyz_yaw(x, y, z, yaw)
    return message.T_world_from_sensor


# class index carried in DETECTIONS labels: the order of sim.types.ActorKind
_KIND_LABELS = {kind: index for index, kind in enumerate(ActorKind)}


def make_source(
    mode: ObsMode | str,
    visibility: VisibilityConfig,
    pose_noise: PoseNoise | None = None,
    perception: PerceptionObsConfig | None = None,
    channel: str = "dsrc",
    decision_s: float = 0.2,
    airtime_budget_s: float | None = None,
) -> ObservationSource:
    """The source for ``mode``; ``ValueError`` for unknown modes and for ``perception`` without a
    loadable checkpoint.

    ``channel``, ``decision_s`` (the time between decisions) and ``airtime_budget_s`` set the link
    the perception model's messages go through; the other sources put theirs on the env's bus.
    """
    try:
        mode = ObsMode(mode)
    except ValueError:
        raise ValueError(f"unknown obs mode {mode!r}; valid: {[m.value for m in ObsMode]}") from None
    match mode:
        case ObsMode.ORACLE:
            return GroundTruthSource()
        case ObsMode.EGO_ONLY:
            return VisibleSource(False, visibility, pose_noise)
        case ObsMode.VISIBLE:
            return VisibleSource(True, visibility, pose_noise)
        case ObsMode.PERCEPTION:
            perception = perception or PerceptionObsConfig()
            perception.validate(required=True)
            # torch and the perception model load only for this mode: the env itself stays torch-free
            from sim.env_perception import PerceptionSource

            return PerceptionSource(perception, pose_noise, channel, decision_s, airtime_budget_s)
    raise ValueError(f"unknown obs mode {mode!r}")
