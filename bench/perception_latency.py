"""Inference latency of cooperative perception with five agents, per fusion method.

    python bench/perception_latency.py [--runs outputs/perception_compare/runs] [--out outputs/perception_latency]

Takes one frame with five connected agents (ego + 4; generated with ``--lidar`` if ``--data`` is
not given), batch size 1, eval mode, ideal channel, and times per method over ``--repeats`` runs
after ``--warmup``:

- **all agents**: ``model(batch, link, with_detections=True)``: every agent's encoder, the codec
  round trips, fusion, heads, decoding and NMS, serially in this one process;
- **others' encoders**: the four other agents' encoders alone (they run on their own vehicles);
- **ego side**: all agents minus others' encoders (late, attfuse, core; none and early run no
  encoder for the others): what the ego computes per frame when the others encode in parallel on
  their vehicles (their compression, codecs and, for late fusion, their heads and NMS are still
  counted here).

Models are loaded from ``--runs/<method>/`` when given (trained weights, so that decoding and NMS
see realistic scores); otherwise the configs' untrained models with the decoding threshold at 0,
which keeps NMS busy with the maximum number of boxes (a pessimistic case).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datasets.collate import CoopCollate
from datasets.coop_dataset import CoopDataset
from models.comm import LinkConfig, V2XLink
from models.experiment import load_experiment, resolve_device
from models.heads.detection import DetectionHeadConfig
from models.perception import CooperativePerception
from models.threads import set_cpu_threads

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("none", "early", "late", "attfuse", "attfuse_keypoints", "core", "core_reconstruction")


def timed(fn, repeats: int, warmup: int, device: torch.device) -> np.ndarray:
    """Wall-clock milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (on CUDA,
    each call waits for the GPU's queued work before the clock stops)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(1000.0 * (time.perf_counter() - start))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder with a 5-cav run (default: generate one)")
    parser.add_argument("--runs", type=Path, default=None, help="folder of trained runs named by method")
    parser.add_argument("--out", type=Path, default=Path("outputs/perception_latency"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lidar", default="vlp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--frame", type=int, default=1, help="sample index in the data")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    set_cpu_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.out / "data"
        if not data.exists():
            subprocess.run(
                [sys.executable, "tools/generate.py", "--scenario", "random_traffic", "--frames", "3", "--seed", "7",
                 "--out", str(data), "--lidar", args.lidar, "--cavs", "5", "--split", "test"],
                cwd=ROOT, check=True, capture_output=True,
            )
        data = data / "test"

    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        run = (args.runs / ("none" if method == "late" else method)) if args.runs else None
        if run is not None and (run / "checkpoint.pt").is_file():
            overrides = ["model.fusion.method=late"] if method == "late" else []
            cfg = load_experiment(run / "config.yaml", overrides)
            weights = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
            source = "trained"
        else:
            name = "none" if method == "late" else method
            cfg = load_experiment(ROOT / "configs" / "perception" / f"{name}.yaml", ["model.fusion.method=late"] if method == "late" else [])
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, detection=DetectionHeadConfig(score_threshold=0.0)))
            weights = None
            source = "untrained, threshold 0"
        torch.manual_seed(0)
        model = CooperativePerception(cfg.model).eval()
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        model = model.to(device)
        dataset_cfg = dataclasses.replace(
            cfg.dataset_config(root=str(data), split="", training=False), ego="lowest_id", comm_range_m=1000.0, max_agents=5
        )
        sample = CoopDataset(dataset_cfg)[args.frame]
        batch = CoopCollate(cfg.model.grid)([sample]).to(device)
        link = V2XLink(LinkConfig())
        others = torch.arange(1, batch.num_agents, device=device)
        others_encode = cfg.model.fusion.method in ("late", "attfuse", "core")
        with torch.no_grad():
            forward = functools.partial(model, batch, link, with_loss=False, with_detections=True)
            total = timed(forward, args.repeats, args.warmup, device)
            encoders = timed(functools.partial(model.encode_agents, batch, others), args.repeats, args.warmup, device)
            output, _ = model(batch, link, with_loss=False, with_detections=True)
        rows.append(
            {
                "method": method,
                "agents": batch.num_agents,
                "points": int(batch.points.shape[0]),
                "weights": source,
                "all_agents_ms": float(np.median(total)),
                "all_agents_p90_ms": float(np.percentile(total, 90)),
                "others_encoders_ms": float(np.median(encoders)),
                # the others' encoders run on their own vehicles only where they encode at all
                "ego_side_ms": float(np.median(total) - (np.median(encoders) if others_encode else 0.0)),
                "bytes_per_frame": output.link.bytes_per_frame()[0],
            }
        )
        print(rows[-1], flush=True)

    lines = [
        "| method | agents | all agents, one process (ms, median / p90) | others' encoders (ms) | ego side (ms) | bytes / frame | weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['agents']} | {r['all_agents_ms']:.0f} / {r['all_agents_p90_ms']:.0f} | "
            f"{r['others_encoders_ms']:.0f} | {r['ego_side_ms']:.0f} | {r['bytes_per_frame']} | {r['weights']} |"
        )
    where = f"GPU {torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    settings = (f"{args.lidar} LiDAR, {rows[0]['points'] if rows else 0} points over {rows[0]['agents'] if rows else 0} agents, "
                f"{where}torch threads {args.threads}, {os.cpu_count()} CPU cores ({platform.machine()}), median of {args.repeats} runs.")
    table = "\n".join(lines) + "\n\n" + settings + "\n"
    (args.out / "latency.md").write_text(table)
    (args.out / "latency.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
