"""Bird's-eye-view grids and moving BEV maps between agents' frames.

A BEV map is a (C, H, W) tensor over a :class:`BevGrid`: row ``i`` is y, column ``j`` is x, and
cell ``(i, j)`` covers ``[x_min + j * cell_x, x_min + (j + 1) * cell_x)`` by the same along y. Every
agent computes its maps on the same grid relative to its own sensor; :func:`warp_to_ego` resamples
them into the ego's grid with the agents' poses (bilinear, zeros outside), as OpenCOOD's and
V2VNet's spatial warping does with ``affine_grid`` / ``grid_sample``. Only the ground-plane part of
a pose is used (x, y and the rotation about z), which is what a BEV map can represent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datasets.voxelize import VoxelGrid

__all__ = ["BevGrid", "ego_sampling_grid", "scatter_to_bev", "warp_to_ego"]


@dataclass(frozen=True)
class BevGrid:
    """A BEV raster over the x-y extent of a voxel grid, ``stride`` voxels per cell.

    Attributes:
        x_min, y_min: lower corner, metres.
        cell_x, cell_y: cell size, metres.
        height, width: cells along y (rows) and x (columns).
    """

    x_min: float
    y_min: float
    cell_x: float
    cell_y: float
    height: int
    width: int

    @classmethod
    def from_voxel_grid(cls, grid: VoxelGrid, stride: int) -> BevGrid:
        """The BEV grid of a backbone that downsamples the voxel grid ``stride`` times in x and y.

        Raises:
            ValueError: the voxel counts along x or y are not multiples of ``stride``.
        """
        nx, ny, _ = grid.grid_size_xyz
        if nx % stride or ny % stride:
            raise ValueError(f"voxel grid {nx} x {ny} (x, y) is not divisible by the BEV stride {stride}")
        x0, y0 = grid.point_cloud_range[0], grid.point_cloud_range[1]
        return cls(
            x0, y0, grid.voxel_size[0] * stride, grid.voxel_size[1] * stride, ny // stride, nx // stride
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def extent(self) -> tuple[float, float]:
        """Size along x and y, metres."""
        return (self.width * self.cell_x, self.height * self.cell_y)

    def cell_centres(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W, 2) float32 x, y of every cell centre."""
        xs = self.x_min + (torch.arange(self.width, device=device, dtype=torch.float32) + 0.5) * self.cell_x
        ys = self.y_min + (torch.arange(self.height, device=device, dtype=torch.float32) + 0.5) * self.cell_y
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx, yy], dim=-1)

    def cell_of(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row, column (int64) and inside-mask (bool) of (N, >=2) points' x, y."""
        col = torch.floor((xy[:, 0] - self.x_min) / self.cell_x).long()
        row = torch.floor((xy[:, 1] - self.y_min) / self.cell_y).long()
        inside = (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)
        return row, col, inside

    def _normalised_from_metric(self) -> np.ndarray:
        """(3, 3): metric (x, y, 1) -> ``grid_sample`` coordinates (u, v, 1), align_corners=False."""
        lx, ly = self.extent
        return np.array(
            [
                [2.0 / lx, 0.0, -1.0 - 2.0 * self.x_min / lx],
                [0.0, 2.0 / ly, -1.0 - 2.0 * self.y_min / ly],
                [0, 0, 1],
            ]
        )


def _planar(T: np.ndarray) -> np.ndarray:
    """(..., 4, 4) pose -> (..., 3, 3) planar (x, y, yaw) part, rotation re-orthonormalised."""
    yaw = np.arctan2(T[..., 1, 0], T[..., 0, 0])
    out = np.zeros((*T.shape[:-2], 3, 3))
    out[..., 0, 0] = np.cos(yaw)
    out[..., 0, 1] = -np.sin(yaw)
    out[..., 1, 0] = np.sin(yaw)
    out[..., 1, 1] = np.cos(yaw)
    out[..., 0, 2] = T[..., 0, 3]
    out[..., 1, 2] = T[..., 1, 3]
    out[..., 2, 2] = 1.0
    return out


def ego_sampling_grid(
    T_ego_from_agent: torch.Tensor, grid: BevGrid, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Where each ego cell falls in each agent's map: (N, H, W, 2) ``grid_sample`` coordinates
    (align_corners=False; outside [-1, 1]: beyond the agent's map), from (N, 4, 4) poses of the
    agents in the ego frame. What :func:`warp_to_ego` samples with; computed once, it serves several
    maps of the same agents (features bilinear, masks nearest) or a subset of the ego cells.
    """
    n = T_ego_from_agent.shape[0]
    h, w = grid.shape
    T = T_ego_from_agent.detach().cpu().to(torch.float64).numpy()
    N = grid._normalised_from_metric()
    N_inv = np.linalg.inv(N)
    agent_from_ego = np.linalg.inv(_planar(T))  # (N, 3, 3)
    theta = N[None] @ agent_from_ego @ N_inv[None]  # (N, 3, 3): output (u, v) -> input (u, v)
    theta_t = torch.from_numpy(theta[:, :2, :]).to(device=device, dtype=dtype)
    return F.affine_grid(theta_t, [n, 1, h, w], align_corners=False)


def warp_to_ego(
    features: torch.Tensor, T_ego_from_agent: torch.Tensor, grid: BevGrid, mode: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample agents' BEV maps (each in its own frame) into their ego's frame.

    Args:
        features: (N, C, H, W) maps on ``grid``, agent n's in its own frame.
        T_ego_from_agent: (N, 4, 4) pose of each agent in its ego's frame (float64 or float32).
        grid: the BEV grid (same for every agent, relative to its sensor).
        mode: ``grid_sample`` interpolation, ``"bilinear"`` or ``"nearest"``.

    Returns:
        warped: (N, C, H, W) maps in the ego frame, zero where the agent's map does not reach.
        valid: (N, 1, H, W) bool, True where the ego cell falls inside the agent's map.
    """
    n, _, h, w = features.shape
    if (h, w) != grid.shape:
        raise ValueError(f"features are {h} x {w}, the grid is {grid.shape}")
    if tuple(T_ego_from_agent.shape) != (n, 4, 4):
        raise ValueError(f"T_ego_from_agent must be ({n}, 4, 4), got {tuple(T_ego_from_agent.shape)}")
    if n == 0:
        return features, features.new_zeros((0, 1, h, w), dtype=torch.bool)
    sampling = ego_sampling_grid(T_ego_from_agent, grid, features.device, features.dtype)  # (N, H, W, 2)
    warped = F.grid_sample(features, sampling, mode=mode, padding_mode="zeros", align_corners=False)
    inside = (sampling.abs() <= 1.0).all(dim=-1)[:, None]  # (N, 1, H, W)
    return warped, inside


def scatter_to_bev(
    xy: torch.Tensor, values: torch.Tensor, grid: BevGrid, reduce: str = "amax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-point values into a BEV map.

    Args:
        xy: (N, >=2) point coordinates (x, y first) in the grid's frame.
        values: (N, C) values.
        grid: target grid.
        reduce: ``"amax"``, ``"sum"`` or ``"mean"`` over the points of a cell.

    Returns:
        bev: (C, H, W) map, zero in empty cells.
        count: (H, W) int64 points per cell.
    """
    row, col, inside = grid.cell_of(xy)
    flat = (row * grid.width + col)[inside]
    vals = values[inside]
    cells = grid.height * grid.width
    channels = values.shape[1]
    count = torch.bincount(flat, minlength=cells)
    out = values.new_zeros((cells, channels))
    index = flat[:, None].expand(-1, channels)
    match reduce:
        case "amax":
            out = out.scatter_reduce(0, index, vals, reduce="amax", include_self=False)
        case "sum":
            out = out.scatter_add(0, index, vals)
        case "mean":
            out = out.scatter_reduce(0, index, vals, reduce="mean", include_self=False)
        case _:
            raise ValueError(f"reduce must be amax, sum or mean, got {reduce!r}")
    return out.T.reshape(channels, grid.height, grid.width), count.reshape(grid.height, grid.width)
