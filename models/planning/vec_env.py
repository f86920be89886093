"""Several PettingZoo ``ParallelEnv`` copies stepped together, as fixed-size arrays.

MAPPO needs tensors of shape (envs, agents, ...) while a ParallelEnv speaks in dicts over the
agents alive now. :class:`ParallelVecEnv` pads every env to its ``possible_agents`` (order kept),
with an ``alive`` mask, flattens observations with :func:`gymnasium.spaces.flatten`, and resets an
env as soon as all its agents are done (the returned observation is then the new episode's first,
and the finished episode's last observation and state are kept for bootstrapping truncations).

Envs are stepped one after the other in this process. Ray (the stack's tool for parallel
rollouts) is not installed here; a Ray-backed variant would keep this class's interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

__all__ = ["ParallelVecEnv", "VecStep"]


@dataclass
class VecStep:
    """One step of all envs.

    Attributes:
        obs: (E, N, D) float32 observations after the step (the new episode's first where an env
            was reset); zeros for agents that are not alive.
        state: (E, S) float32 global state after the step (same convention).
        alive: (E, N) bool, agents alive in ``obs``.
        rewards: (E, N) float32 rewards of the step (0 for agents that did not act).
        dones: (E, N) bool, the agent's episode ended with this step (terminated or truncated).
        truncated: (E, N) bool, ended by truncation (the value after it should be bootstrapped).
        final_obs: (E, N, D) the observation returned with a done (before any reset).
        final_state: (E, S) the state right after the step, before any reset.
        episodes: finished episodes: ``{"env": e, "returns": {agent: return}, "infos": {agent:
            info with "episode" stats if the env reports them}}``.
    """

    obs: np.ndarray
    state: np.ndarray
    alive: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    truncated: np.ndarray
    final_obs: np.ndarray
    final_state: np.ndarray
    episodes: list[dict[str, Any]] = field(default_factory=list)


class ParallelVecEnv:
    """E copies of a ParallelEnv whose agents share one observation and one action space.

    Args:
        env_fns: E callables, each building one env.
        seed: seeds the first reset of env e with ``seed + e``; later resets draw from each env's
            own generator (``reset()`` without a seed).
    """

    def __init__(self, env_fns: Sequence[Callable[[], ParallelEnv]], seed: int = 0) -> None:
        if not env_fns:
            raise ValueError("need at least one env")
        self.envs = [fn() for fn in env_fns]
        self.seed = int(seed)
        first = self.envs[0]
        self.agents = list(first.possible_agents)
        if not self.agents:
            raise ValueError("the env has no possible_agents")
        self.obs_space = first.observation_space(self.agents[0])
        self.action_space = first.action_space(self.agents[0])
        for env in self.envs:
            if list(env.possible_agents) != self.agents:
                raise ValueError("all envs must have the same possible_agents")
            for agent in self.agents:
                if (
                    env.observation_space(agent) != self.obs_space
                    or env.action_space(agent) != self.action_space
                ):
                    raise ValueError(
                        f"agent {agent!r}: a shared policy needs every agent to have the same observation "
                        f"and action spaces ({self.obs_space}, {self.action_space})"
                    )
        if not isinstance(self.action_space, spaces.Discrete | spaces.Box):
            raise ValueError(f"action spaces must be Discrete or Box, got {self.action_space}")
        self.obs_dim = int(spaces.flatdim(self.obs_space))
        self.num_envs, self.num_agents = len(self.envs), len(self.agents)
        self.has_state = self._probe_state(first)
        self.state_dim = (
            int(spaces.flatdim(first.state_space)) if self.has_state else self.num_agents * self.obs_dim
        )
        self._returns = [dict.fromkeys(self.agents, 0.0) for _ in self.envs]
        self._infos: list[dict[str, Any]] = [{} for _ in self.envs]
        self._obs = np.zeros((self.num_envs, self.num_agents, self.obs_dim), dtype=np.float32)
        self._alive = np.zeros((self.num_envs, self.num_agents), dtype=bool)

    @staticmethod
    def _probe_state(env: ParallelEnv) -> bool:
        """Whether the env offers a global state (``state_space`` and a working ``state()``)."""
        if getattr(env, "state_space", None) is None:
            return False
        try:
            env.reset(seed=0)
            env.state()
        except NotImplementedError:
            return False
        return True

    def _flat(self, obs: Any) -> np.ndarray:
        return spaces.flatten(self.obs_space, obs).astype(np.float32)

    def _pack(self, e: int, obs: dict) -> None:
        self._obs[e] = 0.0
        self._alive[e] = False
        live = set(self.envs[e].agents)
        for n, agent in enumerate(self.agents):
            if agent in live and agent in obs:
                self._obs[e, n] = self._flat(obs[agent])
                self._alive[e, n] = True

    def _state(self, e: int) -> np.ndarray:
        if self.has_state:
            return np.asarray(self.envs[e].state(), dtype=np.float32).reshape(-1)
        return self._obs[e].reshape(-1).copy()

    def _reset_env(self, e: int, seed: int | None) -> None:
        obs, _ = self.envs[e].reset(seed=seed)
        self._returns[e] = dict.fromkeys(self.agents, 0.0)
        self._infos[e] = {}
        self._pack(e, obs)

    def reset(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reset every env. Returns obs (E, N, D), state (E, S), alive (E, N)."""
        for e in range(self.num_envs):
            self._reset_env(e, self.seed + e)
        states = np.stack([self._state(e) for e in range(self.num_envs)])
        return self._obs.copy(), states, self._alive.copy()

    def step(self, actions: np.ndarray) -> VecStep:
        """Step every env with ``actions`` (E, N, ...); entries of dead agents are ignored."""
        E, N = self.num_envs, self.num_agents
        rewards = np.zeros((E, N), dtype=np.float32)
        dones = np.zeros((E, N), dtype=bool)
        truncated = np.zeros((E, N), dtype=bool)
        final_obs = np.zeros((E, N, self.obs_dim), dtype=np.float32)
        final_state = np.zeros((E, self.state_dim), dtype=np.float32)
        episodes = []
        states = np.zeros((E, self.state_dim), dtype=np.float32)
        discrete = isinstance(self.action_space, spaces.Discrete)
        for e, env in enumerate(self.envs):
            acting = list(env.agents)
            act = {}
            for agent in acting:
                a = actions[e, self.agents.index(agent)]
                act[agent] = int(a) if discrete else np.asarray(a, dtype=self.action_space.dtype)
            obs, rew, term, trunc, infos = env.step(act)
            for n, agent in enumerate(self.agents):
                if agent not in acting:
                    continue
                r = float(rew.get(agent, 0.0))
                rewards[e, n] = r
                self._returns[e][agent] += r
                t, u = bool(term.get(agent, False)), bool(trunc.get(agent, False))
                if t or u:
                    dones[e, n] = True
                    truncated[e, n] = u and not t
                    if agent in obs:
                        final_obs[e, n] = self._flat(obs[agent])
                    self._infos[e][agent] = infos.get(agent, {})
            self._pack(e, obs)
            final_state[e] = states[e] = self._state(e)
            if not env.agents:  # episode over: report it and start the next one
                episodes.append({"env": e, "returns": dict(self._returns[e]), "infos": dict(self._infos[e])})
                self._reset_env(e, None)
                states[e] = self._state(e)
        return VecStep(
            obs=self._obs.copy(),
            state=states,
            alive=self._alive.copy(),
            rewards=rewards,
            dones=dones,
            truncated=truncated,
            final_obs=final_obs,
            final_state=final_state,
            episodes=episodes,
        )

    def close(self) -> None:
        for env in self.envs:
            env.close()
