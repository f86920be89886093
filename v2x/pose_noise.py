"""Localisation error on the pose a sender puts in its message header.

A sender does not know its true pose; it sends what its localisation measures. As OpenCOOD
models it, the measured pose is the true one with Gaussian noise on the position and on the
heading: ``x, y, z`` each get N(0, std_xyz_m^2) in the world frame and the heading gets a
rotation of N(0, std_yaw_rad^2) about the world z axis through the sensor, so roll and pitch
are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.geometry import T_from_rotation_translation, T_from_xyz_yaw

__all__ = ["PoseNoise"]


@dataclass(frozen=True)
class PoseNoise:
    """Standard deviations of the localisation error.

    Attributes:
        std_xyz_m: standard deviation of the position error along world x, y and z, metres;
            one value for all three axes or one per axis.
        std_yaw_rad: standard deviation of the heading error, radians.
    """

    std_xyz_m: float | tuple[float, float, float] = 0.0
    std_yaw_rad: float = 0.0

    def __post_init__(self) -> None:
        std = np.broadcast_to(np.asarray(self.std_xyz_m, dtype=np.float64), (3,))
        if not np.all(np.isfinite(std)) or np.any(std < 0):
            raise ValueError(f"std_xyz_m must be finite and >= 0, got {self.std_xyz_m}")
        if not 0 <= self.std_yaw_rad < np.inf:
            raise ValueError(f"std_yaw_rad must be finite and >= 0, got {self.std_yaw_rad}")

    @property
    def is_zero(self) -> bool:
        return self.std_yaw_rad == 0 and not np.any(np.asarray(self.std_xyz_m))

    def apply(self, T_world_from_sensor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A measured pose: (4, 4) float64, the true ``T_world_from_sensor`` plus one noise draw.

        Always draws four normals (dx, dy, dz, dyaw) so that the random stream does not depend
        on which deviations are zero.
        """
        T = np.asarray(T_world_from_sensor, dtype=np.float64)
        if T.shape != (4, 4):
            raise ValueError(f"T_world_from_sensor must be (4, 4), got {T.shape}")
        std_xyz = np.broadcast_to(np.asarray(self.std_xyz_m, dtype=np.float64), (3,))
        draw = rng.standard_normal(4)
        d_xyz = draw[:3] * std_xyz
        d_yaw = draw[3] * self.std_yaw_rad
        R_world_noise = T_from_xyz_yaw(0.0, 0.0, 0.0, d_yaw)[:3, :3]
        return T_from_rotation_translation(R_world_noise @ T[:3, :3], T[:3, 3] + d_xyz)
