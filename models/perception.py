"""Cooperative perception model: one encoder and one set of heads, five ways to fuse.

``forward(batch, link) -> (PerceptionOutput, PerceptionLoss | None)``. What each fusion method
(``fusion.method``) does with a :class:`datasets.collate.CoopBatch`:

- ``"none"``: the ego's voxels -> encoder -> heads. Trained on the boxes the ego sees.
- ``"early"``: the other agents' raw points go through the link (:mod:`models.fusion.early`); the
  ego voxelises the merged cloud -> encoder -> heads.
- ``"late"``: every agent runs encoder and heads on its own data (the same model as ``"none"``,
  trained the same way); at decoding, the other agents' boxes go through the link and are merged
  with the ego's by BEV NMS (:mod:`models.fusion.late`).
- ``"attfuse"``: every agent encodes its own voxels; the others' features are compressed
  (:mod:`models.compressor`) or summarised as keypoints (:mod:`models.keypoint_encoder`,
  ``fusion.message = "keypoints"``), sent, decoded, warped into the ego frame and fused per cell
  by attention (:mod:`models.fusion.attfuse`).
- ``"core"``: as attfuse with BEV messages, but the ego first sends a request map, senders pick
  cells by confidence x request, and the ego aggregates with learned attentive weights
  (:mod:`models.fusion.core`).

Cooperative methods (early, attfuse, core) are trained on every box some agent of the sample sees.
The segmentation and reconstruction heads work on the fused map (the ego's own map for none and
late). Reconstruction targets come from the holistic cloud: every agent's points moved with the
true poses.

Everything between agents goes through :class:`models.comm.V2XLink`; its records (bytes, latency)
come back in :attr:`PerceptionOutput.link`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from datasets.collate import CoopBatch
from datasets.coop_dataset import Visibility
from datasets.voxelize import VoxelGrid, Voxelizer
from models.bev import warp_to_ego
from models.comm import LinkStats, MessageRecord, Outgoing, V2XLink
from models.compressor import BevCompressor, CompressorConfig, straight_through
from models.encoder import EncoderConfig, PointCloudEncoder
from models.fusion.attfuse import AttentionFusion
from models.fusion.core import AttentiveAggregation, CoreConfig
from models.fusion.early import share_points
from models.fusion.late import detection_set, merge_detections
from models.heads.detection import (
    DetectionHead,
    DetectionHeadConfig,
    DetectionLoss,
    DetectionMaps,
    Detections,
)
from models.heads.reconstruction import (
    OccupancyTargets,
    ReconstructionConfig,
    ReconstructionHead,
    ReconstructionLoss,
    ReconstructionOutput,
)
from models.heads.segmentation import BevSegmentationHead, SegmentationHeadConfig, bev_semantic_targets
from models.keypoint_encoder import KeypointBevDecoder, KeypointEncoder, KeypointEncoderConfig
from models.spconv_cpu import spconv_native_state_dict_loading
from sim.geometry import invert_T, transform_points
from v2x.codecs import DetectionsCodec, KeypointFeatures, KeypointFeaturesCodec, RequestMapCodec
from v2x.message import CodecId

__all__ = [
    "FUSION_METHODS",
    "CooperativePerception",
    "FusionConfig",
    "PerceptionLoss",
    "PerceptionModelConfig",
    "PerceptionOutput",
]

FUSION_METHODS = ("none", "early", "late", "attfuse", "core")


@dataclass(frozen=True)
class FusionConfig:
    """How agents cooperate.

    Attributes:
        method: one of :data:`FUSION_METHODS`.
        message: intermediate fusion payload, ``"bev"`` (compressed BEV cells) or ``"keypoints"``
            (attfuse only).
        compressor: channel reduction and cell selection of BEV messages.
        core: CORE's request and aggregation settings.
        keypoints: the keypoint encoder of keypoint messages.
    """

    method: Literal["none", "early", "late", "attfuse", "core"] = "none"
    message: Literal["bev", "keypoints"] = "bev"
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    core: CoreConfig = field(default_factory=CoreConfig)
    keypoints: KeypointEncoderConfig = field(default_factory=KeypointEncoderConfig)

    def validate(self) -> None:
        """Check that the settings fit together (separate from construction, so that overrides can
        change several of them one after the other); raises ValueError."""
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method must be one of {FUSION_METHODS}, got {self.method!r}")
        if self.message == "keypoints" and self.method != "attfuse":
            raise ValueError("keypoint messages are fused by attfuse only")
        if self.method == "core" and self.compressor.selection != "request":
            raise ValueError("core selects cells by request: set fusion.compressor.selection=request")
        if self.method != "core" and self.compressor.selection == "request":
            raise ValueError("selection=request needs the core method (it sends the request maps)")

    @property
    def cooperative_training(self) -> bool:
        """Trained on boxes any agent sees (True) or only the ego's (False)."""
        return self.method in ("early", "attfuse", "core")


@dataclass(frozen=True)
class PerceptionModelConfig:
    """The whole model.

    Attributes:
        grid: voxel grid of every agent's cloud (own frame) and of the ego's merged cloud.
        encoder: sparse 3D and 2D backbones.
        detection: detection head.
        segmentation: BEV segmentation head.
        reconstruction: CORE reconstruction head.
        fusion: fusion method.
    """

    grid: VoxelGrid = field(default_factory=VoxelGrid)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    detection: DetectionHeadConfig = field(default_factory=DetectionHeadConfig)
    segmentation: SegmentationHeadConfig = field(default_factory=SegmentationHeadConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class PerceptionOutput:
    """What the model computed for a batch of B samples.

    Attributes:
        fused_features: (B, C, H, W) the map the heads ran on (ego frame).
        detection_maps: head outputs of the fused maps (K anchors each).
        segmentation_logits: (B, 3, H, W) or None when the head is off.
        reconstruction: the reconstruction head's output, or None when it is off or was not
            asked for (inference skips it unless ``with_reconstruction``).
        detections: B :class:`Detections` in the ego frame (late fusion: merged), or None when not
            asked for.
        link: every message sent.
    """

    fused_features: torch.Tensor
    detection_maps: DetectionMaps
    segmentation_logits: torch.Tensor | None
    reconstruction: ReconstructionOutput | None
    detections: list[Detections] | None
    link: LinkStats


@dataclass
class PerceptionLoss:
    """Loss terms of a batch; ``total`` is what is minimised."""

    detection: DetectionLoss
    segmentation: torch.Tensor
    reconstruction: ReconstructionLoss | None

    @property
    def total(self) -> torch.Tensor:
        total = self.detection.total + self.segmentation
        if self.reconstruction is not None:
            total = total + self.reconstruction.total
        return total

    def scalars(self) -> dict[str, float]:
        """Plain floats by name, for logging."""
        out = {
            "loss/total": float(self.total.detach()),
            "loss/cls": float(self.detection.cls.detach()),
            "loss/box": float(self.detection.box.detach()),
            "loss/dir": float(self.detection.direction.detach()),
            "loss/seg": float(self.segmentation.detach()),
        }
        if self.reconstruction is not None:
            out["loss/rec_occupancy"] = float(self.reconstruction.occupancy.detach())
            out["loss/rec_bev"] = float(self.reconstruction.bev.detach())
        return out


class CooperativePerception(nn.Module):
    """See the module docstring."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, immune to mmdet3d's process-wide spconv loader patch."""
        with spconv_native_state_dict_loading():
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __init__(self, config: PerceptionModelConfig) -> None:
        super().__init__()
        config.fusion.validate()
        self.config = config
        self.encoder = PointCloudEncoder(config.encoder, config.grid)
        self.bev_grid = self.encoder.bev_grid
        channels = self.encoder.out_channels
        self.detection = DetectionHead(config.detection, channels, self.bev_grid)
        self.segmentation = (
            BevSegmentationHead(config.segmentation, channels) if config.segmentation.enabled else None
        )
        self.reconstruction = (
            ReconstructionHead(config.reconstruction, channels, config.grid, self.bev_grid)
            if config.reconstruction.enabled
            else None
        )
        fusion = config.fusion
        self.compressor = (
            BevCompressor(fusion.compressor, channels)
            if fusion.method in ("attfuse", "core") and fusion.message == "bev"
            else None
        )
        self.attention = AttentionFusion() if fusion.method == "attfuse" else None
        self.aggregation = AttentiveAggregation(fusion.core, channels) if fusion.method == "core" else None
        if fusion.message == "keypoints":
            self.keypoint_encoder = KeypointEncoder(fusion.keypoints, self.bev_grid)
            self.keypoint_decoder = KeypointBevDecoder(fusion.keypoints.out_channels, channels, self.bev_grid)
        self.voxelizer = Voxelizer(config.grid)
        self.bev_stride = config.encoder.sparse.bev_stride

    # -------------------------------------------------------------------------------- encoding

    def encode_agents(self, batch: CoopBatch, agents: torch.Tensor) -> torch.Tensor:
        """(len(agents), C, H, W) features of the given flat agents, each in its own frame."""
        agent_of_voxel = batch.voxel_coords_bzyx[:, 0].long()
        position = torch.full((batch.num_agents,), -1, dtype=torch.long, device=agent_of_voxel.device)
        position[agents.to(agent_of_voxel.device)] = torch.arange(len(agents), device=agent_of_voxel.device)
        keep = position[agent_of_voxel] >= 0
        coords = batch.voxel_coords_bzyx[keep].clone()
        coords[:, 0] = position[agent_of_voxel[keep]].to(torch.int32)
        return self.encoder(batch.voxel_features[keep], coords, len(agents))

    def encode_clouds(self, clouds: list[torch.Tensor]) -> torch.Tensor:
        """(len(clouds), C, H, W) features of point clouds given in the frame of their map."""
        features, coords = [], []
        for i, cloud in enumerate(clouds):
            voxels = self.voxelizer(cloud)
            features.append(voxels.features)
            index = torch.full((len(voxels), 1), i, dtype=torch.int32, device=voxels.coords_zyx.device)
            coords.append(torch.cat([index, voxels.coords_zyx], dim=1))
        return self.encoder(torch.cat(features), torch.cat(coords), len(clouds))

    def holistic_clouds(self, batch: CoopBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sample, every agent's points moved into the ego frame with the true poses, and their
        semantic classes: B (N_b, 4) float32 and B (N_b,) uint8 tensors."""
        T = batch.T_ego_from_agent.to(batch.points.device, torch.float32)  # (A, 4, 4)
        T_point = T[batch.point_agent_index]  # (P, 4, 4)
        xyz = torch.einsum("pij,pj->pi", T_point[:, :3, :3], batch.points[:, :3]) + T_point[:, :3, 3]
        moved = torch.cat([xyz, batch.points[:, 3:]], dim=1)
        sample_of_point = batch.agent_sample_index.to(batch.points.device)[batch.point_agent_index]
        clouds = [moved[sample_of_point == s] for s in range(batch.batch_size)]
        semantic = [batch.point_semantic[sample_of_point == s] for s in range(batch.batch_size)]
        return clouds, semantic

    def occupied_cells(self, batch: CoopBatch) -> torch.Tensor:
        """(A, H, W) bool BEV cells in which each agent has at least one voxel (own frame)."""
        h, w = self.bev_grid.shape
        coords = batch.voxel_coords_bzyx.long()
        out = torch.zeros(batch.num_agents, h, w, dtype=torch.bool, device=coords.device)
        out[coords[:, 0], coords[:, 2] // self.bev_stride, coords[:, 3] // self.bev_stride] = True
        return out

    # ---------------------------------------------------------------------------------- fusion

    def _fuse_intermediate(
        self, batch: CoopBatch, features: torch.Tensor, link: V2XLink, records: list[list[MessageRecord]]
    ) -> torch.Tensor:
        """(B, C, H, W) fused maps from (A, C, H, W) per-agent features (attfuse, core)."""
        fusion = self.config.fusion
        grid = self.bev_grid
        h, w = grid.shape
        T_measured = batch.T_ego_from_agent_measured.cpu().numpy()
        positions = batch.agent_position_m.cpu().numpy()
        occupied = self.occupied_cells(batch)
        confidence = None
        if fusion.method == "core" or fusion.compressor.selection == "confidence":
            confidence = self.detection.confidence(features)  # (A, H, W), each agent's own frame
        compressed = self.compressor.compress(features) if self.compressor is not None else None  # (A, c, H, W)
        fused = []
        for s, (first, n) in enumerate(zip(batch.ego_agent_index.tolist(), batch.agents_per_sample.tolist(), strict=True)):
            info = batch.info[s]
            where = (info.run, info.frame, info.ego_id)
            agent_positions = {info.agent_ids[k]: positions[first + k] for k in range(n)}
            maps = [features[first]]
            valid = [torch.ones(1, h, w, dtype=torch.bool, device=features.device)]
            requests: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # request map, ego header pose
            if fusion.method == "core" and n > 1:
                request = (1.0 - confidence[first]) > fusion.core.request_threshold  # (H, W) ego frame
                payload = RequestMapCodec().encode(request.cpu().numpy())
                got = link.broadcast(
                    Outgoing(info.ego_id, np.eye(4), CodecId.REQUEST_MAP, payload),
                    list(info.agent_ids[1:]),
                    agent_positions,
                    where,
                    phase=0,
                    records=records[s],
                )
                requests = {agent_id: (r.content, r.T_ref_from_sender) for agent_id, r in got.items()}
            outgoing, sent = [], {}
            for k in range(1, n):
                a = first + k
                agent_id = info.agent_ids[k]
                if fusion.message == "keypoints":
                    xyz, kp_features = self.keypoint_encoder(batch.agent_points(a))
                    payload = KeypointFeaturesCodec().encode(
                        KeypointFeatures(xyz.detach().cpu().numpy(), kp_features.detach().float().cpu().numpy())
                    )
                    outgoing.append(Outgoing(agent_id, T_measured[a], CodecId.KEYPOINT_FEATURES, payload))
                    sent[agent_id] = kp_features
                    continue
                request_in_agent = None
                if fusion.compressor.selection == "request" and agent_id in requests:
                    request_map, T_ref_from_ego = requests[agent_id]
                    T_agent_from_ego = invert_T(T_measured[a]) @ T_ref_from_ego
                    request_t = torch.from_numpy(request_map.astype(np.float32)).to(features.device)
                    warped_request, _ = warp_to_ego(
                        request_t[None, None], torch.from_numpy(T_agent_from_ego)[None], grid, mode="nearest"
                    )
                    request_in_agent = warped_request[0, 0]
                score = self.selection_score(
                    occupied[a], compressed[a], confidence[a] if confidence is not None else None, request_in_agent
                )
                mask = self.compressor.select(score)  # (H, W)
                outgoing.append(
                    Outgoing(agent_id, T_measured[a], CodecId.SPARSE_BEV, self.compressor.encode(compressed[a], mask))
                )
                sent[agent_id] = (compressed[a] * mask, mask)
            for message in link.exchange(outgoing, info.ego_id, agent_positions, where, phase=1, records=records[s]):
                T_ego_from_sender = torch.from_numpy(message.T_ref_from_sender)[None]
                if fusion.message == "keypoints":
                    kp = message.content
                    xyz_ego = transform_points(message.T_ref_from_sender, kp.xyz)
                    xyz_t = torch.from_numpy(np.ascontiguousarray(xyz_ego, dtype=np.float32)).to(features.device)
                    kp_t = straight_through(sent[message.sender_id], kp.features)
                    feature_map, cover = self.keypoint_decoder(xyz_t, kp_t)
                    maps.append(feature_map)
                    valid.append(cover)
                    continue
                sent_values, mask = sent[message.sender_id]
                received = straight_through(sent_values, message.content.to_dense())  # (c, H, W)
                restored = self.compressor.decompress(received[None]) * mask[None, None]  # (1, C, H, W)
                warped, _ = warp_to_ego(restored, T_ego_from_sender, grid)
                cover, _ = warp_to_ego(mask[None, None].to(features.dtype), T_ego_from_sender, grid, mode="nearest")
                maps.append(warped[0])
                valid.append(cover[0] > 0.5)
            stacked = torch.stack(maps)  # (n_received + 1, C, H, W)
            stacked_valid = torch.stack(valid)  # (n_received + 1, 1, H, W)
            if fusion.method == "attfuse":
                fused.append(self.attention(stacked, stacked_valid))
            else:
                conf = self.detection.confidence(stacked)[:, None]  # (n, 1, H, W)
                fused.append(self.aggregation(stacked, conf, stacked_valid))
        return torch.stack(fused)

    def selection_score(
        self,
        occupied: torch.Tensor,
        compressed: torch.Tensor,
        confidence: torch.Tensor | None,
        request: torch.Tensor | None,
    ) -> torch.Tensor:
        """(H, W) score of a sender's cells for :meth:`BevCompressor.select` (own frame; 0: never sent).

        Args:
            occupied: (H, W) bool cells holding a voxel of the sender.
            compressed: (c, H, W) its compressed features.
            confidence: (H, W) its detection confidence (``confidence`` and ``request`` selection).
            request: (H, W) the ego's request warped into its frame, or None when none was heard.

        ``nonempty`` ranks the occupied cells by the norm of their compressed features.
        ``confidence`` and ``request`` rank *every* cell by the sender's confidence (times the
        request), as Where2comm and CORE do: the detection head reads one cell per anchor, and the
        cell of a vehicle's box centre usually holds no voxel (the LiDAR hits the near side of the
        vehicle), so gating them by occupancy would drop the very cells that carry the detection.
        """
        match self.config.fusion.compressor.selection:
            case "nonempty":
                return occupied.to(compressed.dtype) * compressed.detach().norm(dim=0)
            case "confidence":
                return confidence.to(compressed.dtype)
            case "request":
                if request is None:
                    return torch.zeros_like(confidence)  # no request heard: nothing to answer
                return confidence * request
            case selection:
                raise ValueError(f"unknown selection {selection!r}")

    # --------------------------------------------------------------------------------- forward

    def forward(
        self,
        batch: CoopBatch,
        link: V2XLink,
        with_loss: bool = True,
        with_detections: bool = False,
        with_reconstruction: bool = False,
    ) -> tuple[PerceptionOutput, PerceptionLoss | None]:
        """Run the model on a batch.

        Args:
            batch: on the model's device.
            link: the V2X link every message goes through.
            with_loss: compute the loss against the batch's ground truth.
            with_detections: decode boxes (late fusion: and exchange and merge them).
            with_reconstruction: run the reconstruction head (when the model has one) also without
                the loss. CORE's reconstruction is a training-time auxiliary: by default inference
                skips it and the holistic view it needs, which saves about a third of the ego's
                per-frame time.

        Returns:
            (outputs, loss or None).
        """
        method = self.config.fusion.method
        stats = LinkStats([[] for _ in range(batch.batch_size)])
        ego = batch.ego_agent_index
        match method:
            case "none":
                fused = self.encode_agents(batch, ego)
            case "late":
                fused = self.encode_agents(batch, ego)
            case "early":
                fused = self.encode_clouds(share_points(batch, link, stats.records))
            case "attfuse" | "core":
                all_agents = torch.arange(batch.num_agents, device=ego.device)
                fused = self._fuse_intermediate(batch, self.encode_agents(batch, all_agents), link, stats.records)
            case _:
                raise ValueError(f"unknown fusion method {method!r}")

        maps = self.detection(fused)
        seg_logits = self.segmentation(fused) if self.segmentation is not None else None
        run_reconstruction = self.reconstruction is not None and (with_loss or with_reconstruction)
        need_holistic = run_reconstruction or (with_loss and self.segmentation is not None)
        clouds, semantic = self.holistic_clouds(batch) if need_holistic else ([], [])
        occupancy = None
        if run_reconstruction and self.config.reconstruction.occupancy and with_loss:
            occupancy = self._occupancy_targets(clouds)
        reconstruction = self.reconstruction(fused, occupancy) if run_reconstruction else None

        detections = None
        if with_detections:
            detections = self.detection.decode(maps)
            if method == "late":
                detections = self._late_merge(batch, detections, link, stats.records)
        output = PerceptionOutput(fused, maps, seg_logits, reconstruction, detections, stats)
        if not with_loss:
            return output, None
        return output, self._loss(batch, output, clouds, semantic, occupancy)

    def _occupancy_targets(self, clouds: list[torch.Tensor]) -> OccupancyTargets:
        coords = []
        for s, cloud in enumerate(clouds):
            voxels = self.voxelizer(cloud)
            index = torch.full((len(voxels), 1), s, dtype=torch.int32, device=voxels.coords_zyx.device)
            coords.append(torch.cat([index, voxels.coords_zyx], dim=1))
        return self.reconstruction.occupancy_targets(torch.cat(coords), len(clouds))

    def _late_merge(
        self, batch: CoopBatch, ego_detections: list[Detections], link: V2XLink, records: list[list[MessageRecord]]
    ) -> list[Detections]:
        """Late fusion at decoding: the others detect on their own data, send, the ego merges."""
        others = torch.tensor(
            [a for a in range(batch.num_agents) if a not in set(batch.ego_agent_index.tolist())], dtype=torch.long
        )
        own: dict[int, Detections] = {}
        if len(others):
            decoded = self.detection.decode(self.detection(self.encode_agents(batch, others.to(batch.points.device))))
            own = dict(zip(others.tolist(), decoded, strict=True))
        T_measured = batch.T_ego_from_agent_measured.cpu().numpy()
        positions = batch.agent_position_m.cpu().numpy()
        codec = DetectionsCodec()
        out = []
        for s, (first, n) in enumerate(zip(batch.ego_agent_index.tolist(), batch.agents_per_sample.tolist(), strict=True)):
            info = batch.info[s]
            outgoing = [
                Outgoing(info.agent_ids[k], T_measured[first + k], CodecId.DETECTIONS, codec.encode(detection_set(own[first + k])))
                for k in range(1, n)
            ]
            where = (info.run, info.frame, info.ego_id)
            agent_positions = {info.agent_ids[k]: positions[first + k] for k in range(n)}
            received = link.exchange(outgoing, info.ego_id, agent_positions, where, records=records[s])
            cfg = self.config.detection
            out.append(
                merge_detections(
                    ego_detections[s],
                    [(m.T_ref_from_sender, m.content) for m in received],
                    cfg.nms_iou,
                    cfg.max_detections,
                )
            )
        return out

    # ------------------------------------------------------------------------------------ loss

    def segmentation_targets(self, batch: CoopBatch, clouds: list[torch.Tensor], semantic: list[torch.Tensor]) -> torch.Tensor:
        """(B, H, W) int64 BEV labels of each sample (see :mod:`models.heads.segmentation`)."""
        out = []
        for s in range(batch.batch_size):
            boxes, _, _ = batch.sample_gt(s)
            out.append(bev_semantic_targets(self.bev_grid, clouds[s], semantic[s], boxes))
        return torch.stack(out)

    def _loss(
        self,
        batch: CoopBatch,
        output: PerceptionOutput,
        clouds: list[torch.Tensor],
        semantic: list[torch.Tensor],
        occupancy: OccupancyTargets | None,
    ) -> PerceptionLoss:
        targets = []
        for s in range(batch.batch_size):
            boxes, labels, visibility = batch.sample_gt(s)
            if not self.config.fusion.cooperative_training:
                keep = visibility == int(Visibility.EGO)
                boxes, labels = boxes[keep], labels[keep]
            targets.append((boxes.cpu().numpy(), labels.cpu().numpy()))
        detection = self.detection.loss(output.detection_maps, targets)
        segmentation = output.fused_features.sum() * 0.0
        if self.segmentation is not None:
            segmentation = self.segmentation.loss(
                output.segmentation_logits, self.segmentation_targets(batch, clouds, semantic)
            )
        reconstruction = None
        if self.reconstruction is not None:
            holistic_bev = None
            if self.config.reconstruction.bev:
                was_training = self.encoder.training
                self.encoder.eval()  # the target must not move the batch-norm statistics
                with torch.no_grad():
                    holistic_bev = self.encode_clouds(clouds)
                self.encoder.train(was_training)
            reconstruction = self.reconstruction.loss(output.reconstruction, occupancy, holistic_bev)
        return PerceptionLoss(detection, segmentation, reconstruction)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

