"""The shared point-cloud encoder: voxels -> sparse 3D backbone -> BEV map -> 2D backbone.

Every fusion method uses this one encoder (and the same heads); they differ only in what goes into
it (an agent's own voxels, or the ego's merged cloud for early fusion) and in what happens to its
output (fused across agents, or not).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from datasets.voxelize import VoxelGrid
from models.bev import BevGrid
from models.bev_backbone import BevBackbone2d, BevBackboneConfig
from models.sparse_backbone import SparseBackbone3d, SparseBackboneConfig

__all__ = ["EncoderConfig", "PointCloudEncoder"]


@dataclass(frozen=True)
class EncoderConfig:
    """The two backbones' sizes."""

    sparse: SparseBackboneConfig = field(default_factory=SparseBackboneConfig)
    bev: BevBackboneConfig = field(default_factory=BevBackboneConfig)


class PointCloudEncoder(nn.Module):
    """(V, 4) voxels of N clouds -> (N, C, H, W) BEV features on :attr:`bev_grid`."""

    def __init__(self, config: EncoderConfig, grid: VoxelGrid) -> None:
        super().__init__()
        self.config = config
        self.sparse = SparseBackbone3d(config.sparse, grid)
        self.bev_grid = BevGrid.from_voxel_grid(grid, config.sparse.bev_stride)
        if self.sparse.bev_shape != self.bev_grid.shape:
            raise ValueError(
                f"sparse backbone gives {self.sparse.bev_shape}, the BEV grid is {self.bev_grid.shape}"
            )
        self.bev = BevBackbone2d(config.bev, self.sparse.bev_channels)
        self.out_channels = self.bev.out_channels

    def forward(
        self,
        voxel_features: torch.Tensor,
        coords_bzyx: torch.Tensor,
        num_clouds: int,
        bev_backbone: bool = True,
    ) -> torch.Tensor:
        """Args: (V, 4) voxel features, (V, 4) int32 ``[cloud, z, y, x]``, N clouds;
        ``bev_backbone``: False stops after the sparse backbone (fusion before the 2D backbone).

        Returns: (N, C, H, W) features, or (N, C_bev, H, W) sparse-backbone BEV maps.
        """
        bev = self.sparse(voxel_features, coords_bzyx, num_clouds)  # (N, C_bev, H, W)
        return self.bev(bev) if bev_backbone else bev  # (N, C, H, W)

    def fuse_for_inference(self) -> PointCloudEncoder:
        """An eval-mode copy for inference only, batch norm folded into both backbones (see
        :meth:`SparseBackbone3d.fuse_for_inference` and :meth:`BevBackbone2d.fuse_for_inference`):
        the same function up to float32 rounding, about 20 % faster on one CPU thread. Its output
        has channels-last strides (the sparse backbone writes the BEV map in that layout and the
        2D backbone keeps it). This encoder is left as it is."""
        fused = copy.deepcopy(self).eval()
        fused.sparse = fused.sparse.fuse_for_inference()
        fused.bev = fused.bev.fuse_for_inference()
        fused.sparse.channels_last = fused.bev.memory_format == torch.channels_last  # no layout copy between
        return fused
