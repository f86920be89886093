"""Routes: the polylines vehicles drive along, with arc-length queries.

A route is a 2D centreline (lanes, turn arcs and lane connections concatenated) given as a
polyline: curves sampled densely enough (<= 0.5 m) that linear interpolation between samples is
the geometry; vertices inside straight runs are dropped. Vehicles track a route
with pure pursuit and measure gaps along it.

Hand-written rather than taken from a library: what is needed is three vectorised numpy queries
(point at s, heading at s, projection of many points) on short polylines, and a geometry package
(shapely, lanelet2) would add a dependency and per-call overhead on the simulator's hot path.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CURVE_APPROACH_DECEL", "CURVE_LATERAL_ACCEL", "Route", "arc", "line", "polyline"]

CURVE_LATERAL_ACCEL = 4.0
"""m/s^2: the lateral acceleration drivers accept in a curve; a 10.75 m-radius left turn is
taken at up to sqrt(4.0 x 10.75) = 6.6 m/s (24 km/h), a 5.25 m-radius right turn at 4.6 m/s"""
CURVE_APPROACH_DECEL = 2.0
"""m/s^2: the deceleration with which drivers slow down ahead of a curve (IDM's comfortable braking)"""
_NO_CURVE_SPEED = 60.0  # m/s: the curve speed of straight stretches, above any speed limit

# Queries this small run as Python loops over floats, which beat the array versions' fixed cost
# of a handful of numpy calls each: point() / heading() of up to this many arc lengths, project()
# of up to this many (point, segment) pairs
_SCALAR_QUERIES = 8
_SCALAR_PAIRS = 16


@dataclass(frozen=True)
class Route:
    """A drivable centreline.

    Attributes:
        name: unique within a road layout, e.g. ``"S_left"``.
        xy: (K, 2) float64 vertices, world frame, K >= 2, no repeated vertices.
        speed_limit: m/s.
        stop_lines: ``(s, signal_id)`` pairs: arc lengths where a vehicle must stop while signal
            ``signal_id`` is not green.
    """

    name: str
    xy: np.ndarray
    speed_limit: float = 13.9
    stop_lines: tuple[tuple[float, int], ...] = ()
    merge: tuple[str, float, float] | None = None
    """``(target_route, s_start, s_end)``: between these arc lengths this route runs beside
    ``target_route`` and joins it at ``s_end``; drivers wait there for a gap (on-ramps)."""
    s: np.ndarray = field(init=False, repr=False)
    """(K,) cumulative arc length at each vertex"""
    seg_dir: np.ndarray = field(init=False, repr=False)
    """(K-1, 2) unit direction of each segment"""
    seg_heading: np.ndarray = field(init=False, repr=False)
    """(K-1,) heading of each segment, radians"""
    curve_speed_sq: np.ndarray = field(init=False, repr=False)
    """(K,) square of the curve speed at each vertex (:meth:`curve_speed`), m^2/s^2"""
    # The same vertices as Python floats: the env and the driver model ask about one or a few arc
    # lengths or points at a time, many times a tick, where numpy's per-call cost dominates; the
    # scalar paths below do numpy's arithmetic (np.interp's, the projection's) operation for
    # operation, so both paths give the same bits.
    _s: list[float] = field(init=False, repr=False, compare=False)
    _heading: list[float] = field(init=False, repr=False, compare=False)
    _curve_sq: list[float] = field(init=False, repr=False, compare=False)
    _xy: list[tuple[float, float]] = field(init=False, repr=False, compare=False)
    _seg: list[tuple[float, float, float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 2:
            raise ValueError(f"route {self.name!r}: xy must be (K>=2, 2), got {xy.shape}")
        seg = np.diff(xy, axis=0)
        seg_len = np.linalg.norm(seg, axis=1)
        if np.any(seg_len < 1e-9):
            raise ValueError(f"route {self.name!r} has repeated vertices")
        # drop vertices inside straight runs: queries cost O(vertices), and straight lanes need two
        d = seg / seg_len[:, None]
        straight = np.abs(d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0]) < 1e-9
        straight &= np.einsum("kd,kd->k", d[:-1], d[1:]) > 0.0
        xy = xy[np.concatenate([[True], ~straight, [True]])]
        seg = np.diff(xy, axis=0)
        seg_len = np.linalg.norm(seg, axis=1)
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "s", np.concatenate([[0.0], np.cumsum(seg_len)]))
        object.__setattr__(self, "seg_dir", seg / seg_len[:, None])
        object.__setattr__(self, "seg_heading", np.arctan2(self.seg_dir[:, 1], self.seg_dir[:, 0]))
        object.__setattr__(self, "curve_speed_sq", _curve_speed_profile_sq(self.s, self.seg_heading))
        object.__setattr__(self, "_curve_sq", self.curve_speed_sq.tolist())
        object.__setattr__(self, "_s", self.s.tolist())
        object.__setattr__(self, "_heading", self.seg_heading.tolist())
        object.__setattr__(self, "_xy", [tuple(p) for p in xy.tolist()])
        lengths = self.s[1:] - self.s[:-1]  # as project() measures them
        object.__setattr__(
            self,
            "_seg",
            [(dx, dy, n) for (dx, dy), n in zip(self.seg_dir.tolist(), lengths.tolist(), strict=True)],
        )

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def point(self, s: np.ndarray | float) -> np.ndarray:
        """(..., 2) position at arc length(s) ``s``, clamped to the route."""
        if isinstance(s, float) and s == s:  # a Python or numpy float, not NaN
            return np.array(self._point_at(min(max(s, 0.0), self._s[-1])))
        s = np.asarray(s, dtype=np.float64)
        if s.size <= _SCALAR_QUERIES:
            values = s.ravel().tolist()
            if all(v == v for v in values):  # no NaN
                length = self._s[-1]
                points = [self._point_at(min(max(v, 0.0), length)) for v in values]
                return np.array(points, dtype=np.float64).reshape(*s.shape, 2)
        s = np.clip(s, 0.0, self.length)
        return np.stack([np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1])], -1)

    def heading(self, s: np.ndarray | float) -> np.ndarray:
        """Heading (radians) of the segment containing arc length(s) ``s``."""
        last = len(self.seg_heading) - 1
        if isinstance(s, float):
            return self.seg_heading[min(max(bisect.bisect_right(self._s, s) - 1, 0), last)]
        s = np.asarray(s)
        if 0 < s.ndim and s.size <= _SCALAR_QUERIES:
            headings = [
                self._heading[min(max(bisect.bisect_right(self._s, v) - 1, 0), last)]
                for v in s.ravel().tolist()
            ]
            return np.array(headings, dtype=np.float64).reshape(s.shape)
        return self.seg_heading[np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, last)]

    def curve_speed(self, s: np.ndarray | float) -> np.ndarray | float:
        """The highest speed (m/s) at arc length(s) ``s`` that keeps the lateral acceleration in
        the curves ahead within ``CURVE_LATERAL_ACCEL`` when braking for them at
        ``CURVE_APPROACH_DECEL``; ``_NO_CURVE_SPEED`` (60 m/s) where no curve is near. A float
        for a float ``s``.

        Linear in the square of the speed between vertices, which is exact for the constant
        deceleration of the approach to a curve.
        """
        if isinstance(s, float):
            s = min(max(s, 0.0), self._s[-1])
            j = bisect.bisect_right(self._s, s) - 1
            if j == len(self._s) - 1:
                return self._curve_sq[j] ** 0.5
            v0, v1 = self._curve_sq[j], self._curve_sq[j + 1]
            return (v0 + (v1 - v0) * (s - self._s[j]) / (self._s[j + 1] - self._s[j])) ** 0.5
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        return np.sqrt(np.interp(s, self.s, self.curve_speed_sq))

    def min_curve_speed(self, s_from: float, s_to: float) -> float:
        """The lowest :meth:`curve_speed` (m/s) between two arc lengths."""
        lo = min(max(bisect.bisect_right(self._s, s_from), 0), len(self._s) - 1)
        hi = min(max(bisect.bisect_left(self._s, s_to), lo), len(self._s) - 1)
        ends = (self.curve_speed(float(s_from)), self.curve_speed(float(s_to)))
        inner = min(self._curve_sq[lo:hi], default=np.inf) ** 0.5
        return float(min(*ends, inner))

    def _point_at(self, s: float) -> tuple[float, float]:
        """x, y at arc length ``s`` in [0, length]: np.interp's arithmetic on one value."""
        j = bisect.bisect_right(self._s, s) - 1
        if j == len(self._s) - 1 or self._s[j] == s:
            return self._xy[j]
        (x0, y0), (x1, y1) = self._xy[j], self._xy[j + 1]
        ds, offset = self._s[j + 1] - self._s[j], s - self._s[j]
        return (x1 - x0) / ds * offset + x0, (y1 - y0) / ds * offset + y0

    def project(
        self, xy: np.ndarray, s_range: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Project points onto the route (or onto the part of it within ``s_range``).

        Args:
            xy: (N, 2) world points.
            s_range: optional (s_min, s_max) window; restricting the search makes the projection
                unambiguous near a route that comes back close to itself, and cheaper.

        Returns:
            s: (N,) arc length of the closest point on the route.
            lateral: (N,) signed distance, positive to the left of the direction of travel.
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        k0, k1 = 0, len(self.seg_dir)
        if s_range is not None:
            k0 = min(max(bisect.bisect_right(self._s, s_range[0]) - 1, 0), k1 - 1)
            k1 = min(max(bisect.bisect_left(self._s, s_range[1]), k0 + 1), k1)
        if len(xy) * (k1 - k0) <= _SCALAR_PAIRS:
            projected = [self._project_one(x, y, k0, k1) for x, y in xy.tolist()]
            return (
                np.array([s for s, _ in projected], dtype=np.float64),
                np.array([lateral for _, lateral in projected], dtype=np.float64),
            )
        a = self.xy[k0:k1]  # (K, 2) segment starts
        seg_dir = self.seg_dir[k0:k1]
        seg_len = self.s[k0 + 1 : k1 + 1] - self.s[k0:k1]
        rel = xy[:, None, :] - a[None]  # (N, K, 2)
        t = np.clip(np.einsum("nkd,kd->nk", rel, seg_dir), 0.0, seg_len[None])  # (N, K)
        off = rel - t[..., None] * seg_dir[None]
        dist2 = np.einsum("nkd,nkd->nk", off, off)
        k = np.argmin(dist2, axis=1)
        n = np.arange(len(xy))
        s = self.s[k0 + k] + t[n, k]
        d = seg_dir[k]
        r = rel[n, k]
        lateral = d[:, 0] * r[:, 1] - d[:, 1] * r[:, 0]
        return s, lateral

    def _project_one(self, x: float, y: float, k0: int, k1: int) -> tuple[float, float]:
        """project() of one point onto segments k0 .. k1 - 1 (arc length, lateral offset), the
        same arithmetic in Python floats."""
        best = (np.inf, -1, 0.0, 0.0, 0.0)  # squared distance, segment, t, offset from its start
        for k in range(k0, k1):
            ax, ay = self._xy[k]
            dx, dy, length = self._seg[k]
            rx, ry = x - ax, y - ay
            t = min(max(rx * dx + ry * dy, 0.0), length)
            ox, oy = rx - t * dx, ry - t * dy
            dist2 = ox * ox + oy * oy
            if dist2 < best[0] or best[1] < 0:  # the first of equals, as argmin
                best = (dist2, k, t, rx, ry)
        _, k, t, rx, ry = best
        dx, dy, _ = self._seg[k]
        return self._s[k] + t, dx * ry - dy * rx


def _curve_speed_profile_sq(s: np.ndarray, seg_heading: np.ndarray) -> np.ndarray:
    """(K,) squared curve speed at each of K vertices with arc lengths ``s`` (K,), from the
    (K-1,) segment headings.

    A vertex's curvature is the turn of the heading across it over the mean length of its two
    segments (exact on the densely sampled arcs; a kink between long straight segments, such as
    a lane taper, reads as a wide curve); the speed there is sqrt(``CURVE_LATERAL_ACCEL`` /
    curvature). A backward pass then lets each vertex be at most as fast as a driver braking at
    ``CURVE_APPROACH_DECEL`` can be to meet the next one's speed.
    """
    v_sq = np.full(len(s), _NO_CURVE_SPEED**2)
    if len(seg_heading) > 1:
        turn = np.abs(np.angle(np.exp(1j * np.diff(seg_heading))))  # (K-2,) wrapped heading change
        seg_len = np.diff(s)
        curvature = turn / (0.5 * (seg_len[:-1] + seg_len[1:]))
        with np.errstate(divide="ignore"):
            v_sq[1:-1] = np.minimum(v_sq[1:-1], CURVE_LATERAL_ACCEL / curvature)
        for k in range(len(s) - 2, -1, -1):
            v_sq[k] = min(v_sq[k], v_sq[k + 1] + 2.0 * CURVE_APPROACH_DECEL * (s[k + 1] - s[k]))
    return v_sq


def line(start: tuple[float, float], end: tuple[float, float], step: float = 1.0) -> np.ndarray:
    """(K, 2) samples of a straight segment, both ends included, spacing <= ``step``."""
    start_xy, end_xy = np.asarray(start, float), np.asarray(end, float)
    n = max(int(np.ceil(np.linalg.norm(end_xy - start_xy) / step)), 1)
    t = np.linspace(0.0, 1.0, n + 1)[:, None]
    return start_xy + t * (end_xy - start_xy)


def arc(
    center: tuple[float, float], radius: float, start_angle: float, end_angle: float, step: float = 0.5
) -> np.ndarray:
    """(K, 2) samples of a circular arc from ``start_angle`` to ``end_angle`` (radians, either sense)."""
    n = max(int(np.ceil(abs(end_angle - start_angle) * radius / step)), 2)
    a = np.linspace(start_angle, end_angle, n + 1)
    return np.stack([center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)], axis=1)


def polyline(*pieces: np.ndarray) -> np.ndarray:
    """Concatenate pieces, dropping vertices that repeat the previous one (joints)."""
    xy = np.concatenate(pieces, axis=0)
    keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-6])
    return xy[keep]
