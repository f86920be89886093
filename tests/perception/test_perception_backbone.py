"""Sparse 3D backbone (documented per-stage shapes), 2D backbone and the shared encoder."""

from __future__ import annotations

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch

from datasets.voxelize import VoxelGrid, Voxelizer
from models.bev_backbone import BevBackbone2d, BevBackboneConfig, PostFusionNeck
from models.encoder import EncoderConfig, PointCloudEncoder
from models.sparse_backbone import SparseBackbone3d, SparseBackboneConfig, conv_output_size

GRID = VoxelGrid((-16.0, -16.0, -3.0, 16.0, 16.0, 2.0), (0.4, 0.4, 0.25))


def random_cloud(seed: int, n: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-16, 16, (n, 2)), rng.uniform(-3, 2, (n, 1)), rng.uniform(0, 1, (n, 1))], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    "config",
    [
        SparseBackboneConfig(),
        SparseBackboneConfig(channels=(8, 8, 16, 16), strides_zyx=((1, 1, 1), (2, 2, 2), (1, 2, 2), (2, 1, 1)), blocks=2),
        SparseBackboneConfig(channels=(8,), strides_zyx=((1, 1, 1),), out_kernel_z=5, out_stride_z=5),
    ],
)
def test_stage_shapes_match_spconv(config):
    torch.manual_seed(0)
    backbone = SparseBackbone3d(config, GRID).eval()
    voxels = Voxelizer(GRID)(random_cloud(0))
    coords = torch.cat([torch.zeros(len(voxels), 1, dtype=torch.int32), voxels.coords_zyx], dim=1)
    x = spconv.SparseConvTensor(voxels.features, coords, list(GRID.spatial_shape_zyx), 1)
    expected = backbone.shapes
    with torch.no_grad():
        x = backbone.input_conv(x)
        for stage, shape in zip(backbone.stages, expected[:-1], strict=True):
            x = stage(x)
            assert tuple(x.spatial_shape) == shape
        x = backbone.out_conv(x)
        assert tuple(x.spatial_shape) == expected[-1]
        bev = backbone(voxels.features, coords, 1)
    d, h, w = expected[-1]
    assert bev.shape == (1, config.out_channels * d, h, w) == (1, backbone.bev_channels, *backbone.bev_shape)
    assert h * config.bev_stride == GRID.spatial_shape_zyx[1]


def test_conv_output_size_formula():
    assert conv_output_size(20, 3, 2, 1) == 10
    assert conv_output_size(41, 3, 2, 1) == 21  # OpenPCDet's [41, 1600, 1408] -> [21, 800, 704]
    assert conv_output_size(5, 3, 2, 0) == 2


def test_clouds_without_voxels_give_zero_maps_and_batching_is_per_cloud():
    torch.manual_seed(0)
    backbone = SparseBackbone3d(SparseBackboneConfig(), GRID).eval()
    voxels = Voxelizer(GRID)(random_cloud(1))
    one = torch.cat([torch.zeros(len(voxels), 1, dtype=torch.int32), voxels.coords_zyx], dim=1)
    as_second = one.clone()
    as_second[:, 0] = 1
    with torch.no_grad():
        alone = backbone(voxels.features, one, 1)
        batched = backbone(voxels.features, as_second, 3)  # clouds 0 and 2 are empty
        empty = backbone(voxels.features[:0], one[:0], 2)
    assert torch.equal(batched[0], torch.zeros_like(batched[0])) and torch.equal(batched[2], torch.zeros_like(batched[2]))
    torch.testing.assert_close(batched[1], alone[0])
    assert empty.shape == (2, backbone.bev_channels, *backbone.bev_shape) and not empty.any()


def test_bev_backbone_returns_to_the_input_grid():
    config = BevBackboneConfig(layer_nums=(1, 1, 1), layer_strides=(1, 2, 2), num_filters=(8, 16, 16), upsample_strides=(1, 2, 4), num_upsample_filters=(8, 8, 8))
    net = BevBackbone2d(config, 12)
    out = net(torch.randn(2, 12, 40, 40))
    assert out.shape == (2, 24, 40, 40)
    with pytest.raises(ValueError, match="multiple"):
        net(torch.randn(1, 12, 42, 42))
    with pytest.raises(ValueError, match="return to the input grid"):
        BevBackboneConfig(layer_strides=(1, 2), upsample_strides=(1, 1))


def test_encoder_features_live_on_its_bev_grid():
    encoder = PointCloudEncoder(EncoderConfig(), GRID)
    assert encoder.bev_grid.shape == (40, 40) and encoder.bev_grid.cell_x == pytest.approx(0.8)
    voxels = Voxelizer(GRID)(random_cloud(2))
    coords = torch.cat([torch.zeros(len(voxels), 1, dtype=torch.int32), voxels.coords_zyx], dim=1)
    features = encoder(voxels.features, coords, 1)
    assert features.shape == (1, encoder.out_channels, 40, 40)
    features.sum().backward()  # spconv's CPU backward works (models.spconv_cpu)
    assert encoder.sparse.input_conv[0].weight.grad is not None


def test_invalid_sparse_configs_are_rejected():
    with pytest.raises(ValueError, match="stage 0"):
        SparseBackboneConfig(strides_zyx=((2, 2, 2), (2, 2, 2), (2, 1, 1)))
    with pytest.raises(ValueError, match="square"):
        SparseBackboneConfig(strides_zyx=((1, 1, 1), (2, 2, 1), (2, 1, 1)))
    thin = VoxelGrid((-16.0, -16.0, -1.0, 16.0, 16.0, 0.0), (0.4, 0.4, 0.5))
    with pytest.raises(ValueError, match="too thin"):
        SparseBackbone3d(SparseBackboneConfig(), thin)


def test_post_fusion_neck_is_an_identity_without_layers_and_folds_with_layers():
    x = torch.randn(2, 12, 20, 20)
    assert PostFusionNeck(12, 0)(x) is x
    neck = PostFusionNeck(12, 2)
    assert len([m for m in neck.modules() if isinstance(m, torch.nn.Conv2d)]) == 2
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # batch norms with statistics of their own, so folding has work to do
        for m in neck.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(12, generator=g))
                m.running_var.copy_(torch.rand(12, generator=g) + 0.5)
                m.weight.copy_(1.0 + 0.3 * torch.randn(12, generator=g))
                m.bias.copy_(0.2 * torch.randn(12, generator=g))
    neck.eval()
    folded = neck.fuse_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        want = neck(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4)
    assert want.shape == x.shape and not torch.allclose(want, x)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        folded.train()
    with pytest.raises(ValueError, match=">= 0"):
        PostFusionNeck(12, -1)
