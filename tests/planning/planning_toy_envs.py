"""A tiny cooperative PettingZoo ParallelEnv for MAPPO tests, unrelated to driving.

``ReachEnv``: agents on a line each have a target. Every step costs the team 0.1 per agent still
travelling; an agent that reaches its target gets 1.0 and leaves (so agents finish at different
times and the learner's masks matter). The episode is truncated after ``max_steps``. Each agent
observes its position, its target and the other agents' positions (scaled to about [-1, 1]).

Actions: ``Discrete(3)`` (left, stay, right: one unit) or ``Box(-1, 1, (1,))`` (move by the
action). A target is reached within 0.5 units.

Best return per agent: ``1.0 - 0.1 * (steps needed - 1)``; a uniformly random policy rarely gets
there within ``max_steps``.
"""

from __future__ import annotations

import functools

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv


class ReachEnv(ParallelEnv):
    metadata = {"name": "reach_v0", "render_modes": []}  # noqa: RUF012

    def __init__(
        self, num_agents: int = 2, continuous: bool = False, max_steps: int = 12, half_width: int = 4
    ):
        self.possible_agents = [f"agent_{i}" for i in range(num_agents)]
        self.agents: list[str] = []
        self.continuous = continuous
        self.max_steps = max_steps
        self.half_width = half_width
        self._rng = np.random.default_rng(0)
        self.state_space = spaces.Box(-2.0, 2.0, (2 * num_agents,), np.float32)

    @functools.cache  # noqa: B019
    def observation_space(self, agent):
        return spaces.Box(-2.0, 2.0, (2 + len(self.possible_agents),), np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent):
        if self.continuous:
            return spaces.Box(-1.0, 1.0, (1,), np.float32)
        return spaces.Discrete(3)

    def _obs(self, agent):
        i = self.possible_agents.index(agent)
        w = float(self.half_width)
        return np.concatenate([[self.pos[i] / w, self.target[i] / w], self.pos / w]).astype(np.float32)

    def state(self):
        w = float(self.half_width)
        return np.concatenate([self.pos / w, self.target / w]).astype(np.float32)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        n = len(self.possible_agents)
        self.pos = self._rng.integers(-self.half_width, self.half_width + 1, n).astype(np.float64)
        self.target = self._rng.integers(-self.half_width, self.half_width + 1, n).astype(np.float64)
        same = np.abs(self.pos - self.target) < 0.5
        self.target[same] = -self.target[same] + np.where(self.target[same] >= 0, -2, 2)
        self.t = 0
        self.agents = list(self.possible_agents)
        return {a: self._obs(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        rewards, term, trunc = {}, {}, {}
        for a in self.agents:
            i = self.possible_agents.index(a)
            if self.continuous:
                move = float(np.clip(np.asarray(actions[a]).reshape(-1)[0], -1.0, 1.0))
            else:
                move = float(int(actions[a]) - 1)
            self.pos[i] = np.clip(self.pos[i] + move, -self.half_width - 1, self.half_width + 1)
            reached = abs(self.pos[i] - self.target[i]) < 0.5
            rewards[a] = 1.0 if reached else -0.1
            term[a] = bool(reached)
            trunc[a] = bool(not reached and self.t >= self.max_steps)
        obs = {a: self._obs(a) for a in self.agents}
        infos = {a: {} for a in self.agents}
        self.agents = [a for a in self.agents if not (term[a] or trunc[a])]
        return obs, rewards, term, trunc, infos
