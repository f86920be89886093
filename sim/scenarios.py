"""Occlusion scenarios: who is where at t = 0, sampled from a seed.

Each scenario places an ego (a connected vehicle) whose view of a danger is blocked, at least one
other connected vehicle that sees it, and background traffic:

- ``overtaking`` (two_lane_road): the ego follows a slow truck that hides an oncoming car; a
  connected car that has already passed the truck sees the oncoming lane.
- ``left_turn`` (intersection): the ego turns left across oncoming traffic on a green; a bus
  waiting in the box to turn left hides a stream of three oncoming cars in the outer lane, a short
  gap apart, who cannot see the ego either and brake for it only a reaction time after it pulls
  into their lane; a connected car queued behind the bus sees them.
- ``red_light`` (intersection): a queue in the lane beside the ego and a connected van waiting at
  the red of the crossing road hide a car running that red in the van's outer lane; the van sees
  it.
- ``merge`` (highway): the ego on the on-ramp is screened by a noise wall from a car in the right
  lane of the carriageway it is about to merge into.
- ``random_traffic`` (intersection): N connected vehicles in dense mixed traffic, for perception
  data; no scripted danger.

In ``overtaking`` and ``red_light`` the hidden vehicle's timing is drawn per seed from two ranges (see
:func:`_arrival_offset`): *early*, when it reaches the ego's path about when the ego would at full
speed (the ego has to let it pass), or *late*, when it arrives about when an ego that let an early
one pass would (the ego has to go at once). The ego cannot tell the two apart from its own sensors
in time, and the driving env's time limits (``sim.env.SCENARIO_TASKS``) leave no room for waiting
out both, so no fixed timing succeeds on much more than half of the seeds while knowing where the
hidden vehicle is (shared by the connected vehicle that sees it) is enough to succeed on all of
them; ``bench/scripted_policies.py`` measures both. ``left_turn`` times its stream of cars
against the ego the same way (:class:`LeftTurnTiming`).

A scenario is pure data (:class:`ScenarioSpec`); :mod:`sim.world` turns it into moving vehicles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from sim.roads import RoadLayout, SignalPlan, make_layout
from sim.routes import Route
from sim.types import ActorKind, Role

__all__ = [
    "LEFT_TURN_TIMING",
    "SCENARIOS",
    "ActorSpec",
    "ScenarioParams",
    "ScenarioSpec",
    "build_scenario",
    "fastest_arrival_s",
    "fastest_arrivals_on_route_s",
    "route_crossing",
    "sample_extent",
]

SCENARIOS = ("overtaking", "left_turn", "red_light", "merge", "random_traffic")

# Typical full sizes (length, width, height) in metres and the spread sampled around them.
_EXTENTS = {
    ActorKind.CAR: ((4.6, 1.85, 1.5), (0.4, 0.08, 0.08)),
    ActorKind.VAN: ((5.3, 2.0, 2.2), (0.3, 0.05, 0.15)),
    ActorKind.TRUCK: ((9.0, 2.5, 3.7), (0.8, 0.03, 0.2)),
    ActorKind.BUS: ((12.0, 2.55, 3.2), (0.3, 0.02, 0.05)),
}
_KIND_MIX = ((ActorKind.CAR, 0.7), (ActorKind.VAN, 0.15), (ActorKind.TRUCK, 0.1), (ActorKind.BUS, 0.05))

EGO_ACCEL = 4.0
"""m/s^2: the acceleration of a connected vehicle whose controller is asked for full speed
(sim.dynamics.MAX_ACCEL), used to time the hidden vehicles against the ego"""
_LAG_S = 0.15

LEFT_TURN_BUS_PAST_STOP_M = (1.0, 1.5)
"""how far (m) the left-turning bus opposite stands past its stop line, wheels straight"""


@dataclass(frozen=True)
class LeftTurnTiming:
    """When the oncoming cars hidden by the bus cross the ego's path (``left_turn``).

    One hidden car, early or late, leaves an ``ego_only`` ego a way out: approaching at turning
    speed it sees past the bus when there is still room to brake for an early car, and a late one
    is not there yet (the "hold, then informed" policies of bench/scripted_policies.py reach 1.00).
    Two cars a short gap apart leave a gap that only an ego told where it is fits through, as
    long as the cars keep coming: a learned ``ego_only`` planner crept up to the lane, saw both
    and went after the second, which braked for it the moment it pulled into its lane (0.77 on
    100 held-out seeds). Hence a third car behind the second, so that a creeping ego has no gap
    after it within the time limit, and a reaction time (``reaction_s``) before the cars brake
    for a vehicle that pulls into their lane: from a crawl the ego needs longer to clear the lane
    than a gap leaves, and it can no longer count on being let through.

    Chosen from measured collision windows (bench/scripted_policies.py, blind timings against one
    car): taking the turn at its curve speed (6.6 m/s), an ego that goes at once meets a car whose
    offset (below) is in [-1.3, -0.1] s, and each second of braking first moves that 1.2-1.4 s
    window about a second later. With the first car spread over 1.8 s and the second 1.6-2.0 s
    behind it, every blind timing and every hedge meets one of the two cars on 40-75 % of the seeds
    (waiting both out does not fit in the time limit), while an ego that knows both arrival times
    goes between them.
    """

    first_offset_s: tuple[float, float] = (-1.3, 0.5)
    """the first car's arrival at the conflict point minus the ego's fastest arrival there
    (turning at the curve speed: :func:`fastest_arrivals_on_route_s`), seconds"""
    gap_s: tuple[float, float] = (1.6, 2.0)
    """seconds between the two cars' arrivals"""
    speed: tuple[float, float] = (14.0, 16.0)
    """m/s (50-58 km/h on a 50 km/h road)"""
    cars: int = 3
    """hidden cars in the stream, each ``gap_s`` behind the one before"""
    reaction_s: float = 1.5
    """seconds before a hidden car brakes for a vehicle that pulls into its lane: the bus hides the
    ego from it as much as it from the ego, and with right of way nothing warns it (a brake
    reaction time to a surprise event; drivers react to expected ones in about 0.75 s)"""


LEFT_TURN_TIMING = LeftTurnTiming()

# (early, late) ranges of the hidden vehicle's arrival at the conflict point minus the ego's
# fastest arrival there, seconds (see _arrival_offset). Chosen from the measured collision windows
# of "brake for d seconds, then full speed" (bench/scripted_policies.py): every d that still
# reaches the goal in time collides with one of the two ranges, and at full speed the ego clears
# the conflict point well before a late one.
RED_LIGHT_OFFSETS = ((-0.15, 0.1), (0.55, 0.7))
OVERTAKING_MEETING_S = ((1.4, 2.2), (6.0, 6.6))
"""(early, late) ranges of the time at which the hidden oncoming car passes the truck's front:
early, it meets an ego that pulls out at once; late, one that waited for an early car to pass"""


def sample_extent(kind: ActorKind, rng: np.random.Generator) -> np.ndarray:
    """(3,) full size of a vehicle of ``kind``: typical values with a small uniform spread."""
    mean, spread = _EXTENTS[kind]
    return np.round(np.asarray(mean) + rng.uniform(-1.0, 1.0, 3) * np.asarray(spread), 3)


def _sample_kind(rng: np.random.Generator) -> ActorKind:
    kinds, p = zip(*_KIND_MIX, strict=True)
    return kinds[int(rng.choice(len(kinds), p=p))]


@dataclass(frozen=True)
class ScenarioParams:
    """Knobs shared by every scenario; each scenario samples its own specifics from the seed."""

    cavs: int | None = None
    """connected vehicles including the ego; None = the scenario's default"""
    traffic_density: float = 1.0
    """background vehicles per 100 m of lane"""
    parked_fraction: float = 0.3
    """fraction of parking spots holding a parked vehicle (layouts with parking)"""
    speed_scale: float = 1.0
    """multiplies every sampled speed"""

    def validate(self) -> None:
        problems = []
        if self.cavs is not None and not 1 <= self.cavs <= 32:
            problems.append(f"cavs must be in [1, 32], got {self.cavs}")
        if not 0.0 <= self.traffic_density <= 6.0:
            problems.append(f"traffic_density must be in [0, 6] vehicles/100 m, got {self.traffic_density}")
        if not 0.0 <= self.parked_fraction <= 1.0:
            problems.append(f"parked_fraction must be in [0, 1], got {self.parked_fraction}")
        if not 0.2 <= self.speed_scale <= 2.0:
            problems.append(f"speed_scale must be in [0.2, 2], got {self.speed_scale}")
        if problems:
            raise ValueError("invalid scenario parameters: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> ScenarioParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown scenario parameter(s) {unknown}; valid: {sorted(known)}")
        params = cls(**values)
        params.validate()
        return params


@dataclass
class ActorSpec:
    """A vehicle at t = 0.

    Moving vehicles sit on ``route`` at arc length ``s``; parked ones at ``pose`` (x, y, yaw).
    """

    kind: ActorKind
    role: Role
    extent: np.ndarray
    route: str | None = None
    s: float = 0.0
    speed: float = 0.0
    desired_speed: float = 0.0
    pose: tuple[float, float, float] | None = None
    ignore_signals: bool = False
    hold_until: float = 0.0
    """seconds: the vehicle stays stopped until then (waiting to turn, queued)"""
    reaction_s: float = 0.0
    """seconds: the driver model reacts to a vehicle that enters its path this long after it did
    (0: at once); vehicles already in its path at t = 0 count from the start"""
    tag: str = ""
    """"ego", "hidden", "occluder", "witness" or "" for background"""


@dataclass
class ScenarioSpec:
    """Everything needed to start an episode: the road, the signal timing and the actors.

    ``actors[ego_index]`` is the ego; ``hidden_indices`` are the actors the ego cannot see at t = 0.
    """

    name: str
    layout: RoadLayout
    actors: list[ActorSpec]
    signal_plan: SignalPlan = field(default_factory=SignalPlan)
    ego_index: int = 0
    hidden_indices: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _vehicle(
    kind: ActorKind,
    role: Role,
    rng: np.random.Generator,
    route: str,
    s: float,
    speed: float,
    desired: float | None = None,
    **kw,
) -> ActorSpec:
    return ActorSpec(
        kind=kind,
        role=role,
        extent=sample_extent(kind, rng),
        route=route,
        s=float(s),
        speed=float(speed),
        desired_speed=float(speed if desired is None else desired),
        **kw,
    )


def _xy(layout: RoadLayout, a: ActorSpec) -> np.ndarray:
    if a.pose is not None:
        return np.array(a.pose[:2])
    return layout.route(a.route).point(a.s)


def _free(
    layout: RoadLayout, actors: list[ActorSpec], xy: np.ndarray, length: float, clearance: float
) -> bool:
    """True if a vehicle of ``length`` centred at ``xy`` keeps ``clearance`` from every actor."""
    for a in actors:
        if np.linalg.norm(_xy(layout, a) - xy) < (a.extent[0] + length) / 2.0 + clearance:
            return False
    return True


def _add_background(
    layout: RoadLayout,
    actors: list[ActorSpec],
    routes: list[str],
    params: ScenarioParams,
    rng: np.random.Generator,
    s_max: dict[str, float] | None = None,
    clearance: float = 6.0,
) -> None:
    """Fill ``routes`` with human-driven traffic at ``params.traffic_density`` vehicles per 100 m.

    Headways are exponential (a Poisson stream) with a minimum gap; vehicles that would come within
    ``clearance`` of an existing actor are skipped.
    """
    if params.traffic_density <= 0:
        return
    mean_spacing = 100.0 / params.traffic_density
    for name in routes:
        route = layout.route(name)
        limit = (s_max or {}).get(name, route.length - 20.0)
        s = rng.uniform(0.0, mean_spacing)
        while s < limit:
            kind = _sample_kind(rng)
            spec = _vehicle(kind, Role.HUMAN, rng, name, s, 0.0)
            speed = route.speed_limit * rng.uniform(0.75, 1.0) * params.speed_scale
            spec.speed, spec.desired_speed = speed, speed
            if _free(layout, actors, route.point(s), spec.extent[0], clearance):
                actors.append(spec)
            s += spec.extent[0] + 6.0 + rng.exponential(mean_spacing)


def route_crossing(
    layout: RoadLayout, route_a: str, route_b: str, window: tuple[float, float]
) -> tuple[float, float]:
    """Arc lengths ``(s_a, s_b)`` where two routes cross (closest approach of their centrelines,
    searched within ``window`` of arc length on both, to 0.1 m)."""
    a, b = layout.route(route_a), layout.route(route_b)
    s_a = np.arange(window[0], min(window[1], a.length), 0.1)
    s_b = np.arange(window[0], min(window[1], b.length), 0.1)
    d = np.linalg.norm(a.point(s_a)[:, None, :] - b.point(s_b)[None, :, :], axis=-1)  # (A, B)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return float(s_a[i]), float(s_b[j])


def fastest_arrival_s(distance: float, speed: float, max_speed: float) -> float:
    """Seconds a connected vehicle at ``speed`` needs to drive ``distance`` metres pressing FASTER
    every decision: about 0.15 s of controller lag, then ``EGO_ACCEL`` up to ``max_speed``."""
    speed = min(speed, max_speed)
    t_accel = (max_speed - speed) / EGO_ACCEL
    d_accel = speed * t_accel + 0.5 * EGO_ACCEL * t_accel**2
    if distance <= d_accel:
        return _LAG_S + (-speed + np.sqrt(speed**2 + 2.0 * EGO_ACCEL * distance)) / EGO_ACCEL
    return _LAG_S + t_accel + (distance - d_accel) / max_speed


def fastest_arrivals_on_route_s(
    route: Route, s: float, distances: Sequence[float], speed: float, max_speed: float
) -> list[float]:
    """:func:`fastest_arrival_s` for each of ``distances`` (metres ahead of arc length ``s`` on
    ``route``) when the vehicle also keeps to the route's curve speed
    (:meth:`sim.routes.Route.curve_speed`), as its controller does.

    Without a curve slower than ``max_speed`` on the way this is :func:`fastest_arrival_s`;
    otherwise the speed is stepped forward (every 0.05 s: ``EGO_ACCEL`` up to the lower of
    ``max_speed`` and the curve speed, which already includes the braking ahead of a curve)
    after the same controller lag.
    """
    far = max(max(distances, default=0.0), 0.0)
    if route.min_curve_speed(s, s + far) >= max_speed:
        return [fastest_arrival_s(max(d, 0.0), speed, max_speed) for d in distances]
    # Stepped by hand: a closed form would need the curve speed's profile piece by piece, and a
    # few hundred float steps cost less than one ODE solver call.
    dt = 0.05
    order = sorted(range(len(distances)), key=lambda i: distances[i])
    out = [0.0] * len(distances)
    t, travelled, v = _LAG_S, 0.0, min(speed, max_speed)
    for i in order:
        d = max(distances[i], 0.0)
        while travelled < d:
            v_next = min(v + EGO_ACCEL * dt, max_speed, route.curve_speed(s + travelled))
            step = 0.5 * (v + v_next) * dt
            if travelled + step >= d:  # arrives within this step: interpolate
                t_hit = t + dt * (d - travelled) / step
                break
            travelled, v, t = travelled + step, v_next, t + dt
        else:
            t_hit = t
        out[i] = t_hit
    return out


def _arrival_offset(rng: np.random.Generator, early: tuple[float, float], late: tuple[float, float]) -> float:
    """A hidden vehicle's timing, seconds, uniform in ``early`` (it would hit an ego that goes at
    once) or in ``late`` (it would hit an ego that waited for an early one), each with probability
    1/2: the arrival at the conflict point minus the ego's fastest arrival (crossing scenarios),
    or the time it passes the occluder's front (overtaking)."""
    lo, hi = early if rng.uniform() < 0.5 else late
    return float(rng.uniform(lo, hi))


def _add_parked(
    layout: RoadLayout, actors: list[ActorSpec], params: ScenarioParams, rng: np.random.Generator
):
    for x, y, yaw in layout.parking_spots:
        if rng.uniform() < params.parked_fraction:
            kind = ActorKind.CAR if rng.uniform() < 0.85 else ActorKind.VAN
            spec = ActorSpec(kind=kind, role=Role.PARKED, extent=sample_extent(kind, rng), pose=(x, y, yaw))
            if _free(layout, actors, np.array([x, y]), spec.extent[0], 1.0):
                actors.append(spec)


def _promote_cavs(layout: RoadLayout, actors: list[ActorSpec], wanted: int, ego_xy: np.ndarray) -> None:
    """Turn the background vehicles nearest the ego into connected vehicles until ``wanted`` exist."""
    have = sum(a.role is Role.CONNECTED for a in actors)
    candidates = [i for i, a in enumerate(actors) if a.role is Role.HUMAN and a.tag == ""]
    candidates.sort(key=lambda i: float(np.linalg.norm(_xy(layout, actors[i]) - ego_xy)))
    for i in candidates[: max(wanted - have, 0)]:
        actors[i].role = Role.CONNECTED
        actors[i].tag = "cav"
    have = sum(a.role is Role.CONNECTED for a in actors)
    if have < wanted:
        raise ValueError(
            f"could place only {have} connected vehicles, {wanted} requested; raise traffic_density"
        )


# --------------------------------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------------------------------


def overtaking(rng: np.random.Generator, params: ScenarioParams) -> ScenarioSpec:
    layout = make_layout("two_lane_road", rng)
    k = params.speed_scale
    east, west = layout.route("E"), layout.route("W")
    truck_speed = rng.uniform(3.5, 5.0) * k
    ego = _vehicle(
        ActorKind.CAR,
        Role.CONNECTED,
        rng,
        "E",
        rng.uniform(140.0, 170.0),
        truck_speed,
        east.speed_limit * k,
        tag="ego",
    )
    truck = _vehicle(ActorKind.TRUCK, Role.HUMAN, rng, "E", 0.0, truck_speed, tag="occluder")
    truck.s = ego.s + (ego.extent[0] + truck.extent[0]) / 2.0 + rng.uniform(5.0, 7.0)
    # the oncoming car hidden by the truck passes the truck's front either soon (an ego that
    # pulls out at once meets it head-on) or later (it meets an ego that waited for an early one)
    x_truck_front = east.point(truck.s)[0] + truck.extent[0] / 2.0
    speed = rng.uniform(11.0, 13.0) * k
    t_meet = _arrival_offset(rng, *OVERTAKING_MEETING_S)
    x_hidden = x_truck_front + (speed + truck_speed) * t_meet
    hidden = _vehicle(
        ActorKind.CAR,
        Role.HUMAN,
        rng,
        "W",
        west.project(np.array([[x_hidden, 1.75]]))[0][0],
        speed,
        tag="hidden",
    )
    # the witness has overtaken the truck and drives on ahead, seeing the oncoming lane
    witness = _vehicle(
        ActorKind.CAR,
        Role.CONNECTED,
        rng,
        "E",
        truck.s + truck.extent[0] / 2 + rng.uniform(15.0, 22.0),
        rng.uniform(9.0, 11.0) * k,
        tag="witness",
    )
    actors = [ego, witness, truck, hidden]
    # background traffic behind the ego and, oncoming, only far enough away not to meet it
    s_max = {"E": ego.s - 20.0, "W": west.project(np.array([[x_hidden + 250.0, 1.75]]))[0][0]}
    _add_background(layout, actors, ["E", "W"], params, rng, s_max=s_max, clearance=12.0)
    _add_parked(layout, actors, params, rng)
    _promote_cavs(layout, actors, params.cavs or 2, _xy(layout, ego))
    return ScenarioSpec("overtaking", layout, actors, ego_index=0, hidden_indices=(3,))


def left_turn(rng: np.random.Generator, params: ScenarioParams) -> ScenarioSpec:
    layout = make_layout("intersection", rng)
    k = params.speed_scale
    arm_stop = layout.route("S_left").stop_lines[0][0]  # arc length of every approach's stop line
    # the ego comes up to the green at turning speed
    ego = _vehicle(
        ActorKind.CAR,
        Role.CONNECTED,
        rng,
        "S_left",
        arm_stop - rng.uniform(6.0, 9.0),
        rng.uniform(7.0, 8.0) * k,
        8.0 * k,
        tag="ego",
    )
    # a bus waiting in the box to turn left, wheels still straight, hides the oncoming outer lane;
    # on its route's arc it would already point into its turn and open a gap past its nose
    bus = _vehicle(
        ActorKind.BUS,
        Role.HUMAN,
        rng,
        "N_left",
        0.0,
        0.0,
        6.0 * k,
        hold_until=rng.uniform(9.0, 12.0),
        tag="occluder",
    )
    bus.s = arm_stop + rng.uniform(*LEFT_TURN_BUS_PAST_STOP_M)
    bus_route = layout.route("N_left")
    bus_xy = bus_route.point(bus.s)
    bus.pose = (float(bus_xy[0]), float(bus_xy[1]), float(bus_route.heading(arm_stop - 1.0)))
    # two oncoming cars behind the bus cross the ego's path: the first from about when it meets an
    # ego going at once to when it meets a hedging one, the second a short gap after it
    # (see LEFT_TURN_TIMING)
    s_ego_conflict, s_hidden_conflict = route_crossing(
        layout, "S_left", "N_straight", (arm_stop - 20, arm_stop + 40)
    )
    s_left = layout.route("S_left")
    (t_ego,) = fastest_arrivals_on_route_s(s_left, ego.s, [s_ego_conflict - ego.s], ego.speed, s_left.speed_limit)
    offset = rng.uniform(*LEFT_TURN_TIMING.first_offset_s)
    hidden = []
    for _ in range(LEFT_TURN_TIMING.cars):
        if hidden:
            offset += rng.uniform(*LEFT_TURN_TIMING.gap_s)
        speed = rng.uniform(*LEFT_TURN_TIMING.speed) * k
        s = s_hidden_conflict - speed * max(t_ego + offset, 0.5)
        if hidden:  # keep a sane headway behind the first whatever the draw
            s = min(s, hidden[-1].s - hidden[-1].extent[0] - 6.0)
        hidden.append(
            _vehicle(
                ActorKind.CAR,
                Role.HUMAN,
                rng,
                "N_straight",
                s,
                speed,
                reaction_s=LEFT_TURN_TIMING.reaction_s,
                tag="hidden",
            )
        )
    # the witness waits behind the bus and sees the outer lane beside it
    witness = _vehicle(
        ActorKind.CAR, Role.CONNECTED, rng, "N_straight_inner", 0.0, 0.0, 8.0 * k, tag="witness"
    )
    witness.s = bus.s - (bus.extent[0] + witness.extent[0]) / 2.0 - rng.uniform(2.0, 4.0)
    actors = [ego, witness, bus, *hidden]
    # background on through and right-turn routes only, away from the intersection; in the
    # oncoming outer lane only far enough back not to reach the ego's path within the episode
    routes = [f"{a}_{m}" for a in ("S", "E", "W", "N") for m in ("straight", "straight_inner", "right")]
    s_max = {r: arm_stop - 35.0 for r in routes}
    s_max["N_straight"] = min(arm_stop - 130.0, hidden[-1].s - 60.0)
    s_max["N_straight_inner"] = witness.s - 15.0
    _add_background(layout, actors, routes, params, rng, s_max=s_max, clearance=10.0)
    _promote_cavs(layout, actors, params.cavs or 2, _xy(layout, ego))
    plan = SignalPlan(offset=2.0)  # north-south green since 2 s
    # hidden at t = 0: the first two; the third, 90-135 m from the ego, can put a few returns of a
    # 64-beam LiDAR on its roof past the bus's other side (the env's 80 m visibility range ends
    # before it), and slips into the bus's shadow as it comes closer
    return ScenarioSpec("left_turn", layout, actors, signal_plan=plan, ego_index=0, hidden_indices=(3, 4))


def red_light(rng: np.random.Generator, params: ScenarioParams) -> ScenarioSpec:
    layout = make_layout("intersection", rng)
    k = params.speed_scale
    arm_stop = layout.route("W_straight").stop_lines[0][0]
    ego = _vehicle(
        ActorKind.CAR,
        Role.CONNECTED,
        rng,
        "W_straight_inner",
        arm_stop - rng.uniform(20.0, 26.0),
        rng.uniform(9.0, 11.0) * k,
        tag="ego",
    )
    # the witness: a connected van waiting at the red in the inner lane of the runner's approach;
    # it hides the runner, who passes it in the outer lane, from the ego until the last moment
    witness = _vehicle(
        ActorKind.VAN, Role.CONNECTED, rng, "S_straight_inner", 0.0, 0.0, 8.0 * k, tag="witness"
    )
    witness.s = arm_stop - witness.extent[0] / 2.0 - rng.uniform(0.3, 1.0)
    # the queue in the outer lane beside the ego, first vehicle at the stop line, held for a while
    queue = []
    s_front = arm_stop
    for kind in (ActorKind.VAN, ActorKind.TRUCK, ActorKind.BUS):
        q = _vehicle(
            kind,
            Role.HUMAN,
            rng,
            "W_straight",
            0.0,
            0.0,
            8.0 * k,
            hold_until=rng.uniform(8.0, 12.0),
            tag="occluder",
        )
        q.s = s_front - q.extent[0] / 2.0 - 0.5
        s_front = q.s - q.extent[0] / 2.0 - rng.uniform(1.5, 3.0)
        queue.append(q)
    # the runner reaches the ego's lane either about when the ego would at full speed, or about
    # when an ego that let such a runner pass would
    s_ego_conflict, s_runner_conflict = route_crossing(
        layout, "W_straight_inner", "S_straight", (arm_stop - 20, arm_stop + 40)
    )
    t_ego = fastest_arrival_s(s_ego_conflict - ego.s, ego.speed, layout.route("W_straight_inner").speed_limit)
    speed = rng.uniform(12.0, 14.0) * k
    t_runner = max(t_ego + _arrival_offset(rng, *RED_LIGHT_OFFSETS), 0.5)
    runner = _vehicle(
        ActorKind.CAR,
        Role.HUMAN,
        rng,
        "S_straight",
        s_runner_conflict - speed * t_runner,
        speed,
        ignore_signals=True,
        tag="hidden",
    )
    actors = [ego, witness, *queue, runner]
    hidden_index = len(actors) - 1
    routes = [f"{a}_{m}" for a in ("W", "E", "N") for m in ("straight", "straight_inner", "right")]
    s_max = {r: arm_stop - 40.0 for r in routes}
    s_max["S_straight_inner"] = witness.s - 15.0  # stopped behind the witness at the red
    _add_background(layout, actors, [*routes, "S_straight_inner"], params, rng, s_max=s_max, clearance=10.0)
    _promote_cavs(layout, actors, params.cavs or 2, _xy(layout, ego))
    plan = SignalPlan(offset=SignalPlan().cycle / 2.0 + 3.0)  # east-west green since 3 s
    return ScenarioSpec(
        "red_light", layout, actors, signal_plan=plan, ego_index=0, hidden_indices=(hidden_index,)
    )


def merge(rng: np.random.Generator, params: ScenarioParams) -> ScenarioSpec:
    layout = make_layout("highway", rng)
    k = params.speed_scale
    ramp, e0 = layout.route("ramp"), layout.route("E0")
    x_ego = rng.uniform(-115.0, -100.0)
    ego_s = float(ramp.project(np.array([[x_ego, -20.0]]))[0][0])
    ego = _vehicle(ActorKind.CAR, Role.CONNECTED, rng, "ramp", ego_s, rng.uniform(15.0, 18.0) * k, tag="ego")
    x_hidden = x_ego + rng.uniform(-10.0, 15.0)
    hidden = _vehicle(
        ActorKind.CAR,
        Role.HUMAN,
        rng,
        "E0",
        e0.project(np.array([[x_hidden, -5.25]]))[0][0],
        rng.uniform(24.0, 27.0) * k,
        tag="hidden",
    )
    witness = _vehicle(
        ActorKind.CAR,
        Role.CONNECTED,
        rng,
        "E0",
        hidden.s - rng.uniform(25.0, 35.0),
        hidden.speed,
        tag="witness",
    )
    witness2 = _vehicle(
        ActorKind.VAN,
        Role.CONNECTED,
        rng,
        "E1",
        hidden.s + rng.uniform(-10.0, 10.0),
        rng.uniform(26.0, 29.0) * k,
        tag="witness",
    )
    ramp_follower = _vehicle(
        _sample_kind(rng), Role.HUMAN, rng, "ramp", ego.s - rng.uniform(25.0, 40.0), ego.speed, 22.0 * k
    )
    actors = [ego, witness, witness2, hidden, ramp_follower]
    _add_background(layout, actors, ["E0", "E1", "W0", "W1"], params, rng, clearance=15.0)
    _promote_cavs(layout, actors, params.cavs or 3, _xy(layout, ego))
    return ScenarioSpec("merge", layout, actors, ego_index=0, hidden_indices=(3,))


def random_traffic(rng: np.random.Generator, params: ScenarioParams) -> ScenarioSpec:
    layout = make_layout("intersection", rng)
    dense = ScenarioParams(
        cavs=params.cavs, traffic_density=params.traffic_density * 2.0, speed_scale=params.speed_scale
    )
    routes = [f"{a}_{m}" for a in ("S", "E", "N", "W") for m in ("straight", "straight_inner", "right")]
    actors: list[ActorSpec] = []
    _add_background(layout, actors, routes, dense, rng, clearance=4.0)
    if not actors:
        raise ValueError("random_traffic needs traffic_density > 0")
    # the ego: the background vehicle closest to the intersection centre
    ego_i = int(np.argmin([np.linalg.norm(_xy(layout, a)) for a in actors]))
    actors.insert(0, actors.pop(ego_i))
    actors[0].role, actors[0].tag = Role.CONNECTED, "ego"
    _promote_cavs(layout, actors, params.cavs or 5, _xy(layout, actors[0]))
    plan = SignalPlan(offset=float(rng.uniform(0.0, SignalPlan().cycle)))
    return ScenarioSpec("random_traffic", layout, actors, signal_plan=plan, ego_index=0)


def build_scenario(name: str, rng: np.random.Generator, params: ScenarioParams | None = None) -> ScenarioSpec:
    """Sample scenario ``name``; ``ValueError`` lists the valid names."""
    params = params or ScenarioParams()
    params.validate()
    match name:
        case "overtaking":
            return overtaking(rng, params)
        case "left_turn":
            return left_turn(rng, params)
        case "red_light":
            return red_light(rng, params)
        case "merge":
            return merge(rng, params)
        case "random_traffic":
            return random_traffic(rng, params)
    raise ValueError(f"unknown scenario {name!r}; valid scenarios: {list(SCENARIOS)}")
