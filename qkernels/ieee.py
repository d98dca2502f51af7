r"""Reading and writing float32 containers of codes with integer operations only.

qtrain hands tensors between layers as float32 values ``code * 2**e`` (autograd needs float
tensors). These kernels treat such an array as what it is in memory, IEEE-754 bit patterns
(viewed as int32), and decode, round and encode them with shifts and masks:

.. math:: \text{bits} = s\,2^{31} + f\,2^{23} + m \;\mapsto\;
          (-1)^s \cdot (m + [f > 0]\,2^{23}) \cdot 2^{\max(f, 1) - 150}

so quantizing a container is one pass that never touches a floating-point unit (the LLVM IR
test covers these kernels too). Infinities and NaNs are not codes; they saturate.

* :func:`peak_exponent` -- the binary exponent ``E`` of the largest magnitude
  (``max|v| < 2**E``), from the largest bit pattern (IEEE order is integer order);
* :func:`quantize_f32` -- round every value to ``bits`` at exponent ``E - (bits - 1)``
  (nearest, ties up; or stochastic with the 24-bit counter-based fraction of
  :mod:`qkernels.quant`), saturate, count, and write the new container;
* :func:`quantize_f32_to_codes` -- the same rounding, writing integer codes (one pass where
  quantizing and converting would take two);
* :func:`f32_to_codes` / :func:`codes_to_f32` -- containers to integer codes and back
  (:func:`f32_to_codes_exact` refuses a container that is not codes of the width asked for,
  :func:`f32_to_codes_where` keeps only the elements a mask selects, :func:`codes_to_f32`
  can clip negative codes to 0: a ReLU and its backward fused into the conversions).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._jit import pick, serial_and_parallel
from .fixedpoint import bit_length
from .format import QTensor, check_array, check_bits, check_exp, code_dtype
from .quant import CHUNK, LANES, ROW_WIDTH, SR_BITS, QuantCounts, chunk_span, saturate_count
from .rng import check_first, check_stream_args, random_u64, stream_key

_ABS = np.int32(0x7FFFFFFF)
_MANT = np.int64(0x7FFFFF)
_NO_TOP = -(1 << 20)


@njit(cache=True, inline="always")
def _decode(b):
    """(signed mantissa, exponent) of float32 bits: value = mant * 2**exp."""
    b = np.int64(b)
    f = (b >> 23) & 0xFF
    m = b & _MANT
    if f > 0:
        m |= np.int64(1) << 23
    exp = max(f, np.int64(1)) - 150
    return (-m if b & (np.int64(1) << 31) else m), exp


@njit(cache=True, inline="always")
def _encode(code, exp):
    """float32 bits of ``code * 2**exp`` (|code| < 2**24; normal range assumed). Written
    without branches (selects only), so the loops that call it vectorize."""
    code = np.int64(code)
    a = abs(code)
    n = bit_length(a)
    bits = ((exp + n + 126) << 23) | ((a << (24 - n)) & _MANT) | ((code >> 63) & (1 << 31))
    bits = bits if code != 0 else np.int64(0)
    return np.int32(bits - ((bits >> 31) << 32))


def _peak_bits(bits):
    top = np.int32(0)
    for i in prange(bits.shape[0]):
        top = max(top, bits[i] & _ABS)
    return top


@njit(cache=True)
def _top_exponent(peak):
    if peak == 0:
        return np.int64(_NO_TOP)
    m, exp = _decode(peak)
    return exp + bit_length(m)


@njit(cache=True, inline="always")
def _code_at(b, e):
    """The code of float32 bits ``b`` at exponent ``e``: exact, or rounded half up. Selects
    instead of branches (as :func:`_decode` then ``round_shift``; right shifts capped at 40:
    a 24-bit mantissa shifted right by 25 or more rounds to 0 either way; left shifts at 38,
    far beyond any code of at most 31 bits, so the result stays inside int64)."""
    a = np.int64(b) & 0x7FFFFFFF
    f = a >> 23
    m = (a & _MANT) | ((f > 0) << 23)
    s = e - (max(f, np.int64(1)) - 150)
    neg = np.int64(b) >> 63  # 0 or -1
    m = (m ^ neg) - neg
    right = min(max(s, np.int64(1)), np.int64(40))
    return (m + (np.int64(1) << (right - 1))) >> right if s > 0 else m << min(-s, np.int64(38))


@njit(cache=True, inline="always")
def _nearest_element(b, e, q, up):
    """One element of :func:`_quantize_nearest`: (what to write, saturated?, rounded to
    zero?)."""
    code = _code_at(b, e)
    y = min(max(code, -q), q)
    value = _encode(y, e) if up < 0 else y << up
    return value, np.int32(y != code), np.int32((y == 0) & ((b & _ABS) != 0))


@njit(cache=True)
def _quantize_nearest_chunk(bits, out, e, q, up):
    """:func:`_quantize_nearest` of one chunk, counting into one running count per position of
    a block of :data:`~qkernels.quant.LANES` (a single count stops the loop vectorizing)."""
    sat = np.zeros(LANES, np.int32)
    zero = np.zeros(LANES, np.int32)
    whole = bits.shape[0] - bits.shape[0] % LANES
    for start in range(0, whole, LANES):
        block = bits[start:start + LANES]
        dst = out[start:start + LANES]
        for j in range(LANES):
            dst[j], s, z = _nearest_element(block[j], e, q, up)
            sat[j] += s
            zero[j] += z
    saturated = np.int64(sat.sum())
    zeroed = np.int64(zero.sum())
    for i in range(whole, bits.shape[0]):
        out[i], s, z = _nearest_element(bits[i], e, q, up)
        saturated += s
        zeroed += z
    return saturated, zeroed


def _quantize_nearest(bits, out, e, q, up):
    """Round to ``e`` (half up) and saturate; write a float32 container (``up < 0``), or the
    codes shifted left by ``up`` (codes at exponent ``e - up``). In chunks of
    :data:`~qkernels.quant.CHUNK` elements."""
    saturated = 0
    zeroed = 0
    for k in prange(-(-bits.shape[0] // CHUNK)):
        lo, hi = chunk_span(k, bits.shape[0])
        sat, zero = _quantize_nearest_chunk(bits[lo:hi], out[lo:hi], e, q, up)
        saturated += sat
        zeroed += zero
    return saturated, zeroed


def _quantize_stochastic(bits, out, e, q, key, first):
    saturated = 0
    zeroed = 0
    for i in prange(bits.shape[0]):
        m, exp = _decode(bits[i])
        up = exp - e + SR_BITS
        w = m << up if up >= 0 else (m >> -up if -up < 63 else (np.int64(-1) if m < 0 else 0))
        r = np.int64(random_u64(key, np.uint64(first) + np.uint64(i)) >> np.uint64(64 - SR_BITS))
        y = (w + r) >> SR_BITS
        y, sat, zero = saturate_count(y, m, q)
        saturated += sat
        zeroed += zero
        out[i] = _encode(y, e)
    return saturated, zeroed


def _to_codes(bits, out, e):
    for i in prange(bits.shape[0]):
        out[i] = _code_at(bits[i], e)


@njit(cache=True, inline="always")
def _inexact(b, e):
    """1 when float32 bits ``b`` are not a whole code at ``e`` (a set bit of the mantissa below
    ``2**e``), else 0."""
    a = np.int64(b) & 0x7FFFFFFF
    f = a >> 23
    m = (a & _MANT) | ((f > 0) << 23)
    s = e - (max(f, np.int64(1)) - 150)
    below = (np.int64(1) << min(max(s, np.int64(0)), np.int64(40))) - 1
    return np.int32((m & below) != 0)


@njit(cache=True)
def _to_codes_exact_chunk(bits, out, e):
    """:func:`_to_codes_exact` of one chunk (running counts per position, as
    :func:`_quantize_nearest_chunk`)."""
    inexact = np.zeros(LANES, np.int32)
    whole = bits.shape[0] - bits.shape[0] % LANES
    for start in range(0, whole, LANES):
        block = bits[start:start + LANES]
        dst = out[start:start + LANES]
        for j in range(LANES):
            inexact[j] += _inexact(block[j], e)
            dst[j] = _code_at(block[j], e)
    total = np.int64(inexact.sum())
    for i in range(whole, bits.shape[0]):
        total += _inexact(bits[i], e)
        out[i] = _code_at(bits[i], e)
    return total


def _to_codes_exact(bits, out, e):
    """:func:`_to_codes`, counting the values that are not a whole code at ``e``."""
    inexact = 0
    for k in prange(-(-bits.shape[0] // CHUNK)):
        lo, hi = chunk_span(k, bits.shape[0])
        inexact += _to_codes_exact_chunk(bits[lo:hi], out[lo:hi], e)
    return inexact


def _peak_bits_where(bits, mask):
    top = np.int32(0)
    for i in prange(bits.shape[0]):
        if mask[i] > 0:
            top = max(top, bits[i] & _ABS)
    return top


def _to_codes_where(bits, mask, out, e):
    for i in prange(bits.shape[0]):
        out[i] = _code_at(bits[i], e) if mask[i] > 0 else 0


def _from_codes(codes, out, e):
    for i in prange(codes.shape[0]):
        out[i] = _encode(np.int64(codes[i]), e)


def _from_codes_relu(codes, out, e):
    for i in prange(codes.shape[0]):
        out[i] = _encode(max(np.int64(codes[i]), np.int64(0)), e)




def _rows_nearest(bits, out, floor, km1, q):
    """Each row of float32 bit patterns (N, L) rounded half up at its own range exponent
    (never below ``floor``), the codes written shifted left onto exponent ``floor``
    (:func:`qkernels.quant.quantize_rows`)."""
    saturated = 0
    zeroed = 0
    too_wide = 0
    for n in prange(bits.shape[0]):
        peak = np.int32(0)
        for i in range(bits.shape[1]):
            peak = max(peak, bits[n, i] & _ABS)
        top = _top_exponent(peak)
        too_wide += np.int64(top - floor > ROW_WIDTH)
        e = max(top - km1, floor)
        up = e - floor
        for i in range(bits.shape[1]):
            code = _code_at(bits[n, i], e)
            y = min(max(code, -q), q)
            saturated += np.int64(y != code)
            zeroed += np.int64((y == 0) & ((bits[n, i] & _ABS) != 0))
            out[n, i] = y << up
    return saturated, zeroed, too_wide


_drivers = serial_and_parallel


_peak_bits_s, _peak_bits_p = _drivers(_peak_bits)
_quantize_nearest_s, _quantize_nearest_p = _drivers(_quantize_nearest)
_quantize_stochastic_s, _quantize_stochastic_p = _drivers(_quantize_stochastic)
_to_codes_s, _to_codes_p = _drivers(_to_codes)
_to_codes_exact_s, _to_codes_exact_p = _drivers(_to_codes_exact)
_peak_bits_where_s, _peak_bits_where_p = _drivers(_peak_bits_where)
_to_codes_where_s, _to_codes_where_p = _drivers(_to_codes_where)
_from_codes_s, _from_codes_p = _drivers(_from_codes)
_from_codes_relu_s, _from_codes_relu_p = _drivers(_from_codes_relu)
_rows_nearest_s, _rows_nearest_p = _drivers(_rows_nearest)


def _bits_of(x: np.ndarray, name: str) -> np.ndarray:
    check_array(x, name, (np.float32,), tuple(range(0, 9)))
    return np.ascontiguousarray(x).reshape(-1).view(np.int32)


def _top(b: np.ndarray) -> int:
    """``E`` of the largest magnitude among the bit patterns ``b``; ``_NO_TOP`` if all zero."""
    return int(_top_exponent(pick(_peak_bits_s, _peak_bits_p, b.size)(b)))


def peak_exponent(x: np.ndarray) -> int | None:
    """``E`` with ``max|x| < 2**E <= 2*max|x|`` for a float32 array, or None if all zero."""
    top = _top(_bits_of(x, "x"))
    return None if top == _NO_TOP else top


def quantize_f32(x: np.ndarray, bits: int, *, stochastic: bool = False, seed: int = 0,
                 step: int = 0, tensor_id: int = 0, exp: int | None = None, first: int = 0
                 ) -> tuple[np.ndarray, int, QuantCounts]:
    """Round a float32 container to ``bits``-wide codes at the range exponent (or at ``exp``).

    Stochastic rounding takes element ``first + i`` of the random stream for element ``i``
    (``first``: where this array starts in a larger tensor split across processes).

    Returns the new float32 container (same shape), its exponent, and the counts. Same results
    as :func:`qkernels.quant.quantize_nearest` / ``quantize_stochastic`` on the exact codes.
    """
    b = _bits_of(x, "x")
    bits = check_bits(bits, "bits")
    if exp is not None:
        e = check_exp(exp, "exp")
    else:
        top = _top(b)
        if top == _NO_TOP:
            return np.zeros_like(x, dtype=np.float32), 0, QuantCounts(0, 0, b.size)
        e = top - (bits - 1)
    out = np.empty_like(b)
    q = (1 << (bits - 1)) - 1
    if stochastic:
        key = np.uint64(stream_key(*check_stream_args(seed, step, tensor_id)))
        kernel = pick(_quantize_stochastic_s, _quantize_stochastic_p, b.size)
        sat, zero = kernel(b, out, e, q, key, np.int64(check_first(first)))
    else:
        sat, zero = pick(_quantize_nearest_s, _quantize_nearest_p, b.size)(b, out, e, q, -1)
    return out.view(np.float32).reshape(x.shape), e, QuantCounts(int(sat), int(zero), b.size)


def quantize_f32_to_codes(x: np.ndarray, bits: int, width: int, dtype, exp: int | None = None
                          ) -> tuple[QTensor, QuantCounts]:
    """:func:`quantize_f32` to nearest, returning the codes instead of a container: the codes
    of ``bits`` at exponent ``e = E - (bits - 1)``, shifted left to fill ``width >= bits - 1``
    bits (exponent ``e - (width - bits + 1)``), in ``dtype``. The same codes and exponent as
    ``f32_to_codes(quantize_f32(x, bits)[0], width, dtype)`` (exponent 0 for an all-zero
    ``x``), in one pass instead of two. ``exp``: round at this exponent instead of the
    range's."""
    b = _bits_of(x, "x")
    bits = check_bits(bits, "bits")
    up = int(width) - (bits - 1)
    if up < 0 or np.iinfo(dtype).max < (1 << width) - 1:
        raise ValueError(f"width {width} cannot hold {bits}-bit codes in {np.dtype(dtype)}")
    top = _top(b) if exp is None else 0
    out = np.empty(b.shape[0], dtype=dtype)
    if top == _NO_TOP:
        out[:] = 0
        return QTensor(out.reshape(x.shape), 0), QuantCounts(0, 0, b.size)
    e = top - (bits - 1) if exp is None else check_exp(exp, "exp")
    q = (1 << (bits - 1)) - 1
    sat, zero = pick(_quantize_nearest_s, _quantize_nearest_p, b.size)(b, out, e, q, up)
    return QTensor(out.reshape(x.shape), e - up), QuantCounts(int(sat), int(zero), b.size)


def quantize_f32_rows(x: np.ndarray, bits: int, floor: int | None = None
                      ) -> tuple[QTensor, QuantCounts]:
    """:func:`qkernels.quant.quantize_rows` of a float32 container (N, ...): each row (sample)
    rounded to nearest at its own range exponent, never below ``floor`` (default: the whole
    array's 16-bit range exponent); int16 codes at exponent ``floor``. The same codes and
    counts as ``quantize_rows`` on the container's exact codes."""
    check_array(x, "x", (np.float32,), tuple(range(1, 9)))
    bits = check_bits(bits, "bits")
    b = np.ascontiguousarray(x).reshape(x.shape[0], -1).view(np.int32)
    if floor is None:
        top = _top(b.reshape(-1))
        floor = 0 if top == _NO_TOP else top - ROW_WIDTH
    floor = check_exp(floor, "floor")
    out = np.empty(b.shape, dtype=np.int16)
    sat, zero, too_wide = pick(_rows_nearest_s, _rows_nearest_p, b.size)(
        b, out, np.int64(floor), np.int64(bits - 1), np.int64((1 << (bits - 1)) - 1))
    if too_wide:
        raise ValueError(f"floor {floor} is below the batch's 16-bit range exponent: the codes "
                         f"of {too_wide} row(s) would not fit int16")
    return QTensor(out.reshape(x.shape), floor), QuantCounts(int(sat), int(zero), b.size)


def f32_to_codes_where(x: np.ndarray, mask: np.ndarray, width: int, dtype) -> QTensor:
    """Codes of ``x`` where ``mask > 0`` and 0 elsewhere (``mask`` any integer array of x's
    size), at exponent ``E - width`` with ``E`` from the largest selected magnitude: the same
    as ``f32_to_codes(x * (mask > 0), width, dtype)`` without building the product."""
    b = _bits_of(x, "x")
    flat_mask = np.ascontiguousarray(mask).reshape(-1)
    if flat_mask.size != b.size:
        raise ValueError(f"mask has {flat_mask.size} elements, x has {b.size}")
    top = int(_top_exponent(pick(_peak_bits_where_s, _peak_bits_where_p, b.size)(b, flat_mask)))
    e = 0 if top == _NO_TOP else top - width
    out = np.empty(b.shape[0], dtype=dtype)
    pick(_to_codes_where_s, _to_codes_where_p, b.size)(b, flat_mask, out, e)
    return QTensor(out.reshape(x.shape), e)


def f32_to_codes(x: np.ndarray, width: int, dtype=None, exp: int | None = None) -> QTensor:
    """Codes of a float32 container at exponent ``E - width`` (or ``exp`` when given): exact
    for containers of codes of at most ``width`` bits, rounded half up otherwise."""
    b = _bits_of(x, "x")
    if exp is None:
        top = _top(b)
        e = 0 if top == _NO_TOP else top - width
    else:
        e = check_exp(exp, "exp")
    out = np.empty(b.shape[0], dtype=dtype or (np.int32 if width < 31 else np.int64))
    pick(_to_codes_s, _to_codes_p, b.size)(b, out, e)
    return QTensor(out.reshape(x.shape), e)


def f32_to_codes_exact(x: np.ndarray, width: int, dtype) -> QTensor | None:
    """:func:`f32_to_codes` at the peak's exponent when every value is a code of at most
    ``width`` bits there (no rounding), else None. One pass more than nothing: the check rides
    on the conversion."""
    b = _bits_of(x, "x")
    top = _top(b)
    e = 0 if top == _NO_TOP else top - width
    out = np.empty(b.shape[0], dtype=dtype)
    if pick(_to_codes_exact_s, _to_codes_exact_p, b.size)(b, out, e):
        return None
    return QTensor(out.reshape(x.shape), e)


def codes_to_f32(q: QTensor, relu: bool = False) -> np.ndarray:
    """The float32 container of codes (``|code| < 2**24``); with ``relu`` negative codes
    become 0 (the container of ``max(code, 0)``)."""
    check_exp(q.exp, "q.exp")
    flat = np.ascontiguousarray(q.q).reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.int32)
    kernels = (_from_codes_relu_s, _from_codes_relu_p) if relu else (_from_codes_s, _from_codes_p)
    pick(*kernels, flat.size)(flat, out, q.exp)
    return out.view(np.float32).reshape(q.q.shape)


__all__ = ["peak_exponent", "quantize_f32", "quantize_f32_to_codes", "f32_to_codes",
           "f32_to_codes_exact", "f32_to_codes_where", "codes_to_f32", "code_dtype"]
