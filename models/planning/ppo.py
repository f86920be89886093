"""The PPO update shared by MAPPO and IPPO (Schulman et al. 2017; Yu et al. 2022 for MAPPO).

Per minibatch, over the alive samples only (``mask``)::

    ratio       = exp(logp_new - logp_old)
    policy_loss = -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))
    entropy     = mean(H[pi])
    v_clipped   = v_old + clip(v_new - v_old, -eps_v, eps_v)
    value_loss  = mean(max(huber(v_new - R), huber(v_clipped - R)))

with values and returns in the value normaliser's units when it is on. Actor and critic have
their own optimisers; gradients are clipped by global norm per network. The actor minimises
``policy_loss - entropy_coef * entropy``, the critic ``value_coef * value_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.planning.buffer import RolloutBatch, RolloutBuffer
from models.planning.networks import Actor, Critic
from models.planning.value_norm import ValueNorm

__all__ = ["PPOConfig", "PPOStats", "policy_loss", "ppo_update", "value_loss"]


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (MAPPO's defaults where they apply)."""

    actor_lr: float = 5e-4
    """actor learning rate (Adam)"""
    critic_lr: float = 5e-4
    """critic learning rate (Adam)"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation"""
    clip: float = 0.2
    """policy ratio clipping epsilon"""
    value_clip: float = 0.2
    """value clipping around the collected values, in the critic's units"""
    entropy_coef: float = 0.01
    value_coef: float = 1.0
    huber_delta: float = 10.0
    """Huber loss threshold for the value loss (0: squared error)"""
    max_grad_norm: float = 10.0
    epochs: int = 5
    """passes over each rollout"""
    minibatches: int = 1
    """minibatches per pass"""
    chunk_length: int = 10
    """recurrent policies: length of the training sequences"""
    value_norm: bool = True
    normalize_advantages: bool = True
    lr_decay: bool = False
    """decay both learning rates linearly to 0 over the learner's ``total_steps`` (MAPPO's
    ``use_linear_lr_decay``), so that the last updates refine the policy instead of moving it"""

    def validate(self) -> None:
        problems = []
        for name in ("actor_lr", "critic_lr"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            problems.append("gamma and gae_lambda must be in [0, 1]")
        if self.clip <= 0 or self.value_clip <= 0:
            problems.append("clip and value_clip must be > 0")
        if self.epochs < 1 or self.minibatches < 1 or self.chunk_length < 1:
            problems.append("epochs, minibatches and chunk_length must be >= 1")
        if self.max_grad_norm <= 0 or self.huber_delta < 0:
            problems.append("max_grad_norm must be > 0 and huber_delta >= 0")
        if problems:
            raise ValueError("invalid PPOConfig: " + "; ".join(problems))


@dataclass
class PPOStats:
    """Means over the minibatches of one update."""

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    actor_grad_norm: float
    critic_grad_norm: float


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss (to minimise), clip fraction and approximate KL (old || new)."""
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages)
    loss = -_masked_mean(surrogate, mask)
    with torch.no_grad():
        clip_fraction = _masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
        approx_kl = _masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    if delta <= 0:
        return 0.5 * x**2
    return torch.where(x.abs() <= delta, 0.5 * x**2, delta * (x.abs() - 0.5 * delta))


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    huber_delta: float,
) -> torch.Tensor:
    """Clipped value loss (PPO2 / MAPPO), all arguments in the critic's units."""
    clipped = old_values + torch.clamp(new_values - old_values, -clip, clip)
    loss = torch.max(_huber(new_values - returns, huber_delta), _huber(clipped - returns, huber_delta))
    return _masked_mean(loss, mask)


def _evaluate(
    actor: Actor, critic: Critic, batch: RolloutBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New log-probabilities, entropies and values (critic units) of a batch, each (L, B)."""
    dist, _ = actor(batch.obs, batch.actor_hidden, batch.starts)
    values, _ = critic(batch.critic_obs, batch.critic_hidden, batch.starts)
    return dist.log_prob(batch.actions), dist.entropy(), values


def ppo_update(
    actor: Actor,
    critic: Critic,
    actor_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    config: PPOConfig,
    value_norm: ValueNorm | None,
    generator: torch.Generator,
) -> PPOStats:
    """``config.epochs`` passes of minibatch PPO over a rollout whose returns are computed.

    The value normaliser (if any) is updated with the rollout's returns first, then every
    target and old value is compared in its units.
    """
    if value_norm is not None:
        value_norm.update(buffer.returns[buffer.alive > 0])
    recurrent = buffer.actor_hidden is not None or buffer.critic_hidden is not None
    sums = dict.fromkeys(PPOStats.__dataclass_fields__, 0.0)
    count = 0
    for _ in range(config.epochs):
        for batch in buffer.minibatches(
            config.minibatches,
            generator,
            chunk_length=config.chunk_length if recurrent else None,
            normalize_advantages=config.normalize_advantages,
        ):
            new_logp, entropy, values = _evaluate(actor, critic, batch)
            p_loss, clip_fraction, approx_kl = policy_loss(
                new_logp, batch.old_logp, batch.advantages, batch.mask, config.clip
            )
            ent = _masked_mean(entropy, batch.mask)
            returns, old_values = batch.returns, batch.old_values
            if value_norm is not None:
                returns, old_values = value_norm.normalize(returns), value_norm.normalize(old_values)
            v_loss = value_loss(
                values, old_values, returns, batch.mask, config.value_clip, config.huber_delta
            )

            actor_optimizer.zero_grad()
            (p_loss - config.entropy_coef * ent).backward()
            actor_norm = nn.utils.clip_grad_norm_(actor.parameters(), config.max_grad_norm)
            actor_optimizer.step()
            critic_optimizer.zero_grad()
            (config.value_coef * v_loss).backward()
            critic_norm = nn.utils.clip_grad_norm_(critic.parameters(), config.max_grad_norm)
            critic_optimizer.step()

            for key, value in (
                ("policy_loss", p_loss),
                ("value_loss", v_loss),
                ("entropy", ent),
                ("approx_kl", approx_kl),
                ("clip_fraction", clip_fraction),
                ("actor_grad_norm", actor_norm),
                ("critic_grad_norm", critic_norm),
            ):
                sums[key] += float(value.detach())
            count += 1
    return PPOStats(**{k: v / max(count, 1) for k, v in sums.items()})
