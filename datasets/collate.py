"""Collate cooperative samples into one typed batch of flat tensors.

Agents of all samples are numbered one after the other (the **flat agent index**): sample 0's
agents first (its ego first), then sample 1's, ...; ``agents_per_sample`` (OpenCOOD's
``record_len``) says how many each sample has. Points, voxels and transforms are indexed by that
flat agent index; ground-truth boxes by the sample index.

Voxels are made per agent, in the agent's own sensor frame, on the batch's :class:`VoxelGrid`;
``voxel_coords_bzyx[:, 0]`` is the flat agent index, so one spconv tensor holds every agent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from datasets.coop_dataset import CoopSample
from datasets.voxelize import VoxelGrid, Voxelizer

__all__ = ["CoopBatch", "CoopCollate", "SampleInfo"]


@dataclass(frozen=True)
class SampleInfo:
    """Where a sample of a batch comes from."""

    run: str
    frame: int
    ego_id: int
    agent_ids: tuple[int, ...]
    data_frames: tuple[int, ...]


@dataclass
class CoopBatch:
    """B samples with A = sum(agents_per_sample) agents in total.

    Attributes:
        agents_per_sample: (B,) int64 agents of each sample (>= 1), the ego first in each.
        voxel_features: (V, 4) float32 mean x, y, z, intensity of each voxel (own sensor frame).
        voxel_coords_bzyx: (V, 4) int32 ``[flat agent index, z, y, x]``.
        voxel_num_points: (V,) int32 points per voxel.
        points: (P, 4) float32 every agent's points in its own sensor frame.
        point_agent_index: (P,) int64 flat agent index of each point.
        point_semantic: (P,) uint8 semantic class of each point (0 unknown).
        T_ego_from_agent: (A, 4, 4) float64 true poses in their sample's ego frame.
        T_ego_from_agent_measured: (A, 4, 4) float64 poses from the noisy localisation.
        agent_position_m: (A, 3) float64 true sensor positions in the ego frame before augmentation,
            for the radio channel.
        gt_boxes: (G, 7) float32 ego-frame boxes of every sample.
        gt_sample_index: (G,) int64 sample of each box.
        gt_labels: (G,) int64 class index.
        gt_visibility: (G,) int64 :class:`datasets.coop_dataset.Visibility`.
        info: B :class:`SampleInfo`.
        grid: the voxel grid.
    """

    agents_per_sample: torch.Tensor
    voxel_features: torch.Tensor
    voxel_coords_bzyx: torch.Tensor
    voxel_num_points: torch.Tensor
    points: torch.Tensor
    point_agent_index: torch.Tensor
    point_semantic: torch.Tensor
    T_ego_from_agent: torch.Tensor
    T_ego_from_agent_measured: torch.Tensor
    agent_position_m: torch.Tensor
    gt_boxes: torch.Tensor
    gt_sample_index: torch.Tensor
    gt_labels: torch.Tensor
    gt_visibility: torch.Tensor
    info: list[SampleInfo]
    grid: VoxelGrid

    @property
    def batch_size(self) -> int:
        return int(self.agents_per_sample.shape[0])

    @property
    def num_agents(self) -> int:
        return int(self.agents_per_sample.sum())

    @property
    def agent_sample_index(self) -> torch.Tensor:
        """(A,) int64 sample of each flat agent."""
        return torch.repeat_interleave(
            torch.arange(self.batch_size, device=self.agents_per_sample.device), self.agents_per_sample
        )

    @property
    def ego_agent_index(self) -> torch.Tensor:
        """(B,) int64 flat index of each sample's ego."""
        return torch.cumsum(self.agents_per_sample, 0) - self.agents_per_sample

    def agent_points(self, agent: int) -> torch.Tensor:
        """(N, 4) points of flat agent ``agent``."""
        return self.points[self.point_agent_index == agent]

    def sample_gt(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, 7) boxes, (M,) labels, (M,) visibility of one sample."""
        keep = self.gt_sample_index == sample
        return self.gt_boxes[keep], self.gt_labels[keep], self.gt_visibility[keep]

    def to(self, device: torch.device | str) -> CoopBatch:
        """A copy with every tensor on ``device``."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return CoopBatch(**values)

    def validate(self) -> None:
        """Check shapes and index ranges; raises ValueError."""
        a, b = self.num_agents, self.batch_size
        problems = []
        if b < 1 or bool((self.agents_per_sample < 1).any()):
            problems.append("every sample needs at least one agent")
        v = self.voxel_coords_bzyx.shape[0]
        if self.voxel_features.shape[0] != v or self.voxel_num_points.shape != (v,):
            problems.append("voxel arrays disagree in length")
        if v and (int(self.voxel_coords_bzyx[:, 0].min()) < 0 or int(self.voxel_coords_bzyx[:, 0].max()) >= a):
            problems.append("voxel agent index out of range")
        p = self.points.shape[0]
        if self.point_agent_index.shape != (p,) or self.point_semantic.shape != (p,):
            problems.append("point arrays disagree in length")
        for name in ("T_ego_from_agent", "T_ego_from_agent_measured"):
            if tuple(getattr(self, name).shape) != (a, 4, 4):
                problems.append(f"{name} must be ({a}, 4, 4)")
        g = self.gt_boxes.shape[0]
        if tuple(self.gt_boxes.shape) != (g, 7):
            problems.append("gt_boxes must be (G, 7)")
        for name in ("gt_sample_index", "gt_labels", "gt_visibility"):
            if tuple(getattr(self, name).shape) != (g,):
                problems.append(f"{name} must be ({g},)")
        if len(self.info) != b:
            problems.append(f"info must hold {b} entries")
        if problems:
            raise ValueError("invalid CoopBatch: " + "; ".join(problems))


class CoopCollate:
    """``collate_fn`` for a ``DataLoader`` of :class:`CoopSample`: voxelise and stack.

    Picklable (for data-loader workers); it voxelises on CPU.
    """

    def __init__(self, grid: VoxelGrid) -> None:
        self.grid = grid
        self.voxelizer = Voxelizer(grid)

    def __call__(self, samples: list[CoopSample]) -> CoopBatch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        features, coords, counts = [], [], []
        points, point_agent, point_semantic = [], [], []
        T_true, T_measured, positions = [], [], []
        gt_boxes, gt_sample, gt_labels, gt_visibility = [], [], [], []
        agent = 0
        for sample_index, sample in enumerate(samples):
            sample.validate()
            for a in range(sample.num_agents):
                pts = sample.points[a]
                voxels = self.voxelizer(pts)
                features.append(voxels.features)
                coords.append(
                    torch.cat([torch.full((len(voxels), 1), agent, dtype=torch.int32), voxels.coords_zyx], dim=1)
                )
                counts.append(voxels.num_points)
                points.append(torch.from_numpy(pts))
                point_agent.append(torch.full((len(pts),), agent, dtype=torch.int64))
                point_semantic.append(torch.from_numpy(sample.semantic[a]))
                agent += 1
            T_true.append(sample.T_ego_from_agent)
            T_measured.append(sample.T_ego_from_agent_measured)
            positions.append(sample.position_m)
            gt_boxes.append(sample.gt_boxes.astype(np.float32))
            gt_sample.append(np.full(len(sample.gt_boxes), sample_index, dtype=np.int64))
            gt_labels.append(sample.gt_labels)
            gt_visibility.append(sample.gt_visibility.astype(np.int64))
        batch = CoopBatch(
            agents_per_sample=torch.tensor([s.num_agents for s in samples], dtype=torch.int64),
            voxel_features=torch.cat(features),
            voxel_coords_bzyx=torch.cat(coords),
            voxel_num_points=torch.cat(counts),
            points=torch.cat(points),
            point_agent_index=torch.cat(point_agent),
            point_semantic=torch.cat(point_semantic),
            T_ego_from_agent=torch.from_numpy(np.concatenate(T_true)),
            T_ego_from_agent_measured=torch.from_numpy(np.concatenate(T_measured)),
            agent_position_m=torch.from_numpy(np.concatenate(positions)),
            gt_boxes=torch.from_numpy(np.concatenate(gt_boxes).reshape(-1, 7)),
            gt_sample_index=torch.from_numpy(np.concatenate(gt_sample)),
            gt_labels=torch.from_numpy(np.concatenate(gt_labels)),
            gt_visibility=torch.from_numpy(np.concatenate(gt_visibility)),
            info=[
                SampleInfo(
                    s.run, s.frame, s.ego_id, tuple(int(v) for v in s.agent_ids), tuple(int(v) for v in s.data_frames)
                )
                for s in samples
            ],
            grid=self.grid,
        )
        batch.validate()
        return batch
