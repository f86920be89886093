"""Codecs: exact round trips for lossless settings, stated bounds for lossy ones, strict decoding."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from v2x.codecs import (
    DetectionsCodec,
    DetectionSet,
    IntentCodec,
    KeypointFeatures,
    KeypointFeaturesCodec,
    PointFilter,
    RawPointsCodec,
    RequestMapCodec,
    SparseBEV,
    SparseBEVCodec,
    decode_payload,
)
from v2x.entropy import Compression, compress
from v2x.message import CodecId, DecodeError
from v2x.quantize import ValueFormat

COMPRESSIONS = list(Compression)
LOSSY = [ValueFormat.FLOAT16, ValueFormat.INT16, ValueFormat.INT8]


def f32(lo: float, hi: float):
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)


def points():
    return arrays(np.float32, st.tuples(st.integers(0, 300), st.just(4)), elements=f32(-150, 150))


def _scan(n=2000, seed=0) -> np.ndarray:
    """A LiDAR-like scan: rings of points around the sensor, intensity in [0, 1]."""
    rng = np.random.default_rng(seed)
    azimuth = np.linspace(-np.pi, np.pi, n, endpoint=False)
    rng_m = rng.uniform(2, 100, n)
    z = rng.uniform(-2, 1, n)
    return np.stack(
        [rng_m * np.cos(azimuth), rng_m * np.sin(azimuth), z, rng.uniform(0, 1, n)], axis=1
    ).astype(np.float32)


# ------------------------------------------------------------------------------------- raw points


@settings(max_examples=60, deadline=None)
@given(points(), st.sampled_from(COMPRESSIONS))
def test_raw_points_float32_is_lossless(pts, compression):
    payload = RawPointsCodec(ValueFormat.FLOAT32, compression).encode(pts)
    out = decode_payload(CodecId.RAW_POINTS, payload)
    assert out.dtype == np.float32 and out.shape == pts.shape
    np.testing.assert_array_equal(out, pts)


@settings(max_examples=60, deadline=None)
@given(points(), st.sampled_from([ValueFormat.FLOAT16, ValueFormat.INT16]), st.sampled_from(COMPRESSIONS))
def test_raw_points_lossy_within_bound(pts, fmt, compression):
    codec = RawPointsCodec(fmt, compression)
    out = RawPointsCodec.decode(codec.encode(pts))
    assert np.all(np.abs(out.astype(np.float64) - pts) <= codec.max_abs_error(pts))


def test_raw_points_default_is_millimetre_accurate_and_smaller():
    scan = _scan()
    default, lossless = RawPointsCodec(), RawPointsCodec(ValueFormat.FLOAT32, Compression.NONE)
    out = RawPointsCodec.decode(default.encode(scan))
    # |x| <= 100 m, so the int16 step is at most 100 / 32767 m and the error half of that
    assert np.abs(out[:, :3] - scan[:, :3]).max() <= 0.5 * 100 / 32767 + 1e-6
    # int16 halves the values; zstd may gain nothing on this noisy scan but costs only its frame
    assert len(default.encode(scan)) <= len(lossless.encode(scan)) / 2 + 64
    # uncompressed size is exact arithmetic: prefix + header + 4 columns of float32
    assert len(lossless.encode(scan)) == 5 + 6 + 16 * len(scan)


@pytest.mark.parametrize("point_filter", list(PointFilter))
@pytest.mark.parametrize("fmt", [ValueFormat.INT16, ValueFormat.FLOAT16, ValueFormat.FLOAT32])
def test_point_filters_are_lossless_transforms(point_filter, fmt):
    scan = _scan(n=777, seed=4)
    scan[100:110] = [[150.0, -150.0, 3.0, 1.0]] * 10  # large jumps: int16 differences wrap around
    scan[110] = [-150.0, 150.0, -3.0, 0.0]
    if point_filter is PointFilter.DELTA_SHUFFLE and fmt is not ValueFormat.INT16:
        with pytest.raises(ValueError):
            RawPointsCodec(fmt, point_filter=point_filter)
        return
    unfiltered = RawPointsCodec(fmt, Compression.NONE, point_filter=PointFilter.NONE)
    reference = RawPointsCodec.decode(unfiltered.encode(scan))
    for compression in COMPRESSIONS:
        payload = RawPointsCodec(fmt, compression, point_filter=point_filter).encode(scan)
        np.testing.assert_array_equal(RawPointsCodec.decode(payload), reference)


def test_delta_shuffle_shrinks_an_ordered_scan():
    scan = _scan(n=5000, seed=5)
    order = np.lexsort((np.arctan2(scan[:, 1], scan[:, 0]),))
    smooth = scan[order].copy()
    smooth[:, :2] *= (1.0 / np.linalg.norm(smooth[:, :2], axis=1, keepdims=True)) * 20.0  # a ring of 20 m
    plain = RawPointsCodec(point_filter=PointFilter.NONE).encode(smooth)
    filtered = RawPointsCodec(point_filter=PointFilter.DELTA_SHUFFLE).encode(smooth)
    assert len(filtered) < 0.8 * len(plain)


@pytest.mark.parametrize(
    ("fmt", "point_filter"), [(ValueFormat.FLOAT32, 2), (ValueFormat.INT16, 3), (ValueFormat.INT16, 255)]
)
def test_raw_points_refuses_bad_filters_on_the_wire(fmt, point_filter):
    body = struct.pack("<BBI", int(fmt), point_filter, 1)
    body += (struct.pack("<4f", 1, 1, 1, 1) if fmt.has_scales else b"") + bytes(4 * fmt.dtype.itemsize)
    with pytest.raises(DecodeError, match="RAW_POINTS"):
        decode_payload(CodecId.RAW_POINTS, compress(body, Compression.NONE))


def test_raw_points_refuses_int8_and_bad_shapes():
    with pytest.raises(ValueError):
        RawPointsCodec(ValueFormat.INT8)
    with pytest.raises(ValueError):
        RawPointsCodec().encode(np.zeros((5, 3), np.float32))


# -------------------------------------------------------------------------------------- keypoints


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(1, 24),
    st.sampled_from(list(ValueFormat)),
    st.sampled_from(COMPRESSIONS),
    st.integers(0, 2**31),
)
def test_keypoint_features_round_trip(k, c, feature_fmt, compression, seed):
    rng = np.random.default_rng(seed)
    data = KeypointFeatures(
        rng.uniform(-80, 80, (k, 3)).astype(np.float32), rng.normal(0, 3, (k, c)).astype(np.float32)
    )
    codec = KeypointFeaturesCodec(ValueFormat.FLOAT32, feature_fmt, compression)
    out = decode_payload(CodecId.KEYPOINT_FEATURES, codec.encode(data))
    np.testing.assert_array_equal(out.xyz, data.xyz)
    xyz_bound, feature_bound = codec.max_abs_error(data)
    assert np.all(xyz_bound == 0)
    assert np.all(np.abs(out.features.astype(np.float64) - data.features) <= feature_bound)
    if feature_fmt is ValueFormat.FLOAT32:
        np.testing.assert_array_equal(out.features, data.features)


def test_coopernaut_sized_message_bytes():
    rng = np.random.default_rng(1)
    data = KeypointFeatures(
        rng.normal(size=(128, 3)).astype(np.float32), rng.normal(size=(128, 128)).astype(np.float32)
    )
    raw = KeypointFeaturesCodec(ValueFormat.FLOAT32, ValueFormat.FLOAT32, Compression.NONE).encode(data)
    # 128 x (3 + 128) float32 = 67,072 bytes of values, plus a 5-byte prefix and 8-byte header
    assert len(raw) == 128 * 131 * 4 + 5 + 8
    int8 = KeypointFeaturesCodec(ValueFormat.FLOAT32, ValueFormat.INT8, Compression.NONE).encode(data)
    assert len(int8) == 128 * 3 * 4 + 128 * 4 + 128 * 128 + 5 + 8


def test_keypoints_mismatched_rows_are_refused():
    with pytest.raises(ValueError):
        KeypointFeaturesCodec().encode(KeypointFeatures(np.zeros((3, 3)), np.zeros((4, 8))))


# ------------------------------------------------------------------------------------- sparse BEV


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(1, 30),
    st.integers(1, 8),
    st.sampled_from(list(ValueFormat)),
    st.sampled_from(COMPRESSIONS),
    st.integers(0, 2**31),
)
def test_sparse_bev_round_trip(h, w, c, fmt, compression, seed):
    rng = np.random.default_rng(seed)
    bev = rng.normal(size=(c, h, w)).astype(np.float32)
    score = rng.uniform(size=(h, w))
    k = int(rng.integers(0, h * w + 1))
    data = SparseBEV.from_dense_topk(bev, score, k)
    codec = SparseBEVCodec(fmt, compression)
    out = decode_payload(CodecId.SPARSE_BEV, codec.encode(data))
    assert out.grid_shape == (h, w)
    np.testing.assert_array_equal(out.indices, data.indices)
    assert np.all(np.abs(out.features.astype(np.float64) - data.features) <= codec.max_abs_error(data))
    if compression is Compression.NONE:
        assert len(codec.encode(data)) == SparseBEVCodec.uncompressed_nbytes(k, c, fmt)


def test_top_k_keeps_the_highest_scores_and_densifies_back():
    rng = np.random.default_rng(3)
    bev = rng.normal(size=(4, 10, 12)).astype(np.float32)
    score = rng.uniform(size=(10, 12))
    data = SparseBEV.from_dense_topk(bev, score, 15)
    kept = score.reshape(-1)[data.indices]
    dropped = np.delete(score.reshape(-1), data.indices)
    assert kept.min() >= dropped.max()
    dense = data.to_dense()
    mask = np.zeros(120, bool)
    mask[data.indices] = True
    np.testing.assert_array_equal(dense.reshape(4, -1)[:, mask], bev.reshape(4, -1)[:, mask])
    assert np.all(dense.reshape(4, -1)[:, ~mask] == 0)


def test_sparse_bev_refuses_unsorted_or_outside_indices():
    feats = np.zeros((2, 3), np.float32)
    for indices in ([5, 5], [6, 2], [-1, 3], [3, 100]):
        with pytest.raises(ValueError):
            SparseBEVCodec().encode(SparseBEV((10, 10), np.array(indices), feats))


def _bev_body(h, w, c, k, fmt, deltas, features):
    return struct.pack("<HHHIB", h, w, c, k, fmt) + np.asarray(deltas, "<u4").tobytes() + features


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_bev_body(4, 4, 1, 2, 0, [3, 0], bytes(8)), id="repeated-index"),
        pytest.param(_bev_body(4, 4, 1, 2, 0, [3, 13], bytes(8)), id="index-outside-grid"),
        pytest.param(_bev_body(4, 4, 1, 17, 0, [0] * 17, bytes(68)), id="more-cells-than-grid"),
        pytest.param(_bev_body(0, 4, 1, 0, 0, [], b""), id="empty-grid"),
        pytest.param(_bev_body(4, 4, 0, 0, 0, [], b""), id="zero-channels"),
        pytest.param(_bev_body(4, 4, 1, 1, 7, [1], bytes(4)), id="unknown-format"),
        pytest.param(_bev_body(4, 4, 1, 1, 0, [1], bytes(5)), id="trailing-byte"),
        pytest.param(_bev_body(4, 4, 1, 1, 0, [1], bytes(3)), id="truncated"),
        pytest.param(_bev_body(4, 4, 1, 1, 0, [1], np.float32(np.nan).tobytes()), id="nan-feature"),
        pytest.param(_bev_body(4, 4, 1, 1, 3, [], np.float32(-1).tobytes() + bytes(5)), id="negative-scale"),
    ],
)
def test_malformed_sparse_bev_bodies_raise_decode_error(body):
    with pytest.raises(DecodeError):
        decode_payload(CodecId.SPARSE_BEV, compress(body, Compression.NONE))


# ------------------------------------------------------------------------------------- detections


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 60), st.sampled_from([ValueFormat.FLOAT32, ValueFormat.FLOAT16, ValueFormat.INT16]),
       st.sampled_from(COMPRESSIONS), st.integers(0, 2**31))
def test_detections_round_trip(m, fmt, compression, seed):
    rng = np.random.default_rng(seed)
    boxes = np.concatenate(
        [rng.uniform(-100, 100, (m, 2)), rng.uniform(-3, 1, (m, 1)), rng.uniform(0.5, 12, (m, 3)),
         rng.uniform(-np.pi, np.pi, (m, 1))], axis=1
    ).astype(np.float32)
    data = DetectionSet(boxes, rng.uniform(0, 1, m).astype(np.float32), rng.integers(0, 256, m))
    codec = DetectionsCodec(fmt, compression)
    out = decode_payload(CodecId.DETECTIONS, codec.encode(data))
    np.testing.assert_array_equal(out.labels, data.labels)
    box_bound, score_bound = codec.max_abs_error(data)
    assert np.all(np.abs(out.boxes.astype(np.float64) - boxes) <= box_bound)
    assert np.all(np.abs(out.scores.astype(np.float64) - data.scores) <= score_bound)
    if fmt is ValueFormat.FLOAT32:
        np.testing.assert_array_equal(out.boxes, boxes)


def test_detections_refuse_bad_labels():
    with pytest.raises(ValueError):
        DetectionsCodec().encode(DetectionSet(np.zeros((1, 7)), np.zeros(1), np.array([300])))
    with pytest.raises(ValueError):
        DetectionsCodec().encode(DetectionSet(np.zeros((2, 7)), np.zeros(1), np.zeros(2, int)))


# ------------------------------------------------------------------------------------ request map


@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))), st.sampled_from(COMPRESSIONS))
def test_request_map_round_trip(mask, compression):
    out = decode_payload(CodecId.REQUEST_MAP, RequestMapCodec(compression).encode(mask))
    np.testing.assert_array_equal(out, mask)


def test_request_map_pad_bits_must_be_zero():
    body = struct.pack("<HH", 3, 3) + bytes([0xFF, 0x81])  # 9 cells: the 7 pad bits must be 0
    with pytest.raises(DecodeError, match="pad"):
        decode_payload(CodecId.REQUEST_MAP, compress(body, Compression.NONE))


def test_unknown_codec_id_raises_decode_error():
    with pytest.raises(DecodeError):
        decode_payload(77, compress(b"", Compression.NONE))


def test_intent_codec_round_trip_and_checks():
    """INTENT: waypoints with (time offset, speed), float16 without entropy coding by default; the
    body must hold >= 1 waypoint with exactly 2 features and increasing offsets, on both ends."""
    data = KeypointFeatures(
        np.array([[4.0, 0.5, -1.7], [8.0, 1.0, -1.7], [12.5, 1.5, -1.7]], np.float32),
        np.array([[0.5, 10.0], [1.0, 10.5], [1.5, 11.0]], np.float32),
    )
    codec = IntentCodec()
    payload = codec.encode(data)
    assert len(payload) == 5 + 8 + 10 * 3  # entropy prefix + head + float16 values
    out = decode_payload(CodecId.INTENT, payload)
    xyz_bound, feature_bound = codec.max_abs_error(data)
    assert np.all(np.abs(out.xyz.astype(np.float64) - data.xyz) <= xyz_bound)
    assert np.all(np.abs(out.features.astype(np.float64) - data.features) <= feature_bound)
    with pytest.raises(ValueError, match="2 features"):
        codec.encode(KeypointFeatures(data.xyz, np.ones((3, 3), np.float32)))
    with pytest.raises(ValueError, match="must increase"):
        codec.encode(KeypointFeatures(data.xyz, data.features[::-1].copy()))
    # a perception keypoint body is not an intent
    keypoints = KeypointFeaturesCodec().encode(KeypointFeatures(data.xyz, np.ones((3, 5), np.float32)))
    with pytest.raises(DecodeError, match="2 features"):
        decode_payload(CodecId.INTENT, keypoints)
    reversed_times = KeypointFeaturesCodec(ValueFormat.FLOAT16, ValueFormat.FLOAT16, Compression.NONE).encode(
        KeypointFeatures(data.xyz, data.features[::-1].copy())
    )
    with pytest.raises(DecodeError, match="must increase"):
        decode_payload(CodecId.INTENT, reversed_times)
