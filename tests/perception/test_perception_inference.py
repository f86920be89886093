"""``CooperativePerception.fuse_for_inference`` against the plain model, rewrite by rewrite.

- The fusion's inference path (fuse only at the ego cells a received map covers, from the decoded
  messages alone) on the plain encoder: the same maps, detections and bytes as the dense path.
- The whole inference copy (encoder folded as well): equal up to float32 rounding. The messages
  carry float16 values, so a last-bit difference of the encoder can move a value to the next
  float16 and a message by a byte; the maps stay within that rounding.
- The sender clock: timing changes nothing, and it sees the senders' work only where there is some.

Batch norms get random statistics first, so that folding mistakes cannot hide behind identity
normalisation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from perception_helpers import build_model, fusion_config, small_model_config, synthetic_sample
from torch import nn

from datasets.collate import CoopCollate
from models.comm import LinkConfig, V2XLink
from models.compressor import CompressorConfig
from models.heads.detection import DetectionHeadConfig
from models.perception import CooperativePerception, PerceptionOutput, SenderClock

LINK = V2XLink(LinkConfig())
METHODS = [
    "none", "early", "late", "attfuse", "attfuse_keypoints", "attfuse_confidence", "core",
    "attfuse_proj_first", "core_proj_first", "late_post", "attfuse_post", "attfuse_max", "attfuse_before_2d",
    "core_ego_compressed",
]


def make_model(method: str) -> CooperativePerception:
    """The small test model of ``method``; ``attfuse_keypoints``: keypoint messages,
    ``attfuse_confidence``: BEV cells selected by the sender's confidence, ``*_proj_first``: the
    senders encode in the ego frame, ``*_post``: a two-layer post-fusion neck (``attfuse_post``:
    with proj_first and cells selected by confidence through the neck), ``attfuse_max``: F-Cooper's
    element-wise maximum instead of attention, ``attfuse_before_2d``: fused before the 2D backbone
    (proj_first, occupied cells near confident ones), ``core_ego_compressed``: the ego's own map
    through the compressor and back too (``compressor.apply_to_ego``)."""
    variants = {
        "attfuse_keypoints": fusion_config("attfuse", message="keypoints"),
        "attfuse_confidence": fusion_config("attfuse", selection="confidence"),
        "attfuse_proj_first": fusion_config("attfuse", proj_first=True),
        "core_proj_first": fusion_config("core", proj_first=True),
        "late_post": fusion_config("late", post_layers=2),
        "attfuse_post": fusion_config("attfuse", selection="confidence", proj_first=True, post_layers=2),
        "attfuse_max": fusion_config("attfuse", selection="confidence", combine="max"),
        "attfuse_before_2d": fusion_config(
            "attfuse", selection="occupied_confidence", proj_first=True, before_bev_backbone=True
        ),
        "core_ego_compressed": dataclasses.replace(
            fusion_config("core"),
            compressor=CompressorConfig(channels=4, max_cells=64, selection="request", apply_to_ego=True),
        ),
    }
    if method in variants:
        torch.manual_seed(0)
        detection = DetectionHeadConfig(score_threshold=0.0)
        model = CooperativePerception(small_model_config(fusion=variants[method], detection=detection))
    else:
        model = build_model(method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(1.0 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    """Three samples of five, one and three agents (the others within 10 m: their maps overlap the
    ego's; the ego alone receives nothing)."""
    samples = [synthetic_sample(21, 5), synthetic_sample(23, 1), synthetic_sample(22, 3)]
    return CoopCollate(build_model("none").config.grid)(samples)


def run(model: CooperativePerception, batch) -> PerceptionOutput:
    with torch.inference_mode():
        output, _ = model(batch, LINK, with_loss=False, with_detections=True)
    return output


def assert_outputs_close(got: PerceptionOutput, want: PerceptionOutput, tol: float) -> None:
    scale = float(want.fused_features.abs().max())
    torch.testing.assert_close(got.fused_features, want.fused_features, rtol=tol, atol=tol * scale)
    for name in ("cls_logits", "box_deltas", "dir_logits"):
        a, b = getattr(got.detection_maps, name), getattr(want.detection_maps, name)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    torch.testing.assert_close(got.segmentation_logits, want.segmentation_logits, rtol=tol, atol=tol * scale)
    for a, b in zip(got.detections, want.detections, strict=True):
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


@pytest.mark.parametrize(
    "method",
    [
        "attfuse", "attfuse_keypoints", "attfuse_confidence", "core", "attfuse_proj_first", "core_proj_first",
        "attfuse_post", "attfuse_max", "attfuse_before_2d", "core_ego_compressed",
    ],
)
def test_fusion_inference_path_equals_the_dense_path(batch, method):
    plain = make_model(method)
    want = run(plain, batch)
    plain.inference_only = True  # the fusion's inference path on the same (unfolded) encoder
    try:
        got = run(plain, batch)
    finally:
        plain.inference_only = False
    assert_outputs_close(got, want, 1e-5)
    assert got.link.bytes_per_message() == want.link.bytes_per_message()


def test_fusion_inference_path_fuses_received_cells(batch):
    """The cells-only path really fuses: with the others' messages, the map is not the ego's own."""
    model = make_model("core")
    model.inference_only = True
    fused = run(model, batch).fused_features
    with torch.inference_mode():
        own = model.encode_agents(batch, batch.ego_agent_index)
    changed = (fused - own).abs().amax(dim=1) > 1e-6  # (B, H, W)
    assert changed[0].any() and changed[2].any()
    assert not changed[1].any()  # the ego alone keeps its own features
    assert not changed.all()  # and only where a received map covers the ego's grid


@pytest.mark.parametrize("method", METHODS)
def test_fuse_for_inference_matches_the_plain_model(batch, method):
    plain = make_model(method)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fused = plain.fuse_for_inference()
    want = run(plain, batch)
    got = run(fused, batch)
    assert_outputs_close(got, want, 1e-3)
    sizes_got, sizes_want = got.link.bytes_per_message(), want.link.bytes_per_message()
    assert len(sizes_got) == len(sizes_want)
    assert all(abs(a - b) <= 8 for a, b in zip(sizes_got, sizes_want, strict=True))
    # the plain model is untouched, still loads its own checkpoint and still trains
    after = plain.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    plain.load_state_dict(before)
    plain.train()
    assert plain.training
    with pytest.raises(RuntimeError):
        fused.train()


@pytest.mark.parametrize("method", METHODS)
def test_sender_clock_changes_nothing_and_counts_only_senders(batch, method):
    model = make_model(method).fuse_for_inference()
    want = run(model, batch)
    model.sender_clock = SenderClock()
    got = run(model, batch)
    assert torch.equal(got.fused_features, want.fused_features)
    assert got.link.bytes_per_message() == want.link.bytes_per_message()
    if method == "none":
        assert model.sender_clock.seconds == 0.0
    else:
        assert model.sender_clock.seconds > 0.0
