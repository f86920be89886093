"""Entropy coding: lossless round trips, and caps that hold against lying prefixes."""

import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from v2x.entropy import MAX_BODY_BYTES, PREFIX_BYTES, Compression, compress, decompress
from v2x.message import DecodeError


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(list(Compression)))
def test_round_trip_is_exact(body, compression):
    assert decompress(compress(body, compression)) == body


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.LZ4])
def test_redundant_data_shrinks(compression):
    body = np.repeat(np.arange(100, dtype=np.int16), 50).tobytes()
    payload = compress(body, compression)
    assert len(payload) < len(body) / 10
    assert decompress(payload) == body


def test_levels_are_accepted_and_lossless():
    body = bytes(range(256)) * 40
    for compression, level in [(Compression.ZSTD, 1), (Compression.ZSTD, 19), (Compression.LZ4, 9)]:
        assert decompress(compress(body, compression, level)) == body


def test_uncompressed_payload_is_prefix_plus_body():
    assert compress(b"abc", Compression.NONE) == struct.pack("<BI", 0, 3) + b"abc"
    assert PREFIX_BYTES == 5


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x03\x00", id="short-prefix"),
        pytest.param(struct.pack("<BI", 0, 4) + b"abc", id="none-short"),
        pytest.param(struct.pack("<BI", 0, 2) + b"abc", id="none-long"),
        pytest.param(struct.pack("<BI", 9, 3) + b"abc", id="unknown-method"),
        pytest.param(struct.pack("<BI", 1, 3) + b"abc", id="zstd-garbage"),
        pytest.param(struct.pack("<BI", 2, 3) + b"\xff\xff", id="lz4-garbage"),
        pytest.param(struct.pack("<BI", 0, MAX_BODY_BYTES + 1), id="over-cap"),
        pytest.param(struct.pack("<BI", 2, 10_000_000) + b"\x00" * 10, id="lz4-impossible-ratio"),
    ],
)
def test_malformed_payloads_raise_decode_error(payload):
    with pytest.raises(DecodeError):
        decompress(payload)


def test_zstd_frame_must_declare_the_prefixed_size():
    body = b"hello world " * 100
    frame = zstandard.ZstdCompressor().compress(body)
    with pytest.raises(DecodeError, match="declares"):
        decompress(struct.pack("<BI", 1, len(body) + 1) + frame)
    # a streaming frame without a content size is refused rather than decompressed unbounded
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    with pytest.raises(DecodeError):
        decompress(struct.pack("<BI", 1, len(body)) + streamed)


def test_zstd_trailing_bytes_are_refused():
    body = b"x" * 1000
    good = compress(body, Compression.ZSTD)
    with pytest.raises(DecodeError):
        decompress(good + b"\x00")


def test_compress_refuses_bodies_over_the_cap():
    with pytest.raises(ValueError):
        compress(bytes(MAX_BODY_BYTES + 1), Compression.NONE)
