"""Voxel grids, voxelisation, consistent augmentation, BEV grids and warping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.augment import AugmentConfig, GlobalAugmentation
from datasets.voxelize import VoxelGrid, Voxelizer
from models.bev import BevGrid, scatter_to_bev, warp_to_ego
from sim.box_ops import bev_iou
from sim.geometry import T_from_xyz_rpy, T_from_xyz_yaw, box_corners, transform_points


def test_grid_sizes_are_derived_from_range_and_voxel_size():
    grid = VoxelGrid((-40.0, -20.0, -3.0, 40.0, 20.0, 2.0), (0.4, 0.2, 0.25))
    assert grid.grid_size_xyz == (200, 200, 20)
    assert grid.spatial_shape_zyx == (20, 200, 200)
    assert grid.scaled(2).spatial_shape_zyx == (10, 100, 100)
    with pytest.raises(ValueError, match="whole number"):
        VoxelGrid((-40.0, -40.0, -3.0, 40.0, 40.0, 2.0), (0.3, 0.4, 0.25))
    with pytest.raises(ValueError, match="min < max"):
        VoxelGrid((0.0, 0.0, 0.0, -1.0, 1.0, 1.0), (0.5, 0.5, 0.5))


def test_voxelizer_averages_points_per_voxel_and_drops_outside_points():
    grid = VoxelGrid((0.0, 0.0, 0.0, 4.0, 4.0, 4.0), (1.0, 1.0, 1.0), max_points_per_voxel=8)
    points = np.array(
        [
            [0.2, 0.2, 0.2, 1.0],
            [0.8, 0.6, 0.4, 3.0],  # same voxel as the first
            [3.5, 1.5, 2.5, 5.0],
            [4.5, 1.0, 1.0, 9.0],  # outside (x >= 4)
            [-0.1, 1.0, 1.0, 9.0],  # outside (x < 0)
        ],
        dtype=np.float32,
    )
    voxels = Voxelizer(grid)(points)
    by_coord = {tuple(c): (f, n) for c, f, n in zip(voxels.coords_zyx.tolist(), voxels.features, voxels.num_points.tolist(), strict=True)}
    assert set(by_coord) == {(0, 0, 0), (2, 1, 3)}  # [z, y, x]
    mean, count = by_coord[(0, 0, 0)]
    assert count == 2
    np.testing.assert_allclose(mean.numpy(), [0.5, 0.4, 0.3, 2.0], atol=1e-6)
    np.testing.assert_allclose(by_coord[(2, 1, 3)][0].numpy(), points[2], atol=1e-6)
    assert len(Voxelizer(grid)(np.zeros((0, 4), np.float32))) == 0


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_is_consistent_across_agents(seed):
    """An agent's augmented points moved with its augmented pose land where the augmented ego
    frame puts its original points: T' (A p) = A (T p); and the pose stays rigid."""
    rng = np.random.default_rng(seed)
    aug = GlobalAugmentation.sample(AugmentConfig(flip_y_probability=0.5, flip_x_probability=0.5), rng)
    T = T_from_xyz_rpy(*rng.uniform(-20, 20, 3), *rng.uniform(-0.1, 0.1, 2), rng.uniform(-np.pi, np.pi))
    points = rng.uniform(-30, 30, size=(50, 4))
    T_aug = aug.apply_pose(T)
    left = transform_points(T_aug, aug.apply_points(points))
    right = aug.apply_points(transform_points(T, points))
    np.testing.assert_allclose(left, right, atol=1e-9)
    np.testing.assert_allclose(T_aug[:3, :3] @ T_aug[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(T_aug[:3, :3]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_augmented_boxes_are_the_augmented_corners(seed):
    rng = np.random.default_rng(100 + seed)
    aug = GlobalAugmentation(flip_y=bool(seed % 2), flip_x=bool(seed // 3), rotation_rad=rng.uniform(-1, 1), scale=rng.uniform(0.9, 1.1))
    boxes = np.concatenate([rng.uniform(-20, 20, (5, 3)), rng.uniform(1, 5, (5, 3)), rng.uniform(-np.pi, np.pi, (5, 1))], axis=1)
    moved = aug.apply_boxes(boxes)
    for box, new in zip(boxes, moved, strict=True):
        corners = aug.apply_points(box_corners(box[None])[0])
        expected = box_corners(new[None])[0]
        # the same set of 8 corners (a flip reverses their order)
        dist = np.linalg.norm(corners[:, None] - expected[None], axis=-1)
        assert dist.min(axis=1).max() < 1e-9


def test_bev_grid_from_voxel_grid_and_cell_lookup():
    grid = BevGrid.from_voxel_grid(VoxelGrid((-40.0, -20.0, -3.0, 40.0, 20.0, 2.0), (0.4, 0.4, 0.25)), 2)
    assert grid.shape == (50, 100)
    assert (grid.cell_x, grid.cell_y) == pytest.approx((0.8, 0.8))
    centres = grid.cell_centres()
    row, col, inside = grid.cell_of(centres.reshape(-1, 2))
    assert inside.all()
    assert torch.equal(row.reshape(50, 100), torch.arange(50)[:, None].expand(50, 100))
    assert torch.equal(col.reshape(50, 100), torch.arange(100)[None].expand(50, 100))
    with pytest.raises(ValueError, match="divisible"):
        BevGrid.from_voxel_grid(VoxelGrid((-40.0, -20.0, -3.0, 40.0, 20.0, 2.0), (0.4, 0.4, 0.25)), 3)


@pytest.mark.parametrize(("x", "y", "yaw"), [(0.0, 0.0, 0.0), (8.0, -4.0, 0.0), (4.0, 8.0, np.pi / 2), (-6.4, 3.2, np.pi)])
def test_warp_moves_an_agent_cell_to_its_ego_cell(x, y, yaw):
    grid = BevGrid(-16.0, -16.0, 0.8, 0.8, 40, 40)
    T_ego_from_agent = T_from_xyz_yaw(x, y, 0.0, yaw)
    point_agent = np.array([[2.4 + 0.4, -1.6 + 0.4, 0.0]])  # a cell centre in the agent's frame
    features = torch.zeros(1, 1, 40, 40)
    row, col, _ = grid.cell_of(torch.tensor(point_agent[:, :2], dtype=torch.float32))
    features[0, 0, row, col] = 1.0
    warped, valid = warp_to_ego(features, torch.from_numpy(T_ego_from_agent)[None], grid, mode="nearest")
    point_ego = transform_points(T_ego_from_agent, point_agent)
    row_e, col_e, inside = grid.cell_of(torch.tensor(point_ego[:, :2], dtype=torch.float32))
    assert inside.all()
    assert warped[0, 0, row_e, col_e].item() == pytest.approx(1.0)
    assert warped.sum().item() == pytest.approx(1.0)
    assert valid[0, 0, row_e, col_e]


def test_scatter_to_bev_reduces_per_cell():
    grid = BevGrid(0.0, 0.0, 1.0, 1.0, 2, 3)
    xy = torch.tensor([[0.5, 0.5], [0.6, 0.4], [2.5, 1.5], [9.0, 9.0]])
    values = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    bev, count = scatter_to_bev(xy, values, grid, reduce="amax")
    assert bev[0, 0, 0] == 3.0 and bev[0, 1, 2] == 5.0 and bev.sum() == 8.0
    assert count.tolist() == [[2, 0, 0], [0, 0, 1]]
    assert scatter_to_bev(xy, values, grid, reduce="mean")[0][0, 0, 0] == 2.0


def test_bev_iou_sanity_for_anchor_matching():
    """The exact IoU the anchor assigner uses is 1 for a box with itself, 0 far away."""
    box = np.array([[1.0, 2.0, -1.9, 4.5, 1.9, 1.6, 0.3]])
    other = box.copy()
    other[0, 0] += 10
    assert bev_iou(box, box)[0, 0] == pytest.approx(1.0)
    assert bev_iou(box, other)[0, 0] == 0.0
