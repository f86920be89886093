"""Multi-agent driving env: a PettingZoo ``ParallelEnv`` over the embedded World.

Agents are connected vehicles (all of them, or only the scenario's ego: ``controlled``), named
``cav_0`` (the ego) then ``cav_1``, ... by vehicle id. Every other vehicle, connected or not,
drives with the World's driver model. One env step is one decision held for ``decision_ticks``
World ticks (0.1 s each).

**Actions** (``action``): ``discrete`` = highway-env's meta-actions ``LANE_LEFT, IDLE, LANE_RIGHT,
FASTER, SLOWER`` tracked by the low-level controller of :mod:`sim.env_lanes` (with
``lateral_actions`` off, only ``IDLE, FASTER, SLOWER``, as highway-env's ``lateral=False``);
``continuous`` =
``Box(-1, 1, (2,))`` scaled to acceleration (``-1`` = full braking, ``+1`` = full throttle) and
front-wheel angle.

**Observations** (``obs``, see :mod:`sim.env_obs`): a float32 vector, ego features then the K
nearest known vehicles, all in the agent's own frame (x forward, y left):

- ego (:data:`EGO_FEATURES`): speed, target speed, lateral offset and target offset from the own
  route, heading error, steering, whether a lane exists to the left / right, progress, distance
  and time left, the route's bends 10 / 25 / 50 m ahead, the next stop line and its signal, the
  merge lane and its end;
- with ``conflict_features`` on, the first crossing of the agent's path by a known vehicle
  (:data:`sim.env_conflict.CONFLICT_FEATURES`: whether there is one, the agent's distance to it,
  when the other vehicle reaches and clears it, and when the agent would at full speed;
  :func:`sim.env_conflict.first_conflict`);
- with ``passing_features`` on (after those), the passing situation on a two-way road
  (:data:`sim.env_passing.PASSING_FEATURES`: the leader in the agent's own lane, its gap, closing
  speed and speed and how far the agent still has to gain on it, the known oncoming vehicle in
  the lane to the left, when it meets the agent, and the passing margin of a pass at full speed
  from now; :func:`sim.env_passing.passing_situation`);
- per vehicle (:data:`OBJECT_FEATURES`): presence, relative position and velocity, relative
  heading, length, width; with intent sharing on, also whether the vehicle's intent was received
  and its planned position relative to the agent 0.5, 1.0 and 1.5 s ahead
  (:data:`INTENT_FEATURES`).

``state()`` (for centralised critics) stacks, for every possible agent, an alive flag and its
observation as the ``oracle`` source would give it, then the elapsed fraction of the episode.

**Rewards** (:class:`RewardConfig`): progress along the route (the goal distance is worth
``progress``), speed, success, collision, time headway, comfort (changes of acceleration and
steering), lane changes, red lights run, and MAPPO-PIS's merge-lane cost
``-exp(-(x - L)^2 / (10 L))`` while still on an on-ramp's acceleration lane (x: distance driven
on it, L: its length), a timeout term, and a collision-course cost: per second, by how far the
better way through the first crossing of the own path (going first or after the crossing vehicle
at full speed, :mod:`sim.env_conflict`, from ground truth) falls short of keeping clear, and a
head-on cost: per second, while the agent is set on the lane to its left, by how far the passing
margin (:mod:`sim.env_passing`, from ground truth) falls short of keeping clear of the oncoming
vehicle.

**Episode end** per agent: collision (terminated), reaching the goal ``goal_m`` along the own route
(terminated, success), or the time limit ``episode_s`` (truncated; a learner for which the limit
is part of the task should not bootstrap there, see :mod:`models.planning.mappo`). A vehicle that
collided brakes to a stop; one that succeeded drives on with the driver model.
:meth:`CoopDrivingEnv.set_time_limit` changes the limit from the next episode on (a training
curriculum).

**V2X**: detections (``visible``) and intents (``intent``) are real :mod:`v2x` messages on one
:class:`v2x.bus.BroadcastBus` per episode; ``bytes_sent`` counts what went on air, plus the
messages of the ``perception`` source's model, which go through its own :class:`models.comm.V2XLink`
on the same channel. With ``perception``, the known vehicles' boxes and velocities in observations
(objects and conflict features) are the model's detections and their tracked velocities
(:mod:`sim.env_perception`); rewards, collisions and episode ends stay ground truth.
**Safety** (``safety``, discrete actions only): :func:`models.planning.safety.supervise` replaces
unsafe actions before they are applied, predicting known vehicles by their intents when shared.

Scenario seeds: ``reset(seed=s)`` plays scenario seed ``s``; ``reset()`` draws the next one from
the env's generator, in ``[0, EVAL_SEED_OFFSET)``, so evaluation on seeds from
``EVAL_SEED_OFFSET`` on is on held-out scenarios.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from models.planning.intent import Intent, IntentBook, decode_intent, encode_intent
from models.planning.safety import (
    SafetyConfig,
    SafetyRequest,
    constant_velocity_poses,
    supervise,
)
from sim.dynamics import MAX_ACCEL, MAX_BRAKE, MAX_STEER, bicycle_step
from sim.env_conflict import CONFLICT_FEATURES, MARGIN_NORM_S, conflict_features, first_conflict
from sim.env_lanes import (
    LaneMap,
    MetaAction,
    MetaControllerConfig,
    MetaState,
    lookahead_distance,
    meta_control,
    plan_meta_trajectory,
    snapped_offsets,
    update_meta_state,
)
from sim.env_obs import ObsMode, PerceptionObsConfig, frame_boxes, make_source, nearest_within, sensor_pose
from sim.env_passing import PASSING_FEATURES, Passing, passing_features, passing_situation
from sim.env_visibility import VisibilityConfig
from sim.geometry import wrap_angle
from sim.scenarios import SCENARIOS
from sim.types import AgentState, SceneFrame, VehicleControl
from sim.world import EmbeddedWorld, make_world
from v2x.bus import BroadcastBus, BusConfig
from v2x.channel import ChannelConfig, dsrc, ideal, lte_v2x_pc5
from v2x.message import DecodeError
from v2x.pose_noise import PoseNoise

__all__ = [
    "EGO_FEATURES",
    "EVAL_SEED_OFFSET",
    "INTENT_FEATURES",
    "OBJECT_FEATURES",
    "SCENARIO_TASKS",
    "AgentEpisode",
    "CoopDrivingEnv",
    "EnvConfig",
    "RewardConfig",
    "ScenarioTask",
]

EVAL_SEED_OFFSET = 1_000_000_000
"""training episodes draw scenario seeds below this; evaluation uses seeds from here on"""

EGO_FEATURES = (
    "speed",
    "target_speed",
    "offset",
    "target_offset",
    "sin_heading_error",
    "cos_heading_error",
    "steering",
    "lane_left",
    "lane_right",
    "progress",
    "distance_left",
    "time_left",
    "bend_10m",
    "bend_25m",
    "bend_50m",
    "stop_line_distance",
    "signal_green",
    "signal_yellow",
    "signal_red",
    "on_merge_lane",
    "merge_end_distance",
)
OBJECT_FEATURES = ("present", "x", "y", "vx", "vy", "cos_yaw", "sin_yaw", "length", "width")
INTENT_FEATURES = ("has_intent", "x_0.5s", "y_0.5s", "x_1.0s", "y_1.0s", "x_1.5s", "y_1.5s")
_INTENT_OFFSETS_S = (0.5, 1.0, 1.5)

# normalisation of observation features
_SPEED_NORM = 30.0  # m/s
_OBS_CLIP = 5.0
_LATERAL_ACTIONS = tuple(MetaAction)
_LONGITUDINAL_ACTIONS = (MetaAction.IDLE, MetaAction.FASTER, MetaAction.SLOWER)
_CONFLICT_LOOKAHEAD_M = 50.0  # how far ahead of the agent's front path conflicts are looked for
_INTENT_MATCH_GATE_M = 3.0  # an estimated box takes the intent of a sender planned this close to it


@dataclass(frozen=True)
class ScenarioTask:
    """What an agent has to do in a scenario: drive ``goal_m`` along its route within ``episode_s``.

    On the occlusion scenarios the time limit leaves room for letting the hidden vehicle pass
    when it comes early, but not for waiting long enough to let a late one pass too (nor for
    crawling behind the overtaking scenario's truck): the ego has to know which it is.
    """

    goal_m: float
    episode_s: float
    controlled: Literal["ego", "all"]


SCENARIO_TASKS: dict[str, ScenarioTask] = {
    "overtaking": ScenarioTask(goal_m=110.0, episode_s=13.5, controlled="ego"),
    "left_turn": ScenarioTask(goal_m=40.0, episode_s=7.0, controlled="ego"),
    "red_light": ScenarioTask(goal_m=55.0, episode_s=5.4, controlled="ego"),
    "merge": ScenarioTask(goal_m=220.0, episode_s=14.0, controlled="all"),
    "random_traffic": ScenarioTask(goal_m=60.0, episode_s=15.0, controlled="all"),
}


@dataclass(frozen=True)
class RewardConfig:
    """Reward weights (per agent)."""

    progress: float = 1.0
    """reward for covering the whole goal distance (paid per metre)"""
    speed: float = 0.02
    """per second, times speed / max speed"""
    success: float = 1.0
    """on reaching the goal"""
    collision: float = -2.0
    """on a collision"""
    timeout: float = 0.0
    """on running out of time"""
    headway: float = -0.2
    """per second at zero time headway to the vehicle ahead in the lane, falling to 0 at headway_s"""
    headway_s: float = 1.0
    comfort: float = -0.01
    """per tick, times the squared normalised changes of acceleration and steering"""
    lane_change: float = -0.02
    """per lane change"""
    merge_lane: float = -0.5
    """per second at the end of an acceleration lane (MAPPO-PIS merge cost)"""
    red_light: float = -1.0
    """per red light run"""
    conflict: float = 0.0
    """per second on a collision course with a 1 s deficit, falling linearly to 0 at no deficit:
    a moving vehicle crosses the agent's path ahead and neither going first nor going after it at
    full speed keeps clear (the better of the two predicted post-encroachment margins of
    sim.env_conflict, from ground truth, is below -conflict_tolerance_s; the deficit is by how
    much, up to 1 s); charged for the state each decision leads to"""
    conflict_tolerance_s: float = 0.1
    """margin below zero that is not charged (the margins' full-speed model is cautious: an ego
    that goes first at full speed clears a crossing car with margins of about -0.1 s; going after
    a red-light runner with a margin of -0.25 s collides, so the tolerance stays below that)"""
    head_on: float = 0.0
    """per second on a head-on course with a 1 s deficit, falling linearly to 0 at no deficit: the
    agent is set on the lane to its left (pulling out to pass, or out there) and an oncoming
    vehicle reaches the point where the agent would be back in its own lane, passing the vehicle
    ahead at full speed, before the agent does (the passing margin of sim.env_passing, from ground
    truth, is below -head_on_tolerance_s; the deficit is by how much, up to 1 s); charged for the
    state each decision leads to"""
    head_on_tolerance_s: float = 1.5
    """passing margin below zero that is not charged (the margin predicts the oncoming vehicle at
    constant speed, but its driver brakes once the agent is in its lane: in the overtaking
    scenario passes with margins down to -1.25 s succeed, and pulling out in front of an early
    oncoming car leaves -6 to -8 s)"""


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines the driving env."""

    scenario: str = "merge"
    """one of sim.scenarios.SCENARIOS"""
    obs: Literal["oracle", "ego_only", "visible", "perception"] = "visible"
    action: Literal["discrete", "continuous"] = "discrete"
    lateral_actions: bool = True
    """discrete actions include LANE_LEFT / LANE_RIGHT; off: Discrete(3) = IDLE, FASTER, SLOWER
    (highway-env's DiscreteMetaAction(lateral=False)), for tasks that need no lane change"""
    controlled: Literal["ego", "all"] | None = None
    """which connected vehicles are agents; None: the scenario's default (SCENARIO_TASKS)"""
    k_nearest: int = 8
    conflict_features: bool = False
    """append the first path conflict with a known vehicle to the ego features
    (sim.env_conflict.CONFLICT_FEATURES); off by default, on in the occlusion scenarios' configs"""
    passing_features: bool = False
    """append the passing situation (the leader in the own lane, the oncoming vehicle in the lane
    to the left, the passing margin; sim.env_passing.PASSING_FEATURES) to the ego features, after
    the conflict features; off by default, on in the overtaking config"""
    obs_range_m: float = 80.0
    """vehicles further than this are left out of observations"""
    decision_ticks: int = 2
    """World ticks (0.1 s) per env step"""
    goal_m: float | None = None
    """None: the scenario's default"""
    episode_s: float | None = None
    """None: the scenario's default"""
    cavs: int | None = None
    traffic_density: float = 1.0
    speed_scale: float = 1.0
    channel: Literal["ideal", "dsrc", "lte_v2x"] = "dsrc"
    airtime_budget_s: float | None = None
    pose_noise_xyz_m: float = 0.0
    pose_noise_yaw_rad: float = 0.0
    allow_oncoming: bool | None = None
    """whether lane changes may use oncoming lanes; None: only on the two-lane road"""
    visibility: VisibilityConfig = field(default_factory=VisibilityConfig)
    perception: PerceptionObsConfig = field(default_factory=PerceptionObsConfig)
    """the perception checkpoint of obs=perception (perception.checkpoint required there)"""
    meta: MetaControllerConfig = field(default_factory=MetaControllerConfig)
    intent: bool = False
    """broadcast planned trajectories and observe the neighbours' (MAPPO-PIS)"""
    safety: bool = False
    """priority-based safety supervisor (discrete actions)"""
    safety_config: SafetyConfig = field(default_factory=SafetyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    exploring_starts: int = 0
    """training only (evaluation sets it to 0): at reset the agents first drive k decisions with
    FASTER, k drawn uniformly from 0..exploring_starts, before the policy takes over, so that
    episodes also start partway into the approach at speed (Sutton and Barto's exploring starts).
    Where success needs several FASTERs in a row from the first decision (going before a late
    red-light runner), a policy that samples one decision at a time rarely tries that sequence
    once it has learned to brake at the start; from these starts it sees what going first pays.
    An episode that ends during those decisions starts again from its scenario without them. The
    episode's statistics (``infos[agent]["episode"]``) include the decisions; discrete actions only."""

    def validate(self) -> None:
        problems = []
        if self.scenario not in SCENARIOS:
            problems.append(f"unknown scenario {self.scenario!r}; valid scenarios: {list(SCENARIOS)}")
        if self.obs not in {m.value for m in ObsMode}:
            problems.append(f"unknown obs {self.obs!r}; valid: {[m.value for m in ObsMode]}")
        if self.action not in ("discrete", "continuous"):
            problems.append(f"action must be 'discrete' or 'continuous', got {self.action!r}")
        if self.controlled not in (None, "ego", "all"):
            problems.append(f"controlled must be 'ego', 'all' or None, got {self.controlled!r}")
        if self.k_nearest < 1:
            problems.append(f"k_nearest must be >= 1, got {self.k_nearest}")
        if self.obs_range_m <= 0:
            problems.append(f"obs_range_m must be > 0, got {self.obs_range_m}")
        if self.decision_ticks < 1:
            problems.append(f"decision_ticks must be >= 1, got {self.decision_ticks}")
        if self.goal_m is not None and self.goal_m <= 0:
            problems.append(f"goal_m must be > 0, got {self.goal_m}")
        if self.episode_s is not None and self.episode_s <= 0:
            problems.append(f"episode_s must be > 0, got {self.episode_s}")
        if self.channel not in ("ideal", "dsrc", "lte_v2x"):
            problems.append(f"channel must be one of ideal, dsrc, lte_v2x, got {self.channel!r}")
        if self.safety and self.action != "discrete":
            problems.append("safety needs discrete actions (it chooses among the meta-actions)")
        if self.exploring_starts < 0:
            problems.append(f"exploring_starts must be >= 0, got {self.exploring_starts}")
        if self.exploring_starts and self.action != "discrete":
            problems.append("exploring_starts needs discrete actions (the agents press FASTER)")
        if self.safety and not self.lateral_actions:
            problems.append("safety needs lateral_actions (it may replace an action by a lane change)")
        if problems:
            raise ValueError("invalid EnvConfig: " + "; ".join(problems))
        self.visibility.validate()
        self.meta.validate()
        self.safety_config.validate()
        self.perception.validate(required=self.obs == ObsMode.PERCEPTION.value)

    def task(self) -> ScenarioTask:
        """The scenario's task with this config's overrides."""
        base = SCENARIO_TASKS[self.scenario]
        return ScenarioTask(
            goal_m=self.goal_m if self.goal_m is not None else base.goal_m,
            episode_s=self.episode_s if self.episode_s is not None else base.episode_s,
            controlled=self.controlled if self.controlled is not None else base.controlled,
        )


def make_channel(name: str) -> ChannelConfig:
    """The :mod:`v2x.channel` preset called ``name``."""
    match name:
        case "ideal":
            return ideal()
        case "dsrc":
            return dsrc()
        case "lte_v2x":
            return lte_v2x_pc5()
    raise ValueError(f"unknown channel {name!r}; valid: ideal, dsrc, lte_v2x")


@dataclass
class AgentEpisode:
    """One agent's episode so far; the env reports it in ``infos[agent]["episode"]`` at the end.

    Attributes:
        success, collision, timeout: how it ended (one of them once done).
        time_s: seconds driven until the end.
        progress_m: distance covered along the route; route_completion: as a fraction of the goal.
        mean_speed: m/s over the episode.
        red_lights: red lights run; lane_changes: lane changes made.
        safety_overrides: actions the safety supervisor replaced.
        reference_time_s: the goal distance at the route's speed limit (the fastest completion).
        return_: sum of rewards.
    """

    success: bool = False
    collision: bool = False
    timeout: bool = False
    time_s: float = 0.0
    progress_m: float = 0.0
    route_completion: float = 0.0
    mean_speed: float = 0.0
    red_lights: int = 0
    lane_changes: int = 0
    safety_overrides: int = 0
    reference_time_s: float = 0.0
    return_: float = 0.0

    @property
    def driving_score(self) -> float:
        """CARLA leaderboard style: route completion x 0.60 per vehicle collision x 0.70 per red light."""
        return self.route_completion * (0.60 if self.collision else 1.0) * 0.70**self.red_lights

    def to_dict(self) -> dict[str, float]:
        return {
            "success": float(self.success),
            "collision": float(self.collision),
            "timeout": float(self.timeout),
            "time_s": self.time_s,
            "progress_m": self.progress_m,
            "route_completion": self.route_completion,
            "mean_speed": self.mean_speed,
            "red_lights": float(self.red_lights),
            "lane_changes": float(self.lane_changes),
            "safety_overrides": float(self.safety_overrides),
            "driving_score": self.driving_score,
            "reference_time_s": self.reference_time_s,
            "return": self.return_,
        }


@dataclass
class _Track:
    """Per-agent state between steps."""

    name: str
    vid: int
    route: Any
    s0: float
    s: float
    goal_s: float
    extent: np.ndarray
    meta: MetaState
    live: bool = True
    crashed: bool = False
    accel: float = 0.0
    """continuous action: commanded acceleration"""
    steer: float = 0.0
    """continuous action: commanded steering"""
    prev_accel: float = 0.0
    prev_steer: float = 0.0
    speed_sum: float = 0.0
    ticks: int = 0
    episode: AgentEpisode = field(default_factory=AgentEpisode)


@dataclass(frozen=True)
class _Vehicle:
    """One vehicle of a frame with the values the env reads many times a step worked out once
    (``AgentState.speed`` and ``.yaw`` compute theirs on every access)."""

    id: int
    T_world_from_agent: np.ndarray
    """(4, 4)"""
    velocity: np.ndarray
    """(3,) m/s"""
    extent: np.ndarray
    """(3,) metres"""
    steering: float
    speed: float
    """``AgentState.speed``"""
    yaw: float
    """``AgentState.yaw``"""

    @classmethod
    def of(cls, agent: AgentState) -> _Vehicle:
        return cls(
            agent.id,
            agent.T_world_from_agent,
            agent.velocity,
            agent.extent,
            agent.steering,
            agent.speed,
            agent.yaw,
        )


class _FrameView:
    """A frame's agents as the env reads them, worked out once per frame.

    Attributes:
        frame: the frame.
        ids: (M,) int64 ``frame.agent_ids``.
        row: vehicle id -> its index in ``frame.agents``.
        boxes: (M, 7) ``frame.boxes_world``.
    """

    def __init__(self, frame: SceneFrame) -> None:
        self.frame = frame
        self.ids = frame.agent_ids
        self.row = {a.id: k for k, a in enumerate(frame.agents)}
        self.boxes = frame_boxes(frame)
        self._vehicles: dict[int, _Vehicle] = {}
        self._velocities: np.ndarray | None = None

    def vehicle(self, vid: int) -> _Vehicle:
        """Vehicle ``vid`` (KeyError when it is not in the frame)."""
        vehicle = self._vehicles.get(vid)
        if vehicle is None:
            vehicle = self._vehicles[vid] = _Vehicle.of(self.frame.agents[self.row[vid]])
        return vehicle

    @property
    def velocities(self) -> np.ndarray:
        """(M, 2) world x, y velocities of the agents."""
        if self._velocities is None:
            agents = self.frame.agents
            self._velocities = np.stack([a.velocity[:2] for a in agents]) if agents else np.zeros((0, 2))
        return self._velocities


class CoopDrivingEnv(ParallelEnv):
    """See the module docstring. ``CoopDrivingEnv(EnvConfig(scenario="merge", obs="visible"), seed=0)``."""

    metadata: ClassVar[dict] = {"name": "coop_driving_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: EnvConfig | None = None, seed: int = 0) -> None:
        self.config = config or EnvConfig()
        self.config.validate()
        self.task = self.config.task()
        self._next_episode_s: float | None = None
        self.world: EmbeddedWorld = make_world(
            self.config.scenario,
            lidar=self.config.visibility.lidar_config(),
            cavs=self.config.cavs,
            traffic_density=self.config.traffic_density,
            speed_scale=self.config.speed_scale,
        )
        self.world.sensors_enabled = False  # visibility comes from the coarse caster
        self.dt = self.world.dt
        self.source = make_source(
            self.config.obs,
            self.config.visibility,
            PoseNoise(self.config.pose_noise_xyz_m, self.config.pose_noise_yaw_rad),
            perception=self.config.perception,
            channel=self.config.channel,
            decision_s=self.dt * self.config.decision_ticks,
            airtime_budget_s=self.config.airtime_budget_s,
        )
        self.channel = make_channel(self.config.channel)
        self._rng = np.random.default_rng(seed)
        # the number of agents is fixed by the scenario and config: find it on one episode
        frame = self.world.reset(0)
        n = 1 if self.task.controlled == "ego" else len(frame.connected_ids)
        self.possible_agents = [f"cav_{i}" for i in range(n)]
        self.agents: list[str] = []
        k = self.config.k_nearest
        self.object_dim = len(OBJECT_FEATURES) + (len(INTENT_FEATURES) if self.config.intent else 0)
        self.ego_dim = (
            len(EGO_FEATURES)
            + (len(CONFLICT_FEATURES) if self.config.conflict_features else 0)
            + (len(PASSING_FEATURES) if self.config.passing_features else 0)
        )
        self.obs_dim = self.ego_dim + k * self.object_dim
        self.state_dim = n * (self.obs_dim + 1) + 1
        obs_space = spaces.Box(-_OBS_CLIP, _OBS_CLIP, (self.obs_dim,), np.float32)
        # the meta-action of each discrete action index
        self.meta_actions = _LATERAL_ACTIONS if self.config.lateral_actions else _LONGITUDINAL_ACTIONS
        if self.config.action == "discrete":
            act_space: spaces.Space = spaces.Discrete(len(self.meta_actions))
        else:
            act_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_spaces = {a: obs_space for a in self.possible_agents}
        self.action_spaces = {a: act_space for a in self.possible_agents}
        self.state_space = spaces.Box(-_OBS_CLIP, _OBS_CLIP, (self.state_dim,), np.float32)
        self.frame: SceneFrame | None = None
        self.episode_seed: int | None = None
        self.bytes_sent = 0
        self.messages_sent = 0
        self._tracks: dict[str, _Track] = {}
        self._known: dict[int, np.ndarray] = {}
        self._intents = IntentBook(max_age_s=max(_INTENT_OFFSETS_S) + 0.5)
        self._intent_seq: dict[int, int] = {}
        self._decision = 0
        self._lanes: LaneMap | None = None
        self._frame_view: _FrameView | None = None
        self._bus: BroadcastBus | None = None

    # ------------------------------------------------------------------------------------------
    # PettingZoo API
    # ------------------------------------------------------------------------------------------

    @functools.cache  # noqa: B019  (one env, a handful of agents)
    def observation_space(self, agent: str) -> spaces.Space:
        return self.observation_spaces[agent]

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Space:
        return self.action_spaces[agent]

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self.episode_seed = int(seed)
        else:
            self.episode_seed = int(self._rng.integers(EVAL_SEED_OFFSET))
        if self._next_episode_s is not None:
            self.task = replace(self.task, episode_s=self._next_episode_s)
            self._next_episode_s = None
        obs, infos = self._start_episode()
        starts = self.config.exploring_starts
        if starts:
            faster = self.meta_actions.index(MetaAction.FASTER)
            for _ in range(int(self._rng.integers(starts + 1))):
                obs, *_ = self.step({a: faster for a in self.agents})
                if len(self.agents) < len(self.possible_agents):  # an agent is done (step drops it)
                    return self._start_episode()  # ended before the policy acted: a plain start
            infos = {a: {"vehicle_id": self._tracks[a].vid} for a in self.agents}
        return obs, infos

    def _start_episode(self) -> tuple[dict, dict]:
        """Build :attr:`episode_seed`'s scenario and the agents' tracks; the first observations."""
        frame = self.world.reset(self.episode_seed)
        self.frame = frame
        self._lanes = LaneMap(self.world.layout, self._allow_oncoming())
        self.source.reset(self.world, self.episode_seed)
        self._bus = BroadcastBus(
            self.channel,
            BusConfig(
                tick_s=self.dt * self.config.decision_ticks, airtime_budget_s=self.config.airtime_budget_s
            ),
            seed=self.episode_seed,
        )
        self.bytes_sent = 0
        self.messages_sent = 0
        self._intents.clear()
        self._intent_seq = {}
        self._decision = 0
        ego = frame.ego_id
        cav_ids = [ego, *sorted(i for i in frame.connected_ids if i != ego)]
        cav_ids = cav_ids[: len(self.possible_agents)]
        self._tracks = {}
        index_of = {a.id: k for k, a in enumerate(frame.agents)}
        for name, vid in zip(self.possible_agents, cav_ids, strict=True):
            agent = frame.agents[index_of[vid]]
            route = self.world.route_of(vid)
            s0 = float(route.project(agent.T_world_from_agent[None, :2, 3])[0][0])
            goal_s = min(s0 + self.task.goal_m, route.length - 5.0)
            max_speed = route.speed_limit
            self._tracks[name] = _Track(
                name=name,
                vid=vid,
                route=route,
                s0=s0,
                s=s0,
                goal_s=goal_s,
                extent=agent.extent.copy(),
                meta=MetaState(
                    target_speed=float(np.clip(agent.speed, 0.0, max_speed)),
                    target_offset=0.0,
                    max_speed=max_speed,
                ),
            )
        self.agents = list(self.possible_agents)
        self._communicate(frame, intents={})
        obs = {a: self._observe(self._tracks[a], self._known.get(self._tracks[a].vid)) for a in self.agents}
        infos = {a: {"vehicle_id": self._tracks[a].vid} for a in self.agents}
        return obs, infos

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if self.frame is None:
            raise RuntimeError("call reset() before step()")
        acting = list(self.agents)
        missing = [a for a in acting if a not in actions]
        if missing:
            raise ValueError(f"no action for live agent(s) {missing}")
        frame = self.frame
        rewards = dict.fromkeys(acting, 0.0)
        overrides = dict.fromkeys(acting, False)
        intents: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        # 1. decide: meta-actions (through the safety supervisor) or continuous controls
        if self.config.action == "discrete":
            chosen, overrides, plans = self._decide_discrete({a: int(actions[a]) for a in acting}, frame)
            for a in acting:
                tr = self._tracks[a]
                before = tr.meta.target_offset
                tr.meta = update_meta_state(
                    tr.meta,
                    chosen[a],
                    tr.route,
                    tr.s,
                    self._view(frame).vehicle(tr.vid).speed,
                    self._lanes,
                    self.config.meta,
                )
                if abs(tr.meta.target_offset - before) > self.config.meta.lane_width / 2:
                    tr.episode.lane_changes += 1
                    rewards[a] += self.config.reward.lane_change
                if overrides[a]:
                    tr.episode.safety_overrides += 1
                if self.config.intent:
                    intents[tr.vid] = plans[a]
        else:
            for a in acting:
                act = np.clip(np.asarray(actions[a], dtype=np.float64).reshape(2), -1.0, 1.0)
                tr = self._tracks[a]
                tr.accel = float(act[0] * (MAX_ACCEL if act[0] >= 0 else MAX_BRAKE))
                tr.steer = float(act[1] * MAX_STEER)
                if self.config.intent:
                    intents[tr.vid] = self._continuous_plan(frame, tr)

        # 2. drive the World for decision_ticks ticks
        terminated = dict.fromkeys(acting, False)
        truncated = dict.fromkeys(acting, False)
        r = self.config.reward
        for _ in range(self.config.decision_ticks):
            controls = {}
            view = self._view(frame)
            for tr in self._tracks.values():
                if tr.vid not in view.row:
                    continue
                if tr.crashed:
                    controls[tr.vid] = VehicleControl(-MAX_BRAKE, 0.0)
                elif tr.live:
                    controls[tr.vid] = self._control(view.vehicle(tr.vid), tr)
            frame = self.world.step(controls)
            view = self._view(frame)
            collided = {i for pair in frame.collisions for i in pair}
            for a in acting:
                tr = self._tracks[a]
                if not tr.live:
                    continue
                agent = view.vehicle(tr.vid)
                rewards[a] += self._tick_reward(frame, tr, agent, controls[tr.vid])
                if tr.vid in collided:
                    tr.crashed, tr.live = True, False
                    tr.episode.collision = True
                    rewards[a] += r.collision
                    terminated[a] = True
                elif tr.s >= tr.goal_s:
                    tr.live = False
                    tr.episode.success = True
                    rewards[a] += r.success
                    terminated[a] = True
                if not tr.live:
                    self._close_episode(tr, frame.time_s)
            if frame.time_s >= self.task.episode_s - 1e-9:
                for a in acting:
                    tr = self._tracks[a]
                    if tr.live:
                        tr.live = False
                        tr.episode.timeout = True
                        rewards[a] += r.timeout
                        truncated[a] = True
                        self._close_episode(tr, frame.time_s)
            if not any(self._tracks[a].live for a in acting):
                break
        self.frame = frame
        self._decision += 1
        if r.conflict != 0.0 or r.head_on != 0.0:
            decision_s = self.dt * self.config.decision_ticks
            for a in acting:
                tr = self._tracks[a]
                if tr.live:
                    rewards[a] += self._surrogate_safety_cost(tr, frame) * decision_s

        # 3. communicate and observe
        self._communicate(frame, intents)
        obs, infos = {}, {}
        for a in acting:
            tr = self._tracks[a]
            tr.episode.return_ += rewards[a]
            obs[a] = self._observe(tr, self._known.get(tr.vid))
            infos[a] = {"vehicle_id": tr.vid, "safety_override": bool(overrides[a])}
            if terminated[a] or truncated[a]:
                infos[a]["episode"] = tr.episode.to_dict()
        self.agents = [a for a in acting if self._tracks[a].live]
        return obs, rewards, terminated, truncated, infos

    def state(self) -> np.ndarray:
        """(state_dim,) float32: per possible agent, alive flag + oracle observation; elapsed fraction."""
        if self.frame is None:
            raise RuntimeError("call reset() first")
        parts = []
        ids = self.frame.agent_ids
        for name in self.possible_agents:
            tr = self._tracks.get(name)
            if tr is None or not tr.live or tr.vid not in set(ids.tolist()):
                parts.append(np.zeros(self.obs_dim + 1, dtype=np.float32))
                continue
            oracle = self._observe(tr, ids != tr.vid, use_intents=False, use_estimates=False)
            parts.append(np.concatenate([[1.0], oracle]))
        parts.append(np.array([self.frame.time_s / self.task.episode_s]))
        return np.concatenate(parts).astype(np.float32)

    def close(self) -> None:
        self.world.close()

    # ------------------------------------------------------------------------------------------
    # queries for tools
    # ------------------------------------------------------------------------------------------

    def set_time_limit(self, episode_s: float) -> None:
        """Play the episodes from the next ``reset()`` on with this time limit (a training
        curriculum; the observation's time left is a fraction of the limit in force)."""
        if episode_s <= 0:
            raise ValueError(f"episode_s must be > 0, got {episode_s}")
        self._next_episode_s = float(episode_s)

    def vehicle_id(self, agent: str) -> int:
        """World id of ``agent``'s vehicle in the current episode."""
        return self._tracks[agent].vid

    def known_ids(self, agent: str) -> list[int]:
        """Ids of the vehicles ``agent`` knows about at the last decision."""
        assert self.frame is not None
        mask = self._known.get(self._tracks[agent].vid)
        if mask is None:
            return []
        return [int(i) for i in self.frame.agent_ids[mask]]

    def agent_episode(self, agent: str) -> AgentEpisode:
        return self._tracks[agent].episode

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------

    def _allow_oncoming(self) -> bool:
        if self.config.allow_oncoming is not None:
            return self.config.allow_oncoming
        return self.world.layout.name == "two_lane_road"

    def _view(self, frame: SceneFrame) -> _FrameView:
        """``frame``'s agents, boxes and velocities, worked out once per frame."""
        if self._frame_view is None or self._frame_view.frame is not frame:
            self._frame_view = _FrameView(frame)
        return self._frame_view

    def _boxes(self, frame: SceneFrame) -> np.ndarray:
        """(M, 7) ``frame.boxes_world``, computed once per frame (the property rebuilds it)."""
        return self._view(frame).boxes

    def _control(self, agent: _Vehicle, tr: _Track) -> VehicleControl:
        if self.config.action == "continuous":
            return VehicleControl(tr.accel, tr.steer)
        x, y = agent.T_world_from_agent[:2, 3]
        tr.meta = update_meta_state(tr.meta, None, tr.route, tr.s, agent.speed, self._lanes, self.config.meta)
        accel, steer = meta_control(
            tr.meta, tr.route, tr.s, x, y, agent.yaw, agent.speed, 0.6 * agent.extent[0], self.config.meta
        )
        return VehicleControl(accel, steer)

    def _tick_reward(self, frame: SceneFrame, tr: _Track, agent: _Vehicle, control: VehicleControl) -> float:
        """Advance the track by one tick and return this tick's shaping reward."""
        r = self.config.reward
        dt = self.dt
        xy = agent.T_world_from_agent[:2, 3]
        s_new = float(tr.route.project(xy[None], s_range=(tr.s - 5.0, tr.s + 40.0))[0][0])
        progress = s_new - tr.s
        half_len = tr.extent[0] / 2.0
        for s_stop, signal in tr.route.stop_lines:
            if tr.s + half_len < s_stop <= s_new + half_len and frame.traffic_lights.get(signal) == "red":
                tr.episode.red_lights += 1
                reward_red = r.red_light
                break
        else:
            reward_red = 0.0
        tr.s = s_new
        tr.ticks += 1
        tr.speed_sum += agent.speed
        reward = r.progress * progress / self.task.goal_m + reward_red
        reward += r.speed * min(agent.speed / max(tr.meta.max_speed, 1.0), 1.0) * dt
        headway = self._time_headway(frame, tr, agent)
        if headway < r.headway_s:
            reward += r.headway * (1.0 - headway / r.headway_s) * dt
        d_accel = (control.acceleration - tr.prev_accel) / (MAX_ACCEL + MAX_BRAKE)
        d_steer = (control.steering - tr.prev_steer) / MAX_STEER
        tr.prev_accel, tr.prev_steer = control.acceleration, control.steering
        reward += r.comfort * (d_accel**2 + d_steer**2)
        merge = tr.route.merge
        if merge is not None and abs(tr.meta.target_offset) < self.config.meta.lane_width / 2:
            _, s_start, s_end = merge
            if s_start <= tr.s <= s_end:
                length = s_end - s_start
                x = tr.s - s_start
                reward += r.merge_lane * float(np.exp(-((x - length) ** 2) / (10.0 * length))) * dt
        return reward

    def _time_headway(self, frame: SceneFrame, tr: _Track, agent: _Vehicle) -> float:
        """Seconds to the nearest vehicle ahead within the agent's lane (inf if none within 60 m)."""
        boxes = self._boxes(frame)
        yaw = agent.yaw
        rel = boxes[:, :2] - agent.T_world_from_agent[:2, 3]
        c, s = np.cos(yaw), np.sin(yaw)
        x = c * rel[:, 0] + s * rel[:, 1]
        y = -s * rel[:, 0] + c * rel[:, 1]
        ahead = (x > 0.1) & (np.abs(y) < (tr.extent[1] + boxes[:, 4]) / 2.0) & (x < 60.0)
        if not ahead.any():
            return np.inf
        gap = np.min(x[ahead] - (tr.extent[0] + boxes[ahead, 3]) / 2.0)
        return max(gap, 0.0) / max(agent.speed, 0.5)

    def _close_episode(self, tr: _Track, time_s: float) -> None:
        ep = tr.episode
        ep.time_s = time_s
        ep.progress_m = tr.s - tr.s0
        ep.route_completion = float(np.clip(ep.progress_m / max(tr.goal_s - tr.s0, 1e-6), 0.0, 1.0))
        if ep.success:
            ep.route_completion = 1.0
        ep.mean_speed = tr.speed_sum / max(tr.ticks, 1)
        ep.reference_time_s = (tr.goal_s - tr.s0) / max(tr.meta.max_speed, 1e-6)

    # ---------------------------------------------------------------------------- decisions

    def _horizon_steps(self) -> int:
        return max(
            round(self.config.safety_config.horizon_s / self.dt), round(max(_INTENT_OFFSETS_S) / self.dt)
        )

    def _candidate_states(self, tr: _Track, speed: float) -> list[MetaState]:
        return [
            update_meta_state(tr.meta, action, tr.route, tr.s, speed, self._lanes, self.config.meta)
            for action in MetaAction
        ]

    def _decide_discrete(
        self, proposed: dict[str, int], frame: SceneFrame
    ) -> tuple[dict[str, int], dict[str, bool], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Safety-checked meta-actions for the proposed action indices, whether each was
        overridden, and each agent's plan ((T,) offsets, (T, 3) x, y, speed at the intent times)
        for intent messages."""
        n = len(self.meta_actions)
        for a, act in proposed.items():
            if not 0 <= act < n:
                raise ValueError(f"agent {a}: action {act} outside Discrete({n})")
        proposed = {a: int(self.meta_actions[act]) for a, act in proposed.items()}
        need_rollouts = self.config.safety or self.config.intent
        if not need_rollouts:
            return dict(proposed), dict.fromkeys(proposed, False), {}
        steps = self._horizon_steps()
        rollouts: dict[str, np.ndarray] = {}
        for a in proposed:
            tr = self._tracks[a]
            agent = self._view(frame).vehicle(tr.vid)
            x, y = agent.T_world_from_agent[:2, 3]
            states = (
                self._candidate_states(tr, agent.speed)
                if self.config.safety
                else [
                    update_meta_state(
                        tr.meta, proposed[a], tr.route, tr.s, agent.speed, self._lanes, self.config.meta
                    )
                ]
            )
            rollouts[a] = plan_meta_trajectory(
                states,
                tr.route,
                tr.s,
                x,
                y,
                agent.yaw,
                agent.speed,
                0.6 * agent.extent[0],
                self.dt,
                steps,
                self.config.meta,
            )
        chosen = dict(proposed)
        overridden = dict.fromkeys(proposed, False)
        if self.config.safety:
            requests = [self._safety_request(a, proposed[a], rollouts[a], frame, steps) for a in proposed]
            decisions = supervise(requests, self.config.safety_config, share_plans=self.config.intent)
            name_of = {self._tracks[a].vid: a for a in proposed}
            for vid, decision in decisions.items():
                chosen[name_of[vid]] = decision.action
                overridden[name_of[vid]] = decision.overridden
        plans = {}
        for a in proposed:
            row = rollouts[a][chosen[a] if self.config.safety else 0]  # (steps, 4)
            idx = [round(t / self.dt) - 1 for t in _INTENT_OFFSETS_S]
            plans[a] = (np.array(_INTENT_OFFSETS_S), row[idx][:, [0, 1, 3]])
        return chosen, overridden, plans

    def _safety_request(
        self, agent_name: str, proposed: int, rollout: np.ndarray, frame: SceneFrame, steps: int
    ) -> SafetyRequest:
        tr = self._tracks[agent_name]
        times = self.dt * np.arange(1, steps + 1)
        known = self._known.get(tr.vid, np.zeros(len(frame.agents), dtype=bool)).copy()
        held = self._intents.intents_of(tr.vid, frame.time_s) if self.config.intent else {}
        ids = frame.agent_ids
        for sender in held:  # a received intent makes its sender known
            known |= ids == sender
        known &= ids != tr.vid
        boxes = self._boxes(frame)[known]
        velocities = self._view(frame).velocities[known] if known.any() else np.zeros((0, 2))
        poses = constant_velocity_poses(boxes, velocities, times)
        for k, vid in enumerate(ids[known].tolist()):
            if vid in held:
                poses[k] = _intent_poses(held[vid], frame.time_s + times, boxes[k])
        priority = self._priority(tr, frame)
        return SafetyRequest(
            agent_id=tr.vid,
            proposed=proposed,
            candidates=rollout[..., :3],
            extent=tr.extent[:2],
            priority=priority,
            obstacle_ids=ids[known],
            obstacle_poses=poses,
            obstacle_extents=boxes[:, 3:5],
        )

    def _priority(self, tr: _Track, frame: SceneFrame) -> float:
        """MAPPO-PIS priority: on a merge lane, the closer to its end the higher; then the
        shorter the time headway the higher."""
        agent = self._view(frame).vehicle(tr.vid)
        p = 1.0 / (1.0 + self._time_headway(frame, tr, agent))
        merge = tr.route.merge
        if merge is not None and abs(tr.meta.target_offset) < self.config.meta.lane_width / 2:
            _, s_start, s_end = merge
            if s_start - 30.0 <= tr.s <= s_end:
                p += 1.0 + (tr.s - s_start + 30.0) / (s_end - s_start + 30.0)
        return p

    def _continuous_plan(self, frame: SceneFrame, tr: _Track) -> tuple[np.ndarray, np.ndarray]:
        """Planned positions holding the continuous controls, at the intent times."""
        agent = self._view(frame).vehicle(tr.vid)
        x, y = (np.array([v]) for v in agent.T_world_from_agent[:2, 3])
        yaw, speed = np.array([agent.yaw]), np.array([agent.speed])
        out = []
        steps = round(max(_INTENT_OFFSETS_S) / self.dt)
        for k in range(1, steps + 1):
            x, y, yaw, speed = bicycle_step(
                x,
                y,
                yaw,
                speed,
                np.array([tr.accel]),
                np.array([tr.steer]),
                np.array([0.6 * tr.extent[0]]),
                self.dt,
            )
            if any(abs(k * self.dt - t) < 1e-9 for t in _INTENT_OFFSETS_S):
                out.append([x[0], y[0], speed[0]])
        return np.array(_INTENT_OFFSETS_S), np.array(out)

    # ---------------------------------------------------------------------------- V2X + obs

    def _communicate(self, frame: SceneFrame, intents: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Sense, put this decision's messages on the bus, and update what every agent knows."""
        index_of = self._view(frame).row
        observers = [tr.vid for tr in self._tracks.values() if tr.vid in index_of]
        outgoing = list(self.source.sense(frame, observers))
        mount = self.config.visibility.mount_z
        for vid, (offsets, plan) in intents.items():
            if vid not in index_of:
                continue
            seq = self._intent_seq.get(vid, 0)
            self._intent_seq[vid] = seq + 1
            # planned at the start of the decision, sent with the decision's messages
            t_plan = frame.time_s - self.dt * self.config.decision_ticks
            outgoing.append(
                (
                    vid,
                    encode_intent(
                        vid,
                        seq,
                        max(t_plan, 0.0),
                        sensor_pose(frame, index_of[vid], mount),
                        offsets,
                        plan[:, :2],
                        plan[:, 2],
                    ),
                )
            )
        positions = {
            a.id: a.T_world_from_agent[:3, 3] for a in frame.agents if a.connected or a.id in observers
        }
        assert self._bus is not None
        report = self._bus.step(self._decision, outgoing, positions)
        self.bytes_sent += report.bytes_on_air
        self.messages_sent += sum(not t.expired for t in report.transmissions)
        side = self.source.link_traffic()  # the perception model's own link
        self.bytes_sent += side.bytes_on_air
        self.messages_sent += side.messages
        if self.config.intent:
            for receiver, deliveries in report.received.items():
                for delivery in deliveries:
                    try:
                        self._intents.receive(receiver, decode_intent(delivery.data))
                    except DecodeError:
                        continue  # not an intent (detections)
        self._known = self.source.known(frame, observers, report.received)

    def _observe(
        self, tr: _Track, known: np.ndarray | None, use_intents: bool = True, use_estimates: bool = True
    ) -> np.ndarray:
        """(obs_dim,) float32 observation of one agent (see the module docstring); the known
        vehicles' states are the source's estimates where it makes them and ``use_estimates``."""
        frame = self.frame
        assert frame is not None
        cfg = self.config
        view = self._view(frame)
        ids = view.ids
        ego_feat = np.zeros(self.ego_dim)
        objects = np.zeros((cfg.k_nearest, self.object_dim))
        if tr.vid not in view.row:  # cannot happen for live agents; a crashed one may still be observed
            return np.concatenate([ego_feat, objects.reshape(-1)]).astype(np.float32)
        me = view.vehicle(tr.vid)
        ego_feat = self._ego_features(tr, me, frame)
        if known is None:
            known = np.zeros(len(ids), dtype=bool)
        known = known & (ids != tr.vid)
        idx = np.flatnonzero(known)
        boxes, velocities, object_ids = self._known_objects(tr, frame, idx, use_estimates)
        if cfg.conflict_features:
            ego_feat = np.concatenate([ego_feat, self._conflict_features(tr, me, boxes, velocities)])
        if cfg.passing_features:
            ego_feat = np.concatenate([ego_feat, self._passing_features(tr, me, boxes, velocities)])
        if len(boxes):
            yaw = me.yaw
            c, s = np.cos(yaw), np.sin(yaw)
            rel = boxes[:, :2] - me.T_world_from_agent[:2, 3]
            x = c * rel[:, 0] + s * rel[:, 1]
            y = -s * rel[:, 0] + c * rel[:, 1]
            dist = np.hypot(x, y)
            keep = dist <= cfg.obs_range_m
            order = np.argsort(dist[keep], kind="stable")[: cfg.k_nearest]
            sel = np.flatnonzero(keep)[order]
            vel = velocities[sel] - me.velocity[:2]
            rng = cfg.obs_range_m
            held = self._intents.intents_of(tr.vid, frame.time_s) if (cfg.intent and use_intents) else {}
            dyaw = boxes[sel, 6] - yaw
            objects[: len(sel), : len(OBJECT_FEATURES)] = np.stack(
                [
                    np.ones(len(sel)),
                    x[sel] / rng,
                    y[sel] / rng,
                    (c * vel[:, 0] + s * vel[:, 1]) / _SPEED_NORM,
                    (-s * vel[:, 0] + c * vel[:, 1]) / _SPEED_NORM,
                    np.cos(dyaw),
                    np.sin(dyaw),
                    boxes[sel, 3] / 10.0,
                    boxes[sel, 4] / 5.0,
                ],
                axis=1,
            )  # (K', len(OBJECT_FEATURES)), nearest first
            for row, j in enumerate(sel if held else ()):
                vid = int(object_ids[j])
                if vid in held:
                    future = (
                        held[vid].position_at(frame.time_s + np.array(_INTENT_OFFSETS_S))
                        - me.T_world_from_agent[:2, 3]
                    )
                    fx = c * future[:, 0] + s * future[:, 1]
                    fy = -s * future[:, 0] + c * future[:, 1]
                    objects[row, len(OBJECT_FEATURES) :] = [1.0, *np.stack([fx, fy], 1).reshape(-1) / rng]
        out = np.concatenate([ego_feat, objects.reshape(-1)])
        return np.clip(out, -_OBS_CLIP, _OBS_CLIP).astype(np.float32)

    def _surrogate_safety_cost(self, tr: _Track, frame: SceneFrame) -> float:
        """Per second: ``reward.conflict`` times the collision-course deficit plus
        ``reward.head_on`` times the head-on deficit, both from every other vehicle's ground truth."""
        r = self.config.reward
        view = self._view(frame)
        me = view.vehicle(tr.vid)
        others = np.flatnonzero(view.ids != tr.vid)
        boxes, velocities, _ = self._known_objects(tr, frame, others, use_estimates=False)
        cost = 0.0
        if r.conflict != 0.0:
            cost += r.conflict * self._conflict_deficit(tr, me, boxes, velocities)
        if r.head_on != 0.0:
            cost += r.head_on * self._head_on_deficit(tr, me, boxes, velocities)
        return cost

    def _conflict_deficit(self, tr: _Track, me, boxes: np.ndarray, velocities: np.ndarray) -> float:
        """Seconds (0 to 1) by which the better way through the first conflict on the agent's path
        with the vehicles ``boxes`` / ``velocities`` (going first or after at full speed) falls short
        of ``-reward.conflict_tolerance_s``; 0 without a conflict."""
        features = self._conflict_features(tr, me, boxes, velocities)
        if features[0] == 0:
            return 0.0
        best_margin_s = MARGIN_NORM_S * max(features[-2:])
        return float(np.clip(-(best_margin_s + self.config.reward.conflict_tolerance_s), 0.0, 1.0))

    def _known_objects(
        self, tr: _Track, frame: SceneFrame, idx: np.ndarray, use_estimates: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the agent knows of other vehicles: (K, 7) world boxes, (K, 2) world velocities and
        (K,) vehicle ids (-1: not known). The source's estimates when it makes them and
        ``use_estimates`` (``perception``: detections, ids only from the received intents whose
        sender's plan puts it within 3 m of a detection now), else the ground truth of the known
        vehicles ``idx`` (indices into ``frame.agents``)."""
        estimates = self.source.estimates(tr.vid) if use_estimates else None
        if estimates is None:
            view = self._view(frame)
            velocities = view.velocities[idx] if len(idx) else np.zeros((0, 2))
            return view.boxes[idx], velocities, view.ids[idx]
        object_ids = np.full(len(estimates), -1, dtype=np.int64)
        held = self._intents.intents_of(tr.vid, frame.time_s) if self.config.intent else {}
        if held and len(estimates):
            senders = np.array(sorted(held), dtype=np.int64)
            planned = np.stack([_planned_position_now(held[int(v)], frame.time_s) for v in senders])
            match = nearest_within(estimates.boxes[:, :2], planned, _INTENT_MATCH_GATE_M)
            object_ids[match >= 0] = senders[match[match >= 0]]
        return estimates.boxes, estimates.velocities, object_ids

    def _conflict_features(self, tr: _Track, me, boxes: np.ndarray, velocities: np.ndarray) -> np.ndarray:
        """(len(CONFLICT_FEATURES),) the first crossing of the agent's path (its route at its
        target offset, from its rear to 50 m ahead of its front) by the known vehicles, (K, 7)
        world ``boxes`` moving at (K, 2) ``velocities``, within the observation range."""
        near = np.hypot(*(boxes[:, :2] - me.T_world_from_agent[:2, 3]).T) <= self.config.obs_range_m
        boxes, velocities = boxes[near], velocities[near]
        length = float(tr.extent[0])
        if len(boxes) == 0:
            return conflict_features(None, me.speed, tr.meta.max_speed, length)
        path_s = np.arange(-length, _CONFLICT_LOOKAHEAD_M + 1e-9, 1.0)  # from the agent's front
        s = tr.s + 0.5 * length + path_s
        heading = tr.route.heading(s)
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=1)  # (P, 2) to the left
        path_xy = tr.route.point(s) + tr.meta.target_offset * normal
        conflict = first_conflict(path_xy, path_s, float(tr.extent[1]), boxes, velocities)
        return conflict_features(conflict, me.speed, tr.meta.max_speed, length, tr.route, tr.s)

    def _passing(self, tr: _Track, me, boxes: np.ndarray, velocities: np.ndarray) -> Passing:
        """:func:`sim.env_passing.passing_situation` of the agent with the known vehicles, (K, 7)
        world ``boxes`` moving at (K, 2) ``velocities``, within the observation range, in the
        frame of its own route."""
        xy = me.T_world_from_agent[:2, 3]
        near = np.hypot(*(boxes[:, :2] - xy).T) <= self.config.obs_range_m
        boxes, velocities = boxes[near], velocities[near]
        length = float(tr.extent[0])
        window = (tr.s - self.config.obs_range_m - 10.0, tr.s + self.config.obs_range_m + 10.0)
        _, ego_offset = tr.route.project(xy[None], s_range=(tr.s - 5.0, tr.s + 5.0))
        if len(boxes):
            s, offset = tr.route.project(boxes[:, :2], s_range=window)
            heading = tr.route.heading(s)
            speed_along = velocities[:, 0] * np.cos(heading) + velocities[:, 1] * np.sin(heading)
        else:
            s = offset = speed_along = np.zeros(0)
        return passing_situation(
            ego_front_s=tr.s + 0.5 * length,
            ego_length=length,
            ego_offset=float(ego_offset[0]),
            ego_speed=me.speed,
            max_speed=tr.meta.max_speed,
            s=s,
            offset=offset,
            speed_along=speed_along,
            length=boxes[:, 3],
            lane_width=self.config.meta.lane_width,
        )

    def _passing_features(self, tr: _Track, me, boxes: np.ndarray, velocities: np.ndarray) -> np.ndarray:
        """(len(PASSING_FEATURES),) the agent's passing situation with the known vehicles."""
        return passing_features(self._passing(tr, me, boxes, velocities), me.speed, tr.meta.max_speed)

    def _head_on_deficit(self, tr: _Track, me, boxes: np.ndarray, velocities: np.ndarray) -> float:
        """Seconds (0 to 1) by which the passing margin with the vehicles ``boxes`` / ``velocities``
        falls short of ``-reward.head_on_tolerance_s`` while the agent is set on the lane to its left
        (its target offset beyond half a lane); 0 in its own lane (not pulling out is always open)."""
        if tr.meta.target_offset < self.config.meta.lane_width / 2:
            return 0.0
        margin_s = self._passing(tr, me, boxes, velocities).margin_s
        return float(np.clip(-(margin_s + self.config.reward.head_on_tolerance_s), 0.0, 1.0))

    def _ego_features(self, tr: _Track, me, frame: SceneFrame) -> np.ndarray:
        cfg = self.config
        route = tr.route
        xy = me.T_world_from_agent[:2, 3]
        _, lateral = route.project(xy[None], s_range=(tr.s - 5.0, tr.s + 5.0))
        heading = float(route.heading(tr.s))
        err = float(wrap_angle(me.yaw - heading))
        lane = cfg.meta.lane_width
        s_ahead = tr.s + float(lookahead_distance(me.speed))
        offset = tr.meta.target_offset
        left, right = snapped_offsets(
            self._lanes, route, s_ahead, (offset + lane, offset - lane), cfg.meta.snap_tolerance
        )
        ahead = np.array([tr.s + 10.0, tr.s + 25.0, tr.s + 50.0])
        bends = np.sin(wrap_angle(route.heading(ahead) - heading))  # (3,) 10, 25 and 50 m on
        stop_distance, signal = 1.0, [0.0, 0.0, 0.0]
        front = tr.s + tr.extent[0] / 2.0
        for s_stop, signal_id in route.stop_lines:
            if s_stop - front > -1.0:
                stop_distance = min((s_stop - front) / 50.0, 1.0)
                state = frame.traffic_lights.get(signal_id, "green")
                signal = [float(state == "green"), float(state == "yellow"), float(state == "red")]
                break
        on_merge, merge_end = 0.0, 1.0
        if route.merge is not None:
            _, s_start, s_end = route.merge
            merge_end = float(np.clip((s_end - tr.s) / 100.0, -1.0, 1.0))
            on_merge = float(s_start - 30.0 <= tr.s <= s_end and abs(offset) < lane / 2)
        time_left = max(self.task.episode_s - frame.time_s, 0.0) / self.task.episode_s
        goal = max(tr.goal_s - tr.s0, 1e-6)
        return np.array(
            [
                me.speed / _SPEED_NORM,
                tr.meta.target_speed / _SPEED_NORM if cfg.action == "discrete" else 0.0,
                float(lateral[0]) / lane,
                offset / lane,
                np.sin(err),
                np.cos(err),
                me.steering / MAX_STEER,
                float(left is not None and abs(left - offset) > lane / 2),
                float(right is not None and abs(right - offset) > lane / 2),
                (tr.s - tr.s0) / goal,
                (tr.goal_s - tr.s) / 100.0,
                time_left,
                *bends,
                stop_distance,
                *signal,
                on_merge,
                merge_end,
            ]
        )


def _planned_position_now(intent: Intent, time_s: float) -> np.ndarray:
    """(2,) where an intent's sender should be at ``time_s`` by its plan: on the waypoints, and
    before the first one along the first leg extended back (waypoints start 0.5 s after planning,
    the intent is received 0.2 s after)."""
    t, w = intent.times_s, intent.waypoints
    if time_s >= t[0] or len(t) < 2:
        return intent.position_at(time_s)
    return w[0] + (time_s - t[0]) * (w[1] - w[0]) / max(float(t[1] - t[0]), 1e-6)


def _intent_poses(intent: Intent, times: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(H, 3) x, y, yaw along an intent at absolute ``times``; yaw from the direction of travel
    (the box's yaw while the plan stands still)."""
    xy = intent.position_at(times)
    prev = np.concatenate([box[None, :2], xy[:-1]], axis=0)
    step = xy - prev
    moving = np.hypot(step[:, 0], step[:, 1]) > 1e-3
    yaw = np.where(moving, np.arctan2(step[:, 1], step[:, 0]), box[6])
    return np.concatenate([xy, yaw[:, None]], axis=1)
