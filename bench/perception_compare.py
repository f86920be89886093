"""Train and evaluate every fusion method on one generated benchmark and write one table.

    python bench/perception_compare.py --out outputs/perception_compare [--steps 400] [--lidar vlp16]

1. Data (tools/generate.py): training runs of ``random_traffic`` with fixed seeds
   (``--train-seeds``, ``--train-frames`` frames, ``--train-cavs`` connected vehicles); held-out
   test runs with other seeds *and* other scenarios (``--test-runs``, e.g. ``left_turn:103``).
2. Training (tools/train.py): one run per row with ``configs/perception/<row>.yaml``, the same
   number of optimiser steps, batch size and seed for every row. Late fusion has no training of
   its own: it is the ego-only model evaluated with ``model.fusion.method=late`` (each agent runs
   it and the boxes travel), as OpenCOOD's late fusion does.
3. Evaluation (tools/eval.py) on the test split, same channel for every row.
4. ``OUT/table.md`` and ``OUT/table.json``: BEV AP at IoU 0.5 and 0.7 on all boxes, AP at 0.5 on
   the boxes hidden from the ego (seen only by other agents), 3D AP at 0.7, mean bytes per
   message and per frame, and the compute latency per frame (one process, batch size 1, every
   agent's work serially) on the machine that ran it.

``--jobs N`` runs up to N of the independent commands of each stage at once (generation runs,
training rows, evaluations), each logged to ``OUT/logs/<stage>_<name>.txt``; on a GPU the training
rows then share the device. On a GPU the same command scales up: ``--device cuda --jobs 4
--steps 20000 --lidar hdl64 --train-seeds 1-40 --set train.num_workers=3`` (the configs' model
sizes are overridable through ``--set key=value``). Nothing is extrapolated: the table holds what
this run measured, with its settings. Latencies measured with ``--jobs`` > 1 share the machine
with the other evaluations; ``bench/perception_latency.py`` measures them alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
ROWS = (
    "none", "late", "early", "attfuse", "attfuse_keypoints", "attfuse_proj_first", "core", "core_proj_first",
    "core_reconstruction", "attfuse_before_2d",
)
TRAINED_AS = {"late": "none"}


def parse_seeds(text: str) -> list[int]:
    """``"1-6"`` or ``"1,2,5"`` -> list of ints."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def _child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (keeping what was there)."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run(cmd: list[str], log: Path) -> float:
    """Run a command from the repository root, its output appended to ``log``; its wall-clock
    seconds; RuntimeError on failure."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_child_env())
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start


def run_stage(stage: str, commands: dict[str, list[str]], jobs: int, logs: Path) -> dict[str, float]:
    """Run the stage's independent commands, up to ``jobs`` at once, each logged to
    ``logs/<stage>_<name>.txt``; seconds per command. Every command runs to its end before a
    failure is raised (the first failure, naming its log), so finished work is kept for a rerun."""
    seconds: dict[str, float] = {}
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run, cmd, logs / f"{stage}_{name}.txt"): name for name, cmd in commands.items()}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc=stage, unit="run"):
            try:
                seconds[futures[future]] = future.result()
            except RuntimeError as err:
                failures.append(str(err))
    if failures:
        raise RuntimeError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    return seconds


def _step_of(checkpoint: Path) -> int:
    """The optimiser step a tools/train.py checkpoint was written at."""
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["step"])


def _gpu_name(device: str) -> str:
    if device == "cpu":
        return ""
    import torch

    return f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/perception_compare"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per trained row")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--lidar", default="vlp16")
    parser.add_argument("--train-seeds", default="1-6")
    parser.add_argument("--train-frames", type=int, default=30)
    parser.add_argument("--train-cavs", type=int, default=4)
    parser.add_argument("--test-runs", default="random_traffic:101,random_traffic:102,left_turn:103,merge:104,overtaking:105")
    parser.add_argument("--test-frames", type=int, default=20)
    parser.add_argument("--test-cavs", type=int, default=3)
    parser.add_argument("--skip-generate", action="store_true", help="reuse OUT/data as it is")
    parser.add_argument("--jobs", type=int, default=1, help="commands of one stage run at once (generation, training, evaluation)")
    parser.add_argument("--set", action="append", default=[], help="extra key=value override for every training run")
    parser.add_argument(
        "--eval-set", action="append", default=["data.ego=scene"], help="key=value override for every evaluation"
    )
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")

    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    out = args.out.resolve()
    data, runs, evals, logs = out / "data", out / "runs", out / "eval", out / "logs"
    for folder in (data, runs, evals, logs):
        folder.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    timings: dict[str, float] = {}

    start = time.perf_counter()
    test_runs = [item.split(":") for item in args.test_runs.split(",") if item]
    generate: dict[str, list[str]] = {}
    for seed in [] if args.skip_generate else parse_seeds(args.train_seeds):
        generate[f"train_random_traffic_{seed}"] = [
            py, "tools/generate.py", "--scenario", "random_traffic", "--frames", str(args.train_frames), "--seed", str(seed),
            "--out", str(data), "--lidar", args.lidar, "--cavs", str(args.train_cavs), "--split", "train"]
    for scenario, seed in [] if args.skip_generate else test_runs:
        generate[f"test_{scenario}_{seed}"] = [
            py, "tools/generate.py", "--scenario", scenario, "--frames", str(args.test_frames), "--seed", seed,
            "--out", str(data), "--lidar", args.lidar, "--cavs", str(args.test_cavs), "--split", "test"]
    run_stage("generate", generate, args.jobs, logs)  # each run has its own folder and manifest
    timings["generate_s"] = time.perf_counter() - start

    common = [f"data.root={data}", "data.split=train", f"train.max_steps={args.steps}", "train.epochs=1000",
              f"train.batch_size={args.batch_size}", f"train.seed={args.seed}", f"train.device={args.device}", *args.set]
    trained = sorted({TRAINED_AS.get(r, r) for r in rows}, key=lambda r: ROWS.index(r))
    train: dict[str, list[str]] = {}
    for name in trained:
        if (runs / name / "checkpoint.pt").is_file() and (runs / name / "done").is_file():
            continue  # finished by an earlier invocation
        resume = ["--resume"] if (runs / name / "checkpoint.pt").is_file() else []
        train[name] = [py, "tools/train.py", "--config", f"configs/perception/{name}.yaml", *common, "--out", str(runs), *resume]
    start = time.perf_counter()
    try:
        seconds = run_stage("train", train, args.jobs, logs)
    finally:  # rows that finished are marked even when another failed
        for name in train:
            state = runs / name / "checkpoint.pt"
            if state.is_file() and _step_of(state) >= args.steps:
                (runs / name / "done").write_text("trained\n")
    timings |= {f"train_{name}_s": value for name, value in seconds.items()}
    timings["train_wall_s"] = time.perf_counter() - start

    evaluate = {
        row: [py, "tools/eval.py", "--checkpoint", str(runs / TRAINED_AS.get(row, row)), "--data", str(data), "--split", "test",
              "--out", str(evals / row), f"train.device={args.device}", *(["model.fusion.method=late"] if row == "late" else []),
              *args.eval_set]
        for row in rows
    }
    start = time.perf_counter()
    timings |= {f"eval_{row}_s": value for row, value in run_stage("eval", evaluate, args.jobs, logs).items()}
    timings["eval_wall_s"] = time.perf_counter() - start
    results = {row: json.loads((evals / row / "metrics.json").read_text()) for row in rows}

    lines = [
        "| method | BEV AP@0.5 | BEV AP@0.7 | AP@0.5 hidden from ego | 3D AP@0.7 | bytes / message | bytes / frame | latency / frame (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, m in results.items():
        ap = m["ap"]
        lines.append(
            f"| {row} | {ap['bev']['0.50']['all']['ap']:.3f} | {ap['bev']['0.70']['all']['ap']:.3f} | "
            f"{ap['bev']['0.50']['others_only']['ap']:.3f} | {ap['3d']['0.70']['all']['ap']:.3f} | "
            f"{m['bytes']['per_message']['mean']:.0f} | {m['bytes']['per_frame']['mean']:.0f} | "
            f"{m['latency_ms']['compute']['mean']:.0f} |"
        )
    first = next(iter(results.values()))
    settings = (
        f"{len(parse_seeds(args.train_seeds))} training runs x {args.train_frames} frames x {args.train_cavs} cavs "
        f"({args.lidar} LiDAR), {args.steps} steps of batch {args.batch_size} per trained row, seed {args.seed}; "
        f"test: {len(test_runs)} held-out runs ({args.test_runs}) x {args.test_frames} frames, {first['frames']} frames; "
        f"boxes: {first['ap']['bev']['0.50']['all']['num_gt']} ({first['ap']['bev']['0.50']['others_only']['num_gt']} hidden from the ego); "
        f"device {args.device}{_gpu_name(args.device)}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"{args.jobs} job(s) at once."
    )
    table = "\n".join(lines) + "\n\n" + settings + "\n"
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps({"settings": vars(args) | {"out": str(out)}, "timings_s": timings, "results": results}, indent=2, default=str) + "\n")
    print(table)
    print(f"timings: {json.dumps({k: round(v) for k, v in timings.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
