"""Data-parallel training across processes (``torchrun``): start-up, teardown, and what keeps a
run of N processes equal to one process with the same global batch.

``torchrun --nproc_per_node N tools/train.py ...`` starts N copies of the script with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in their environment; :func:`init_distributed` reads them and joins the
process group (gloo on CPU, nccl on CUDA, process ``LOCAL_RANK`` on GPU ``LOCAL_RANK``). Without
them it returns a one-process :class:`DistributedContext` and every function here does nothing.

What would differ between N processes (each with 1/N of the batch, gradients averaged by DDP) and
one process with the whole batch, and what is done about it:

- Losses normalised by a count over the batch (positives of the focal loss, observed cells of the
  segmentation loss, elements of a mean): each process divides its own sum by the mean count over
  processes (:func:`loss_normaliser`, :func:`reduce_mean` as in mmdet), so that the gradients DDP
  averages add up to the gradient of the whole batch's loss. Logged losses are averaged the same way.
- Batch normalisation: statistics over the whole batch (:func:`convert_sync_batchnorm`):
  ``torch.nn.SyncBatchNorm`` on CUDA, :class:`AllReduceBatchNorm` on CPU, whose output is bit for
  bit the single process's (with :class:`models.sparse_backbone.VoxelBatchNorm1d` for voxels).
- The sample order: :func:`split_batch` gives each process its share of every global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "AllReduceBatchNorm",
    "DistributedContext",
    "convert_sync_batchnorm",
    "env_rank",
    "init_distributed",
    "is_distributed",
    "loss_normaliser",
    "reduce_mean",
    "split_batch",
]


def env_rank() -> int:
    """This process's rank as ``torchrun`` sets it (0 without torchrun), before any process group."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """True when a process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class DistributedContext:
    """Where this process stands in the job.

    Attributes:
        rank: 0 .. world_size - 1 (0 alone writes files and logs).
        local_rank: rank on this machine (the GPU index on CUDA).
        world_size: number of processes (1: a plain run, no process group).
        device: this process's device.
        sync_group: the process group of the batch-norm statistics (None in a plain run); kept
            apart from the default group, whose gradient all-reduces DDP runs during the backward
            pass at the same time as batch norm's own.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sync_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by torchrun (a process group is up, possibly of one process)."""
        return dist.is_available() and dist.is_initialized()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.launched:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (safe to call twice, and without one)."""
        if self.launched:
            dist.destroy_process_group()


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the torchrun job described by the environment, or a plain one-process context.

    Args:
        device: the configured device (:func:`models.experiment.resolve_device`); under torchrun,
            CUDA means ``cuda:LOCAL_RANK`` and the nccl backend, CPU the gloo backend.
        timeout_s: how long a collective waits for the other processes before failing.

    Raises:
        ValueError: fewer GPUs than processes on this machine.
    """
    if "WORLD_SIZE" not in os.environ:
        return DistributedContext(device=device)
    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank} on this machine but only {torch.cuda.device_count()} GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    init_kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **init_kwargs)
    sync_group = dist.new_group(backend=backend, timeout=timeout) if world_size > 1 else None
    return DistributedContext(rank, local_rank, world_size, device, sync_group)


def split_batch(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch: sizes differ by at most one, rank order
    follows the batch order (concatenating the shares of ranks 0..N-1 gives ``indices`` back)."""
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over processes (``value`` itself in a plain run); no gradient.

    A loss written as ``local_sum / reduce_mean(local_count)`` has, averaged over processes (what
    DDP does to gradients), the gradient of ``sum of all sums / sum of all counts``: the loss of
    the whole batch. Every process must call it, the same number of times, in the same order.
    """
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def loss_normaliser(count: torch.Tensor, minimum: float = 1.0) -> torch.Tensor:
    """The divisor that turns a loss summed over this process's share of the batch into the
    batch's mean loss (DDP then averages the gradients over processes).

    Args:
        count: this process's count (positives, observed cells, elements), a float scalar.
        minimum: the least total count divided by (1: a batch without positives divides by 1).

    Returns:
        ``max(count, minimum)`` in a plain run; under DDP ``max(sum of counts, minimum) / world``.
    """
    if not is_distributed():
        return count.clamp(min=minimum)
    return reduce_mean(count).clamp(min=minimum / dist.get_world_size())


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the gradients (each process's input feeds
    every process's output). ``torch.distributed.nn.functional.all_reduce`` does the same but is
    deprecated."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = value.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over every process's batch, for CPU training (gloo).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.13: "SyncBatchNorm expected input tensor
    to be on GPU"), so CPU runs use this layer: per-channel sums are all-reduced, with autograd
    through the all-reduce (:class:`_AllReduceSum`) for the backward pass.

    The forward pass repeats torch's CPU kernel for contiguous inputs operation by operation
    (``aten/src/ATen/native/cpu/batch_norm_kernel.cpp``): float64 sums of the input and of the
    float32 squared deviations, float32 mean and variance, ``1 / sqrt(var + eps)`` in float64, and
    the fused multiply-adds ``beta = bias - mean * alpha`` and ``out = x * alpha + beta``
    (emulated in float64, where a float32 product is exact). Only the order of the float64 sums
    differs, so the output is bit for bit what one process computes on the whole batch (checked on
    random inputs). That matters: a ReLU after batch norm turns a last-bit difference at zero
    into a gradient that flows or not, and Adam turns any gradient into a step of about the
    learning rate. Running statistics are updated as torch does (global mean, unbiased variance).
    Evaluation mode, and training without a process group, use the plain batch norm.

    Input float32 (N, C, *) as BatchNorm1d/2d/3d ((V, C) voxel features included: the sums do not
    depend on the layout). Every process must run the same batch-norm layers in the same order; the
    backward pass then reduces them in the same (reverse) order everywhere.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if input.dtype != torch.float32:
            raise ValueError(f"AllReduceBatchNorm repeats torch's float32 kernel, got {input.dtype}")
        f64 = torch.float64
        shape = [1, -1] + [1] * (input.dim() - 2)  # per channel, broadcast over (N, C, *)
        dims = [0, *range(2, input.dim())]
        rows = input.new_tensor([input.numel() // input.shape[1]], dtype=f64)
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims, dtype=f64), rows]), self.group)  # (C + 1,)
        n = int(sums[-1].item())
        if n < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel over all processes, got {n}")
        mean = (sums[:-1] / n).float()  # (C,)
        centred = input - mean.view(shape)
        var_sum = _AllReduceSum.apply((centred * centred).sum(dims, dtype=f64), self.group).float()  # (C,)
        var = var_sum / torch.tensor(float(n), dtype=torch.float32, device=input.device)
        invstd = (1.0 / torch.sqrt(var.double() + self.eps)).float()
        weight = self.weight if self.affine else torch.ones_like(invstd)
        bias = self.bias if self.affine else torch.zeros_like(invstd)
        alpha = invstd * weight
        beta = (bias.double() - mean.double() * alpha.double()).float()  # fused multiply-add
        out = (input.double() * alpha.view(shape).double() + beta.view(shape).double()).float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                m = torch.tensor(factor, dtype=torch.float32, device=input.device)
                unbiased = var_sum.detach() / torch.tensor(
                    float(n - 1), dtype=torch.float32, device=input.device
                )
                self.running_mean.copy_(m * mean.detach() + (1 - m) * self.running_mean)
                self.running_var.copy_(
                    (m.double() * unbiased.double() + ((1 - m) * self.running_var).double()).float()
                )
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, context: DistributedContext) -> nn.Module:
    """``module`` with every BatchNorm layer normalising over all processes' batches (no change in a
    one-process run): ``torch.nn.SyncBatchNorm`` on CUDA, :class:`AllReduceBatchNorm` elsewhere.
    Parameters, buffers and state-dict keys are kept."""
    if context.world_size == 1:
        return module
    if context.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, context.sync_group)
    return _convert(module, context.sync_group)


def _convert(module: nn.Module, group: Any) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, group
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
