"""Rollout storage of MAPPO / IPPO and the typed minibatches the PPO update reads.

A rollout is T steps of E envs with N agent slots; every array is ``(T, E, N, ...)``. ``alive``
marks the slots that held an acting agent (the others are padding and never enter a loss);
``starts`` marks the steps where a recurrent hidden state was zeroed (a new episode for that
agent), and the hidden states stored at step t are the ones *before* step t.

Minibatches are :class:`RolloutBatch` with a leading time axis ``(L, B, ...)``: L = 1 and B
alive samples for feed-forward networks; for recurrent ones, B chunks of ``chunk_length``
consecutive steps of one agent, with the hidden state stored at each chunk's first step (MAPPO's
data chunks).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from models.planning.gae import compute_gae

__all__ = ["RolloutBatch", "RolloutBuffer"]


@dataclass
class RolloutBatch:
    """One minibatch; tensors are (L, B, ...) (L = 1 for feed-forward).

    Attributes:
        obs: (L, B, D) actor inputs.
        critic_obs: (L, B, C) critic inputs.
        actions: (L, B) long for Discrete, (L, B, A) float for Box.
        old_logp: (L, B) log-probabilities when collected.
        old_values: (L, B) values when collected, reward units.
        returns: (L, B) value targets, reward units.
        advantages: (L, B) (normalised when the buffer was asked to).
        mask: (L, B) 1.0 for real samples, 0.0 for padding.
        starts: (L, B) 1.0 where the recurrent state resets before the step.
        actor_hidden: (B, H) actor hidden state before the first step, or None.
        critic_hidden: (B, H) critic hidden state before the first step, or None.
    """

    obs: torch.Tensor
    critic_obs: torch.Tensor
    actions: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    starts: torch.Tensor
    actor_hidden: torch.Tensor | None
    critic_hidden: torch.Tensor | None


class RolloutBuffer:
    """Storage for one rollout.

    Args:
        steps, envs, agents: T, E, N.
        obs_dim, critic_dim: actor and critic input sizes.
        action_shape: () for Discrete, (A,) for Box.
        discrete: whether actions are integers.
        actor_hidden, critic_hidden: GRU sizes (0 without a GRU).
    """

    def __init__(
        self,
        steps: int,
        envs: int,
        agents: int,
        obs_dim: int,
        critic_dim: int,
        action_shape: tuple[int, ...],
        discrete: bool,
        actor_hidden: int = 0,
        critic_hidden: int = 0,
    ) -> None:
        if min(steps, envs, agents, obs_dim, critic_dim) < 1:
            raise ValueError("steps, envs, agents, obs_dim and critic_dim must be >= 1")
        t, e, n = steps, envs, agents
        self.steps, self.envs, self.agents = t, e, n
        self.obs = torch.zeros(t, e, n, obs_dim)
        self.critic_obs = torch.zeros(t, e, n, critic_dim)
        self.actions = torch.zeros((t, e, n, *action_shape), dtype=torch.long if discrete else torch.float32)
        self.logp = torch.zeros(t, e, n)
        self.values = torch.zeros(t, e, n)
        self.rewards = torch.zeros(t, e, n)
        self.dones = torch.zeros(t, e, n)
        self.alive = torch.zeros(t, e, n)
        self.starts = torch.zeros(t, e, n)
        self.actor_hidden = torch.zeros(t, e, n, actor_hidden) if actor_hidden else None
        self.critic_hidden = torch.zeros(t, e, n, critic_hidden) if critic_hidden else None
        self.advantages = torch.zeros(t, e, n)
        self.returns = torch.zeros(t, e, n)

    def insert(
        self,
        t: int,
        *,
        obs: torch.Tensor,
        critic_obs: torch.Tensor,
        actions: torch.Tensor,
        logp: torch.Tensor,
        values: torch.Tensor,
        rewards: torch.Tensor,
        dones: torch.Tensor,
        alive: torch.Tensor,
        starts: torch.Tensor,
        actor_hidden: torch.Tensor | None = None,
        critic_hidden: torch.Tensor | None = None,
    ) -> None:
        """Store step t; every tensor is (E, N, ...)."""
        self.obs[t] = obs
        self.critic_obs[t] = critic_obs
        self.actions[t] = actions
        self.logp[t] = logp
        self.values[t] = values
        self.rewards[t] = rewards
        self.dones[t] = dones
        self.alive[t] = alive
        self.starts[t] = starts
        if self.actor_hidden is not None and actor_hidden is not None:
            self.actor_hidden[t] = actor_hidden
        if self.critic_hidden is not None and critic_hidden is not None:
            self.critic_hidden[t] = critic_hidden

    def compute_returns(self, next_value: torch.Tensor, gamma: float, gae_lambda: float) -> None:
        """Fill ``advantages`` and ``returns`` with GAE; ``next_value`` (E, N), reward units."""
        self.advantages, self.returns = compute_gae(
            self.rewards, self.values, self.dones, next_value, gamma, gae_lambda
        )

    def minibatches(
        self,
        num_minibatches: int,
        generator: torch.Generator,
        chunk_length: int | None = None,
        normalize_advantages: bool = True,
    ) -> Iterator[RolloutBatch]:
        """Shuffled minibatches covering the rollout once.

        Args:
            num_minibatches: how many batches to split it into.
            generator: the shuffling randomness.
            chunk_length: None for feed-forward (alive samples only); else the length of the
                sequence chunks (must divide T).
            normalize_advantages: standardise advantages over the rollout's alive samples.
        """
        adv = self.advantages
        alive = self.alive > 0
        if normalize_advantages and alive.any():
            a = adv[alive]
            adv = (adv - a.mean()) / (a.std(unbiased=False) + 1e-8)
        if chunk_length is None:
            index = torch.nonzero(alive.reshape(-1)).squeeze(-1)
            order = index[torch.randperm(len(index), generator=generator)]
            for part in torch.chunk(order, max(min(num_minibatches, len(order)), 1)):
                yield self._gather_flat(part, adv)
            return
        if self.steps % chunk_length != 0:
            raise ValueError(f"chunk_length {chunk_length} must divide the rollout length {self.steps}")
        chunks = self.steps // chunk_length
        total = chunks * self.envs * self.agents
        order = torch.randperm(total, generator=generator)
        for part in torch.chunk(order, max(min(num_minibatches, total), 1)):
            yield self._gather_chunks(part, chunk_length, adv)

    def _gather_flat(self, index: torch.Tensor, adv: torch.Tensor) -> RolloutBatch:
        def take(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, *x.shape[3:])[index].unsqueeze(0)

        return RolloutBatch(
            obs=take(self.obs),
            critic_obs=take(self.critic_obs),
            actions=take(self.actions),
            old_logp=take(self.logp),
            old_values=take(self.values),
            returns=take(self.returns),
            advantages=take(adv),
            mask=take(self.alive),
            starts=take(self.starts),
            actor_hidden=None,
            critic_hidden=None,
        )

    def _gather_chunks(self, index: torch.Tensor, length: int, adv: torch.Tensor) -> RolloutBatch:
        """Chunks numbered c = (chunk * E + e) * N + n -> (L, B, ...) tensors."""
        en = self.envs * self.agents
        chunk, slot = index // en, index % en
        times = chunk[None, :] * length + torch.arange(length)[:, None]  # (L, B)

        def take(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(self.steps, en, *x.shape[3:])
            return flat[times, slot[None, :]]

        def first(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.reshape(self.steps, en, -1)[chunk * length, slot]

        return RolloutBatch(
            obs=take(self.obs),
            critic_obs=take(self.critic_obs),
            actions=take(self.actions),
            old_logp=take(self.logp),
            old_values=take(self.values),
            returns=take(self.returns),
            advantages=take(adv),
            mask=take(self.alive),
            starts=take(self.starts),
            actor_hidden=first(self.actor_hidden),
            critic_hidden=first(self.critic_hidden),
        )
