"""The scenarios of :mod:`sim.scenarios`, placed on a CARLA town through its map waypoints.

The embedded scenarios sample positions on our own road layouts. A CARLA town has its own roads,
so here each scenario is a *template* written as lane walks from an anchor waypoint, using only
the waypoint API (``next``, ``previous``, ``get_left_lane``, ``get_right_lane``, ``is_junction``,
``lane_type``, ``transform``). Anchors are tried in a seeded order, first the map's own spawn
points (``Map.get_spawn_points`` projected with ``Map.get_waypoint``), then waypoints every few
metres over the whole town (``Map.generate_waypoints``); the first anchor where every walk of the
template succeeds and no two vehicles overlap is used.

The templates keep each scenario's name, cast (ego, witness, occluder, hidden) and meaning:

- ``overtaking``: a slow truck ahead of the ego, in the lane next to the centre line of a two-way
  road, hides an oncoming car; a connected witness ahead of the truck sees it. Needs 110 m of
  road without a junction.
- ``left_turn``: the ego waits at a junction to turn left; a truck waiting to turn left from the
  opposite approach hides a stream of cars coming straight on in the lane beside it, a short gap
  apart (``LEFT_TURN_TIMING.cars``); a connected witness queued behind the truck sees them. Needs an
  opposite approach with two lanes. Their braking is CARLA's Traffic Manager's, without the
  embedded World's reaction time (``LEFT_TURN_TIMING.reaction_s``).
- ``red_light``: the ego approaches a junction in the inner lane; a queue of van, truck and bus
  held at the stop line in the lane beside it hides a car that ignores its red light on the road
  crossing from the right; a connected witness waits on the road crossing from the left.
- ``merge``: the ego in the right lane of a carriageway with two or more lanes must merge left;
  a fast car in the left lane is hidden behind a truck following the ego closely, and a
  connected witness behind that car sees it. (The embedded ``merge`` uses an on-ramp behind a noise wall;
  towns have no wall to spawn and on-ramps cannot be recognised reliably from waypoints alone,
  so the occluder here is a truck.)
- ``random_traffic``: the ego near a junction in traffic of twice the requested density.

Background traffic follows ``ScenarioParams.traffic_density`` (vehicles per 100 m of lane): every
non-junction driving waypoint of a ``generate_waypoints`` grid within ``background_radius_m`` of
the ego holds a vehicle with probability ``density * spacing / 100`` unless that vehicle would
overlap one already placed. Parked vehicles are not spawned (``parked_fraction`` has no effect).

Everything here works in our right-handed frame: waypoint transforms are converted with
:func:`sim.geometry.T_from_carla_pose` at this boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.box_ops import bev_iou
from sim.geometry import T_from_carla_pose, wrap_angle, yaw_of
from sim.scenarios import LEFT_TURN_TIMING, SCENARIOS, ScenarioParams, sample_extent
from sim.types import ActorKind, Role

__all__ = [
    "DEFAULT_CAVS",
    "CarlaPlacementError",
    "LaneWalker",
    "Placement",
    "ScenarioPlan",
    "alternative_waypoints",
    "plan_scenario",
]

URBAN_SPEED = 13.9  # m/s (50 km/h): the desired speed the embedded urban scenarios use

DEFAULT_CAVS = {"overtaking": 2, "left_turn": 2, "red_light": 2, "merge": 3, "random_traffic": 5}
"""connected vehicles per scenario when ``ScenarioParams.cavs`` is None (as the embedded ones)"""

_TURN_MIN_RAD = np.radians(45.0)  # heading change through a junction that counts as a turn
_STRAIGHT_MAX_RAD = np.radians(30.0)


class CarlaPlacementError(ValueError):
    """No place on the loaded town fits the scenario."""


@dataclass
class Placement:
    """One vehicle to spawn.

    Attributes:
        tag: ``"ego"``, ``"witness"``, ``"occluder"``, ``"hidden"`` or ``""`` for background.
        kind: vehicle class; a blueprint of that ``base_type`` is chosen when spawning.
        role: connected / human.
        waypoint: the ``carla.Waypoint`` the vehicle is spawned on (its transform, lifted).
        speed: m/s along the lane at t = 0.
        desired_speed: m/s for the Traffic Manager; ``None`` keeps the TM's own speed (the speed
            limit less ``speed_difference_pct``).
        speed_difference_pct: TM ``vehicle_percentage_speed_difference`` when ``desired_speed``
            is None (positive = slower than the limit).
        ignore_lights: the TM drives it through red lights.
        hold_s: seconds it stays braked before the TM takes it (queued or waiting to turn).
        route: TM route instructions at the next junctions (``"Left"``, ``"Straight"``, ``"Right"``).
        essential: part of the scenario's cast (spawn failures are errors, not dropped vehicles).
        extent: (3,) nominal full size used to keep placements apart before the real blueprint
            (and its bounding box) is known.
    """

    tag: str
    kind: ActorKind
    role: Role
    waypoint: Any
    speed: float
    desired_speed: float | None
    extent: np.ndarray
    speed_difference_pct: float = 0.0
    ignore_lights: bool = False
    hold_s: float = 0.0
    route: tuple[str, ...] = ()
    essential: bool = True


@dataclass
class ScenarioPlan:
    """Where every vehicle of an episode starts.

    Attributes:
        name: scenario name.
        placements: the cast first (``placements[0]`` is the ego), then background vehicles.
        cavs: connected vehicles wanted (the ego and witnesses included); background vehicles
            nearest the ego are promoted after spawning until this many exist.
        map_name: ``Map.name`` of the town.
    """

    name: str
    placements: list[Placement]
    cavs: int
    map_name: str = ""
    hidden_tags: tuple[str, ...] = field(default=("hidden",))

    @property
    def hidden_indices(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.placements) if p.tag in self.hidden_tags)


class LaneWalker:
    """Moves along a town's lanes with the ``carla.Waypoint`` API; headings in our frame.

    Args:
        carla: the ``carla`` module (for ``carla.LaneType.Driving``).
    """

    def __init__(self, carla: Any) -> None:
        self.driving = carla.LaneType.Driving

    # geometry of one waypoint, right-handed ---------------------------------------------------

    @staticmethod
    def pose(wp: Any) -> np.ndarray:
        """(4, 4) ``T_world_from_waypoint`` in our frame."""
        t = wp.transform
        loc, rot = t.location, t.rotation
        return T_from_carla_pose([loc.x, loc.y, loc.z, rot.roll, rot.yaw, rot.pitch])

    def heading(self, wp: Any) -> float:
        return yaw_of(self.pose(wp))

    def xy(self, wp: Any) -> np.ndarray:
        return self.pose(wp)[:2, 3]

    def usable(self, wp: Any) -> bool:
        """A driving lane outside junctions."""
        return wp is not None and wp.lane_type == self.driving and not wp.is_junction

    # moves -------------------------------------------------------------------------------------

    def _straightest(self, wp: Any, options: list[Any]) -> Any | None:
        if not options:
            return None
        h = self.heading(wp)
        return min(options, key=lambda o: abs(float(wrap_angle(self.heading(o) - h))))

    def ahead(self, wp: Any | None, distance: float) -> Any | None:
        """The waypoint ``distance`` metres further along the lane (straightest branch)."""
        if wp is None:
            return None
        if distance <= 0.0:
            return wp
        return self._straightest(wp, list(wp.next(float(distance))))

    def back(self, wp: Any | None, distance: float) -> Any | None:
        """The waypoint ``distance`` metres back along the lane (straightest branch)."""
        if wp is None:
            return None
        if distance <= 0.0:
            return wp
        return self._straightest(wp, list(wp.previous(float(distance))))

    def _same_direction(self, a: Any, b: Any) -> bool:
        return float(np.cos(self.heading(a) - self.heading(b))) > 0.0

    def left_same(self, wp: Any | None) -> Any | None:
        """The driving lane to the left with the same direction of travel, or None."""
        if wp is None:
            return None
        other = wp.get_left_lane()
        ok = other is not None and other.lane_type == self.driving and self._same_direction(wp, other)
        return other if ok else None

    def right_same(self, wp: Any | None) -> Any | None:
        """The driving lane to the right with the same direction of travel, or None."""
        if wp is None:
            return None
        other = wp.get_right_lane()
        ok = other is not None and other.lane_type == self.driving and self._same_direction(wp, other)
        return other if ok else None

    def opposite(self, wp: Any | None) -> Any | None:
        """The nearest driving lane of the opposite direction (crossing the centre line), or None.

        ``get_left_lane`` of a lane next to the centre line returns the first lane of the other
        direction (CARLA's ``Map::GetLeft`` flips lane id +-1), so walking left finds it.
        """
        current = wp
        for _ in range(6):
            if current is None:
                return None
            current = current.get_left_lane()
            if current is not None and not self._same_direction(wp, current):
                return current if current.lane_type == self.driving else None
        return None

    def distance_to_junction(self, wp: Any | None, max_distance: float, backward: bool = False,
                             step: float = 1.0) -> float | None:
        """Metres along the lane (or back along it) to the first junction waypoint, to 0.1 m (never
        short of it), or None if there is none within ``max_distance``."""
        move = self.back if backward else self.ahead
        current, travelled, fine = wp, 0.0, step
        previous = None
        while current is not None and travelled <= max_distance:
            if current.is_junction:
                if fine <= 0.1 or previous is None:
                    return travelled
                # found within the last coarse step: walk it again in 0.1 m steps
                current, travelled, fine = previous, travelled - fine, 0.1
                previous = None
                continue
            previous = current
            current = move(current, fine)
            travelled += fine
        return None

    def through(self, wp: Any | None, turn: str, after: float, step: float = 1.0) -> Any | None:
        """Drive to the next junction, through it with ``turn`` and ``after`` metres beyond it.

        Args:
            wp: a waypoint before a junction.
            turn: ``"left"``, ``"straight"`` or ``"right"``: the junction connection whose heading
                change (exit minus entry, counter-clockwise positive) is above 45 degrees, within
                30 degrees of zero, or below -45 degrees.
            after: metres past the junction's exit.

        Returns:
            The waypoint, or None if there is no junction within 150 m or no such connection.
        """
        if turn not in ("left", "straight", "right"):
            raise ValueError(f"turn must be 'left', 'straight' or 'right', got {turn!r}")
        distance = self.distance_to_junction(wp, 150.0, step=step)
        if wp is None or distance is None:
            return None
        entry = self.ahead(wp, max(distance - 0.5, 0.0))  # half a metre before the junction
        if entry is None or entry.is_junction:
            return None
        h0 = self.heading(entry)
        for option in entry.next(1.0):  # one waypoint per junction connection
            exit_wp, walked = option, 0.0
            while exit_wp is not None and exit_wp.is_junction and walked < 200.0:
                exit_wp = self.ahead(exit_wp, step)
                walked += step
            if exit_wp is None or exit_wp.is_junction:
                continue
            change = float(wrap_angle(self.heading(exit_wp) - h0))
            kind = "straight" if abs(change) < _STRAIGHT_MAX_RAD else None
            kind = "left" if change > _TURN_MIN_RAD else "right" if change < -_TURN_MIN_RAD else kind
            if kind == turn:
                return self.ahead(exit_wp, after)
        return None


def alternative_waypoints(walk: LaneWalker, wp: Any, count: int, step: float = 2.0) -> list[Any]:
    """``wp`` then waypoints ``step``, ``2 step``, ... metres ahead and behind it, alternating:
    where a vehicle is tried again when spawning at ``wp`` fails."""
    out = [wp]
    k = 1
    while len(out) < count + 1 and k <= count:
        for candidate in (walk.ahead(wp, k * step), walk.back(wp, k * step)):
            if walk.usable(candidate) and len(out) < count + 1:
                out.append(candidate)
        k += 1
    return out


# --------------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------------

Template = Callable[[LaneWalker, Any, np.random.Generator, float], "list[Placement] | None"]


def _car(tag: str, wp: Any, rng: np.random.Generator, speed: float, desired: float | None = None,
         kind: ActorKind = ActorKind.CAR, role: Role = Role.HUMAN, **kw: Any) -> Placement:
    return Placement(tag=tag, kind=kind, role=role, waypoint=wp, speed=float(speed),
                     desired_speed=float(speed if desired is None else desired),
                     extent=sample_extent(kind, rng), **kw)


def _overtaking(walk: LaneWalker, seed: Any, rng: np.random.Generator, k: float) -> list[Placement] | None:
    ego_wp = seed
    if walk.left_same(ego_wp) is not None or walk.opposite(ego_wp) is None:
        return None  # the ego drives next to the centre line, oncoming traffic just left of it
    if walk.distance_to_junction(ego_wp, 110.0) is not None:
        return None
    truck_wp = walk.ahead(ego_wp, rng.uniform(11.0, 14.0))  # 4-7 m between bumpers
    witness_wp = walk.ahead(truck_wp, rng.uniform(20.0, 27.0))
    hidden_wp = walk.opposite(walk.ahead(truck_wp, rng.uniform(25.0, 40.0)))
    if not all(walk.usable(w) for w in (truck_wp, witness_wp, hidden_wp)):
        return None
    return [
        _car("ego", ego_wp, rng, 7.0 * k, URBAN_SPEED * k, role=Role.CONNECTED),
        _car("witness", witness_wp, rng, rng.uniform(8.0, 11.0) * k, role=Role.CONNECTED),
        _car("occluder", truck_wp, rng, rng.uniform(3.5, 5.5) * k, kind=ActorKind.TRUCK),
        _car("hidden", hidden_wp, rng, rng.uniform(9.0, 12.0) * k),
    ]


def _left_turn(walk: LaneWalker, seed: Any, rng: np.random.Generator, k: float) -> list[Placement] | None:
    distance = walk.distance_to_junction(seed, 150.0)
    if distance is None or distance < 6.0:
        return None
    ego_wp = walk.ahead(seed, distance - rng.uniform(2.5, 4.5))
    if walk.through(ego_wp, "left", 1.0) is None:
        return None
    far_side = walk.through(ego_wp, "straight", 0.0)
    truck_wp = walk.opposite(walk.ahead(far_side, rng.uniform(3.0, 4.0)))  # nose in the junction
    hidden_wp = walk.right_same(walk.opposite(walk.ahead(far_side, rng.uniform(18.0, 28.0))))
    hidden_speed = rng.uniform(9.0, 12.0) * k
    # more cars, each a short gap behind the one before, as in the embedded scenario (LEFT_TURN_TIMING)
    stream = [hidden_wp]
    for _ in range(LEFT_TURN_TIMING.cars - 1):
        stream.append(walk.back(stream[-1], hidden_speed * rng.uniform(*LEFT_TURN_TIMING.gap_s)))
    # the witness queues behind the truck and sees the lane beside it (in that lane, behind the
    # second car, the second would hide the first from it)
    witness_wp = walk.back(truck_wp, rng.uniform(11.0, 13.0))
    if not all(walk.usable(w) for w in (ego_wp, truck_wp, *stream, witness_wp)):
        return None
    return [
        _car("ego", ego_wp, rng, 2.0 * k, 8.0 * k, role=Role.CONNECTED, route=("Left",)),
        _car("witness", witness_wp, rng, 0.0, 8.0 * k, role=Role.CONNECTED, route=("Left",)),
        _car("occluder", truck_wp, rng, 0.0, 6.0 * k, kind=ActorKind.TRUCK,
             hold_s=rng.uniform(6.0, 9.0), route=("Left",)),
        *(_car("hidden", w, rng, hidden_speed, route=("Straight",)) for w in stream),
    ]


def _red_light(walk: LaneWalker, seed: Any, rng: np.random.Generator, k: float) -> list[Placement] | None:
    distance = walk.distance_to_junction(seed, 150.0)
    if distance is None or distance < 27.0:
        return None
    ego_wp = walk.ahead(seed, distance - rng.uniform(20.0, 26.0))
    stop_wp = walk.ahead(seed, distance - 0.5)  # the stop line, just before the junction
    if walk.right_same(ego_wp) is None or walk.right_same(stop_wp) is None:
        return None
    witness_wp = walk.opposite(walk.through(ego_wp, "left", rng.uniform(3.0, 6.0)))
    queue: list[Placement] = []
    front = walk.right_same(stop_wp)
    gap_to_front = 0.0
    for kind in (ActorKind.VAN, ActorKind.TRUCK, ActorKind.BUS):
        q = _car("occluder", None, rng, 0.0, 8.0 * k, kind=kind, hold_s=rng.uniform(8.0, 12.0))
        q.waypoint = walk.back(front, gap_to_front + q.extent[0] / 2.0)
        if not walk.usable(q.waypoint):
            return None
        front, gap_to_front = q.waypoint, q.extent[0] / 2.0 + rng.uniform(1.5, 3.0)
        queue.append(q)
    runner_wp = walk.opposite(walk.through(walk.right_same(stop_wp), "right", rng.uniform(22.0, 32.0)))
    if not all(walk.usable(w) for w in (ego_wp, witness_wp, runner_wp)):
        return None
    return [
        _car("ego", ego_wp, rng, rng.uniform(9.0, 11.0) * k, role=Role.CONNECTED, route=("Straight",)),
        _car("witness", witness_wp, rng, 0.0, 8.0 * k, role=Role.CONNECTED),
        *queue,
        _car("hidden", runner_wp, rng, rng.uniform(11.0, 14.0) * k, ignore_lights=True, route=("Straight",)),
    ]


def _merge(walk: LaneWalker, seed: Any, rng: np.random.Generator, k: float) -> list[Placement] | None:
    ego_wp = seed
    if walk.left_same(ego_wp) is None or walk.right_same(ego_wp) is not None:
        return None  # the ego is in the rightmost of two or more lanes
    if walk.distance_to_junction(ego_wp, 100.0) is not None:
        return None
    if walk.distance_to_junction(ego_wp, 80.0, backward=True) is not None:
        return None
    ego_speed = rng.uniform(15.0, 18.0) * k
    truck_wp = walk.back(ego_wp, rng.uniform(8.5, 9.5))  # 2-3 m behind the ego's bumper
    hidden_wp = walk.left_same(walk.back(ego_wp, rng.uniform(22.0, 30.0)))
    witness_wp = walk.back(hidden_wp, rng.uniform(25.0, 35.0))
    if not all(walk.usable(w) for w in (truck_wp, hidden_wp, witness_wp)):
        return None
    hidden_speed = rng.uniform(24.0, 27.0) * k
    return [
        _car("ego", ego_wp, rng, ego_speed, role=Role.CONNECTED),
        _car("witness", witness_wp, rng, hidden_speed, role=Role.CONNECTED),
        _car("occluder", truck_wp, rng, ego_speed, kind=ActorKind.TRUCK),
        _car("hidden", hidden_wp, rng, hidden_speed),
    ]


def _random_traffic(walk: LaneWalker, seed: Any, rng: np.random.Generator, k: float) -> list[Placement] | None:
    distance = walk.distance_to_junction(seed, 60.0)
    if distance is None or distance < 8.0:
        return None
    ego_wp = walk.ahead(seed, max(distance - rng.uniform(8.0, 25.0), 0.0))
    if not walk.usable(ego_wp):
        return None
    return [_car("ego", ego_wp, rng, 0.0, None, role=Role.CONNECTED,
                 speed_difference_pct=100.0 * (1.0 - rng.uniform(0.75, 1.0) * k))]


_TEMPLATES: dict[str, Template] = {
    "overtaking": _overtaking,
    "left_turn": _left_turn,
    "red_light": _red_light,
    "merge": _merge,
    "random_traffic": _random_traffic,
}

_NEEDS = {
    "overtaking": "a two-way road with 110 m free of junctions",
    "left_turn": "a junction with a left turn and an opposite approach of two lanes",
    "red_light": "a junction approached by two lanes, with roads crossing from both sides",
    "merge": "a carriageway with two or more lanes in one direction and 100 m free of junctions",
    "random_traffic": "a junction",
}


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------


def _footprint(walk: LaneWalker, p: Placement, margin: float) -> np.ndarray:
    x, y = walk.xy(p.waypoint)
    length, width = p.extent[0] + 2.0 * margin, p.extent[1] + 2.0 * margin
    return np.array([x, y, 0.0, length, width, 1.0, walk.heading(p.waypoint)])


def _overlaps(walk: LaneWalker, placed: list[Placement], candidate: Placement, margin: float) -> bool:
    if not placed:
        return False
    boxes = np.stack([_footprint(walk, p, margin) for p in placed])
    return bool(np.any(bev_iou(_footprint(walk, candidate, margin)[None], boxes) > 0.0))


def _cast_is_clear(walk: LaneWalker, cast: list[Placement]) -> bool:
    return all(not _overlaps(walk, cast[:i], p, 0.3) for i, p in enumerate(cast))


def _anchor_candidates(walk: LaneWalker, carla_map: Any, rng: np.random.Generator) -> list[Any]:
    """Spawn points (as waypoints) in a seeded order, then a 10 m grid of waypoints in a seeded order."""
    spawn = [carla_map.get_waypoint(t.location) for t in carla_map.get_spawn_points()]
    spawn = [w for w in spawn if walk.usable(w)]
    grid = [w for w in carla_map.generate_waypoints(10.0) if walk.usable(w)]
    return [spawn[i] for i in rng.permutation(len(spawn))] + [grid[i] for i in rng.permutation(len(grid))]


def _background(walk: LaneWalker, carla_map: Any, placed: list[Placement], params: ScenarioParams,
                density: float, radius: float, rng: np.random.Generator, spacing: float = 5.0) -> list[Placement]:
    """Human-driven vehicles on a ``spacing`` grid of lane waypoints near the ego (see module doc)."""
    if density <= 0.0:
        return []
    ego_xy = walk.xy(placed[0].waypoint)
    p_take = min(density * spacing / 100.0, 1.0)
    out: list[Placement] = []
    for wp in carla_map.generate_waypoints(spacing):
        if not walk.usable(wp) or np.linalg.norm(walk.xy(wp) - ego_xy) > radius:
            continue
        if rng.uniform() >= p_take:
            continue
        kind = (ActorKind.CAR, ActorKind.VAN, ActorKind.TRUCK, ActorKind.BUS)[
            int(rng.choice(4, p=[0.7, 0.15, 0.1, 0.05]))
        ]
        candidate = _car("", wp, rng, 0.0, None, kind=kind, essential=False,
                         speed_difference_pct=100.0 * (1.0 - rng.uniform(0.75, 1.0) * params.speed_scale))
        if not _overlaps(walk, placed + out, candidate, 2.0):
            out.append(candidate)
    return out


def plan_scenario(
    carla: Any,
    carla_map: Any,
    name: str,
    rng: np.random.Generator,
    params: ScenarioParams | None = None,
    background_radius_m: float = 120.0,
    max_anchors: int = 400,
) -> ScenarioPlan:
    """Place scenario ``name`` on ``carla_map`` (a ``carla.Map``), drawing every choice from ``rng``.

    Raises:
        ValueError: unknown scenario name (the message lists the valid ones).
        CarlaPlacementError: none of the first ``max_anchors`` anchors fits the scenario.
    """
    if name not in _TEMPLATES:
        raise ValueError(f"unknown scenario {name!r}; valid scenarios: {list(SCENARIOS)}")
    params = params or ScenarioParams()
    params.validate()
    walk = LaneWalker(carla)
    template = _TEMPLATES[name]
    cast = None
    tried = 0
    for anchor in _anchor_candidates(walk, carla_map, rng)[:max_anchors]:
        tried += 1
        cast = template(walk, anchor, rng, params.speed_scale)
        if cast is not None and _cast_is_clear(walk, cast):
            break
        cast = None
    if cast is None:
        raise CarlaPlacementError(
            f"no place on map {carla_map.name!r} fits scenario {name!r} after {tried} anchors; it needs "
            f"{_NEEDS[name]}. Load a town that has one (CarlaWorld(town=...))."
        )
    density = params.traffic_density * (2.0 if name == "random_traffic" else 1.0)
    background = _background(walk, carla_map, cast, params, density, background_radius_m, rng)
    return ScenarioPlan(name=name, placements=cast + background, cavs=params.cavs or DEFAULT_CAVS[name],
                        map_name=str(carla_map.name))
