"""Value normalisation (MAPPO's ``ValueNorm``): the critic predicts normalised returns.

Returns are normalised with the running mean and variance of every value target seen so far,
merged batch by batch with Chan et al.'s parallel update (exact: after any sequence of batches the
statistics equal those of all the data at once). The critic's output ``v`` means
``v * std + mean`` in reward units. MAPPO's reference implementation uses an exponential moving
average with a debiasing term instead; exact statistics are as cheap and are what the test checks.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ValueNorm"]


class ValueNorm(nn.Module):
    """Running mean / variance of value targets; a module so it travels in state dicts.

    Args:
        epsilon: floor on the variance used to normalise.
    """

    def __init__(self, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.epsilon = float(epsilon)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Merge a batch of value targets (any shape) into the statistics."""
        x = values.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean()
        batch_var = x.var(unbiased=False)
        if self.count == 0:
            self.mean.copy_(batch_mean)
            self.var.copy_(batch_var)
            self.count.fill_(n)
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean.add_(delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(torch.clamp(self.var, min=self.epsilon))

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """Reward units -> the critic's units."""
        return ((values.to(torch.float64) - self.mean) / self.std).to(values.dtype)

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        """The critic's units -> reward units."""
        return (values.to(torch.float64) * self.std + self.mean).to(values.dtype)
