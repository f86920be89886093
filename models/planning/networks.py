"""Actor and critic networks of MAPPO / IPPO: an MLP trunk, an optional GRU, and a head.

Both networks take sequences ``(L, B, D)`` (L time steps of B agents; L = 1 when acting) so the
feed-forward and recurrent cases share one code path. With ``recurrent`` on, a GRU follows the
MLP; its hidden state ``(B, H)`` is carried between calls and zeroed where ``starts`` says an
episode begins (MAPPO's ``rnn_states * masks``).

The actor's head depends on the action space: logits of a ``Categorical`` for ``Discrete(n)``, or
the mean of a diagonal ``Normal`` with a learned, state-independent log standard deviation for
``Box`` (the env clips samples to its bounds). Weights are initialised orthogonally (gain
sqrt(2) in the trunk, 0.01 on the policy head, 1 on the value head), as in MAPPO and CleanRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

__all__ = ["Actor", "Critic", "NetworkConfig", "action_shape"]


@dataclass(frozen=True)
class NetworkConfig:
    """Sizes of the actor and critic (both use the same)."""

    hidden_sizes: tuple[int, ...] = (128, 128)
    """widths of the MLP layers"""
    activation: Literal["tanh", "relu"] = "tanh"
    layer_norm_input: bool = True
    """LayerNorm on the input features (MAPPO's feature normalisation)"""
    recurrent: bool = False
    """a GRU after the MLP (MAPPO's recurrent policy)"""
    rnn_hidden: int = 64
    init_log_std: float = -0.5
    """initial log standard deviation of Box actions"""

    def validate(self) -> None:
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")
        if self.rnn_hidden < 1:
            raise ValueError(f"rnn_hidden must be >= 1, got {self.rnn_hidden}")


def action_shape(space: spaces.Space) -> tuple[int, ...]:
    """Shape of one action tensor: () for Discrete, (A,) for a flat Box."""
    if isinstance(space, spaces.Discrete):
        return ()
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return space.shape
    raise ValueError(f"action spaces must be Discrete or a 1-D Box, got {space}")


def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class _Trunk(nn.Module):
    """MLP (+ GRU) over (L, B, D) inputs."""

    def __init__(self, in_dim: int, config: NetworkConfig) -> None:
        super().__init__()
        config.validate()
        act = nn.Tanh if config.activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if config.layer_norm_input else []
        width = in_dim
        for h in config.hidden_sizes:
            layers += [_init(nn.Linear(width, h), np.sqrt(2.0)), act()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.gru = nn.GRU(width, config.rnn_hidden) if config.recurrent else None
        self.out_dim = config.rnn_hidden if config.recurrent else width
        self.hidden_dim = config.rnn_hidden if config.recurrent else 0

    def forward(
        self, x: torch.Tensor, hidden: torch.Tensor | None, starts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (L, B, D); hidden: (B, H) before step 0; starts: (L, B) 1.0 where an episode begins.

        Returns features (L, B, F) and the hidden state after step L-1 (None without a GRU).
        """
        length, batch = x.shape[:2]
        feat = self.mlp(x.reshape(length * batch, -1)).reshape(length, batch, -1)  # (L, B, F)
        if self.gru is None:
            return feat, None
        if hidden is None:
            hidden = feat.new_zeros(batch, self.hidden_dim)
        if starts is None:
            starts = feat.new_zeros(length, batch)
        outputs = []
        h = hidden
        for t in range(length):  # step by step so that hidden states reset inside the sequence
            h = h * (1.0 - starts[t]).unsqueeze(-1)
            out, h_new = self.gru(feat[t : t + 1], h.unsqueeze(0).contiguous())  # (1, B, H)
            h = h_new.squeeze(0)
            outputs.append(out)
        return torch.cat(outputs, 0), h


class Actor(nn.Module):
    """Shared policy: observation (+ agent id) -> action distribution.

    Args:
        obs_dim: input features.
        action_space: Discrete or 1-D Box.
        config: sizes.
    """

    def __init__(self, obs_dim: int, action_space: spaces.Space, config: NetworkConfig) -> None:
        super().__init__()
        self.action_space = action_space
        self.trunk = _Trunk(obs_dim, config)
        self.discrete = isinstance(action_space, spaces.Discrete)
        action_shape(action_space)  # raises for unsupported spaces
        if self.discrete:
            self.head = _init(nn.Linear(self.trunk.out_dim, int(action_space.n)), 0.01)
            self.log_std = None
        else:
            dim = int(action_space.shape[0])
            self.head = _init(nn.Linear(self.trunk.out_dim, dim), 0.01)
            self.log_std = nn.Parameter(torch.full((dim,), float(config.init_log_std)))

    @property
    def hidden_dim(self) -> int:
        return self.trunk.hidden_dim

    def forward(
        self, obs: torch.Tensor, hidden: torch.Tensor | None = None, starts: torch.Tensor | None = None
    ) -> tuple[Distribution, torch.Tensor | None]:
        """obs (L, B, D) -> distribution over (L, B) actions, and the next hidden state (B, H)."""
        feat, hidden = self.trunk(obs, hidden, starts)
        out = self.head(feat)  # (L, B, n) logits or (L, B, A) means
        if self.discrete:
            return Categorical(logits=out), hidden
        std = torch.exp(self.log_std).expand_as(out)
        return Independent(Normal(out, std), 1), hidden

    @staticmethod
    def mode(dist: Distribution) -> torch.Tensor:
        """The most likely action of each distribution (for deterministic evaluation)."""
        if isinstance(dist, Categorical):
            return dist.probs.argmax(-1)
        return dist.mean


class Critic(nn.Module):
    """Value function: critic input -> V (in the value normaliser's units when it is used)."""

    def __init__(self, in_dim: int, config: NetworkConfig) -> None:
        super().__init__()
        self.trunk = _Trunk(in_dim, config)
        self.head = _init(nn.Linear(self.trunk.out_dim, 1), 1.0)

    @property
    def hidden_dim(self) -> int:
        return self.trunk.hidden_dim

    def forward(
        self, x: torch.Tensor, hidden: torch.Tensor | None = None, starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (L, B, D) -> values (L, B) and the next hidden state."""
        feat, hidden = self.trunk(x, hidden, starts)
        return self.head(feat).squeeze(-1), hidden
