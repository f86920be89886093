"""An untrained planner checkpoint for the tool tests (imported by name, like the other helpers)."""

from pathlib import Path

from models.config import apply_overrides
from models.planning.experiment import PlannerConfig, make_env_fns, save_checkpoint
from models.planning.mappo import MAPPOTrainer


def untrained_red_light_checkpoint(folder: Path, *overrides: str) -> Path:
    """A small single-agent red_light policy with `visible` observations (and ``overrides`` of the
    planner config), saved under ``folder``; the evaluation plumbing needs no good policy."""
    config = apply_overrides(
        PlannerConfig(),
        [
            "env.scenario=red_light",
            "env.controlled=ego",
            "env.obs=visible",
            "learner.num_envs=1",
            "learner.network.hidden_sizes=16",
            *overrides,
        ],
    )
    trainer = MAPPOTrainer(make_env_fns(config.env, 1, 0), config.learner)
    path = save_checkpoint(folder / "checkpoint.pt", trainer, config)
    trainer.close()
    return path
