"""Shared helpers of the perception tests: generated data and synthetic multi-agent samples."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from datasets.coop_dataset import CoopSample
from datasets.voxelize import VoxelGrid
from models.bev_backbone import BevBackboneConfig
from models.compressor import CompressorConfig
from models.encoder import EncoderConfig
from models.heads.detection import DetectionHeadConfig
from models.heads.segmentation import SegmentationHeadConfig
from models.perception import CooperativePerception, FusionConfig, PerceptionModelConfig
from models.sparse_backbone import SparseBackboneConfig
from sim.geometry import T_from_xyz_yaw, box_corners, invert_T, transform_points
from sim.types import Semantic

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def generate(out: Path, scenario: str, frames: int, seed: int, cavs: int, split: str) -> None:
    """Run tools/generate.py (tiny LiDAR) into ``out``."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "generate.py"),
            "--scenario", scenario,
            "--frames", str(frames),
            "--seed", str(seed),
            "--out", str(out),
            "--lidar", "tiny",
            "--cavs", str(cavs),
            "--split", split,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def small_model_config(**changes) -> PerceptionModelConfig:
    """A fast model on a 32 x 32 m grid (0.4 m voxels, 0.8 m BEV cells), for shape tests."""
    grid = VoxelGrid((-16.0, -16.0, -3.0, 16.0, 16.0, 2.0), (0.4, 0.4, 0.25), max_points_per_voxel=32)
    encoder = EncoderConfig(
        SparseBackboneConfig(channels=(8, 16, 16), out_channels=16),
        BevBackboneConfig(layer_nums=(0, 1), num_filters=(16, 16), num_upsample_filters=(16, 16)),
    )
    base = PerceptionModelConfig(grid=grid, encoder=encoder, segmentation=SegmentationHeadConfig(hidden_channels=8))
    return dataclasses.replace(base, **changes)


def fusion_config(method: str, selection: str | None = None, **changes) -> FusionConfig:
    """Small compressed BEV messages (4 channels, at most 64 cells), picked by ``selection``:
    by default CORE selects by request, the others the non-empty cells."""
    if selection is None:
        selection = "request" if method == "core" else "nonempty"
    return FusionConfig(method=method, compressor=CompressorConfig(channels=4, max_cells=64, selection=selection), **changes)


def build_model(method: str, seed: int = 0, proj_first: bool = False, **changes) -> CooperativePerception:
    """:func:`small_model_config` with ``method``'s fusion (senders encoding in the ego frame with
    ``proj_first``), in eval mode. Score threshold 0: an untrained head still returns its best
    boxes, so they can be compared."""
    torch.manual_seed(seed)
    config = small_model_config(
        fusion=fusion_config(method, proj_first=proj_first),
        detection=DetectionHeadConfig(score_threshold=0.0),
        **changes,
    )
    return CooperativePerception(config).eval()


def scene_boxes(rng: np.random.Generator, count: int, half_extent: float = 14.0) -> np.ndarray:
    """(count, 7) car boxes on the ground (z = -1.9 in the ego sensor frame), spread over the area."""
    xy = rng.uniform(-half_extent, half_extent, size=(count, 2))
    yaw = rng.uniform(-np.pi, np.pi, size=count)
    sizes = np.tile([4.5, 1.9, 1.6], (count, 1))
    return np.concatenate([xy, np.full((count, 1), -1.9), sizes, yaw[:, None]], axis=1)


def scene_points(rng: np.random.Generator, boxes: np.ndarray, half_extent: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """A world (ego-frame) cloud: a road plane with points and the boxes' surfaces.

    Returns (N, 4) float32 points and (N,) uint8 semantics (ROAD for the plane, CAR on boxes).
    """
    ground_xy = rng.uniform(-half_extent, half_extent, size=(1500, 2))
    ground = np.concatenate([ground_xy, np.full((1500, 1), -1.9), rng.uniform(0, 1, (1500, 1))], axis=1)
    parts, sems = [ground], [np.full(1500, int(Semantic.ROAD), np.uint8)]
    for box in boxes:
        corners = box_corners(box[None])[0]  # (8, 3)
        weights = rng.dirichlet(np.ones(8), size=60)  # points inside the box's hull
        pts = weights @ corners
        parts.append(np.concatenate([pts, rng.uniform(0, 1, (60, 1))], axis=1))
        sems.append(np.full(60, int(Semantic.CAR), np.uint8))
    return np.concatenate(parts).astype(np.float32), np.concatenate(sems)


def synthetic_sample(seed: int, num_agents: int, num_boxes: int = 4, name: str = "synthetic") -> CoopSample:
    """A consistent multi-agent sample: one world cloud seen by every agent from its own pose.

    The ego sits at the origin; the others at random poses within 10 m. Each agent's points are the
    world cloud within 16 m of it, in its own frame.
    """
    rng = np.random.default_rng(seed)
    boxes = scene_boxes(rng, num_boxes)
    world, semantic = scene_points(rng, boxes)
    poses = [np.eye(4)]
    for _ in range(num_agents - 1):
        x, y = rng.uniform(-10, 10, 2)
        poses.append(T_from_xyz_yaw(x, y, 0.0, rng.uniform(-np.pi, np.pi)))
    points, sems = [], []
    for T in poses:
        local = transform_points(invert_T(T), world)
        near = np.hypot(local[:, 0], local[:, 1]) < 16.0
        points.append(np.ascontiguousarray(local[near], dtype=np.float32))
        sems.append(semantic[near])
    T_all = np.stack(poses)
    sample = CoopSample(
        run=name,
        frame=seed,
        ego_id=100,
        agent_ids=np.arange(100, 100 + num_agents, dtype=np.int64),
        data_frames=np.full(num_agents, seed, dtype=np.int64),
        position_m=T_all[:, :3, 3].copy(),
        points=points,
        semantic=sems,
        T_ego_from_agent=T_all,
        T_ego_from_agent_measured=T_all.copy(),
        gt_boxes=boxes,
        gt_labels=np.zeros(num_boxes, np.int64),
        gt_visibility=np.zeros(num_boxes, np.int8),
        gt_ids=np.arange(num_boxes, dtype=np.int64),
    )
    sample.validate()
    return sample


def permute_others(sample: CoopSample, order: list[int]) -> CoopSample:
    """The same sample with the non-ego agents in another order (``order`` indexes agents 1..A-1)."""
    index = [0, *order]
    return dataclasses.replace(
        sample,
        agent_ids=sample.agent_ids[index],
        data_frames=sample.data_frames[index],
        position_m=sample.position_m[index],
        points=[sample.points[i] for i in index],
        semantic=[sample.semantic[i] for i in index],
        T_ego_from_agent=sample.T_ego_from_agent[index],
        T_ego_from_agent_measured=sample.T_ego_from_agent_measured[index],
    )
