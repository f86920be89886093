"""CORE's reconstruction module: recover the holistic scene from the fused BEV features.

The holistic scene of a sample is every agent's points moved into the ego frame with the true
poses (what an ideal early fusion would see). The head reconstructs it two ways, each switchable:

**Occupancy** (sparse, decoded with spconv), coarse to fine:

1. a 1x1 convolution predicts, per BEV cell, whether its column holds any holistic voxel;
2. the selected columns (predicted occupied, at most ``max_columns`` per sample; during training
   the truly occupied ones are added, so the decoder learns on real geometry) are lifted to 3D:
   a 1x1 convolution gives ``channels`` features for each of the ``D_c`` voxels of the column on
   the coarse grid (the voxel grid ``bev_stride`` times coarser on every axis, e.g. [10, 100, 100]);
3. SubMConv3d + a linear layer predict each coarse voxel's occupancy;
4. the coarse voxels kept (predicted occupied, plus the true ones in training, at most
   ``max_parents`` per sample) are upsampled with a transposed sparse convolution
   (``SparseConvTranspose3d``, kernel 2, stride 2: each parent makes its 8 children on the fine
   grid, e.g. [20, 200, 200] <- [10, 100, 100]), refined by SubMConv3d and classified.

Targets are the holistic voxels on the fine (the detector's) voxel grid and their coarse and
column projections; each level's loss is binary cross-entropy or focal (``occupancy_loss``).

**BEV features** (CORE's target): a small convolutional decoder predicts the BEV features the
shared encoder computes from the holistic point cloud (computed without gradient by the caller),
with a mean squared error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from torch import nn

from datasets.voxelize import VoxelGrid
from models.bev import BevGrid
from models.distributed import loss_normaliser
from models.losses import sigmoid_focal_loss
from models.sparse_backbone import VoxelBatchNorm1d
from models.spconv_cpu import enable_cpu_backward

enable_cpu_backward()

__all__ = [
    "OccupancyTargets",
    "ReconstructionConfig",
    "ReconstructionHead",
    "ReconstructionLoss",
    "ReconstructionOutput",
]


@dataclass(frozen=True)
class ReconstructionConfig:
    """Attributes:
    targets: which reconstructions are trained: ``"none"`` (head off), ``"occupancy"``, ``"bev"``,
        ``"both"``.
    occupancy_loss: ``"bce"`` or ``"focal"``.
    occupancy_weight: weight of the occupancy loss (sum of its three levels).
    bev_weight: weight of the BEV feature loss.
    channels: features per voxel in the sparse decoder.
    max_columns: columns lifted to 3D per sample.
    max_parents: coarse voxels refined per sample.
    """

    targets: Literal["none", "occupancy", "bev", "both"] = "none"
    occupancy_loss: Literal["bce", "focal"] = "focal"
    occupancy_weight: float = 1.0
    bev_weight: float = 1.0
    channels: int = 16
    max_columns: int = 2048
    max_parents: int = 8192

    @property
    def enabled(self) -> bool:
        return self.targets != "none"

    @property
    def occupancy(self) -> bool:
        return self.targets in ("occupancy", "both")

    @property
    def bev(self) -> bool:
        return self.targets in ("bev", "both")


@dataclass
class OccupancyTargets:
    """Holistic occupancy of B samples.

    Attributes:
        fine_keys: (F,) int64 sorted linear keys ``((b * D + z) * H + y) * W + x`` of occupied fine voxels.
        coarse_keys: (Q,) int64 the same on the coarse grid.
        columns: (B, H_c, W_c) bool occupied coarse columns (the BEV grid).
    """

    fine_keys: torch.Tensor
    coarse_keys: torch.Tensor
    columns: torch.Tensor


@dataclass
class ReconstructionOutput:
    """Attributes:
    column_logits: (B, H, W) occupancy logit of each BEV column (None without occupancy).
    coarse_coords_bzyx: (Pc, 4) int32 coarse voxels scored, ``coarse_logits`` (Pc,).
    fine_coords_bzyx: (Pf, 4) int32 fine voxels scored, ``fine_logits`` (Pf,).
    bev_features: (B, C, H, W) predicted holistic BEV features (None without the BEV target).
    """

    column_logits: torch.Tensor | None
    coarse_coords_bzyx: torch.Tensor | None
    coarse_logits: torch.Tensor | None
    fine_coords_bzyx: torch.Tensor | None
    fine_logits: torch.Tensor | None
    bev_features: torch.Tensor | None


@dataclass
class ReconstructionLoss:
    """Weighted terms (scalars); zero where a target is switched off."""

    occupancy: torch.Tensor
    bev: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.occupancy + self.bev


def _keys(coords_bzyx: torch.Tensor, shape_zyx: tuple[int, int, int]) -> torch.Tensor:
    d, h, w = shape_zyx
    c = coords_bzyx.long()
    return ((c[:, 0] * d + c[:, 1]) * h + c[:, 2]) * w + c[:, 3]


def _norm_act(channels: int) -> list[nn.Module]:
    return [VoxelBatchNorm1d(channels, eps=1e-3, momentum=0.01), nn.ReLU()]


class ReconstructionHead(nn.Module):
    """See the module docstring. ``in_channels`` = fused BEV channels."""

    def __init__(self, config: ReconstructionConfig, in_channels: int, voxel_grid: VoxelGrid, bev_grid: BevGrid):
        super().__init__()
        self.config = config
        self.fine_grid = voxel_grid
        nx, _, _ = voxel_grid.grid_size_xyz
        stride = nx // bev_grid.width
        if stride < 1 or nx % bev_grid.width:
            raise ValueError(f"BEV width {bev_grid.width} does not divide the voxel grid's {nx}")
        self.stride = stride
        self.coarse_grid = voxel_grid.scaled(stride) if stride > 1 else voxel_grid
        self.fine_shape = voxel_grid.spatial_shape_zyx
        self.coarse_shape = self.coarse_grid.spatial_shape_zyx
        if stride not in (1, 2):
            raise ValueError(f"the occupancy decoder upsamples once by 2; BEV stride {stride} is not supported")
        ch = config.channels
        d_c = self.coarse_shape[0]
        if config.occupancy:
            self.column_logit = nn.Conv2d(in_channels, 1, 1)
            self.lift = nn.Conv2d(in_channels, ch * d_c, 1)
            self.coarse_net = spconv.SparseSequential(
                spconv.SubMConv3d(ch, ch, 3, padding=1, bias=False, indice_key="rec_coarse"), *_norm_act(ch)
            )
            self.coarse_logit = nn.Linear(ch, 1)
            self.up = spconv.SparseSequential(
                spconv.SparseConvTranspose3d(ch, ch, 2, stride=2, bias=False, indice_key="rec_up"), *_norm_act(ch)
            )
            self.fine_net = spconv.SparseSequential(
                spconv.SubMConv3d(ch, ch, 3, padding=1, bias=False, indice_key="rec_fine"), *_norm_act(ch)
            )
            self.fine_logit = nn.Linear(ch, 1)
        if config.bev:
            self.bev_decoder = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(in_channels, eps=1e-3, momentum=0.01),
                nn.ReLU(),
                nn.Conv2d(in_channels, in_channels, 1),
            )

    # ------------------------------------------------------------------------------------- targets

    def occupancy_targets(self, coords_bzyx: torch.Tensor, batch_size: int) -> OccupancyTargets:
        """Targets from the holistic voxels (V, 4) ``[sample, z, y, x]`` on the fine grid."""
        fine_keys = torch.unique(_keys(coords_bzyx, self.fine_shape))
        coarse = coords_bzyx.long().clone()
        coarse[:, 1:] = torch.div(coarse[:, 1:], self.stride, rounding_mode="floor")
        coarse_keys = torch.unique(_keys(coarse, self.coarse_shape))
        _, h, w = self.coarse_shape
        columns = torch.zeros(batch_size, h, w, dtype=torch.bool, device=coords_bzyx.device)
        columns[coarse[:, 0], coarse[:, 2], coarse[:, 3]] = True
        return OccupancyTargets(fine_keys, coarse_keys, columns)

    # ------------------------------------------------------------------------------------- forward

    def forward(self, fused: torch.Tensor, targets: OccupancyTargets | None = None) -> ReconstructionOutput:
        """Reconstruct from (B, C, H, W) fused features; ``targets`` (training) adds the true
        columns and voxels to the decoded set."""
        cfg = self.config
        bev_features = self.bev_decoder(fused) if cfg.bev else None
        if not cfg.occupancy:
            return ReconstructionOutput(None, None, None, None, None, bev_features)
        b, _, h, w = fused.shape
        d_c = self.coarse_shape[0]
        column_logits = self.column_logit(fused)[:, 0]  # (B, H, W)

        # columns to lift: predicted occupied (top max_columns), plus the true ones when training
        chosen = torch.zeros(b, h * w, dtype=torch.bool, device=fused.device)
        flat_logits = column_logits.detach().reshape(b, -1)
        k = min(cfg.max_columns, h * w)
        top = torch.topk(flat_logits, k, dim=1)
        chosen.scatter_(1, top.indices, top.values > 0)
        if targets is not None:
            chosen |= targets.columns.reshape(b, -1)
        sample, cell = torch.nonzero(chosen, as_tuple=True)  # (S,)
        if sample.numel() == 0:
            empty = torch.zeros((0, 4), dtype=torch.int32, device=fused.device)
            return ReconstructionOutput(column_logits, empty, fused.new_zeros(0), empty, fused.new_zeros(0), bev_features)

        lifted = self.lift(fused)  # (B, ch * D_c, H, W)
        ch = cfg.channels
        lifted = lifted.view(b, ch, d_c, h * w)[sample, :, :, cell]  # (S, ch, D_c)
        features = lifted.permute(0, 2, 1).reshape(-1, ch)  # (S * D_c, ch)
        z = torch.arange(d_c, device=fused.device).repeat(sample.numel())
        row = torch.div(cell, w, rounding_mode="floor").repeat_interleave(d_c)
        col = (cell % w).repeat_interleave(d_c)
        coarse_coords = torch.stack([sample.repeat_interleave(d_c), z, row, col], dim=1).to(torch.int32)
        x = spconv.SparseConvTensor(features, coarse_coords, list(self.coarse_shape), b)
        x = self.coarse_net(x)
        coarse_logits = self.coarse_logit(x.features)[:, 0]  # (Pc,)

        keep = coarse_logits.detach() > 0
        if targets is not None:
            keep |= torch.isin(_keys(x.indices, self.coarse_shape), targets.coarse_keys)
        keep_idx = torch.nonzero(keep).squeeze(1)
        if keep_idx.numel() > cfg.max_parents * b:
            keep_idx = keep_idx[torch.topk(coarse_logits.detach()[keep_idx], cfg.max_parents * b).indices]
        if keep_idx.numel() == 0:
            empty = torch.zeros((0, 4), dtype=torch.int32, device=fused.device)
            return ReconstructionOutput(
                column_logits, x.indices, coarse_logits, empty, fused.new_zeros(0), bev_features
            )
        parents = spconv.SparseConvTensor(x.features[keep_idx], x.indices[keep_idx], list(self.coarse_shape), b)
        fine = self.fine_net(self.up(parents))  # (Pf, ch) on the fine grid
        fine_logits = self.fine_logit(fine.features)[:, 0]
        return ReconstructionOutput(column_logits, x.indices, coarse_logits, fine.indices, fine_logits, bev_features)

    # ---------------------------------------------------------------------------------------- loss

    def _binary(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Focal loss over the positives or BCE mean, normalised over the whole batch (every
        process's, under DDP: the normaliser is reduced even where this process has no logits)."""
        target = target.to(logits.dtype)
        if self.config.occupancy_loss == "focal":
            normaliser = loss_normaliser(target.sum())
            if logits.numel() == 0:
                return logits.sum() * 0.0
            return sigmoid_focal_loss(logits, target).sum() / normaliser
        count = loss_normaliser(logits.new_tensor(float(logits.numel())))
        if logits.numel() == 0:
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / count

    def loss(
        self,
        output: ReconstructionOutput,
        occupancy: OccupancyTargets | None,
        holistic_bev: torch.Tensor | None,
    ) -> ReconstructionLoss:
        """Occupancy loss (columns + coarse + fine voxels) and BEV feature loss.

        Args:
            output: this head's forward output.
            occupancy: holistic occupancy (required with the occupancy target).
            holistic_bev: (B, C, H, W) encoder features of the holistic clouds, no gradient
                (required with the BEV target).
        """
        cfg = self.config
        zero = (output.bev_features if output.bev_features is not None else output.column_logits).sum() * 0.0
        occ = zero
        if cfg.occupancy:
            if occupancy is None:
                raise ValueError("the occupancy target needs OccupancyTargets")
            occ = self._binary(output.column_logits, occupancy.columns)
            occ = occ + self._binary(
                output.coarse_logits, torch.isin(_keys(output.coarse_coords_bzyx, self.coarse_shape), occupancy.coarse_keys)
            )
            occ = occ + self._binary(
                output.fine_logits, torch.isin(_keys(output.fine_coords_bzyx, self.fine_shape), occupancy.fine_keys)
            )
            occ = cfg.occupancy_weight * occ
        bev = zero
        if cfg.bev:
            if holistic_bev is None:
                raise ValueError("the BEV target needs the holistic BEV features")
            squared = F.mse_loss(output.bev_features, holistic_bev.detach(), reduction="sum")
            bev = cfg.bev_weight * (squared / loss_normaliser(squared.new_tensor(float(holistic_bev.numel()))))
        return ReconstructionLoss(occ, bev)
