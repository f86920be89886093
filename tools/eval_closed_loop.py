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

``--obs perception`` runs a trained cooperative perception checkpoint on full LiDAR scans
(``sim.env_perception``): give its run folder with ``--perception-checkpoint RUN`` (required),
and ``--perception-lidar PRESET`` when the checkpoint's training data, whose manifests record the
LiDAR, is not on this machine. The model's messages count in the V2X bytes. It is the slow,
honest mode: observations come from detections and tracked velocities, not ground truth.

``--workers N`` spreads the episodes over N Ray workers (a local cluster, or ``--ray-address``
for an existing one) in chunks of consecutive seeds; each task loads the checkpoint once. An
episode depends only on its seed (a stochastic policy samples from a generator seeded with it),
so ``eval.json`` is the same as the serial run's. A failed chunk is retried and reported.

Examples:
    python tools/eval_closed_loop.py --checkpoint outputs/planner/merge_s0/checkpoint.pt \\
        --scenario merge --episodes 50 --obs visible --out outputs/eval/merge_s0 --workers 4
    python tools/eval_closed_loop.py --checkpoint outputs/planner/red_light_s0/checkpoint.pt \\
        --episodes 10 --obs perception --perception-checkpoint outputs/gpu_compare/runs/early \\
        --perception-lidar vlp16 --out outputs/eval/red_light_s0_early
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datasets.io import atomic_path, atomic_write_text
from models.config import ConfigError, apply_overrides
from models.planning.experiment import (
    EpisodeResult,
    EvalChunk,
    aggregate_over_seeds,
    env_config_for_eval,
    eval_seeds,
    evaluate_chunk,
    load_checkpoint,
    summarize,
)
from models.threads import set_cpu_threads
from sim.env import EnvConfig
from sim.env_obs import ObsMode
from sim.scenarios import SCENARIOS
from sim.workers import Job, JobFailed, exit_status_of, run_jobs

# errors of the settings (a retry would fail the same way): reported with exit status 2
_SETTINGS_ERRORS = (ValueError, FileNotFoundError)

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
        "--perception-checkpoint",
        type=Path,
        default=None,
        help="with --obs perception: the perception run folder (tools/train.py) to observe with",
    )
    parser.add_argument(
        "--perception-lidar",
        default=None,
        help="with --obs perception: LiDAR preset of the scans (default: the one recorded in the "
        "perception run's training data)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: next to the checkpoint)"
    )
    parser.add_argument("--seed-offset", type=int, default=0, help="first held-out seed index")
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of the most likely")
    parser.add_argument("--record", action="store_true", help="write a BEV animation of the first episode")
    parser.add_argument(
        "--workers", type=int, default=0, help="Ray workers (0: serial in this process; N: N Ray workers)"
    )
    parser.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (with --workers N: N tasks at a time)"
    )
    parser.add_argument("--max-retries", type=int, default=2, help="further attempts of a failed chunk")
    parser.add_argument(
        "overrides", nargs="*", help="env.key=value overrides of the env config (e.g. env.channel=ideal)"
    )
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.aggregate is None):
        parser.error("give either --checkpoint or --aggregate")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.workers < 0 or args.max_retries < 0:
        parser.error("--workers and --max-retries must be >= 0")
    if args.ray_address is not None and args.workers < 1:
        parser.error("--ray-address needs --workers N >= 1 (how many tasks at a time)")
    for name in args.scenario or []:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; valid scenarios: {', '.join(SCENARIOS)}")
    if args.obs is not None and args.obs not in {m.value for m in ObsMode}:
        parser.error(f"unknown --obs {args.obs!r}; valid: {', '.join(m.value for m in ObsMode)}")
    return args


def with_perception(env: EnvConfig, args: argparse.Namespace) -> EnvConfig:
    """``env`` with the ``--perception-*`` flags applied; ValueError when they do not fit ``--obs``."""
    obs = args.obs or env.obs
    flags = args.perception_checkpoint is not None or args.perception_lidar is not None
    if obs != ObsMode.PERCEPTION.value:
        if flags:
            raise ValueError(
                "--perception-checkpoint and --perception-lidar are used only with --obs perception"
            )
        return env
    perception = env.perception
    if args.perception_checkpoint is not None:
        # absolute, so that Ray workers started elsewhere find it
        perception = replace(perception, checkpoint=str(args.perception_checkpoint.resolve()))
    if args.perception_lidar is not None:
        perception = replace(perception, lidar=args.perception_lidar)
    if not perception.checkpoint:
        raise ValueError(
            "--obs perception needs --perception-checkpoint RUN: a cooperative perception run folder of "
            "tools/train.py (config.yaml and checkpoint.pt), e.g. outputs/gpu_compare/runs/early"
        )
    return replace(env, perception=perception)


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
    labels = [label for _, label, _ in _METRICS]
    labels.insert(1, "success 95% CI")  # right after the success rate
    header = "| scenario | episodes | " + " | ".join(labels) + " |"
    rule = "|" + "---|" * (len(labels) + 2)
    rows = [f"# {title}", "", header, rule]
    for name, m in [*per_scenario.items(), ("**overall**", overall)]:
        cells = [fmt.format(m[key]) for key, _, fmt in _METRICS]
        cells.insert(1, f"{m['success_ci95_low']:.2f}-{m['success_ci95_high']:.2f}")
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
    set_cpu_threads(1)
    if args.aggregate is not None:
        table = aggregate(args.aggregate)
        atomic_write_text(args.aggregate / "summary.md", table)
        print(table)
        return 0
    try:
        _, config = load_checkpoint(args.checkpoint)
        env_overrides = [o.split(".", 1)[1] for o in args.overrides if o.startswith("env.")]
        if len(env_overrides) != len(args.overrides):
            raise ConfigError("only env.* overrides are accepted here, e.g. env.channel=ideal")
        base_env: EnvConfig = apply_overrides(config.env, env_overrides)
        config = replace(config, env=with_perception(base_env, args))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scenarios = args.scenario or [config.env.scenario]
    try:
        for scenario in scenarios:
            env_config_for_eval(config, scenario, args.obs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.checkpoint.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)

    # chunks of consecutive seeds: the whole scenario when serial, else about two per worker
    seeds = eval_seeds(args.episodes, args.seed_offset)
    serial = args.workers == 0 and args.ray_address is None
    size = len(seeds) if serial else math.ceil(len(seeds) / (2 * args.workers))
    bar = tqdm(total=len(scenarios) * len(seeds), desc="episodes", unit="episode")
    jobs = []
    for scenario in scenarios:
        for start in range(0, len(seeds), size):
            chunk = EvalChunk(
                checkpoint=str(args.checkpoint.resolve()),
                config=config,
                scenario=scenario,
                obs=args.obs,
                seeds=tuple(seeds[start : start + size]),
                deterministic=not args.stochastic,
                record_first=args.record and start == 0,
            )
            progress = {"on_episode": lambda _: bar.update(1)} if serial else {}
            name = f"{scenario} episodes {start}-{start + len(chunk.seeds) - 1}"
            jobs.append(Job(name, evaluate_chunk, (chunk,), progress))
    results_of_job: dict[int, list[EpisodeResult]] = {}
    try:
        for done in run_jobs(
            jobs,
            workers=args.workers,
            ray_address=args.ray_address,
            max_retries=args.max_retries,
            fatal=_SETTINGS_ERRORS,
            on_retry=lambda event: bar.write(f"warning: {event}", file=sys.stderr),
        ):
            results_of_job[done.index] = done.value
            if not serial:
                bar.update(len(done.value))
            chunk = jobs[done.index].args[0]
            if chunk.record_first:
                first = done.value[0]
                title = f"{chunk.scenario} ({args.obs or config.env.obs})"
                path = write_animation(out / f"{chunk.scenario}_seed{first.seed}.gif", first.frames, title)
                first.frames = []
                bar.write(f"recorded {path}")
    except JobFailed as err:
        bar.close()
        return exit_status_of(err, _SETTINGS_ERRORS)
    bar.close()

    # per-episode results in scenario order, then seed order: the same as a serial run
    per_scenario: dict[str, dict[str, float]] = {}
    all_results: list[EpisodeResult] = []
    for scenario in scenarios:
        results = [
            result
            for index, job in enumerate(jobs)
            if job.args[0].scenario == scenario
            for result in results_of_job[index]
        ]
        per_scenario[scenario] = summarize(results)
        all_results.extend(results)
    episodes_json = [
        {
            "scenario": result.scenario,
            "seed": result.seed,
            "success": result.success,
            "collision": result.collision,
            "timeout": result.timeout,
            "duration_s": result.duration_s,
            "bytes_sent": result.bytes_sent,
            "agents": result.agents,
        }
        for result in all_results
    ]
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
