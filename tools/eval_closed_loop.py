"""Closed-loop evaluation of a trained planner on held-out scenario seeds.

Plays ``--episodes`` episodes of each ``--scenario`` with the checkpoint's policy (deterministic
by default) and the chosen ``--obs`` source, on seeds never used in training
(``sim.env.EVAL_SEED_OFFSET`` on), and writes ``OUT/eval.json`` (per scenario, overall, and every
episode) and ``OUT/eval.md`` (a markdown table). Metrics: success, collision and timeout rates,
success weighted by completion time, route completion, average speed, driving score (route
completion x infraction penalties, CARLA leaderboard style) and V2X bytes per second.

``--aggregate ROOT`` instead gathers the ``eval.json`` of every run under ROOT whose folder is
named ``<name>_s<seed>`` and writes ``ROOT/summary.md``: each metric's mean and standard
deviation over the seeds of each name (the planner comparison, see docs/planning.md).

``--record`` also writes a BEV animation of the first episode of each scenario
(``OUT/<scenario>_seed<seed>.gif``): controlled vehicles thick, vehicles the ego knows about
green, the others grey dashed.

Example:
    python tools/eval_closed_loop.py --checkpoint outputs/planner/merge_s0/checkpoint.pt \\
        --scenario merge --episodes 50 --obs visible --out outputs/eval/merge_s0
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.io import atomic_path, atomic_write_text
from models.config import ConfigError, apply_overrides
from models.planning.experiment import (
    EpisodeResult,
    Policy,
    aggregate_over_seeds,
    env_config_for_eval,
    eval_seeds,
    load_checkpoint,
    run_episode,
    summarize,
)
from sim.env import CoopDrivingEnv, EnvConfig
from sim.env_obs import ObsMode
from sim.scenarios import SCENARIOS

_METRICS = (
    ("success_rate", "success", "{:.2f}"),
    ("collision_rate", "collision", "{:.2f}"),
    ("timeout_rate", "timeout", "{:.2f}"),
    ("success_weighted_by_time", "success x time", "{:.2f}"),
    ("route_completion", "route compl.", "{:.2f}"),
    ("average_speed", "speed m/s", "{:.1f}"),
    ("driving_score", "driving score", "{:.2f}"),
    ("bytes_per_second", "V2X B/s", "{:.0f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--aggregate", type=Path, default=None, help="summarise the runs under this folder")
    parser.add_argument(
        "--scenario",
        action="append",
        default=None,
        help="scenario (repeat for several; default: the trained one)",
    )
    parser.add_argument("--episodes", type=int, default=20, help="episodes per scenario")
    parser.add_argument(
        "--obs",
        default=None,
        help=f"observation source: {', '.join(m.value for m in ObsMode)} (default: trained)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: next to the checkpoint)"
    )
    parser.add_argument("--seed-offset", type=int, default=0, help="first held-out seed index")
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of the most likely")
    parser.add_argument("--record", action="store_true", help="write a BEV animation of the first episode")
    parser.add_argument(
        "overrides", nargs="*", help="env.key=value overrides of the env config (e.g. env.channel=ideal)"
    )
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.aggregate is None):
        parser.error("give either --checkpoint or --aggregate")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    for name in args.scenario or []:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; valid scenarios: {', '.join(SCENARIOS)}")
    if args.obs is not None and args.obs not in {m.value for m in ObsMode}:
        parser.error(f"unknown --obs {args.obs!r}; valid: {', '.join(m.value for m in ObsMode)}")
    return args


def _snapshot(env: CoopDrivingEnv) -> dict:
    """What a BEV frame needs from the env now."""
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


def write_animation(path: Path, frames: list[dict], title: str) -> Path:
    """A GIF of recorded snapshots (matplotlib's Pillow writer), written atomically."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    from sim.bev import new_bev_figure, render_bev

    fig, ax = new_bev_figure(size_in=6.0, dpi=80)

    def draw(k: int) -> None:
        ax.clear()
        snap = frames[k]
        ids = snap["ids"]
        known = np.isin(ids, snap["known"])
        render_bev(
            ax,
            {a: np.zeros((0, 3)) for a in snap["agents"] if a in set(ids.tolist())},
            snap["boxes"],
            ids,
            {snap["ego"]: known},
            snap["ego"],
            view_range_m=45.0,
            title=f"{title}  t = {snap['time_s']:.1f} s  (green: known to the ego)"
            + ("  COLLISION" if snap["collisions"] else ""),
        )

    animation = FuncAnimation(fig, draw, frames=len(frames))
    with atomic_path(path) as tmp:
        animation.save(str(tmp), writer=PillowWriter(fps=10))
    return path


def markdown_table(per_scenario: dict[str, dict[str, float]], overall: dict[str, float], title: str) -> str:
    header = "| scenario | episodes | " + " | ".join(label for _, label, _ in _METRICS) + " |"
    rule = "|" + "---|" * (len(_METRICS) + 2)
    rows = [f"# {title}", "", header, rule]
    for name, m in [*per_scenario.items(), ("**overall**", overall)]:
        cells = [fmt.format(m[key]) for key, _, fmt in _METRICS]
        rows.append(f"| {name} | {int(m['episodes'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def aggregate(root: Path) -> str:
    """Markdown table of mean +- std over seeds for every ``<name>_s<seed>/**/eval.json`` under ``root``."""
    groups: dict[str, list[dict[str, float]]] = {}
    for path in sorted(root.glob("*/**/eval.json")):
        run = path.relative_to(root).parts[0]
        name = re.sub(r"_s\d+$", "", run)
        report = json.loads(path.read_text())
        groups.setdefault(name, []).append(report["overall"])
    header = "| run | seeds | " + " | ".join(label for _, label, _ in _METRICS) + " |"
    rows = [
        f"# Planner comparison ({root})",
        "",
        "mean +- std over seeds",
        "",
        header,
        "|" + "---|" * (len(_METRICS) + 2),
    ]
    for name, summaries in groups.items():
        stats = aggregate_over_seeds(summaries)
        cells = [f"{fmt.format(stats[key][0])} +- {fmt.format(stats[key][1])}" for key, _, fmt in _METRICS]
        rows.append(f"| {name} | {len(summaries)} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.aggregate is not None:
        table = aggregate(args.aggregate)
        atomic_write_text(args.aggregate / "summary.md", table)
        print(table)
        return 0
    if args.obs == ObsMode.PERCEPTION.value:
        from sim.env_obs import PERCEPTION_UNAVAILABLE

        print(f"error: {PERCEPTION_UNAVAILABLE}", file=sys.stderr)
        return 2
    try:
        checkpoint, config = load_checkpoint(args.checkpoint)
        env_overrides = [o.split(".", 1)[1] for o in args.overrides if o.startswith("env.")]
        if len(env_overrides) != len(args.overrides):
            raise ConfigError("only env.* overrides are accepted here, e.g. env.channel=ideal")
        base_env: EnvConfig = apply_overrides(config.env, env_overrides)
        config = replace(config, env=base_env)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scenarios = args.scenario or [config.env.scenario]
    out = args.out or args.checkpoint.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)

    per_scenario: dict[str, dict[str, float]] = {}
    all_results: list[EpisodeResult] = []
    episodes_json = []
    for scenario in scenarios:
        try:
            env_cfg = env_config_for_eval(config, scenario, args.obs)
            env = CoopDrivingEnv(env_cfg, seed=0)
            policy = Policy(
                checkpoint,
                config,
                env.action_space(env.possible_agents[0]),
                env.possible_agents,
                deterministic=not args.stochastic,
            )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        id_dim = len(env.possible_agents) if config.learner.agent_id_in_obs else 0
        if int(checkpoint["actor_dim"]) != env.obs_dim + id_dim:
            print(
                f"error: the checkpoint's policy takes {checkpoint['actor_dim'] - id_dim} observation "
                "features, "
                f"the {scenario} env gives {env.obs_dim}",
                file=sys.stderr,
            )
            return 2
        results = []
        generator = torch.Generator().manual_seed(0)
        for k, seed in enumerate(
            tqdm(eval_seeds(args.episodes, args.seed_offset), desc=scenario, unit="episode")
        ):
            policy.reset()
            record = _snapshot if (args.record and k == 0) else None
            result = run_episode(env, functools.partial(policy.act, generator=generator), seed, record=record)
            if record is not None:
                path = write_animation(
                    out / f"{scenario}_seed{seed}.gif", result.frames, f"{scenario} ({env_cfg.obs})"
                )
                print(f"recorded {path}")
                result.frames = []
            results.append(result)
            episodes_json.append(
                {
                    "scenario": scenario,
                    "seed": seed,
                    "success": result.success,
                    "collision": result.collision,
                    "timeout": result.timeout,
                    "duration_s": result.duration_s,
                    "bytes_sent": result.bytes_sent,
                    "agents": result.agents,
                }
            )
        env.close()
        per_scenario[scenario] = summarize(results)
        all_results.extend(results)
    overall = summarize(all_results)
    obs_name = args.obs or config.env.obs
    report = {
        "checkpoint": str(args.checkpoint),
        "obs": obs_name,
        "deterministic": not args.stochastic,
        "scenarios": per_scenario,
        "overall": overall,
        "episodes": episodes_json,
    }
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
    table = markdown_table(
        per_scenario, overall, f"Closed-loop evaluation: {args.checkpoint} (obs: {obs_name})"
    )
    atomic_write_text(out / "eval.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
