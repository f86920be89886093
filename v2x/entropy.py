"""Lossless entropy coding of codec bodies with zstd or lz4, with hard caps for decoding.

Every codec payload starts with the same 5-byte prefix (little-endian):

======  ======  ======  ====================================================================
offset  size    type    field
======  ======  ======  ====================================================================
0       1       uint8   compression (:class:`Compression`: 0 none, 1 zstd, 2 lz4 block)
1       4       uint32  length R of the body once decompressed (at most :data:`MAX_BODY_BYTES`)
5       ...     bytes   the body: R bytes as is, a single zstd frame that records its content
                        size R, or an lz4 block without size prefix
======  ======  ======  ====================================================================

Decoding never allocates more than the declared R (itself capped), checks that a zstd frame
declares exactly R, bounds R for lz4 by the format's maximum compression ratio, and rejects
trailing bytes. Failures raise :class:`v2x.message.DecodeError`.
"""

from __future__ import annotations

import enum
import struct

import lz4.block
import zstandard

from v2x.message import DecodeError

__all__ = ["MAX_BODY_BYTES", "PREFIX_BYTES", "Compression", "compress", "decompress"]

_PREFIX = struct.Struct("<BI")
PREFIX_BYTES = _PREFIX.size  # 5
MAX_BODY_BYTES = 64 * 1024 * 1024
"""hard cap on a decompressed body, whatever a payload declares"""
# An lz4 sequence can describe at most ~255 output bytes per input byte (length extension bytes
# of 255 each), so a block of n bytes cannot decode to more than this.
_LZ4_MAX_RATIO = 256
_ZSTD_DEFAULT_LEVEL = 3  # zstd's own default level


class Compression(enum.IntEnum):
    """Entropy coder applied to a codec body. The integer value is written on the wire."""

    NONE = 0
    ZSTD = 1
    LZ4 = 2


def compress(body: bytes, compression: Compression, level: int | None = None) -> bytes:
    """Prefix + (compressed) body.

    Args:
        body: raw codec body, at most :data:`MAX_BODY_BYTES`.
        compression: the coder.
        level: zstd level (1-22; None = 3, zstd's default) or lz4 high-compression level
            (1-12; None = lz4's fast mode). Ignored for NONE.
    """
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"body of {len(body)} bytes exceeds the cap of {MAX_BODY_BYTES}")
    prefix = _PREFIX.pack(int(compression), len(body))
    match Compression(compression):
        case Compression.NONE:
            return prefix + bytes(body)
        case Compression.ZSTD:
            cctx = zstandard.ZstdCompressor(
                level=_ZSTD_DEFAULT_LEVEL if level is None else level, write_content_size=True
            )
            return prefix + cctx.compress(body)
        case Compression.LZ4:
            if level is None:
                data = lz4.block.compress(body, store_size=False)
            else:
                data = lz4.block.compress(body, mode="high_compression", compression=level, store_size=False)
            return prefix + data


def decompress(payload: bytes) -> bytes:
    """Body back from prefix + (compressed) body; :class:`DecodeError` on anything malformed."""
    if len(payload) < PREFIX_BYTES:
        raise DecodeError(f"payload of {len(payload)} bytes is shorter than its {PREFIX_BYTES}-byte prefix")
    method, raw_len = _PREFIX.unpack_from(payload, 0)
    data = payload[PREFIX_BYTES:]
    if raw_len > MAX_BODY_BYTES:
        raise DecodeError(f"declared body of {raw_len} bytes exceeds the cap of {MAX_BODY_BYTES}")
    if method == Compression.NONE:
        if len(data) != raw_len:
            raise DecodeError(f"uncompressed body has {len(data)} bytes, prefix says {raw_len}")
        return bytes(data)
    if method == Compression.ZSTD:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"bad zstd frame header: {exc}") from None
        if declared != raw_len:
            raise DecodeError(f"zstd frame declares {declared} bytes, prefix says {raw_len}")
        try:
            body = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=raw_len, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise DecodeError(f"bad zstd data: {exc}") from None
    elif method == Compression.LZ4:
        if raw_len > _LZ4_MAX_RATIO * len(data) + 64:
            raise DecodeError(f"lz4 block of {len(data)} bytes cannot hold {raw_len} bytes")
        try:
            body = lz4.block.decompress(data, uncompressed_size=raw_len)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise DecodeError(f"bad lz4 block: {exc}") from None
    else:
        raise DecodeError(f"unknown compression {method}")
    if len(body) != raw_len:
        raise DecodeError(f"body decompressed to {len(body)} bytes, prefix says {raw_len}")
    return body
