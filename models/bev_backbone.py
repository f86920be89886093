"""2D BEV backbone (SECOND's RPN): strided conv blocks, each upsampled back and concatenated.

With the default sizes on a (N, 64, 100, 100) input::

    block0  Conv(64 -> 32, stride 1) + 1 x Conv(32 -> 32)       (N, 32, 100, 100)
    block1  Conv(32 -> 64, stride 2) + 1 x Conv(64 -> 64)       (N, 64, 50, 50)
    up0     ConvTranspose(32 -> 32, stride 1)                   (N, 32, 100, 100)
    up1     ConvTranspose(64 -> 32, stride 2)                   (N, 32, 100, 100)
    concat                                                      (N, 64, 100, 100)

Every block must come back to the input resolution (``prod(strides[:i+1]) == upsample_strides[i]``),
so the output is on the same BEV grid as the input. Convolutions are 3x3 with BatchNorm and ReLU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["BevBackbone2d", "BevBackboneConfig", "PostFusionNeck"]


@dataclass(frozen=True)
class BevBackboneConfig:
    """Sizes of the 2D backbone; one entry per block in every tuple.

    Attributes:
        layer_nums: extra 3x3 convolutions after each block's first (strided) one.
        layer_strides: stride of each block's first convolution.
        num_filters: channels of each block.
        upsample_strides: stride of each block's transposed convolution back to the input grid.
        num_upsample_filters: channels of each upsampled block (summed in the output).
    """

    layer_nums: tuple[int, ...] = (1, 1)
    layer_strides: tuple[int, ...] = (1, 2)
    num_filters: tuple[int, ...] = (32, 64)
    upsample_strides: tuple[int, ...] = (1, 2)
    num_upsample_filters: tuple[int, ...] = (32, 32)

    def __post_init__(self) -> None:
        lengths = {
            len(self.layer_nums),
            len(self.layer_strides),
            len(self.num_filters),
            len(self.upsample_strides),
            len(self.num_upsample_filters),
        }
        if len(lengths) != 1 or not self.layer_nums:
            raise ValueError("BevBackboneConfig: every tuple needs one entry per block")
        for i in range(len(self.layer_nums)):
            down = math.prod(self.layer_strides[: i + 1])
            if down != self.upsample_strides[i]:
                raise ValueError(
                    f"BevBackboneConfig: block {i} is downsampled {down}x but upsampled {self.upsample_strides[i]}x; "
                    "every block must return to the input grid"
                )

    @property
    def out_channels(self) -> int:
        return sum(self.num_upsample_filters)

    @property
    def min_input_multiple(self) -> int:
        """H and W must be multiples of this for the blocks to line up."""
        return math.prod(self.layer_strides)


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
        nn.ReLU(),
    ]


class BevBackbone2d(nn.Module):
    """(N, C_in, H, W) -> (N, sum(num_upsample_filters), H, W)."""

    def __init__(self, config: BevBackboneConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        blocks, ups = [], []
        c_in = in_channels
        for n_layers, stride, c_out, up_stride, c_up in zip(
            config.layer_nums,
            config.layer_strides,
            config.num_filters,
            config.upsample_strides,
            config.num_upsample_filters,
            strict=True,
        ):
            layers = _conv(c_in, c_out, stride)
            for _ in range(n_layers):
                layers += _conv(c_out, c_out, 1)
            blocks.append(nn.Sequential(*layers))
            ups.append(
                nn.Sequential(
                    nn.ConvTranspose2d(c_out, c_up, up_stride, stride=up_stride, bias=False),
                    nn.BatchNorm2d(c_up, eps=1e-3, momentum=0.01),
                    nn.ReLU(),
                )
            )
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.ups = nn.ModuleList(ups)
        self.out_channels = config.out_channels
        # memory format of the convolutions and of the output (see fuse_for_inference)
        self.memory_format = torch.contiguous_format
        self.inference_only = False

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); H and W multiples of ``min_input_multiple``. The output
        is in :attr:`memory_format` (channels-last strides on a :meth:`fuse_for_inference` copy)."""
        h, w = bev.shape[-2:]
        if h % self.config.min_input_multiple or w % self.config.min_input_multiple:
            raise ValueError(f"BEV size {h} x {w} is not a multiple of {self.config.min_input_multiple}")
        x = bev.contiguous(memory_format=self.memory_format)
        outs = []
        for block, up in zip(self.blocks, self.ups, strict=True):
            x = block(x)  # (N, C_i, H / s_i, W / s_i)
            outs.append(up(x))  # (N, C_up_i, H, W)
        return torch.cat(outs, dim=1)

    def fuse_for_inference(self) -> BevBackbone2d:
        """An eval-mode copy for inference only: every batch norm folded into the (transposed)
        convolution before it, a 1 x 1 stride-1 transposed convolution run as the plain 1 x 1
        convolution it equals, ReLUs in place, and everything in channels-last memory format.

        The same function as this backbone in eval mode up to float32 rounding (folding scales the
        weights, ``W * gamma / sqrt(var + eps)``, and adds ``beta - mean * gamma / sqrt(var + eps)``
        as a bias). Channels-last lets oneDNN run the 3x3 convolutions without reordering every
        input and output to its blocked layout: about 30 % less time on one CPU thread for the
        (64 -> 32, 100 x 100) block. The output keeps channels-last strides (same shape and values):
        the 1 x 1 convolutions of the heads and of the fusion read it as fast or faster, and laying
        it out as NCHW would cost a copy (~1 ms per agent). This module is left as it is; the copy
        refuses ``train()``.
        """
        fused = copy.deepcopy(self).eval()
        fused.blocks = nn.ModuleList(_fold_sequence(block) for block in fused.blocks)
        fused.ups = nn.ModuleList(_fold_sequence(up) for up in fused.ups)
        fused.memory_format = torch.channels_last
        fused.to(memory_format=torch.channels_last)
        fused.inference_only = True
        return fused

    def train(self, mode: bool = True) -> BevBackbone2d:
        if mode and self.inference_only:
            raise RuntimeError("a backbone folded for inference cannot be trained; train the original")
        return super().train(mode)


def _fold_sequence(sequence: nn.Sequential) -> nn.Sequential:
    """(Conv2d | ConvTranspose2d, BatchNorm2d, ReLU)* -> (conv with bias, ReLU in place)*."""
    modules = list(sequence)
    out: list[nn.Module] = []
    i = 0
    while i < len(modules):
        module = modules[i]
        follows_norm = i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d)
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and follows_norm:
            transpose = isinstance(module, nn.ConvTranspose2d)
            folded = fuse_conv_bn_eval(module.eval(), modules[i + 1].eval(), transpose=transpose)
            out.append(_as_pointwise_conv(folded) if transpose else folded)
            i += 2
        elif isinstance(module, nn.ReLU):
            out.append(nn.ReLU(inplace=True))
            i += 1
        else:
            raise ValueError(f"cannot fold a {type(module).__name__} in the 2D backbone")
    return nn.Sequential(*out)


def _as_pointwise_conv(module: nn.ConvTranspose2d) -> nn.Module:
    """A 1 x 1, stride-1 transposed convolution as the ``Conv2d`` it equals (weight (C_in, C_out)
    transposed), which oneDNN runs about twice as fast; any other transposed convolution as is."""
    plain_1x1 = (
        tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and tuple(module.padding) == (0, 0)
        and tuple(module.output_padding) == (0, 0)
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
    )
    if not plain_1x1:
        return module
    conv = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(module.weight.transpose(0, 1))
        if module.bias is not None:
            conv.bias.copy_(module.bias)
    return conv.eval()


class PostFusionNeck(nn.Module):
    """(N, C, H, W) -> (N, C, H, W): ``layers`` 3x3 convolutions (BatchNorm, ReLU) on a fused map,
    before the heads; an identity with no layers.

    AttFuse's attention has no weights and the heads are 1x1 convolutions, so without a neck the
    heads must read a received vehicle straight from a per-cell mix of the ego's and the senders'
    features. OpenCOOD's intermediate fusions fuse inside the 2D backbone and keep convolutions
    (its deblocks) after the fusion; this neck gives every fusion method the same few layers there.
    """

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"post-fusion layers must be >= 0, got {layers}")
        convs: list[nn.Module] = []
        for _ in range(layers):
            convs += _conv(channels, channels, 1)
        self.layers = nn.Sequential(*convs)
        self.inference_only = False

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.layers(fused)  # an empty Sequential returns its input

    def fuse_for_inference(self) -> PostFusionNeck:
        """An eval-mode copy with batch norm folded into the convolutions, channels-last (as
        :meth:`BevBackbone2d.fuse_for_inference`); this neck is left as it is."""
        fused = copy.deepcopy(self).eval()
        fused.layers = _fold_sequence(fused.layers)
        fused.to(memory_format=torch.channels_last)
        fused.inference_only = True
        return fused

    def train(self, mode: bool = True) -> PostFusionNeck:
        if mode and self.inference_only:
            raise RuntimeError("a neck folded for inference cannot be trained; train the original")
        return super().train(mode)
