"""A planner experiment: the config that ties the driving env to MAPPO, checkpoints, evaluation.

``tools/train_planner.py`` and ``tools/eval_closed_loop.py`` stay thin on top of this:

- :class:`PlannerConfig` = ``env`` (:class:`sim.env.EnvConfig`) + ``learner``
  (:class:`models.planning.mappo.MAPPOConfig`) + ``curriculum`` (:class:`CurriculumConfig`) +
  ``run`` (:class:`RunConfig`), read from YAML with :func:`models.config.load_config`;
- :func:`save_checkpoint` / :func:`load_checkpoint`: one ``torch.save`` file written atomically
  (temporary file + ``os.replace``) holding the trainer state and the resolved config;
- :class:`Policy`: the trained actor acting on env observation dicts (deterministic or sampled,
  recurrent state carried per agent);
- :func:`run_episode` and :func:`summarize`: closed-loop evaluation and its metrics;
- :class:`EvalChunk` and :func:`evaluate_chunk`: consecutive evaluation episodes of one scenario
  as a self-contained job (checkpoint path in, results out) for ``sim.workers.run_jobs``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from scipy.stats import binomtest

from datasets.io import atomic_path
from models.config import from_dict, to_dict
from models.planning.mappo import MAPPOConfig, MAPPOTrainer
from models.planning.networks import Actor
from sim.env import EVAL_SEED_OFFSET, CoopDrivingEnv, EnvConfig

__all__ = [
    "CHECKPOINT_VERSION",
    "CurriculumConfig",
    "EpisodeResult",
    "EvalChunk",
    "PlannerConfig",
    "Policy",
    "RunConfig",
    "aggregate_over_seeds",
    "apply_curriculum",
    "bev_snapshot",
    "env_config_for_eval",
    "eval_seeds",
    "evaluate_chunk",
    "load_checkpoint",
    "make_env_fns",
    "run_episode",
    "save_checkpoint",
    "summarize",
]

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """Where and how often a training run writes."""

    out_dir: str = "outputs/planner/run"
    """checkpoints, the resolved config and tensorboard logs go here"""
    checkpoint_every: int = 10
    """iterations between checkpoints (and one at the end)"""
    log_every: int = 1
    """iterations between tensorboard points"""


@dataclass(frozen=True)
class CurriculumConfig:
    """A training curriculum on the time limit: episodes start with a looser limit, which shrinks
    linearly to the task's own over the first ``anneal_steps`` env steps.

    With the occlusion scenarios' tight limits a policy that does not yet drive near full speed
    almost never reaches the goal in time, so it learns little about reaching it; a looser limit
    first lets it learn to reach the goal without colliding, the annealing then teaches it to do so
    in time. Evaluation always uses the task's limit.
    """

    time_limit_scale: float = 1.0
    """time limit at the start of training, as a multiple of the task's (>= 1; 1: no curriculum)"""
    anneal_steps: int = 0
    """env steps over which the scale falls linearly to 1"""

    def validate(self) -> None:
        if self.time_limit_scale < 1.0:
            raise ValueError(f"curriculum.time_limit_scale must be >= 1, got {self.time_limit_scale}")
        if self.anneal_steps < 0:
            raise ValueError(f"curriculum.anneal_steps must be >= 0, got {self.anneal_steps}")

    def time_limit_scale_at(self, env_steps: int) -> float:
        """The time limit's multiple after ``env_steps`` env steps of training."""
        if self.anneal_steps == 0 or env_steps >= self.anneal_steps:
            return 1.0
        return self.time_limit_scale + (1.0 - self.time_limit_scale) * env_steps / self.anneal_steps


@dataclass(frozen=True)
class PlannerConfig:
    """A whole planner experiment."""

    env: EnvConfig = field(default_factory=EnvConfig)
    learner: MAPPOConfig = field(default_factory=MAPPOConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        self.env.validate()
        self.learner.validate()
        self.curriculum.validate()
        if self.curriculum.anneal_steps > self.learner.total_steps:
            raise ValueError(
                f"curriculum.anneal_steps ({self.curriculum.anneal_steps}) > learner.total_steps "
                f"({self.learner.total_steps}): training would end before the time limit is the task's"
            )


def apply_curriculum(trainer: MAPPOTrainer, config: PlannerConfig) -> float:
    """Set the time limit of every training env for the next episodes from the curriculum at
    ``trainer.env_steps``; returns the scale applied."""
    scale = config.curriculum.time_limit_scale_at(trainer.env_steps)
    episode_s = config.env.task().episode_s * scale
    for env in trainer.envs.envs:
        env.set_time_limit(episode_s)
    return scale


def make_env_fns(env_config: EnvConfig, num_envs: int, seed: int) -> list[Callable[[], CoopDrivingEnv]]:
    """``num_envs`` builders of the driving env (env e's generator seeded with ``seed * 1000 + e``;
    :class:`models.planning.vec_env.ParallelVecEnv` reseeds it at its first reset)."""
    return [
        (lambda e=e: CoopDrivingEnv(env_config, seed=seed * 1000 + e))  # bind e now
        for e in range(num_envs)
    ]


def save_checkpoint(path: str | Path, trainer: MAPPOTrainer, config: PlannerConfig) -> Path:
    """Write trainer state and config to ``path`` atomically; returns ``path``."""
    path = Path(path)
    payload = {
        "version": CHECKPOINT_VERSION,
        "config": to_dict(config),
        "trainer": trainer.state_dict(),
        "actor_dim": trainer.actor_dim,
        "num_agents": trainer.envs.num_agents,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], PlannerConfig]:
    """The checkpoint dict and its :class:`PlannerConfig`; ``ValueError`` for foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a planner checkpoint (version {CHECKPOINT_VERSION})")
    return payload, from_dict(PlannerConfig, payload["config"])


class Policy:
    """The trained shared actor, acting on one env's observation dict.

    Args:
        checkpoint: a dict from :func:`load_checkpoint`.
        config: its config.
        action_space: the env's (shared) action space.
        possible_agents: the env's agents, in the order the ids were one-hot encoded.
        deterministic: act with the most likely action instead of sampling.
    """

    def __init__(
        self,
        checkpoint: dict[str, Any],
        config: PlannerConfig,
        action_space: spaces.Space,
        possible_agents: list[str],
        deterministic: bool = True,
    ) -> None:
        self.config = config
        self.actor = Actor(int(checkpoint["actor_dim"]), action_space, config.learner.network)
        self.actor.load_state_dict(checkpoint["trainer"]["actor"])
        self.actor.eval()
        self.agents = list(possible_agents)
        if len(self.agents) != int(checkpoint["num_agents"]):
            raise ValueError(
                f"the checkpoint was trained with {checkpoint['num_agents']} agents, "
                f"the env has {len(self.agents)}"
            )
        self.deterministic = deterministic
        self.discrete = isinstance(action_space, spaces.Discrete)
        self._hidden: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget recurrent states (call at every episode start)."""
        self._hidden = {}

    @torch.no_grad()
    def act(
        self, observations: dict[str, np.ndarray], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Actions for the agents in ``observations``; a stochastic policy samples from ``generator``
        (the global torch generator if None)."""
        names = list(observations)
        if not names:
            return {}
        rows = []
        for a in names:
            obs = np.asarray(observations[a], dtype=np.float32).reshape(-1)
            if self.config.learner.agent_id_in_obs:
                one_hot = np.zeros(len(self.agents), dtype=np.float32)
                one_hot[self.agents.index(a)] = 1.0
                obs = np.concatenate([obs, one_hot])
            rows.append(obs)
        x = torch.as_tensor(np.stack(rows)).unsqueeze(0)  # (1, B, D)
        hidden = None
        if self.actor.hidden_dim:
            hidden = torch.stack([self._hidden.get(a, torch.zeros(self.actor.hidden_dim)) for a in names])
        dist, h_next = self.actor(x, hidden)
        if self.deterministic:
            actions = Actor.mode(dist)
        elif generator is not None and self.discrete:
            actions = torch.multinomial(dist.probs.reshape(len(names), -1), 1, generator=generator).reshape(
                1, -1
            )
        elif generator is not None:  # diagonal Normal: mean + std * noise from the given generator
            normal = dist.base_dist
            noise = torch.randn(normal.loc.shape, generator=generator, dtype=normal.loc.dtype)
            actions = normal.loc + normal.scale * noise
        else:
            actions = dist.sample()
        if h_next is not None:
            for k, a in enumerate(names):
                self._hidden[a] = h_next[k]
        actions = actions.squeeze(0).numpy()
        return {
            a: (int(actions[k]) if self.discrete else actions[k].astype(np.float32))
            for k, a in enumerate(names)
        }


@dataclass
class EpisodeResult:
    """One evaluated episode (all controlled agents).

    Attributes:
        scenario, seed: what was played.
        agents: per agent, :meth:`sim.env.AgentEpisode.to_dict`.
        duration_s: simulated seconds until the episode ended.
        bytes_sent: V2X bytes put on air by all vehicles.
        frames: optional recorded frames (for ``--record``).
    """

    scenario: str
    seed: int
    agents: dict[str, dict[str, float]]
    duration_s: float
    bytes_sent: int
    frames: list[Any] = field(default_factory=list, repr=False)

    @property
    def success(self) -> bool:
        """Every agent reached its goal without collision."""
        return all(a["success"] > 0 for a in self.agents.values())

    @property
    def collision(self) -> bool:
        return any(a["collision"] > 0 for a in self.agents.values())

    @property
    def timeout(self) -> bool:
        return not self.collision and any(a["timeout"] > 0 for a in self.agents.values())


def run_episode(
    env: CoopDrivingEnv,
    act: Callable[[dict[str, np.ndarray]], dict[str, Any]],
    seed: int,
    record: Callable[[CoopDrivingEnv], Any] | None = None,
) -> EpisodeResult:
    """Play scenario seed ``seed`` with ``act`` (observations -> actions) until every agent is done."""
    obs, _ = env.reset(seed=seed)
    frames = [record(env)] if record is not None else []
    episodes: dict[str, dict[str, float]] = {}
    while env.agents:
        obs, _, _, _, infos = env.step(act(obs))
        for agent, info in infos.items():
            if "episode" in info:
                episodes[agent] = info["episode"]
        if record is not None:
            frames.append(record(env))
    assert env.frame is not None
    return EpisodeResult(
        scenario=env.config.scenario,
        seed=seed,
        agents=episodes,
        duration_s=float(env.frame.time_s),
        bytes_sent=int(env.bytes_sent),
        frames=frames,
    )


def summarize(results: list[EpisodeResult]) -> dict[str, float]:
    """Closed-loop metrics over episodes.

    - success / collision / timeout rate: fraction of episodes (success: every agent reached its
      goal; collision: any agent collided; timeout: no collision but an agent ran out of time);
    - success weighted by completion time: per episode, success x (the fastest possible time,
      the goal distance at the speed limit) / (the time taken), averaged over episodes (0 for
      failures), as SPL weights success by path length;
    - route completion, average speed, driving score (route completion x 0.60 per collision x
      0.70 per red light, CARLA leaderboard style): means over agents and episodes;
    - bytes per second: V2X bytes on air per simulated second;
    - ``success_ci95_low`` / ``_high``: the Wilson score 95 % interval of the success rate (scipy's
      ``binomtest(...).proportion_ci``), how far the rate may sit from the policy's true rate on
      this scenario's seed distribution: about +-0.14 at 30 episodes near 0.8, +-0.08 at 100.
    """
    if not results:
        return {}
    agents = [a for r in results for a in r.agents.values()]
    success = np.array([r.success for r in results], dtype=float)
    weighted = np.array(
        [
            np.mean(
                [
                    a["reference_time_s"] / max(a["time_s"], a["reference_time_s"], 1e-6)
                    for a in r.agents.values()
                ]
            )
            if r.success
            else 0.0
            for r in results
        ]
    )
    duration = sum(r.duration_s for r in results)
    interval = binomtest(int(success.sum()), len(results)).proportion_ci(confidence_level=0.95, method="wilson")
    return {
        "episodes": float(len(results)),
        "success_rate": float(success.mean()),
        "success_ci95_low": float(interval.low),
        "success_ci95_high": float(interval.high),
        "collision_rate": float(np.mean([r.collision for r in results])),
        "timeout_rate": float(np.mean([r.timeout for r in results])),
        "success_weighted_by_time": float(weighted.mean()),
        "route_completion": float(np.mean([a["route_completion"] for a in agents])),
        "average_speed": float(np.mean([a["mean_speed"] for a in agents])),
        "driving_score": float(np.mean([a["driving_score"] for a in agents])),
        "bytes_per_second": float(sum(r.bytes_sent for r in results) / max(duration, 1e-9)),
    }


def aggregate_over_seeds(summaries: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and (population) standard deviation of each metric over several runs' summaries."""
    if not summaries:
        return {}
    keys = [k for k in summaries[0] if all(k in s for s in summaries)]
    return {
        k: (float(np.mean([s[k] for s in summaries])), float(np.std([s[k] for s in summaries]))) for k in keys
    }


def eval_seeds(episodes: int, offset: int = 0) -> list[int]:
    """Held-out scenario seeds (never drawn in training): ``EVAL_SEED_OFFSET + offset + i``."""
    return [EVAL_SEED_OFFSET + offset + i for i in range(episodes)]


def env_config_for_eval(config: PlannerConfig, scenario: str | None, obs: str | None) -> EnvConfig:
    """The training env config with the scenario and observation mode swapped as asked, and no
    exploring starts (a training device: evaluation starts every episode as its scenario does)."""
    env = replace(config.env, exploring_starts=0)
    if scenario is not None:
        env = replace(env, scenario=scenario)
    if obs is not None:
        env = replace(env, obs=obs)
    env.validate()
    return env


def bev_snapshot(env: CoopDrivingEnv) -> dict[str, Any]:
    """What a BEV frame of ``--record`` needs from the env now (boxes (M, 7) world, their ids,
    the controlled vehicles, the ego and the ids it knows about, collisions)."""
    frame = env.frame
    assert frame is not None
    ego = env.possible_agents[0]
    return {
        "time_s": frame.time_s,
        "boxes": frame.boxes_world.copy(),
        "ids": frame.agent_ids.copy(),
        "agents": [env.vehicle_id(a) for a in env.possible_agents],
        "ego": env.vehicle_id(ego),
        "known": env.known_ids(ego),
        "collisions": list(frame.collisions),
    }


@dataclass(frozen=True)
class EvalChunk:
    """Consecutive held-out episodes of one scenario, evaluated by one job (one process).

    Everything is plain data, so a chunk can be sent to a Ray worker; the worker loads the
    checkpoint once and plays the seeds in order. Each episode's result depends only on its seed
    (the env is reset with it, the policy's recurrent state is cleared, and a stochastic policy
    samples from a generator seeded with it), so chunks may be split and run anywhere.

    Attributes:
        checkpoint: path of the planner checkpoint (:func:`load_checkpoint`).
        config: the config to evaluate with: the checkpoint's, env overrides applied.
        scenario: the scenario played.
        obs: the observation source (None: the config's).
        seeds: scenario seeds, in play order.
        deterministic: act with the most likely action instead of sampling.
        record_first: record :func:`bev_snapshot` frames of the first episode
            (``EpisodeResult.frames``).
    """

    checkpoint: str
    config: PlannerConfig
    scenario: str
    obs: str | None
    seeds: tuple[int, ...]
    deterministic: bool = True
    record_first: bool = False


def evaluate_chunk(
    chunk: EvalChunk, on_episode: Callable[[EpisodeResult], None] | None = None
) -> list[EpisodeResult]:
    """Play the chunk's episodes; one :class:`EpisodeResult` per seed, in order.

    ``on_episode`` is called after each episode (a progress bar in the serial case).

    Raises:
        ValueError: the scenario or observation source does not fit the checkpoint's policy.
    """
    checkpoint, _ = load_checkpoint(chunk.checkpoint)
    env = CoopDrivingEnv(env_config_for_eval(chunk.config, chunk.scenario, chunk.obs), seed=0)
    try:
        agents = env.possible_agents
        policy = Policy(
            checkpoint, chunk.config, env.action_space(agents[0]), agents, deterministic=chunk.deterministic
        )
        id_dim = len(agents) if chunk.config.learner.agent_id_in_obs else 0
        if int(checkpoint["actor_dim"]) != env.obs_dim + id_dim:
            raise ValueError(
                f"the checkpoint's policy takes {int(checkpoint['actor_dim']) - id_dim} observation "
                f"features, the {chunk.scenario} env gives {env.obs_dim}"
            )
        results = []
        for k, seed in enumerate(chunk.seeds):
            policy.reset()
            generator = torch.Generator().manual_seed(seed)
            record = bev_snapshot if (chunk.record_first and k == 0) else None
            act = functools.partial(policy.act, generator=generator)
            results.append(run_episode(env, act, seed, record=record))
            if on_episode is not None:
                on_episode(results[-1])
    finally:
        env.close()
    return results
