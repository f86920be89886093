"""Path conflicts: where and when a known vehicle crosses the ego's path ahead.

Deciding whether to go through an intersection before a crossing vehicle or to let it pass is a
comparison of two timings: how far the ego has to drive to the point where the paths cross, and
when the other vehicle occupies that point. Both follow from the positions and velocities an
observation already holds, but only through divisions and line intersections that a small MLP has
to learn from scratch, for a vehicle that can sit in any of the K object slots (they are sorted by
distance). :func:`first_conflict` computes them once, as highway-env's time-to-collision
observation does for lanes, so that the env can hand them to the policy as a few ego features
(``EnvConfig.conflict_features``), together with the comparison itself, as two predicted
post-encroachment times (PET, the surrogate safety measure of traffic engineering) for an ego
that drives at full speed from now, slowing only for the curves of its route
(:func:`sim.scenarios.fastest_arrivals_on_route_s`, the model the scenarios time their hidden
vehicles with):

- *go first*: the other vehicle's arrival minus the moment the ego's rear leaves the crossing;
  positive when going now clears it before the other vehicle comes;
- *go after*: the ego's arrival minus the moment the other vehicle's rear leaves; positive when
  the other vehicle is gone before the ego comes, even at full speed. Where a second vehicle
  follows the first across the ego's path (oncoming traffic behind an occluder), going after the
  first also means going before the second: the margin is the smaller of the two, so that it
  reads positive only for a gap the ego fits through.

When both are negative, going at full speed now meets the other vehicle: the ego has to slow down
until *go after* turns positive.

The other vehicle is predicted to drive straight on at its current speed (the ego's view of a car
running a red light or going straight through an intersection); the ego's path is its route at
its target lateral offset. Only vehicles that move and cross the path at an angle count: a vehicle
ahead in the ego's lane, or one coming the other way in the next lane, is a following or passing
problem, described by the object features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sim.routes import Route
from sim.scenarios import fastest_arrival_s, fastest_arrivals_on_route_s

__all__ = ["CONFLICT_FEATURES", "MARGIN_NORM_S", "Conflict", "conflict_features", "first_conflict"]

CONFLICT_FEATURES = (
    "conflict",
    "conflict_distance",
    "conflict_arrival",
    "conflict_clear",
    "conflict_go_first_margin",
    "conflict_go_after_margin",
)
"""ego features describing :func:`first_conflict` (see :func:`conflict_features`)"""

_DISTANCE_NORM_M = 50.0
_TIME_NORM_S = 5.0
_TIME_CLIP = 2.0  # times beyond 10 s read as "no conflict"
MARGIN_NORM_S = 0.5
"""seconds per unit of the margin features: the go / wait decisions turn on tenths of a second
(a late red-light runner leaves a go-first margin of -0.05 to +0.13 s, an early one -0.5 to -0.7 s),
so one unit is half a second and a small MLP sees those apart without large weights"""
_MARGIN_CLIP = 2.0  # margins beyond 1 s are as good as any larger one


@dataclass(frozen=True)
class Conflict:
    """The earliest crossing of the ego's path by a known vehicle.

    Attributes:
        index: row of the vehicle in the ``boxes`` passed to :func:`first_conflict`.
        distance_m: arc length from the ego's front to where the ego's path enters the other
            vehicle's swept band (negative: the ego's body is already in it).
        exit_m: arc length from the ego's front to where the path leaves the band.
        arrival_s: seconds until the other vehicle's front reaches the ego's path (negative: it
            is on it now).
        clear_s: seconds until its rear has left the ego's path (> 0).
        following: the crossing that comes next after this one (the next-earliest arrival), if
            any: what an ego that lets this vehicle pass meets.
    """

    index: int
    distance_m: float
    exit_m: float
    arrival_s: float
    clear_s: float
    following: Conflict | None = None


def first_conflict(
    path_xy: np.ndarray,
    path_s: np.ndarray,
    ego_width: float,
    boxes: np.ndarray,
    velocities: np.ndarray,
    min_speed: float = 0.5,
    margin_m: float = 0.5,
    max_parallel_cos: float = 0.9,
) -> Conflict | None:
    """The known vehicle that reaches the ego's path first, among those crossing it.

    Args:
        path_xy: (P, 2) world points along the ego's path, in driving order.
        path_s: (P,) their arc length from the ego's front (increasing; may start negative to
            cover the ego's own body).
        ego_width: metres.
        boxes: (M, 7) known vehicles (x, y, z, length, width, height, yaw), world frame.
        velocities: (M, 2) their world-frame velocities.
        min_speed: vehicles slower than this (m/s) are treated as not crossing.
        margin_m: added to the half-widths when deciding whether a path point is on the other
            vehicle's course and to the time it needs to clear it.
        max_parallel_cos: vehicles whose course makes an angle with the path of less than
            ``arccos(max_parallel_cos)`` where they cross are left out (same or opposite lane).

    Returns:
        The conflict with the smallest ``arrival_s`` among vehicles not yet past the path, with the
        next-earliest one as its ``following``, or None.
    """
    path_xy = np.asarray(path_xy, dtype=np.float64).reshape(-1, 2)
    path_s = np.asarray(path_s, dtype=np.float64).reshape(-1)
    if len(path_xy) < 2 or len(boxes) == 0:
        return None
    path_dir = np.gradient(path_xy, axis=0)  # (P, 2)
    path_dir /= np.maximum(np.linalg.norm(path_dir, axis=1, keepdims=True), 1e-9)
    found: list[Conflict] = []
    for i in range(len(boxes)):
        speed = float(np.hypot(*velocities[i]))
        if speed < min_speed:
            continue
        course = velocities[i] / speed  # (2,) driving direction
        rel = path_xy - boxes[i, :2]  # (P, 2)
        along = rel @ course  # (P,) ahead of the vehicle's centre along its course
        lateral = np.abs(course[0] * rel[:, 1] - course[1] * rel[:, 0])  # (P,)
        half_band = 0.5 * (ego_width + boxes[i, 4]) + margin_m
        inside = np.flatnonzero(lateral <= half_band)
        if len(inside) == 0:
            continue
        # the first contiguous run of path points inside the band: the first crossing
        breaks = np.flatnonzero(np.diff(inside) > 1)
        run = inside[: breaks[0] + 1] if len(breaks) else inside
        centre = int(run[np.argmin(lateral[run])])
        if abs(float(path_dir[centre] @ course)) > max_parallel_cos:
            continue
        reach = 0.5 * boxes[i, 3] + 0.5 * ego_width + margin_m  # centre-to-path distance that counts
        # An oblique crossing (a left turn across the oncoming lane) spreads the ego's path inside
        # the band along the other vehicle's course: it reaches the first of those points first
        # and leaves the last one last, so both times bound the whole run, not its centre point.
        arrival = (float(along[run].min()) - reach) / speed
        clear = (float(along[run].max()) + reach) / speed
        if clear <= 0.0:
            continue  # already past
        found.append(
            Conflict(
                index=i,
                distance_m=float(path_s[run[0]]),
                exit_m=float(path_s[run[-1]]),
                arrival_s=arrival,
                clear_s=clear,
            )
        )
    if not found:
        return None
    found.sort(key=lambda c: c.arrival_s)
    return replace(found[0], following=found[1] if len(found) > 1 else None)


def conflict_features(
    conflict: Conflict | None,
    ego_speed: float,
    max_speed: float,
    ego_length: float,
    route: Route | None = None,
    s: float = 0.0,
) -> np.ndarray:
    """(6,) ``CONFLICT_FEATURES``: a presence flag, the ego's distance to the conflict / 50 m
    (clipped to [-1, 1]), the other vehicle's arrival and clearing times / 5 s (clipped to
    [-2, 2] and [0, 2]), and the go-first and go-after margins (module docstring; go-after also
    against ``conflict.following``) / ``MARGIN_NORM_S``, clipped to [-2, 2], for an ego at
    ``ego_speed`` now pressing on up to ``max_speed`` whose rear is ``ego_length`` behind its
    front; given its ``route`` and (centre) arc length ``s`` on it, also slowing for the curves on
    the way (:func:`sim.scenarios.fastest_arrivals_on_route_s`). Without a conflict
    ``[0, 1, 2, 2, 2, 2]`` (far away, late, nothing in the way)."""
    if conflict is None:
        return np.array([0.0, 1.0, _TIME_CLIP, _TIME_CLIP, _MARGIN_CLIP, _MARGIN_CLIP])
    nxt = conflict.following
    distances = [max(conflict.distance_m, 0.0), max(conflict.exit_m + ego_length, 0.0)]
    if nxt is not None:
        distances.append(max(nxt.exit_m + ego_length, 0.0))
    if route is None:
        times = [fastest_arrival_s(d, ego_speed, max_speed) for d in distances]
    else:
        times = fastest_arrivals_on_route_s(route, s, distances, ego_speed, max_speed)
    ego_arrival, ego_clear = times[0], times[1]
    go_after = ego_arrival - conflict.clear_s
    if nxt is not None:  # going after the first vehicle means going before the next one
        go_after = min(go_after, nxt.arrival_s - times[2])
    return np.array(
        [
            1.0,
            np.clip(conflict.distance_m / _DISTANCE_NORM_M, -1.0, 1.0),
            np.clip(conflict.arrival_s / _TIME_NORM_S, -_TIME_CLIP, _TIME_CLIP),
            np.clip(conflict.clear_s / _TIME_NORM_S, 0.0, _TIME_CLIP),
            np.clip((conflict.arrival_s - ego_clear) / MARGIN_NORM_S, -_MARGIN_CLIP, _MARGIN_CLIP),
            np.clip(go_after / MARGIN_NORM_S, -_MARGIN_CLIP, _MARGIN_CLIP),
        ]
    )
