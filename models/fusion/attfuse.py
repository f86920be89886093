"""AttFuse (OPV2V / OpenCOOD's ``AttFusion``): per-cell scaled dot-product attention across agents.

At every BEV cell the agents' feature vectors (the ego's own and the received ones, warped into
the ego frame) attend to each other; the ego's row of the attention output is the fused feature.
Like OpenCOOD's module it has no learned weights: queries, keys and values are the features
themselves. Agents whose warped map does not cover a cell, or whose message did not arrive, are
masked out there, so the result does not depend on the order of the other agents.

:class:`MaxFusion` is F-Cooper's maxout fusion (Chen et al., 2019; OpenCOOD's ``fcooper``), the
``fusion.combine: max`` alternative: the element-wise maximum over the agents that cover a cell.
Attention returns a convex mix of the agents' vectors, so where only a sender sees a vehicle its
features arrive diluted by the ego's (docs/results.md measures that); the maximum passes them on
at full strength.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AttentionFusion", "MaxFusion"]


class AttentionFusion(nn.Module):
    """(A, C, H, W) features of one sample (ego first) + (A, 1, H, W) validity -> (C, H, W)."""

    def weights(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(H*W, 1, A) attention of the ego's row over the agents at every cell (0 where masked)."""
        c = features.shape[1]
        x = features.flatten(2).permute(2, 0, 1)  # (HW, A, C)
        query = x[:, :1]  # (HW, 1, C): the ego's row
        scores = query @ x.transpose(1, 2) / math.sqrt(c)  # (HW, 1, A)
        mask = valid.flatten(2).permute(2, 1, 0).clone()  # (HW, 1, A)
        mask[..., 0] = True  # the ego always attends to itself
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        _, c, h, w = features.shape
        x = features.flatten(2).permute(2, 0, 1)  # (HW, A, C)
        fused = self.weights(features, valid) @ x  # (HW, 1, C)
        return fused[:, 0].T.reshape(c, h, w)


class MaxFusion(nn.Module):
    """(A, C, H, W) features of one sample (ego first) + (A, 1, H, W) validity -> (C, H, W): the
    element-wise maximum over the agents valid at each cell (the ego always is)."""

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = valid.clone()
        mask[0] = True
        return features.masked_fill(~mask, float("-inf")).amax(dim=0)
