"""Voxel grids and voxelisation of point clouds (spconv's ``PointToVoxel``, CPU or CUDA).

A :class:`VoxelGrid` is the one place where the point-cloud range and the voxel size live; every
derived size (voxel counts along each axis, the BEV map of a backbone) is computed from it, never
restated in a config.

Coordinates follow spconv and OpenPCDet: a voxel's integer coordinates are ``[z, y, x]`` and a batch
of voxels carries ``coords_bzyx``: (V, 4) int32 ``[b, z, y, x]``, ``b`` being the index of the
point cloud in the batch (here: the flat index of an agent, see :mod:`datasets.collate`). Voxel
``[z, y, x]`` covers ``x_min + x * vx <= x < x_min + (x + 1) * vx`` and the same along y and z; points
outside the range are dropped.

Voxel features are the mean of the (at most ``max_points_per_voxel``) points that fell in the voxel,
all point columns (x, y, z, intensity): SECOND's "mean VFE".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["VoxelGrid", "Voxelizer", "Voxels"]


@dataclass(frozen=True)
class VoxelGrid:
    """A regular grid over a box of space, in the frame of the points it voxelises.

    Attributes:
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` metres.
        voxel_size: ``(vx, vy, vz)`` metres.
        max_points_per_voxel: points averaged per voxel; later points of a full voxel are dropped.
        max_voxels: voxels kept per point cloud; voxels beyond are dropped (in point order).
    """

    point_cloud_range: tuple[float, float, float, float, float, float] = (-40.0, -40.0, -3.0, 40.0, 40.0, 2.0)
    voxel_size: tuple[float, float, float] = (0.4, 0.4, 0.25)
    max_points_per_voxel: int = 5
    max_voxels: int = 40000

    def __post_init__(self) -> None:
        problems = []
        if len(self.point_cloud_range) != 6 or len(self.voxel_size) != 3:
            raise ValueError("point_cloud_range needs 6 numbers and voxel_size 3")
        lo, hi = np.asarray(self.point_cloud_range[:3]), np.asarray(self.point_cloud_range[3:])
        size = np.asarray(self.voxel_size, dtype=np.float64)
        if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)) or np.any(hi <= lo):
            problems.append(f"point_cloud_range must have min < max on every axis, got {self.point_cloud_range}")
        if not np.all(size > 0):
            problems.append(f"voxel_size must be > 0, got {self.voxel_size}")
        elif not problems:
            counts = (hi - lo) / size
            if np.any(np.abs(counts - np.round(counts)) > 1e-6):
                problems.append(
                    f"the range {self.point_cloud_range} is not a whole number of voxels {self.voxel_size}"
                )
        if self.max_points_per_voxel < 1:
            problems.append(f"max_points_per_voxel must be >= 1, got {self.max_points_per_voxel}")
        if self.max_voxels < 1:
            problems.append(f"max_voxels must be >= 1, got {self.max_voxels}")
        if problems:
            raise ValueError("invalid VoxelGrid: " + "; ".join(problems))

    @property
    def grid_size_xyz(self) -> tuple[int, int, int]:
        """Voxels along x, y and z."""
        lo, hi = self.point_cloud_range[:3], self.point_cloud_range[3:]
        return tuple(round((h - low) / s) for low, h, s in zip(lo, hi, self.voxel_size, strict=True))  # type: ignore[return-value]

    @property
    def spatial_shape_zyx(self) -> tuple[int, int, int]:
        """``[D, H, W]`` = voxels along z, y, x: spconv's ``spatial_shape``."""
        nx, ny, nz = self.grid_size_xyz
        return (nz, ny, nx)

    def scaled(self, factor: int) -> VoxelGrid:
        """The same range with voxels ``factor`` times larger along x, y and z (coarser grid)."""
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        size = tuple(s * factor for s in self.voxel_size)
        counts = self.grid_size_xyz
        if any(n % factor for n in counts):
            raise ValueError(f"grid {counts} is not divisible by {factor}")
        return VoxelGrid(self.point_cloud_range, size, self.max_points_per_voxel, self.max_voxels)  # type: ignore[arg-type]

    def contains(self, xyz: np.ndarray) -> np.ndarray:
        """(N,) bool: which (N, >=3) points lie inside the range (max excluded)."""
        xyz = np.asarray(xyz)[:, :3]
        lo, hi = np.asarray(self.point_cloud_range[:3]), np.asarray(self.point_cloud_range[3:])
        return np.all((xyz >= lo) & (xyz < hi), axis=1)


@dataclass
class Voxels:
    """The occupied voxels of one point cloud.

    Attributes:
        features: (V, C) float32 mean of the point columns in each voxel (x, y, z, intensity, ...).
        coords_zyx: (V, 3) int32 voxel coordinates ``[z, y, x]``.
        num_points: (V,) int32 points averaged in each voxel (>= 1).
    """

    features: torch.Tensor
    coords_zyx: torch.Tensor
    num_points: torch.Tensor

    def __len__(self) -> int:
        return int(self.coords_zyx.shape[0])


class Voxelizer:
    """Voxelise single point clouds on a :class:`VoxelGrid` with spconv's ``PointToVoxel``.

    One ``PointToVoxel`` (it owns its buffers) is made per device and point width on first use, so
    an instance can be pickled into data-loader workers before it has voxelised anything.
    """

    def __init__(self, grid: VoxelGrid) -> None:
        self.grid = grid
        self._generators: dict[tuple[str, int], object] = {}

    def __getstate__(self) -> dict:
        return {"grid": self.grid, "_generators": {}}

    def _generator(self, device: torch.device, num_features: int):
        from spconv.pytorch.utils import PointToVoxel

        key = (str(device), num_features)
        if key not in self._generators:
            self._generators[key] = PointToVoxel(
                vsize_xyz=list(self.grid.voxel_size),
                coors_range_xyz=list(self.grid.point_cloud_range),
                num_point_features=num_features,
                max_num_voxels=self.grid.max_voxels,
                max_num_points_per_voxel=self.grid.max_points_per_voxel,
                device=device,
            )
        return self._generators[key]

    def __call__(self, points: np.ndarray | torch.Tensor) -> Voxels:
        """Voxelise one cloud.

        Args:
            points: (N, C >= 3) float points (x, y, z first) in the grid's frame, numpy or torch
                (CPU or CUDA); the result is on the same device.

        Returns:
            The occupied voxels, in spconv's order.
        """
        pts = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)) if isinstance(points, np.ndarray) else points
        if pts.ndim != 2 or pts.shape[1] < 3:
            raise ValueError(f"points must be (N, C >= 3), got shape {tuple(pts.shape)}")
        pts = pts.detach().to(torch.float32).contiguous()
        num_features = int(pts.shape[1])
        if pts.shape[0] == 0:
            return Voxels(
                pts.new_zeros((0, num_features)),
                torch.zeros((0, 3), dtype=torch.int32, device=pts.device),
                torch.zeros((0,), dtype=torch.int32, device=pts.device),
            )
        voxels, coords_zyx, num_points = self._generator(pts.device, num_features)(pts)
        # voxels: (V, max_points, C) zero-padded; mean over the filled slots
        counts = num_points.clamp(min=1).to(voxels.dtype)
        features = voxels.sum(dim=1) / counts[:, None]  # (V, C)
        return Voxels(features.clone(), coords_zyx.to(torch.int32).clone(), num_points.to(torch.int32).clone())
