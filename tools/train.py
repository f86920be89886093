"""Train a cooperative perception model.

    python tools/train.py --config configs/perception/tiny.yaml [key.sub=value ...] [--out runs] [--resume]

The configuration (:class:`models.experiment.ExperimentConfig`; unknown keys are errors) is
resolved with the overrides and saved as ``RUN/config.yaml``, RUN being ``OUT/<name>``. Checkpoints
(``RUN/checkpoint.pt``: model, optimiser, schedule, position in the data) are written atomically
every ``train.checkpoint_every`` steps and at each epoch's end; ``--resume`` continues from one,
with the same configuration (else an error), at the same point of the same sample order. Scalars
go to tensorboard (``RUN/tb``). Same seed, same losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.collate import CoopCollate
from datasets.io import atomic_path
from models.comm import V2XLink
from models.config import ConfigError, save_resolved, to_dict
from models.experiment import ExperimentConfig, load_experiment, resolve_device
from models.perception import CooperativePerception, count_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML (configs/perception/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=2")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder of run folders")
    parser.add_argument("--resume", action="store_true", help="continue RUN/checkpoint.pt")
    return parser.parse_args(argv)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled sample indices of one epoch, in batches (same seed and epoch, same order)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()
    return [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg: ExperimentConfig = load_experiment(args.config, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = args.out / cfg.name
    checkpoint_path = run / "checkpoint.pt"
    if args.resume:
        if not checkpoint_path.is_file():
            print(f"error: --resume but no checkpoint at {checkpoint_path}", file=sys.stderr)
            return 2
        saved = load_experiment(run / "config.yaml")
        # a resumed run may be given more epochs or steps; everything else must match
        train = dataclasses.replace(cfg.train, epochs=saved.train.epochs, max_steps=saved.train.max_steps)
        now, before = to_dict(dataclasses.replace(cfg, train=train)), to_dict(saved)
        differ = [k for k in now if now[k] != before.get(k)]
        if differ:
            print(f"error: {run} was trained with other settings ({', '.join(sorted(differ))})", file=sys.stderr)
            return 2
    elif checkpoint_path.exists():
        print(f"error: {run} already holds a run; pass --resume or another name", file=sys.stderr)
        return 2
    run.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run / "config.yaml")

    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    dataset = cfg.dataset(training=True)
    collate = CoopCollate(cfg.model.grid)
    model = CooperativePerception(cfg.model).to(device)
    link = V2XLink(cfg.link)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = -(-len(dataset) // tc.batch_size)
    total_steps = tc.epochs * steps_per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=max(total_steps, 2), pct_start=0.3)
    step, epoch, batch_in_epoch = 0, 0, 0
    if args.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        schedule.total_steps = max(total_steps, 2)  # more steps may have been granted
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming {run} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def save_checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "torch_rng": torch.get_rng_state(),
            "config": to_dict(cfg),
        }
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)

    writer = SummaryWriter(str(run / "tb"))
    print(f"{cfg.name}: {cfg.model.fusion.method} fusion, {count_parameters(model):,} parameters, "
          f"{len(dataset)} samples, {total_steps} steps on {device}")
    model.train()
    bar = tqdm(total=total_steps, initial=step, unit="step", desc=cfg.name)
    while epoch < tc.epochs and step < total_steps:
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), tc.batch_size, tc.seed, epoch)
        loader = DataLoader(dataset, batch_sampler=batches[batch_in_epoch:], collate_fn=collate, num_workers=tc.num_workers)
        start = time.perf_counter()
        for batch in loader:
            batch = batch.to(device)
            _, loss = model(batch, link)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            batch_in_epoch += 1
            samples_per_s = batch.batch_size / (time.perf_counter() - start)  # loading included
            start = time.perf_counter()
            scalars = loss.scalars()
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", samples_per_s=f"{samples_per_s:.2f}")
            if step % tc.log_every == 0 or step == total_steps:
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
                writer.add_scalar("train/lr", schedule.get_last_lr()[0], step)
                writer.add_scalar("train/samples_per_s", samples_per_s, step)
            if step % tc.checkpoint_every == 0:
                save_checkpoint()
            if step >= total_steps:
                break
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
        save_checkpoint()
    bar.close()
    writer.close()
    save_checkpoint()
    print(f"done: {step} steps, checkpoint {checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

