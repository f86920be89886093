"""Fuzzing the decoders: random and mutated byte strings are rejected with DecodeError only.

Seeded and bounded: 12,000 inputs, each fed to the wire decoder and every payload decoder:
4,000 random strings, and 8,000 mutations of valid inputs, in three kinds so that every layer
is reached: whole messages and payloads; codec bodies re-wrapped in a valid uncompressed or
zstd/lz4 prefix (the entropy layer passes, the body parser is tested); and such payloads inside
a valid message header. Accepted messages must re-encode to the same bytes and go through
verification without error; peak traced memory stays below a fixed bound.
"""

import struct
import tracemalloc

import numpy as np

from v2x.codecs import (
    DetectionsCodec,
    DetectionSet,
    IntentCodec,
    KeypointFeatures,
    KeypointFeaturesCodec,
    RawPointsCodec,
    RequestMapCodec,
    SparseBEV,
    SparseBEVCodec,
    decode_payload,
)
from v2x.entropy import MAX_BODY_BYTES, Compression, compress, decompress
from v2x.message import MAX_PAYLOAD_BYTES, CodecId, DecodeError, Message, decode, encode
from v2x.quantize import ValueFormat
from v2x.signing import KeyRegistry, RejectReason, SigningKey, Verifier, VerifierConfig, sign_message

SEED = 1609_2
N_RANDOM = 4_000
N_MUTATED = 8_000
PEAK_BYTES = 8 * 1024 * 1024
INTERESTING_U32 = [0, 1, 2, 7, 255, 256, 65_535, 2**31 - 1, 2**31, 2**32 - 1, MAX_PAYLOAD_BYTES,
                   MAX_PAYLOAD_BYTES + 1, MAX_BODY_BYTES, MAX_BODY_BYTES + 1]


def _payload_seeds(rng: np.random.Generator) -> list[tuple[CodecId, bytes]]:
    pts = rng.uniform(-50, 50, (40, 4)).astype(np.float32)
    kp = KeypointFeatures(
        rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    )
    bev = SparseBEV.from_dense_topk(rng.normal(size=(3, 6, 7)), rng.uniform(size=(6, 7)), 9)
    det = DetectionSet(rng.normal(size=(4, 7)).astype(np.float32), rng.uniform(size=4), rng.integers(0, 9, 4))
    mask = rng.uniform(size=(9, 11)) < 0.3
    intent = KeypointFeatures(
        rng.normal(size=(3, 3)).astype(np.float32), np.array([[0.5, 9.0], [1.0, 9.5], [1.5, 10.0]], np.float32)
    )
    seeds = []
    for compression in Compression:
        seeds += [
            (CodecId.RAW_POINTS, RawPointsCodec(ValueFormat.INT16, compression).encode(pts)),
            (CodecId.RAW_POINTS, RawPointsCodec(ValueFormat.FLOAT16, compression).encode(pts)),
            (
                CodecId.KEYPOINT_FEATURES,
                KeypointFeaturesCodec(ValueFormat.FLOAT32, ValueFormat.INT8, compression).encode(kp),
            ),
            (CodecId.SPARSE_BEV, SparseBEVCodec(ValueFormat.INT8, compression).encode(bev)),
            (CodecId.SPARSE_BEV, SparseBEVCodec(ValueFormat.FLOAT32, compression).encode(bev)),
            (CodecId.DETECTIONS, DetectionsCodec(ValueFormat.INT16, compression).encode(det)),
            (CodecId.REQUEST_MAP, RequestMapCodec(compression).encode(mask)),
            (CodecId.INTENT, IntentCodec(compression=compression).encode(intent)),
        ]
    return seeds


def _mutate(data: bytes, seeds: list[bytes], rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 8))
        n = len(buf)
        if op == 0 and n:  # flip bits
            for _ in range(int(rng.integers(1, 9))):
                i = int(rng.integers(0, n))
                buf[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and n:  # random bytes in place
            i = int(rng.integers(0, n))
            chunk = rng.bytes(int(rng.integers(1, 9)))
            buf[i : i + len(chunk)] = chunk
        elif op == 2:  # truncate
            buf = buf[: int(rng.integers(0, n + 1))]
        elif op == 3:  # append
            buf += rng.bytes(int(rng.integers(1, 64)))
        elif op == 4 and n:  # delete a slice
            i = int(rng.integers(0, n))
            del buf[i : i + int(rng.integers(1, 32))]
        elif op == 5 and n >= 4:  # an interesting little-endian uint32 anywhere
            i = int(rng.integers(0, n - 3))
            value = INTERESTING_U32[int(rng.integers(0, len(INTERESTING_U32)))]
            buf[i : i + 4] = struct.pack("<I", value)
        elif op == 6:  # splice with another seed
            other = seeds[int(rng.integers(0, len(seeds)))]
            cut = int(rng.integers(0, n + 1))
            buf = buf[:cut] + other[int(rng.integers(0, len(other) + 1)) :]
        elif op == 7 and n:  # duplicate a slice
            i = int(rng.integers(0, n))
            buf[i:i] = buf[i : i + int(rng.integers(1, 64))]
    return bytes(buf)


def _exercise(data: bytes, verifier: Verifier, now_us: int) -> bool:
    """Feed one input to every decoder; True if it decoded as a message."""
    for codec in CodecId:
        try:
            decode_payload(codec, data)
        except DecodeError:
            pass
    try:
        msg = decode(data)
    except DecodeError:
        return False
    assert encode(msg) == data
    try:
        decode_payload(msg.codec, msg.payload)
    except DecodeError:
        pass
    reason = verifier.check(msg, now_us)
    assert reason is None or isinstance(reason, RejectReason)
    return True


def test_random_and_mutated_inputs_only_ever_raise_decode_error():
    rng = np.random.default_rng(SEED)
    key = SigningKey.from_seed(5)
    registry = KeyRegistry()
    registry.register(5, key.public_key)
    verifier = Verifier(registry, VerifierConfig(require_signature=False))
    now_us = 50_000_000

    payloads = _payload_seeds(rng)
    messages = []
    for i, (codec, payload) in enumerate(payloads):
        msg = Message(5, i, now_us - 1000 * i, (1.0, 2.0, 0.3, 0.0, 0.01, 2.0), codec, payload)
        messages += [encode(msg), encode(sign_message(msg, key))]
    seeds = messages + [p for _, p in payloads]
    bodies = [(codec, decompress(p)) for codec, p in payloads]
    for data in messages:  # every seed is valid to begin with
        assert _exercise(data, verifier, now_us)
    for codec, payload in payloads:
        decode_payload(codec, payload)

    tracemalloc.start()
    try:
        decoded = 0
        for i in range(N_RANDOM):
            length = int(rng.integers(0, 64)) if i % 2 else int(rng.integers(64, 2048))
            blob = rng.bytes(length)
            if i % 4 == 0 and length >= 73:  # give a quarter a plausible header start
                blob = b"VX\x01" + blob[3:]
            decoded += _exercise(blob, verifier, now_us)
        for i in range(N_MUTATED):
            if i % 3 == 0:  # whole messages and payloads
                data = _mutate(seeds[int(rng.integers(0, len(seeds)))], seeds, rng)
            else:  # a mutated codec body behind a valid entropy prefix
                codec, body = bodies[int(rng.integers(0, len(bodies)))]
                body = _mutate(body, [b for _, b in bodies], rng)
                data = compress(body, Compression(int(rng.integers(0, 3))))
                if i % 3 == 2:  # ... inside a valid message
                    data = encode(Message(5, i, now_us, (0.0,) * 6, codec, data))
            decoded += _exercise(data, verifier, now_us)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak traced memory {peak / 2**20:.1f} MiB"
    # the mutations must reach past the header checks, or the fuzzing would be shallow
    assert decoded > N_MUTATED // 20
    assert verifier.accepted + sum(verifier.rejections.values()) >= decoded
