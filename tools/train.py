"""Train a cooperative perception model.

    python tools/train.py --config configs/perception/tiny.yaml [key.sub=value ...] [--out runs] [--resume]

The configuration (:class:`models.experiment.ExperimentConfig`; unknown keys are errors) is
resolved with the overrides and saved as ``RUN/config.yaml``, RUN being ``OUT/<name>``. Checkpoints
(``RUN/checkpoint.pt``: model, optimiser, schedule, position in the data) are written atomically
every ``train.checkpoint_every`` steps and at each epoch's end; ``--resume`` continues from one,
with the same configuration (else an error), at the same point of the same sample order. Scalars
go to tensorboard (``RUN/tb``). Same seed, same losses. The end prints the global steps per second.

Several processes or GPUs (DDP), on one machine:

    torchrun --nproc_per_node 2 tools/train.py --config configs/perception/tiny.yaml [key.sub=value ...]

``train.batch_size`` is then the global batch: it must be divisible by the number of processes,
and each process takes its share of every batch of the single-process sample order. Gradients are
averaged across processes, batch norm and the loss normalisers cover the whole batch
(``models/distributed.py``), so N processes train the model one process would with the same batch.
Backend gloo on CPU, nccl on CUDA (``train.device=cuda``: process LOCAL_RANK on GPU LOCAL_RANK).
Process 0 alone writes the configuration, checkpoints and tensorboard and shows the progress bar;
``--resume`` hands process 0's checkpoint to every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.collate import CoopCollate
from datasets.io import atomic_path
from models.comm import V2XLink
from models.config import ConfigError, save_resolved, to_dict
from models.distributed import (
    DistributedContext,
    convert_sync_batchnorm,
    env_rank,
    init_distributed,
    reduce_mean,
    split_batch,
)
from models.experiment import ExperimentConfig, load_experiment, resolve_device
from models.perception import CooperativePerception, count_parameters
from models.threads import set_cpu_threads


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


def fail(message: str) -> int:
    """Report a usage error (process 0 only, under torchrun) and return the exit status 2."""
    if env_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    return 2


def check_run(args: argparse.Namespace, cfg: ExperimentConfig, run: Path) -> str | None:
    """Why the run folder cannot be used as asked (None: it can)."""
    checkpoint_path = run / "checkpoint.pt"
    if args.resume:
        if not checkpoint_path.is_file():
            return f"--resume but no checkpoint at {checkpoint_path}"
        saved = load_experiment(run / "config.yaml")
        # a resumed run may be given more epochs or steps; everything else must match
        train = dataclasses.replace(cfg.train, epochs=saved.train.epochs, max_steps=saved.train.max_steps)
        now, before = to_dict(dataclasses.replace(cfg, train=train)), to_dict(saved)
        differ = [k for k in now if now[k] != before.get(k)]
        if differ:
            return f"{run} was trained with other settings ({', '.join(sorted(differ))})"
    elif checkpoint_path.exists():
        return f"{run} already holds a run; pass --resume or another name"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg: ExperimentConfig = load_experiment(args.config, args.overrides)
        context = init_distributed(resolve_device(cfg.train.device))  # one process without torchrun
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return fail(str(err))
    try:
        return train(args, cfg, context)
    finally:
        context.close()


def train(args: argparse.Namespace, cfg: ExperimentConfig, context: DistributedContext) -> int:
    """The training run of this process (one of ``context.world_size``)."""
    tc = cfg.train
    world, device = context.world_size, context.device
    run = args.out / cfg.name
    checkpoint_path = run / "checkpoint.pt"
    if tc.batch_size % world:
        return fail(f"train.batch_size {tc.batch_size} is the global batch: it must be divisible by the "
                    f"{world} processes")
    problem = context.broadcast(check_run(args, cfg, run) if context.is_main else None)
    if problem is not None:
        return fail(problem)
    dataset = cfg.dataset(training=True)
    if 0 < len(dataset) % tc.batch_size < world:
        return fail(f"the last batch of an epoch holds {len(dataset) % tc.batch_size} of {len(dataset)} samples, "
                    f"fewer than the {world} processes: choose another train.batch_size")
    if context.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run / "config.yaml")

    if tc.num_threads:
        set_cpu_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    collate = CoopCollate(cfg.model.grid)
    # batch norm over the whole batch under DDP (plain batch norm in one process)
    model = convert_sync_batchnorm(CooperativePerception(cfg.model), context).to(device)
    link = V2XLink(cfg.link)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = -(-len(dataset) // tc.batch_size)
    total_steps = tc.epochs * steps_per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=max(total_steps, 2), pct_start=0.3)
    step, epoch, batch_in_epoch = 0, 0, 0
    if args.resume:
        # process 0's checkpoint, on every process: all resume from the same state and position
        state = context.broadcast(
            torch.load(checkpoint_path, map_location="cpu", weights_only=False) if context.is_main else None
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        schedule.total_steps = max(total_steps, 2)  # more steps may have been granted
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        if context.is_main:
            print(f"resuming {run} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    # gradients averaged over processes; which parameters a batch uses depends on its agents
    net = model
    if context.launched:
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def save_checkpoint() -> None:
        if not context.is_main:
            return
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

    writer = SummaryWriter(str(run / "tb")) if context.is_main else None
    if context.is_main:
        processes = f" x {world} processes" if world > 1 else ""
        print(f"{cfg.name}: {cfg.model.fusion.method} fusion, {count_parameters(model):,} parameters, "
              f"{len(dataset)} samples, {total_steps} steps on {device}{processes}")
    net.train()
    bar = tqdm(total=total_steps, initial=step, unit="step", desc=cfg.name, disable=not context.is_main)
    first_step, started = step, time.perf_counter()
    while epoch < tc.epochs and step < total_steps:
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), tc.batch_size, tc.seed, epoch)
        shares = [split_batch(b, context.rank, world) for b in batches[batch_in_epoch:]]
        loader = DataLoader(dataset, batch_sampler=shares, collate_fn=collate, num_workers=tc.num_workers)
        start = time.perf_counter()
        for batch in loader:
            batch = batch.to(device)
            _, loss = net(batch, link)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            schedule.step()
            samples = len(batches[batch_in_epoch])  # the global batch
            step += 1
            batch_in_epoch += 1
            samples_per_s = samples / (time.perf_counter() - start)  # loading included
            start = time.perf_counter()
            scalars = loss.scalars()
            if world > 1:  # the whole batch's loss: the mean of the processes' (see models.distributed)
                mean = reduce_mean(torch.tensor(list(scalars.values()), dtype=torch.float64, device=device))
                scalars = dict(zip(scalars, mean.tolist(), strict=True))
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", samples_per_s=f"{samples_per_s:.2f}")
            if writer is not None and (step % tc.log_every == 0 or step == total_steps):
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
    elapsed = time.perf_counter() - started
    bar.close()
    if writer is not None:
        writer.close()
    save_checkpoint()
    context.barrier()  # every process ends once the last checkpoint is written
    if context.is_main:
        steps_per_s = (step - first_step) / elapsed if elapsed > 0 else 0.0
        print(f"done: {step} steps, {steps_per_s:.3f} steps/s ({step - first_step} steps in {elapsed:.1f} s, "
              f"{world} process{'es' if world > 1 else ''}), checkpoint {checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

