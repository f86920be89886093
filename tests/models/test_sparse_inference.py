"""Inference-only rewrites of the encoder against the plain modules in eval mode: the sparse 3D
backbone folded and run in plain torch (``models/sparse_inference.py``), the 2D backbone with batch
norm folded in channels-last, and the encoder that combines them.

Batch-norm statistics and affine parameters are randomised first (fresh layers have mean 0 and
variance 1, which would hide a folding mistake). Tolerances are float32 rounding of sums that run
in another order.
"""

from __future__ import annotations

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
from torch import nn

from datasets.voxelize import VoxelGrid, Voxelizer
from models.bev_backbone import BevBackbone2d, BevBackboneConfig
from models.encoder import EncoderConfig, PointCloudEncoder
from models.sparse_backbone import SparseBackbone3d, SparseBackboneConfig
from models.sparse_inference import FoldedSparseConv, SparseBackbone3dInference, spconv_rulebook

GRID = VoxelGrid((-16.0, -16.0, -3.0, 16.0, 16.0, 2.0), (0.4, 0.4, 0.25))
CONFIGS = [
    SparseBackboneConfig(channels=(8, 16, 16), out_channels=16),
    SparseBackboneConfig(
        channels=(8, 8, 16, 16), strides_zyx=((1, 1, 1), (2, 2, 2), (1, 2, 2), (2, 1, 1)), blocks=2
    ),
    SparseBackboneConfig(channels=(8,), strides_zyx=((1, 1, 1),), out_kernel_z=5, out_stride_z=5),
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread, as inference is measured, and fast on a small busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every batch norm; returns the module in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2.0 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return module.eval()


def clouds_voxels(seeds: list[int], n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, 4) features and (V, 4) int32 ``[cloud, z, y, x]`` of random clouds, one per seed."""
    features, coords = [], []
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        cloud = np.concatenate(
            [rng.uniform(-16, 16, (n, 2)), rng.uniform(-3, 2, (n, 1)), rng.uniform(0, 1, (n, 1))], axis=1
        ).astype(np.float32)
        voxels = Voxelizer(GRID)(cloud)
        features.append(voxels.features)
        coords.append(
            torch.cat([torch.full((len(voxels), 1), i, dtype=torch.int32), voxels.coords_zyx], dim=1)
        )
    return torch.cat(features), torch.cat(coords)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_sparse_backbone_matches_spconv(config, channels_last):
    torch.manual_seed(0)
    backbone = randomise_norms(SparseBackbone3d(config, GRID))
    fast = backbone.fuse_for_inference()
    fast.channels_last = channels_last
    features, coords = clouds_voxels([1, 2, 3])
    # clouds 3 and 4 have no voxels: zero maps in both
    with torch.no_grad():
        want = backbone(features, coords, 5)
        got = fast(features, coords, 5)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(got != 0, want != 0)  # the same active cells (ReLU zeros aside, equal sets)
    assert not got[3:].any()


def test_each_folded_layer_matches_spconv_layer_batch_norm_and_relu():
    torch.manual_seed(1)
    backbone = randomise_norms(SparseBackbone3d(CONFIGS[0], GRID), seed=3)
    features, coords = clouds_voxels([4, 5])
    x = spconv.SparseConvTensor(features, coords, list(GRID.spatial_shape_zyx), 2)
    shape = tuple(GRID.spatial_shape_zyx)
    sequences = [backbone.input_conv, *backbone.stages, backbone.out_conv]
    with torch.no_grad():
        for sequence in sequences:
            modules = list(sequence)
            for conv, norm, act in zip(modules[0::3], modules[1::3], modules[2::3], strict=True):
                folded = FoldedSparseConv(conv, norm)
                rulebook, out_shape = spconv_rulebook(x.indices, shape, 2, folded)
                got = folded(x.features, rulebook)
                y = spconv.SparseSequential(conv, norm, act)(x)
                assert torch.equal(rulebook.out_coords.long(), y.indices.long())  # spconv's own rulebook
                assert tuple(y.spatial_shape) == out_shape
                torch.testing.assert_close(got, y.features, rtol=1e-4, atol=1e-5)
                x, shape = y, out_shape


def test_folded_sparse_backbone_handles_empty_input_and_refuses_training():
    backbone = SparseBackbone3d(CONFIGS[0], GRID).eval()
    fast = backbone.fuse_for_inference()
    assert isinstance(fast, SparseBackbone3dInference)
    out = fast(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), 2)
    assert out.shape == (2, backbone.bev_channels, *backbone.bev_shape) and not out.any()
    with pytest.raises(RuntimeError):
        fast.train()
    backbone.train()  # the original is untouched and still trains
    assert backbone.training


def test_folded_bev_backbone_matches_plain_and_keeps_the_original():
    torch.manual_seed(2)
    config = BevBackboneConfig(
        layer_nums=(1, 2), layer_strides=(1, 2), num_filters=(16, 24), num_upsample_filters=(8, 8)
    )
    plain = randomise_norms(BevBackbone2d(config, 12), seed=5)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fused = plain.fuse_for_inference()
    x = torch.relu(torch.randn(3, 12, 40, 40))
    with torch.no_grad():
        want = plain(x)
        got = fused(x)
        got_cl = fused(x.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_cl, want, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ConvTranspose2d)) for m in fused.ups[0].modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    after = plain.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError):
        fused.train()
    plain.train()
    assert plain.training


def test_folded_encoder_matches_plain():
    torch.manual_seed(3)
    config = EncoderConfig(
        SparseBackboneConfig(channels=(8, 16, 16), out_channels=16),
        BevBackboneConfig(layer_nums=(0, 1), num_filters=(16, 16), num_upsample_filters=(16, 16)),
    )
    plain = randomise_norms(PointCloudEncoder(config, GRID), seed=7)
    fused = plain.fuse_for_inference()
    assert fused.sparse.channels_last and fused.bev.memory_format == torch.channels_last
    features, coords = clouds_voxels([6, 7, 8])
    with torch.no_grad():
        want = plain(features, coords, 3)
        got = fused(features, coords, 3)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
