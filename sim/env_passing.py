"""Passing on a two-way road: the slow vehicle ahead, the oncoming one, and the passing margin.

Overtaking a slow vehicle on a two-lane road is safe when the oncoming lane stays free for as long
as the ego is in it: from pulling out until it is back in its own lane ahead of the vehicle it
passed. The decision is a comparison of two timings, like the go / wait decision at a crossing
(:mod:`sim.env_conflict`), but the conflict is head-on and moves along the road: where the ego
gets back into its lane depends on how long the pass takes, and the oncoming vehicle has to be
short of that point until then. :func:`sim.env_conflict.first_conflict` leaves such near-parallel
courses out, so :func:`passing_situation` computes them separately, in the ego route's frame
(arc length ``s`` along the route, lateral offset to the left), for the env to hand to the
policy as a few ego features (``EnvConfig.passing_features``):

- the **leader**: the vehicle in the ego's own lane it follows or is passing (the one beside it
  that reaches furthest ahead, else the nearest one ahead; out in the passing lane only one
  within ``pass_window_m`` ahead, as one further on is the next vehicle, not the one being
  passed), its bumper gap, closing speed and speed, and how far the ego still has to gain on it
  (``to_gain_m``) before its rear is ``clear_m`` past the leader's front and it can cut back in;
- the **oncoming** vehicle: a known vehicle coming the other way in the lane to the left (the
  lane the ego would pass in), not yet past the ego, its distance and when it meets the ego at
  the speeds both have now;
- the **passing margin**: the time the oncoming vehicle needs to reach the point where the ego
  would be back in its lane, minus the time the ego needs to get there pulling out (or staying
  out) now at full speed. The ego's pass uses the scenarios' full-speed model
  (:func:`sim.scenarios.fastest_arrival_s`: controller lag, then ``EGO_ACCEL`` up to the speed
  limit) against a leader keeping its speed, then ``return_s`` to cut back in far enough to clear
  an oncoming car (measured with the env's lane-change controller, see ``RETURN_S``). Positive:
  passing now clears the oncoming vehicle by that much; negative: pulling out now, or staying
  out, meets it head-on, unless the oncoming driver brakes. The World's drivers do brake for a
  vehicle in their lane, so the constant-speed margin is cautious: in the overtaking scenario
  passes predicted to miss by up to 1.25 s succeed, while pulling out in front of an early
  oncoming car leaves -6 to -8 s. Without a leader the "pass" is only the return, so the margin
  says whether the ego may use (or stay in) the oncoming lane at all.

Only the vehicles passed in count: the env passes those the observation source makes known, so an
``ego_only`` agent behind a truck learns about the oncoming car only once its own LiDAR sees past
the truck, which takes pulling out (in the overtaking scenario 0.4-0.6 s into the lane change,
still short of the oncoming lane).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.scenarios import EGO_ACCEL, fastest_arrival_s

__all__ = [
    "CLEAR_M",
    "GAP_NORM_M",
    "LAG_S",
    "MARGIN_NORM_S",
    "PASSING_FEATURES",
    "PASS_WINDOW_M",
    "RETURN_S",
    "Passing",
    "fastest_distance_m",
    "passing_features",
    "passing_situation",
    "time_to_gain_s",
]

PASSING_FEATURES = (
    "passing_leader",
    "passing_leader_gap",
    "passing_leader_closing",
    "passing_leader_speed",
    "passing_to_gain",
    "passing_oncoming",
    "passing_oncoming_distance",
    "passing_oncoming_meet",
    "passing_margin",
)
"""ego features describing :func:`passing_situation` (see :func:`passing_features`)"""

RETURN_S = 1.3
"""seconds from cutting back in (LANE_RIGHT out of the oncoming lane) until no corner of a car
overlaps the oncoming lane's car any more (its left edge right of the oncoming car's right edge),
for the env's pure-pursuit lane change at the urban speed limit (13.9 m/s; 1.4 s at 10 m/s,
1.8 s at 6 m/s): a pass ends near full speed"""
CLEAR_M = 4.0
"""metres between the leader's front and the ego's rear before the ego cuts back in (as the
scripted overtaking policies in bench/scripted_policies.py)"""
PASS_WINDOW_M = 15.0
"""metres: out in the passing lane, an own-lane vehicle whose rear is further ahead than this
is the next one, not the one being passed (the ego pulls out from a following gap of 5-10 m)"""
LAG_S = fastest_arrival_s(0.0, 0.0, 1.0)
"""seconds of controller lag in the full-speed model (:func:`sim.scenarios.fastest_arrival_s`
of no distance)"""

GAP_NORM_M = 25.0
"""metres per unit of the gap and to-gain features: following and cutting back in turn on
metres"""
_CLOSING_NORM = 10.0  # m/s per unit of the closing speed
_ONCOMING_NORM_M = 50.0
_MEET_NORM_S = 5.0
MARGIN_NORM_S = 1.0
"""seconds per unit of the passing margin. Twice the crossing margins' unit (sim.env_conflict):
an oncoming driver brakes once the ego is in its lane, so passes predicted at constant speed to
miss by up to 1.25 s still succeed in the overtaking scenario, while pulling out in front of an
early oncoming car leaves -6 to -8 s; one unit per second keeps both apart inside the clip"""
_CLIP = 2.0  # every feature but the flags and the speed ratio is clipped to [-2, 2] units


@dataclass(frozen=True)
class Passing:
    """What :func:`passing_situation` found; all distances are arc lengths along the ego's route.

    Attributes:
        leader: row of the leader in the arrays passed in, or None.
        leader_gap_m: leader's rear minus the ego's front (negative while beside it).
        leader_speed: the leader's speed along the route, m/s.
        to_gain_m: metres the ego has to gain on the leader before its rear is ``clear_m`` past
            the leader's front (0 without a leader).
        oncoming: row of the oncoming vehicle that limits the pass most, or None.
        oncoming_distance_m: its front minus the ego's front (negative while beside the ego).
        oncoming_speed: its speed towards the ego, m/s (> 0).
        meet_s: seconds until the two fronts meet at the speeds both have now (0 once beside).
        back_s: seconds until the ego, pulling out (or staying out) now at full speed, has passed
            the leader and is back in its lane (``inf`` if it cannot outrun the leader).
        back_m: how far the ego's front has travelled by then.
        margin_s: the oncoming vehicle's time to reach the ego's front at ``back_m`` minus
            ``back_s`` (``inf`` without an oncoming vehicle).
    """

    leader: int | None
    leader_gap_m: float
    leader_speed: float
    to_gain_m: float
    oncoming: int | None
    oncoming_distance_m: float
    oncoming_speed: float
    meet_s: float
    back_s: float
    back_m: float
    margin_s: float


def fastest_distance_m(time_s: float, speed: float, max_speed: float) -> float:
    """Metres an ego at ``speed`` covers in ``time_s`` pressing FASTER every decision: the
    inverse of :func:`sim.scenarios.fastest_arrival_s` (nothing during the lag, then
    ``EGO_ACCEL`` up to ``max_speed``)."""
    speed = min(speed, max_speed)
    t = max(time_s - LAG_S, 0.0)
    t_accel = (max_speed - speed) / EGO_ACCEL
    if t <= t_accel:
        return speed * t + 0.5 * EGO_ACCEL * t**2
    return speed * t_accel + 0.5 * EGO_ACCEL * t_accel**2 + max_speed * (t - t_accel)


def time_to_gain_s(distance_m: float, speed: float, max_speed: float, leader_speed: float) -> float:
    """Seconds an ego at ``speed`` pressing FASTER needs to gain ``distance_m`` on a leader
    driving at a constant ``leader_speed``: the ``t`` with ``fastest_distance_m(t) = distance_m +
    leader_speed * t``; ``inf`` when it never does (the leader is as fast as the speed limit)."""
    if distance_m <= 0.0:
        return 0.0
    speed = min(speed, max_speed)
    gain = distance_m + leader_speed * LAG_S  # the leader drives on during the lag
    rel = speed - leader_speed
    t_accel = (max_speed - speed) / EGO_ACCEL
    gained_accel = rel * t_accel + 0.5 * EGO_ACCEL * t_accel**2
    if gain <= gained_accel:
        return LAG_S + (-rel + np.sqrt(rel**2 + 2.0 * EGO_ACCEL * gain)) / EGO_ACCEL
    if max_speed <= leader_speed:
        return np.inf
    return LAG_S + t_accel + (gain - gained_accel) / (max_speed - leader_speed)


def passing_situation(
    ego_front_s: float,
    ego_length: float,
    ego_offset: float,
    ego_speed: float,
    max_speed: float,
    s: np.ndarray,
    offset: np.ndarray,
    speed_along: np.ndarray,
    length: np.ndarray,
    lane_width: float,
    clear_m: float = CLEAR_M,
    return_s: float = RETURN_S,
    pass_window_m: float = PASS_WINDOW_M,
    min_speed: float = 0.5,
) -> Passing:
    """The leader, the oncoming vehicle and the passing margin (module docstring).

    Args:
        ego_front_s: arc length of the ego's front on its own route.
        ego_length: metres.
        ego_offset: the ego's lateral offset from its route (metres, left positive): beyond half
            a lane it is out in the passing lane, and vehicles in its own lane behind its front
            may be ones it is passing; otherwise they are followers.
        ego_speed, max_speed: m/s (``max_speed``: the ego's speed limit).
        s: (M,) arc lengths of the other vehicles' centres on the ego's route.
        offset: (M,) their lateral offsets from it (metres, left positive).
        speed_along: (M,) their velocity along the route (m/s, negative: coming the other way).
        length: (M,) their lengths.
        lane_width: metres; the own lane is within half a lane of the route, the passing lane
            within half a lane of one lane to the left.
        clear_m: the ego's rear this far past the leader's front before it cuts back in.
        return_s: seconds from cutting back in until it is clear of the oncoming lane.
        pass_window_m: out in the passing lane, a vehicle in the own lane further ahead of the
            ego's front than this (and none beside) is not being passed: the ego can cut back in
            at once, and its margin is that of the return alone.
        min_speed: slower vehicles in the passing lane are not oncoming traffic.

    Returns:
        A :class:`Passing`.
    """
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    offset = np.asarray(offset, dtype=np.float64).reshape(-1)
    speed_along = np.asarray(speed_along, dtype=np.float64).reshape(-1)
    length = np.asarray(length, dtype=np.float64).reshape(-1)
    ego_rear_s = ego_front_s - ego_length
    front, rear = s + 0.5 * length, s - 0.5 * length  # along the route (same direction)
    half = 0.5 * lane_width

    # the leader: own lane, not coming the other way, not yet passed with room to cut in
    own = (np.abs(offset) < half) & (speed_along > -min_speed) & (front + clear_m > ego_rear_s)
    out = abs(ego_offset) >= half
    if not out:
        own &= rear > ego_rear_s  # in its own lane the ego is passing no one: behind are followers
    leader: int | None = None
    beside = own & (rear < ego_front_s)
    if beside.any():
        leader = int(np.flatnonzero(beside)[np.argmax(front[beside])])
    elif own.any():
        nearest = int(np.flatnonzero(own)[np.argmin(rear[own])])
        if not out or rear[nearest] - ego_front_s <= pass_window_m:
            leader = nearest
    if leader is None:
        gap, leader_speed, to_gain, pass_s = np.inf, max_speed, 0.0, 0.0
    else:
        gap = float(rear[leader] - ego_front_s)
        leader_speed = float(speed_along[leader])
        to_gain = float(front[leader] + clear_m - ego_rear_s)
        pass_s = time_to_gain_s(to_gain, ego_speed, max_speed, max(leader_speed, 0.0))
    back_s = pass_s + return_s
    back_m = fastest_distance_m(back_s, ego_speed, max_speed) if np.isfinite(back_s) else np.inf

    # oncoming: passing lane, coming the other way, its rear (the far end) not yet past the ego's rear
    on_front = s - 0.5 * length  # the end facing the ego
    on_rear = s + 0.5 * length
    oncoming_rows = (np.abs(offset - lane_width) < half) & (speed_along < -min_speed) & (on_rear > ego_rear_s)
    oncoming: int | None = None
    margin = meet = np.inf
    distance, oncoming_speed = np.inf, 0.0
    for i in np.flatnonzero(oncoming_rows):
        v = float(-speed_along[i])
        d = float(on_front[i] - ego_front_s)
        m = (d - back_m) / v - back_s if np.isfinite(back_m) else -np.inf
        if oncoming is None or m < margin:
            oncoming, margin, distance, oncoming_speed = int(i), m, d, v
            meet = max(d, 0.0) / (v + max(ego_speed, 0.0))
    return Passing(
        leader=leader,
        leader_gap_m=float(gap),
        leader_speed=float(leader_speed),
        to_gain_m=float(to_gain),
        oncoming=oncoming,
        oncoming_distance_m=float(distance),
        oncoming_speed=float(oncoming_speed),
        meet_s=float(meet),
        back_s=float(back_s),
        back_m=float(back_m),
        margin_s=float(margin),
    )


def passing_features(passing: Passing, ego_speed: float, max_speed: float) -> np.ndarray:
    """(9,) ``PASSING_FEATURES``, all O(1):

    - leader: a flag, its gap / ``GAP_NORM_M`` (clipped to [-2, 2]; 2 without one), the closing
      speed ``(ego speed - leader speed) / 10 m/s`` (clipped to [-2, 2]), its speed / the ego's
      speed limit (clipped to [0, 1.5]; 1 without one), the distance still to gain on it /
      ``GAP_NORM_M`` (clipped to [0, 2]);
    - oncoming: a flag, its distance / 50 m (clipped to [-2, 2]; 2 without one), the time until
      it meets the ego / 5 s (clipped to [0, 2]);
    - the passing margin / ``MARGIN_NORM_S`` (clipped to [-2, 2]; 2 without an oncoming vehicle).
    """
    has_leader = passing.leader is not None
    has_oncoming = passing.oncoming is not None
    return np.array(
        [
            float(has_leader),
            np.clip(passing.leader_gap_m / GAP_NORM_M, -_CLIP, _CLIP) if has_leader else _CLIP,
            np.clip((ego_speed - passing.leader_speed) / _CLOSING_NORM, -_CLIP, _CLIP) if has_leader else 0.0,
            np.clip(passing.leader_speed / max(max_speed, 1e-6), 0.0, 1.5) if has_leader else 1.0,
            np.clip(passing.to_gain_m / GAP_NORM_M, 0.0, _CLIP),
            float(has_oncoming),
            np.clip(passing.oncoming_distance_m / _ONCOMING_NORM_M, -_CLIP, _CLIP) if has_oncoming else _CLIP,
            np.clip(passing.meet_s / _MEET_NORM_S, 0.0, _CLIP) if has_oncoming else _CLIP,
            np.clip(passing.margin_s / MARGIN_NORM_S, -_CLIP, _CLIP),
        ]
    )
