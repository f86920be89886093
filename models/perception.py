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

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.collate import CoopBatch
from datasets.coop_dataset import Visibility
from datasets.voxelize import VoxelGrid, Voxelizer
from models.bev import ego_sampling_grid, warp_to_ego
from models.bev_backbone import PostFusionNeck
from models.comm import LinkStats, MessageRecord, Outgoing, Received, V2XLink
from models.compressor import BevCompressor, CompressorConfig, straight_through
from models.encoder import EncoderConfig, PointCloudEncoder
from models.fusion.attfuse import AttentionFusion, MaxFusion
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
    "SenderClock",
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
        proj_first: BEV messages of attfuse and core: each sender moves its points into the ego
            frame (with ``T_ego_from_agent_measured``) and voxelises them on the ego's grid before
            encoding (OpenCOOD's ``proj_first``), so its map is already in the ego frame and the
            receiver does not warp it; the message header then carries the pose of the map's
            frame, the ego's (identity here). Off: each sender encodes in its own frame and the
            receiver warps the cells it gets. Projecting first keeps a vehicle's heading in the
            ego frame in the features, at the cost of one encoder pass per receiver on the sender.
        combine: how attfuse combines the agents' maps at a cell: ``"attention"`` (OpenCOOD's
            AttFusion) or ``"max"`` (F-Cooper's element-wise maximum,
            :class:`models.fusion.attfuse.MaxFusion`).
        post_layers: 3x3 convolutions on the fused map before the heads
            (:class:`models.bev_backbone.PostFusionNeck`), the same for every method (for none and
            late on the ego's own map, for late also on each sender's). The confidence maps that
            pick cells to send are the head's on a sender's map through the neck. Not with core,
            whose aggregation weighs the received maps by the head's confidence cell by cell.
        before_bev_backbone: attfuse with BEV messages: fuse the sparse 3D backbone's BEV maps
            and run the 2D backbone on the fused map, as OpenCOOD's VoxelNet AttFuse does (its
            attention sits between the 3D middle layers and the RPN), instead of fusing the 2D
            backbone's outputs. The received evidence is then pooled before the convolutions that
            spread a vehicle's points to its box centre, as early fusion pools points. Senders
            still run their whole encoder and head to score cells (their confidence); the
            compressor works on the sparse backbone's channels. The selection
            ``occupied_confidence`` suits it: these maps are zero where a sender has no voxel.
    """

    method: Literal["none", "early", "late", "attfuse", "core"] = "none"
    message: Literal["bev", "keypoints"] = "bev"
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    core: CoreConfig = field(default_factory=CoreConfig)
    keypoints: KeypointEncoderConfig = field(default_factory=KeypointEncoderConfig)
    proj_first: bool = False
    combine: Literal["attention", "max"] = "attention"
    post_layers: int = 0
    before_bev_backbone: bool = False

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
        if self.proj_first and (self.method not in ("attfuse", "core") or self.message != "bev"):
            raise ValueError(
                "proj_first applies to the BEV messages of attfuse and core "
                f"(got method={self.method!r}, message={self.message!r})"
            )
        if self.combine not in ("attention", "max"):
            raise ValueError(f"fusion.combine must be 'attention' or 'max', got {self.combine!r}")
        if self.combine != "attention" and self.method != "attfuse":
            raise ValueError(f"fusion.combine={self.combine!r} applies to attfuse only (got {self.method!r})")
        if self.post_layers < 0:
            raise ValueError(f"fusion.post_layers must be >= 0, got {self.post_layers}")
        if self.compressor.apply_to_ego and (self.method not in ("attfuse", "core") or self.message != "bev"):
            raise ValueError(
                "fusion.compressor.apply_to_ego applies to the BEV messages of attfuse and core "
                f"(got method={self.method!r}, message={self.message!r})"
            )
        if self.before_bev_backbone and (self.method != "attfuse" or self.message != "bev"):
            raise ValueError(
                "fusion.before_bev_backbone applies to attfuse with BEV messages "
                f"(got method={self.method!r}, message={self.message!r})"
            )
        if self.post_layers and self.method == "core":
            raise ValueError(
                "fusion.post_layers does not apply to core: its aggregation reads the head's "
                "confidence on each received map, before any neck"
            )

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


class SenderClock:
    """Wall time the model spends, in one process, on work that runs on the *other* vehicles.

    Simulating every agent in one process serialises what the vehicles do in parallel. With a
    clock attached (``model.sender_clock = SenderClock()``), the model adds to :attr:`seconds` the
    time of the senders' share of a frame outside their encoders: cell selection (with the
    request warped into the sender's frame), compression of their maps, codec encoding of their
    payloads (BEV cells, keypoints, detection sets), and for late fusion their heads and decoding.
    Not counted (left on the ego's side): the encoders (timed on their own by the latency bench),
    the link's wire framing and bus, and on the plain path the confidence maps, which it computes
    for all agents in one call (the :meth:`CooperativePerception.fuse_for_inference` copy computes
    the senders' apart and counts them). Timing costs two ``perf_counter`` calls a section.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


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
        self.neck = PostFusionNeck(channels, config.fusion.post_layers)
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
            BevCompressor(
                fusion.compressor,
                self.encoder.sparse.bev_channels if fusion.before_bev_backbone else channels,
            )
            if fusion.method in ("attfuse", "core") and fusion.message == "bev"
            else None
        )
        self.attention = None
        if fusion.method == "attfuse":
            self.attention = MaxFusion() if fusion.combine == "max" else AttentionFusion()
        self.aggregation = AttentiveAggregation(fusion.core, channels) if fusion.method == "core" else None
        if fusion.message == "keypoints":
            self.keypoint_encoder = KeypointEncoder(fusion.keypoints, self.bev_grid)
            self.keypoint_decoder = KeypointBevDecoder(fusion.keypoints.out_channels, channels, self.bev_grid)
        self.voxelizer = Voxelizer(config.grid)
        self.bev_stride = config.encoder.sparse.bev_stride
        self.inference_only = False  # True on the copies made by fuse_for_inference
        self.sender_clock: SenderClock | None = None
        self._scratch: torch.Tensor | None = None  # see _zero_map

    # ------------------------------------------------------------------------------- inference

    def fuse_for_inference(self) -> CooperativePerception:
        """An eval-mode copy of this model for inference only (no gradients, no training).

        Same outputs up to float32 rounding (``tests/perception/test_perception_inference.py``),
        less work on CPU:

        - the encoder's batch norms folded into its convolutions, the sparse 3D backbone run in
          plain torch and the 2D one in channels-last (:meth:`PointCloudEncoder.fuse_for_inference`);
        - intermediate fusion (attfuse, core) done only where it can change anything: at the ego
          cells that a received map covers. Elsewhere the masked softmax over agents has the ego
          alone and returns the ego's own features exactly, so the received maps are decompressed
          only at the cells sent, warped (one sampling grid for all senders) only at the ego cells
          they cover, and the confidence, scoring and weighting run on those cells alone. The ego
          works from the decoded messages only (the sender's copy of what it sent is not used).

        This model is left as it is (the copy has its own weights). ``train()`` on the copy raises.
        """
        fused = copy.deepcopy(self).eval()
        fused.encoder = fused.encoder.fuse_for_inference()
        fused.neck = fused.neck.fuse_for_inference()
        fused.inference_only = True
        fused.sender_clock = None
        return fused

    def train(self, mode: bool = True) -> CooperativePerception:
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError(
                "this copy was made by fuse_for_inference and cannot be trained; train the original"
            )
        return super().train(mode)

    def _on_senders(self) -> contextlib.AbstractContextManager:
        """Context of work that runs on the other vehicles (timed when a clock is attached)."""
        return self.sender_clock.section() if self.sender_clock is not None else contextlib.nullcontext()

    # -------------------------------------------------------------------------------- encoding

    def encode_agents(
        self,
        batch: CoopBatch,
        agents: torch.Tensor,
        in_ego_frame: bool = False,
        bev_backbone: bool = True,
    ) -> torch.Tensor:
        """(len(agents), C, H, W) features of the given flat agents, each in its own frame, or with
        ``in_ego_frame`` in its sample's ego frame (:meth:`clouds_in_ego_frame`); with
        ``bev_backbone=False`` the sparse backbone's (len(agents), C_bev, H, W) maps."""
        if in_ego_frame:
            return self._encode_in_ego_frame(batch, agents, bev_backbone)[0]
        agent_of_voxel = batch.voxel_coords_bzyx[:, 0].long()
        position = torch.full((batch.num_agents,), -1, dtype=torch.long, device=agent_of_voxel.device)
        position[agents.to(agent_of_voxel.device)] = torch.arange(len(agents), device=agent_of_voxel.device)
        keep = position[agent_of_voxel] >= 0
        coords = batch.voxel_coords_bzyx[keep].clone()
        coords[:, 0] = position[agent_of_voxel[keep]].to(torch.int32)
        return self.encoder(batch.voxel_features[keep], coords, len(agents), bev_backbone)

    def encode_clouds(self, clouds: list[torch.Tensor]) -> torch.Tensor:
        """(len(clouds), C, H, W) features of point clouds given in the frame of their map."""
        features, coords = self._voxelise_clouds(clouds)
        return self.encoder(features, coords, len(clouds))

    def _voxelise_clouds(self, clouds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, 4) voxel features and (V, 4) ``[cloud index, z, y, x]`` coords of ``clouds``."""
        features, coords = [], []
        for i, cloud in enumerate(clouds):
            voxels = self.voxelizer(cloud)
            features.append(voxels.features)
            index = torch.full((len(voxels), 1), i, dtype=torch.int32, device=voxels.coords_zyx.device)
            coords.append(torch.cat([index, voxels.coords_zyx], dim=1))
        return torch.cat(features), torch.cat(coords)

    def _encode_in_ego_frame(
        self, batch: CoopBatch, agents: torch.Tensor, bev_backbone: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(agents), C, H, W) features of the given flat agents encoded in their sample's ego
        frame (sparse-backbone maps without ``bev_backbone``), and the (V, 4)
        ``[index in agents, z, y, x]`` voxel coords they were encoded from."""
        features, coords = self._voxelise_clouds(self.clouds_in_ego_frame(batch, agents))
        return self.encoder(features, coords, len(agents), bev_backbone), coords

    @staticmethod
    def _points_moved(batch: CoopBatch, T_ego_from_agent: torch.Tensor) -> torch.Tensor:
        """(P, 4) every point of the batch moved by its agent's (A, 4, 4) pose into its ego frame."""
        T = T_ego_from_agent.to(batch.points.device, torch.float32)
        T_point = T[batch.point_agent_index]  # (P, 4, 4)
        xyz = torch.einsum("pij,pj->pi", T_point[:, :3, :3], batch.points[:, :3]) + T_point[:, :3, 3]
        return torch.cat([xyz, batch.points[:, 3:]], dim=1)

    def clouds_in_ego_frame(self, batch: CoopBatch, agents: torch.Tensor) -> list[torch.Tensor]:
        """(N_a, 4) points of each of the given flat agents in its sample's ego frame, as the agent
        itself computes them: moved with its *measured* pose ``T_ego_from_agent_measured`` (what
        every pose in a message header is made of). An ego's own points are returned as they are.
        Points that fall outside the grid are dropped later by the voxeliser, as OpenCOOD's
        ``proj_first`` drops them."""
        egos = set(batch.ego_agent_index.tolist())
        moved = self._points_moved(batch, batch.T_ego_from_agent_measured)
        source = {True: batch.points, False: moved}
        return [source[a in egos][batch.point_agent_index == a] for a in agents.tolist()]

    def holistic_clouds(self, batch: CoopBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sample, every agent's points moved into the ego frame with the true poses, and their
        semantic classes: B (N_b, 4) float32 and B (N_b,) uint8 tensors."""
        moved = self._points_moved(batch, batch.T_ego_from_agent)
        sample_of_point = batch.agent_sample_index.to(batch.points.device)[batch.point_agent_index]
        clouds = [moved[sample_of_point == s] for s in range(batch.batch_size)]
        semantic = [batch.point_semantic[sample_of_point == s] for s in range(batch.batch_size)]
        return clouds, semantic

    def occupied_cells(self, batch: CoopBatch, voxel_coords_bzyx: torch.Tensor | None = None) -> torch.Tensor:
        """(A, H, W) bool BEV cells in which each agent has at least one voxel: of the batch's
        voxels (own frame), or of the given ``[flat agent, z, y, x]`` coords (e.g. encoded in the
        ego frame)."""
        h, w = self.bev_grid.shape
        coords = (batch.voxel_coords_bzyx if voxel_coords_bzyx is None else voxel_coords_bzyx).long()
        out = torch.zeros(batch.num_agents, h, w, dtype=torch.bool, device=coords.device)
        out[coords[:, 0], coords[:, 2] // self.bev_stride, coords[:, 3] // self.bev_stride] = True
        return out

    # ---------------------------------------------------------------------------------- fusion

    def _fuse_intermediate(
        self,
        batch: CoopBatch,
        features: torch.Tensor,
        link: V2XLink,
        records: list[list[MessageRecord]],
        voxel_coords_bzyx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) fused maps from (A, C, H, W) per-agent features (attfuse, core; with
        ``before_bev_backbone`` the sparse backbone's maps, fused before the 2D backbone);
        ``voxel_coords_bzyx``: the voxels the maps were encoded from when not the batch's own
        (proj_first)."""
        fusion = self.config.fusion
        grid = self.bev_grid
        h, w = grid.shape
        # Pose of each agent's map in the ego frame (message headers, request warps): the agent's
        # measured pose, or the identity when it encoded in the ego frame (proj_first).
        T_map = batch.T_ego_from_agent_measured.cpu().numpy()
        if fusion.proj_first:
            T_map = np.broadcast_to(np.eye(4), T_map.shape).copy()
        positions = batch.agent_position_m.cpu().numpy()
        occupied = None
        if fusion.compressor.uses_occupancy and self.compressor is not None:
            with self._on_senders():
                occupied = self.occupied_cells(batch, voxel_coords_bzyx)  # (A, H, W), in each map's frame
        need_confidence = fusion.method == "core" or fusion.compressor.uses_confidence
        if self.inference_only:
            confidence, compressed = self._per_agent_maps(batch, features, need_confidence)
        else:
            confidence = None
            if need_confidence:
                confidence = self.sender_confidence(features)  # (A, H, W), each agent's own frame
            compressed = None
            if self.compressor is not None:
                with self._on_senders():
                    compressed = self.compressor.compress(features)  # (A, c, H, W)
        fused = []
        for s, (first, n) in enumerate(
            zip(batch.ego_agent_index.tolist(), batch.agents_per_sample.tolist(), strict=True)
        ):
            info = batch.info[s]
            where = (info.run, info.frame, info.ego_id)
            agent_positions = {info.agent_ids[k]: positions[first + k] for k in range(n)}
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
                with self._on_senders():
                    if fusion.message == "keypoints":
                        xyz, kp_features = self.keypoint_encoder(batch.agent_points(a))
                        payload = KeypointFeaturesCodec().encode(
                            KeypointFeatures(
                                xyz.detach().cpu().numpy(), kp_features.detach().float().cpu().numpy()
                            )
                        )
                        outgoing.append(Outgoing(agent_id, T_map[a], CodecId.KEYPOINT_FEATURES, payload))
                        sent[agent_id] = kp_features
                        continue
                    request_in_agent = None
                    if fusion.compressor.selection == "request" and agent_id in requests:
                        request_map, T_ref_from_ego = requests[agent_id]
                        T_agent_from_ego = invert_T(T_map[a]) @ T_ref_from_ego
                        request_t = torch.from_numpy(request_map.astype(np.float32)).to(features.device)
                        warped_request, _ = warp_to_ego(
                            request_t[None, None],
                            torch.from_numpy(T_agent_from_ego)[None],
                            grid,
                            mode="nearest",
                        )
                        request_in_agent = warped_request[0, 0]
                    score = self.selection_score(
                        occupied[a] if occupied is not None else None,
                        compressed[a],
                        confidence[a] if confidence is not None else None,
                        request_in_agent,
                    )
                    mask = self.compressor.select(score)  # (H, W)
                    outgoing.append(
                        Outgoing(
                            agent_id,
                            T_map[a],
                            CodecId.SPARSE_BEV,
                            self.compressor.encode(compressed[a], mask),
                        )
                    )
                    sent[agent_id] = (compressed[a] * mask, mask)
            received = link.exchange(
                outgoing, info.ego_id, agent_positions, where, phase=1, records=records[s]
            )
            own = features[first]
            if fusion.compressor.apply_to_ego and self.compressor is not None:
                own = self.compressor.round_trip(own[None])[0]
            if self.inference_only:
                fused.append(self._fuse_received_cells(own, received))
                continue
            maps = [own]
            valid = [torch.ones(1, h, w, dtype=torch.bool, device=features.device)]
            for message in received:
                T_ego_from_sender = torch.from_numpy(message.T_ref_from_sender)[None]
                if fusion.message == "keypoints":
                    feature_map, cover = self._keypoint_map(message, sent[message.sender_id], features.device)
                    maps.append(feature_map)
                    valid.append(cover)
                    continue
                sent_values, mask = sent[message.sender_id]
                received_values = straight_through(sent_values, message.content.to_dense())  # (c, H, W)
                restored = (
                    self.compressor.decompress(received_values[None]) * mask[None, None]
                )  # (1, C, H, W)
                warped, _ = warp_to_ego(restored, T_ego_from_sender, grid)
                cover, _ = warp_to_ego(
                    mask[None, None].to(features.dtype), T_ego_from_sender, grid, mode="nearest"
                )
                maps.append(warped[0])
                valid.append(cover[0] > 0.5)
            stacked = torch.stack(maps)  # (n_received + 1, C, H, W)
            stacked_valid = torch.stack(valid)  # (n_received + 1, 1, H, W)
            fused.append(self._aggregate(stacked, stacked_valid))
        if self.inference_only and len(fused) == 1:
            return fused[0][None]  # no copy for a batch of one
        return torch.stack(fused)

    def _per_agent_maps(
        self, batch: CoopBatch, features: torch.Tensor, need_confidence: bool
    ) -> tuple[list[torch.Tensor | None] | None, list[torch.Tensor | None] | None]:
        """Inference path: each agent's (H, W) confidence and (c, H, W) compressed map, indexed by
        flat agent, computed per role: the ego's confidence (its request, core only) on the ego's
        side, the senders' confidence and compression on theirs (:meth:`_on_senders`); the ego's
        compressed map, which nobody sends, is not computed. Rows are views of per-sample batches.
        """
        method = self.config.fusion.method
        confidence: list[torch.Tensor | None] | None = [None] * batch.num_agents if need_confidence else None
        compressed: list[torch.Tensor | None] | None = (
            [None] * batch.num_agents if self.compressor is not None else None
        )
        for first, n in zip(batch.ego_agent_index.tolist(), batch.agents_per_sample.tolist(), strict=True):
            if confidence is not None and method == "core":
                confidence[first] = self.detection.confidence(features[first : first + 1])[0]
            if n == 1:
                continue
            senders = features[first + 1 : first + n]  # a sample's agents are consecutive, ego first
            with self._on_senders():
                if confidence is not None:
                    confidence[first + 1 : first + n] = list(self.sender_confidence(senders))
                if compressed is not None:
                    compressed[first + 1 : first + n] = list(self.compressor.compress(senders))
        return confidence, compressed

    def sender_confidence(self, features: torch.Tensor) -> torch.Tensor:
        """(N, H, W) detection confidence of agents on their own (N, C, H, W) maps, the score
        cells are selected by. With ``before_bev_backbone`` the maps are the sparse backbone's
        and the sender runs its 2D backbone on them first; the confidence only picks cells (no
        gradient flows through the choice), so that pass keeps no graph."""
        if not self.config.fusion.before_bev_backbone:
            return self.detection.confidence(self.neck(features))
        with torch.no_grad():
            return self.detection.confidence(self.neck(self.encoder.bev(features)))

    def _aggregate(self, stacked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) maps in the ego frame (the ego's first) + (n, 1, H, W) validity -> (C, H, W)
        fused by attention or the maximum (attfuse) or attentive aggregation on the maps' confidence (core). Every
        step is per cell, so H x W may be any set of cells laid out as a map (the inference path
        passes (1, cells))."""
        if self.config.fusion.method == "attfuse":
            return self.attention(stacked, valid)
        conf = self.detection.confidence(stacked)[:, None]  # (n, 1, H, W)
        return self.aggregation(stacked, conf, valid)

    def _keypoint_map(
        self, message: Received, sent_features: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A keypoint message as a (C, H, W) map in the ego frame and its (1, H, W) bool cover.
        ``sent_features``: the sender's (K, C_kp) keypoint features, for the gradient (straight
        through the codec); None at inference, where the decoded ones are used as they are."""
        kp = message.content
        xyz_ego = transform_points(message.T_ref_from_sender, kp.xyz)
        xyz_t = torch.from_numpy(np.ascontiguousarray(xyz_ego, dtype=np.float32)).to(device)
        if sent_features is None:
            kp_t = torch.from_numpy(np.asarray(kp.features, dtype=np.float32)).to(device)
        else:
            kp_t = straight_through(sent_features, kp.features)
        return self.keypoint_decoder(xyz_t, kp_t)

    def _zero_map(self, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(C, H*W) zeros kept between calls, for maps that are zero but at a few cells: the caller
        sets its cells and zeroes them again, which costs O(cells) instead of a fresh H x W fill."""
        h, w = self.bev_grid.shape
        scratch = self._scratch
        if (
            scratch is None
            or scratch.shape != (channels, h * w)
            or scratch.device != device
            or scratch.dtype != dtype
        ):
            scratch = self._scratch = torch.zeros(channels, h * w, device=device, dtype=dtype)
        return scratch

    def _fuse_received_cells(self, ego_map: torch.Tensor, received: list[Received]) -> torch.Tensor:
        """Inference path of one sample's fusion: (C, H, W) ego features + decoded messages ->
        (C, H, W) fused map, equal to the dense path's up to float32 rounding.

        Only ego cells covered by some received map can differ from the ego's own features (the
        masked softmax over agents has the ego alone elsewhere, weight exactly 1), so only those
        cells are computed: a BEV message is decompressed at the k cells it carries, its cover is
        the nearest-neighbour warp of those cells (one sampling grid per sender, all senders in
        one ``grid_sample``), and its features are sampled bilinearly only at the ego cells it
        covers; then the per-cell fusion (:meth:`_aggregate`) runs on the union U of covered cells
        laid out as a (1, |U|) map.
        """
        c = ego_map.shape[0]
        h, w = self.bev_grid.shape
        device, dtype = ego_map.device, ego_map.dtype
        if not received:
            return ego_map
        covers: list[torch.Tensor] = []  # per sender, (H*W,) bool cover in the ego frame
        values: list[torch.Tensor] = []  # per sender, (C, n_i) features at its covered cells
        if self.config.fusion.message == "keypoints":
            for message in received:
                feature_map, cover = self._keypoint_map(message, None, device)
                covers.append(cover.reshape(-1))
                values.append(feature_map.reshape(c, -1)[:, covers[-1]])
        else:
            T = torch.from_numpy(np.stack([m.T_ref_from_sender for m in received]))  # (r, 4, 4)
            sampling = ego_sampling_grid(T, self.bev_grid, device, dtype)  # (r, H, W, 2)
            sent_cells = [torch.from_numpy(m.content.indices).to(device) for m in received]
            masks = torch.zeros(len(received), 1, h * w, dtype=dtype, device=device)
            for i, cells in enumerate(sent_cells):
                masks[i, 0, cells] = 1.0
            cover_all = F.grid_sample(
                masks.view(-1, 1, h, w), sampling, mode="nearest", padding_mode="zeros", align_corners=False
            )
            cover_all = cover_all.reshape(len(received), -1) > 0.5  # (r, H*W)
            for i, message in enumerate(received):
                covered = cover_all[i].nonzero().squeeze(1)
                cells_values = torch.from_numpy(message.content.features).to(
                    device=device, dtype=dtype
                )  # (k, c)
                restored_cells = self.compressor.decompress(cells_values.T[None, :, None, :])  # (1, C, 1, k)
                restored = self._zero_map(c, device, dtype)  # (C, H*W), zero outside the cells set here
                restored[:, sent_cells[i]] = restored_cells[0, :, 0]
                where = sampling[i].reshape(-1, 2)[covered][None, None]  # (1, 1, n_i, 2)
                try:
                    sampled = F.grid_sample(
                        restored.view(1, c, h, w),
                        where,
                        mode="bilinear",
                        padding_mode="zeros",
                        align_corners=False,
                    )
                finally:
                    restored[:, sent_cells[i]] = 0.0  # back to all zeros for the next sender
                covers.append(cover_all[i])
                values.append(sampled[0, :, 0])  # (C, n_i)
        cover_stack = torch.stack(covers)  # (r, H*W)
        union = cover_stack.any(dim=0).nonzero().squeeze(1)  # (U,) flat ego cells
        flat = ego_map.reshape(c, -1)
        if union.numel() == 0:
            return ego_map
        n = len(received) + 1
        stacked = torch.zeros(n, c, union.numel(), dtype=dtype, device=device)
        stacked[0] = flat[:, union]
        valid = torch.zeros(n, union.numel(), dtype=torch.bool, device=device)
        valid[0] = True
        for i, (cover, cell_values) in enumerate(zip(covers, values, strict=True)):
            at = cover[union]  # which union cells sender i covers (its covered cells, in order)
            stacked[i + 1][:, at] = cell_values
            valid[i + 1] = at
        out = self._aggregate(stacked[:, :, None, :], valid[:, None, None, :])  # (C, 1, U)
        result = flat.clone()
        result[:, union] = out[:, 0]
        return result.view(c, h, w)

    def selection_score(
        self,
        occupied: torch.Tensor | None,
        compressed: torch.Tensor,
        confidence: torch.Tensor | None,
        request: torch.Tensor | None,
    ) -> torch.Tensor:
        """(H, W) score of a sender's cells for :meth:`BevCompressor.select` (own frame; 0: never sent).

        Args:
            occupied: (H, W) bool cells holding a voxel of the sender (``nonempty`` selection).
            compressed: (c, H, W) its compressed features.
            confidence: (H, W) its detection confidence (``confidence`` and ``request`` selection).
            request: (H, W) the ego's request warped into its frame, or None when none was heard.

        ``nonempty`` ranks the occupied cells by the norm of their compressed features.
        ``confidence`` and ``request`` rank *every* cell by the sender's confidence (times the
        request), as Where2comm and CORE do: the detection head reads one cell per anchor, and the
        cell of a vehicle's box centre usually holds no voxel (the LiDAR hits the near side of the
        vehicle), so gating them by occupancy would drop the very cells that carry the detection.
        ``occupied_confidence`` ranks the occupied cells by the highest confidence within
        ``vicinity_cells`` of them: the cells holding a vehicle's points, which lie a few cells
        from its box centre, for maps that are zero where the sender has no voxel
        (``before_bev_backbone``).
        """
        match self.config.fusion.compressor.selection:
            case "nonempty":
                return occupied.to(compressed.dtype) * compressed.detach().norm(dim=0)
            case "confidence":
                return confidence.to(compressed.dtype)
            case "occupied_confidence":
                r = self.config.fusion.compressor.vicinity_cells
                near = F.max_pool2d(confidence[None, None], 2 * r + 1, stride=1, padding=r)[0, 0]
                return occupied.to(compressed.dtype) * near.to(compressed.dtype)
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
                fused = self.encode_clouds(
                    share_points(batch, link, stats.records, on_senders=self._on_senders)
                )
            case "attfuse" | "core":
                all_agents = torch.arange(batch.num_agents, device=ego.device)
                coords = None
                before = self.config.fusion.before_bev_backbone
                if self.config.fusion.proj_first:
                    features, coords = self._encode_in_ego_frame(batch, all_agents, not before)
                else:
                    features = self.encode_agents(batch, all_agents, bev_backbone=not before)
                fused = self._fuse_intermediate(batch, features, link, stats.records, coords)
                if before:
                    fused = self.encoder.bev(fused)  # the 2D backbone on the fused sparse-backbone maps
            case _:
                raise ValueError(f"unknown fusion method {method!r}")

        fused = self.neck(fused)  # (B, C, H, W), the map every head reads
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
        self,
        batch: CoopBatch,
        ego_detections: list[Detections],
        link: V2XLink,
        records: list[list[MessageRecord]],
    ) -> list[Detections]:
        """Late fusion at decoding: the others detect on their own data, send, the ego merges."""
        others = torch.tensor(
            [a for a in range(batch.num_agents) if a not in set(batch.ego_agent_index.tolist())],
            dtype=torch.long,
        )
        own: dict[int, Detections] = {}
        if len(others):
            others_features = self.encode_agents(batch, others.to(batch.points.device))
            with self._on_senders():
                decoded = self.detection.decode(self.detection(self.neck(others_features)))
            own = dict(zip(others.tolist(), decoded, strict=True))
        T_measured = batch.T_ego_from_agent_measured.cpu().numpy()
        positions = batch.agent_position_m.cpu().numpy()
        codec = DetectionsCodec()
        out = []
        for s, (first, n) in enumerate(
            zip(batch.ego_agent_index.tolist(), batch.agents_per_sample.tolist(), strict=True)
        ):
            info = batch.info[s]
            with self._on_senders():
                outgoing = [
                    Outgoing(
                        info.agent_ids[k],
                        T_measured[first + k],
                        CodecId.DETECTIONS,
                        codec.encode(detection_set(own[first + k])),
                    )
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

    def segmentation_targets(
        self, batch: CoopBatch, clouds: list[torch.Tensor], semantic: list[torch.Tensor]
    ) -> torch.Tensor:
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
