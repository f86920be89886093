"""Where a trained cooperative model loses the vehicles the ego cannot see: detection confidence
at their box centres along the way from the senders' maps to the fused one.

    python bench/hidden_confidence.py --checkpoint RUN --data DIR [--split test] [--every 2] \
        [--out DIR] [key.sub=value ...]

For every ``--every``-th test frame (batch size 1, the evaluation's conditions, overrides as in
``tools/eval.py``), and for every box hidden from the ego (visible only to other agents) and every
box the ego sees, the highest anchor probability of the detection head in the 3 x 3 cells around
the box centre (the head reads one cell per anchor), on:

- ``ego only``: the ego's own map through the neck (what ego-only inference would see);
- ``best sender``: each sender's own map through the neck (in the ego frame: warped as the
  receiver warps its cells, or encoded there with ``proj_first``), the highest over senders;
- ``fused, all cells``: the fused map with every cell sent (``max_cells=0``, same weights);
- ``fused``: the fused map as configured (the model's real message budget).

The background is every cell more than ``--background-m`` from any labelled box centre; its
99.9th percentile on each map is the level a box must clear to be found at a useful threshold.
For attfuse with attention (``fusion.combine``) the share of attention the ego gives the senders at the hidden centres is printed
too (1 - the weight of its own row; the median over centres covered by a received map).

Prints a markdown table (medians over boxes) and writes ``hidden_confidence.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets.collate import CoopCollate
from datasets.coop_dataset import Visibility
from datasets.io import atomic_write_text
from models.bev import warp_to_ego
from models.comm import V2XLink
from models.config import ConfigError
from models.experiment import load_experiment, load_trained, resolve_device, run_paths
from models.fusion.attfuse import AttentionFusion
from models.perception import CooperativePerception

MAPS = ("ego only", "best sender", "fused, all cells", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="run folder of tools/train.py (or its checkpoint.pt)")
    parser.add_argument("--data", type=Path, required=True, help="dataset root or split folder")
    parser.add_argument("--split", default="test", help="split under --data (default: test)")
    parser.add_argument("--every", type=int, default=2, help="use every N-th frame (default: 2)")
    parser.add_argument("--background-m", type=float, default=5.0, help="background: cells this far from any box centre")
    parser.add_argument("--out", type=Path, default=None, help="folder for hidden_confidence.json (default: RUN/hidden_confidence)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the saved config")
    args = parser.parse_args(argv)
    if args.every < 1 or args.background_m <= 0:
        parser.error("--every must be >= 1 and --background-m > 0")
    return args


def around_centres(confidence: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
    """(M,) highest value of an (H, W) map in the 3 x 3 cells around each (row, col)."""
    pooled = torch.nn.functional.max_pool2d(confidence[None, None], 3, stride=1, padding=1)[0, 0]
    return pooled[rows, cols].cpu().numpy()


def sender_confidence(model: CooperativePerception, batch, device: torch.device) -> torch.Tensor:
    """(H, W) highest confidence over the senders' own maps, in the ego frame (zeros without one)."""
    h, w = model.bev_grid.shape
    n = int(batch.agents_per_sample[0])
    if n == 1:
        return torch.zeros(h, w, device=device)
    senders = torch.arange(1, n, device=device)
    proj_first = model.config.fusion.proj_first
    features = model.encode_agents(batch, senders, in_ego_frame=proj_first)
    confidence = model.detection.confidence(model.neck(features))[:, None]  # (S, 1, H, W)
    if not proj_first:
        confidence, _ = warp_to_ego(confidence, batch.T_ego_from_agent_measured[1:n], model.bev_grid)
    return confidence[:, 0].amax(dim=0)


class AttentionProbe:
    """Records the ego's attention weights of attfuse's last call (forward hook on its inputs)."""

    def __init__(self, model: CooperativePerception) -> None:
        self.sender_share: torch.Tensor | None = None  # (H, W), NaN where no sender's map arrived
        attends = isinstance(model.attention, AttentionFusion)  # attfuse with combine=attention
        self.handle = model.attention.register_forward_hook(self._hook) if attends else None

    def _hook(self, module: AttentionFusion, inputs, output) -> None:
        features, valid = inputs  # (A, C, H, W), (A, 1, H, W)
        h, w = features.shape[-2:]
        share = 1.0 - module.weights(features, valid)[:, 0, 0]  # (HW,)
        share[~valid[1:].flatten(1).any(dim=0)] = float("nan")  # no sender's map covers the cell
        self.sender_share = share.reshape(h, w)


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
    if cfg.model.fusion.method not in ("attfuse", "core") or cfg.model.fusion.message != "bev":
        print("error: this diagnosis is for intermediate fusion of BEV cells (attfuse, core)", file=sys.stderr)
        return 2
    device = resolve_device(cfg.train.device)
    split = args.split if (args.data / args.split).is_dir() else ""
    try:
        dataset = cfg.dataset(root=str(args.data), split=split, training=False)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    all_cells = load_experiment(run / "config.yaml", [*args.overrides, "model.fusion.compressor.max_cells=0"])
    try:
        model, _ = load_trained(cfg, checkpoint, device)
        model_all_cells, _ = load_trained(all_cells, checkpoint, device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    probe = AttentionProbe(model_all_cells)
    link = V2XLink(cfg.link)
    frames = range(0, len(dataset), args.every)
    loader = DataLoader(Subset(dataset, frames), batch_size=1, collate_fn=CoopCollate(cfg.model.grid))
    grid = model.bev_grid
    centres = grid.cell_centres(device)  # (H, W, 2)

    at = {group: {name: [] for name in MAPS} for group in ("hidden", "visible")}
    background = {name: [] for name in MAPS}
    shares: list[float] = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="frames", unit="frame"):
            batch = batch.to(device)
            maps = {
                "ego only": model.detection.confidence(model.neck(model.encode_agents(batch, batch.ego_agent_index)))[0],
                "best sender": sender_confidence(model, batch, device),
            }
            output, _ = model_all_cells(batch, link, with_loss=False)
            maps["fused, all cells"] = model_all_cells.detection.confidence(output.fused_features)[0]
            output, _ = model(batch, link, with_loss=False)
            maps["fused"] = model.detection.confidence(output.fused_features)[0]

            boxes, _, visibility = batch.sample_gt(0)
            rows, cols, inside = grid.cell_of(boxes[:, :2])
            far = torch.ones(grid.shape, dtype=torch.bool, device=device)
            if len(boxes):
                distance = torch.cdist(centres.reshape(-1, 2), boxes[:, :2].float()).amin(dim=1)
                far = (distance > args.background_m).reshape(grid.shape)
            for name, confidence in maps.items():
                background[name].append(confidence[far].cpu().numpy())
            for group, code in (("hidden", Visibility.OTHERS_ONLY), ("visible", Visibility.EGO)):
                keep = inside & (visibility == int(code))
                if not bool(keep.any()):
                    continue
                for name, confidence in maps.items():
                    at[group][name].extend(around_centres(confidence, rows[keep], cols[keep]).tolist())
                if group == "hidden" and probe.sender_share is not None:
                    values = probe.sender_share[rows[keep], cols[keep]].cpu().numpy()
                    shares.extend(values[np.isfinite(values)].tolist())

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else float("nan")

    result = {
        "run": str(run),
        "data": str(args.data / split),
        "frames": len(frames),
        "boxes": {group: len(at[group]["fused"]) for group in at},
        "median_at_centres": {group: {name: median(at[group][name]) for name in MAPS} for group in at},
        "background_p999": {
            name: float(np.percentile(np.concatenate(background[name]), 99.9)) if background[name] else float("nan")
            for name in MAPS
        },
        "attention_sender_share_at_hidden": median(shares) if probe.handle is not None else None,
    }
    out = args.out or run / "hidden_confidence"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "hidden_confidence.json", json.dumps(result, indent=2, allow_nan=True) + "\n")
    print(f"{run} on {result['frames']} frames of {result['data']} ({cfg.model.fusion.method})\n")
    print("| map | hidden boxes (" + str(result["boxes"]["hidden"]) + ") | boxes the ego sees ("
          + str(result["boxes"]["visible"]) + ") | background p99.9 |")
    print("|---|---|---|---|")
    for name in MAPS:
        print(
            f"| {name} | {result['median_at_centres']['hidden'][name]:.3f} | "
            f"{result['median_at_centres']['visible'][name]:.3f} | {result['background_p999'][name]:.3f} |"
        )
    if result["attention_sender_share_at_hidden"] is not None:
        print(f"\nattention on the senders at hidden centres (median): {result['attention_sender_share_at_hidden']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
