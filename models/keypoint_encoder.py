"""Point-feature encoder for compact keypoint messages (COOPERNAUT style), and its BEV decoder.

A sender summarises its scan as K keypoints with C features each (COOPERNAUT sends 128 x 128):

1. candidate points: those above ``min_z`` in the sensor frame (drops most ground returns) and
   inside the voxel grid's x-y range;
2. keypoints: farthest point sampling of K candidates (deterministic: starts from the candidate
   nearest the sensor);
3. features: for each keypoint its ``neighbours`` nearest candidates within ``radius_m`` (the
   keypoint itself fills the missing ones) pass through a shared MLP on (relative x, y, z,
   intensity), max-pooled, then a linear layer: PointNet++'s set abstraction.

The message is :class:`v2x.codecs.KeypointFeatures` (xyz in the sender's frame). The receiver moves
the keypoints into its frame, scatters their features into its BEV grid (max per cell) and turns
that sparse map into a C_feat-channel feature map with a 3x3 convolution
(:class:`KeypointBevDecoder`), which the fusion treats like any received BEV map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.bev import BevGrid, scatter_to_bev

__all__ = ["KeypointBevDecoder", "KeypointEncoder", "KeypointEncoderConfig", "farthest_point_sampling"]


@dataclass(frozen=True)
class KeypointEncoderConfig:
    """Attributes:
    num_keypoints: K keypoints per message.
    neighbours: points grouped around each keypoint.
    radius_m: grouping radius, metres.
    mlp_channels: widths of the shared per-point MLP.
    out_channels: C features per keypoint on the air.
    min_z: candidate points must be above this height in the sensor frame, metres.
    """

    num_keypoints: int = 128
    neighbours: int = 16
    radius_m: float = 2.0
    mlp_channels: tuple[int, ...] = (32, 64)
    out_channels: int = 32
    min_z: float = -1.6

    def __post_init__(self) -> None:
        if self.num_keypoints < 1 or self.neighbours < 1 or self.out_channels < 1 or not self.mlp_channels:
            raise ValueError("KeypointEncoderConfig: counts and channel widths must be >= 1")
        if not self.radius_m > 0:
            raise ValueError(f"radius_m must be > 0, got {self.radius_m}")


def farthest_point_sampling(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """(min(k, N),) int64 indices of farthest point sampling over (N, 3) points, starting from the
    point nearest the origin."""
    n = xyz.shape[0]
    k = min(k, n)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=xyz.device)
    chosen = torch.empty(k, dtype=torch.long, device=xyz.device)
    chosen[0] = torch.argmin((xyz * xyz).sum(dim=1))
    distance = torch.full((n,), float("inf"), device=xyz.device, dtype=xyz.dtype)
    for i in range(1, k):
        last = xyz[chosen[i - 1]]
        distance = torch.minimum(distance, ((xyz - last) ** 2).sum(dim=1))
        chosen[i] = torch.argmax(distance)
    return chosen


class KeypointEncoder(nn.Module):
    """(N, 4) points of one agent -> keypoints (K, 3) and features (K, out_channels)."""

    def __init__(self, config: KeypointEncoderConfig, grid: BevGrid) -> None:
        super().__init__()
        self.config = config
        self.grid = grid
        layers: list[nn.Module] = []
        c_in = 4
        for c in config.mlp_channels:
            layers += [nn.Linear(c_in, c), nn.ReLU()]
            c_in = c
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, config.out_channels)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        g = self.grid
        lx, ly = g.extent
        xyz = points[:, :3]
        keep = (
            (xyz[:, 2] > cfg.min_z)
            & (xyz[:, 0] >= g.x_min)
            & (xyz[:, 0] < g.x_min + lx)
            & (xyz[:, 1] >= g.y_min)
            & (xyz[:, 1] < g.y_min + ly)
        )
        candidates = points[keep]  # (M, 4)
        if candidates.shape[0] == 0:
            return points.new_zeros((0, 3)), points.new_zeros((0, cfg.out_channels))
        index = farthest_point_sampling(candidates[:, :3].detach(), cfg.num_keypoints)
        keypoints = candidates[index, :3]  # (K, 3)
        distance = torch.cdist(keypoints, candidates[:, :3])  # (K, M)
        k_nn = min(cfg.neighbours, candidates.shape[0])
        near_d, near_i = torch.topk(distance, k_nn, dim=1, largest=False)  # (K, k)
        # neighbours beyond the radius are replaced by the keypoint's own point (index[k])
        near_i = torch.where(near_d <= cfg.radius_m, near_i, index[:, None].expand_as(near_i))
        grouped = candidates[near_i]  # (K, k, 4)
        relative = torch.cat([grouped[..., :3] - keypoints[:, None], grouped[..., 3:]], dim=-1)
        features = self.mlp(relative).amax(dim=1)  # (K, C_mlp)
        return keypoints, self.out(features)  # (K, 3), (K, out_channels)


class KeypointBevDecoder(nn.Module):
    """Received keypoints (ego frame) -> (C_feat, H, W) map and (1, H, W) validity."""

    def __init__(self, keypoint_channels: int, out_channels: int, grid: BevGrid) -> None:
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(nn.Conv2d(keypoint_channels, out_channels, 3, padding=1), nn.ReLU())

    def forward(self, xyz_ego: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bev, count = scatter_to_bev(xyz_ego, features, self.grid, reduce="amax")  # (C_k, H, W), (H, W)
        occupied = (count > 0).to(bev.dtype)[None, None]
        valid = F.max_pool2d(occupied, 3, stride=1, padding=1)[0] > 0  # (1, H, W): the 3x3 reach
        return self.net(bev[None])[0] * valid, valid
