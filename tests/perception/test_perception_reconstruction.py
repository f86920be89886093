"""CORE reconstruction head: holistic occupancy targets, the sparse coarse-to-fine decoder
(transposed sparse convolution), the BEV-feature target and the switchable losses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from perception_helpers import scene_boxes, scene_points

from datasets.voxelize import VoxelGrid, Voxelizer
from models.bev import BevGrid
from models.heads.reconstruction import ReconstructionConfig, ReconstructionHead

GRID = VoxelGrid((-16.0, -16.0, -3.0, 16.0, 16.0, 2.0), (0.4, 0.4, 0.25))
BEV = BevGrid.from_voxel_grid(GRID, 2)  # 40 x 40 cells, coarse voxel grid [10, 40, 40]


def make_head(targets: str = "both", **changes) -> ReconstructionHead:
    torch.manual_seed(0)
    return ReconstructionHead(ReconstructionConfig(targets=targets, channels=8, **changes), 16, GRID, BEV)


def holistic_coords(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    points, _ = scene_points(rng, scene_boxes(rng, 5))
    voxels = Voxelizer(GRID)(points)
    return torch.cat([torch.zeros(len(voxels), 1, dtype=torch.int32), voxels.coords_zyx], dim=1)


def test_targets_project_fine_voxels_to_coarse_voxels_and_columns():
    head = make_head()
    coords = torch.tensor([[0, 5, 10, 12], [0, 4, 11, 13], [1, 0, 0, 0]], dtype=torch.int32)
    targets = head.occupancy_targets(coords, batch_size=2)
    assert len(targets.fine_keys) == 3
    d, h, w = head.coarse_shape
    assert targets.coarse_keys.tolist() == sorted([((0 * d + 2) * h + 5) * w + 6, ((1 * d + 0) * h + 0) * w + 0])
    assert targets.columns.shape == (2, 40, 40)
    assert targets.columns.sum() == 2 and targets.columns[0, 5, 6] and targets.columns[1, 0, 0]


def test_decoder_children_are_the_eight_sub_voxels_of_kept_parents():
    head = make_head().train()
    targets = head.occupancy_targets(holistic_coords(0), batch_size=1)
    output = head(torch.randn(1, 16, 40, 40), targets)
    parents = {tuple(c) for c in output.coarse_coords_bzyx.tolist()}
    true_coarse = {int(k) for k in targets.coarse_keys}
    d, h, w = head.coarse_shape
    keys = {((b * d + z) * h + y) * w + x for b, z, y, x in parents}
    assert true_coarse <= keys  # training adds every true column, so every true coarse voxel is scored
    children = output.fine_coords_bzyx.long()
    parent_of = children.clone()
    parent_of[:, 1:] //= 2
    assert {tuple(c) for c in parent_of.tolist()} <= parents
    counts = np.unique(parent_of.numpy(), axis=0, return_counts=True)[1]
    assert (counts == 8).all()  # a kernel-2, stride-2 transposed convolution makes exactly 8 children
    assert output.bev_features.shape == (1, 16, 40, 40)


def test_occupancy_loss_trains_and_switches_off():
    head = make_head("occupancy", occupancy_loss="bce").train()
    coords = holistic_coords(1)
    targets = head.occupancy_targets(coords, batch_size=1)
    fused = torch.randn(1, 16, 40, 40)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = head.loss(head(fused, targets), targets, None)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append(loss.occupancy.item())
    assert losses[-1] < 0.6 * losses[0]
    assert loss.bev.item() == 0.0
    focal = dataclasses.replace(head.config, occupancy_loss="focal")
    head.config = focal
    assert head.loss(head(fused, targets), targets, None).occupancy.item() != pytest.approx(losses[-1])


def test_bev_target_uses_mean_squared_error_and_needs_its_features():
    head = make_head("bev").train()
    fused = torch.randn(2, 16, 40, 40)
    holistic = torch.randn(2, 16, 40, 40)
    output = head(fused)
    assert output.column_logits is None and output.fine_logits is None
    loss = head.loss(output, None, holistic)
    torch.testing.assert_close(loss.bev, torch.nn.functional.mse_loss(output.bev_features, holistic))
    assert loss.occupancy.item() == 0.0
    with pytest.raises(ValueError, match="holistic BEV"):
        head.loss(output, None, None)


def test_inference_decodes_without_targets():
    head = make_head("occupancy").eval()
    with torch.no_grad():
        output = head(torch.randn(1, 16, 40, 40))
    assert output.column_logits.shape == (1, 40, 40)
    assert output.fine_coords_bzyx.shape[1] == 4 and output.fine_logits.shape[0] == output.fine_coords_bzyx.shape[0]
