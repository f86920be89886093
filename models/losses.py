"""Loss functions shared by the heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_focal_loss", "smooth_l1"]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise binary focal loss (Lin et al., 2017), not reduced.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t`` the probability of the true class and
    ``alpha_t = alpha`` for positives, ``1 - alpha`` for negatives. Written here because the two
    usual implementations are out of reach: torchvision (``ops.sigmoid_focal_loss``) is not a
    dependency, and mmcv's ``sigmoid_focal_loss`` kernel exists only for CUDA.

    Args:
        logits: any shape.
        targets: same shape, values in [0, 1].
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * ce


def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth L1 of a difference: ``0.5 d^2 / beta`` below ``beta``, ``|d| - beta/2`` above."""
    d = diff.abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
