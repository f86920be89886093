"""Sparse 3D backbone on spconv, SECOND / VoxelNet style, ending in a dense BEV map.

Coordinates are spconv's ``coords_bzyx``: (V, 4) int32 ``[b, z, y, x]`` with ``b`` the flat agent
index (every agent of a batch is one spconv batch element). Stages, with the default sizes for the
voxel grid ``[D, H, W] = [20, 200, 200]`` (0.4 x 0.4 x 0.25 m voxels over 80 x 80 x 5 m) and
channels (c0, c1, c2, out) = (16, 32, 32, 32)::

    input  SubMConv3d(4 -> c0)                          [20, 200, 200]
    stage0 SubMConv3d(c0 -> c0) x blocks                [20, 200, 200]   (stride 1, 1, 1)
    stage1 SparseConv3d(c0 -> c1, 3, stride 2, pad 1)   [10, 100, 100]   <- [20, 200, 200]
           SubMConv3d(c1 -> c1) x blocks
    stage2 SparseConv3d(c1 -> c2, 3, stride (2,1,1))    [ 5, 100, 100]   <- [10, 100, 100]
           SubMConv3d(c2 -> c2) x blocks
    out    SparseConv3d(c2 -> out, (3,1,1), stride (2,1,1), pad 0)  [2, 100, 100]
    dense  (N, 32, 2, 100, 100) -> (N, 64, 100, 100)   the BEV map

A strided sparse convolution with kernel k, stride s and padding p maps n cells to
``floor((n + 2p - k) / s) + 1`` (:func:`conv_output_size`); every stage's shape is computed from the
voxel grid by :meth:`SparseBackbone3d.stage_shapes`, never configured. Each convolution is
followed by batch norm (:class:`VoxelBatchNorm1d`) and ReLU, as in SECOND.
"""

from __future__ import annotations

from dataclasses import dataclass

import spconv.pytorch as spconv
import torch
from torch import nn

from datasets.voxelize import VoxelGrid
from models.sparse_inference import SparseBackbone3dInference
from models.spconv_cpu import enable_cpu_backward

enable_cpu_backward()

__all__ = ["SparseBackbone3d", "SparseBackboneConfig", "VoxelBatchNorm1d", "conv_output_size"]


class VoxelBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d of (V, C) voxel features whose statistics do not depend on the voxel order.

    On CPU, torch sums a (V, C) input in float32 row after row (its channels-last kernel), so the
    statistics change in the last bits with the order spconv lists the voxels in, and that order
    depends on the whole batch. Laid out as (1, C, V), the same layer takes the kernel that sums in
    float64: the statistics are then those of the set of voxels, which is what lets a batch split
    over processes (``models/distributed.py``) normalise exactly as the whole batch in one process.
    Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d`` (results differ from it in
    the last bits); CUDA inputs and eval mode (no statistics computed) go straight through. Costs:
    16.6 against 19.4 ms forward and backward for (57000, 32) features on one CPU thread, but about
    4x BatchNorm1d's 0.09 ms for (3000, 32) in training.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(V, C) -> (V, C)."""
        if not self.training or features.dim() != 2 or features.device.type != "cpu":
            return super().forward(features)  # eval: running statistics, an element-wise affine map
        channels_first = features.t().contiguous().unsqueeze(0)  # (1, C, V), contiguous
        return super().forward(channels_first).squeeze(0).t().contiguous()


@dataclass(frozen=True)
class SparseBackboneConfig:
    """Sizes of the sparse 3D backbone.

    Attributes:
        in_channels: voxel feature width (x, y, z, intensity).
        channels: output channels of each stage.
        strides_zyx: stride of each stage's first convolution; stage 0's must be (1, 1, 1) (it is a
            submanifold convolution).
        blocks: submanifold convolutions per stage after its first convolution.
        out_channels: channels of the final z-collapsing convolution.
        out_kernel_z: its kernel along z.
        out_stride_z: its stride along z.
    """

    in_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 32)
    strides_zyx: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 2, 2), (2, 1, 1))
    blocks: int = 1
    out_channels: int = 32
    out_kernel_z: int = 3
    out_stride_z: int = 2

    def __post_init__(self) -> None:
        problems = []
        if len(self.channels) != len(self.strides_zyx) or not self.channels:
            problems.append("channels and strides_zyx need one entry per stage")
        elif tuple(self.strides_zyx[0]) != (1, 1, 1):
            problems.append(f"stage 0 stride must be (1, 1, 1), got {self.strides_zyx[0]}")
        if any(s[1] != s[2] for s in self.strides_zyx):
            problems.append("y and x strides must be equal (square BEV cells)")
        if any(c < 1 for c in self.channels) or self.out_channels < 1 or self.in_channels < 1:
            problems.append("channel counts must be >= 1")
        if self.blocks < 0 or self.out_kernel_z < 1 or self.out_stride_z < 1:
            problems.append("blocks must be >= 0, out_kernel_z and out_stride_z >= 1")
        if problems:
            raise ValueError("invalid SparseBackboneConfig: " + "; ".join(problems))

    @property
    def bev_stride(self) -> int:
        """Voxels per BEV cell along x and y (product of the stage strides)."""
        stride = 1
        for s in self.strides_zyx:
            stride *= s[2]
        return stride


def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    """Cells along one axis after a (sparse) convolution: ``floor((n + 2p - k) / s) + 1``."""
    return (n + 2 * padding - kernel) // stride + 1


def _norm_act(channels: int) -> list[nn.Module]:
    return [VoxelBatchNorm1d(channels, eps=1e-3, momentum=0.01), nn.ReLU()]


class SparseBackbone3d(nn.Module):
    """Voxels of N point clouds -> (N, C_bev, H, W) dense BEV maps (see the module docstring)."""

    def __init__(self, config: SparseBackboneConfig, grid: VoxelGrid) -> None:
        super().__init__()
        self.config = config
        self.grid = grid
        shapes = self.stage_shapes(config, grid)
        d_out = shapes[-1][0]
        if d_out < 1:
            raise ValueError(
                f"the voxel grid {grid.spatial_shape_zyx} is too thin in z for this backbone: {shapes}"
            )
        c = config.channels
        self.input_conv = spconv.SparseSequential(
            spconv.SubMConv3d(config.in_channels, c[0], 3, padding=1, bias=False, indice_key="subm0"),
            *_norm_act(c[0]),
        )
        stages = []
        for i, (channels, stride) in enumerate(zip(c, config.strides_zyx, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [
                    spconv.SparseConv3d(
                        c[i - 1],
                        channels,
                        3,
                        stride=tuple(stride),
                        padding=1,
                        bias=False,
                        indice_key=f"down{i}",
                    ),
                    *_norm_act(channels),
                ]
            for _ in range(config.blocks):
                layers += [
                    spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=f"subm{i}"),
                    *_norm_act(channels),
                ]
            stages.append(spconv.SparseSequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_conv = spconv.SparseSequential(
            spconv.SparseConv3d(
                c[-1],
                config.out_channels,
                (config.out_kernel_z, 1, 1),
                stride=(config.out_stride_z, 1, 1),
                padding=0,
                bias=False,
                indice_key="out",
            ),
            *_norm_act(config.out_channels),
        )
        self.shapes = shapes
        self.bev_channels = config.out_channels * d_out
        self.bev_shape = (shapes[-1][1], shapes[-1][2])

    def fuse_for_inference(self) -> SparseBackbone3dInference:
        """An inference-only copy with batch norm folded into the convolutions, run as plain torch
        ops on spconv's rulebooks (:class:`models.sparse_inference.SparseBackbone3dInference`):
        same outputs as this backbone in eval mode up to float32 rounding, about 20 % less time
        on one CPU thread (written for CPU; on CUDA spconv's own kernels are the fast path). This
        module is left as it is (its parameters are copied, not shared)."""
        return SparseBackbone3dInference(self).eval()

    @staticmethod
    def stage_shapes(config: SparseBackboneConfig, grid: VoxelGrid) -> list[tuple[int, int, int]]:
        """``[D, H, W]`` after each stage, then after the output convolution."""
        shape = grid.spatial_shape_zyx
        out = []
        for stride in config.strides_zyx:
            shape = tuple(
                conv_output_size(n, 3, s, 1) if s > 1 else n for n, s in zip(shape, stride, strict=True)
            )
            out.append(shape)
        d, h, w = shape
        out.append((conv_output_size(d, config.out_kernel_z, config.out_stride_z, 0), h, w))
        return out  # type: ignore[return-value]

    def forward(
        self, voxel_features: torch.Tensor, coords_bzyx: torch.Tensor, num_clouds: int
    ) -> torch.Tensor:
        """Run the backbone.

        Args:
            voxel_features: (V, in_channels) float32.
            coords_bzyx: (V, 4) int32 ``[cloud index, z, y, x]`` on the voxel grid.
            num_clouds: N, the number of point clouds (clouds without voxels give zero maps).

        Returns:
            (N, C_bev, H, W) float32 BEV maps, ``C_bev = out_channels * D_out``.
        """
        if voxel_features.shape[0] == 0:  # spconv cannot run on an empty tensor
            return voxel_features.new_zeros((num_clouds, self.bev_channels, *self.bev_shape))
        x = spconv.SparseConvTensor(
            voxel_features,
            coords_bzyx.to(torch.int32).contiguous(),
            list(self.grid.spatial_shape_zyx),
            num_clouds,
        )
        x = self.input_conv(x)  # [D, H, W] = grid
        for stage in self.stages:
            x = stage(x)
        x = self.out_conv(x)  # [D_out, H_bev, W_bev]
        # scatter to a dense grid (what SparseConvTensor.dense() does, without its deprecated indexing)
        d, h, w = x.spatial_shape
        c = x.features.shape[1]
        dense = x.features.new_zeros((num_clouds, d, h, w, c))
        b, z, y, xx = x.indices.long().unbind(1)
        dense = dense.index_put((b, z, y, xx), x.features)  # (N, D_out, H, W, C)
        return dense.permute(0, 4, 1, 2, 3).reshape(num_clouds, c * d, h, w)
