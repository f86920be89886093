"""Lanes and the low-level controller behind the driving env's meta-actions.

highway-env's discrete meta-actions (``LANE_LEFT, IDLE, LANE_RIGHT, FASTER, SLOWER``, in its order)
set two targets that a low-level controller tracks every tick:

- a **target speed**, moved by ``speed_step`` per FASTER / SLOWER within ``[0, max_speed]``, held
  by a proportional speed controller (acceleration = gain x speed error, clipped to the
  vehicle's limits) up to the own route's curve speed (:meth:`sim.routes.Route.curve_speed`:
  the controller slows down for a turn as a driver would, whatever the target). The curve speed
  is read one time constant of the speed controller (1 / gain) ahead: a proportional controller
  lags a falling speed by deceleration / gain, which the anticipation makes up for;
- a **target lateral offset** from the vehicle's own route (metres, positive = left, as routes
  run in the direction of travel with right-hand traffic). A lane change moves it by one lane
  width, but only onto a lane that exists there: a lane is a route centreline parallel to the
  own route at the offset point (same direction; also the opposite direction where oncoming
  lanes are allowed, e.g. to overtake on a two-lane road). Every tick the offset is re-snapped
  to the lane it is on, so a vehicle that changed lanes stays in that lane where the own route
  bends towards it (an on-ramp tapering into the carriageway) instead of keeping a fixed
  distance from the route; where the lane ends the offset falls back to the own route.

Steering is pure pursuit (:func:`sim.dynamics.pure_pursuit_steering`) on a look-ahead point of
the offset route, with the driver model's speed-dependent look-ahead distance.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from sim.dynamics import MAX_ACCEL, MAX_BRAKE, bicycle_step, pure_pursuit_steering
from sim.roads import LANE_WIDTH, RoadLayout
from sim.routes import Route

__all__ = [
    "LaneMap",
    "MetaAction",
    "MetaControllerConfig",
    "MetaState",
    "lookahead_distance",
    "meta_control",
    "plan_meta_trajectory",
    "snapped_offset",
    "snapped_offsets",
    "update_meta_state",
]


# LaneMap's grid: cell size, and how much further than the snap tolerance a segment registers in
# the cells around it (far above the rounding of a closest point computed on it, ~1e-13 m)
_CELL_M = 4.0
_CELL_SLACK_M = 0.5


class MetaAction(enum.IntEnum):
    """highway-env's ``DiscreteMetaAction`` indices."""

    LANE_LEFT = 0
    IDLE = 1
    LANE_RIGHT = 2
    FASTER = 3
    SLOWER = 4


def lookahead_distance(speed: np.ndarray | float) -> np.ndarray | float:
    """Pure-pursuit look-ahead, metres: ``clip(0.9 v + 3, 4, 25)`` (the driver model's rule);
    a float for a float ``speed``."""
    if isinstance(speed, float):  # one vehicle: the same arithmetic without numpy's per-call cost
        return min(max(0.9 * speed + 3.0, 4.0), 25.0)
    return np.clip(0.9 * np.asarray(speed, dtype=np.float64) + 3.0, 4.0, 25.0)


@dataclass(frozen=True)
class MetaControllerConfig:
    """Low-level controller of the meta-actions."""

    speed_step: float = 2.5
    """m/s added or removed by FASTER / SLOWER"""
    speed_gain: float = 1.5
    """1/s: acceleration = speed_gain x (target speed - speed)"""
    lane_width: float = LANE_WIDTH
    """metres moved by a lane change"""
    snap_tolerance: float = 1.0
    """metres: a lane exists at a point if a parallel centreline passes this close"""

    def validate(self) -> None:
        problems = []
        if self.speed_step <= 0:
            problems.append(f"speed_step must be > 0, got {self.speed_step}")
        if self.speed_gain <= 0:
            problems.append(f"speed_gain must be > 0, got {self.speed_gain}")
        if self.lane_width <= 0:
            problems.append(f"lane_width must be > 0, got {self.lane_width}")
        if not 0 < self.snap_tolerance < self.lane_width / 2:
            problems.append(f"snap_tolerance must be in (0, lane_width / 2), got {self.snap_tolerance}")
        if problems:
            raise ValueError("invalid MetaControllerConfig: " + "; ".join(problems))


class LaneMap:
    """Every route centreline of a layout as segments, to find the lane at a point.

    Args:
        layout: the road network.
        allow_oncoming: whether a centreline running the opposite way counts as a lane.
    """

    def __init__(self, layout: RoadLayout, allow_oncoming: bool) -> None:
        starts, directions, lengths, ends = [], [], [], []
        for route in layout.routes.values():
            starts.append(route.xy[:-1])
            ends.append(route.xy[1:])
            directions.append(route.seg_dir)
            lengths.append(np.diff(route.s))
        self.starts = np.concatenate(starts)  # (P, 2) segment start points
        self.directions = np.concatenate(directions)  # (P, 2) unit direction of each segment
        self.lengths = np.concatenate(lengths)  # (P,) segment lengths
        self.allow_oncoming = bool(allow_oncoming)
        # snap() is asked a few times per vehicle and tick about one point: it finds the segments
        # near the point in a grid of cells and works on them in Python floats, numpy's arithmetic
        # operation for operation (numpy's per-call cost would dominate on a handful of segments)
        self._segments = [
            (sx, sy, dx, dy, length)
            for (sx, sy), (dx, dy), length in zip(
                self.starts.tolist(), self.directions.tolist(), self.lengths.tolist(), strict=True
            )
        ]
        ends_xy = np.concatenate(ends)
        self._lo = np.minimum(self.starts, ends_xy)  # (P, 2) bounding boxes of the segments
        self._hi = np.maximum(self.starts, ends_xy)
        self._cells: dict[float, dict[tuple[int, int], list[int]]] = {}  # per tolerance
        # the parallel segments of each direction asked about: directions come from route
        # headings, so there are as many as route segments
        self._parallel: dict[tuple[float, float], list[bool] | None] = {}

    def snap(self, point: np.ndarray, direction: np.ndarray, tolerance: float) -> np.ndarray | None:
        """Closest lane centre to ``point`` for a vehicle heading along ``direction``.

        Args:
            point: (2,) world position.
            direction: (2,) unit vector, the own route's direction there.
            tolerance: metres; lanes further than this from ``point`` do not count.

        Returns:
            (2,) the closest point on the nearest parallel centreline segment (|cos| > 0.95
            between the directions; same sense unless oncoming lanes are allowed), or None if
            there is none within ``tolerance``.
        """
        parallel = self._parallel_to(direction)
        if parallel is None:
            return None
        x, y = float(point[0]), float(point[1])
        cell = (math.floor(x / _CELL_M), math.floor(y / _CELL_M))
        near = [k for k in self._cells_for(tolerance).get(cell, ()) if parallel[k]]
        if not near:
            return None
        closest, offsets = [], []
        for k in near:  # in segment order, so that the first of equally near ones wins
            sx, sy, dx, dy, length = self._segments[k]
            t = min(max((x - sx) * dx + (y - sy) * dy, 0.0), length)
            cx, cy = sx + t * dx, sy + t * dy
            closest.append((cx, cy))
            offsets.append((x - cx, y - cy))
        dist = np.hypot(*np.array(offsets).T)
        best = int(np.argmin(dist))
        if dist[best] > tolerance:
            return None
        return np.array(closest[best])

    def _parallel_to(self, direction: np.ndarray) -> list[bool] | None:
        """Whether each segment counts as a lane for a vehicle heading along ``direction``
        (None: none does)."""
        key = (float(direction[0]), float(direction[1]))
        if key not in self._parallel:
            cos = self.directions @ direction
            ok = cos > 0.95
            if self.allow_oncoming:
                ok |= cos < -0.95
            self._parallel[key] = ok.tolist() if ok.any() else None
        return self._parallel[key]

    def _cells_for(self, tolerance: float) -> dict[tuple[int, int], list[int]]:
        """Grid cell -> the segments (in order) that may come within ``tolerance`` of a point in
        it: those whose bounding box, grown by more than the tolerance, overlaps the cell."""
        if tolerance not in self._cells:
            reach = tolerance + _CELL_SLACK_M
            first = np.floor((self._lo - reach) / _CELL_M).astype(int).tolist()
            last = np.floor((self._hi + reach) / _CELL_M).astype(int).tolist()
            cells: dict[tuple[int, int], list[int]] = {}
            for k, ((i0, j0), (i1, j1)) in enumerate(zip(first, last, strict=True)):
                for i in range(i0, i1 + 1):
                    for j in range(j0, j1 + 1):
                        cells.setdefault((i, j), []).append(k)
            self._cells[tolerance] = cells
        return self._cells[tolerance]


@dataclass
class MetaState:
    """What the low-level controller of one vehicle holds between ticks.

    Attributes:
        target_speed: m/s.
        target_offset: metres left of the own route (0: on it).
        max_speed: m/s, the top of the target speed range.
    """

    target_speed: float
    target_offset: float
    max_speed: float


def _route_frame(route: Route, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The route at arc length ``s``: its (2,) point, (2,) direction and (2,) left normal."""
    heading = float(route.heading(s))
    direction = np.array([np.cos(heading), np.sin(heading)])
    normal = np.array([-direction[1], direction[0]])
    return route.point(s), direction, normal


def _offset_point(route: Route, s: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """(2,) point ``offset`` metres left of the route at arc length ``s``, and the route's (2,) direction."""
    centre, direction, normal = _route_frame(route, s)
    return centre + offset * normal, direction


def snapped_offsets(
    lanes: LaneMap, route: Route, s: float, offsets: tuple[float, ...], tolerance: float
) -> list[float | None]:
    """:func:`snapped_offset` of several offsets at the same arc length."""
    centre, direction, normal = _route_frame(route, s)
    out: list[float | None] = []
    for offset in offsets:
        snapped = lanes.snap(centre + offset * normal, direction, tolerance)
        out.append(None if snapped is None else float((snapped - centre) @ normal))
    return out


def snapped_offset(lanes: LaneMap, route: Route, s: float, offset: float, tolerance: float) -> float | None:
    """Offset from ``route`` at arc length ``s`` of the lane nearest the point ``offset`` metres
    to its left, or None when no lane passes within ``tolerance`` of that point."""
    return snapped_offsets(lanes, route, s, (offset,), tolerance)[0]


def update_meta_state(
    state: MetaState,
    action: MetaAction | int | None,
    route: Route,
    s: float,
    speed: float,
    lanes: LaneMap,
    config: MetaControllerConfig,
) -> MetaState:
    """Apply a meta-action (None: only re-snap) and return the new targets.

    Lane changes are evaluated at the look-ahead point; a lane change towards a lane that does
    not exist is ignored (as highway-env does). Then the offset is re-snapped to the lane it
    designates at the look-ahead point, falling back to 0 (the own route) if that lane ended.
    """
    target_speed, offset = state.target_speed, state.target_offset
    s_ahead = s + float(lookahead_distance(speed))
    if action is not None:
        action = MetaAction(int(action))
        if action is MetaAction.FASTER:
            target_speed = min(target_speed + config.speed_step, state.max_speed)
        elif action is MetaAction.SLOWER:
            target_speed = max(target_speed - config.speed_step, 0.0)
        elif action in (MetaAction.LANE_LEFT, MetaAction.LANE_RIGHT):
            sign = 1.0 if action is MetaAction.LANE_LEFT else -1.0
            moved = snapped_offset(
                lanes, route, s_ahead, offset + sign * config.lane_width, config.snap_tolerance
            )
            if moved is not None and abs(moved - offset) > config.lane_width / 2:
                offset = moved
    if offset != 0.0:
        snapped = snapped_offset(lanes, route, s_ahead, offset, config.snap_tolerance)
        offset = 0.0 if snapped is None else snapped
    return MetaState(target_speed=target_speed, target_offset=offset, max_speed=state.max_speed)


def meta_control(
    state: MetaState,
    route: Route,
    s: float,
    x: float,
    y: float,
    yaw: float,
    speed: float,
    wheelbase: float,
    config: MetaControllerConfig,
) -> tuple[float, float]:
    """(acceleration m/s^2, steering rad) that track ``state`` from the vehicle's current state."""
    target, _ = _offset_point(route, s + float(lookahead_distance(speed)), state.target_offset)
    # on scalars: numpy's arithmetic, without building one-element arrays
    steer = float(pure_pursuit_steering(x, y, yaw, target[0], target[1], wheelbase))
    target_speed = min(state.target_speed, route.curve_speed(float(s + speed / config.speed_gain)))
    accel = float(np.clip(config.speed_gain * (target_speed - speed), -MAX_BRAKE, MAX_ACCEL))
    return accel, steer


def plan_meta_trajectory(
    states: list[MetaState],
    route: Route,
    s: float,
    x: float,
    y: float,
    yaw: float,
    speed: float,
    wheelbase: float,
    dt: float,
    steps: int,
    config: MetaControllerConfig,
) -> np.ndarray:
    """Predicted poses of one vehicle under each of several controller targets.

    The controller is rolled out through the kinematic bicycle, all candidates at once; the
    arc length along the route advances by the distance driven (the vehicle follows the route)
    instead of being re-projected each step, which is exact on straight lanes and a few
    centimetres off on the intersection arcs over 1-2 s.

    Args:
        states: C controller targets (e.g. the outcome of each meta-action).
        route, s: the own route and the current arc length on it.
        x, y, yaw, speed, wheelbase: current vehicle state.
        dt: seconds per step; steps: how many.

    Returns:
        (C, steps, 4) float64: x, y, yaw, speed after each step.
    """
    c = len(states)
    xs, ys = np.full(c, x, dtype=np.float64), np.full(c, y, dtype=np.float64)
    yaws, speeds = np.full(c, yaw, dtype=np.float64), np.full(c, speed, dtype=np.float64)
    s_now = np.full(c, s, dtype=np.float64)
    v_target = np.array([st.target_speed for st in states])
    offsets = np.array([st.target_offset for st in states])
    wheelbases = np.full(c, wheelbase)
    out = np.zeros((c, steps, 4))
    for k in range(steps):
        s_ahead = s_now + lookahead_distance(speeds)
        heading = route.heading(s_ahead)
        target = route.point(s_ahead) + offsets[:, None] * np.stack([-np.sin(heading), np.cos(heading)], 1)
        steer = pure_pursuit_steering(xs, ys, yaws, target[:, 0], target[:, 1], wheelbases)
        v_cap = np.minimum(v_target, route.curve_speed(s_now + speeds / config.speed_gain))
        accel = np.clip(config.speed_gain * (v_cap - speeds), -MAX_BRAKE, MAX_ACCEL)
        nx, ny, yaws, speeds = bicycle_step(xs, ys, yaws, speeds, accel, steer, wheelbases, dt)
        s_now = s_now + np.hypot(nx - xs, ny - ys)
        xs, ys = nx, ny
        out[:, k] = np.stack([xs, ys, yaws, speeds], axis=1)
    return out
