r"""Requantization with a per-tensor power-of-two exponent chosen from the tensor's range.

Given integer codes ``c`` with exponent ``e_c`` (value ``c * 2**e_c``), quantizing to ``k``
bits picks the output exponent from the largest magnitude,

.. math::

    e = b + e_c - (k - 1), \qquad b = \text{bit\_length}(\max_i |c_i|),

so the largest value lands in ``[2**(k-2), 2**(k-1))`` codes. This ``e`` depends only on the
real values (``b + e_c`` is the binary exponent of the maximum), never on how the input was
scaled, and so does every result below. Then

* nearest: ``y = sat(round_half_up(c * 2**(e_c - e)))``;
* stochastic: ``y = sat((floor(c * 2**(e_c - e + 24)) + r) >> 24)`` with ``r`` the top 24
  bits of ``random_u64(stream_key(seed, step, tensor_id), i)``: a 24-bit uniform fraction,
  so ``E[y] = c * 2**(e_c - e)`` exactly whenever the value has at most 24 fractional bits
  below the new LSB (always, for codes of up to 24 bits), and within ``2**-24`` LSB otherwise.

Each call also counts saturated codes (``|y|`` would exceed ``2**(k-1) - 1``: only the maximum
rounding up can) and codes rounded to zero from a nonzero input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import _i32
from ._jit import pick, serial_and_parallel
from .fixedpoint import bit_length, qmax, round_shift
from .format import QTensor, check_array, check_bits, check_exp, code_dtype
from .rng import check_first, check_stream_args, random_u64, stream_key

#: Random bits of a stochastic rounding: the fraction added below the new LSB.
SR_BITS = 24
#: Significant bits (and a sign) of the int16 containers of per-row codes: a row's exponent
#: lies at most ``ROW_WIDTH - (bits - 1)`` bits below the batch's.
ROW_WIDTH = 15


class QuantCounts(NamedTuple):
    """Elements a quantization saturated and nonzero elements it rounded to zero."""

    saturated: int
    zeroed: int
    total: int


def _max_abs(c):
    m = np.int64(0)
    for i in prange(c.shape[0]):
        m = max(m, abs(np.int64(c[i])))
    return m


_max_abs_s, _max_abs_p = serial_and_parallel(_max_abs)


def max_abs(flat: np.ndarray) -> int:
    """The largest magnitude of a 1-D integer array (0 when empty)."""
    return int(pick(_max_abs_s, _max_abs_p, flat.size)(flat))


@njit(cache=True)
def range_exponent(max_abs, exp, bits):
    """Exponent that puts ``max_abs * 2**exp`` in ``[2**(bits-2), 2**(bits-1))`` codes."""
    if max_abs == 0:
        return np.int64(exp)
    return bit_length(max_abs) + exp - (bits - 1)


@njit(cache=True, inline="always")
def saturate_count(y, v, q):
    """Saturate a rounded code ``y`` of the input ``v``: (code, saturated?, rounded to zero?)."""
    saturated = y > q or y < -q
    if saturated:
        y = q if y > 0 else -q
    return y, np.int64(saturated), np.int64(y == 0 and v != 0)


def _nearest(c, shift, q, out):
    saturated = 0
    zeroed = 0
    for i in prange(c.shape[0]):
        v = np.int64(c[i])
        y = round_shift(v, shift) if shift > 0 else v << -shift
        y, sat, zero = saturate_count(y, v, q)
        saturated += sat
        zeroed += zero
        out[i] = y
    return saturated, zeroed


#: Elements per parallel task of the chunked counting kernels (here and in qkernels.ieee).
CHUNK = 1 << 15
#: Running counts per task: one per position in a block of LANES elements, added up at the
#: end. A single running count keeps LLVM from vectorizing the loop (2.36M int32 accumulators,
#: the paper network's first conv: 0.79-0.82 ms per call, 0.30 ms in int32 lanes with these).
LANES = 64


@njit(cache=True, inline="always")
def chunk_span(k, n):
    """Elements ``[lo, hi)`` of task ``k`` of ``-(-n // CHUNK)`` over ``n`` elements."""
    lo = k * CHUNK
    return lo, min(lo + CHUNK, n)


@njit(cache=True, inline="always")
def _nearest32_element(v, s, s1, one, q32, span):
    """One code of :func:`_nearest32_chunk`: (code, saturated?, rounded to zero?)."""
    y = _i32.round_shr(v, s, s1, one)
    return (_i32.clamp(y, q32), np.int32(np.uint32(y + q32) > span),
            np.int32(y == 0) - np.int32(v == 0))  # v == 0 gives y == 0


@njit(cache=True)
def _nearest32_chunk(c, shift, q, out):
    """:func:`_nearest` of int8/int16/int32 codes and ``0 <= shift <= 31`` in int32 lanes
    (shift 0 only for int8/int16 codes: then ``y + q`` cannot overflow). Round half up is
    ``(v >> s) + bit (s-1) of v``, ``(v + 2**(s-1)) >> s`` without the sum that could
    overflow int32; at shift 0 the bit is masked off (y = v)."""
    s = np.int32(shift)
    s1 = np.int32(max(shift - 1, 0))
    one = np.int32(1 if shift > 0 else 0)
    q32 = np.int32(q)
    span = np.uint32(2 * q)  # y outside [-q, q] <=> y + q outside [0, 2q]
    sat = np.zeros(LANES, np.int32)
    zero = np.zeros(LANES, np.int32)
    whole = c.shape[0] - c.shape[0] % LANES
    for start in range(0, whole, LANES):
        block = c[start:start + LANES]
        dst = out[start:start + LANES]
        for j in range(LANES):
            dst[j], ds, dz = _nearest32_element(np.int32(block[j]), s, s1, one, q32, span)
            sat[j] += ds
            zero[j] += dz
    saturated = np.int64(sat.sum())
    zeroed = np.int64(zero.sum())
    for i in range(whole, c.shape[0]):
        out[i], ds, dz = _nearest32_element(np.int32(c[i]), s, s1, one, q32, span)
        saturated += ds
        zeroed += dz
    return saturated, zeroed


def _nearest32(c, shift, q, out):
    """:func:`_nearest` in chunks of int32 lanes (where :func:`_nearest32_chunk` applies)."""
    saturated = 0
    zeroed = 0
    for k in prange(-(-c.shape[0] // CHUNK)):
        lo, hi = chunk_span(k, c.shape[0])
        sat, zero = _nearest32_chunk(c[lo:hi], shift, q, out[lo:hi])
        saturated += sat
        zeroed += zero
    return saturated, zeroed


def _stochastic(c, up, q, key, out, first):
    """``up = e_c - e + SR_BITS``: bits to move the code left (right if negative); element
    ``first + i`` of the stream for element ``i``."""
    saturated = 0
    zeroed = 0
    for i in prange(c.shape[0]):
        v = np.int64(c[i])
        w = v << up if up >= 0 else v >> -up
        r = np.int64(random_u64(key, np.uint64(first) + np.uint64(i)) >> np.uint64(64 - SR_BITS))
        y = (w + r) >> SR_BITS
        y, sat, zero = saturate_count(y, v, q)
        saturated += sat
        zeroed += zero
        out[i] = y
    return saturated, zeroed


def _rows_nearest(c, shift_floor, km1, q, out):
    """Each row of ``c`` (N, L) rounded half up at its own range exponent, ``bit_length(max
    |row|) - km1`` codes' LSBs up, but never below ``shift_floor``; the codes written shifted
    left onto the common exponent ``c.exp + shift_floor``. Also counts the rows whose codes
    would not fit ``ROW_WIDTH`` bits there (a floor below the batch's 16-bit range)."""
    saturated = 0
    zeroed = 0
    too_wide = 0
    for n in prange(c.shape[0]):
        peak = np.int64(0)
        for i in range(c.shape[1]):
            peak = max(peak, abs(np.int64(c[n, i])))
        too_wide += np.int64(bit_length(peak) - shift_floor > ROW_WIDTH)
        shift = max(bit_length(peak) - km1, shift_floor)
        up = shift - shift_floor
        for i in range(c.shape[1]):
            v = np.int64(c[n, i])
            y = round_shift(v, shift) if shift > 0 else v << -shift
            y, sat, zero = saturate_count(y, v, q)
            saturated += sat
            zeroed += zero
            out[n, i] = y << up
    return saturated, zeroed, too_wide


_nearest_s, _nearest_p = serial_and_parallel(_nearest)
_nearest32_s, _nearest32_p = serial_and_parallel(_nearest32)
_rows_nearest_s, _rows_nearest_p = serial_and_parallel(_rows_nearest)
_stochastic_s, _stochastic_p = serial_and_parallel(_stochastic)


#: How frozen inference turns the calibration batches' range exponents into one.
CALIBRATION_RULES = ("median", "max")


def calibrated_exponent(per_batch: list[int], rule: str = "median") -> int:
    """One exponent from the range exponents a quantizer picked on calibration batches:
    ``"median"`` (the upper median: the exponent of a typical batch; a rare batch with a
    larger peak saturates its largest values) or ``"max"`` (nothing on the calibration
    batches saturates, but one outlier batch coarsens every answer by a bit)."""
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"rule {rule!r} is not one of {', '.join(CALIBRATION_RULES)}")
    if not per_batch:
        raise ValueError("no calibration batch gave an exponent")
    ordered = sorted(int(e) for e in per_batch)
    return ordered[-1] if rule == "max" else ordered[len(ordered) // 2]


def code_top(c: QTensor) -> int | None:
    """``E`` with ``max|c.q| * 2**c.exp < 2**E`` (the peak's binary exponent), or None when
    every code is zero."""
    peak = max_abs(np.ascontiguousarray(c.q).reshape(-1))
    return c.exp + peak.bit_length() if peak else None


def codes_where(x: QTensor, mask: np.ndarray, width: int, dtype) -> QTensor:
    """Codes of ``x`` where ``mask > 0`` and 0 elsewhere (``mask`` any integer array of
    ``x.q``'s size), at exponent ``E - width`` with ``E`` from the largest selected magnitude
    (0 when every selected code is zero): the same codes and exponent as
    :func:`qkernels.ieee.f32_to_codes_where` on ``x``'s float32 container, for int8 or int16
    codes of at most ``width`` bits (each moves left by ``width`` less the peak's bit
    length)."""
    check_array(x.q, "x.q", (np.int8, np.int16), tuple(range(0, 9)))
    check_exp(x.exp, "x.exp")
    flat_mask = np.ascontiguousarray(mask).reshape(-1)
    if flat_mask.size != x.q.size:
        raise ValueError(f"mask has {flat_mask.size} elements, x.q has {x.q.size}")
    # (a product with the mask's truth: np.where took 40x as long on int8 codes here)
    picked = np.ascontiguousarray(x.q).reshape(-1) * (flat_mask > 0)
    peak = max_abs(picked)
    if peak >> width:
        raise ValueError(f"x holds a code of {peak.bit_length()} bits, more than width={width}")
    out = picked.astype(dtype).reshape(x.q.shape)
    if not peak:
        return QTensor(out, 0)
    shift = width - peak.bit_length()
    return QTensor(np.left_shift(out, shift, out=out), x.exp - shift)


def mean_exponent(abs_sum: int, n: int, exp: int, bits: int) -> int | None:
    """The *mean* rule's exponent for ``n`` codes at exponent ``exp`` whose magnitudes sum to
    ``abs_sum``: ``e = floor(log2(mean|v|)) + 3 - bits`` (None when all are zero), exactly,
    in integers. The largest code ``2**(bits-1) - 1`` is then worth between ``2 - 2**(2-bits)``
    and ``4 - 2**(3-bits)`` times the mean magnitude ((1, 2] at 2 bits, (1.5, 3] at 3, close
    to (2, 4] from 6 bits on); larger values saturate. At 2 bits values from ``2**(e-1)``,
    between half the mean and the mean, round to +-1 (a ternary net's threshold: TWN's is
    0.7 x mean)."""
    if abs_sum == 0:
        return None
    j = int(abs_sum).bit_length() - int(n).bit_length()  # n * 2**j within 2x of abs_sum
    if (n << j if j >= 0 else n) > (abs_sum if j >= 0 else abs_sum << -j):
        j -= 1  # now the largest j with n * 2**j <= abs_sum
    return exp + j + 3 - bits


def _prepare(c: QTensor, bits: int, name: str, exp: int | None = None):
    check_array(c.q, f"{name}.q", (np.int8, np.int16, np.int32, np.int64), tuple(range(0, 9)))
    bits = check_bits(bits, "bits")
    flat = np.ascontiguousarray(c.q).reshape(-1)
    if exp is None:
        exp = int(range_exponent(max_abs(flat), check_exp(c.exp, f"{name}.exp"), bits))
    check_exp(exp, "the chosen exponent")
    return flat, bits, exp, np.empty(flat.shape[0], dtype=code_dtype(bits))


def quantize_nearest(c: QTensor, bits: int, exp: int | None = None
                     ) -> tuple[QTensor, QuantCounts]:
    """Requantize codes to ``bits`` with the range exponent (or ``exp``), rounding half up
    and saturating."""
    flat, bits, exp, out = _prepare(c, bits, "c", exp)
    shift = exp - c.exp
    # int32 lanes: int8/int16 codes, and int32 codes once they move right (y + q then fits)
    if flat.itemsize <= 2:
        lanes32 = 0 <= shift <= 31
    else:
        lanes32 = flat.itemsize == 4 and 1 <= shift <= 31
    kernels = (_nearest32_s, _nearest32_p) if lanes32 else (_nearest_s, _nearest_p)
    sat, zero = pick(*kernels, flat.size)(flat, shift, qmax(bits), out)
    return QTensor(out.reshape(c.q.shape), exp), QuantCounts(int(sat), int(zero), flat.size)


def rows_floor(top: int | None, exp: int) -> int:
    """The common exponent of per-row codes of a batch whose range exponent is ``top`` (the
    16-bit range exponent ``top - ROW_WIDTH``; ``exp`` when every value is zero)."""
    return exp if top is None else top - ROW_WIDTH


def quantize_rows(c: QTensor, bits: int, floor: int | None = None
                  ) -> tuple[QTensor, QuantCounts]:
    """Requantize codes to ``bits`` with one power-of-two exponent per row (the first axis:
    a sample of a batch), rounding half up and saturating.

    Row ``n`` rounds at ``e_n = max(E_n - (bits - 1), floor)``, ``E_n`` the binary exponent of
    its largest magnitude: each sample keeps ``bits`` significant bits of its own range, where
    one exponent for the batch rounds a sample whose values are small beside the batch's largest
    to zero. The result is int16 codes at the common exponent ``floor`` (default: the batch's
    16-bit range exponent, :func:`rows_floor`), row ``n``'s codes shifted left by
    ``e_n - floor``: at most ``ROW_WIDTH`` bits, so the layers downstream take them as 16-bit
    codes. ``floor`` must be at least the batch's (under torch.distributed, the whole global
    batch's: every process then holds codes at one exponent)."""
    check_array(c.q, "c.q", (np.int8, np.int16, np.int32, np.int64), tuple(range(1, 9)))
    bits = check_bits(bits, "bits")
    exp = check_exp(c.exp, "c.exp")
    rows = np.ascontiguousarray(c.q).reshape(c.q.shape[0], -1)
    floor = rows_floor(code_top(c), exp) if floor is None else check_exp(floor, "floor")
    out = np.empty(rows.shape, dtype=np.int16)
    sat, zero, too_wide = pick(_rows_nearest_s, _rows_nearest_p, rows.size)(
        rows, np.int64(floor - exp), np.int64(bits - 1), qmax(bits), out)
    if too_wide:
        raise ValueError(f"floor {floor} is below the batch's 16-bit range exponent: the codes "
                         f"of {too_wide} row(s) would not fit int16")
    return QTensor(out.reshape(c.q.shape), floor), QuantCounts(int(sat), int(zero), rows.size)


def quantize_stochastic(c: QTensor, bits: int, *, seed: int, step: int, tensor_id: int,
                        exp: int | None = None, first: int = 0) -> tuple[QTensor, QuantCounts]:
    """Requantize codes to ``bits`` with the range exponent (or ``exp``, at most the range's),
    rounding stochastically.

    The random fraction of element ``i`` (C order) is element ``first + i`` of the
    counter-based stream keyed by ``(seed, step, tensor_id)``, so the result is the same on
    every machine (``first``: where ``c`` starts in a tensor split across processes).
    """
    flat, bits, exp, out = _prepare(c, bits, "c", exp)
    key = np.uint64(stream_key(*check_stream_args(seed, step, tensor_id)))
    up = c.exp - exp + SR_BITS  # <= 15 + SR_BITS: |code << up| < 2**(bits - 1 + SR_BITS)
    sat, zero = pick(_stochastic_s, _stochastic_p, flat.size)(
        flat, up, qmax(bits), key, out, np.int64(check_first(first)))
    return QTensor(out.reshape(c.q.shape), exp), QuantCounts(int(sat), int(zero), flat.size)
