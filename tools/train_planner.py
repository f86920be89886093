"""Train MAPPO / IPPO planners on the cooperative driving env.

Reads a YAML config (``configs/planner/*.yaml``: ``env``, ``learner``, ``run`` sections, see
``models/planning/experiment.py``), applies ``key.sub=value`` overrides, saves the resolved config
as ``OUT/config.yaml``, and writes ``OUT/checkpoint.pt`` (atomically) every
``run.checkpoint_every`` iterations and at the end, tensorboard logs under ``OUT/tb`` and one
JSON line per iteration in ``OUT/progress.jsonl``.

A time-limit curriculum (``curriculum.*``, :class:`models.planning.experiment.CurriculumConfig`)
sets the training envs' time limit before each iteration, from the env steps done so far.

``--resume`` continues from ``OUT/checkpoint.pt``: networks, optimisers, value normaliser,
counters and random generators are restored; the envs start fresh episodes. The config must be the
one the run started with, except ``run.*`` and ``learner.total_steps`` (to train longer).

``env.obs=perception`` is refused: it is the slow evaluation mode (tools/eval_closed_loop.py);
train with ``visible``.

Example:
    python tools/train_planner.py --config configs/planner/merge.yaml --out outputs/planner/merge_s0 \\
        learner.seed=0 learner.total_steps=200000
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from models.config import ConfigError, load_config, save_resolved, to_dict
from models.planning.experiment import (
    PlannerConfig,
    apply_curriculum,
    load_checkpoint,
    make_env_fns,
    save_checkpoint,
)
from models.planning.mappo import MAPPOTrainer
from models.threads import set_cpu_threads
from sim.env_obs import ObsMode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: all defaults)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (overrides run.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (small networks: 1 is fastest)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args(argv)


def _comparable(config: PlannerConfig) -> dict:
    """The parts of a config that must not change when a run is resumed."""
    d = to_dict(config)
    d.pop("run")
    d["learner"].pop("total_steps")
    return d


def _episode_metrics(episodes: list[dict]) -> dict[str, float]:
    """Means over finished episodes: team return, and per-agent success / collision / timeout."""
    if not episodes:
        return {}
    out = {"return": float(np.mean([sum(ep["returns"].values()) for ep in episodes]))}
    stats = [info["episode"] for ep in episodes for info in ep["infos"].values() if "episode" in info]
    for key in ("success", "collision", "timeout", "route_completion", "mean_speed"):
        if stats:
            out[key] = float(np.mean([s[key] for s in stats]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_cpu_threads(max(args.threads, 1))
    try:
        config = load_config(PlannerConfig, args.config, args.overrides)
        if config.env.obs == ObsMode.PERCEPTION.value:
            raise ValueError(
                "env.obs=perception is for evaluation, not training: it runs a perception model on "
                "full LiDAR scans every decision (about 0.2 s a decision on CPU). Train with "
                "env.obs=visible and evaluate with tools/eval_closed_loop.py --obs perception "
                "--perception-checkpoint RUN"
            )
        if args.out is not None:
            config = replace(config, run=replace(config.run, out_dir=str(args.out)))
        config.validate()
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(config.run.out_dir)
    checkpoint_path = out / "checkpoint.pt"
    state = None
    if args.resume:
        if not checkpoint_path.is_file():
            print(f"error: --resume but no checkpoint at {checkpoint_path}", file=sys.stderr)
            return 2
        state, saved = load_checkpoint(checkpoint_path)
        if _comparable(saved) != _comparable(config):
            print(
                f"error: {checkpoint_path} was trained with other settings; resume with the same config "
                "(only run.* and learner.total_steps may change)",
                file=sys.stderr,
            )
            return 2
    elif checkpoint_path.exists():
        print(f"error: {checkpoint_path} exists; pass --resume or choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(config, out / "config.yaml")

    learner = config.learner
    trainer = MAPPOTrainer(make_env_fns(config.env, learner.num_envs, learner.seed), learner)
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        print(f"resuming {out}: iteration {trainer.iteration}, {trainer.env_steps} env steps")
    writer = SummaryWriter(str(out / "tb"))
    bar = tqdm(total=learner.total_steps, initial=min(trainer.env_steps, learner.total_steps), unit="step")
    try:
        with open(out / "progress.jsonl", "a", encoding="utf-8") as progress:
            while not trainer.done:
                time_limit_scale = apply_curriculum(trainer, config)
                stats = trainer.train_iteration()
                metrics = _episode_metrics(stats.episodes)
                bar.update(min(stats.env_steps, learner.total_steps) - bar.n)
                if metrics:
                    bar.set_postfix(
                        ret=f"{metrics['return']:.2f}", succ=f"{metrics.get('success', float('nan')):.2f}"
                    )
                if stats.iteration % config.run.log_every == 0:
                    for key, value in metrics.items():
                        writer.add_scalar(f"episode/{key}", value, stats.env_steps)
                    for key, value in vars(stats.ppo).items():
                        writer.add_scalar(f"ppo/{key}", value, stats.env_steps)
                    writer.add_scalar("perf/steps_per_second", stats.steps_per_second, stats.env_steps)
                record = {
                    "iteration": stats.iteration,
                    "env_steps": stats.env_steps,
                    "episodes": len(stats.episodes),
                    **metrics,
                    **{f"ppo_{k}": v for k, v in vars(stats.ppo).items()},
                    "steps_per_second": stats.steps_per_second,
                    "time_limit_scale": time_limit_scale,
                }
                progress.write(json.dumps(record) + "\n")
                progress.flush()
                if stats.iteration % config.run.checkpoint_every == 0 or trainer.done:
                    save_checkpoint(checkpoint_path, trainer, config)
    finally:
        bar.close()
        writer.close()
        trainer.close()
    print(f"done: {trainer.iteration} iterations, {trainer.env_steps} env steps -> {checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
