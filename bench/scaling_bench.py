"""Scaling on this machine: Ray workers for data generation and closed-loop evaluation, DDP
processes for perception training.

    python bench/scaling_bench.py [--out outputs/scaling] [--gen-seeds 0-7] [--frames 20]
                                  [--episodes 40] [--ddp-steps 40] [--workers 1,2]

Every figure is the real tool run in a subprocess, as a user would run it:

- **data generation**: ``tools/generate.py --scenario random_traffic --seeds ... --frames F``
  (3 connected vehicles, hdl64 LiDAR), frames per second of wall-clock from launch to exit;
- **closed-loop episodes**: ``tools/eval_closed_loop.py`` on ``red_light`` with ``visible``
  observations and an untrained policy (a policy's weights do not change the cost of an
  episode, only its length, and the time limit bounds that), episodes per second;
- **DDP training**: ``torchrun --nproc_per_node P tools/train.py`` on the tiny perception config
  and a small tiny-LiDAR dataset, global batch 2, the steps per second ``tools/train.py`` prints
  (its loop only: process start-up and data set-up excluded).

``workers 0`` is the serial run in one process (no Ray). The Ray columns include Ray's fixed
cost (local cluster start, each worker importing torch and the stack: about 10-15 s here), which
is why the work per call is sized in tens of seconds; on a cluster that is already up
(``--ray-address``) only the imports remain. Writes ``OUT/scaling.json`` and ``OUT/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``cmd`` from the repository root; (wall seconds, stdout + stderr). Fails loudly."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return wall, result.stdout + result.stderr


def seeds_count(spec: str) -> int:
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def bench_generation(out: Path, seeds: str, frames: int, workers: int) -> dict:
    folder = out / f"gen_w{workers}"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [PY, "tools/generate.py", "--scenario", "random_traffic", "--seeds", seeds, "--frames", str(frames)]
    cmd += ["--cavs", "3", "--lidar", "hdl64", "--out", str(folder), "--workers", str(workers)]
    wall, _ = run(cmd)
    total = seeds_count(seeds) * frames
    shutil.rmtree(folder, ignore_errors=True)  # hdl64 frames are large
    return {
        "task": "data generation",
        "workers": workers,
        "units": total,
        "wall_s": wall,
        "per_s": total / wall,
    }


def make_policy(out: Path) -> Path:
    """An untrained red_light policy saved as a planner checkpoint."""
    from models.config import apply_overrides
    from models.planning.experiment import PlannerConfig, make_env_fns, save_checkpoint
    from models.planning.mappo import MAPPOTrainer

    config = apply_overrides(
        PlannerConfig(),
        ["env.scenario=red_light", "env.controlled=ego", "env.obs=visible", "learner.num_envs=1"],
    )
    trainer = MAPPOTrainer(make_env_fns(config.env, 1, 0), config.learner)
    (out / "policy").mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(out / "policy" / "checkpoint.pt", trainer, config)
    trainer.close()
    return path


def bench_episodes(out: Path, checkpoint: Path, episodes: int, workers: int) -> dict:
    folder = out / f"eval_w{workers}"
    cmd = [PY, "tools/eval_closed_loop.py", "--checkpoint", str(checkpoint), "--scenario", "red_light"]
    cmd += ["--episodes", str(episodes), "--obs", "visible", "--out", str(folder), "--workers", str(workers)]
    wall, _ = run(cmd)
    return {
        "task": "closed-loop episodes",
        "workers": workers,
        "units": episodes,
        "wall_s": wall,
        "per_s": episodes / wall,
    }


def make_perception_data(out: Path) -> Path:
    data = out / "perception_data"
    if not (data / "train").is_dir():
        run(
            [
                PY,
                "tools/generate.py",
                "--scenario",
                "random_traffic",
                "--seeds",
                "1-2",
                "--frames",
                "10",
                "--out",
                str(data),
                "--lidar",
                "tiny",
                "--cavs",
                "3",
            ]
        )
    return data


def bench_ddp(out: Path, data: Path, steps: int, processes: int) -> dict:
    runs = out / f"ddp_p{processes}"
    shutil.rmtree(runs, ignore_errors=True)
    torchrun = str(Path(PY).with_name("torchrun"))
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "tools/train.py",
        "--config",
        "configs/perception/tiny.yaml",
        "--out",
        str(runs),
        f"data.root={data}",
        f"train.max_steps={steps}",
        "train.epochs=100",
        "train.batch_size=2",
        "train.num_threads=1",
        f"train.checkpoint_every={10 * steps}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wall, text = run(cmd, env)
    match = re.search(r"([0-9.]+) steps/s", text)
    if match is None:
        raise RuntimeError(f"tools/train.py printed no steps/s:\n{text[-2000:]}")
    return {
        "task": "DDP training (global batch 2)",
        "workers": processes,
        "units": steps,
        "wall_s": wall,
        "per_s": float(match.group(1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/scaling"))
    parser.add_argument("--gen-seeds", default="0-7", help="random_traffic seeds generated per measurement")
    parser.add_argument("--frames", type=int, default=20, help="frames per generated run")
    parser.add_argument("--episodes", type=int, default=40, help="closed-loop episodes per measurement")
    parser.add_argument("--ddp-steps", type=int, default=40, help="training steps per DDP measurement")
    parser.add_argument("--workers", default="1,2", help="Ray workers / DDP processes to measure")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: gen, eval, ddp")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",") if w]
    skip = set(args.skip.split(","))
    rows = []
    if "gen" not in skip:
        for workers in [0, *counts]:
            rows.append(bench_generation(args.out, args.gen_seeds, args.frames, workers))
            print(rows[-1], flush=True)
    if "eval" not in skip:
        checkpoint = make_policy(args.out)
        for workers in [0, *counts]:
            rows.append(bench_episodes(args.out, checkpoint, args.episodes, workers))
            print(rows[-1], flush=True)
    if "ddp" not in skip:
        data = make_perception_data(args.out)
        for processes in counts:
            rows.append(bench_ddp(args.out, data, args.ddp_steps, processes))
            print(rows[-1], flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    lines = [
        f"Machine: {machine}. Command: `python bench/scaling_bench.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        "",
        "| task | workers / processes | work | wall s | per second | vs first row of the task |",
        "|---|---|---|---|---|---|",
    ]
    first: dict[str, float] = {}
    for row in rows:
        base = first.setdefault(row["task"], row["per_s"])
        who = "serial (no Ray)" if row["workers"] == 0 else str(row["workers"])
        unit = {"data generation": "frames", "closed-loop episodes": "episodes"}.get(row["task"], "steps")
        lines.append(
            f"| {row['task']} | {who} | {row['units']} {unit} | {row['wall_s']:.1f} | "
            f"{row['per_s']:.2f} | {row['per_s'] / base:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "scaling.md").write_text(table + "\n")
    (args.out / "scaling.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
