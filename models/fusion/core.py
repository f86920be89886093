"""CORE's attentive collaboration: confidence maps, requests, attention-weighted aggregation.

1. Every agent computes a **confidence map** (H, W) in its own frame: the highest anchor
   probability of the shared detection head on its own features.
2. The ego's **request** is ``1 - ego confidence``: where it is not sure, it asks. It goes out as a
   request map (cells whose request exceeds ``request_threshold``) through the V2X link.
3. A sender scores its cells by its confidence times the request warped into its frame, and the
   compressor sends the best ones (:mod:`models.compressor`, ``selection="request"``).
4. The ego **aggregates**: per cell, a small network scores each agent's (warped) features together
   with its confidence; a softmax over the agents that have data at that cell (the ego always has)
   gives the weights of a weighted sum.

The aggregation is invariant to the order of the other agents (a masked softmax over a set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentiveAggregation", "CoreConfig"]


@dataclass(frozen=True)
class CoreConfig:
    """Attributes:
    request_threshold: the ego requests cells whose ``1 - confidence`` is above this.
    hidden_channels: width of the per-agent scoring network.
    """

    request_threshold: float = 0.5
    hidden_channels: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.request_threshold < 1.0:
            raise ValueError(f"request_threshold must be in [0, 1), got {self.request_threshold}")


class AttentiveAggregation(nn.Module):
    """(A, C, H, W) features + (A, 1, H, W) confidence + (A, 1, H, W) validity -> (C, H, W)."""

    def __init__(self, config: CoreConfig, channels: int) -> None:
        super().__init__()
        self.config = config
        self.score = nn.Sequential(
            nn.Conv2d(channels + 1, config.hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(config.hidden_channels, 1, 1),
        )

    def forward(self, features: torch.Tensor, confidence: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self.score(torch.cat([features, confidence], dim=1))  # (A, 1, H, W)
        mask = valid.clone()
        mask[0] = True
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=0)  # (A, 1, H, W)
        return (weights * features).sum(dim=0)  # (C, H, W)
