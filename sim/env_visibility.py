"""Which vehicles each connected vehicle sees, from a coarse LiDAR, fast enough to train on.

The ``visible`` observations of :mod:`sim.env` need, every decision, the vehicles that put at
least ``min_points`` LiDAR returns on their box for each connected vehicle. Casting the World's
full sensor (131k rays per vehicle for ``hdl64``) is what makes a tick slow, so this casts a
coarse pattern (8 x 360 rays by default, noise- and drop-off-free) instead.

:func:`sim.lidar.cast_lidar` builds one Open3D scene per sensor, in that sensor's frame, and
returns points; here the static scenery is one scene built once per episode, the vehicle boxes
a small scene rebuilt every tick, and the rays of every sensor go through one ``cast_rays`` call
on each, returning only which box each ray hit first. Rebuilding the static scene's BVH was most
of the cost of a coarse sweep; bench/env_bench.py prints the share of time this takes. The ray
pattern comes from :func:`sim.lidar.ray_directions` and box meshes from :func:`sim.lidar.box_triangles`, so
the geometry is the World's.

A ray starts where it leaves its own vehicle's box (the sensor sits above the roof, and the
downward rays would otherwise hit it), the job ``exclude_id`` does in ``cast_lidar``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from sim.lidar import StaticGeometry, box_triangles, ray_directions
from sim.types import LidarConfig

__all__ = ["VisibilityCaster", "VisibilityConfig"]


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
        r = len(self._directions)
        own = boxes[observers]  # (S, 7)
        c, s = np.cos(own[:, 6])[:, None], np.sin(own[:, 6])[:, None]  # (S, 1)
        d = self._directions
        dirs_world = np.stack(
            [
                c * d[None, :, 0] - s * d[None, :, 1],
                s * d[None, :, 0] + c * d[None, :, 1],
                np.broadcast_to(d[None, :, 2], (n_obs, r)),
            ],
            axis=-1,
        )  # (S, R, 3): the pattern turned to each observer's heading
        origin = np.stack(
            [own[:, 0], own[:, 1], own[:, 2] + own[:, 5] + self.config.mount_z], axis=1
        )  # (S, 3)
        exits = np.stack([self._exits(box[3:6]) for box in own])  # (S, R)
        rays = np.empty((n_obs, r, 6), dtype=np.float32)
        rays[..., :3] = origin[:, None, :] + exits[..., None] * dirs_world
        rays[..., 3:] = dirs_world
        rays = rays.reshape(n_obs * r, 6)
        vertices, triangles = box_triangles(boxes)
        boxes_scene = o3d.t.geometry.RaycastingScene(nthreads=0)
        boxes_scene.add_triangles(
            o3d.core.Tensor.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)),
            o3d.core.Tensor.from_numpy(triangles.astype(np.uint32)),
        )
        rays_t = o3d.core.Tensor.from_numpy(rays)
        answer = boxes_scene.cast_rays(rays_t, nthreads=0)
        t_box = answer["t_hit"].numpy().reshape(n_obs, r)
        primitive = answer["primitive_ids"].numpy().reshape(n_obs, r)
        t_static = np.full_like(t_box, np.inf)
        if self._static_scene is not None:
            t_static = self._static_scene.cast_rays(rays_t, nthreads=0)["t_hit"].numpy().reshape(n_obs, r)
        # the ray started past its own box: add back that distance to compare with the range
        hit_box = (t_box < t_static) & (t_box + exits <= self.config.range)
        observer_of_ray = np.broadcast_to(np.arange(n_obs)[:, None], (n_obs, r))
        flat = observer_of_ray[hit_box] * m + primitive[hit_box].astype(np.int64) // 12
        counts = np.bincount(flat, minlength=n_obs * m).reshape(n_obs, m).astype(np.int32)
        counts[np.arange(n_obs), observers] = 0
        return counts

    def visible(self, boxes: np.ndarray, observers: np.ndarray) -> np.ndarray:
        """(S, M) bool: observer s sees box m (at least ``min_points`` returns)."""
        return self.points_on_boxes(boxes, observers) >= self.config.min_points
