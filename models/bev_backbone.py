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

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BevBackbone2d", "BevBackboneConfig"]


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

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); H and W multiples of ``min_input_multiple``."""
        h, w = bev.shape[-2:]
        if h % self.config.min_input_multiple or w % self.config.min_input_multiple:
            raise ValueError(f"BEV size {h} x {w} is not a multiple of {self.config.min_input_multiple}")
        x = bev
        outs = []
        for block, up in zip(self.blocks, self.ups, strict=True):
            x = block(x)  # (N, C_i, H / s_i, W / s_i)
            outs.append(up(x))  # (N, C_up_i, H, W)
        return torch.cat(outs, dim=1)
