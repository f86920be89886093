"""MAPPO and IPPO on any PettingZoo ``ParallelEnv`` with Box observations and Discrete or Box actions.

One shared actor for all agents (parameter sharing; the agent's one-hot id can be appended to its
observation) and one critic:

- ``mappo``: a centralised critic on the global state: the env's ``state()`` when it has one,
  else all agents' observations concatenated, followed by the agent's own observation and one-hot
  id (MAPPO's agent-specific global state);
- ``ippo``: a decentralised critic on the agent's own observation (and id).

A training iteration collects ``rollout_steps`` steps of every env of a
:class:`models.planning.vec_env.ParallelVecEnv`, computes GAE (bootstrapping truncated episodes
with the value of their last state: ``r += gamma * V(s_final)``, unless ``bootstrap_truncated``
is off), and runs :func:`models.planning.ppo.ppo_update`. Agents that are done are masked out of
everything.

Whether to bootstrap at a time limit depends on the task (Pardo et al. 2018, "Time Limits in
Reinforcement Learning"): when the limit only cuts an ongoing task short, the episode would have
gone on and the value of the last state is the right estimate of what follows; when the limit is
part of the task (running out of time is a failure, and the observation carries the time left),
nothing follows it, and bootstrapping credits an agent that dawdles until the clock runs out with
the value of a future it never has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from models.planning.buffer import RolloutBuffer
from models.planning.networks import Actor, Critic, NetworkConfig, action_shape
from models.planning.ppo import PPOConfig, PPOStats, ppo_update
from models.planning.value_norm import ValueNorm
from models.planning.vec_env import ParallelVecEnv

__all__ = ["IterationStats", "MAPPOConfig", "MAPPOTrainer"]


@dataclass(frozen=True)
class MAPPOConfig:
    """The learner: algorithm, rollout sizes, networks and PPO settings."""

    algorithm: Literal["mappo", "ippo"] = "mappo"
    """centralised (mappo) or decentralised (ippo) critic"""
    num_envs: int = 4
    """envs stepped together"""
    rollout_steps: int = 64
    """steps per env per iteration"""
    total_steps: int = 200_000
    """env steps (summed over envs) to train for"""
    agent_id_in_obs: bool = True
    """append the agent's one-hot id to actor and critic inputs"""
    bootstrap_truncated: bool = True
    """add gamma x V(last state) to the reward of a truncated episode's last step; turn off when
    the time limit is part of the task (see the module docstring)"""
    seed: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def validate(self) -> None:
        if self.algorithm not in ("mappo", "ippo"):
            raise ValueError(f"algorithm must be 'mappo' or 'ippo', got {self.algorithm!r}")
        if self.num_envs < 1 or self.rollout_steps < 1 or self.total_steps < 1:
            raise ValueError("num_envs, rollout_steps and total_steps must be >= 1")
        self.network.validate()
        self.ppo.validate()
        if self.network.recurrent and self.rollout_steps % self.ppo.chunk_length != 0:
            raise ValueError(
                f"ppo.chunk_length ({self.ppo.chunk_length}) must divide rollout_steps ({self.rollout_steps})"
            )


@dataclass
class IterationStats:
    """What one iteration did."""

    iteration: int
    env_steps: int
    ppo: PPOStats
    episodes: list[dict[str, Any]]
    """finished episodes (see :class:`models.planning.vec_env.VecStep`)"""
    steps_per_second: float

    @property
    def mean_return(self) -> float | None:
        """Mean over finished episodes of the agents' summed return, or None if none finished."""
        if not self.episodes:
            return None
        return float(np.mean([sum(ep["returns"].values()) for ep in self.episodes]))


class MAPPOTrainer:
    """Collects rollouts and updates a shared actor and a (centralised or own-observation) critic.

    Args:
        env_fns: one callable per env copy.
        config: the learner's settings.
    """

    def __init__(self, env_fns: Sequence[Callable[[], ParallelEnv]], config: MAPPOConfig) -> None:
        config.validate()
        if len(env_fns) != config.num_envs:
            raise ValueError(f"got {len(env_fns)} env builders for num_envs={config.num_envs}")
        self.config = config
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.envs = ParallelVecEnv(env_fns, seed=config.seed)
        if not isinstance(self.envs.obs_space, spaces.Box):
            raise ValueError(f"observations must be a Box, got {self.envs.obs_space}")
        n, d = self.envs.num_agents, self.envs.obs_dim
        self.id_dim = n if config.agent_id_in_obs else 0
        self.actor_dim = d + self.id_dim
        if config.algorithm == "mappo":
            self.critic_dim = self.envs.state_dim + d + self.id_dim
        else:
            self.critic_dim = d + self.id_dim
        self.actor = Actor(self.actor_dim, self.envs.action_space, config.network)
        self.critic = Critic(self.critic_dim, config.network)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.ppo.actor_lr, eps=1e-5)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.ppo.critic_lr, eps=1e-5)
        self.value_norm = ValueNorm() if config.ppo.value_norm else None
        self.discrete = isinstance(self.envs.action_space, spaces.Discrete)
        self.iteration = 0
        self.env_steps = 0
        obs, state, alive = self.envs.reset()
        self._obs, self._state, self._alive = obs, state, alive
        e = self.envs.num_envs
        self._actor_h = torch.zeros(e, n, self.actor.hidden_dim) if self.actor.hidden_dim else None
        self._critic_h = torch.zeros(e, n, self.critic.hidden_dim) if self.critic.hidden_dim else None
        self._starts = np.ones((e, n), dtype=np.float32)

    # ------------------------------------------------------------------------------------ inputs

    def _ids(self, e: int) -> np.ndarray:
        """(E, N, N) one-hot agent ids."""
        n = self.envs.num_agents
        return np.broadcast_to(np.eye(n, dtype=np.float32), (e, n, n))

    def actor_input(self, obs: np.ndarray) -> torch.Tensor:
        """(E, N, D) observations -> (E, N, actor_dim) actor inputs."""
        if self.id_dim:
            obs = np.concatenate([obs, self._ids(len(obs))], axis=-1)
        return torch.as_tensor(obs, dtype=torch.float32)

    def critic_input(self, obs: np.ndarray, state: np.ndarray) -> torch.Tensor:
        """(E, N, D) observations and (E, S) states -> (E, N, critic_dim) critic inputs."""
        parts = []
        if self.config.algorithm == "mappo":
            parts.append(np.broadcast_to(state[:, None, :], (*obs.shape[:2], state.shape[-1])))
        parts.append(obs)
        if self.id_dim:
            parts.append(self._ids(len(obs)))
        return torch.as_tensor(np.concatenate(parts, axis=-1), dtype=torch.float32)

    def _values(self, critic_in: torch.Tensor, hidden: torch.Tensor | None, starts: np.ndarray) -> tuple:
        """(E, N) values in reward units and the critic's next hidden state."""
        e, n = critic_in.shape[:2]
        h = hidden.reshape(e * n, -1) if hidden is not None else None
        s = torch.as_tensor(starts, dtype=torch.float32).reshape(1, e * n)
        v, h_next = self.critic(critic_in.reshape(1, e * n, -1), h, s)
        v = v.reshape(e, n)
        if self.value_norm is not None:
            v = self.value_norm.denormalize(v)
        return v, (h_next.reshape(e, n, -1) if h_next is not None else None)

    # ----------------------------------------------------------------------------- training

    @torch.no_grad()
    def collect(self) -> tuple[RolloutBuffer, list[dict[str, Any]]]:
        """One rollout of ``rollout_steps`` steps in every env."""
        cfg = self.config
        envs = self.envs
        e, n = envs.num_envs, envs.num_agents
        buffer = RolloutBuffer(
            cfg.rollout_steps,
            e,
            n,
            self.actor_dim,
            self.critic_dim,
            action_shape(envs.action_space),
            self.discrete,
            self.actor.hidden_dim,
            self.critic.hidden_dim,
        )
        episodes: list[dict[str, Any]] = []
        for t in range(cfg.rollout_steps):
            actor_in = self.actor_input(self._obs)
            critic_in = self.critic_input(self._obs, self._state)
            starts = torch.as_tensor(self._starts)
            h = self._actor_h.reshape(e * n, -1) if self._actor_h is not None else None
            dist, h_next = self.actor(actor_in.reshape(1, e * n, -1), h, starts.reshape(1, e * n))
            actions = dist.sample()  # (1, E*N, ...)
            logp = dist.log_prob(actions).reshape(e, n)
            actions = actions.reshape(e, n, *action_shape(envs.action_space))
            values, c_next = self._values(critic_in, self._critic_h, self._starts)
            step = envs.step(actions.numpy())
            rewards = torch.as_tensor(step.rewards)
            if cfg.bootstrap_truncated and step.truncated.any():  # bootstrap: r += gamma * V(final state)
                final_in = self.critic_input(step.final_obs, step.final_state)
                final_v, _ = self._values(final_in, c_next, np.zeros((e, n), dtype=np.float32))
                rewards = rewards + cfg.ppo.gamma * final_v * torch.as_tensor(
                    step.truncated, dtype=torch.float32
                )
            alive = torch.as_tensor(self._alive, dtype=torch.float32)
            buffer.insert(
                t,
                obs=actor_in,
                critic_obs=critic_in,
                actions=actions,
                logp=logp * alive,
                values=values * alive,
                rewards=rewards * alive,
                dones=torch.as_tensor(step.dones | ~self._alive, dtype=torch.float32),
                alive=alive,
                starts=starts,
                actor_hidden=self._actor_h,
                critic_hidden=self._critic_h,
            )
            # hidden states restart for agents that are not alive now or whose episode just ended
            self._starts = ((~step.alive) | step.dones).astype(np.float32)
            keep = torch.as_tensor(1.0 - self._starts).unsqueeze(-1)
            if h_next is not None:
                self._actor_h = h_next.reshape(e, n, -1) * keep
            if c_next is not None:
                self._critic_h = c_next * keep
            self._obs, self._state, self._alive = step.obs, step.state, step.alive
            episodes.extend(step.episodes)
        next_values, _ = self._values(self.critic_input(self._obs, self._state), self._critic_h, self._starts)
        next_values = next_values * torch.as_tensor(self._alive, dtype=torch.float32)
        buffer.compute_returns(next_values, cfg.ppo.gamma, cfg.ppo.gae_lambda)
        self.env_steps += cfg.rollout_steps * e
        return buffer, episodes

    def learning_rate_scale(self) -> float:
        """Factor on the configured learning rates for the update of the current rollout: 1 without
        ``ppo.lr_decay``; with it, ``1 - (env steps before this rollout) / total_steps`` (MAPPO's
        linear schedule, per iteration), so the first update uses the full rates. A function of
        the counters alone, so a resumed run continues the same schedule."""
        if not self.config.ppo.lr_decay:
            return 1.0
        steps_per_iteration = self.config.rollout_steps * self.envs.num_envs
        before = max(self.env_steps - steps_per_iteration, 0)
        return max(1.0 - before / self.config.total_steps, 0.0)

    def update(self, buffer: RolloutBuffer) -> PPOStats:
        scale = self.learning_rate_scale()
        for optimizer, base in (
            (self.actor_optimizer, self.config.ppo.actor_lr),
            (self.critic_optimizer, self.config.ppo.critic_lr),
        ):
            for group in optimizer.param_groups:
                group["lr"] = base * scale
        return ppo_update(
            self.actor,
            self.critic,
            self.actor_optimizer,
            self.critic_optimizer,
            buffer,
            self.config.ppo,
            self.value_norm,
            self.generator,
        )

    def train_iteration(self) -> IterationStats:
        """Collect one rollout and update on it."""
        t0 = time.perf_counter()
        buffer, episodes = self.collect()
        stats = self.update(buffer)
        self.iteration += 1
        steps = self.config.rollout_steps * self.envs.num_envs
        return IterationStats(
            self.iteration, self.env_steps, stats, episodes, steps / (time.perf_counter() - t0)
        )

    @property
    def done(self) -> bool:
        return self.env_steps >= self.config.total_steps

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: networks, optimisers, value normaliser, counters, RNG."""
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "value_norm": self.value_norm.state_dict() if self.value_norm is not None else None,
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if self.value_norm is not None and state.get("value_norm") is not None:
            self.value_norm.load_state_dict(state["value_norm"])
        self.iteration = int(state["iteration"])
        self.env_steps = int(state["env_steps"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    def close(self) -> None:
        self.envs.close()
