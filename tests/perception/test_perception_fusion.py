"""Fusion methods on one encoder and one set of heads: a shape grid over methods x agents per
sample x batch size, one-agent equivalence with the single-agent path, and invariance to the
order of the other agents."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from perception_helpers import (
    build_model,
    fusion_config,
    permute_others,
    small_model_config,
    synthetic_sample,
)

from datasets.collate import CoopCollate
from models.comm import LinkConfig, V2XLink
from models.compressor import CompressorConfig
from models.fusion.attfuse import MaxFusion
from models.heads.detection import DetectionHeadConfig
from models.heads.reconstruction import ReconstructionConfig
from models.perception import FUSION_METHODS, CooperativePerception, FusionConfig
from sim.geometry import transform_points
from sim.types import Semantic
from v2x.message import HEADER_BYTES

LINK = V2XLink(LinkConfig())
PROJ_FIRST = ("attfuse_proj_first", "core_proj_first")
"""Intermediate fusion with the senders encoding in the ego frame (``fusion.proj_first``)."""
VARIANTS = (*FUSION_METHODS, *PROJ_FIRST)


def base_method(variant: str) -> str:
    return variant.removesuffix("_proj_first")


@pytest.fixture(scope="module")
def models() -> dict[str, CooperativePerception]:
    """One model per variant, all with the weights of the "none" model where they share modules."""
    out = {m: build_model(base_method(m), proj_first=m in PROJ_FIRST) for m in VARIANTS}
    shared = out["none"].state_dict()
    for model in out.values():
        model.load_state_dict(shared, strict=False)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("agents", [(1,), (2,), (5,), (3, 1), (4, 2)])
def test_shape_grid(models, variant, agents):
    model, method = models[variant], base_method(variant)
    samples = [synthetic_sample(10 * i + n, n) for i, n in enumerate(agents)]
    batch = CoopCollate(model.config.grid)(samples)
    with torch.no_grad():
        output, loss = model(batch, LINK, with_loss=True, with_detections=True)
    b = len(agents)
    h, w = model.bev_grid.shape
    k = h * w * model.config.detection.anchors_per_cell
    assert output.fused_features.shape == (b, model.encoder.out_channels, h, w)
    assert output.detection_maps.cls_logits.shape == (b, k)
    assert output.detection_maps.box_deltas.shape == (b, k, 7)
    assert output.segmentation_logits.shape == (b, 3, h, w)
    assert len(output.detections) == b
    for detections in output.detections:
        detections.validate()
    assert torch.isfinite(loss.total)
    # messages: one per other agent (CORE: plus the ego's request), every size a real encoding
    for n, records in zip(agents, output.link.records, strict=True):
        expected = 0 if method == "none" or n == 1 else (n - 1) + (1 if method == "core" else 0)
        assert len(records) == expected
        assert all(r.nbytes > HEADER_BYTES and r.received for r in records)


@pytest.mark.parametrize("method", ["early", "late", "attfuse", "core", *PROJ_FIRST])
def test_one_agent_equals_the_single_agent_path(models, method):
    """With the ego alone, every method reduces to the ego-only model with the same weights."""
    batch = CoopCollate(models["none"].config.grid)([synthetic_sample(3, 1), synthetic_sample(4, 1)])
    output, reference = assert_one_agent_equals_ego_only(models[method], models["none"], batch)
    torch.testing.assert_close(output.detection_maps.cls_logits, reference.detection_maps.cls_logits, rtol=1e-5, atol=1e-5)
    assert output.link.bytes_per_frame() == [0, 0]


def assert_one_agent_equals_ego_only(model: CooperativePerception, ego_only: CooperativePerception, batch):
    """``model`` and the ego-only ``ego_only`` give the same fused maps and boxes on ``batch``
    (samples of one agent); their two outputs."""
    with torch.no_grad():
        reference, _ = ego_only(batch, LINK, with_loss=False, with_detections=True)
        output, _ = model(batch, LINK, with_loss=False, with_detections=True)
    torch.testing.assert_close(output.fused_features, reference.fused_features, rtol=1e-5, atol=1e-5)
    for got, want in zip(output.detections, reference.detections, strict=True):
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-4)
    return output, reference


@pytest.mark.parametrize("method", ["early", "late", "attfuse", "core", *PROJ_FIRST])
def test_results_do_not_depend_on_the_order_of_the_other_agents(models, method):
    sample = synthetic_sample(7, 4)
    collate = CoopCollate(models[method].config.grid)
    model = models[method]
    with torch.no_grad():
        first, _ = model(collate([sample]), LINK, with_loss=False, with_detections=True)
        second, _ = model(collate([permute_others(sample, [3, 1, 2])]), LINK, with_loss=False, with_detections=True)
    torch.testing.assert_close(first.fused_features, second.fused_features, rtol=1e-4, atol=1e-4)
    a, b = first.detections[0], second.detections[0]
    assert len(a) > 0
    order_a, order_b = np.lexsort(a.boxes.T), np.lexsort(b.boxes.T)
    np.testing.assert_allclose(a.boxes[order_a], b.boxes[order_b], atol=1e-4)
    assert sorted(first.link.bytes_per_message()) == sorted(second.link.bytes_per_message())


def test_cooperation_changes_the_ego_view_and_gradients_reach_the_senders():
    """With two agents the fused map differs from the ego's own, and the loss trains the shared
    encoder through the received (decoded) messages."""
    model = build_model("attfuse").train()
    batch = CoopCollate(model.config.grid)([synthetic_sample(5, 2)])
    output, loss = model(batch, LINK)
    ego_only = model.encode_agents(batch, batch.ego_agent_index)
    assert not torch.allclose(output.fused_features, ego_only)
    loss.total.backward()
    assert model.compressor.encoder.weight.grad is not None and model.compressor.encoder.weight.grad.abs().sum() > 0


def test_lost_messages_fall_back_to_the_ego_view():
    """A channel that reaches no one (range 1 m on DSRC) delivers nothing: the fused map is the
    ego's own view and the records say the messages were lost."""
    model = build_model("attfuse")
    batch = CoopCollate(model.config.grid)([synthetic_sample(6, 3)])
    lossy = V2XLink(dataclasses.replace(LinkConfig(channel="dsrc"), tick_s=0.1))
    lossy.channel = dataclasses.replace(lossy.channel, max_range_m=1.0)
    with torch.no_grad():
        output, _ = model(batch, lossy, with_loss=False)
        ego_only = model.encode_agents(batch, batch.ego_agent_index)
    torch.testing.assert_close(output.fused_features, ego_only, rtol=1e-5, atol=1e-5)
    assert [r.received for r in output.link.records[0]] == [False, False]


def test_keypoint_messages_and_reconstruction_compose_with_fusion():
    torch.manual_seed(0)
    keypoints = small_model_config(fusion=FusionConfig(method="attfuse", message="keypoints"))
    model = CooperativePerception(keypoints).train()
    batch = CoopCollate(keypoints.grid)([synthetic_sample(8, 3)])
    output, loss = model(batch, LINK)
    assert [r.codec for r in output.link.records[0]] == ["KEYPOINT_FEATURES"] * 2
    loss.total.backward()
    assert model.keypoint_encoder.out.weight.grad.abs().sum() > 0

    torch.manual_seed(0)
    core = small_model_config(fusion=fusion_config("core"), reconstruction=ReconstructionConfig(targets="both", channels=4))
    model = CooperativePerception(core).train()
    output, loss = model(CoopCollate(core.grid)([synthetic_sample(9, 3)]), LINK)
    assert loss.reconstruction is not None and loss.reconstruction.occupancy > 0 and loss.reconstruction.bev > 0
    assert output.reconstruction.fine_logits.numel() > 0
    assert [r.codec for r in output.link.records[0]] == ["REQUEST_MAP", "SPARSE_BEV", "SPARSE_BEV"]


def test_inference_skips_reconstruction_unless_asked_and_detections_do_not_depend_on_it():
    torch.manual_seed(0)
    core = small_model_config(fusion=fusion_config("core"), reconstruction=ReconstructionConfig(targets="both", channels=4))
    model = CooperativePerception(core).eval()
    batch = CoopCollate(core.grid)([synthetic_sample(10, 3)])
    with torch.no_grad():
        plain, no_loss = model(batch, LINK, with_loss=False, with_detections=True)
        asked, _ = model(batch, LINK, with_loss=False, with_detections=True, with_reconstruction=True)
    assert no_loss is None
    assert plain.reconstruction is None
    assert asked.reconstruction is not None and asked.reconstruction.column_logits.numel() > 0
    torch.testing.assert_close(plain.fused_features, asked.fused_features)
    np.testing.assert_array_equal(plain.detections[0].boxes, asked.detections[0].boxes)


def test_max_fusion_takes_the_largest_value_of_the_agents_covering_each_cell():
    features = torch.tensor([[[[1.0, 5.0]]], [[[3.0, 9.0]]], [[[2.0, 7.0]]]])  # (A=3, C=1, H=1, W=2)
    valid = torch.tensor([[[[False, False]]], [[[True, False]]], [[[True, True]]]])  # the ego's row is ignored
    torch.testing.assert_close(MaxFusion()(features, valid), torch.tensor([[[3.0, 7.0]]]))
    # nothing received: the ego's own map, negative values included
    ego = torch.tensor([[[[-1.0, 0.5]]]])
    torch.testing.assert_close(MaxFusion()(ego, torch.zeros(1, 1, 1, 2, dtype=torch.bool)), ego[0])


def test_max_fusion_model_keeps_one_agent_equal_and_passes_a_senders_vehicle_at_full_strength(models):
    torch.manual_seed(0)
    config = small_model_config(
        fusion=fusion_config("attfuse", selection="confidence", combine="max"),
        detection=DetectionHeadConfig(score_threshold=0.0),
    )
    maxfuse = CooperativePerception(config).eval()
    maxfuse.load_state_dict(models["none"].state_dict(), strict=False)
    batch = CoopCollate(config.grid)([synthetic_sample(3, 1), synthetic_sample(4, 1)])
    assert_one_agent_equals_ego_only(maxfuse, models["none"], batch)
    # with others, the fused map is at least the ego's own everywhere and above it somewhere
    batch = CoopCollate(config.grid)([synthetic_sample(7, 3)])
    with torch.no_grad():
        output, _ = maxfuse(batch, LINK, with_loss=False)
        own = maxfuse.encode_agents(batch, batch.ego_agent_index)
    assert bool((output.fused_features >= own - 1e-6).all())
    assert bool((output.fused_features > own + 1e-4).any())


def test_inconsistent_fusion_settings_are_rejected():
    with pytest.raises(ValueError, match="attfuse only"):
        fusion_config("core", combine="max").validate()
    with pytest.raises(ValueError, match="combine"):
        fusion_config("attfuse", combine="mean").validate()
    with pytest.raises(ValueError, match="attfuse only"):
        FusionConfig(method="core", message="keypoints", compressor=CompressorConfig(selection="request")).validate()
    with pytest.raises(ValueError, match="selection=request"):
        FusionConfig(method="core").validate()
    with pytest.raises(ValueError, match="core method"):
        CooperativePerception(small_model_config(fusion=FusionConfig(method="attfuse", compressor=CompressorConfig(selection="request"))))
    for method, message in [("late", "bev"), ("early", "bev"), ("attfuse", "keypoints")]:
        with pytest.raises(ValueError, match="proj_first applies"):
            FusionConfig(method=method, message=message, proj_first=True).validate()


def test_proj_first_senders_move_their_points_with_the_measured_pose():
    """Each sender voxelises its own points moved into the ego frame by its *measured* pose (what
    the receiver would have warped with), the ego keeps its points, and the message header then
    carries the identity: the receiver has nothing left to warp."""
    sample = synthetic_sample(12, 3)
    noisy = sample.T_ego_from_agent_measured.copy()
    noisy[1:, 0, 3] += 0.7  # localisation error along x of both senders
    sample = dataclasses.replace(sample, T_ego_from_agent_measured=noisy)
    model = build_model("attfuse", proj_first=True)
    batch = CoopCollate(model.config.grid)([sample])
    clouds = model.clouds_in_ego_frame(batch, torch.arange(3))
    torch.testing.assert_close(clouds[0], torch.from_numpy(sample.points[0]))
    for a in (1, 2):
        want = transform_points(noisy[a], sample.points[a].astype(np.float64))
        np.testing.assert_allclose(clouds[a].numpy(), want, atol=1e-4)
    headers = []
    link = V2XLink(LinkConfig())
    exchange = link.exchange

    def spy(outgoing, *args, **kwargs):
        headers.extend(m.T_ref_from_sender for m in outgoing)
        return exchange(outgoing, *args, **kwargs)

    link.exchange = spy
    with torch.no_grad():
        model(batch, link, with_loss=False)
    assert len(headers) == 2
    for T in headers:
        np.testing.assert_array_equal(T, np.eye(4))


def test_proj_first_puts_a_vehicle_only_a_sender_sees_at_its_ego_frame_cell():
    """A vehicle the ego's cloud misses and a rotated, shifted sender sees: with proj_first the
    sender's map holds it at the vehicle's cell in the ego frame, and fusing changes the ego's map
    there (nonempty selection, enough cells for the whole sender map)."""
    sample = synthetic_sample(23, 2, num_boxes=1)  # the vehicle within 10 m of the sender
    box = sample.gt_boxes[0]
    # take the vehicle's points out of the ego's cloud (semantic CAR), keep them in the sender's
    ego_points = sample.points[0][sample.semantic[0] != int(Semantic.CAR)]
    sample = dataclasses.replace(
        sample,
        points=[ego_points, sample.points[1]],
        semantic=[sample.semantic[0][sample.semantic[0] != int(Semantic.CAR)], sample.semantic[1]],
    )
    assert (sample.semantic[1] == int(Semantic.CAR)).sum() > 20
    torch.manual_seed(0)
    compressor = CompressorConfig(channels=4, max_cells=4096, selection="nonempty")
    config = small_model_config(fusion=FusionConfig(method="attfuse", compressor=compressor, proj_first=True))
    model = CooperativePerception(config).eval()
    batch = CoopCollate(model.config.grid)([sample])
    with torch.no_grad():
        senders = model.encode_agents(batch, torch.tensor([1]), in_ego_frame=True)
        output, _ = model(batch, LINK, with_loss=False)
        ego_only = model.encode_agents(batch, batch.ego_agent_index)
    rows, cols, inside = model.bev_grid.cell_of(torch.tensor(box[None, :2], dtype=torch.float32))
    assert bool(inside[0])
    row, col = int(rows[0]), int(cols[0])
    assert senders[0, :, row, col].abs().sum() > 0
    changed = (output.fused_features[0] - ego_only[0]).abs().amax(dim=0) > 1e-6  # (H, W)
    assert changed[row, col]


@pytest.mark.parametrize("method, selection", [("attfuse", "confidence"), ("core", "request")])
def test_confident_cells_without_voxels_are_sent_and_fused(method, selection, monkeypatch):
    """A sender's detection sits at a vehicle's box centre, whose BEV cell usually holds none of its
    voxels (the LiDAR hits the near side of the vehicle). Confidence and request selection must send
    such a cell, and the ego must fuse it: with a confidence map that is zero except a 2 x 2 block of
    empty sender cells, that block is the whole message and changes the ego's fused map."""
    torch.manual_seed(0)
    compressor = CompressorConfig(channels=4, max_cells=64, selection=selection)
    model = CooperativePerception(small_model_config(fusion=FusionConfig(method=method, compressor=compressor))).eval()
    batch = CoopCollate(model.config.grid)([synthetic_sample(11, 2)])
    grid = model.bev_grid
    h, w = grid.shape
    occupied = model.occupied_cells(batch)[1]  # (H, W) the sender's own frame
    T_ego_from_sender = batch.T_ego_from_agent_measured[1].numpy()
    centres = grid.cell_centres().numpy()  # (H, W, 2)
    block = None
    for r in range(4, h - 5):
        for c in range(4, w - 5):
            if occupied[r : r + 2, c : c + 2].any():
                continue
            xy_ego = T_ego_from_sender[:2, :2] @ centres[r, c] + T_ego_from_sender[:2, 3]
            if np.all(np.abs(xy_ego) < 12.0) and np.linalg.norm(xy_ego - centres[r, c]) > 3.0:
                block = (r, c)
                break
        if block is not None:
            break
    assert block is not None
    r, c = block

    def confidence(features: torch.Tensor) -> torch.Tensor:
        out = features.new_zeros(features.shape[0], h, w)
        out[:, r : r + 2, c : c + 2] = 0.9  # the same cells in every agent's own frame
        return out

    monkeypatch.setattr(model.detection, "confidence", confidence)
    masks = []
    select = model.compressor.select
    monkeypatch.setattr(model.compressor, "select", lambda score: masks.append(select(score)) or masks[-1])
    with torch.no_grad():
        output, _ = model(batch, LINK, with_loss=False)
        ego_only = model.encode_agents(batch, batch.ego_agent_index)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[r : r + 2, c : c + 2] = True
    assert len(masks) == 1 and torch.equal(masks[0], expected)
    changed = (output.fused_features[0] - ego_only[0]).abs().amax(dim=0) > 1e-6  # (H, W)
    assert changed.any()


POST = {
    "none": fusion_config("none", post_layers=2),
    "late": fusion_config("late", post_layers=2),
    "early": fusion_config("early", post_layers=2),
    "attfuse": fusion_config("attfuse", post_layers=2),
    "attfuse_proj_first": fusion_config("attfuse", selection="confidence", proj_first=True, post_layers=2),
}
"""Every method that takes a post-fusion neck (``fusion.post_layers``), two layers each."""


@pytest.fixture(scope="module")
def post_models() -> dict[str, CooperativePerception]:
    """One model per entry of POST, all with the weights of the "none" one where they share modules."""
    out = {}
    for name, fusion in POST.items():
        torch.manual_seed(0)
        config = small_model_config(fusion=fusion, detection=DetectionHeadConfig(score_threshold=0.0))
        out[name] = CooperativePerception(config).eval()
    shared = out["none"].state_dict()
    for model in out.values():
        model.load_state_dict(shared, strict=False)
    return out


@pytest.mark.parametrize("name", list(POST))
@pytest.mark.parametrize("agents", [(1,), (3, 1)])
def test_post_fusion_neck_runs_every_head_on_the_neck_output(post_models, name, agents):
    model = post_models[name]
    batch = CoopCollate(model.config.grid)([synthetic_sample(30 + n, n) for n in agents])
    with torch.no_grad():
        output, loss = model(batch, LINK, with_loss=True, with_detections=True)
    h, w = model.bev_grid.shape
    assert output.fused_features.shape == (len(agents), model.encoder.out_channels, h, w)
    assert torch.isfinite(loss.total)
    for detections in output.detections:
        detections.validate()
    # the heads read the neck's output: the detection logits are the head on fused_features
    with torch.no_grad():
        again = model.detection(output.fused_features)
    torch.testing.assert_close(again.cls_logits, output.detection_maps.cls_logits)
    if name == "none":
        with torch.no_grad():
            ego_only = model.neck(model.encode_agents(batch, batch.ego_agent_index))
        torch.testing.assert_close(output.fused_features, ego_only)


@pytest.mark.parametrize("name", ["late", "early", "attfuse", "attfuse_proj_first"])
def test_post_fusion_neck_keeps_one_agent_equal_to_the_single_agent_path(post_models, name):
    batch = CoopCollate(post_models["none"].config.grid)([synthetic_sample(3, 1), synthetic_sample(4, 1)])
    assert_one_agent_equals_ego_only(post_models[name], post_models["none"], batch)


def test_post_fusion_neck_is_trained_and_rejected_where_it_does_not_apply():
    model = CooperativePerception(small_model_config(fusion=POST["attfuse"])).train()
    batch = CoopCollate(model.config.grid)([synthetic_sample(5, 2)])
    _, loss = model(batch, LINK)
    loss.total.backward()
    conv = model.neck.layers[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not apply to core"):
        fusion_config("core", post_layers=1).validate()
    with pytest.raises(ValueError, match=">= 0"):
        fusion_config("attfuse", post_layers=-1).validate()


BEFORE_2D = fusion_config("attfuse", selection="occupied_confidence", proj_first=True, before_bev_backbone=True)
"""attfuse fused before the 2D backbone (``fusion.before_bev_backbone``)."""


@pytest.fixture(scope="module")
def before_2d_models(models) -> dict[str, CooperativePerception]:
    """attention and max combinations fused before the 2D backbone, with the "none" model's weights."""
    out = {}
    for combine in ("attention", "max"):
        torch.manual_seed(0)
        fusion = dataclasses.replace(BEFORE_2D, combine=combine)
        config = small_model_config(fusion=fusion, detection=DetectionHeadConfig(score_threshold=0.0))
        out[combine] = CooperativePerception(config).eval()
        out[combine].load_state_dict(models["none"].state_dict(), strict=False)
    return out


@pytest.mark.parametrize("combine", ["attention", "max"])
def test_fusion_before_the_2d_backbone_keeps_one_agent_equal_and_does_not_depend_on_order(
    models, before_2d_models, combine
):
    model = before_2d_models[combine]
    # the compressor reduces the sparse backbone's channels, not the 2D backbone's
    assert model.compressor.encoder.in_channels == model.encoder.sparse.bev_channels
    batch = CoopCollate(model.config.grid)([synthetic_sample(3, 1), synthetic_sample(4, 1)])
    assert_one_agent_equals_ego_only(model, models["none"], batch)
    sample = synthetic_sample(7, 4)
    collate = CoopCollate(model.config.grid)
    with torch.no_grad():
        first, _ = model(collate([sample]), LINK, with_loss=False, with_detections=True)
        second, _ = model(collate([permute_others(sample, [3, 1, 2])]), LINK, with_loss=False, with_detections=True)
        own = model.encode_agents(collate([sample]), torch.tensor([0]))
    h, w = model.bev_grid.shape
    assert first.fused_features.shape == (1, model.encoder.out_channels, h, w)
    torch.testing.assert_close(first.fused_features, second.fused_features, rtol=1e-4, atol=1e-4)
    assert len(first.link.records[0]) == 3
    # the senders' cells went through the 2D backbone with the ego's: the map is not the ego's own
    assert bool(((first.fused_features - own).abs() > 1e-4).any())


def test_fusion_before_the_2d_backbone_trains_the_compressor_and_both_backbones_through_the_messages():
    torch.manual_seed(0)
    model = CooperativePerception(small_model_config(fusion=BEFORE_2D)).train()
    batch = CoopCollate(model.config.grid)([synthetic_sample(5, 2)])
    _, loss = model(batch, LINK)
    loss.total.backward()
    for name, parameter in [
        ("compressor", model.compressor.encoder.weight),
        ("decompressor", model.compressor.decoder[0].weight),
        ("2D backbone", next(model.encoder.bev.parameters())),
        ("sparse backbone", model.encoder.sparse.input_conv[0].weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_occupied_confidence_sends_the_occupied_cells_nearest_to_confident_ones():
    """Scores are the highest confidence within ``vicinity_cells`` (3) of an occupied cell, zero
    elsewhere; the budget keeps the best."""
    compressor = CompressorConfig(channels=4, max_cells=2, selection="occupied_confidence", vicinity_cells=3)
    fusion = dataclasses.replace(BEFORE_2D, compressor=compressor)
    model = CooperativePerception(small_model_config(fusion=fusion)).eval()
    h, w = model.bev_grid.shape
    occupied = torch.zeros(h, w, dtype=torch.bool)
    for r, c in [(5, 5), (5, 9), (5, 14), (20, 20)]:
        occupied[r, c] = True
    confidence = torch.full((h, w), 0.01)
    confidence[5, 7] = 0.8  # a box centre without a voxel, 2 cells from (5, 5) and (5, 9)
    confidence[20, 21] = 0.3
    score = model.selection_score(occupied, torch.ones(4, h, w), confidence, None)
    expected = torch.zeros(h, w)
    expected[5, 5] = expected[5, 9] = 0.8
    expected[5, 14] = 0.01  # 7 cells from the peak: only its own vicinity's background
    expected[20, 20] = 0.3
    torch.testing.assert_close(score, expected)
    mask = model.compressor.select(score)
    assert mask.sum() == 2 and mask[5, 5] and mask[5, 9]


def test_fusion_before_the_2d_backbone_and_its_selection_are_rejected_where_they_do_not_apply():
    for method, message in [("core", "bev"), ("early", "bev"), ("none", "bev"), ("attfuse", "keypoints")]:
        with pytest.raises(ValueError, match="before_bev_backbone"):
            FusionConfig(
                method=method,
                message=message,
                compressor=CompressorConfig(selection="request" if method == "core" else "confidence"),
                before_bev_backbone=True,
            ).validate()
    with pytest.raises(ValueError, match="selection"):
        CompressorConfig(selection="everything")
    with pytest.raises(ValueError, match="vicinity_cells"):
        CompressorConfig(vicinity_cells=-1)


@pytest.mark.parametrize("before_2d", [False, True])
def test_apply_to_ego_fuses_the_egos_own_map_after_a_compressor_round_trip(before_2d):
    """With ``compressor.apply_to_ego`` an ego alone gets its own map compressed and restored (the
    same features a sender's cells arrive as), before the 2D backbone when fusing there; the
    gradient reaches the compressor from the ego's own boxes."""
    torch.manual_seed(0)
    compressor = CompressorConfig(channels=4, max_cells=64, selection="occupied_confidence", apply_to_ego=True)
    fusion = dataclasses.replace(BEFORE_2D, compressor=compressor, before_bev_backbone=before_2d)
    model = CooperativePerception(small_model_config(fusion=fusion)).eval()
    batch = CoopCollate(model.config.grid)([synthetic_sample(3, 1)])
    with torch.no_grad():
        output, _ = model(batch, LINK, with_loss=False)
        own = model.encode_agents(batch, batch.ego_agent_index, bev_backbone=not before_2d)
        want = model.compressor.round_trip(own)
        if before_2d:
            want = model.encoder.bev(want)
        plain = own if not before_2d else model.encoder.bev(own)
    torch.testing.assert_close(output.fused_features, want)
    assert not torch.allclose(output.fused_features, plain)
    model.train()
    _, loss = model(batch, LINK)
    loss.total.backward()
    assert model.compressor.encoder.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="apply_to_ego"):
        FusionConfig(method="early", compressor=compressor).validate()
