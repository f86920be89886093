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

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Route", "arc", "line", "polyline"]


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

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def point(self, s: np.ndarray | float) -> np.ndarray:
        """(..., 2) position at arc length(s) ``s``, clamped to the route."""
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        return np.stack([np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1])], -1)

    def heading(self, s: np.ndarray | float) -> np.ndarray:
        """Heading (radians) of the segment containing arc length(s) ``s``."""
        i = np.clip(np.searchsorted(self.s, np.asarray(s), side="right") - 1, 0, len(self.seg_dir) - 1)
        d = self.seg_dir[i]
        return np.arctan2(d[..., 1], d[..., 0])

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
            k0 = int(np.clip(np.searchsorted(self.s, s_range[0], side="right") - 1, 0, k1 - 1))
            k1 = int(np.clip(np.searchsorted(self.s, s_range[1], side="left"), k0 + 1, k1))
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
