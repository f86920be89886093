"""Anchor-based 3D detection head (SECOND / OpenCOOD style): classes, 7-DoF boxes, direction.

For every BEV cell there are ``A = classes x rotations`` anchors; anchor ``a`` belongs to class
``a // len(rotations)``. The head is three 1x1 convolutions on a (N, C, H, W) feature map:

- ``cls_logits``: (N, H*W*A) one sigmoid logit per anchor for the anchor's class (focal loss);
- ``box_deltas``: (N, H*W*A, 7) SECOND's residuals: ``(dx, dy) / diag``, ``dz / dz_a`` of the bottom
  centre, ``log`` size ratios, yaw difference (smooth L1, with the sine-of-difference angle loss);
- ``dir_logits``: (N, H*W*A, 2) which half-turn the heading is in (the box loss cannot tell yaw
  from yaw + pi), cross-entropy.

Flat anchor order is (row, column, anchor), i.e. ``index = (i * W + j) * A + a``.

Targets: per class, anchors are matched to that class's ground-truth boxes by **BEV IoU**
(:func:`sim.box_ops.bev_iou`, exact); an anchor is positive at IoU >= ``matched_iou`` or when it is
a box's best anchor, negative below ``unmatched_iou``, ignored in between (SECOND's rule).

Decoding keeps anchors with a score above ``score_threshold`` (at most ``pre_nms_max``), decodes
their boxes and runs :func:`sim.box_ops.nms_bev` per class, keeping ``max_detections``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.bev import BevGrid
from models.distributed import loss_normaliser
from models.losses import sigmoid_focal_loss, smooth_l1
from sim.box_ops import bev_iou, nms_bev

__all__ = [
    "AnchorClassConfig",
    "DetectionHead",
    "DetectionHeadConfig",
    "DetectionLoss",
    "DetectionMaps",
    "Detections",
    "decode_boxes",
    "encode_boxes",
]


@dataclass(frozen=True)
class AnchorClassConfig:
    """Anchors of one class.

    Attributes:
        name: class name (same order as the dataset's classes).
        size: anchor (dx, dy, dz), metres.
        z_bottom: anchor bottom height in the sensor frame, metres.
        matched_iou: BEV IoU from which an anchor is positive.
        unmatched_iou: BEV IoU below which an anchor is negative.
    """

    name: str = "car"
    size: tuple[float, float, float] = (4.7, 1.9, 1.6)
    z_bottom: float = -1.9
    matched_iou: float = 0.6
    unmatched_iou: float = 0.45

    def __post_init__(self) -> None:
        if min(self.size) <= 0:
            raise ValueError(f"anchor size must be > 0, got {self.size}")
        if not 0 < self.unmatched_iou <= self.matched_iou <= 1:
            raise ValueError(f"need 0 < unmatched_iou <= matched_iou <= 1 for anchor class {self.name}")


def _default_classes() -> tuple[AnchorClassConfig, ...]:
    return (
        AnchorClassConfig("car", (4.7, 1.9, 1.6), -1.9, 0.6, 0.45),
        AnchorClassConfig("truck", (10.0, 2.5, 3.4), -1.9, 0.5, 0.35),
    )


@dataclass(frozen=True)
class DetectionHeadConfig:
    """Anchors, loss weights and decoding of the detection head.

    Attributes:
        classes: one entry per class, in label order.
        rotations: anchor yaws, radians.
        focal_alpha, focal_gamma: focal loss parameters.
        cls_weight, box_weight, dir_weight: loss weights.
        box_beta: smooth-L1 transition of the box loss.
        dir_offset: direction bins start at this yaw (OpenPCDet's 0.78539).
        score_threshold: decoding keeps anchors scoring above this.
        nms_iou: BEV IoU above which the lower-scored box is suppressed.
        pre_nms_max: candidates per sample before NMS.
        max_detections: detections per sample after NMS.
    """

    classes: tuple[AnchorClassConfig, ...] = _default_classes()
    rotations: tuple[float, ...] = (0.0, 1.5707963267948966)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_weight: float = 1.0
    box_weight: float = 2.0
    dir_weight: float = 0.2
    box_beta: float = 1.0 / 9.0
    dir_offset: float = 0.78539816
    score_threshold: float = 0.05
    nms_iou: float = 0.15
    pre_nms_max: int = 300
    max_detections: int = 60

    def __post_init__(self) -> None:
        if not self.classes or not self.rotations:
            raise ValueError("DetectionHeadConfig needs at least one class and one rotation")
        if not 0 <= self.score_threshold < 1 or not 0 <= self.nms_iou <= 1:
            raise ValueError("score_threshold must be in [0, 1) and nms_iou in [0, 1]")
        if self.pre_nms_max < 1 or self.max_detections < 1:
            raise ValueError("pre_nms_max and max_detections must be >= 1")

    @property
    def anchors_per_cell(self) -> int:
        return len(self.classes) * len(self.rotations)


@dataclass
class Detections:
    """Boxes found in one sample, in the ego frame (or the frame of the map they came from).

    Attributes:
        boxes: (M, 7) float32 bottom-centre boxes, mmdet3d LiDAR convention.
        scores: (M,) float32 confidence in [0, 1], decreasing.
        labels: (M,) int64 class index.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 7), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def validate(self) -> None:
        m = len(self.scores)
        if self.boxes.shape != (m, 7) or self.labels.shape != (m,):
            raise ValueError(f"Detections: boxes {self.boxes.shape}, scores ({m},), labels {self.labels.shape}")


@dataclass
class DetectionMaps:
    """Raw head outputs for N maps with K = H*W*A anchors.

    Attributes:
        cls_logits: (N, K).
        box_deltas: (N, K, 7).
        dir_logits: (N, K, 2).
    """

    cls_logits: torch.Tensor
    box_deltas: torch.Tensor
    dir_logits: torch.Tensor

    def select(self, index: torch.Tensor) -> DetectionMaps:
        return DetectionMaps(self.cls_logits[index], self.box_deltas[index], self.dir_logits[index])


@dataclass
class DetectionLoss:
    """Weighted loss terms (scalars), summed in ``total``."""

    cls: torch.Tensor
    box: torch.Tensor
    direction: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.cls + self.box + self.direction


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """SECOND residuals of (K, 7) boxes against (K, 7) anchors -> (K, 7)."""
    diag = torch.sqrt(anchors[:, 3] ** 2 + anchors[:, 4] ** 2)
    return torch.stack(
        [
            (boxes[:, 0] - anchors[:, 0]) / diag,
            (boxes[:, 1] - anchors[:, 1]) / diag,
            (boxes[:, 2] - anchors[:, 2]) / anchors[:, 5],
            torch.log(boxes[:, 3] / anchors[:, 3]),
            torch.log(boxes[:, 4] / anchors[:, 4]),
            torch.log(boxes[:, 5] / anchors[:, 5]),
            boxes[:, 6] - anchors[:, 6],
        ],
        dim=1,
    )


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`: (K, 7) residuals and anchors -> (K, 7) boxes."""
    diag = torch.sqrt(anchors[:, 3] ** 2 + anchors[:, 4] ** 2)
    sizes = anchors[:, 3:6] * torch.exp(deltas[:, 3:6].clamp(max=6.0))
    return torch.stack(
        [
            deltas[:, 0] * diag + anchors[:, 0],
            deltas[:, 1] * diag + anchors[:, 1],
            deltas[:, 2] * anchors[:, 5] + anchors[:, 2],
            sizes[:, 0],
            sizes[:, 1],
            sizes[:, 2],
            deltas[:, 6] + anchors[:, 6],
        ],
        dim=1,
    )


def _limit_period(value: torch.Tensor, offset: float, period: float) -> torch.Tensor:
    return value - torch.floor(value / period + offset) * period


class DetectionHead(nn.Module):
    """1x1 convolutions on a (N, C, H, W) map -> :class:`DetectionMaps`; targets, loss, decoding."""

    def __init__(self, config: DetectionHeadConfig, in_channels: int, grid: BevGrid) -> None:
        super().__init__()
        self.config = config
        self.grid = grid
        a = config.anchors_per_cell
        self.cls = nn.Conv2d(in_channels, a, 1)
        self.box = nn.Conv2d(in_channels, a * 7, 1)
        self.dir = nn.Conv2d(in_channels, a * 2, 1)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.box.bias)
        anchors, anchor_class = self.make_anchors(config, grid)
        self.register_buffer("anchors", torch.from_numpy(anchors.astype(np.float32)), persistent=False)
        self.register_buffer("anchor_class", torch.from_numpy(anchor_class), persistent=False)
        self._anchors_f64 = anchors

    @staticmethod
    def make_anchors(config: DetectionHeadConfig, grid: BevGrid) -> tuple[np.ndarray, np.ndarray]:
        """(H*W*A, 7) float64 anchors at the cell centres and (H*W*A,) int64 anchor classes."""
        xs = grid.x_min + (np.arange(grid.width) + 0.5) * grid.cell_x
        ys = grid.y_min + (np.arange(grid.height) + 0.5) * grid.cell_y
        per_cell = []
        classes = []
        for c, anchor_class in enumerate(config.classes):
            for rotation in config.rotations:
                per_cell.append([anchor_class.z_bottom, *anchor_class.size, rotation])
                classes.append(c)
        per_cell_arr = np.asarray(per_cell, dtype=np.float64)  # (A, 5)
        a = len(per_cell_arr)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (H, W)
        anchors = np.zeros((grid.height, grid.width, a, 7))
        anchors[..., 0] = xx[..., None]
        anchors[..., 1] = yy[..., None]
        anchors[..., 2:] = per_cell_arr[None, None]
        anchor_class = np.broadcast_to(np.asarray(classes, np.int64), (grid.height, grid.width, a))
        return anchors.reshape(-1, 7), np.ascontiguousarray(anchor_class.reshape(-1))

    def forward(self, features: torch.Tensor) -> DetectionMaps:
        """(N, C, H, W) -> :class:`DetectionMaps` with K = H * W * A anchors."""
        n, _, h, w = features.shape
        a = self.config.anchors_per_cell
        cls_logits = self.cls(features).permute(0, 2, 3, 1).reshape(n, h * w * a)  # (N, K)
        box = self.box(features).view(n, a, 7, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 7)
        direction = self.dir(features).view(n, a, 2, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 2)
        return DetectionMaps(cls_logits, box, direction)

    # ------------------------------------------------------------------------------------- targets

    def assign(self, gt_boxes: np.ndarray, gt_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Match anchors to one map's ground truth.

        Args:
            gt_boxes: (M, 7) boxes in the map's frame.
            gt_labels: (M,) class indices.

        Returns:
            state: (K,) int8, 1 positive, 0 negative, -1 ignored.
            matched: (K,) int64 index of each positive anchor's box (-1 elsewhere).
        """
        k = len(self._anchors_f64)
        state = np.zeros(k, np.int8)
        matched = np.full(k, -1, np.int64)
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
        anchor_class = self.anchor_class.cpu().numpy()
        for c, anchor_cfg in enumerate(self.config.classes):
            gt_index = np.flatnonzero(np.asarray(gt_labels) == c)
            if len(gt_index) == 0:
                continue
            anchor_index = np.flatnonzero(anchor_class == c)
            iou = bev_iou(self._anchors_f64[anchor_index], gt_boxes[gt_index])  # (K_c, M_c)
            best = iou.argmax(axis=1)
            best_iou = iou[np.arange(len(anchor_index)), best]
            positive = best_iou >= anchor_cfg.matched_iou
            # every box also gets its best anchor(s), if any overlaps it at all
            box_best = iou.max(axis=0)
            forced_anchor, forced_box = np.nonzero((iou == box_best[None]) & (box_best[None] > 0))
            positive[forced_anchor] = True
            best[forced_anchor] = forced_box
            ignored = ~positive & (best_iou >= anchor_cfg.unmatched_iou)
            state[anchor_index[ignored]] = -1
            state[anchor_index[positive]] = 1
            matched[anchor_index[positive]] = gt_index[best[positive]]
        return state, matched

    def loss(self, maps: DetectionMaps, targets: list[tuple[np.ndarray, np.ndarray]]) -> DetectionLoss:
        """Focal + box + direction loss of N maps.

        Args:
            maps: head outputs for N maps.
            targets: N pairs (boxes (M, 7) in the map's frame, labels (M,)).
        """
        cfg = self.config
        device = maps.cls_logits.device
        states, matched_boxes = [], []
        for gt_boxes, gt_labels in targets:
            state, matched = self.assign(gt_boxes, gt_labels)
            states.append(torch.from_numpy(state))
            boxes = np.zeros((len(state), 7), np.float32)
            positive = matched >= 0
            boxes[positive] = np.asarray(gt_boxes, np.float32).reshape(-1, 7)[matched[positive]]
            matched_boxes.append(torch.from_numpy(boxes))
        state = torch.stack(states).to(device)  # (N, K)
        target_boxes = torch.stack(matched_boxes).to(device)  # (N, K, 7)
        positive = state == 1
        # the mean over the whole batch's positives (every process's, under DDP)
        num_positive = loss_normaliser(positive.sum().to(maps.cls_logits.dtype))

        cls_target = positive.to(maps.cls_logits.dtype)
        cls_weight = (state >= 0).to(maps.cls_logits.dtype)
        focal = sigmoid_focal_loss(maps.cls_logits, cls_target, cfg.focal_alpha, cfg.focal_gamma)
        cls_loss = (focal * cls_weight).sum() / num_positive

        anchors = self.anchors.to(device)[None].expand_as(target_boxes)[positive]  # (P, 7)
        deltas_target = encode_boxes(target_boxes[positive], anchors)  # (P, 7)
        deltas_pred = maps.box_deltas[positive]  # (P, 7)
        diff = deltas_pred - deltas_target
        # angle: sin(pred - target) = sin(p) cos(t) - cos(p) sin(t)
        angle = torch.sin(deltas_pred[:, 6]) * torch.cos(deltas_target[:, 6]) - torch.cos(
            deltas_pred[:, 6]
        ) * torch.sin(deltas_target[:, 6])
        diff = torch.cat([diff[:, :6], angle[:, None]], dim=1)
        box_loss = smooth_l1(diff, cfg.box_beta).sum() / num_positive

        yaw_target = target_boxes[positive][:, 6]
        dir_target = torch.floor(_limit_period(yaw_target - cfg.dir_offset, 0.0, 2 * math.pi) / math.pi).long()
        dir_target = dir_target.clamp(0, 1)
        dir_loss = (
            F.cross_entropy(maps.dir_logits[positive], dir_target, reduction="sum") / num_positive
            if bool(positive.any())
            else maps.dir_logits.sum() * 0.0
        )
        return DetectionLoss(cfg.cls_weight * cls_loss, cfg.box_weight * box_loss, cfg.dir_weight * dir_loss)

    # ------------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, maps: DetectionMaps) -> list[Detections]:
        """Boxes of each of the N maps, NMS per class (see the module docstring)."""
        cfg = self.config
        out = []
        anchors_all = self.anchors.to(maps.cls_logits.device)
        anchor_class_all = self.anchor_class.to(maps.cls_logits.device)
        for n in range(maps.cls_logits.shape[0]):
            scores = torch.sigmoid(maps.cls_logits[n])
            candidates = torch.nonzero(scores > cfg.score_threshold).squeeze(1)
            if candidates.numel() == 0:
                out.append(Detections.empty())
                continue
            if candidates.numel() > cfg.pre_nms_max:
                top = torch.topk(scores[candidates], cfg.pre_nms_max).indices
                candidates = candidates[top]
            boxes = decode_boxes(maps.box_deltas[n, candidates], anchors_all[candidates])
            direction = maps.dir_logits[n, candidates].argmax(dim=1).to(boxes.dtype)
            yaw = _limit_period(boxes[:, 6] - cfg.dir_offset, 0.0, math.pi)
            boxes[:, 6] = _limit_period(yaw + cfg.dir_offset + math.pi * direction, 0.5, 2 * math.pi)
            boxes_np = boxes.float().cpu().numpy()
            scores_np = scores[candidates].float().cpu().numpy()
            labels_np = anchor_class_all[candidates].cpu().numpy()
            keep_all = []
            for c in np.unique(labels_np):
                index = np.flatnonzero(labels_np == c)
                keep = nms_bev(boxes_np[index], scores_np[index], cfg.nms_iou)
                keep_all.append(index[keep])
            keep_idx = np.concatenate(keep_all)
            keep_idx = keep_idx[np.argsort(-scores_np[keep_idx], kind="stable")][: cfg.max_detections]
            out.append(
                Detections(
                    boxes_np[keep_idx].astype(np.float32),
                    scores_np[keep_idx].astype(np.float32),
                    labels_np[keep_idx].astype(np.int64),
                )
            )
        return out

    @torch.no_grad()
    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """(N, H, W) highest anchor probability of each cell of (N, C, H, W) features (CORE's and
        Where2comm's confidence map); no gradient."""
        logits = self.cls(features)  # (N, A, H, W)
        return torch.sigmoid(logits.amax(dim=1))
