"""Wire format: round trips, exact sizes, strict rejection of malformed buffers."""

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.geometry import T_from_xyz_rpy
from v2x.message import (
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    SIGNATURE_BYTES,
    CodecId,
    DecodeError,
    Message,
    decode,
    encode,
    message_nbytes,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
messages = st.builds(
    Message,
    sender_id=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**32 - 1),
    timestamp_us=st.integers(0, 2**64 - 1),
    pose_xyzrpy=st.tuples(finite, finite, finite, finite, finite, finite),
    codec=st.sampled_from(list(CodecId)),
    payload=st.binary(max_size=300),
    signature=st.one_of(st.just(b""), st.binary(min_size=SIGNATURE_BYTES, max_size=SIGNATURE_BYTES)),
)


def _message(payload=b"payload", signature=b"") -> Message:
    pose = (1.0, -2.0, 0.5, 0.01, -0.02, 1.5)
    return Message(7, 42, 1_234_567, pose, CodecId.DETECTIONS, payload, signature)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_decode_inverts_encode_and_size_is_exact(msg):
    data = encode(msg)
    assert decode(data) == msg
    assert len(data) == msg.nbytes == message_nbytes(len(msg.payload), msg.signed)
    assert len(data) == HEADER_BYTES + len(msg.payload) + (SIGNATURE_BYTES if msg.signed else 0)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_accepted_buffers_are_canonical(msg):
    data = encode(msg)
    assert encode(decode(data)) == data
    assert decode(bytearray(data)) == decode(memoryview(data))


def test_header_layout_matches_the_documented_offsets():
    msg = _message(payload=b"abc", signature=bytes(range(64)))
    data = encode(msg)
    assert data[:2] == b"VX" and data[2] == 1 and data[3] == 0x01
    assert struct.unpack_from("<IIQ", data, 4) == (7, 42, 1_234_567)
    assert struct.unpack_from("<6d", data, 20) == msg.pose_xyzrpy
    assert data[68] == CodecId.DETECTIONS
    assert struct.unpack_from("<I", data, 69) == (3,)
    assert data[73:76] == b"abc" and data[76:] == bytes(range(64))


def test_unsigned_flag_and_size_say_unsigned():
    unsigned, signed = encode(_message()), encode(_message(signature=b"\x01" * 64))
    assert unsigned[3] == 0 and signed[3] == 1
    assert len(signed) - len(unsigned) == SIGNATURE_BYTES


@settings(max_examples=100, deadline=None)
@given(
    st.tuples(
        st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(-50, 50),
        st.floats(-math.pi, math.pi), st.floats(-1.5, 1.5), st.floats(-math.pi, math.pi),
    )
)
def test_pose_round_trips_through_the_header(xyzrpy):
    T = T_from_xyz_rpy(*xyzrpy)
    msg = Message.from_pose(1, 2, 3, T, CodecId.RAW_POINTS, b"")
    np.testing.assert_allclose(decode(encode(msg)).T_world_from_sensor, T, atol=1e-9)
    assert decode(encode(msg)).T_world_from_sensor.dtype == np.float64


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:-1], id="truncated"),
        pytest.param(lambda b: b + b"\x00", id="trailing-byte"),
        pytest.param(lambda b: b[:HEADER_BYTES - 1], id="short-header"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"XX" + b[2:], id="magic"),
        pytest.param(lambda b: b[:2] + b"\x02" + b[3:], id="version"),
        pytest.param(lambda b: b[:3] + b"\x02" + b[4:], id="reserved-flag"),
        pytest.param(lambda b: b[:3] + b"\x01" + b[4:], id="signed-flag-without-signature"),
        pytest.param(lambda b: b[:68] + b"\x00" + b[69:], id="codec-0"),
        pytest.param(lambda b: b[:68] + b"\xff" + b[69:], id="codec-255"),
        pytest.param(lambda b: b[:69] + struct.pack("<I", 2**32 - 1) + b[73:], id="payload-len-huge"),
        pytest.param(lambda b: b[:69] + struct.pack("<I", 8) + b[73:], id="payload-len-beyond-buffer"),
        pytest.param(lambda b: b[:20] + struct.pack("<d", math.nan) + b[28:], id="nan-pose"),
        pytest.param(lambda b: b[:60] + struct.pack("<d", math.inf) + b[68:], id="inf-yaw"),
    ],
)
def test_malformed_buffers_raise_decode_error(mutate):
    with pytest.raises(DecodeError):
        decode(mutate(encode(_message())))


def test_decode_rejects_non_bytes():
    with pytest.raises(DecodeError):
        decode("VX not bytes")  # type: ignore[arg-type]


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sender_id": -1},
        {"sender_id": 2**32},
        {"seq": 2**32},
        {"timestamp_us": -1},
        {"pose_xyzrpy": (0.0, 0.0, math.nan, 0.0, 0.0, 0.0)},
        {"pose_xyzrpy": (0.0,) * 5},
        {"codec": 99},
        {"signature": b"\x00" * 63},
    ],
)
def test_invalid_messages_are_refused_at_construction(kwargs):
    fields = dict(
        sender_id=1, seq=1, timestamp_us=1, pose_xyzrpy=(0.0,) * 6, codec=CodecId.RAW_POINTS, payload=b""
    )
    fields.update(kwargs)
    with pytest.raises(ValueError):
        Message(**fields)


def test_payload_cap_is_enforced_on_both_sides():
    with pytest.raises(ValueError):
        _message(payload=bytes(MAX_PAYLOAD_BYTES + 1))
    header = bytearray(encode(_message(payload=b"")))
    header[69:73] = struct.pack("<I", MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(DecodeError, match="cap"):
        decode(bytes(header) + bytes(MAX_PAYLOAD_BYTES + 1))
