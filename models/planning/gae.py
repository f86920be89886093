"""Generalised advantage estimation (Schulman et al., 2016), with episode ends and padding.

For one sequence of steps ``t = 0 .. T-1`` of one agent::

    delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
    R_t     = A_t + V_t        (the value target)

``done_t`` is 1 when the agent's episode ended with step t (terminated or truncated; a
truncation's bootstrap value is folded into ``r_t`` by the caller), so nothing after it leaks into
its advantage. Steps where the agent did not exist (after its end, before the env reset) are
padding: they carry zeros, are cut off by the ``done`` before them, and are masked out of the
losses by the caller.
"""

from __future__ import annotations

import torch

__all__ = ["compute_gae"]


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns over a rollout.

    Args:
        rewards: (T, ...) reward of each step.
        values: (T, ...) V(s_t), in reward units (denormalised).
        dones: (T, ...) 1.0 where the episode ended with that step, else 0.0.
        next_value: (...) V(s_T) of the state after the last step.
        gamma: discount; gae_lambda: the GAE lambda.

    Returns:
        advantages (T, ...) and returns (T, ...) = advantages + values.
    """
    if rewards.shape != values.shape or rewards.shape != dones.shape:
        raise ValueError(f"rewards {rewards.shape}, values {values.shape}, dones {dones.shape} must agree")
    if next_value.shape != rewards.shape[1:]:
        raise ValueError(f"next_value must be {tuple(rewards.shape[1:])}, got {tuple(next_value.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= gae_lambda <= 1.0):
        raise ValueError(f"gamma and gae_lambda must be in [0, 1], got {gamma}, {gae_lambda}")
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        following = next_value if t == steps - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * not_done - values[t]
        last = delta + gamma * gae_lambda * not_done * last
        advantages[t] = last
    return advantages, advantages + values
