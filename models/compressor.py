"""Learned compressor of BEV features (CORE style): channel reduction + spatial selection.

A sender reduces its (C, H, W) features to ``channels`` with a 1x1 convolution, keeps only the
cells chosen by its selection rule, and the V2X codec (:class:`v2x.codecs.SparseBEVCodec`) carries
those cells' indices and values; the receiver restores C channels with another 1x1 convolution.
What the receiver gets is the *decoded* message (quantisation included); gradients pass through
the codec unchanged (straight-through), so the compressor trains end to end.

Selection (``selection``):

- ``"confidence"`` (default): every cell by the sender's own detection confidence (Where2comm's
  spatial confidence map);
- ``"request"``: every cell by the sender's confidence times the receiver's request (CORE: the
  request is ``1 - ego confidence``, sent as a request map);
- ``"nonempty"``: cells where the sender has at least one voxel (its LiDAR saw something there),
  the ones with the strongest compressed features first when capped. Kept as a baseline: the
  detection head reads one cell per anchor, and the cell of a vehicle's box centre usually holds
  no voxel (the LiDAR hits the vehicle's near side), so this rule rarely sends the cells that carry
  a detection (see docs/perception.md, "Which cells a sender sends").
- ``"occupied_confidence"``: the cells where the sender has a voxel, ranked by its highest
  detection confidence within ``vicinity_cells`` of each: the cells holding the points of the
  vehicles it detects (they lie a few cells from the box centre the confidence peaks at). For
  fusion before the 2D backbone (``fusion.before_bev_backbone``), whose maps are zero wherever the
  sender has no voxel, so that a confidence peak at an empty box centre carries nothing.

In each case at most ``max_cells`` cells are sent (0: no limit), best scores first, and a cell
with a zero score is never sent.

Training budget (``train_cells``): ``"max_cells"`` trains with the evaluation budget;
``"random"`` draws each message's budget uniformly from 1 to every cell of the map while the
module trains (Where2comm's training proxy: its ``Communication`` module sends a random fraction of
the best cells in training and thresholds only at inference). With the fixed budget an untrained
sender's confidence picks the cells, so early on the receiver mostly gets cells without the
vehicles it cannot see and has little to learn from; the random budget shows it senders' features
everywhere. Evaluation always uses ``max_cells``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from v2x.codecs import SparseBEV, SparseBEVCodec
from v2x.entropy import Compression
from v2x.quantize import ValueFormat

__all__ = ["BevCompressor", "CompressorConfig", "straight_through"]

_FORMATS = {"float32": ValueFormat.FLOAT32, "float16": ValueFormat.FLOAT16, "int16": ValueFormat.INT16, "int8": ValueFormat.INT8}


@dataclass(frozen=True)
class CompressorConfig:
    """Attributes:
    channels: channels per cell on the air (1x1 convolution from the feature width).
    max_cells: cells per message at most (0: no limit).
    selection: ``"confidence"``, ``"request"``, ``"nonempty"`` or ``"occupied_confidence"``
        (see the module docstring).
    vicinity_cells: ``occupied_confidence``: radius in cells of the neighbourhood whose highest
        confidence scores a cell (3: 2.4 m at 0.8 m cells, about half a car's length).
    train_cells: budget while training, ``"max_cells"`` or ``"random"`` (module docstring).
    value_format: feature values on the wire: float32, float16, int16 or int8.
    apply_to_ego: the receiver also passes its own map through the compressor and back before
        fusing (nothing is sent), as OpenCOOD compresses every agent's map, the ego's included:
        the fused map then holds one kind of features everywhere, and the layers after the fusion
        read a vehicle only a sender sees the way they read the ego's own. Off: the ego fuses its
        full features with the senders' decompressed ones.
    """

    channels: int = 16
    max_cells: int = 0
    selection: Literal["nonempty", "confidence", "request", "occupied_confidence"] = "confidence"
    vicinity_cells: int = 3
    train_cells: Literal["max_cells", "random"] = "max_cells"
    value_format: Literal["float32", "float16", "int16", "int8"] = "float16"
    apply_to_ego: bool = False

    def __post_init__(self) -> None:
        if self.channels < 1 or self.max_cells < 0 or self.vicinity_cells < 0:
            raise ValueError("CompressorConfig: channels must be >= 1, max_cells and vicinity_cells >= 0")
        selections = ("nonempty", "confidence", "request", "occupied_confidence")
        if self.selection not in selections:
            raise ValueError(f"CompressorConfig: selection must be one of {selections}, got {self.selection!r}")
        if self.train_cells not in ("max_cells", "random"):
            raise ValueError(f"CompressorConfig: train_cells must be 'max_cells' or 'random', got {self.train_cells!r}")

    @property
    def uses_occupancy(self) -> bool:
        """The selection reads which cells hold a voxel of the sender."""
        return self.selection in ("nonempty", "occupied_confidence")

    @property
    def uses_confidence(self) -> bool:
        """The selection reads the sender's detection confidence."""
        return self.selection in ("confidence", "request", "occupied_confidence")

    def codec(self) -> SparseBEVCodec:
        return SparseBEVCodec(fmt=_FORMATS[self.value_format], compression=Compression.ZSTD)


def straight_through(sent: torch.Tensor, decoded: np.ndarray) -> torch.Tensor:
    """``decoded`` in the forward pass, the gradient of ``sent`` in the backward pass."""
    received = torch.from_numpy(decoded).to(device=sent.device, dtype=sent.dtype)
    return sent + (received - sent).detach()


class BevCompressor(nn.Module):
    """``compress``: (N, C, H, W) -> (N, c, H, W); ``decompress``: (N, c, H, W) -> (N, C, H, W)."""

    def __init__(self, config: CompressorConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        self.codec = config.codec()
        self.encoder = nn.Conv2d(in_channels, config.channels, 1)
        self.decoder = nn.Sequential(nn.Conv2d(config.channels, in_channels, 1), nn.ReLU())

    def compress(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features)

    def decompress(self, compressed: torch.Tensor) -> torch.Tensor:
        return self.decoder(compressed)

    def round_trip(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W): compressed and restored at every cell, nothing quantised
        (what a receiver does to its own map with ``apply_to_ego``)."""
        return self.decompress(self.compress(features))

    def budget(self, num_cells: int) -> int:
        """Cells one message may carry (0: no limit): ``max_cells``, or while training with
        ``train_cells="random"`` a draw from 1..``num_cells`` (torch's global generator, so
        seeded runs repeat)."""
        if self.training and self.config.train_cells == "random":
            return int(torch.randint(1, num_cells + 1, ()).item())
        return self.config.max_cells

    def select(self, score: torch.Tensor) -> torch.Tensor:
        """(H, W) bool cells to send: the :meth:`budget` best positive scores (ties: lower index)."""
        flat = score.detach().reshape(-1)
        candidates = torch.nonzero(flat > 0).squeeze(1)
        budget = self.budget(flat.numel())
        if budget and candidates.numel() > budget:
            order = torch.argsort(-flat[candidates], stable=True)[:budget]
            candidates = candidates[order]
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[candidates] = True
        return mask.reshape(score.shape)

    def encode(self, compressed: torch.Tensor, mask: torch.Tensor) -> bytes:
        """Payload of one sender: (c, H, W) values at the (H, W) mask's cells."""
        c, h, w = compressed.shape
        indices = torch.nonzero(mask.reshape(-1)).squeeze(1)
        values = compressed.detach().reshape(c, -1)[:, indices].T  # (k, c)
        data = SparseBEV((h, w), indices.cpu().numpy().astype(np.int64), values.float().cpu().numpy())
        return self.codec.encode(data)
