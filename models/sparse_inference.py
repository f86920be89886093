"""Inference-only twin of :class:`models.sparse_backbone.SparseBackbone3d`: batch norm folded,
convolutions as plain torch ops on spconv's rulebooks.

Why it exists: on one CPU thread, spconv's CPU path (gather-GEMM-scatter per kernel offset, the
only algorithm it has there) spends more time around its matrix products than in them: a Python
loop per kernel offset that wraps every buffer in tensorview and numpy views, the race-free
scatter of :mod:`models.spconv_cpu` converting each offset's indices to int64 on every call, and
separate batch-norm and ReLU passes. On the ego's ~3,300 voxels of the comparison's frame: about
37 ms, of which the products are ~10 ms and the rulebooks ~8 ms. Here, per layer:

- the **rulebook** (which input row feeds which output row through which kernel offset) is still
  spconv's, from its C++ ``get_indice_pairs``; only the pairs in use are converted to int64, once
  per indice key (layers that share a key share it, as in spconv);
- **batch norm is folded** into the weights (``W' = W * gamma / sqrt(var + eps)``, bias
  ``beta - mean * gamma / sqrt(var + eps)``) and ReLU applied in place;
- per kernel offset, one ``index_select``, ``mm`` and ``index_add_`` into reused buffers; the
  centre offset of a submanifold convolution (every voxel with itself) is one ``addmm`` that also
  adds the bias;
- the final BEV scatter writes straight into the layout the 2D backbone reads (channels-last when
  :attr:`SparseBackbone3dInference.channels_last`), without a permuted copy.

Same outputs as the plain backbone in eval mode up to float32 rounding (the folded weights round
differently); ``tests/models/test_sparse_inference.py`` checks it against spconv layer by layer
and end to end. No gradients: build it with :meth:`SparseBackbone3d.fuse_for_inference` and run it
under ``torch.no_grad`` or ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from spconv.core import ConvAlgo
from spconv.pytorch import ops as spconv_ops
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["FoldedSparseConv", "Rulebook", "SparseBackbone3dInference", "spconv_rulebook"]


@dataclass
class Rulebook:
    """Which input row feeds which output row, per kernel offset.

    Attributes:
        out_coords: (M, 4) int32 ``[cloud, z, y, x]`` of the output voxels, in spconv's order (for a
            submanifold convolution: the input voxels).
        offsets: kernel offset index ``(kz * KY + ky) * KX + kx`` of each group below, without the
            centre of a submanifold convolution (all voxels pair with themselves there).
        in_rows: per offset, (n_k,) int64 input rows.
        out_rows: per offset, (n_k,) int64 output rows.
    """

    out_coords: torch.Tensor
    offsets: list[int]
    in_rows: list[torch.Tensor]
    out_rows: list[torch.Tensor]

    @property
    def max_pairs(self) -> int:
        return max((len(r) for r in self.in_rows), default=0)


class FoldedSparseConv(nn.Module):
    """A sparse convolution with its batch norm folded in, followed by ReLU (eval mode only).

    ``weight``: (K, C_in, C_out) per kernel offset (spconv's KRSC weight, scaled per output
    channel); ``bias``: (C_out,).
    """

    def __init__(self, conv: nn.Module, norm: nn.BatchNorm1d) -> None:
        super().__init__()
        if tuple(conv.dilation) != (1, 1, 1) or conv.transposed or conv.inverse or conv.groups != 1:
            raise ValueError("only plain (non-dilated, non-transposed, ungrouped) sparse convolutions fold")
        if conv.bias is not None:
            raise ValueError("expected a bias-free sparse convolution before its batch norm")
        with torch.no_grad():
            # torch's conv + batch-norm folding scales dim 0, which is C_out in spconv's layout too
            weight, bias = fuse_conv_bn_weights(
                conv.weight, None, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            c_out, c_in = weight.shape[0], weight.shape[-1]
            weight = weight.detach().reshape(c_out, -1, c_in)  # (C_out, K, C_in)
            self.register_buffer("weight", weight.permute(1, 2, 0).contiguous())  # (K, C_in, C_out)
            self.register_buffer("bias", bias.detach().clone())
        self.kernel = tuple(int(k) for k in conv.kernel_size)
        self.stride = tuple(int(s) for s in conv.stride)
        self.padding = tuple(int(p) for p in conv.padding)
        self.subm = bool(conv.subm)
        self.indice_key = conv.indice_key

    def forward(self, features: torch.Tensor, rulebook: Rulebook) -> torch.Tensor:
        """(V, C_in) features -> (M, C_out) ``relu(bn(conv(features)))`` on the rulebook's outputs."""
        num_out = rulebook.out_coords.shape[0]
        c_out = self.weight.shape[2]
        if self.subm:
            centre = self.weight.shape[0] // 2
            out = torch.addmm(self.bias, features, self.weight[centre])  # the identity pairing
        else:
            out = self.bias.expand(num_out, c_out).clone()
        n_max = rulebook.max_pairs
        if n_max:
            gathered = features.new_empty((n_max, features.shape[1]))
            product = features.new_empty((n_max, c_out))
            for k, rows_in, rows_out in zip(
                rulebook.offsets, rulebook.in_rows, rulebook.out_rows, strict=True
            ):
                n = rows_in.shape[0]
                torch.index_select(features, 0, rows_in, out=gathered[:n])
                torch.mm(gathered[:n], self.weight[k], out=product[:n])
                out.index_add_(0, rows_out, product[:n])
        return out.relu_()


def spconv_rulebook(
    coords: torch.Tensor,
    spatial_shape: tuple[int, int, int],
    num_clouds: int,
    layer: FoldedSparseConv,
) -> tuple[Rulebook, tuple[int, int, int]]:
    """The rulebook spconv builds for ``layer`` (its C++ ``get_indice_pairs``), regrouped per
    kernel offset as int64 rows; and the output spatial shape ``(D, H, W)``.

    Args:
        coords: (V, 4) int32 ``[cloud, z, y, x]`` of the input voxels, contiguous.
        spatial_shape: input ``(D, H, W)``.
        num_clouds: N.
        layer: the folded layer (kernel, stride, padding, submanifold or not).

    A submanifold rulebook stores the pair count of offsets past the centre under their mirror
    offset (``K - 1 - k``), which is how spconv's own ``indice_conv`` reads it; the centre is left
    out (see :meth:`FoldedSparseConv.forward`).
    """
    if layer.subm:
        out_shape = spatial_shape
    else:
        out_shape = tuple(
            int(n)
            for n in spconv_ops.get_conv_output_size(
                list(spatial_shape), list(layer.kernel), list(layer.stride), list(layer.padding), [1, 1, 1]
            )
        )
    out_coords, pairs, pair_count = spconv_ops.get_indice_pairs(
        coords,
        num_clouds,
        list(spatial_shape),
        ConvAlgo.Native,
        list(layer.kernel),
        list(layer.stride),
        list(layer.padding),
        [1, 1, 1],
        [0, 0, 0],
        layer.subm,
        False,
    )
    counts = pair_count.tolist()
    k_total = len(counts)
    centre = k_total // 2
    offsets, in_rows, out_rows = [], [], []
    for k in range(k_total):
        if layer.subm and k == centre:
            continue
        n = counts[k_total - 1 - k] if layer.subm and k > centre else counts[k]
        if n > 0:
            rows = pairs[:, k, :n].long()  # only the used pairs: (2, K, V) holds mostly padding
            offsets.append(k)
            in_rows.append(rows[0])
            out_rows.append(rows[1])
    return Rulebook(out_coords, offsets, in_rows, out_rows), out_shape


class SparseBackbone3dInference(nn.Module):
    """Voxels of N clouds -> (N, C_bev, H, W), as the source backbone in eval mode (no gradients)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        layers = []
        for sequence in [backbone.input_conv, *backbone.stages, backbone.out_conv]:
            modules = list(sequence)
            if len(modules) % 3:
                raise ValueError("expected (convolution, batch norm, ReLU) triples")
            for conv, norm, act in zip(modules[0::3], modules[1::3], modules[2::3], strict=True):
                if not isinstance(norm, nn.BatchNorm1d) or not isinstance(act, nn.ReLU):
                    raise ValueError(f"cannot fold {type(norm).__name__} / {type(act).__name__}")
                layers.append(FoldedSparseConv(conv, norm))
        self.layers = nn.ModuleList(layers)
        self.spatial_shape = tuple(int(n) for n in backbone.grid.spatial_shape_zyx)
        self.bev_channels = backbone.bev_channels
        self.bev_shape = backbone.bev_shape
        # write the BEV map channels-last (what the folded 2D backbone runs in), saving a copy
        self.channels_last = False

    def train(self, mode: bool = True) -> SparseBackbone3dInference:
        if mode:
            raise RuntimeError("the folded sparse backbone is for inference only; train the original")
        return super().train(False)

    def forward(
        self, voxel_features: torch.Tensor, coords_bzyx: torch.Tensor, num_clouds: int
    ) -> torch.Tensor:
        """(V, C_in) features, (V, 4) int ``[cloud, z, y, x]``, N -> (N, C_bev, H, W) float32
        (channels-last strides when :attr:`channels_last`)."""
        if voxel_features.shape[0] == 0:
            return voxel_features.new_zeros((num_clouds, self.bev_channels, *self.bev_shape))
        features = voxel_features
        coords = coords_bzyx.to(torch.int32).contiguous()
        shape = self.spatial_shape
        rulebooks: dict[str, tuple[Rulebook, tuple[int, int, int]]] = {}
        for layer in self.layers:
            shared = rulebooks.get(layer.indice_key) if layer.indice_key is not None else None
            if shared is not None and not layer.subm:
                raise ValueError(f"indice key {layer.indice_key!r} is reused by a strided layer")
            rulebook, out_shape = (
                shared if shared is not None else spconv_rulebook(coords, shape, num_clouds, layer)
            )
            if layer.indice_key is not None:
                rulebooks[layer.indice_key] = (rulebook, out_shape)
            features = layer(features, rulebook)
            coords, shape = rulebook.out_coords, out_shape
        d, h, w = shape
        c = features.shape[1]
        b, z, y, x = coords.long().unbind(1)
        if self.channels_last:  # (N, H, W, C, D) memory: channel c * D + d, the 2D backbone's layout
            dense = features.new_zeros((num_clouds, h, w, c, d))
            dense[b, y, x, :, z] = features  # advanced indices around a slice: (M, C) rows
            return dense.view(num_clouds, h, w, c * d).permute(0, 3, 1, 2)
        dense = features.new_zeros((num_clouds, c, d, h * w))
        dense[b, :, z, y * w + x] = features
        return dense.view(num_clouds, c * d, h, w)
