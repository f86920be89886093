"""Which vehicles each connected vehicle sees, from a coarse LiDAR, fast enough to train on.

The ``visible`` observations of :mod:`sim.env` need, every decision, the vehicles that put at
least ``min_points`` LiDAR returns on their box for each connected vehicle. Casting the World's
full sensor (131k rays per vehicle for ``hdl64``) is what makes a tick slow, so this casts a
coarse pattern (8 x 360 rays by default, noise- and drop-off-free) instead.

:func:`sim.lidar.cast_lidar` builds one Open3D scene per sensor, in that sensor's frame, and
returns points; here the static scenery is one scene built once per episode, the vehicle boxes
a small scene rebuilt every tick, and the rays of every sensor go through one ``cast_rays`` call
on each, returning only which box each ray hit first. Rebuilding the static scene's BVH was most
of the cost of a coarse sweep; bench/env_bench.py prints the share of time this takes. Most rays
pass between the vehicles: only those whose azimuth and elevation can reach a box in range are cast
at the boxes, and only those that hit one at the static scenery (to see whether it is nearer). The ray
pattern comes from :func:`sim.lidar.ray_directions` and box meshes from :func:`sim.lidar.box_triangles`, so
the geometry is the World's.

A ray starts where it leaves its own vehicle's box (the sensor sits above the roof, and the
downward rays would otherwise hit it), the job ``exclude_id`` does in ``cast_lidar``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from sim.geometry import wrap_angle
from sim.lidar import StaticGeometry, box_triangles, ray_directions
from sim.types import LidarConfig

__all__ = ["VisibilityCaster", "VisibilityConfig"]

# Angle slack when culling rays by the bearings and elevations a box spans: float32 rays and
# Embree's watertight hit test are off by far less (micro-radians); the default pattern's columns
# are 17 milli-radians apart, its channels 42
_ANGLE_MARGIN_RAD = 1e-2


@dataclass(frozen=True)
class VisibilityConfig:
    """The coarse LiDAR used to decide visibility."""

    channels: int = 8
    columns: int = 360
    upper_fov: float = 2.0
    """degrees"""
    lower_fov: float = -15.0
    """degrees"""
    range: float = 80.0
    """metres"""
    mount_z: float = 0.3
    """metres above the roof, as the World's LiDAR"""
    min_points: int = 1
    """a vehicle is visible with at least this many returns on its box"""

    def lidar_config(self) -> LidarConfig:
        """The equivalent :class:`sim.types.LidarConfig` (drop-off and noise off)."""
        return LidarConfig(
            channels=self.channels,
            range=self.range,
            points_per_second=self.channels * self.columns * 10,
            rotation_frequency=10.0,
            upper_fov=self.upper_fov,
            lower_fov=self.lower_fov,
            dropoff_general_rate=0.0,
            dropoff_intensity_limit=0.0,
            dropoff_zero_intensity=0.0,
            mount_z=self.mount_z,
        )

    def validate(self) -> None:
        if self.min_points < 1:
            raise ValueError(f"min_points must be >= 1, got {self.min_points}")
        self.lidar_config().validate()


def _exit_distance(origin: np.ndarray, directions: np.ndarray, half: np.ndarray, height: float) -> np.ndarray:
    """(R,) distance along each ray from ``origin`` (agent frame) to where it leaves the agent's box.

    Slab method on the axis-aligned box ``[-half_x, half_x] x [-half_y, half_y] x [0, height]``;
    0 for rays that do not cross the box ahead of the origin.
    """
    lo = np.array([-half[0], -half[1], 0.0])
    hi = np.array([half[0], half[1], height])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo[None, :] - origin[None, :]) / directions
        t2 = (hi[None, :] - origin[None, :]) / directions
    t_near = np.nanmax(np.minimum(t1, t2), axis=1)
    t_far = np.nanmin(np.maximum(t1, t2), axis=1)
    crosses = (t_far >= np.maximum(t_near, 0.0)) & np.isfinite(t_far)
    return np.where(crosses, np.maximum(t_far, 0.0) + 1e-3, 0.0)


class VisibilityCaster:
    """Counts coarse-LiDAR returns on every box, for several sensors at once.

    Args:
        static: the World's static geometry (ground, buildings, walls), world frame.
        config: the coarse pattern.
    """

    def __init__(self, static: StaticGeometry, config: VisibilityConfig | None = None) -> None:
        self.config = config or VisibilityConfig()
        self.config.validate()
        self._directions = np.asarray(ray_directions(self.config.lidar_config()), dtype=np.float64)  # (R, 3)
        # The static scene is built once (Open3D builds its BVH on the first cast and keeps it);
        # the boxes move every tick and get a small scene of their own, cast separately: a box
        # return counts when it is nearer than the static one on the same ray.
        self._static_scene: o3d.t.geometry.RaycastingScene | None = None
        if static.num_triangles:
            self._static_scene = o3d.t.geometry.RaycastingScene(nthreads=0)
            self._static_scene.add_triangles(
                o3d.core.Tensor.from_numpy(static.vertices.astype(np.float32)),
                o3d.core.Tensor.from_numpy(static.triangles.astype(np.uint32)),
            )
        self._exit_cache: dict[tuple[float, float, float], np.ndarray] = {}
        # rays are laid out channel by channel (sim.lidar.ray_directions): ray c * W + j is laser c
        # at column j. The columns' azimuths (channel 0's) and the channels' elevations (column
        # 0's) in the sensor frame; the other rays differ from them by float32 rounding only.
        pattern = self._directions.reshape(self.config.channels, -1, 3)  # (C, W, 3)
        self._column_azimuth = np.arctan2(pattern[0, :, 1], pattern[0, :, 0])  # (W,) increasing
        self._channel_elevation = np.arctan2(pattern[:, 0, 2], np.hypot(pattern[:, 0, 0], pattern[:, 0, 1]))
        if not (np.all(np.diff(self._column_azimuth) > 0) and np.all(np.diff(self._channel_elevation) > 0)):
            raise ValueError("the coarse LiDAR's rays must sweep azimuths and elevations in increasing order")

    @property
    def rays_per_sensor(self) -> int:
        return len(self._directions)

    def _exits(self, extent: np.ndarray) -> np.ndarray:
        key = (round(float(extent[0]), 3), round(float(extent[1]), 3), round(float(extent[2]), 3))
        if key not in self._exit_cache:
            origin = np.array([0.0, 0.0, extent[2] + self.config.mount_z])
            self._exit_cache[key] = _exit_distance(
                origin, self._directions, extent[:2] / 2.0, float(extent[2])
            )
        return self._exit_cache[key]

    def points_on_boxes(self, boxes: np.ndarray, observers: np.ndarray) -> np.ndarray:
        """Coarse-LiDAR returns of each observer on each box.

        Args:
            boxes: (M, 7) world boxes of every vehicle (bottom centre, mmdet3d convention).
            observers: (S,) indices into ``boxes`` of the vehicles carrying a sensor.

        Returns:
            (S, M) int32: returns of observer s's coarse LiDAR on box m (0 on its own box).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
        observers = np.asarray(observers, dtype=np.int64).reshape(-1)
        m, n_obs = len(boxes), len(observers)
        if m == 0 or n_obs == 0:
            return np.zeros((n_obs, m), dtype=np.int32)
        own = boxes[observers]  # (S, 7)
        origin = np.stack(
            [own[:, 0], own[:, 1], own[:, 2] + own[:, 5] + self.config.mount_z], axis=1
        )  # (S, 3)
        vertices, triangles = box_triangles(boxes)
        # Only the rays that can reach a box are cast: most of a sweep passes between the vehicles
        corners = vertices.reshape(m, 8, 3)[:, :4, :2].astype(np.float64)  # (M, 4, 2) footprints
        sensor, ray = np.nonzero(self._candidate_rays(boxes, corners, observers, origin))  # (K,) each
        if len(ray) == 0:
            return np.zeros((n_obs, m), dtype=np.int32)
        c, s = np.cos(own[:, 6])[sensor], np.sin(own[:, 6])[sensor]  # (K,)
        d = self._directions[ray]  # (K, 3)
        dirs_world = np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
        exits = np.stack([self._exits(box[3:6]) for box in own])[sensor, ray]  # (K,)
        rays = np.empty((len(ray), 6), dtype=np.float32)
        rays[:, :3] = origin[sensor] + exits[:, None] * dirs_world
        rays[:, 3:] = dirs_world
        boxes_scene = o3d.t.geometry.RaycastingScene(nthreads=0)
        boxes_scene.add_triangles(
            o3d.core.Tensor.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)),
            o3d.core.Tensor.from_numpy(triangles.astype(np.uint32)),
        )
        answer = boxes_scene.cast_rays(o3d.core.Tensor.from_numpy(rays), nthreads=0)
        t_box = answer["t_hit"].numpy()
        # the ray started past its own box: add back that distance to compare with the range
        hit = t_box + exits <= self.config.range
        # a box return counts when the static scenery is not nearer on the same ray: only the
        # rays that hit a box in range need that second cast
        if self._static_scene is not None and hit.any():
            ahead = np.flatnonzero(hit)
            static = self._static_scene.cast_rays(
                o3d.core.Tensor.from_numpy(np.ascontiguousarray(rays[ahead])), nthreads=0
            )
            hit[ahead] = t_box[ahead] < static["t_hit"].numpy()
        box_of_ray = answer["primitive_ids"].numpy()[hit].astype(np.int64) // 12  # 12 triangles a box
        flat = sensor[hit] * m + box_of_ray
        counts = np.bincount(flat, minlength=n_obs * m).reshape(n_obs, m).astype(np.int32)
        counts[np.arange(n_obs), observers] = 0
        return counts

    def _candidate_rays(
        self, boxes: np.ndarray, corners: np.ndarray, observers: np.ndarray, origin: np.ndarray
    ) -> np.ndarray:
        """(S, R) bool: the rays of observer s that can hit another box within range.

        Boxes are upright prisms, so a ray (never vertical) can only hit one whose footprint its
        azimuth points at, and at a height within the box's where it gets there. Seen from
        outside, a footprint spans the bearings of its corners; its points lie at horizontal
        distances of its centre's plus or minus its half diagonal, which bound the elevations
        that reach the box's bottom to top. A ray is a candidate when its azimuth and elevation
        lie within those spans (widened by :data:`_ANGLE_MARGIN_RAD`) for some box whose
        footprint comes within range; beside a box (where bearings say nothing) every azimuth is
        one. The rest cannot hit a box (their own box they left already), so leaving them out
        changes no count.

        Args:
            boxes: (M, 7) world boxes; corners: (M, 4, 2) their footprints' corners.
            observers: (S,) indices of the sensors' vehicles; origin: (S, 3) the sensors' positions.
        """
        n_obs = len(observers)
        azimuth, elevation = self._column_azimuth, self._channel_elevation
        mask = np.zeros((n_obs, len(elevation), len(azimuth)), dtype=bool)  # ray c * W + j is [c, j]
        rel = boxes[None, :, :2] - origin[:, None, :2]  # (S, M, 2) sensor to box centre
        dist = np.hypot(rel[..., 0], rel[..., 1])  # (S, M)
        reach = 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])  # (M,) centre to corner
        relevant = dist - reach <= self.config.range + 1.0
        relevant[np.arange(n_obs), observers] = False
        s, k = np.nonzero(relevant)  # (P,) observer, box pairs
        if len(s) == 0:
            return mask.reshape(n_obs, -1)
        # azimuths: the bearings of the footprint's corners, in the sensor's frame
        centre = np.arctan2(rel[s, k, 1], rel[s, k, 0])  # (P,) world bearings
        to_corners = corners[k] - origin[s, None, :2]  # (P, 4, 2)
        spread = np.abs(wrap_angle(np.arctan2(to_corners[..., 1], to_corners[..., 0]) - centre[:, None]))
        half = spread.max(axis=1) + _ANGLE_MARGIN_RAD  # (P,)
        first = wrap_angle(centre - boxes[observers[s], 6] - half)  # (P,) in [-pi, pi)
        last = first + 2.0 * half
        # elevations: a ray rises d tan(e) over a horizontal distance d; the box spans heights
        # low .. high relative to the sensor at distances near .. far
        near = np.maximum(dist[s, k] - reach[k], 1e-6)
        far = dist[s, k] + reach[k]
        low = boxes[k, 2] - origin[s, 2]
        high = low + boxes[k, 5]
        lowest = np.arctan(np.minimum(low / near, low / far)) - _ANGLE_MARGIN_RAD
        highest = np.arctan(np.maximum(high / near, high / far)) + _ANGLE_MARGIN_RAD
        spans = zip(
            s.tolist(),
            (dist[s, k] <= reach[k] + 0.5).tolist(),  # beside: the corners' bearings would wrap
            np.searchsorted(elevation, lowest, side="left").tolist(),
            np.searchsorted(elevation, highest, side="right").tolist(),
            np.searchsorted(azimuth, first, side="left").tolist(),
            np.searchsorted(azimuth, last, side="right").tolist(),
            np.searchsorted(azimuth, last - 2.0 * np.pi, side="right").tolist(),  # wrapped past +pi
            strict=True,
        )
        for observer, beside, c0, c1, j0, j1, j_wrapped in spans:
            if beside:
                mask[observer, c0:c1] = True
            else:
                mask[observer, c0:c1, j0:j1] = True
                mask[observer, c0:c1, :j_wrapped] = True
        return mask.reshape(n_obs, -1)

    def visible(self, boxes: np.ndarray, observers: np.ndarray) -> np.ndarray:
        """(S, M) bool: observer s sees box m (at least ``min_points`` returns)."""
        return self.points_on_boxes(boxes, observers) >= self.config.min_points
