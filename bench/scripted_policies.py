"""Do the occlusion scenarios need cooperation? Scripted (not learned) policies on held-out seeds.

Two families of hand-written policies play the same held-out scenario seeds of ``left_turn``,
``red_light`` and ``overtaking`` (seeds from ``EVAL_SEED_OFFSET`` on, as the closed-loop
evaluation):

- **blind, fixed timing** (``blind d=...``): ignores every other vehicle and commits at a fixed
  time ``d``. On the crossing scenarios: SLOWER until ``d`` seconds, then FASTER. On
  ``overtaking``: follow the vehicle ahead (the truck) until ``d``, then overtake (LANE_LEFT,
  FASTER until past the truck, LANE_RIGHT). The sweep over ``d`` covers every commit time that
  still fits the time limit; the best of them is the most a policy can get without knowing
  about the hidden vehicle.
- **informed** (``informed <obs>``): acts on the vehicles the observation source makes known
  (``env.known_ids``, the same vehicles the learned policies observe): it predicts the known
  vehicles keeping the deceleration and turn rate they show, and its own "go" manoeuvre
  (FASTER every decision) with the env's low-level controller
  (:func:`sim.env_lanes.plan_meta_trajectory`), and goes only while that manoeuvre keeps
  ``margin`` metres of clearance (:func:`models.planning.safety.footprint_clearance`). Crossing:
  the fastest of FASTER, IDLE, SLOWER after which going is clear, else SLOWER; overtaking: keeps
  following the truck until the oncoming lane is clear until it is past the truck. With ``visible`` it knows what the
  other connected vehicles see; with ``ego_only`` only what its own LiDAR sees; ``oracle`` is the
  upper bound.

- **hold, then informed** (``hold d=..., informed ego_only``), crossings: IDLE for ``d`` seconds,
  then the informed policy on what the ego's own sensor shows. Where the ego already drives at
  the turn's speed, holding it costs no time and lets the ego see past the occluder before it
  commits: the hedge a learned ``ego_only`` planner finds. A scenario is occluded enough only if
  this stays low too.
- **brake, then informed** (``brake d=..., informed ego_only``), crossings: SLOWER for ``d``
  seconds, then the informed policy on the ego's own sensor: crawling up to the occluder and
  looking before committing, which gives up time instead of holding it (a learned ``ego_only``
  planner found this on ``left_turn``). Also has to stay low.
- **creep, then informed** (``creep v<=..., d=..., informed ego_only``), crossings: for ``d``
  seconds the informed policy on the ego's own sensor with its target speed capped at ``v``
  (braking to it, yielding to what it sees), then the informed policy uncapped: an ego that
  crawls towards the conflict and keeps looking until both hidden cars of ``left_turn`` can have
  shown themselves, the hedge the learned ``ego_only`` planner found there. Has to stay low too.

- **feature rule** (``feature rule <obs>``), crossings: a threshold policy on the env's conflict
  features (``EnvConfig.conflict_features``, :mod:`sim.env_conflict`) and nothing else: FASTER
  while going first or going after at full speed keeps a margin above the scenario's threshold
  (``CROSSING_RULE_MARGINS_S``), else SLOWER.
- **feature rule** (``feature rule <obs>``, overtaking): a threshold policy on the env's passing
  features (``EnvConfig.passing_features``, :mod:`sim.env_passing`) and nothing else: in its own
  lane it follows the leader, and pulls out when the leader is slow, near, and the passing margin
  is positive; out in the passing lane it presses FASTER until nothing is left to gain on the
  leader, then cuts back in. It checks that the features suffice for the passing decision, as a
  threshold on the conflict margins does for the crossing scenarios. ``feature rule + abort``
  also gives up a pass (back behind the leader) when the margin drops below -1.5 s before the
  ego is alongside the leader: what an ``ego_only`` ego can do once pulling out lets it see past
  the truck.

- **stop** (``stop``): SLOWER every decision (waits out the clock).

A scenario needs cooperation when the best blind policy and ``informed ego_only`` stay low while
``informed visible`` succeeds. Output: a markdown table (success / collision / timeout rates and
the mean episode return under the env's reward) per scenario and policy, and optionally JSON.

The return column checks a reward design: a learned planner can only be expected to find the
informed policy if it out-earns stopping and blind timings. ``--config`` takes the reward
(``env.reward``) from a planner config; the default is :class:`sim.env.RewardConfig`'s.

Usage: ``python bench/scripted_policies.py [--scenarios left_turn red_light overtaking]
[--episodes 40] [--config configs/planner/red_light.yaml] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from models.planning.safety import footprint_clearance
from sim.env import EGO_FEATURES, EVAL_SEED_OFFSET, CoopDrivingEnv, EnvConfig, RewardConfig
from sim.env_conflict import CONFLICT_FEATURES
from sim.env_conflict import MARGIN_NORM_S as CONFLICT_MARGIN_NORM_S
from sim.env_lanes import MetaAction, MetaState, plan_meta_trajectory
from sim.env_passing import GAP_NORM_M, PASSING_FEATURES
from sim.env_passing import MARGIN_NORM_S as PASSING_MARGIN_NORM_S
from sim.geometry import wrap_angle

A = MetaAction
CROSSING = ("left_turn", "red_light")
OVERTAKING = ("overtaking",)
SCENARIOS = (*CROSSING, *OVERTAKING)

_SPEED = EGO_FEATURES.index("speed")
_TARGET_SPEED = EGO_FEATURES.index("target_speed")
_TARGET_OFFSET = EGO_FEATURES.index("target_offset")
_SPEED_NORM = 30.0  # sim.env's normalisation of speeds in observations
_FOLLOW_GAP_M = 7.0  # bumper gap kept behind the vehicle ahead while following
_PASS_CLEAR_M = 4.0  # the ego's rear this far past the truck's front before cutting back in


@dataclass
class Outcome:
    """Rates over the episodes of one policy on one scenario."""

    scenario: str
    policy: str
    episodes: int
    success: float
    collision: float
    timeout: float
    mean_return: float
    """episode return under the reward the policies were played with"""
    success_time_s: float
    """mean time (s) of the successful episodes to reach the goal; nan without successes"""
    success_time_max_s: float
    """the slowest successful episode (s): how close to the time limit a policy succeeds"""


# --------------------------------------------------------------------------------------------------
# what the ego knows and what it would do
# --------------------------------------------------------------------------------------------------


@dataclass
class _Ego:
    """The ego's own state and the known vehicles, world frame."""

    x: float
    y: float
    yaw: float
    speed: float
    extent: np.ndarray  # (3,)
    route: object
    s: float
    target_speed: float
    target_offset: float  # metres
    boxes: np.ndarray  # (M, 7) known vehicles
    velocities: np.ndarray  # (M, 2)
    decelerations: np.ndarray  # (M,) m/s^2 >= 0, from the speed change since the last decision
    yaw_rates: np.ndarray  # (M,) rad/s, from the heading change since the last decision


def _ego_view(env: CoopDrivingEnv, obs: np.ndarray, memory: dict, agent: str = "cav_0") -> _Ego:
    """What the ego knows now; ``memory`` keeps the known vehicles' speeds between decisions."""
    frame = env.frame
    vid = env.vehicle_id(agent)
    me = frame.agent(vid)
    route = env.world.route_of(vid)
    x, y = me.T_world_from_agent[:2, 3]
    s = float(route.project(np.array([[x, y]]))[0][0])
    known = set(env.known_ids(agent))
    rows = [k for k, a in enumerate(frame.agents) if a.id in known]
    boxes = frame.boxes_world[rows] if rows else np.zeros((0, 7))
    velocities = np.stack([frame.agents[k].velocity[:2] for k in rows]) if rows else np.zeros((0, 2))
    states = {frame.agents[k].id: (float(frame.agents[k].speed), float(frame.agents[k].yaw)) for k in rows}
    previous = memory.get("states", {})
    step_s = env.dt * env.config.decision_ticks
    decelerations = np.array(
        [max(previous.get(i, s)[0] - s[0], 0.0) / step_s for i, s in states.items()], dtype=np.float64
    )
    yaw_rates = np.array(
        [wrap_angle(s[1] - previous.get(i, s)[1]) / step_s for i, s in states.items()], dtype=np.float64
    )
    memory["states"] = states
    return _Ego(
        x=float(x),
        y=float(y),
        yaw=float(me.yaw),
        speed=float(me.speed),
        extent=me.extent,
        route=route,
        s=s,
        target_speed=float(obs[_TARGET_SPEED]) * _SPEED_NORM,
        target_offset=float(obs[_TARGET_OFFSET]) * env.config.meta.lane_width,
        boxes=boxes,
        velocities=velocities,
        decelerations=decelerations,
        yaw_rates=yaw_rates,
    )


def _plan(
    env: CoopDrivingEnv, ego: _Ego, offset: float, horizon_s: float, first_target: float | None = None
) -> np.ndarray:
    """(H, 4) x, y, yaw, speed of the ego pressing FASTER every decision on lane ``offset`` (the
    target speed climbs by ``speed_step`` per decision up to the speed limit); with
    ``first_target``, the first decision holds that target instead."""
    meta = env.config.meta
    vmax = ego.route.speed_limit
    ticks = env.config.decision_ticks
    steps = round(horizon_s / env.dt)
    wheelbase = 0.6 * ego.extent[0]
    x, y, yaw, speed, s = ego.x, ego.y, ego.yaw, ego.speed, ego.s
    target = ego.target_speed
    parts = []
    done = 0
    while done < steps:
        if done == 0 and first_target is not None:
            target = first_target
        else:
            target = min(target + meta.speed_step, vmax)
        n = min(ticks, steps - done)
        state = MetaState(target_speed=target, target_offset=offset, max_speed=vmax)
        part = plan_meta_trajectory([state], ego.route, s, x, y, yaw, speed, wheelbase, env.dt, n, meta)[0]
        s += float(np.sum(np.hypot(np.diff(np.r_[x, part[:, 0]]), np.diff(np.r_[y, part[:, 1]]))))
        x, y, yaw, speed = part[-1]
        parts.append(part)
        done += n
    return np.concatenate(parts)


def _clearance(
    env: CoopDrivingEnv, ego: _Ego, plan: np.ndarray, moving_only: bool, same_direction: bool = True
) -> float:
    """Smallest predicted clearance (m) of ``plan`` to the known vehicles (see _predicted_poses);
    ``same_direction=False`` leaves out vehicles driving the ego's way (overtaking: the truck)."""
    # followers (behind, same direction) are theirs to avoid
    rel = _in_ego_frame(ego, ego.boxes[:, :2])
    along = np.cos(ego.boxes[:, 6] - ego.yaw) > 0.7
    keep = ~((rel[:, 0] < 0.0) & along)
    if not same_direction:
        keep &= ~along
    if moving_only:
        keep &= np.hypot(ego.velocities[:, 0], ego.velocities[:, 1]) > 0.5
    if not keep.any():
        return np.inf
    times = env.dt * np.arange(1, len(plan) + 1)
    speeds = np.hypot(ego.velocities[keep, 0], ego.velocities[keep, 1])
    others = _predicted_poses(ego.boxes[keep], speeds, ego.decelerations[keep], ego.yaw_rates[keep], times)
    return float(footprint_clearance(plan[None, :, :3], ego.extent[:2], others, ego.boxes[keep, 3:5])[0])


def _predicted_poses(
    boxes: np.ndarray, speeds: np.ndarray, decel: np.ndarray, yaw_rates: np.ndarray, times: np.ndarray
) -> np.ndarray:
    """(M, H, 3) poses of vehicles keeping the deceleration and turn rate they show (turning by
    at most 90 degrees, braking until they stop), integrated in steps of ``times``."""
    m, h = len(boxes), len(times)
    out = np.zeros((m, h, 3))
    x, y, yaw = boxes[:, 0].copy(), boxes[:, 1].copy(), boxes[:, 6].copy()
    speed = speeds.copy()
    turned = np.zeros(m)
    braking = np.where(decel > 0.3, decel, 0.0)
    t_prev = 0.0
    for k, t in enumerate(times):
        dt = t - t_prev
        t_prev = t
        step = np.clip(yaw_rates * dt, -np.pi / 2 - turned, np.pi / 2 - turned)
        step = np.where(np.abs(turned) >= np.pi / 2, 0.0, step)
        turned += step
        yaw = yaw + step
        new_speed = np.maximum(speed - braking * dt, 0.0)
        dist = 0.5 * (speed + new_speed) * dt
        speed = new_speed
        x, y = x + dist * np.cos(yaw), y + dist * np.sin(yaw)
        out[:, k] = np.stack([x, y, yaw], axis=1)
    return out


def _in_ego_frame(ego: _Ego, xy: np.ndarray) -> np.ndarray:
    """(M, 2) points in the ego frame (x forward, y left)."""
    c, s = np.cos(ego.yaw), np.sin(ego.yaw)
    rel = xy - np.array([ego.x, ego.y])
    return np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]], axis=1)


def _leader(ego: _Ego, lateral_m: float = 1.8) -> int | None:
    """Index (into ``ego.boxes``) of the nearest known vehicle ahead in the ego's own lane."""
    if len(ego.boxes) == 0:
        return None
    rel = _in_ego_frame(ego, ego.boxes[:, :2])
    ahead = (rel[:, 0] > 0.0) & (np.abs(rel[:, 1] - ego.target_offset) < lateral_m)
    if not ahead.any():
        return None
    return int(np.flatnonzero(ahead)[np.argmin(rel[ahead, 0])])


def _track_speed(ego: _Ego, desired: float, step: float = 2.5) -> int:
    """The meta-action that moves the target speed towards ``desired``."""
    if ego.target_speed < desired - step / 2:
        return int(A.FASTER)
    if ego.target_speed > desired + step / 2:
        return int(A.SLOWER)
    return int(A.IDLE)


# --------------------------------------------------------------------------------------------------
# policies: callables (env, obs, time_s, memory) -> action
# --------------------------------------------------------------------------------------------------

Policy = Callable[[CoopDrivingEnv, np.ndarray, float, dict], int]


def stop(env, obs, t, memory) -> int:
    return int(A.SLOWER)


def blind_crossing(delay_s: float) -> Policy:
    def act(env, obs, t, memory):
        return int(A.SLOWER) if t < delay_s - 1e-9 else int(A.FASTER)

    return act


def informed_crossing(horizon_s: float = 4.0, margin_m: float = 0.2) -> Policy:
    """The fastest of FASTER, IDLE, SLOWER after which going at full speed keeps ``margin_m``
    from every known vehicle; SLOWER when none does."""

    def act(env, obs, t, memory):
        ego = _ego_view(env, obs, memory)
        step = env.config.meta.speed_step
        for action, target in (
            (A.FASTER, min(ego.target_speed + step, ego.route.speed_limit)),
            (A.IDLE, ego.target_speed),
            (A.SLOWER, max(ego.target_speed - step, 0.0)),
        ):
            plan = _plan(env, ego, ego.target_offset, horizon_s, first_target=target)
            if _clearance(env, ego, plan, moving_only=True) >= margin_m:
                return int(action)
        return int(A.SLOWER)

    return act


def _lead_in_then_informed(action: A, lead_s: float) -> Policy:
    """Press ``action`` for ``lead_s`` seconds, then act as :func:`informed_crossing`."""
    informed = informed_crossing()

    def act(env, obs, t, memory):
        if t < lead_s - 1e-9:
            return int(action)
        return informed(env, obs, t, memory)

    return act


def hedged_crossing(hold_s: float) -> Policy:
    """Hold the speed (IDLE) for ``hold_s`` seconds, then act as :func:`informed_crossing`: an
    ego that approaches at its current speed until its own sensor sees past the occluder, and
    only then commits or yields. It costs nothing where the ego already drives at the turn's
    speed, so it is the ``ego_only`` strategy a learned planner finds first."""
    return _lead_in_then_informed(A.IDLE, hold_s)


def braked_crossing(brake_s: float) -> Policy:
    """Brake (SLOWER) for ``brake_s`` seconds, then act as :func:`informed_crossing`: an ego that
    slows to a crawl, creeps up until its own sensor sees past the occluder, and then commits or
    yields. Unlike :func:`hedged_crossing` it gives up time, and with it sees the crossing traffic
    from further back; a learned ``ego_only`` planner found this on ``left_turn``."""
    return _lead_in_then_informed(A.SLOWER, brake_s)


def creeping_crossing(max_target_mps: float, creep_s: float) -> Policy:
    """For ``creep_s`` seconds :func:`informed_crossing` with the target speed capped at
    ``max_target_mps`` (SLOWER while above it), then :func:`informed_crossing`: an ego that crawls
    up to the occluder and on towards the conflict, yielding to whatever its sensor shows, and
    commits only after it has had time to see the crossing traffic."""
    informed = informed_crossing()

    def act(env, obs, t, memory):
        action = informed(env, obs, t, memory)
        if t >= creep_s - 1e-9 or action == A.SLOWER:
            return action
        target = float(obs[_TARGET_SPEED]) * _SPEED_NORM
        if target > max_target_mps + 1e-6:
            return int(A.SLOWER)
        if action == A.FASTER and target + env.config.meta.speed_step > max_target_mps + 1e-6:
            return int(A.IDLE)
        return action

    return act


def _follow(ego: _Ego) -> int:
    lead = _leader(ego)
    if lead is None:
        return int(A.FASTER)
    rel = _in_ego_frame(ego, ego.boxes[lead : lead + 1, :2])[0]
    gap = rel[0] - (ego.extent[0] + ego.boxes[lead, 3]) / 2.0
    lead_speed = float(np.hypot(*ego.velocities[lead]))
    desired = float(np.clip(lead_speed + 0.5 * (gap - _FOLLOW_GAP_M), 0.0, ego.route.speed_limit))
    return _track_speed(ego, desired)


def _overtake(env: CoopDrivingEnv, ego: _Ego, memory: dict) -> int:
    """Pass the vehicle ahead on the oncoming lane, then cut back in."""
    phase = memory.setdefault("phase", "out")
    lane = env.config.meta.lane_width
    if phase == "out":
        if ego.target_offset > lane / 2:
            memory["phase"] = "pass"
            return int(A.FASTER)
        return int(A.LANE_LEFT)
    if phase == "pass":
        truck = memory["truck"]
        rel = _in_ego_frame(ego, truck[None, :2])[0] if truck is not None else np.array([-np.inf, 0.0])
        if truck is not None:  # keep the truck's box up to date while it is known
            known = (
                ego.boxes[np.argmin(np.hypot(*(ego.boxes[:, :2] - truck[:2]).T))] if len(ego.boxes) else truck
            )
            if np.hypot(*(known[:2] - truck[:2])) < 3.0:
                memory["truck"] = known
                rel = _in_ego_frame(ego, known[None, :2])[0]
        truck_len = truck[3] if truck is not None else 0.0
        if rel[0] + truck_len / 2.0 < -ego.extent[0] / 2.0 - _PASS_CLEAR_M:
            memory["phase"] = "back"
            return int(A.LANE_RIGHT)
        return int(A.FASTER)
    if ego.target_offset > lane / 2:
        return int(A.LANE_RIGHT)
    return _follow(ego)


def _start_overtake(ego: _Ego, memory: dict) -> None:
    lead = _leader(ego)
    memory["truck"] = None if lead is None else ego.boxes[lead].copy()
    memory["phase"] = "out"


def blind_overtaking(delay_s: float) -> Policy:
    def act(env, obs, t, memory):
        ego = _ego_view(env, obs, memory)
        if "phase" not in memory:
            if t < delay_s - 1e-9:
                return _follow(ego)
            _start_overtake(ego, memory)
        return _overtake(env, ego, memory)

    return act


def informed_overtaking(margin_m: float = 1.0, horizon_s: float = 7.0) -> Policy:
    """Overtake once the oncoming lane is predicted clear until the ego is past the truck."""

    def act(env, obs, t, memory):
        ego = _ego_view(env, obs, memory)
        if "phase" not in memory:
            lead = _leader(ego)
            if lead is None:
                return int(A.FASTER)
            plan = _plan(env, ego, env.config.meta.lane_width, horizon_s)
            truck = ego.boxes[lead]
            truck_v = ego.velocities[lead]
            times = env.dt * np.arange(1, len(plan) + 1)
            front = (
                truck[:2]
                + truck_v[None, :] * times[:, None]
                + truck[3] / 2.0 * np.array([np.cos(truck[6]), np.sin(truck[6])])
            )
            heading = np.array([np.cos(ego.yaw), np.sin(ego.yaw)])
            rear = plan[:, :2] - ego.extent[0] / 2.0 * heading
            past = np.flatnonzero((rear - front) @ heading > _PASS_CLEAR_M)
            if len(past) == 0:
                return _follow(ego)
            needed = min(int(past[0]) + round(0.6 / env.dt), len(plan))  # + starting to cut back in
            if _clearance(env, ego, plan[:needed], moving_only=True, same_direction=False) < margin_m:
                return _follow(ego)
            _start_overtake(ego, memory)
        return _overtake(env, ego, memory)

    return act


CROSSING_RULE_MARGINS_S = {"red_light": (-0.1, -0.1), "left_turn": (-0.1, 0.1)}
"""(go first, go after) margins, s, above which :func:`feature_rule_crossing` goes: measured on
held-out seeds. Going first with -0.1 s clears (the margins count 0.5 m of padding on each side);
going after needs -0.1 s on red_light but +0.1 s in the left turn, where the ego's body swings wide
of its path across the oncoming lane."""


def feature_rule_crossing(go_first_s: float, go_after_s: float) -> Policy:
    """A threshold policy on the conflict features alone (the env must have
    ``conflict_features`` on; they follow the ego features): FASTER without a conflict or when
    the go-first margin exceeds ``go_first_s`` or the go-after margin ``go_after_s``, else SLOWER."""
    base = len(EGO_FEATURES)

    def act(env, obs, t, memory):
        f = dict(zip(CONFLICT_FEATURES, obs[base : base + len(CONFLICT_FEATURES)].tolist(), strict=True))
        go_first = f["conflict_go_first_margin"] * CONFLICT_MARGIN_NORM_S
        go_after = f["conflict_go_after_margin"] * CONFLICT_MARGIN_NORM_S
        if f["conflict"] < 0.5 or go_first > go_first_s or go_after > go_after_s:
            return int(A.FASTER)
        return int(A.SLOWER)

    return act


def feature_rule_overtaking(
    slow_ratio: float = 0.5,
    min_margin_s: float = 0.0,
    pull_out_gap_m: float = 15.0,
    abort_below_s: float | None = None,
) -> Policy:
    """A threshold policy on the passing features alone (the env must have
    ``passing_features`` on; they are the last ego features).

    In its own lane: pull out (LANE_LEFT) when the leader drives slower than ``slow_ratio`` of the
    speed limit, its rear is within ``pull_out_gap_m`` and the passing margin exceeds
    ``min_margin_s``; otherwise follow it ``_FOLLOW_GAP_M`` behind (FASTER without one). Out in
    the passing lane: FASTER until nothing is left to gain on the leader, then LANE_RIGHT. With
    ``abort_below_s``, a pass whose margin drops below it while the ego is still behind the
    leader's rear is given up (LANE_RIGHT, back to following): an ``ego_only`` ego that pulled
    out blind sees the oncoming car once it is out, and this is the cheapest way to use that.
    """
    closing_norm = 10.0  # m/s per unit of passing_leader_closing (sim.env_passing)

    def act(env, obs, t, memory):
        base = env.ego_dim - len(PASSING_FEATURES)
        f = dict(zip(PASSING_FEATURES, obs[base : base + len(PASSING_FEATURES)].tolist(), strict=True))
        if obs[_TARGET_OFFSET] > 0.5:  # set on the passing lane
            if (
                abort_below_s is not None
                and f["passing_margin"] * PASSING_MARGIN_NORM_S < abort_below_s
                and f["passing_leader"]
                and f["passing_leader_gap"] > 0.0
            ):
                return int(A.LANE_RIGHT)
            return int(A.LANE_RIGHT) if f["passing_to_gain"] <= 0.0 else int(A.FASTER)
        if not f["passing_leader"]:
            return int(A.FASTER)
        gap_m = f["passing_leader_gap"] * GAP_NORM_M
        if (
            f["passing_leader_speed"] < slow_ratio
            and gap_m < pull_out_gap_m
            and f["passing_margin"] * PASSING_MARGIN_NORM_S > min_margin_s
        ):
            return int(A.LANE_LEFT)
        speed = float(obs[_SPEED]) * _SPEED_NORM
        target = float(obs[_TARGET_SPEED]) * _SPEED_NORM
        desired = speed - closing_norm * f["passing_leader_closing"] + 0.5 * (gap_m - _FOLLOW_GAP_M)
        if target < desired - 1.25:
            return int(A.FASTER)
        return int(A.SLOWER) if target > desired + 1.25 else int(A.IDLE)

    return act


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def run_policy(
    scenario: str,
    obs_mode: str,
    policy: Policy,
    episodes: int,
    name: str,
    reward: RewardConfig | None = None,
    features: bool = False,
) -> Outcome:
    """``features``: switch on the scenario's feature set (conflict features at crossings,
    passing features when overtaking) for the feature rules."""
    config = EnvConfig(
        scenario=scenario,
        obs=obs_mode,
        reward=reward or RewardConfig(),
        conflict_features=features and scenario in CROSSING,
        passing_features=features and scenario in OVERTAKING,
    )
    env = CoopDrivingEnv(config, seed=0)
    totals = {"success": 0.0, "collision": 0.0, "timeout": 0.0, "return": 0.0}
    success_times: list[float] = []
    for k in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED_OFFSET + k)
        memory: dict = {}
        t = 0.0
        info: dict = {}
        while env.agents:
            action = policy(env, obs["cav_0"], t, memory)
            obs, _, _, _, info = env.step({"cav_0": action})
            t = env.frame.time_s
        episode = info["cav_0"]["episode"]
        for key in totals:
            totals[key] += episode[key]
        if episode["success"]:
            success_times.append(float(episode["time_s"]))
    env.close()
    times = np.asarray(success_times) if success_times else np.full(1, np.nan)
    return Outcome(
        scenario,
        name,
        episodes,
        *(totals[k] / episodes for k in ("success", "collision", "timeout", "return")),
        success_time_s=float(times.mean()),
        success_time_max_s=float(times.max()),
    )


def policies_for(scenario: str, delays: list[float]) -> list[tuple[str, str, Policy]]:
    """(name, obs mode, policy) for one scenario: the blind sweep, then the informed ones."""
    blind = blind_crossing if scenario in CROSSING else blind_overtaking
    informed = informed_crossing if scenario in CROSSING else informed_overtaking
    out = [("stop", "oracle", stop)]
    out += [(f"blind d={d:g}s", "oracle", blind(d)) for d in delays]
    out += [(f"informed {mode}", mode, informed()) for mode in ("ego_only", "visible", "oracle")]
    if scenario in CROSSING:
        out += [(f"hold d={d:g}s, informed ego_only", "ego_only", hedged_crossing(d)) for d in HOLD_DELAYS]
        out += [(f"brake d={d:g}s, informed ego_only", "ego_only", braked_crossing(d)) for d in BRAKE_DELAYS]
        out += [
            (f"creep v<={v:g}, d={d:g}s, informed ego_only", "ego_only", creeping_crossing(v, d))
            for v, d in CREEPS
        ]
    modes = ("ego_only", "visible", "oracle")
    if scenario in CROSSING:
        rule = feature_rule_crossing(*CROSSING_RULE_MARGINS_S[scenario])
        out += [(f"feature rule {mode}", mode, rule) for mode in modes]
    if scenario in OVERTAKING:
        out += [(f"feature rule {mode}", mode, feature_rule_overtaking()) for mode in modes]
        abort = feature_rule_overtaking(abort_below_s=-1.5)
        out += [(f"feature rule + abort {mode}", mode, abort) for mode in modes]
    return out


HOLD_DELAYS = (0.4, 0.8, 1.2)
"""seconds of holding the speed before the hedged ego_only policy acts on what it sees"""

BRAKE_DELAYS = (0.8, 1.2, 1.6, 2.0)
"""seconds of braking before the creeping ego_only policy acts on what it sees"""

CREEPS = ((1.0, 3.0), (1.0, 4.0), (3.0, 3.0), (3.0, 4.0))
"""(target speed cap in m/s, seconds) of the creeping ego_only policies; the env's target speed
moves in steps of 2.5 m/s from the ego's starting speed, so a cap of 1 m/s crawls at 0.5-1 m/s
and one of 3 m/s at 3 m/s or below"""

DEFAULT_DELAYS = {
    "left_turn": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4],
    "red_light": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2],
    "overtaking": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--episodes", type=int, default=40, help="held-out seeds per policy (default 40)")
    parser.add_argument(
        "--delays", type=float, nargs="+", help="blind commit times in s (default per scenario)"
    )
    parser.add_argument(
        "--only", choices=("stop", "blind", "informed", "hold", "brake", "creep", "feature"), help="run one family only"
    )
    parser.add_argument(
        "--config", help="planner config (YAML) whose env.reward the returns are computed with"
    )
    parser.add_argument("--json", help="also write the outcomes to this JSON file")
    args = parser.parse_args()
    reward = None
    if args.config:
        from models.config import load_config
        from models.planning.experiment import PlannerConfig

        reward = load_config(PlannerConfig, args.config).env.reward
    outcomes: list[Outcome] = []
    for scenario in args.scenarios:
        todo = policies_for(scenario, args.delays or DEFAULT_DELAYS[scenario])
        if args.only:
            todo = [p for p in todo if p[0].startswith(args.only)]
        for name, mode, policy in tqdm(todo, desc=scenario):
            features = name.startswith("feature rule")
            outcomes.append(run_policy(scenario, mode, policy, args.episodes, name, reward, features))
    print("| scenario | policy | episodes | success | collision | timeout | return | success time (mean / max s) |")
    print("|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        print(
            f"| {o.scenario} | {o.policy} | {o.episodes} | {o.success:.2f} | {o.collision:.2f} "
            f"| {o.timeout:.2f} | {o.mean_return:+.2f} | {o.success_time_s:.1f} / {o.success_time_max_s:.1f} |"
        )
    for scenario in args.scenarios:
        blind = [o for o in outcomes if o.scenario == scenario and o.policy.startswith("blind")]
        if blind:
            best = max(blind, key=lambda o: o.success)
            print(f"{scenario}: best blind policy {best.policy}: success {best.success:.2f}")
    if args.json:
        from datasets.io import atomic_write_text

        rows = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(o).items()} for o in outcomes]
        atomic_write_text(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
