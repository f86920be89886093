"""Value formats: stated error bounds hold, lossless stays exact, bad input is refused."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from v2x.quantize import FLOAT16_MAX, ValueFormat, channel_scales, dequantize, max_abs_error, quantize


def matrices(max_abs: float):
    return st.integers(1, 6).flatmap(
        lambda c: arrays(
            np.float32,
            st.tuples(st.integers(0, 40), st.just(c)),
            elements=st.floats(-float(np.float32(max_abs)), float(np.float32(max_abs)), width=32),
        )
    )


@settings(max_examples=150, deadline=None)
@given(matrices(1e6), st.sampled_from([ValueFormat.FLOAT32, ValueFormat.INT16, ValueFormat.INT8]))
# the smallest normal float32: its scale is subnormal and rounds below peak / qmax
@example(np.array([[np.finfo(np.float32).tiny]], np.float32), ValueFormat.INT16)
def test_round_trip_error_within_stated_bound(x, fmt):
    q = quantize(x, fmt)
    assert q.values.dtype == fmt.dtype and q.values.shape == x.shape
    err = np.abs(dequantize(q).astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= max_abs_error(x, fmt))


@settings(max_examples=150, deadline=None)
@given(matrices(FLOAT16_MAX))
def test_float16_error_within_half_ulp(x):
    err = np.abs(dequantize(quantize(x, ValueFormat.FLOAT16)).astype(np.float64) - x)
    assert np.all(err <= max_abs_error(x, ValueFormat.FLOAT16))


@settings(max_examples=100, deadline=None)
@given(matrices(1e30))
def test_float32_is_exact(x):
    np.testing.assert_array_equal(dequantize(quantize(x, ValueFormat.FLOAT32)), x)


@pytest.mark.parametrize("fmt", [ValueFormat.INT16, ValueFormat.INT8])
def test_integer_formats_use_the_full_range_per_channel(fmt):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)).astype(np.float32) * np.array([0.01, 1.0, 100.0], np.float32)
    q = quantize(x, fmt)
    # each channel's largest magnitude maps to qmax, so small channels keep their resolution
    assert np.all(np.abs(q.values).max(axis=0) == fmt.qmax)
    np.testing.assert_allclose(q.scales, np.abs(x).max(axis=0) / fmt.qmax, rtol=1e-6)
    err = np.abs(dequantize(q) - x).max(axis=0)
    assert np.all(err <= q.scales / 2 * (1 + 1e-5))


def test_zero_channel_is_exact_and_has_positive_scale():
    x = np.zeros((10, 2), np.float32)
    x[:, 1] = np.linspace(-1, 1, 10)
    scales = channel_scales(x, ValueFormat.INT8)
    assert scales[0] > 0
    np.testing.assert_array_equal(dequantize(quantize(x, ValueFormat.INT8))[:, 0], 0.0)


def test_float16_overflow_is_refused():
    with pytest.raises(ValueError, match="FLOAT16"):
        quantize(np.array([[70000.0]], np.float32), ValueFormat.FLOAT16)


@pytest.mark.parametrize(
    "bad", [np.array([[np.nan]]), np.array([[np.inf]]), np.zeros(3), np.zeros((2, 2, 2))]
)
def test_bad_input_is_refused(bad):
    with pytest.raises(ValueError):
        quantize(bad, ValueFormat.INT16)
