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
- ``perception``: a trained cooperative perception model on the scans; not available yet.

Every source implements :class:`ObservationSource`, so a perception source only has to provide
the same three methods.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from sim.env_visibility import VisibilityCaster, VisibilityConfig
from sim.geometry import T_from_xyz_yaw, invert_T, transform_boxes
from sim.types import ActorKind, SceneFrame
from v2x.bus import Delivery
from v2x.codecs import DetectionsCodec, DetectionSet
from v2x.message import CodecId, DecodeError, Message, decode, encode
from v2x.pose_noise import PoseNoise

__all__ = [
    "PERCEPTION_UNAVAILABLE",
    "GroundTruthSource",
    "ObsMode",
    "ObservationSource",
    "VisibleSource",
    "make_source",
    "sensor_pose",
]

PERCEPTION_UNAVAILABLE = (
    "observation mode 'perception' is not available yet: needs a trained cooperative perception "
    "checkpoint (see the perception issue)"
)


class ObsMode(str, enum.Enum):
    """Where an agent's knowledge of other vehicles comes from (see the module docstring)."""

    ORACLE = "oracle"
    EGO_ONLY = "ego_only"
    VISIBLE = "visible"
    PERCEPTION = "perception"


def sensor_pose(frame: SceneFrame, index: int, mount_z: float) -> np.ndarray:
    """(4, 4) ``T_world_from_sensor`` of ``frame.agents[index]``: roof centre + ``mount_z``."""
    agent = frame.agents[index]
    return agent.T_world_from_agent @ T_from_xyz_yaw(0.0, 0.0, float(agent.extent[2]) + mount_z, 0.0)


class ObservationSource(Protocol):
    """What the env asks of a source, once per decision, in this order."""

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

    def reset(self, world, seed: int) -> None:
        self._caster = VisibilityCaster(world.static_geometry(), self.visibility)
        self._seed = int(seed)
        self._seq = {}
        self._own = {}

    def sense(self, frame: SceneFrame, observer_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        assert self._caster is not None, "reset() first"
        ids = frame.agent_ids
        boxes_world = frame.boxes_world
        index_of = {int(i): k for k, i in enumerate(ids)}
        sensing = frame.connected_ids if self.cooperative else [o for o in observer_ids if o in index_of]
        observers = np.array([index_of[s] for s in sensing], dtype=np.int64)
        visible = self._caster.visible(boxes_world, observers)  # (S, M)
        self._own = {s: visible[k] for k, s in enumerate(sensing)}
        if not self.cooperative:
            return []
        outgoing = []
        labels = np.array([_KIND_LABELS[a.kind] for a in frame.agents], dtype=np.int64)
        for k, sender in enumerate(sensing):
            T_true = sensor_pose(frame, int(observers[k]), self.visibility.mount_z)
            T_measured = T_true
            if not self.pose_noise.is_zero:
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
        centres = frame.boxes_world[:, :2] if m else np.zeros((0, 2))
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
        d = np.linalg.norm(boxes_world[:, None, :2] - centres[None, :, :], axis=-1)  # (D, M)
        nearest = np.argmin(d, axis=1)
        ok = d[np.arange(len(d)), nearest] <= gate
        return nearest[ok]


def _pose_of(message: Message) -> np.ndarray:
    """The header pose as a matrix; the flat-ground case without the quaternion path (exact)."""
    x, y, z, roll, pitch, yaw = message.pose_xyzrpy
    if roll == 0.0 and pitch == 0.0:
        return T_from_xyz_yaw(x, y, z, yaw)
    return message.T_world_from_sensor


# class index carried in DETECTIONS labels: the order of sim.types.ActorKind
_KIND_LABELS = {kind: index for index, kind in enumerate(ActorKind)}


def make_source(
    mode: ObsMode | str, visibility: VisibilityConfig, pose_noise: PoseNoise | None = None
) -> ObservationSource:
    """The source for ``mode``; ``ValueError`` for ``perception`` (not available yet) and unknown modes."""
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
            raise ValueError(PERCEPTION_UNAVAILABLE)
    raise ValueError(f"unknown obs mode {mode!r}")
