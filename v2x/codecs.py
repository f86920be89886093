"""Codecs: numpy arrays <-> message payload bytes, one per :class:`v2x.message.CodecId`.

Each codec is a frozen dataclass holding its encoder settings; ``encode`` returns the payload
bytes (so ``len`` is exact) and the static ``decode`` reads every setting back from the payload,
so :func:`decode_payload` needs only the codec id from the message header. Torch callers convert
with ``tensor.numpy()`` / ``torch.from_numpy``.

Payload = the 5-byte prefix of :mod:`v2x.entropy` + a body, possibly zstd/lz4-compressed. Bodies
are little-endian; matrices are stored channel by channel (all values of column 0, then column 1,
...), which groups similar numbers for the entropy coder; integer formats put their float32
per-channel scales first (:mod:`v2x.quantize`). Body layouts, after decompression:

RAW_POINTS (early fusion), ``points`` (N, 4) x, y, z, intensity, sensor frame::

    uint8 format | uint8 filter | uint32 N | [4 x float32 scales] | 4 x N values, filtered

  The filter (:class:`PointFilter`) is a lossless transform that helps the entropy coder on
  points in scan order: DELTA replaces each integer value by its difference to the previous
  point's (modulo 2**16, so it inverts exactly), SHUFFLE stores, per column, all low bytes then
  all high bytes (as Blosc's shuffle filter). On a 64-channel scan they halve the zstd output.

KEYPOINT_FEATURES (COOPERNAUT-style), K keypoints with C features::

    uint8 xyz format | uint8 feature format | uint32 K | uint16 C
    | [3 x float32 xyz scales] | [C x float32 feature scales] | 3 x K xyz values | C x K features

SPARSE_BEV (Where2comm / CORE-style), k of the H x W cells of a C-channel BEV map::

    uint16 H | uint16 W | uint16 C | uint32 k | uint8 format | [C x float32 scales]
    | k x uint32 index deltas | C x k features

  Cell indices are flat, row-major (``row * W + col``), strictly increasing, sent as the first
  index then successive differences (each >= 1).

DETECTIONS (late fusion), M boxes (mmdet3d LiDAR convention, sender frame) with scores/labels::

    uint8 format | uint32 M | [8 x float32 scales] | 8 x M values (7 box columns, then score)
    | M x uint8 labels

REQUEST_MAP (request-driven sending), an H x W boolean mask of the cells a receiver asks for::

    uint16 H | uint16 W | ceil(H * W / 8) bytes of numpy.packbits (big bit order), pad bits 0

INTENT (MAPPO-PIS intent sharing), a planned trajectory of T >= 1 waypoints: the KEYPOINT_FEATURES
body with the waypoints (sensor frame) as keypoints and C = 2 features, the time offset from the
message timestamp (s, strictly increasing) and the planned speed (m/s). Its own id lets a receiver
tell intents from perception keypoints by the header alone.

Lossless settings (FLOAT32 values, any compression) round-trip float32 input exactly; lossy ones
stay within :func:`v2x.quantize.max_abs_error`, which each codec exposes as ``max_abs_error``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from v2x.entropy import Compression, compress, decompress
from v2x.message import CodecId, DecodeError
from v2x.quantize import Quantized, ValueFormat, dequantize, max_abs_error, quantize

__all__ = [
    "MAX_CHANNELS",
    "DetectionSet",
    "DetectionsCodec",
    "KeypointFeatures",
    "KeypointFeaturesCodec",
    "PointFilter",
    "RawPointsCodec",
    "RequestMapCodec",
    "SparseBEV",
    "SparseBEVCodec",
    "decode_payload",
]

MAX_CHANNELS = 4096
"""cap on feature channels C (keypoint and BEV features)"""
_POINT_FORMATS = (ValueFormat.FLOAT32, ValueFormat.FLOAT16, ValueFormat.INT16)
_BOX_FORMATS = (ValueFormat.FLOAT32, ValueFormat.FLOAT16, ValueFormat.INT16)
_ALL_FORMATS = tuple(ValueFormat)
_UINT16_MAX = 2**16 - 1
_UINT32_MAX = 2**32 - 1


# --------------------------------------------------------------------------------------------------
# Data carried by the codecs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeypointFeatures:
    """K keypoints with C features each.

    Attributes:
        xyz: (K, 3) float32 keypoint positions in the sender's sensor frame, metres.
        features: (K, C) float32 features of each keypoint.
    """

    xyz: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class SparseBEV:
    """The k cells of an H x W, C-channel BEV feature map that a sender transmits.

    Attributes:
        grid_shape: (H, W) of the full map.
        indices: (k,) int64 flat row-major cell indices ``row * W + col``, strictly increasing.
        features: (k, C) float32 features of those cells.
    """

    grid_shape: tuple[int, int]
    indices: np.ndarray
    features: np.ndarray

    @classmethod
    def from_dense_topk(cls, bev: np.ndarray, score: np.ndarray, k: int) -> SparseBEV:
        """Keep the k cells with the highest score (ties broken by lower index).

        Args:
            bev: (C, H, W) feature map.
            score: (H, W) how much each cell is worth sending (e.g. a confidence map).
            k: cells to keep, clipped to H * W.
        """
        bev = np.asarray(bev)
        score = np.asarray(score)
        if bev.ndim != 3 or score.shape != bev.shape[1:]:
            raise ValueError(f"bev must be (C, H, W) and score (H, W), got {bev.shape} and {score.shape}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        channels, height, width = bev.shape
        k = min(k, height * width)
        order = np.argsort(-score.reshape(-1), kind="stable")[:k]
        indices = np.sort(order).astype(np.int64)
        features = bev.reshape(channels, -1)[:, indices].T.astype(np.float32)
        return cls((height, width), indices, np.ascontiguousarray(features))

    def to_dense(self) -> np.ndarray:
        """(C, H, W) float32 map with zeros in the cells not sent."""
        height, width = self.grid_shape
        dense = np.zeros((self.features.shape[1], height * width), dtype=np.float32)
        dense[:, self.indices] = self.features.T
        return dense.reshape(-1, height, width)


@dataclass(frozen=True)
class DetectionSet:
    """Detections a sender shares (late fusion), in its sensor frame.

    Attributes:
        boxes: (M, 7) x, y, z (bottom centre), dx, dy, dz, yaw; mmdet3d LiDAR convention.
        scores: (M,) confidence in [0, 1].
        labels: (M,) int64 class index in [0, 255].
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------------------------------
# Body reading and writing
# --------------------------------------------------------------------------------------------------


class _Reader:
    """Cursor over a body that raises DecodeError instead of reading past the end."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pos = 0

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        if self._pos + s.size > len(self._body):
            raise DecodeError(f"body ends inside a {s.size}-byte field at offset {self._pos}")
        values = s.unpack_from(self._body, self._pos)
        self._pos += s.size
        return values

    def array(self, dtype: np.dtype | str, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = dt.itemsize * count
        if count < 0 or self._pos + nbytes > len(self._body):
            raise DecodeError(f"body ends inside an array of {count} x {dt} at offset {self._pos}")
        out = np.frombuffer(self._body, dtype=dt, count=count, offset=self._pos)
        self._pos += nbytes
        return out

    def finish(self) -> None:
        if self._pos != len(self._body):
            raise DecodeError(f"{len(self._body) - self._pos} trailing bytes after the body")


def _format(value: int, allowed: tuple[ValueFormat, ...], what: str) -> ValueFormat:
    if value not in {int(f) for f in allowed}:
        raise DecodeError(f"{what}: format {value} not one of {[f.name for f in allowed]}")
    return ValueFormat(value)


def _check_format(fmt: ValueFormat, allowed: tuple[ValueFormat, ...], what: str) -> ValueFormat:
    if fmt not in allowed:
        raise ValueError(f"{what} supports {[f.name for f in allowed]}, got {fmt!r}")
    return ValueFormat(fmt)


def _write_matrix(q: Quantized) -> tuple[bytes, bytes]:
    """(scales bytes, values bytes) of an (N, C) matrix, values stored channel by channel."""
    scales = b"" if q.scales is None else q.scales.astype("<f4").tobytes()
    return scales, np.ascontiguousarray(q.values.T).tobytes()


def _read_scales(reader: _Reader, fmt: ValueFormat, channels: int) -> np.ndarray | None:
    if not fmt.has_scales:
        return None
    scales = reader.array("<f4", channels)
    if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise DecodeError("scales must be finite and positive")
    return scales


def _read_matrix(
    reader: _Reader, fmt: ValueFormat, rows: int, channels: int, scales: np.ndarray | None
) -> np.ndarray:
    values = reader.array(fmt.dtype, rows * channels).reshape(channels, rows).T
    out = dequantize(Quantized(fmt, values, scales))
    if not np.all(np.isfinite(out)):
        raise DecodeError("non-finite values")
    return np.ascontiguousarray(out)


def _float_matrix(x: np.ndarray, columns: int | None, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or (columns is not None and arr.shape[1] != columns):
        shape = f"(N, {columns})" if columns is not None else "(N, C)"
        raise ValueError(f"{what} must be {shape}, got shape {arr.shape}")
    if arr.shape[0] > _UINT32_MAX:
        raise ValueError(f"{what}: too many rows ({arr.shape[0]})")
    return arr


# --------------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------------


class PointFilter(enum.IntEnum):
    """Lossless transform of RAW_POINTS values before entropy coding. Written on the wire."""

    NONE = 0
    SHUFFLE = 1
    """bytes grouped by significance within each column"""
    DELTA_SHUFFLE = 2
    """differences along the scan (integer formats only), then SHUFFLE"""


def _filter_columns(values: np.ndarray, point_filter: PointFilter) -> bytes:
    """(C, N) column-major values -> filtered bytes."""
    if point_filter is PointFilter.DELTA_SHUFFLE:
        values = np.diff(values, axis=1, prepend=np.zeros((len(values), 1), values.dtype))  # wraps
    if point_filter is PointFilter.NONE:
        return np.ascontiguousarray(values).tobytes()
    itemsize = values.dtype.itemsize
    as_bytes = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1, itemsize)
    planes = np.empty((len(values), itemsize, as_bytes.shape[1]), np.uint8)
    for byte in range(itemsize):
        planes[:, byte, :] = as_bytes[:, :, byte]
    return planes.tobytes()


def _unfilter_columns(
    reader: _Reader, dtype: np.dtype, columns: int, rows: int, point_filter: PointFilter
) -> np.ndarray:
    """Filtered bytes -> (C, N) column-major values."""
    raw = reader.array(np.uint8, columns * rows * dtype.itemsize)
    if point_filter is PointFilter.NONE:
        return raw.view(dtype).reshape(columns, rows)
    grouped = raw.reshape(columns, dtype.itemsize, rows)
    interleaved = np.empty((columns, rows, dtype.itemsize), np.uint8)
    for byte in range(dtype.itemsize):  # one plane at a time: much faster than a 3-D transpose copy
        interleaved[:, :, byte] = grouped[:, byte, :]
    values = interleaved.view(dtype).reshape(columns, rows)
    if point_filter is PointFilter.DELTA_SHUFFLE:
        values = np.cumsum(values, axis=1, dtype=dtype)  # wraps, inverting the wrapped differences
    return values


@dataclass(frozen=True)
class RawPointsCodec:
    """Early fusion: the raw scan, (N, 4) float32 x, y, z, intensity in the sensor frame.

    Default: int16 with one scale per column (error <= scale / 2, about 1.8 mm for a 120 m
    range), delta + shuffle filtered, zstd. FLOAT32 is lossless. ``point_filter=None`` picks
    DELTA_SHUFFLE for INT16 and SHUFFLE for the float formats.
    """

    fmt: ValueFormat = ValueFormat.INT16
    compression: Compression = Compression.ZSTD
    level: int | None = None
    point_filter: PointFilter | None = None
    codec_id: ClassVar[CodecId] = CodecId.RAW_POINTS
    _HEAD: ClassVar[str] = "<BBI"

    def __post_init__(self) -> None:
        _check_format(self.fmt, _POINT_FORMATS, "RawPointsCodec")
        if self.point_filter is None:
            default = PointFilter.DELTA_SHUFFLE if self.fmt.has_scales else PointFilter.SHUFFLE
            object.__setattr__(self, "point_filter", default)
        if self.point_filter is PointFilter.DELTA_SHUFFLE and not self.fmt.has_scales:
            raise ValueError("DELTA_SHUFFLE needs an integer format (float differences are not exact)")

    def encode(self, points: np.ndarray) -> bytes:
        pts = _float_matrix(points, 4, "points")
        q = quantize(pts, self.fmt)
        scales = b"" if q.scales is None else q.scales.astype("<f4").tobytes()
        values = _filter_columns(np.ascontiguousarray(q.values.T), self.point_filter)
        head = struct.pack(self._HEAD, int(self.fmt), int(self.point_filter), len(pts))
        return compress(head + scales + values, self.compression, self.level)

    @staticmethod
    def decode(payload: bytes) -> np.ndarray:
        """(N, 4) float32 points."""
        reader = _Reader(decompress(payload))
        fmt_value, filter_value, n = reader.unpack(RawPointsCodec._HEAD)
        fmt = _format(fmt_value, _POINT_FORMATS, "RAW_POINTS")
        if filter_value not in {int(f) for f in PointFilter}:
            raise DecodeError(f"RAW_POINTS: unknown filter {filter_value}")
        point_filter = PointFilter(filter_value)
        if point_filter is PointFilter.DELTA_SHUFFLE and not fmt.has_scales:
            raise DecodeError("RAW_POINTS: DELTA_SHUFFLE with a float format")
        scales = _read_scales(reader, fmt, 4)
        values = _unfilter_columns(reader, fmt.dtype, 4, n, point_filter)
        reader.finish()
        points = dequantize(Quantized(fmt, values.T, scales))
        if not np.all(np.isfinite(points)):
            raise DecodeError("non-finite values")
        return np.ascontiguousarray(points)

    def max_abs_error(self, points: np.ndarray) -> np.ndarray:
        """(N, 4) bound on the round-trip error of each value."""
        return max_abs_error(_float_matrix(points, 4, "points"), self.fmt)


@dataclass(frozen=True)
class KeypointFeaturesCodec:
    """K keypoints (xyz) with C features each, as COOPERNAUT sends (128 x 128 there).

    Default: xyz float32, features float16, zstd.
    """

    xyz_fmt: ValueFormat = ValueFormat.FLOAT32
    feature_fmt: ValueFormat = ValueFormat.FLOAT16
    compression: Compression = Compression.ZSTD
    level: int | None = None
    codec_id: ClassVar[CodecId] = CodecId.KEYPOINT_FEATURES
    _HEAD: ClassVar[str] = "<BBIH"

    def __post_init__(self) -> None:
        _check_format(self.xyz_fmt, _POINT_FORMATS, "KeypointFeaturesCodec xyz")
        _check_format(self.feature_fmt, _ALL_FORMATS, "KeypointFeaturesCodec features")

    def _validate(self, data: KeypointFeatures) -> tuple[np.ndarray, np.ndarray]:
        xyz = _float_matrix(data.xyz, 3, "xyz")
        features = _float_matrix(data.features, None, "features")
        if len(features) != len(xyz):
            raise ValueError(f"{len(xyz)} keypoints but {len(features)} feature rows")
        if not 1 <= features.shape[1] <= MAX_CHANNELS:
            raise ValueError(f"feature channels must be in [1, {MAX_CHANNELS}], got {features.shape[1]}")
        return xyz, features

    def encode(self, data: KeypointFeatures) -> bytes:
        xyz, features = self._validate(data)
        xyz_scales, xyz_values = _write_matrix(quantize(xyz, self.xyz_fmt))
        f_scales, f_values = _write_matrix(quantize(features, self.feature_fmt))
        head = struct.pack(
            self._HEAD, int(self.xyz_fmt), int(self.feature_fmt), len(xyz), features.shape[1]
        )
        return compress(head + xyz_scales + f_scales + xyz_values + f_values, self.compression, self.level)

    @staticmethod
    def decode(payload: bytes) -> KeypointFeatures:
        reader = _Reader(decompress(payload))
        xyz_value, feature_value, k, channels = reader.unpack(KeypointFeaturesCodec._HEAD)
        xyz_fmt = _format(xyz_value, _POINT_FORMATS, "KEYPOINT_FEATURES xyz")
        feature_fmt = _format(feature_value, _ALL_FORMATS, "KEYPOINT_FEATURES features")
        if not 1 <= channels <= MAX_CHANNELS:
            raise DecodeError(f"feature channels {channels} outside [1, {MAX_CHANNELS}]")
        xyz_scales = _read_scales(reader, xyz_fmt, 3)
        f_scales = _read_scales(reader, feature_fmt, channels)
        xyz = _read_matrix(reader, xyz_fmt, k, 3, xyz_scales)
        features = _read_matrix(reader, feature_fmt, k, channels, f_scales)
        reader.finish()
        return KeypointFeatures(xyz, features)

    def max_abs_error(self, data: KeypointFeatures) -> tuple[np.ndarray, np.ndarray]:
        """((K, 3), (K, C)) bounds on the round-trip error of xyz and features."""
        xyz, features = self._validate(data)
        return max_abs_error(xyz, self.xyz_fmt), max_abs_error(features, self.feature_fmt)


@dataclass(frozen=True)
class IntentCodec(KeypointFeaturesCodec):
    """A planned trajectory: T waypoints (``xyz``, sensor frame) with features (time offset s,
    speed m/s), strictly increasing offsets. Default: float16 values, no entropy coding (a dozen
    numbers gain less from it than its frame costs)."""

    xyz_fmt: ValueFormat = ValueFormat.FLOAT16
    feature_fmt: ValueFormat = ValueFormat.FLOAT16
    compression: Compression = Compression.NONE
    codec_id: ClassVar[CodecId] = CodecId.INTENT

    def _validate(self, data: KeypointFeatures) -> tuple[np.ndarray, np.ndarray]:
        xyz, features = super()._validate(data)
        if len(xyz) == 0 or features.shape[1] != 2:
            raise ValueError(f"an intent has >= 1 waypoint with 2 features, got {features.shape}")
        if np.any(np.diff(features[:, 0]) <= 0):
            raise ValueError("intent waypoint time offsets must increase")
        return xyz, features

    @staticmethod
    def decode(payload: bytes) -> KeypointFeatures:
        body = KeypointFeaturesCodec.decode(payload)
        if len(body.xyz) == 0 or body.features.shape[1] != 2:
            raise DecodeError(f"an intent has >= 1 waypoint with 2 features, got {body.features.shape}")
        if np.any(np.diff(body.features[:, 0].astype(np.float64)) <= 0):
            raise DecodeError("intent waypoint times must increase")
        return body


@dataclass(frozen=True)
class SparseBEVCodec:
    """Top-k cells of a BEV feature map with their indices. Default: float16 features, zstd."""

    fmt: ValueFormat = ValueFormat.FLOAT16
    compression: Compression = Compression.ZSTD
    level: int | None = None
    codec_id: ClassVar[CodecId] = CodecId.SPARSE_BEV
    _HEAD: ClassVar[str] = "<HHHIB"

    def __post_init__(self) -> None:
        _check_format(self.fmt, _ALL_FORMATS, "SparseBEVCodec")

    @staticmethod
    def _validate(data: SparseBEV) -> tuple[int, int, np.ndarray, np.ndarray]:
        height, width = (int(v) for v in data.grid_shape)
        if not (1 <= height <= _UINT16_MAX and 1 <= width <= _UINT16_MAX):
            raise ValueError(f"grid_shape must be within [1, {_UINT16_MAX}]^2, got {data.grid_shape}")
        indices = np.asarray(data.indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
        features = _float_matrix(data.features, None, "features")
        if len(features) != len(indices):
            raise ValueError(f"{len(indices)} indices but {len(features)} feature rows")
        if not 1 <= features.shape[1] <= MAX_CHANNELS:
            raise ValueError(f"feature channels must be in [1, {MAX_CHANNELS}], got {features.shape[1]}")
        if len(indices) and (
            indices[0] < 0 or indices[-1] >= height * width or np.any(np.diff(indices) <= 0)
        ):
            raise ValueError("indices must be strictly increasing and inside the grid")
        return height, width, indices.astype(np.int64), features

    def encode(self, data: SparseBEV) -> bytes:
        height, width, indices, features = self._validate(data)
        scales, values = _write_matrix(quantize(features, self.fmt))
        deltas = np.diff(indices, prepend=0).astype("<u4")
        head = struct.pack(self._HEAD, height, width, features.shape[1], len(indices), int(self.fmt))
        return compress(head + scales + deltas.tobytes() + values, self.compression, self.level)

    @staticmethod
    def decode(payload: bytes) -> SparseBEV:
        reader = _Reader(decompress(payload))
        height, width, channels, k, fmt_value = reader.unpack(SparseBEVCodec._HEAD)
        fmt = _format(fmt_value, _ALL_FORMATS, "SPARSE_BEV")
        if height < 1 or width < 1:
            raise DecodeError(f"empty grid {height} x {width}")
        if not 1 <= channels <= MAX_CHANNELS:
            raise DecodeError(f"feature channels {channels} outside [1, {MAX_CHANNELS}]")
        if k > height * width:
            raise DecodeError(f"{k} cells in a {height} x {width} grid")
        scales = _read_scales(reader, fmt, channels)
        deltas = reader.array("<u4", k).astype(np.int64)
        if k and np.any(deltas[1:] == 0):
            raise DecodeError("cell indices must be strictly increasing")
        indices = np.cumsum(deltas)
        if k and indices[-1] >= height * width:
            raise DecodeError(f"cell index {indices[-1]} outside the {height} x {width} grid")
        features = _read_matrix(reader, fmt, k, channels, scales)
        reader.finish()
        return SparseBEV((height, width), indices, features)

    @staticmethod
    def uncompressed_nbytes(k: int, channels: int, fmt: ValueFormat) -> int:
        """Payload bytes for k cells with Compression.NONE (exact); what request-driven sending
        plans with."""
        scales = 4 * channels if fmt.has_scales else 0
        return 5 + struct.calcsize(SparseBEVCodec._HEAD) + scales + k * (4 + channels * fmt.dtype.itemsize)

    def max_abs_error(self, data: SparseBEV) -> np.ndarray:
        """(k, C) bound on the round-trip error of each feature."""
        return max_abs_error(self._validate(data)[3], self.fmt)


@dataclass(frozen=True)
class DetectionsCodec:
    """Late fusion: boxes, scores, labels. Default: float32 (lossless for float32 input), no
    entropy coding (a few dozen boxes do not repay a zstd frame header)."""

    fmt: ValueFormat = ValueFormat.FLOAT32
    compression: Compression = Compression.NONE
    level: int | None = None
    codec_id: ClassVar[CodecId] = CodecId.DETECTIONS
    _HEAD: ClassVar[str] = "<BI"

    def __post_init__(self) -> None:
        _check_format(self.fmt, _BOX_FORMATS, "DetectionsCodec")

    @staticmethod
    def _validate(data: DetectionSet) -> tuple[np.ndarray, np.ndarray]:
        boxes = _float_matrix(data.boxes, 7, "boxes")
        scores = np.asarray(data.scores).reshape(-1)
        labels = np.asarray(data.labels).reshape(-1)
        if not (len(scores) == len(labels) == len(boxes)):
            raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer) or np.any((labels < 0) | (labels > 255)):
            raise ValueError("labels must be integers in [0, 255]")
        return np.concatenate([boxes, scores[:, None]], axis=1), labels

    def encode(self, data: DetectionSet) -> bytes:
        matrix, labels = self._validate(data)
        scales, values = _write_matrix(quantize(matrix, self.fmt))
        head = struct.pack(self._HEAD, int(self.fmt), len(matrix))
        body = head + scales + values + labels.astype(np.uint8).tobytes()
        return compress(body, self.compression, self.level)

    @staticmethod
    def decode(payload: bytes) -> DetectionSet:
        reader = _Reader(decompress(payload))
        fmt_value, m = reader.unpack(DetectionsCodec._HEAD)
        fmt = _format(fmt_value, _BOX_FORMATS, "DETECTIONS")
        scales = _read_scales(reader, fmt, 8)
        matrix = _read_matrix(reader, fmt, m, 8, scales)
        labels = reader.array(np.uint8, m).astype(np.int64)
        reader.finish()
        return DetectionSet(np.ascontiguousarray(matrix[:, :7]), matrix[:, 7].copy(), labels)

    def max_abs_error(self, data: DetectionSet) -> tuple[np.ndarray, np.ndarray]:
        """((M, 7), (M,)) bounds on the round-trip error of boxes and scores (labels are exact)."""
        bound = max_abs_error(self._validate(data)[0], self.fmt)
        return bound[:, :7], bound[:, 7]


@dataclass(frozen=True)
class RequestMapCodec:
    """A receiver's request: (H, W) bool, True where it asks for features. Default: zstd."""

    compression: Compression = Compression.ZSTD
    level: int | None = None
    codec_id: ClassVar[CodecId] = CodecId.REQUEST_MAP
    _HEAD: ClassVar[str] = "<HH"

    def encode(self, mask: np.ndarray) -> bytes:
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != np.bool_:
            raise ValueError(f"mask must be a 2-D bool array, got {mask.dtype} {mask.shape}")
        height, width = mask.shape
        if not (1 <= height <= _UINT16_MAX and 1 <= width <= _UINT16_MAX):
            raise ValueError(f"mask shape must be within [1, {_UINT16_MAX}]^2, got {mask.shape}")
        body = struct.pack(self._HEAD, height, width) + np.packbits(mask.reshape(-1)).tobytes()
        return compress(body, self.compression, self.level)

    @staticmethod
    def decode(payload: bytes) -> np.ndarray:
        """(H, W) bool mask."""
        reader = _Reader(decompress(payload))
        height, width = reader.unpack(RequestMapCodec._HEAD)
        if height < 1 or width < 1:
            raise DecodeError(f"empty request map {height} x {width}")
        n = height * width
        packed = reader.array(np.uint8, (n + 7) // 8)
        reader.finish()
        bits = np.unpackbits(packed)
        if np.any(bits[n:]):
            raise DecodeError("request map pad bits must be zero")
        return bits[:n].astype(bool).reshape(height, width)


Codec = RawPointsCodec | KeypointFeaturesCodec | SparseBEVCodec | DetectionsCodec | RequestMapCodec | IntentCodec
Decoded = np.ndarray | KeypointFeatures | SparseBEV | DetectionSet


def decode_payload(codec: CodecId | int, payload: bytes) -> Decoded:
    """Parse a payload given the codec id from its message header.

    Raises:
        DecodeError: any malformed payload or unknown codec id.
    """
    match int(codec):
        case CodecId.RAW_POINTS:
            return RawPointsCodec.decode(payload)
        case CodecId.KEYPOINT_FEATURES:
            return KeypointFeaturesCodec.decode(payload)
        case CodecId.SPARSE_BEV:
            return SparseBEVCodec.decode(payload)
        case CodecId.DETECTIONS:
            return DetectionsCodec.decode(payload)
        case CodecId.REQUEST_MAP:
            return RequestMapCodec.decode(payload)
        case CodecId.INTENT:
            return IntentCodec.decode(payload)
    raise DecodeError(f"unknown codec id {codec}")

