"""Evaluate a trained perception run on a native dataset.

    python tools/eval.py --checkpoint RUN --data DIR [--split test] [--out RUN/eval] [key.sub=value ...]

RUN is a run folder of tools/train.py (or its checkpoint.pt); its saved config.yaml rebuilds the
model, and overrides (e.g. ``link.channel=dsrc data.pose_noise.std_xyz_m=0.2``) change the
evaluation conditions. DIR is a dataset root (then ``--split``, default the config's
``eval.split``), a split folder or a run folder.

Reports (``metrics.json`` and ``metrics.md`` in ``--out``):

- AP at each IoU threshold, BEV and 3D (exact rotated IoU from sim.box_ops; VOC all-point
  interpolation over detections sorted globally by score, see datasets/evaluation.py for how that
  differs from OpenCOOD's default), on all boxes and split by visibility: boxes the ego sees, and
  boxes only the other agents see;
- BEV segmentation IoU per class (free, vehicle, road) and their mean;
- bytes per message and per frame (``len`` of the encoded V2X messages);
- latency per frame: the model's wall-clock time for one sample (every agent's work, in this one
  process, batch size 1) and the radio latency of its messages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.collate import CoopCollate
from datasets.coop_dataset import Visibility
from datasets.evaluation import DetectionEvaluator, SegmentationEvaluator
from datasets.io import atomic_write_text
from models.comm import V2XLink
from models.config import ConfigError, save_resolved
from models.experiment import load_experiment, load_trained, resolve_device, run_paths
from models.heads.segmentation import SEGMENTATION_CLASSES
from models.threads import set_cpu_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="run folder (or its checkpoint.pt)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root, split folder or run folder")
    parser.add_argument("--split", default=None, help="split under --data (default: the config's eval.split)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/eval)")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0: all)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the saved config")
    return parser.parse_args(argv)


def summary(values: list[float]) -> dict[str, float]:
    """Mean, median, 90th percentile and max (NaN-free; zeros when empty)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(arr) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()),
    }


def markdown(metrics: dict) -> str:
    """The metrics as markdown tables."""
    lines = [f"# Evaluation of {metrics['run']} ({metrics['fusion']} fusion)", ""]
    lines += [f"{metrics['frames']} frames of `{metrics['data']}`.", ""]
    lines += ["| AP | IoU | all | visible to ego | only to others |", "|---|---|---|---|---|"]
    for kind in ("bev", "3d"):
        for key, row in metrics["ap"][kind].items():
            cells = [f"{row[s]['ap']:.3f} ({row[s]['num_gt']})" for s in ("all", "ego", "others_only")]
            lines.append(f"| {kind.upper()} | {key} | " + " | ".join(cells) + " |")
    lines += ["", "(number of boxes in brackets)", ""]
    seg = metrics.get("segmentation")
    if seg:
        lines += ["| segmentation IoU | " + " | ".join(SEGMENTATION_CLASSES) + " | mean |"]
        lines += ["|---" * (len(SEGMENTATION_CLASSES) + 2) + "|"]
        lines += ["| | " + " | ".join(f"{seg['iou'][c]:.3f}" for c in SEGMENTATION_CLASSES) + f" | {seg['mean_iou']:.3f} |", ""]
    b, lat = metrics["bytes"], metrics["latency_ms"]
    lines += ["| | mean | p50 | p90 | max |", "|---|---|---|---|---|"]
    lines += [f"| bytes per message | {b['per_message']['mean']:.0f} | {b['per_message']['p50']:.0f} | "
              f"{b['per_message']['p90']:.0f} | {b['per_message']['max']:.0f} |"]
    lines += [f"| bytes per frame | {b['per_frame']['mean']:.0f} | {b['per_frame']['p50']:.0f} | "
              f"{b['per_frame']['p90']:.0f} | {b['per_frame']['max']:.0f} |"]
    for name in ("compute", "link"):
        s = lat[name]
        lines += [f"| {name} latency per frame, ms | {s['mean']:.1f} | {s['p50']:.1f} | {s['p90']:.1f} | {s['max']:.1f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run, checkpoint = run_paths(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = load_experiment(run / "config.yaml", args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = args.split if args.split is not None else cfg.eval.split
    if not (args.data / split).is_dir():
        split = ""  # --data is already a split or run folder
    if cfg.train.num_threads:
        set_cpu_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    try:
        dataset = cfg.dataset(root=str(args.data), split=split, training=False)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        model, unused = load_trained(cfg, checkpoint, device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if unused:
        print(f"note: {len(unused)} trained tensors are unused by {cfg.model.fusion.method} fusion")
    link = V2XLink(cfg.link)
    count = len(dataset) if not args.max_samples else min(args.max_samples, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=1, collate_fn=CoopCollate(cfg.model.grid))

    detection = DetectionEvaluator(thresholds=tuple(cfg.eval.iou_thresholds))
    segmentation = SegmentationEvaluator(len(SEGMENTATION_CLASSES))
    bytes_per_message, bytes_per_frame, compute_ms, link_ms = [], [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", unit="frame"):
            batch = batch.to(device)
            start = time.perf_counter()
            output, _ = model(batch, link, with_loss=False, with_detections=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            compute_ms.append(1000.0 * (time.perf_counter() - start))
            detections = output.detections[0]
            keep = detections.scores >= cfg.eval.score_threshold
            gt_boxes, _, gt_visibility = batch.sample_gt(0)
            detection.add(detections.boxes[keep], detections.scores[keep], gt_boxes.cpu().numpy(), gt_visibility.cpu().numpy())
            if output.segmentation_logits is not None:
                clouds, semantic = model.holistic_clouds(batch)
                target = model.segmentation_targets(batch, clouds, semantic)[0]
                segmentation.add(output.segmentation_logits[0].argmax(0).cpu().numpy(), target.cpu().numpy())
            bytes_per_message += output.link.bytes_per_message()
            bytes_per_frame += output.link.bytes_per_frame()
            link_ms += [1000.0 * v for v in output.link.latency_per_frame()]

    subsets = {"all": None, "ego": (int(Visibility.EGO),), "others_only": (int(Visibility.OTHERS_ONLY),)}
    ap = {
        kind: {
            f"{t:.2f}": {
                name: vars(detection.average_precision(kind, t, groups)) for name, groups in subsets.items()
            }
            for t in cfg.eval.iou_thresholds
        }
        for kind in detection.iou_kinds
    }
    metrics = {
        "run": str(run),
        "data": str(Path(args.data) / split),
        "fusion": cfg.model.fusion.method,
        "frames": detection.num_frames,
        "ap": ap,
        "bytes": {"per_message": summary(bytes_per_message), "per_frame": summary(bytes_per_frame)},
        "latency_ms": {"compute": summary(compute_ms), "link": summary(link_ms)},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if model.segmentation is not None and detection.num_frames:
        iou = segmentation.iou()
        metrics["segmentation"] = {
            "iou": {c: float(v) for c, v in zip(SEGMENTATION_CLASSES, iou, strict=True)},
            "mean_iou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        }
    out = args.out or run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    atomic_write_text(out / "metrics.md", markdown(metrics))
    save_resolved(cfg, out / "config.yaml")
    print(markdown(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
