"""CoopDataset on generated data: ego choice, communication range, transforms, visibility,
pose noise, data age, augmentation, and collation into a CoopBatch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from datasets.augment import AugmentConfig
from datasets.collate import CoopCollate
from datasets.coop_dataset import CoopDataset, CoopDatasetConfig, PoseNoiseConfig, Visibility
from datasets.native import agent_frame_paths, list_cavs, read_agent_frame
from datasets.voxelize import VoxelGrid
from sim.geometry import invert_T, transform_boxes, transform_points, wrap_angle

NO_AUGMENT = AugmentConfig(enabled=False)


def config(root, **changes) -> CoopDatasetConfig:
    return dataclasses.replace(CoopDatasetConfig(root=str(root), split="train", comm_range_m=500.0), **changes)


def test_ego_choice_sets_the_samples(coop_data):
    run = next((coop_data / "train").iterdir())
    cavs = list_cavs(run)
    scene = CoopDataset(config(coop_data, ego="scene"))
    lowest = CoopDataset(config(coop_data, ego="lowest_id"))
    every = CoopDataset(config(coop_data, ego="all"))
    assert len(scene) == len(lowest) == 4
    assert len(every) == 4 * len(cavs)
    scene_ego = read_agent_frame(agent_frame_paths(run, cavs[0], 0).yaml).scene_ego_id
    assert {k.ego_id for k in scene.keys} == {scene_ego}
    assert {k.ego_id for k in lowest.keys} == {cavs[0]}
    assert {k.ego_id for k in every.keys} == set(cavs)
    strided = CoopDataset(config(coop_data, ego="lowest_id", frame_stride=2))
    assert [k.frame for k in strided.keys] == [0, 2]


def test_agents_within_range_nearest_first_with_true_transforms(coop_data):
    dataset = CoopDataset(config(coop_data, ego="lowest_id"))
    sample = dataset[1]
    run = dataset.keys[1].run
    frames = {int(a): read_agent_frame(agent_frame_paths(run, int(a), 1).yaml) for a in sample.agent_ids}
    ego = frames[int(sample.agent_ids[0])]
    distances = [np.linalg.norm(frames[int(a)].T_world_from_sensor[:3, 3] - ego.T_world_from_sensor[:3, 3]) for a in sample.agent_ids]
    assert distances[0] == 0 and distances == sorted(distances)
    for i, agent in enumerate(sample.agent_ids):
        expected = invert_T(ego.T_world_from_sensor) @ frames[int(agent)].T_world_from_sensor
        np.testing.assert_allclose(sample.T_ego_from_agent[i], expected, atol=1e-9)
        np.testing.assert_array_equal(sample.points[i], frames[int(agent)].points)
    np.testing.assert_allclose(sample.T_ego_from_agent_measured, sample.T_ego_from_agent)  # no noise configured
    # a range between the nearest and the farthest other agent keeps only the nearer ones
    cutoff = 0.5 * (distances[1] + distances[-1])
    near = CoopDataset(config(coop_data, ego="lowest_id", comm_range_m=float(cutoff)))[1]
    assert list(near.agent_ids) == [a for a, d in zip(sample.agent_ids, distances, strict=True) if d <= cutoff]
    capped = CoopDataset(config(coop_data, ego="lowest_id", max_agents=2))[1]
    assert list(capped.agent_ids) == list(sample.agent_ids[:2])


def test_ground_truth_in_ego_frame_with_visibility(coop_data):
    dataset = CoopDataset(config(coop_data, ego="lowest_id", keep_invisible=True))
    sample = dataset[2]
    run = dataset.keys[2].run
    frames = [read_agent_frame(agent_frame_paths(run, int(a), 2).yaml) for a in sample.agent_ids]
    ego = frames[0]
    for box, vid, vis in zip(sample.gt_boxes, sample.gt_ids, sample.gt_visibility, strict=True):
        i = int(np.flatnonzero(ego.vehicle_ids == vid)[0])
        expected = transform_boxes(invert_T(ego.T_world_from_sensor), ego.boxes_world[i : i + 1])[0]
        np.testing.assert_allclose(box[:6], expected[:6], atol=1e-9)
        assert abs(wrap_angle(box[6] - expected[6])) < 1e-9
        seen_by_ego = ego.num_points[i] >= 1
        seen_by_other = any(
            f.num_points[np.flatnonzero(f.vehicle_ids == vid)[0]] >= 1 for f in frames[1:] if vid in f.vehicle_ids
        )
        want = Visibility.EGO if seen_by_ego else Visibility.OTHERS_ONLY if seen_by_other else Visibility.NONE
        assert vis == want
    assert not set(sample.gt_ids) & set(sample.agent_ids[:1].tolist())  # the ego is not its own ground truth
    assert set(sample.gt_visibility.tolist()) >= {int(Visibility.EGO), int(Visibility.NONE)}
    visible_only = CoopDataset(config(coop_data, ego="lowest_id"))[2]
    assert (visible_only.gt_visibility != Visibility.NONE).all()
    assert len(visible_only.gt_boxes) == int((sample.gt_visibility != Visibility.NONE).sum())
    near = CoopDataset(config(coop_data, ego="lowest_id", gt_range=(-30.0, -20.0, 30.0, 20.0)))[2]
    inside = (np.abs(visible_only.gt_boxes[:, 0]) < 30) & (np.abs(visible_only.gt_boxes[:, 1]) < 20)
    assert 0 < len(near.gt_boxes) == int(inside.sum()) < len(visible_only.gt_boxes)


def test_pose_noise_is_seeded_per_agent(coop_data):
    noisy = config(coop_data, ego="lowest_id", pose_noise=PoseNoiseConfig(std_xyz_m=0.5, std_yaw_rad=0.05), seed=3)
    a = CoopDataset(noisy)[1]
    b = CoopDataset(noisy)[1]
    np.testing.assert_array_equal(a.T_ego_from_agent_measured, b.T_ego_from_agent_measured)
    error = np.linalg.norm(a.T_ego_from_agent_measured[1:, :3, 3] - a.T_ego_from_agent[1:, :3, 3], axis=1)
    assert (error > 1e-3).all() and (error < 5.0).all()
    np.testing.assert_allclose(a.T_ego_from_agent_measured[0], np.eye(4))
    # one agent fewer: the remaining agents' draws do not change
    fewer = CoopDataset(dataclasses.replace(noisy, max_agents=2))[1]
    np.testing.assert_allclose(fewer.T_ego_from_agent_measured[1], a.T_ego_from_agent_measured[1])
    other_epoch = CoopDataset(noisy)
    other_epoch.set_epoch(1)
    assert not np.allclose(other_epoch[1].T_ego_from_agent_measured[1:], a.T_ego_from_agent_measured[1:])


def test_delayed_agents_use_their_earlier_frame(coop_data):
    sample = CoopDataset(config(coop_data, ego="lowest_id", delay_frames=2))[3]
    assert sample.frame == 3 and sample.data_frames[0] == 3
    assert (sample.data_frames[1:] == 1).all()
    run = next((coop_data / "train").iterdir())
    old = read_agent_frame(agent_frame_paths(run, int(sample.agent_ids[1]), 1).yaml)
    np.testing.assert_array_equal(sample.points[1], old.points)
    ego = read_agent_frame(agent_frame_paths(run, int(sample.agent_ids[0]), 3).yaml)
    np.testing.assert_allclose(sample.T_ego_from_agent[1], invert_T(ego.T_world_from_sensor) @ old.T_world_from_sensor, atol=1e-9)


def test_training_augmentation_keeps_the_scene_consistent(coop_data):
    plain = CoopDataset(config(coop_data, ego="lowest_id"))[1]
    augmented_set = CoopDataset(config(coop_data, ego="lowest_id", training=True, augment=AugmentConfig(flip_y_probability=1.0)))
    augmented = augmented_set[1]
    aug = augmented.augmentation
    assert aug.flip_y and aug.rotation_rad != 0.0
    for i in range(plain.num_agents):
        in_ego_plain = transform_points(plain.T_ego_from_agent[i], plain.points[i].astype(np.float64))
        in_ego_aug = transform_points(augmented.T_ego_from_agent[i], augmented.points[i].astype(np.float64))
        np.testing.assert_allclose(in_ego_aug, aug.apply_points(in_ego_plain), atol=2e-4)
    expected = aug.apply_boxes(plain.gt_boxes)
    np.testing.assert_allclose(augmented.gt_boxes[:, :6], expected[:, :6], atol=1e-9)
    assert np.abs(wrap_angle(augmented.gt_boxes[:, 6] - expected[:, 6])).max() < 1e-9
    again = CoopDataset(augmented_set.config)[1]
    assert again.augmentation == aug  # same seed, epoch and index, same draw


def test_collate_flattens_agents_and_voxelises_each_in_its_frame(coop_data):
    dataset = CoopDataset(config(coop_data, ego="all"))
    grid = VoxelGrid((-40.0, -40.0, -3.0, 40.0, 40.0, 2.0), (0.4, 0.4, 0.25))
    samples = [dataset[0], dataset[5]]
    batch = CoopCollate(grid)(samples)
    assert batch.batch_size == 2
    assert batch.agents_per_sample.tolist() == [s.num_agents for s in samples]
    assert batch.ego_agent_index.tolist() == [0, samples[0].num_agents]
    assert batch.agent_sample_index.tolist() == [0] * samples[0].num_agents + [1] * samples[1].num_agents
    assert batch.info[1].ego_id == samples[1].ego_id
    flat = [pts for s in samples for pts in s.points]
    for agent, pts in enumerate(flat):
        np.testing.assert_array_equal(batch.agent_points(agent).numpy(), pts)
        voxels = batch.voxel_coords_bzyx[batch.voxel_coords_bzyx[:, 0] == agent]
        inside = grid.contains(pts)
        assert 0 < len(voxels) <= inside.sum()
        # every voxel's mean point lies in that voxel
        features = batch.voxel_features[batch.voxel_coords_bzyx[:, 0] == agent]
        lo = torch.tensor(grid.point_cloud_range[:3]) + voxels[:, [3, 2, 1]] * torch.tensor(grid.voxel_size)
        assert ((features[:, :3] >= lo - 1e-4) & (features[:, :3] <= lo + torch.tensor(grid.voxel_size) + 1e-4)).all()
    boxes, labels, _ = batch.sample_gt(1)
    np.testing.assert_allclose(boxes.numpy(), samples[1].gt_boxes.astype(np.float32))
    np.testing.assert_array_equal(labels.numpy(), samples[1].gt_labels)
    assert batch.T_ego_from_agent.dtype == torch.float64 and batch.T_ego_from_agent.shape == (batch.num_agents, 4, 4)


def test_bad_configurations_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="comm_range_m"):
        CoopDatasetConfig(comm_range_m=0.0)
    with pytest.raises(ValueError, match="two classes"):
        CoopDatasetConfig(classes={"a": ("car",), "b": ("car",)})
    with pytest.raises(FileNotFoundError, match="no dataset folder"):
        CoopDataset(CoopDatasetConfig(root=str(tmp_path / "missing")))
