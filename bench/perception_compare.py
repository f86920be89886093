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

On a GPU the same command scales up: ``--device cuda --steps 20000 --lidar hdl64
--train-seeds 1-40`` (the configs' model sizes are overridable through ``--set key=value``).
Nothing is extrapolated: the table holds what this run measured, with its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("none", "late", "early", "attfuse", "attfuse_keypoints", "core", "core_reconstruction")
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


def run(cmd: list[str], log: Path) -> None:
    """Run a command from the repository root, its output appended to ``log``; raise on failure."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}), see {log}: {' '.join(cmd)}")


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
    parser.add_argument("--set", action="append", default=[], help="extra key=value override for every training run")
    parser.add_argument(
        "--eval-set", action="append", default=["data.ego=scene"], help="key=value override for every evaluation"
    )
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")

    out = args.out.resolve()
    data, runs, evals = out / "data", out / "runs", out / "eval"
    for folder in (data, runs, evals):
        folder.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    py = sys.executable
    timings: dict[str, float] = {}

    start = time.perf_counter()
    for seed in [] if args.skip_generate else parse_seeds(args.train_seeds):
        run([py, "tools/generate.py", "--scenario", "random_traffic", "--frames", str(args.train_frames), "--seed", str(seed),
             "--out", str(data), "--lidar", args.lidar, "--cavs", str(args.train_cavs), "--split", "train"], log)
    test_runs = [item.split(":") for item in args.test_runs.split(",") if item]
    for scenario, seed in [] if args.skip_generate else test_runs:
        run([py, "tools/generate.py", "--scenario", scenario, "--frames", str(args.test_frames), "--seed", seed,
             "--out", str(data), "--lidar", args.lidar, "--cavs", str(args.test_cavs), "--split", "test"], log)
    timings["generate_s"] = time.perf_counter() - start

    common = [f"data.root={data}", "data.split=train", f"train.max_steps={args.steps}", "train.epochs=1000",
              f"train.batch_size={args.batch_size}", f"train.seed={args.seed}", f"train.device={args.device}", *args.set]
    trained = sorted({TRAINED_AS.get(r, r) for r in rows}, key=lambda r: ROWS.index(r))
    for name in trained:
        if (runs / name / "checkpoint.pt").is_file() and (runs / name / "done").is_file():
            continue  # finished by an earlier invocation
        start = time.perf_counter()
        resume = ["--resume"] if (runs / name / "checkpoint.pt").is_file() else []
        run([py, "tools/train.py", "--config", f"configs/perception/{name}.yaml", *common, "--out", str(runs), *resume], log)
        (runs / name / "done").write_text("trained\n")
        timings[f"train_{name}_s"] = time.perf_counter() - start

    results = {}
    for row in rows:
        start = time.perf_counter()
        overrides = ["model.fusion.method=late"] if row == "late" else []
        run([py, "tools/eval.py", "--checkpoint", str(runs / TRAINED_AS.get(row, row)), "--data", str(data), "--split", "test",
             "--out", str(evals / row), f"train.device={args.device}", *overrides, *args.eval_set], log)
        results[row] = json.loads((evals / row / "metrics.json").read_text())
        timings[f"eval_{row}_s"] = time.perf_counter() - start

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
        f"device {args.device}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}."
    )
    table = "\n".join(lines) + "\n\n" + settings + "\n"
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps({"settings": vars(args) | {"out": str(out)}, "timings_s": timings, "results": results}, indent=2, default=str) + "\n")
    print(table)
    print(f"timings: {json.dumps({k: round(v) for k, v in timings.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
