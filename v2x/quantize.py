"""Value formats for codec payloads: float32, float16, and symmetric per-channel int16 / int8.

Every codec stores its arrays as an ``(N, C)`` matrix in one :class:`ValueFormat`. The integer
formats keep one float32 scale per column (channel): ``scale_c = max_n |x[n, c]| / qmax`` with
``qmax = 32767`` (int16) or ``127`` (int8), ``q = round(x / scale_c)``, and the decoder returns
``q * scale_c``. Error bounds, for float32 input ``x`` (see :func:`max_abs_error`):

- FLOAT32: exact.
- FLOAT16: ``|x| <= 65504`` is required; the error is at most half a float16 unit in the last
  place: ``max(|x| * 2**-11, 2**-25)`` (the second term covers float16 subnormals).
- INT16 / INT8: ``scale_c / 2`` from rounding, plus float32 rounding of the product
  ``q * scale_c`` (relative, or absolute among float32 subnormals):
  ``scale_c / 2 + 2**-23 * (|x| + scale_c) + 2**-149``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FLOAT16_MAX",
    "Quantized",
    "ValueFormat",
    "channel_scales",
    "dequantize",
    "max_abs_error",
    "quantize",
]

FLOAT16_MAX = 65504.0


class ValueFormat(enum.IntEnum):
    """How a codec stores floating-point values. The integer value is written on the wire."""

    FLOAT32 = 0
    FLOAT16 = 1
    INT16 = 2
    """symmetric, one float32 scale per channel"""
    INT8 = 3
    """symmetric, one float32 scale per channel"""

    @property
    def dtype(self) -> np.dtype:
        """Little-endian storage dtype."""
        return np.dtype(_DTYPES[self])

    @property
    def has_scales(self) -> bool:
        return self in (ValueFormat.INT16, ValueFormat.INT8)

    @property
    def qmax(self) -> int:
        """Largest stored magnitude of an integer format."""
        if not self.has_scales:
            raise ValueError(f"{self.name} has no integer range")
        return int(np.iinfo(self.dtype).max)


_DTYPES = {
    ValueFormat.FLOAT32: "<f4",
    ValueFormat.FLOAT16: "<f2",
    ValueFormat.INT16: "<i2",
    ValueFormat.INT8: "i1",
}


@dataclass(frozen=True)
class Quantized:
    """An ``(N, C)`` matrix in storage form.

    Attributes:
        fmt: the format.
        values: (N, C) array of ``fmt.dtype``.
        scales: (C,) float32 per-channel scales for the integer formats, None otherwise.
    """

    fmt: ValueFormat
    values: np.ndarray
    scales: np.ndarray | None


def _as_matrix(x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"expected an (N, C) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite (as float32)")
    return arr


def _peaks(columns: np.ndarray) -> np.ndarray:
    """(C,) float64 largest magnitude of each row of a (C, N) array (0 for N = 0)."""
    if columns.shape[1] == 0:
        return np.zeros(len(columns))
    return np.maximum(columns.max(axis=1), -columns.min(axis=1)).astype(np.float64)


def _scales_from_peaks(peak: np.ndarray, fmt: ValueFormat) -> np.ndarray:
    scales = (peak / fmt.qmax).astype(np.float32)
    # Rounding to float32 may leave scale * qmax just below the peak, and the peak would then be
    # clipped; one step up fixes that (and lifts scales that underflowed to zero).
    low = scales.astype(np.float64) * fmt.qmax < peak
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    # A zero scale would make q undefined; any positive scale decodes an all-zero channel exactly.
    scales[peak == 0] = 1.0
    return scales


def channel_scales(x: np.ndarray, fmt: ValueFormat) -> np.ndarray:
    """(C,) float32 per-channel scales for an integer format; 1.0 for all-zero channels."""
    return _scales_from_peaks(_peaks(np.ascontiguousarray(_as_matrix(x).T)), fmt)


def quantize(x: np.ndarray, fmt: ValueFormat) -> Quantized:
    """Store an (N, C) float array in ``fmt``.

    The work is done channel by channel on a (C, N) copy (numpy reduces a contiguous row much
    faster than a strided column), and ``values`` is returned as an (N, C) view of it, so
    ``values.T`` is contiguous for the codecs' channel-by-channel layout.

    Raises:
        ValueError: non-finite values, or FLOAT16 values beyond +-65504.
    """
    columns = np.ascontiguousarray(_as_matrix(x).T)  # (C, N) float32
    match fmt:
        case ValueFormat.FLOAT32:
            return Quantized(fmt, columns.astype("<f4", copy=False).T, None)
        case ValueFormat.FLOAT16:
            if columns.size and float(_peaks(columns).max()) > FLOAT16_MAX:
                raise ValueError(f"FLOAT16 holds |x| <= {FLOAT16_MAX}, got {_peaks(columns).max()}")
            return Quantized(fmt, columns.astype("<f2").T, None)
        case ValueFormat.INT16 | ValueFormat.INT8:
            scales = _scales_from_peaks(_peaks(columns), fmt)
            # float64 so that x / scale is exact enough for the scale / 2 bound; the scales make
            # |x / scale| <= qmax, and the clip only guards against rounding at the boundary.
            q = np.rint(columns / scales.astype(np.float64)[:, None])
            np.clip(q, -fmt.qmax, fmt.qmax, out=q)
            return Quantized(fmt, q.astype(fmt.dtype).T, scales)
    raise ValueError(f"unknown format {fmt!r}")


def dequantize(q: Quantized) -> np.ndarray:
    """(N, C) float32 values back from storage form."""
    if q.fmt.has_scales:
        if q.scales is None:
            raise ValueError(f"{q.fmt.name} needs scales")
        with np.errstate(over="ignore"):  # overflow gives inf, which decoders reject
            return q.values.astype(np.float32) * q.scales.astype(np.float32)[None, :]
    return q.values.astype(np.float32)


def max_abs_error(x: np.ndarray, fmt: ValueFormat) -> np.ndarray:
    """(N, C) bound on ``|dequantize(quantize(x, fmt)) - x|`` for x taken as float32."""
    arr = _as_matrix(x).astype(np.float64)
    match fmt:
        case ValueFormat.FLOAT32:
            return np.zeros_like(arr)
        case ValueFormat.FLOAT16:
            return np.maximum(np.abs(arr) * 2.0**-11, 2.0**-25)
        case ValueFormat.INT16 | ValueFormat.INT8:
            scales = channel_scales(arr, fmt).astype(np.float64)
            return np.broadcast_to(scales / 2, arr.shape) + 2.0**-23 * (np.abs(arr) + scales) + 2.0**-149
    raise ValueError(f"unknown format {fmt!r}")
