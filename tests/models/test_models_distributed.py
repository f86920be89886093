"""models/distributed.py: batch shares, loss normalisers and batch norm over processes (gloo on CPU,
processes spawned here) against one process holding the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models.distributed import (
    AllReduceBatchNorm,
    DistributedContext,
    convert_sync_batchnorm,
    loss_normaliser,
    split_batch,
)
from models.sparse_backbone import VoxelBatchNorm1d

WORLD = 3
ROWS = (4, 3, 3)  # uneven shares of the 10 samples / voxels
SPATIAL = (1, 6, 5)  # (channels of the 1D layer, H, W of the 2D one)


@pytest.mark.parametrize("size", [0, 1, 5, 8, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_batch_shares_in_order(size, world):
    indices = list(range(100, 100 + size))
    shares = [split_batch(indices, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == indices
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_process_changes_nothing():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    assert convert_sync_batchnorm(model, DistributedContext()) is model
    assert isinstance(model[1], nn.BatchNorm2d)
    count = torch.tensor(0.0)
    assert loss_normaliser(count).item() == 1.0 and loss_normaliser(torch.tensor(7.0)).item() == 7.0
    assert loss_normaliser(count, minimum=0.0).item() == 0.0


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole batch: (10, 4, H, W) maps and (10, C) voxel features, and weights of a loss."""
    g = torch.Generator().manual_seed(3)
    maps = torch.relu(torch.randn(sum(ROWS), 4, *SPATIAL[1:], generator=g)) * 3.0 - 0.5
    voxels = torch.randn(sum(ROWS), 6, generator=g) * 2.0 + 1.0
    return maps, voxels, torch.randn(maps.shape, generator=g), torch.randn(voxels.shape, generator=g)


def _layers() -> nn.ModuleDict:
    torch.manual_seed(0)
    layers = nn.ModuleDict(
        {"maps": nn.BatchNorm2d(4, eps=1e-3, momentum=0.01), "voxels": VoxelBatchNorm1d(6, eps=1e-3)}
    )
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
    return layers


def _run(layers: nn.ModuleDict, maps: torch.Tensor, voxels: torch.Tensor, w_maps, w_voxels, positives):
    """Outputs and a loss normalised like the heads' (sum over this share / normaliser of the count)."""
    maps, voxels = maps.clone().requires_grad_(), voxels.clone().requires_grad_()
    out_maps, out_voxels = layers["maps"](maps), layers["voxels"](voxels)
    normaliser = loss_normaliser(torch.tensor(float(positives)))
    loss = ((out_maps * w_maps).sum() + (out_voxels * w_voxels).sum()) / normaliser
    loss.backward()
    return out_maps.detach(), out_voxels.detach(), maps.grad, voxels.grad, normaliser


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(backend="gloo")
        layers = convert_sync_batchnorm(
            _layers(), DistributedContext(rank, rank, world, torch.device("cpu"), group)
        )
        assert all(isinstance(layer, AllReduceBatchNorm) for layer in layers.values())
        share = split_batch(list(range(sum(ROWS))), rank, world)
        maps, voxels, w_maps, w_voxels = _inputs()
        result = _run(layers, maps[share], voxels[share], w_maps[share], w_voxels[share], positives=rank + 1)
        grads = {name: p.grad.clone() for name, p in layers.named_parameters()}
        for grad in grads.values():  # what DDP does
            dist.all_reduce(grad)
            grad /= world
        torch.save(
            {"result": result, "grads": grads, "state": layers.state_dict()}, Path(out) / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_batch_norm_and_losses_over_processes_equal_one_process(tmp_path):
    maps, voxels, w_maps, w_voxels = _inputs()
    layers = _layers()
    out_maps, out_voxels, grad_maps, grad_voxels, _ = _run(
        layers, maps, voxels, w_maps, w_voxels, positives=6
    )

    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [len(r["result"][0]) for r in ranks] == list(ROWS)
    # the forward pass is bit for bit the whole batch's
    assert torch.equal(torch.cat([r["result"][0] for r in ranks]), out_maps)
    assert torch.equal(torch.cat([r["result"][1] for r in ranks]), out_voxels)
    # the normaliser is the mean count (1 + 2 + 3 positives over 3 processes)
    assert all(r["result"][4].item() == pytest.approx(2.0) for r in ranks)
    # gradients: each process's loss is WORLD times its share of the whole loss, DDP divides by WORLD
    torch.testing.assert_close(
        torch.cat([r["result"][2] for r in ranks]) / WORLD, grad_maps, rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        torch.cat([r["result"][3] for r in ranks]) / WORLD, grad_voxels, rtol=1e-5, atol=1e-7
    )
    for name, p in layers.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-6)
    # running statistics: the whole batch's, with the same keys
    for r in ranks:
        assert r["state"].keys() == layers.state_dict().keys()
        for key, value in layers.state_dict().items():
            assert torch.equal(r["state"][key], value), key
