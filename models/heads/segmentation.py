"""BEV semantic segmentation head: free / vehicle / road per BEV cell, and its targets.

Targets are made from the simulator's labels in the ego frame, on the head's BEV grid:

- **vehicle** (1): the cell centre lies inside a ground-truth box's footprint (tested with
  :func:`sim.box_ops.points_in_boxes` on flattened boxes, so only the footprint matters);
- **road** (2): otherwise, the cell holds at least one point whose semantic class is ROAD, from
  *any* agent of the sample (the holistic view, moved with the true poses);
- **free** (0): otherwise, the cell holds at least one point of another class (sidewalk, terrain,
  building, ...): observed and neither road nor vehicle;
- **ignored** (255): no agent's point falls in the cell and no box covers it: nothing observed.

Road therefore comes from the semantic ROAD points rather than from the road layout's raster, and
unobserved cells are left out of the loss and of the IoU rather than called free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.bev import BevGrid
from models.distributed import loss_normaliser
from sim.box_ops import points_in_boxes
from sim.types import Semantic

__all__ = [
    "IGNORE_INDEX",
    "SEGMENTATION_CLASSES",
    "BevSegmentationHead",
    "SegmentationHeadConfig",
    "bev_semantic_targets",
]

SEGMENTATION_CLASSES = ("free", "vehicle", "road")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegmentationHeadConfig:
    """Attributes:
    enabled: build and train the head.
    hidden_channels: width of its 3x3 convolution.
    loss_weight: weight of its cross-entropy.
    """

    enabled: bool = True
    hidden_channels: int = 32
    loss_weight: float = 1.0


class BevSegmentationHead(nn.Module):
    """(N, C, H, W) -> (N, 3, H, W) logits over :data:`SEGMENTATION_CLASSES`."""

    def __init__(self, config: SegmentationHeadConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, config.hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.hidden_channels, eps=1e-3, momentum=0.01),
            nn.ReLU(),
            nn.Conv2d(config.hidden_channels, len(SEGMENTATION_CLASSES), 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy over observed cells; (N, 3, H, W) logits, (N, H, W) int64 targets.

        The mean is over the whole batch's observed cells (every process's, under DDP)."""
        observed = loss_normaliser((targets != IGNORE_INDEX).sum().to(logits.dtype), minimum=0.0)
        if not bool(observed > 0):
            return logits.sum() * 0.0
        summed = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return self.config.loss_weight * (summed / observed)


def bev_semantic_targets(
    grid: BevGrid, points_ego: torch.Tensor, semantic: torch.Tensor, boxes_ego: torch.Tensor
) -> torch.Tensor:
    """Labels of one sample's BEV cells (see the module docstring).

    Args:
        grid: the head's BEV grid.
        points_ego: (P, >=2) every agent's points in the ego frame.
        semantic: (P,) uint8 semantic class of each point.
        boxes_ego: (M, 7) ground-truth boxes in the ego frame.

    Returns:
        (H, W) int64 labels in {0, 1, 2, 255}.
    """
    device = points_ego.device
    h, w = grid.shape
    labels = torch.full((h * w,), IGNORE_INDEX, dtype=torch.int64, device=device)
    row, col, inside = grid.cell_of(points_ego[:, :2])
    flat = (row * w + col)[inside]
    sem = semantic.to(device)[inside]
    observed = torch.zeros(h * w, dtype=torch.bool, device=device)
    observed[flat] = True
    road = torch.zeros(h * w, dtype=torch.bool, device=device)
    road[flat[sem == int(Semantic.ROAD)]] = True
    labels[observed] = 0
    labels[road] = 2
    if boxes_ego.shape[0] > 0:
        centres = grid.cell_centres(device).reshape(-1, 2)
        cells = torch.cat([centres, torch.zeros_like(centres[:, :1])], dim=1)  # (H*W, 3) at z = 0
        flat_boxes = boxes_ego.detach().to(torch.float32).clone()
        flat_boxes[:, 2] = -1.0  # footprint test only: every box spans z in [-1, 1]
        flat_boxes[:, 5] = 2.0
        vehicle = points_in_boxes(cells, flat_boxes).any(dim=1)
        labels[vehicle] = 1
    return labels.reshape(h, w)
