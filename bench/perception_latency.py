"""Inference latency of cooperative perception with five agents, per fusion method.

    python bench/perception_latency.py [--runs outputs/perception_compare/runs] [--out outputs/perception_latency]
        [--compare-plain | --plain]

Takes one frame with five connected agents (ego + 4; generated with ``--lidar`` if ``--data`` is
not given), batch size 1, eval mode, ideal channel, under ``torch.inference_mode``, and times per
method over ``--repeats`` runs after ``--warmup``:

- **all agents**: ``model(batch, link, with_detections=True)``: every agent's encoder, the codec
  round trips, fusion, heads, decoding and NMS, serially in this one process;
- **others' encoders**: the four other agents' encoders alone (they run on their own vehicles;
  with ``proj_first`` they include moving the points into the ego frame and voxelising them);
- **ego side**: all agents minus others' encoders (late, attfuse, core; none and early run no
  encoder for the others): what the ego computes per frame when the others encode in parallel on
  their vehicles (their compression, codecs and, for late fusion, their heads and NMS are still
  counted here);
- **ego critical path**: ego side minus the rest of the senders' own work, timed in the same runs
  by :class:`models.perception.SenderClock`: cell selection (with the request warped into the
  sender's frame), compression and codec encoding of their messages (BEV cells, keypoints, raw
  points for early fusion, detection sets), and for late fusion their heads, decoding and NMS.
  What stays counted: the ego's encoder, its request, the link (wire framing, bus, and the
  decoding of what arrives), fusion, heads, decoding and NMS (and, for models as trained, the
  confidence maps that they compute for all agents in one call). The wait for the others is not
  included (it is the radio latency, reported by ``bench/perception_compare.py``). On CUDA the
  clock sees the host's time only (kernels run asynchronously), so this column is a CPU measure.

**model**: on CPU the models run as the "inference copy" that
:meth:`models.perception.CooperativePerception.fuse_for_inference` makes (batch norm folded, sparse
3D backbone as plain torch ops, fusion only at the cells a received map covers; same outputs up to
float32 rounding). ``--compare-plain`` adds a row per method for the model "as trained", the two
taking turns run by run so that both see the same machine load; ``--plain`` times only the models
as trained. On CUDA they always run as trained (spconv's implicit GEMM is the fast path there; the
inference copy is written and tested for CPU).

Models are loaded from ``--runs/<method>/`` when given (trained weights, so that decoding and NMS
see realistic scores); otherwise the configs' untrained models with the decoding threshold at 0,
which keeps NMS busy with the maximum number of boxes (a pessimistic case).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from models.perception import CooperativePerception, SenderClock
from models.threads import set_cpu_threads

ROOT = Path(__file__).resolve().parents[1]

METHODS = (
    "none", "early", "late", "attfuse", "attfuse_keypoints", "attfuse_proj_first", "core", "core_proj_first",
    "core_reconstruction", "attfuse_before_2d",
)


@dataclasses.dataclass
class Timings:
    """Milliseconds per timed run of one model.

    Attributes:
        total: (R,) the whole forward, ``model(batch, link, with_detections=True)``.
        senders: (R,) the senders' own work inside those forwards (:class:`SenderClock`).
        others_encoders: (R,) ``model.encode_agents(batch, others)`` alone (in the ego frame for
            ``proj_first`` models, points moved and voxelised included; the sparse backbone only
            for models fused before the 2D backbone, whose senders run their 2D backbone for the
            confidence that picks cells, counted in ``senders``).
    """

    total: np.ndarray
    senders: np.ndarray
    others_encoders: np.ndarray


def timed_interleaved(
    models: list[CooperativePerception],
    batch,
    link: V2XLink,
    others: torch.Tensor,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> list[Timings]:
    """Wall-clock timings of each model over ``repeats`` runs after ``warmup`` runs.

    The models take turns run by run (in alternating order), so that when several are compared
    (``--compare-plain``) they see the same machine load; on a shared machine the load drifts by
    tens of percent within minutes. On CUDA each timed call waits for the GPU's queued work before
    the clock stops.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def clocked(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return 1000.0 * (time.perf_counter() - start)

    runs = [{"total": [], "senders": [], "others_encoders": []} for _ in models]
    clocks = [SenderClock() for _ in models]
    try:
        for i in range(warmup + repeats):
            order = range(len(models)) if i % 2 == 0 else reversed(range(len(models)))
            for j in order:
                model, clock = models[j], clocks[j]
                model.sender_clock = clock
                clock.seconds = 0.0
                total = clocked(lambda m=model: m(batch, link, with_loss=False, with_detections=True))
                senders = 1000.0 * clock.seconds
                model.sender_clock = None
                encoders = clocked(
                    lambda m=model: m.encode_agents(
                        batch,
                        others,
                        in_ego_frame=m.config.fusion.proj_first,
                        bev_backbone=not m.config.fusion.before_bev_backbone,
                    )
                )
                if i >= warmup:
                    runs[j]["total"].append(total)
                    runs[j]["senders"].append(senders)
                    runs[j]["others_encoders"].append(encoders)
    finally:
        for model in models:
            model.sender_clock = None
    return [Timings(**{k: np.asarray(v) for k, v in r.items()}) for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="dataset folder with a 5-cav run (default: generate one)"
    )
    parser.add_argument("--runs", type=Path, default=None, help="folder of trained runs named by method")
    parser.add_argument("--out", type=Path, default=Path("outputs/perception_latency"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lidar", default="vlp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--frame", type=int, default=1, help="sample index in the data")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument(
        "--plain", action="store_true", help="time the models as trained only (no fuse_for_inference)"
    )
    parser.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time the models as trained, taking turns with the inference copies run by run",
    )
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
                [
                    sys.executable,
                    "tools/generate.py",
                    "--scenario",
                    "random_traffic",
                    "--frames",
                    "3",
                    "--seed",
                    "7",
                    "--out",
                    str(data),
                    "--lidar",
                    args.lidar,
                    "--cavs",
                    "5",
                    "--split",
                    "test",
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
        data = data / "test"

    load_start = os.getloadavg()[0]
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
            cfg = load_experiment(
                ROOT / "configs" / "perception" / f"{name}.yaml",
                ["model.fusion.method=late"] if method == "late" else [],
            )
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, detection=DetectionHeadConfig(score_threshold=0.0))
            )
            weights = None
            source = "untrained, threshold 0"
        torch.manual_seed(0)
        model = CooperativePerception(cfg.model).eval()
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        model = model.to(device)
        models = {"as trained": model}
        if not args.plain and device.type == "cpu":
            models = {"inference copy": model.fuse_for_inference()}
            if args.compare_plain:
                models["as trained"] = model
        dataset_cfg = dataclasses.replace(
            cfg.dataset_config(root=str(data), split="", training=False),
            ego="lowest_id",
            comm_range_m=1000.0,
            max_agents=5,
        )
        sample = CoopDataset(dataset_cfg)[args.frame]
        batch = CoopCollate(cfg.model.grid)([sample]).to(device)
        link = V2XLink(LinkConfig())
        others = torch.arange(1, batch.num_agents, device=device)
        others_encode = cfg.model.fusion.method in ("late", "attfuse", "core")
        with torch.inference_mode():
            timings = timed_interleaved(
                list(models.values()), batch, link, others, args.repeats, args.warmup, device
            )
        for (kind, timed_model), t in zip(models.items(), timings, strict=True):
            with torch.inference_mode():
                output, _ = timed_model(batch, link, with_loss=False, with_detections=True)
            others_encoders_ms = float(np.median(t.others_encoders)) if others_encode else 0.0
            rows.append(
                {
                    "method": method,
                    "model": kind,
                    "agents": batch.num_agents,
                    "points": int(batch.points.shape[0]),
                    "weights": source,
                    "all_agents_ms": float(np.median(t.total)),
                    "all_agents_p90_ms": float(np.percentile(t.total, 90)),
                    "others_encoders_ms": float(np.median(t.others_encoders)),
                    # the others' encoders run on their own vehicles only where they encode at all
                    "ego_side_ms": float(np.median(t.total)) - others_encoders_ms,
                    "senders_other_work_ms": float(np.median(t.senders)),
                    "ego_critical_path_ms": float(np.median(t.total - t.senders)) - others_encoders_ms,
                    "bytes_per_frame": output.link.bytes_per_frame()[0],
                }
            )
            print(rows[-1], flush=True)

    lines = [
        "| method | agents | all agents, one process (ms, median / p90) | others' encoders (ms) | ego side (ms) "
        "| senders' other work (ms) | ego critical path (ms) | bytes / frame | weights | model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['agents']} | {r['all_agents_ms']:.0f} / {r['all_agents_p90_ms']:.0f} | "
            f"{r['others_encoders_ms']:.0f} | {r['ego_side_ms']:.0f} | {r['senders_other_work_ms']:.0f} | "
            f"{r['ego_critical_path_ms']:.0f} | {r['bytes_per_frame']} | {r['weights']} | {r['model']} |"
        )
    where = f"GPU {torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    settings = (
        f"{args.lidar} LiDAR, {rows[0]['points'] if rows else 0} points over {rows[0]['agents'] if rows else 0} agents, "
        f"{where}torch threads {args.threads}, {os.cpu_count()} CPU cores ({platform.machine()}), median of {args.repeats} runs, "
        f"load average {load_start:.2f} at the start and {os.getloadavg()[0]:.2f} at the end (1 min)."
    )
    table = "\n".join(lines) + "\n\n" + settings + "\n"
    (args.out / "latency.md").write_text(table)
    (args.out / "latency.json").write_text(
        json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str) + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
