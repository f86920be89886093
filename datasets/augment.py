"""Global augmentation of a cooperative sample, applied consistently to every agent.

An augmentation is a similarity ``A`` (flip, rotation about z, uniform scale) of the ego frame:
the augmented scene is the original one transformed by ``A``. For the ego this is the usual global
augmentation of its points and boxes. Every other agent sees the same scene transformed, and the
geometry stays exact when its own points get the same ``A`` about its own origin and its pose
becomes the conjugate ``A @ T_ego_from_agent @ A^-1``:

    T' (A p_agent) = A T A^-1 A p_agent = A (T p_agent)      for every point p_agent,

so an agent's augmented points, moved with its augmented pose, land exactly where the ego's
augmented frame puts them. ``A T A^-1`` is rigid for any rigid ``T`` (``A = s Q`` with ``Q``
orthogonal gives ``[Q R Q^T | s Q t]``), so poses stay rotations plus translations, and flips keep
the frames right-handed. Boxes move as their bottom centres (points) with the heading reflected and
rotated, sizes scaled by ``s``.

Order of the parts: flips first, then the rotation, then the scale: ``A = s Rz(angle) F``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.geometry import wrap_angle

__all__ = ["AugmentConfig", "GlobalAugmentation"]


@dataclass(frozen=True)
class AugmentConfig:
    """How global augmentations are drawn (training only).

    Attributes:
        enabled: draw augmentations at all.
        flip_y_probability: probability of mirroring across the x axis (y -> -y).
        flip_x_probability: probability of mirroring across the y axis (x -> -x).
        rotation_range_rad: rotation about z drawn uniformly from ``[-r, r]``.
        scale_range: scale drawn uniformly from ``[lo, hi]``.
    """

    enabled: bool = True
    flip_y_probability: float = 0.5
    flip_x_probability: float = 0.0
    rotation_range_rad: float = 0.78539816
    scale_range: tuple[float, float] = (0.95, 1.05)

    def __post_init__(self) -> None:
        for name in ("flip_y_probability", "flip_x_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.rotation_range_rad <= np.pi:
            raise ValueError(f"rotation_range_rad must be in [0, pi], got {self.rotation_range_rad}")
        lo, hi = self.scale_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")


@dataclass(frozen=True)
class GlobalAugmentation:
    """One drawn augmentation ``A = scale * Rz(rotation_rad) @ F``.

    Attributes:
        flip_y: mirror y (F includes diag(1, -1, 1)).
        flip_x: mirror x (F includes diag(-1, 1, 1)).
        rotation_rad: rotation about z, radians, counter-clockwise.
        scale: uniform scale factor.
    """

    flip_y: bool = False
    flip_x: bool = False
    rotation_rad: float = 0.0
    scale: float = 1.0

    @classmethod
    def identity(cls) -> GlobalAugmentation:
        return cls()

    @classmethod
    def sample(cls, config: AugmentConfig, rng: np.random.Generator) -> GlobalAugmentation:
        """Draw one; always four draws from ``rng`` so the stream does not depend on the settings."""
        u = rng.random(4)
        if not config.enabled:
            return cls.identity()
        lo, hi = config.scale_range
        return cls(
            flip_y=bool(u[0] < config.flip_y_probability),
            flip_x=bool(u[1] < config.flip_x_probability),
            rotation_rad=float((2.0 * u[2] - 1.0) * config.rotation_range_rad),
            scale=float(lo + (hi - lo) * u[3]),
        )

    @property
    def linear(self) -> np.ndarray:
        """(3, 3) float64 ``s Rz F``."""
        flip = np.diag([-1.0 if self.flip_x else 1.0, -1.0 if self.flip_y else 1.0, 1.0])
        c, s = np.cos(self.rotation_rad), np.sin(self.rotation_rad)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        return self.scale * rot @ flip

    @property
    def matrix(self) -> np.ndarray:
        """(4, 4) float64 homogeneous ``A`` (no translation)."""
        out = np.eye(4)
        out[:3, :3] = self.linear
        return out

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 3 + F) points -> ``A p``; extra columns (intensity) unchanged; dtype kept."""
        pts = np.asarray(points)
        out = pts.copy()
        out[:, :3] = (pts[:, :3].astype(np.float64) @ self.linear.T).astype(pts.dtype, copy=False)
        return out

    def apply_pose(self, T_ego_from_agent: np.ndarray) -> np.ndarray:
        """(..., 4, 4) rigid poses -> ``A T A^-1`` (rigid)."""
        A = self.matrix
        A_inv = np.linalg.inv(A)
        return A @ np.asarray(T_ego_from_agent, dtype=np.float64) @ A_inv

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(M, 7) bottom-centre boxes -> augmented boxes (centres moved, heading reflected then
        rotated, sizes scaled), float64."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
        out = boxes.copy()
        if len(boxes) == 0:
            return out
        out[:, :3] = boxes[:, :3] @ self.linear.T
        out[:, 3:6] = boxes[:, 3:6] * self.scale
        yaw = boxes[:, 6].copy()
        if self.flip_y:
            yaw = -yaw
        if self.flip_x:
            yaw = np.pi - yaw
        out[:, 6] = wrap_angle(yaw + self.rotation_rad)
        return out
