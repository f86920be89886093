"""The ``perception`` observation source: a trained cooperative perception checkpoint in the loop.

Every decision, for each agent (the observer, as the ego of one sample):

1. **Scans.** The agent and the connected vehicles whose sensors are within the checkpoint's
   communication range of its own (nearest first, at most the checkpoint's ``max_agents`` with
   the agent; none for a ``none``-fusion checkpoint, which reads only the ego's scan) cast a full
   sweep of the checkpoint's LiDAR (:meth:`sim.world.EmbeddedWorld.scan_agent`: the mount, the
   generator seeding and the ground classes of the World's own scans, so the scans are those
   ``tools/generate.py`` writes for training). Each vehicle is cast once per decision, however many samples use it.
2. **Sample.** A :class:`datasets.coop_dataset.CoopSample` as the dataset builds one: points in
   each vehicle's sensor frame, ``T_ego_from_agent`` true and measured (the env's pose noise on
   every sensor pose, the agent's included), sensor positions for the channel, no ground truth.
3. **Model.** ``CooperativePerception(batch, link, with_detections=True)`` in eval mode without
   gradients, every observer's sample in one batch. The :class:`models.comm.V2XLink` encodes,
   sends over the env's channel (the time between decisions is the link's tick) and decodes every
   message; the bytes it measured are added to the env's ``bytes_sent``.
4. **Estimates.** Boxes scoring at least ``score_threshold``, less any on the agent's own
   footprint (other vehicles' points on the agent can show up in a fused cloud), are moved from
   the agent's sensor frame to the world with its true pose (the agent's own state is ground
   truth in its observation, so its detections keep exactly the relative position the model
   gave). A :class:`DetectionTracker` per agent gives them velocities.

``known`` marks the vehicles some kept detection lies within 3 m of (nearest centre): not what the
observation is built from, but what ``known_ids``, the ``--record`` pictures and the consumers
that still read ground truth of known vehicles (the safety supervisor) see.

Costs on the 2-core CPU: one vlp16 sweep is a few milliseconds to cast; the model dominates
(see docs/results.md for the per-method inference times).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.collate import CoopCollate
from datasets.coop_dataset import CoopSample, partners_in_range
from datasets.native import find_runs, read_manifest
from models.comm import V2XLink
from models.config import ConfigError
from models.experiment import ExperimentConfig, load_experiment, resolve_device
from models.perception import CooperativePerception
from sim.env_obs import LinkTraffic, ObjectEstimates, ObsMode, PerceptionObsConfig, nearest_within
from sim.geometry import invert_T, transform_boxes
from sim.lidar import T_agent_from_lidar, lidar_preset
from sim.types import AgentState, LidarConfig, SceneFrame, Semantic
from v2x.bus import Delivery
from v2x.pose_noise import PoseNoise

__all__ = ["DetectionTracker", "PerceptionSource", "training_lidar"]

_KNOWN_GATE_M = 3.0  # a vehicle is "known" with a kept detection's centre this close
_SELF_MARGIN_M = 1.0  # detections centred on the agent's footprint grown by this are its own body
_TRACK_MAX_SPEED_MPS = 25.0  # bounds how far a vehicle seen once may have moved by the next decision
_TRACK_MAX_AGE_S = 0.6  # a track not detected for longer is dropped


@dataclass
class _Track:
    """One vehicle followed across decisions (world frame)."""

    centre: np.ndarray
    """(2,) last detected centre"""
    velocity: np.ndarray
    """(2,) m/s; zero until the second detection"""
    time_s: float
    """when last detected"""
    hits: int


class DetectionTracker:
    """Velocities of one observer's detections, from the detections of earlier decisions.

    Association is greedy nearest centre: every (track, detection) pair within the track's gate is
    taken in order of distance between the detection and the track's centre predicted at constant
    velocity, skipping pairs whose track or detection is already taken. A track with a velocity
    (seen twice or more) gates at ``gate_m`` around its prediction; one seen once has no velocity,
    so its gate grows by what a ``max_speed_mps`` vehicle covers in the time since. A matched
    track's velocity is the finite difference of its centres, smoothed exponentially with weight
    ``smoothing`` on the newest difference (the first difference is taken as it is); a new track
    starts at zero velocity. Tracks not detected for ``max_age_s`` are dropped.

    Why written here: no multi-object tracking library is among the dependencies (filterpy, motpy,
    norfair are not installed), and what the env needs, a gated greedy association and a smoothed
    finite difference on a few boxes per decision, is a few dozen lines. With detection centres
    jittering by a few decimetres between decisions 0.2 s apart, a raw difference is off by about
    2 m/s; smoothing with 0.5 cuts the noise's variance to a third at one decision of lag.
    """

    def __init__(
        self,
        gate_m: float = 2.0,
        smoothing: float = 0.5,
        max_speed_mps: float = _TRACK_MAX_SPEED_MPS,
        max_age_s: float = _TRACK_MAX_AGE_S,
    ) -> None:
        if not gate_m > 0 or not 0.0 < smoothing <= 1.0 or max_speed_mps < 0 or not max_age_s > 0:
            raise ValueError(
                "DetectionTracker: gate_m > 0, 0 < smoothing <= 1, max_speed_mps >= 0, max_age_s > 0"
            )
        self.gate_m = float(gate_m)
        self.smoothing = float(smoothing)
        self.max_speed_mps = float(max_speed_mps)
        self.max_age_s = float(max_age_s)
        self.tracks: list[_Track] = []

    def reset(self) -> None:
        self.tracks = []

    def update(self, time_s: float, centres: np.ndarray) -> np.ndarray:
        """Take this decision's detection centres (D, 2) world x, y; return their (D, 2) velocities."""
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        self.tracks = [t for t in self.tracks if time_s - t.time_s <= self.max_age_s]
        velocities = np.zeros((len(centres), 2))
        track_of = np.full(len(centres), -1, dtype=np.int64)
        if self.tracks and len(centres):
            elapsed = np.array([time_s - t.time_s for t in self.tracks])  # (T,)
            predicted = np.stack(
                [t.centre + t.velocity * dt for t, dt in zip(self.tracks, elapsed, strict=True)]
            )
            gate = np.array(
                [
                    self.gate_m + (self.max_speed_mps * dt if t.hits < 2 else 0.0)
                    for t, dt in zip(self.tracks, elapsed, strict=True)
                ]
            )
            d = np.linalg.norm(predicted[:, None, :] - centres[None, :, :], axis=-1)  # (T, D)
            pairs = np.argwhere(d <= gate[:, None])
            taken_track = np.zeros(len(self.tracks), dtype=bool)
            for k, j in pairs[np.argsort(d[pairs[:, 0], pairs[:, 1]], kind="stable")]:
                if taken_track[k] or track_of[j] >= 0:
                    continue
                taken_track[k], track_of[j] = True, k
        for j, centre in enumerate(centres):
            k = int(track_of[j])
            if k < 0:
                self.tracks.append(_Track(centre.copy(), np.zeros(2), float(time_s), 1))
                continue
            track = self.tracks[k]
            dt = time_s - track.time_s
            if dt > 0:
                difference = (centre - track.centre) / dt
                a = 1.0 if track.hits < 2 else self.smoothing
                track.velocity = a * difference + (1.0 - a) * track.velocity
            track.centre, track.time_s, track.hits = centre.copy(), float(time_s), track.hits + 1
            velocities[j] = track.velocity
        return velocities


def training_lidar(experiment: ExperimentConfig) -> LidarConfig | None:
    """The LiDAR recorded in the manifests of a perception run's training data (its runs must
    agree), or None when that data is not on this machine or has no manifests."""
    base = (
        Path(experiment.data.root) / experiment.data.split
        if experiment.data.split
        else Path(experiment.data.root)
    )
    if not experiment.data.root or not base.is_dir():
        return None
    lidars = []
    for run in find_runs(base):
        try:
            lidars.append(LidarConfig(**read_manifest(run).lidar))
        except (FileNotFoundError, ValueError, TypeError):
            continue
    if not lidars:
        return None
    if any(lidar != lidars[0] for lidar in lidars[1:]):
        raise ValueError(f"the runs under {base} were scanned with different LiDARs; give perception.lidar")
    return lidars[0]


class PerceptionSource:
    """``perception``: see the module docstring.

    Args:
        config: the checkpoint and the decoding and tracking settings.
        pose_noise: localisation error on every sensor pose (the env's).
        channel: radio channel of the model's messages (``ideal``, ``dsrc``, ``lte_v2x``).
        decision_s: seconds between decisions, the link's tick (a message later than that misses
            the decision).
        airtime_budget_s: medium time per decision for the model's messages (None: all of it).

    Raises:
        ValueError: the checkpoint cannot be loaded, or its LiDAR is unknown.
    """

    mode = ObsMode.PERCEPTION

    def __init__(
        self,
        config: PerceptionObsConfig,
        pose_noise: PoseNoise | None = None,
        channel: str = "dsrc",
        decision_s: float = 0.2,
        airtime_budget_s: float | None = None,
    ) -> None:
        config.validate(required=True)
        self.config = config
        run, checkpoint = config.paths()
        try:
            self.experiment = load_experiment(run / "config.yaml")
        except (ConfigError, ValueError, OSError) as err:
            raise ValueError(f"perception checkpoint {run}: cannot read its config.yaml ({err})") from None
        self.device = resolve_device(config.device)
        self.model = CooperativePerception(self.experiment.model)
        try:
            weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
        except Exception as err:  # a truncated or foreign file fails in many ways
            raise ValueError(
                f"perception checkpoint {checkpoint}: cannot load its weights ({err!r})"
            ) from None
        missing, _ = self.model.load_state_dict(weights, strict=False)
        if missing:
            raise ValueError(
                f"perception checkpoint {checkpoint} has no weights for {', '.join(missing[:5])}"
            )
        self.model = self.model.to(self.device).eval()
        if config.lidar is not None:
            self.lidar = lidar_preset(config.lidar)
        else:
            lidar = training_lidar(self.experiment)
            if lidar is None:
                raise ValueError(
                    f"perception checkpoint {run}: its training data ({self.experiment.data.root}) is not "
                    "on this machine to tell which LiDAR it was scanned with; give the preset with "
                    "perception.lidar (tools/eval_closed_loop.py: --perception-lidar), e.g. vlp16"
                )
            self.lidar = lidar
        self.lidar.validate()
        self.pose_noise = pose_noise or PoseNoise()
        self._link_config = dataclasses.replace(
            self.experiment.link,
            channel=channel,
            tick_s=float(decision_s),
            airtime_budget_s=float(airtime_budget_s or 0.0),
        )
        self._link_config.channel_config()  # an unknown channel fails here
        self.link = V2XLink(self._link_config)
        self.collate = CoopCollate(self.experiment.model.grid)
        self.comm_range_m = float(self.experiment.data.comm_range_m)
        self.max_agents = int(self.experiment.data.max_agents)
        self.cooperative = self.experiment.model.fusion.method != "none"
        self._world = None
        self._seed = 0
        self._decision = 0
        self._trackers: dict[int, DetectionTracker] = {}
        self._estimates: dict[int, ObjectEstimates] = {}
        self._traffic = LinkTraffic()

    # ------------------------------------------------------------------------------ protocol

    def reset(self, world, seed: int) -> None:
        self._world = world
        self._seed = int(seed)
        self._decision = 0
        self.link = V2XLink(dataclasses.replace(self._link_config, seed=self._seed))
        self._trackers = {}
        self._estimates = {}
        self._traffic = LinkTraffic()

    def sense(self, frame: SceneFrame, observer_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        """Run the model for every observer; its messages went through the model's own link, so
        nothing is returned for the env's bus."""
        assert self._world is not None, "reset() first"
        index_of = {a.id: k for k, a in enumerate(frame.agents)}
        observers = [int(o) for o in observer_ids if o in index_of]
        decision = self._decision
        self._decision += 1
        self._estimates = {}
        self._traffic = LinkTraffic()
        if not observers:
            return []
        connected = [i for i in frame.connected_ids if i in index_of]
        poses = {i: self._sensor_pose(frame.agents[index_of[i]]) for i in {*observers, *connected}}
        boxes_world = frame.boxes_world
        ids = frame.agent_ids
        semantic = np.array([Semantic.of_kind(a.kind) for a in frame.agents], dtype=np.uint8)
        scans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def scan(vid: int) -> tuple[np.ndarray, np.ndarray]:
            if vid not in scans:
                agent = frame.agents[index_of[vid]]
                hits = self._world.scan_agent(agent, boxes_world, ids, semantic, self.lidar)
                scans[vid] = (hits.points, hits.semantic)
            return scans[vid]

        samples = []
        for observer in observers:
            agents = [observer, *self._partners(observer, connected, poses)]
            samples.append(self._sample(frame, decision, agents, poses, scan))
        batch = self.collate(samples).to(self.device)
        with torch.no_grad():
            output, _ = self.model(batch, self.link, with_loss=False, with_detections=True)
        records = [r for sample in output.link.records for r in sample]
        self._traffic = LinkTraffic(bytes_on_air=sum(r.nbytes for r in records), messages=len(records))
        assert output.detections is not None
        for s, observer in enumerate(observers):
            detections = output.detections[s]
            keep = detections.scores >= self.config.score_threshold
            boxes = transform_boxes(poses[observer], detections.boxes[keep].astype(np.float64))
            scores = detections.scores[keep].astype(np.float64)
            own = self._on_own_footprint(frame.agents[index_of[observer]], boxes)
            boxes, scores = boxes[~own], scores[~own]
            tracker = self._trackers.setdefault(
                observer, DetectionTracker(self.config.track_gate_m, self.config.track_smoothing)
            )
            velocities = tracker.update(frame.time_s, boxes[:, :2])
            self._estimates[observer] = ObjectEstimates(boxes, velocities, scores)
        return []

    def known(
        self, frame: SceneFrame, observer_ids: Sequence[int], received: Mapping[int, list[Delivery]]
    ) -> dict[int, np.ndarray]:
        ids = frame.agent_ids
        centres = frame.boxes_world[:, :2] if len(ids) else np.zeros((0, 2))
        out = {}
        for observer in observer_ids:
            known = np.zeros(len(ids), dtype=bool)
            estimates = self._estimates.get(int(observer))
            if estimates is not None and len(estimates):
                others = np.flatnonzero(ids != observer)
                match = nearest_within(estimates.boxes[:, :2], centres[others], _KNOWN_GATE_M)
                known[others[match[match >= 0]]] = True
            out[observer] = known
        return out

    def estimates(self, observer: int) -> ObjectEstimates | None:
        """The observer's detections of the last decision (none when it was not sensed)."""
        return self._estimates.get(int(observer), ObjectEstimates.empty())

    def link_traffic(self) -> LinkTraffic:
        return self._traffic

    # ------------------------------------------------------------------------------ internals

    def _sensor_pose(self, agent: AgentState) -> np.ndarray:
        """(4, 4) ``T_world_from_sensor`` of the perception LiDAR on ``agent``, as the World mounts it."""
        return agent.T_world_from_agent @ T_agent_from_lidar(self.lidar, agent.extent[2])

    def _partners(self, observer: int, connected: list[int], poses: dict[int, np.ndarray]) -> list[int]:
        """Connected vehicles whose sensors are within range of the observer's, nearest first (ties
        by id), at most ``max_agents - 1``; none for a model that reads only the ego's scan."""
        if not self.cooperative:
            return []
        others = {other: poses[other][:3, 3] for other in connected if other != observer}
        return partners_in_range(poses[observer][:3, 3], others, self.comm_range_m, self.max_agents)

    def _sample(self, frame: SceneFrame, decision: int, agents: list[int], poses, scan) -> CoopSample:
        """The observer's (``agents[0]``) sample of this decision, as ``CoopDataset`` makes one."""
        T_world_from_sensor = [poses[a] for a in agents]
        T_ego_from_world = invert_T(T_world_from_sensor[0])
        T_true = np.stack([T_ego_from_world @ T for T in T_world_from_sensor])  # (A, 4, 4)
        if self.pose_noise.is_zero:
            T_measured = T_true.copy()
        else:
            measured = [
                self.pose_noise.apply(T, np.random.default_rng([self._seed, frame.frame, a]))
                for a, T in zip(agents, T_world_from_sensor, strict=True)
            ]
            T_measured = np.stack([invert_T(measured[0]) @ T for T in measured])
        T_true[0] = np.eye(4)
        T_measured[0] = np.eye(4)
        clouds = [scan(a) for a in agents]
        return CoopSample(
            run=f"episode{self._seed}",
            frame=decision,  # the link's tick: message timestamps are decision x decision_s
            ego_id=agents[0],
            agent_ids=np.array(agents, dtype=np.int64),
            data_frames=np.full(len(agents), decision, dtype=np.int64),
            position_m=T_true[:, :3, 3].copy(),
            points=[points for points, _ in clouds],
            semantic=[semantic for _, semantic in clouds],
            T_ego_from_agent=T_true,
            T_ego_from_agent_measured=T_measured,
            gt_boxes=np.zeros((0, 7)),
            gt_labels=np.zeros(0, dtype=np.int64),
            gt_visibility=np.zeros(0, dtype=np.int8),
            gt_ids=np.zeros(0, dtype=np.int64),
        )

    @staticmethod
    def _on_own_footprint(agent: AgentState, boxes_world: np.ndarray) -> np.ndarray:
        """(K,) bool: box centres on the agent's own footprint grown by ``_SELF_MARGIN_M``."""
        if len(boxes_world) == 0:
            return np.zeros(0, dtype=bool)
        local = transform_boxes(invert_T(agent.T_world_from_agent), boxes_world)
        half = agent.extent[:2] / 2.0 + _SELF_MARGIN_M
        return (np.abs(local[:, 0]) <= half[0]) & (np.abs(local[:, 1]) <= half[1])
