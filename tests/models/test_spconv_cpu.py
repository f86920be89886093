"""spconv on CPU (and on CUDA where a GPU is present), forward and backward, against dense
torch.nn.Conv3d with the same weights.

Coordinates are spconv's ``coords_bzyx``: (num_voxels, 4) int32 ``[batch, z, y, x]``; the dense
equivalent is a (batch, channels, z, y, x) tensor. A submanifold convolution is the dense
convolution sampled at the active input sites only (inactive inputs are zeros), and a strided
sparse convolution is the dense convolution of that masked grid (no bias, so sites with no active
input are zero in both).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.spconv_cpu import SpconvCpuFixes, cpu_fixes_applied, enable_cpu_backward

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
TOL = 1e-4
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and the spconv-cu* wheel")


@pytest.fixture(scope="module", autouse=True)
def _cpu_backward() -> None:
    enable_cpu_backward()


def spconv_weight_from_torch(weight_oikkk: torch.Tensor) -> torch.Tensor:
    """Torch's (out, in, kz, ky, kx) Conv3d weight in spconv 2.3's "KRSC" layout (out, kz, ky, kx, in)."""
    return weight_oikkk.permute(0, 2, 3, 4, 1).contiguous()


def torch_grad_from_spconv(grad_okkki: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`spconv_weight_from_torch` (for a weight gradient)."""
    return grad_okkki.permute(0, 4, 1, 2, 3)


def assert_krsc(layer: torch.nn.Module, c_out: int, c_in: int) -> None:
    """The installed spconv keeps weights as (out, kz, ky, kx, in); fail loudly if that changes."""
    assert tuple(layer.weight.shape) == (c_out, 3, 3, 3, c_in), (
        f"unexpected spconv weight layout {tuple(layer.weight.shape)}; expected (out, k, k, k, in)"
    )


def random_voxels(
    rng: np.random.Generator, batch_size: int, spatial_shape: tuple[int, int, int], per_sample: int
) -> np.ndarray:
    """(num_voxels, 4) int32 unique ``[batch, z, y, x]`` coordinates, ``per_sample`` per sample."""
    cells = int(np.prod(spatial_shape))
    rows = []
    for b in range(batch_size):
        flat = rng.choice(cells, size=per_sample, replace=False)
        zyx = np.stack(np.unravel_index(flat, spatial_shape), axis=1)
        rows.append(np.concatenate([np.full((per_sample, 1), b), zyx], axis=1))
    return np.concatenate(rows).astype(np.int32)


def random_weight(rng: np.random.Generator, c_out: int, c_in: int) -> torch.Tensor:
    """(c_out, c_in, 3, 3, 3) float32 Conv3d weight, torch layout."""
    return torch.from_numpy((rng.normal(size=(c_out, c_in, 3, 3, 3)) * 0.2).astype(np.float32))


def scatter_dense(
    features: torch.Tensor, coords_bzyx: torch.Tensor, batch_size: int, spatial_shape: tuple[int, int, int]
) -> torch.Tensor:
    """(N, C) features at (N, 4) coords -> (B, C, D, H, W) dense grid, differentiable in features."""
    dense = features.new_zeros((batch_size, *spatial_shape, features.shape[1]))
    b, z, y, x = coords_bzyx.long().unbind(1)
    dense = dense.index_put((b, z, y, x), features)
    return dense.permute(0, 4, 1, 2, 3)


def gather_dense(dense: torch.Tensor, coords_bzyx: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) grid sampled at (N, 4) coords -> (N, C)."""
    b, z, y, x = coords_bzyx.long().unbind(1)
    return dense.permute(0, 2, 3, 4, 1)[b, z, y, x]


def test_enable_cpu_backward_is_idempotent() -> None:
    import spconv.pytorch.ops as ops
    from spconv.core_cc.csrc.sparse.all import SpconvOps

    first = enable_cpu_backward()
    assert isinstance(first, SpconvCpuFixes)
    stream_fn, scatter_fn = ops.get_current_stream, SpconvOps.scatter_add_cpu
    for _ in range(3):
        assert enable_cpu_backward() == first
    assert ops.get_current_stream is stream_fn  # no wrapper of a wrapper
    assert SpconvOps.scatter_add_cpu is scatter_fn
    assert cpu_fixes_applied() == first
    assert first.native_on_cpu
    assert first.serial_scatter_add
    if not torch.cuda.is_available():
        assert first.stream_zero_without_cuda
        assert ops.get_current_stream() == 0
        # and the function it replaced is the one that fails without CUDA
        with pytest.raises((AssertionError, RuntimeError)):
            stream_fn.__wrapped__()


def test_cpu_inputs_run_native_whatever_the_layers_algorithm() -> None:
    """The CUDA wheels default layers to implicit GEMM, which has no CPU kernel; on CPU inputs the
    fix runs them natively with the same weights (and leaves the layer's setting as it was). Here
    the CUDA default is set by hand, since the CPU-only build refuses it at construction."""
    import spconv.pytorch as spconv
    from spconv.core import ConvAlgo
    from spconv.pytorch.conv import SparseConvolution

    assert enable_cpu_backward().native_on_cpu and cpu_fixes_applied().native_on_cpu
    rng = np.random.default_rng(5)
    coords = torch.from_numpy(random_voxels(rng, 1, (8, 12, 10), 90))
    feats = torch.from_numpy(rng.normal(size=(90, 3)).astype(np.float32))
    torch.manual_seed(0)
    net = spconv.SparseSequential(
        spconv.SubMConv3d(3, 8, 3, padding=1, bias=False, indice_key="s1"),
        spconv.SparseConv3d(8, 8, 3, stride=2, padding=1, bias=False, indice_key="d1"),
        spconv.SparseInverseConv3d(8, 4, 3, bias=False, indice_key="d1"),
    )
    reference = net(spconv.SparseConvTensor(feats, coords, [8, 12, 10], 1)).features
    layers = [m for m in net.modules() if isinstance(m, SparseConvolution)]
    for layer in layers:
        layer.algo = ConvAlgo.MaskImplicitGemm
    leaf = feats.clone().requires_grad_(True)
    out = net(spconv.SparseConvTensor(leaf, coords, [8, 12, 10], 1)).features
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert all(layer.algo == ConvAlgo.MaskImplicitGemm for layer in layers)
    # without the fix the same layer stops on its CUDA-only algorithm
    with pytest.raises(AssertionError, match="implicit gemm"):
        SparseConvolution.forward.__wrapped__(layers[0], spconv.SparseConvTensor(feats, coords, [8, 12, 10], 1))


def test_scatter_add_cpu_is_exact() -> None:
    """spconv's own CPU scatter-add shares row pointers between OpenMP threads; the replacement
    must add every row to its own output, also for large inputs and a longer buffer."""
    from spconv.core_cc.csrc.sparse.all import SpconvOps
    from spconv.pytorch.cppcore import torch_tensor_to_tv

    rng = np.random.default_rng(0)
    n_out, nhot, channels = 150_000, 120_000, 16
    inds = torch.from_numpy(rng.choice(n_out, size=nhot, replace=False).astype(np.int32))
    buffer = torch.from_numpy(rng.normal(size=(nhot + 500, channels)).astype(np.float32))  # spare rows
    for _ in range(3):
        out = torch.from_numpy(rng.normal(size=(n_out, channels)).astype(np.float32))
        expected = out.clone().index_add_(0, inds.long(), buffer[:nhot])
        SpconvOps.scatter_add_cpu(torch_tensor_to_tv(out), torch_tensor_to_tv(buffer), torch_tensor_to_tv(inds))
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("seed", "batch_size", "spatial_shape", "per_sample", "channels"),
    [
        (0, 1, (8, 12, 10), 80, (3, 8, 16)),
        (1, 2, (9, 15, 17), 150, (4, 16, 8)),
        (2, 2, (24, 48, 48), 4000, (4, 16, 16)),  # thousands of pairs per offset: threaded scatter
    ],
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
def test_subm_then_strided_matches_dense(
    seed: int,
    batch_size: int,
    spatial_shape: tuple[int, int, int],
    per_sample: int,
    channels: tuple[int, int, int],
    device: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CPU (the ``spconv`` wheel with the fixes) and on CUDA (``spconv-cu*``, where no fix applies)."""
    import spconv.pytorch as spconv

    if device == "cuda":  # the dense reference in full float32: no TF32 in cuDNN's Conv3d
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    rng = np.random.default_rng(seed)
    c_in, c_mid, c_out = channels
    coords_np = random_voxels(rng, batch_size, spatial_shape, per_sample)
    coords = torch.from_numpy(coords_np).to(device)
    feats = torch.from_numpy(rng.normal(size=(len(coords_np), c_in)).astype(np.float32)).to(device)

    w1 = random_weight(rng, c_mid, c_in).to(device)  # torch layout (out, in, kz, ky, kx)
    w2 = random_weight(rng, c_out, c_mid).to(device)

    # sparse: SubMConv3d -> SparseConv3d(stride 2)
    subm = spconv.SubMConv3d(c_in, c_mid, 3, padding=1, bias=False, indice_key="subm1").to(device)
    down = spconv.SparseConv3d(c_mid, c_out, 3, stride=2, padding=1, bias=False).to(device)
    assert_krsc(subm, c_mid, c_in)
    assert_krsc(down, c_out, c_mid)
    with torch.no_grad():
        subm.weight.copy_(spconv_weight_from_torch(w1))
        down.weight.copy_(spconv_weight_from_torch(w2))
    feats_sparse = feats.clone().requires_grad_(True)
    x = spconv.SparseConvTensor(feats_sparse, coords, list(spatial_shape), batch_size)
    h = subm(x)
    out = down(h)
    out_dense_sparse = out.dense()  # (B, c_out, D', H', W')

    # dense: the same weights, SubM = conv sampled at active sites
    feats_dense = feats.clone().requires_grad_(True)
    w1_dense = w1.clone().requires_grad_(True)
    w2_dense = w2.clone().requires_grad_(True)
    grid = scatter_dense(feats_dense, coords, batch_size, spatial_shape)
    mask = scatter_dense(torch.ones(len(coords), 1, device=device), coords, batch_size, spatial_shape)  # (B, 1, D, H, W)
    h_dense = F.conv3d(grid, w1_dense, padding=1) * mask
    out_dense = F.conv3d(h_dense, w2_dense, stride=2, padding=1)

    # forward: SubM features at the active sites, then the whole strided output grid
    assert torch.equal(h.indices, coords)  # SubM keeps the input sites, in order
    torch.testing.assert_close(h.features, gather_dense(h_dense, coords), atol=TOL, rtol=TOL)
    assert out_dense_sparse.shape == out_dense.shape
    assert out.features.shape[0] > 0
    torch.testing.assert_close(out_dense_sparse, out_dense, atol=TOL, rtol=TOL)

    # backward through a fixed random projection of the output
    g = torch.from_numpy(rng.normal(size=tuple(out_dense.shape)).astype(np.float32)).to(device)
    (out_dense_sparse * g).sum().backward()
    (out_dense * g).sum().backward()
    assert feats_sparse.grad is not None and subm.weight.grad is not None and down.weight.grad is not None
    assert feats_sparse.grad.abs().max() > 0
    torch.testing.assert_close(feats_sparse.grad, feats_dense.grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(torch_grad_from_spconv(subm.weight.grad), w1_dense.grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(torch_grad_from_spconv(down.weight.grad), w2_dense.grad, atol=TOL, rtol=TOL)


def test_subm_on_real_voxels_matches_dense_crop() -> None:
    """A real sweep's voxels (spatial shape [80, 1600, 1600]): the densest 96 x 96 (y, x) column is
    convolved sparsely in the full grid and densely in the crop; forward and gradients agree."""
    import spconv.pytorch as spconv

    path = DATA / "spconv_pc" / "test_spconv.pkl"
    assert path.is_file(), f"real spconv voxels missing: expected {path} (shared test data, see its README)"
    with path.open("rb") as f:
        points_xyz, coords_bzyx, spatial_shape = pickle.load(f)  # (N, 3) f32, (N, 4) i32, [z, y, x]
    assert coords_bzyx.shape == (len(points_xyz), 4) and list(spatial_shape) == [80, 1600, 1600]

    tile = 96
    tiles = coords_bzyx[:, 2] // tile * (spatial_shape[2] // tile + 1) + coords_bzyx[:, 3] // tile
    best = np.bincount(tiles).argmax()
    keep = tiles == best
    coords_np = np.ascontiguousarray(coords_bzyx[keep])
    assert len(coords_np) > 1000, "the crop should hold a real amount of voxels"
    y0, x0 = coords_np[:, 2].min() // tile * tile, coords_np[:, 3].min() // tile * tile
    feats_np = np.concatenate([points_xyz[keep] / 10.0, np.ones((len(coords_np), 1), np.float32)], 1)

    rng = np.random.default_rng(0)
    c_in, c_out = feats_np.shape[1], 16
    w = random_weight(rng, c_out, c_in)
    coords = torch.from_numpy(coords_np)
    feats = torch.from_numpy(feats_np.astype(np.float32))

    subm = spconv.SubMConv3d(c_in, c_out, 3, padding=1, bias=False)
    assert_krsc(subm, c_out, c_in)
    with torch.no_grad():
        subm.weight.copy_(spconv_weight_from_torch(w))
    g = torch.from_numpy(rng.normal(size=(len(coords_np), c_out)).astype(np.float32))

    crop_coords = coords - torch.tensor([0, 0, int(y0), int(x0)], dtype=torch.int32)
    crop_shape = (int(spatial_shape[0]), tile, tile)
    feats_dense = feats.clone().requires_grad_(True)
    w_dense = w.clone().requires_grad_(True)
    grid = scatter_dense(feats_dense, crop_coords, 1, crop_shape)
    out_dense = gather_dense(F.conv3d(grid, w_dense, padding=1), crop_coords)  # (N, c_out)
    (out_dense * g).sum().backward()

    # a few sparse passes: spconv's unpatched CPU scatter-add got some of them wrong
    for _ in range(3):
        feats_sparse = feats.clone().requires_grad_(True)
        subm.zero_grad()
        out = subm(spconv.SparseConvTensor(feats_sparse, coords, list(spatial_shape), 1))
        (out.features * g).sum().backward()
        assert torch.equal(out.indices, coords)
        torch.testing.assert_close(out.features, out_dense, atol=TOL, rtol=TOL)
        torch.testing.assert_close(feats_sparse.grad, feats_dense.grad, atol=TOL, rtol=TOL)
        torch.testing.assert_close(torch_grad_from_spconv(subm.weight.grad), w_dense.grad, atol=TOL, rtol=TOL)


def test_spconv_checkpoints_load_after_mmdet3d_patched_the_loader():
    import mmdet3d.models  # noqa: F401  (its import replaces SparseModule._load_from_state_dict)
    import spconv.pytorch as spconv
    from spconv.pytorch.modules import SparseModule

    from models.spconv_cpu import spconv_native_state_dict_loading

    assert "mmdet3d" in SparseModule.__dict__["_load_from_state_dict"].__module__
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv3d(2, 5, 3, bias=False, indice_key="a"))
    state = net.state_dict()
    for meta in state._metadata.values():  # as written by a process that never imported mmdet3d
        meta["version"] = 1
    other = spconv.SparseSequential(spconv.SubMConv3d(2, 5, 3, bias=False, indice_key="a"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(state)  # mmdet3d's loader permutes our own layout
    with spconv_native_state_dict_loading():
        other.load_state_dict(state)
    assert torch.equal(other[0].weight, net[0].weight)
    assert "mmdet3d" in SparseModule.__dict__["_load_from_state_dict"].__module__  # restored
