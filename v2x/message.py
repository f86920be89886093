"""V2X message and its binary wire format: what crosses the air is ``encode(message)``.

A message is one sender's contribution for one tick: who sent it, when, where the sender believes
its sensor was (the pose *as measured*, noise included), which codec produced the payload, the
payload bytes, and an optional ECDSA P-256 signature (:mod:`v2x.signing`). ``len(encode(m))`` is
the message's size everywhere in the stack; nothing estimates bytes from tensor shapes.

Wire format, version 1. All integers and floats are little-endian; there is no padding.

========  ======  ===========  ==================================================================
offset    size    type         field
========  ======  ===========  ==================================================================
0         2       bytes        magic ``b"VX"``
2         1       uint8        format version (1)
3         1       uint8        flags: bit 0 = signed (a 64-byte signature follows the payload);
                               bits 1-7 are reserved and must be 0
4         4       uint32       sender id
8         4       uint32       sequence number (per sender, increasing; replay protection)
12        8       uint64       timestamp: microseconds of simulation time at which the data was
                               captured
20        8       float64      sender sensor pose x, metres, world frame
28        8       float64      y
36        8       float64      z
44        8       float64      roll, radians (``sim.geometry.rotation_from_rpy`` convention)
52        8       float64      pitch, radians
60        8       float64      yaw, radians
68        1       uint8        codec id (:class:`CodecId`)
69        4       uint32       payload length P in bytes (at most :data:`MAX_PAYLOAD_BYTES`)
73        P       bytes        payload, laid out by the codec (see :mod:`v2x.codecs`)
73 + P    64      bytes        only if signed: ECDSA P-256 / SHA-256 signature as r || s, each a
                               32-byte big-endian integer, over bytes ``[0, 73 + P)``
========  ======  ===========  ==================================================================

So a message is ``73 + P`` bytes unsigned and ``137 + P`` bytes signed; the flag makes an unsigned
message (signing switched off for training speed) say so on the wire.

Decoding is strict: the buffer length must be exactly ``73 + P (+ 64)``, the length field is
checked against the buffer before anything is sliced, unknown versions, flags and codec ids are
rejected, and pose fields must be finite. Every malformed input raises :class:`DecodeError` and
nothing else; an accepted buffer re-encodes to the same bytes.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import numpy as np

from sim.geometry import T_from_xyz_rpy, rpy_from_rotation

__all__ = [
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "SIGNATURE_BYTES",
    "CodecId",
    "DecodeError",
    "Message",
    "decode",
    "encode",
    "message_nbytes",
]

MAGIC = b"VX"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<2sBBIIQ6dBI")
HEADER_BYTES = _HEADER.size  # 73
SIGNATURE_BYTES = 64
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
"""hard cap on one payload: a float32 64-channel scan (~2 MB) fits eight times over"""
MAX_MESSAGE_BYTES = HEADER_BYTES + MAX_PAYLOAD_BYTES + SIGNATURE_BYTES
_FLAG_SIGNED = 0x01
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1

assert HEADER_BYTES == 73


class DecodeError(ValueError):
    """Raised for every malformed input to a decoder in ``v2x`` (wire format or payload)."""


class CodecId(enum.IntEnum):
    """What the payload holds; each value has one codec in :mod:`v2x.codecs`."""

    RAW_POINTS = 1
    """early fusion: (N, 4) x, y, z, intensity in the sender's sensor frame"""
    KEYPOINT_FEATURES = 2
    """K keypoints (xyz) with C features each (COOPERNAUT-style)"""
    SPARSE_BEV = 3
    """top-k cells of a BEV feature map with their indices (Where2comm / CORE-style)"""
    DETECTIONS = 4
    """late fusion: boxes, scores, labels"""
    REQUEST_MAP = 5
    """a receiver's request: the BEV cells it cannot see (request-driven sending)"""
    INTENT = 6
    """a planned trajectory: waypoints with time offsets and speeds (MAPPO-PIS intent sharing)"""


_CODEC_IDS = frozenset(int(c) for c in CodecId)


@dataclass(frozen=True)
class Message:
    """One V2X message. Field for field what the wire carries (see the module docstring).

    Attributes:
        sender_id: uint32 id of the sending vehicle.
        seq: uint32 sequence number, increasing per sender.
        timestamp_us: capture time, integer microseconds of simulation time (uint64).
        pose_xyzrpy: sender sensor pose as measured: x, y, z (metres, world frame), roll, pitch,
            yaw (radians). :attr:`T_world_from_sensor` turns it into a 4x4 matrix.
        codec: what the payload holds.
        payload: codec bytes.
        signature: b"" when unsigned, else the 64-byte r || s ECDSA P-256 signature.
    """

    sender_id: int
    seq: int
    timestamp_us: int
    pose_xyzrpy: tuple[float, float, float, float, float, float]
    codec: CodecId
    payload: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.sender_id <= _UINT32_MAX:
            raise ValueError(f"sender_id must fit in uint32, got {self.sender_id}")
        if not 0 <= self.seq <= _UINT32_MAX:
            raise ValueError(f"seq must fit in uint32, got {self.seq}")
        if not 0 <= self.timestamp_us <= _UINT64_MAX:
            raise ValueError(f"timestamp_us must fit in uint64, got {self.timestamp_us}")
        if len(self.pose_xyzrpy) != 6 or not all(math.isfinite(v) for v in self.pose_xyzrpy):
            raise ValueError(f"pose_xyzrpy must be 6 finite floats, got {self.pose_xyzrpy}")
        if int(self.codec) not in _CODEC_IDS:
            raise ValueError(f"unknown codec {self.codec}")
        if len(self.payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        if len(self.signature) not in (0, SIGNATURE_BYTES):
            raise ValueError(f"signature must be empty or {SIGNATURE_BYTES} bytes")
        # Normalise types so that equal messages compare equal and encode identically.
        object.__setattr__(self, "pose_xyzrpy", tuple(float(v) for v in self.pose_xyzrpy))
        object.__setattr__(self, "codec", CodecId(int(self.codec)))
        object.__setattr__(self, "payload", bytes(self.payload))
        object.__setattr__(self, "signature", bytes(self.signature))

    @classmethod
    def from_pose(
        cls,
        sender_id: int,
        seq: int,
        timestamp_us: int,
        T_world_from_sensor: np.ndarray,
        codec: CodecId,
        payload: bytes,
    ) -> Message:
        """Build an unsigned message from a (4, 4) float64 pose (already noised if it should be)."""
        T = np.asarray(T_world_from_sensor, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"T_world_from_sensor must be a finite (4, 4) matrix, got shape {T.shape}")
        roll, pitch, yaw = rpy_from_rotation(T[:3, :3])
        x, y, z = (float(v) for v in T[:3, 3])
        return cls(sender_id, seq, timestamp_us, (x, y, z, roll, pitch, yaw), codec, payload)

    @property
    def T_world_from_sensor(self) -> np.ndarray:
        """(4, 4) float64 sender sensor pose as measured."""
        return T_from_xyz_rpy(*self.pose_xyzrpy)

    @property
    def timestamp_s(self) -> float:
        return self.timestamp_us * 1e-6

    @property
    def signed(self) -> bool:
        return bool(self.signature)

    @property
    def nbytes(self) -> int:
        """``len(encode(self))``, without encoding."""
        return message_nbytes(len(self.payload), self.signed)

    def signing_input(self) -> bytes:
        """The bytes a signature covers: header (with the signed flag set) and payload."""
        return _pack_header(self, signed=True) + self.payload


def message_nbytes(payload_nbytes: int, signed: bool) -> int:
    """Wire size of a message whose payload has ``payload_nbytes`` bytes."""
    return HEADER_BYTES + payload_nbytes + (SIGNATURE_BYTES if signed else 0)


def _pack_header(msg: Message, signed: bool) -> bytes:
    return _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _FLAG_SIGNED if signed else 0,
        msg.sender_id,
        msg.seq,
        msg.timestamp_us,
        *msg.pose_xyzrpy,
        int(msg.codec),
        len(msg.payload),
    )


def encode(msg: Message) -> bytes:
    """The message's wire bytes (see the module docstring for the layout)."""
    return _pack_header(msg, signed=msg.signed) + msg.payload + msg.signature


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse wire bytes into a :class:`Message`; raises :class:`DecodeError` on any malformed input.

    The signature, if present, is returned but not checked: see :class:`v2x.signing.Verifier`.
    The payload is returned as bytes; :func:`v2x.codecs.decode_payload` parses it.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) < HEADER_BYTES:
        raise DecodeError(f"message of {len(buf)} bytes is shorter than the {HEADER_BYTES}-byte header")
    if len(buf) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(buf)} bytes exceeds the cap of {MAX_MESSAGE_BYTES}")
    magic, version, flags, sender_id, seq, timestamp_us, *pose, codec, payload_len = _HEADER.unpack_from(
        buf, 0
    )
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise DecodeError(f"unsupported format version {version}")
    if flags & ~_FLAG_SIGNED:
        raise DecodeError(f"reserved flag bits set: {flags:#04x}")
    if codec not in _CODEC_IDS:
        raise DecodeError(f"unknown codec id {codec}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise DecodeError(f"payload length {payload_len} exceeds the cap of {MAX_PAYLOAD_BYTES}")
    signature_len = SIGNATURE_BYTES if flags & _FLAG_SIGNED else 0
    expected = HEADER_BYTES + payload_len + signature_len
    if len(buf) != expected:
        raise DecodeError(
            f"length mismatch: header says {expected} bytes (payload {payload_len}, "
            f"signature {signature_len}), buffer has {len(buf)}"
        )
    if not all(math.isfinite(v) for v in pose):
        raise DecodeError("non-finite pose")
    payload = buf[HEADER_BYTES : HEADER_BYTES + payload_len]
    signature = buf[HEADER_BYTES + payload_len :]
    return Message(sender_id, seq, timestamp_us, tuple(pose), CodecId(codec), payload, signature)
