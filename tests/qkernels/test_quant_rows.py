"""Per-sample error exponents (``error_exp = "sample"``): ``quantize_rows`` and
``quantize_f32_rows`` against an exact rational oracle of their definition."""

from fractions import Fraction

import numpy as np
import pytest

from qkernels import QTensor
from qkernels.ieee import f32_to_codes, quantize_f32_rows
from qkernels.quant import ROW_WIDTH, quantize_nearest, quantize_rows


def top_exponent(values) -> int | None:
    """E with max|v| < 2**E <= 2 max|v| (exact rationals), None when all are zero."""
    peak = max((abs(v) for v in values), default=Fraction(0))
    if peak == 0:
        return None
    e = 0
    while Fraction(2) ** e <= peak:
        e += 1
    while Fraction(2) ** (e - 1) > peak:
        e -= 1
    return e


def rows_oracle(rows: list[list[Fraction]], bits: int, floor: int | None = None):
    """Each row rounded half up at max(its range exponent, floor), saturated, as codes at
    ``floor`` (default: the whole batch's 16-bit range exponent)."""
    if floor is None:
        floor = top_exponent([v for r in rows for v in r]) - 15
    q = 2 ** (bits - 1) - 1
    out, saturated, zeroed = [], 0, 0
    for row in rows:
        top = top_exponent(row)
        e = floor if top is None else max(top - (bits - 1), floor)
        codes = []
        for v in row:
            y = (v / Fraction(2) ** e + Fraction(1, 2)) // 1
            saturated += abs(y) > q
            y = max(-q, min(q, y))
            zeroed += y == 0 and v != 0
            codes.append(int(y) * 2 ** (e - floor))
        out.append(codes)
    return out, floor, saturated, zeroed


def batch(seed: int, n: int = 6, length: int = 40) -> np.ndarray:
    """int64 codes whose rows span many binary orders of magnitude, one row all zero, one
    whose largest value rounds up past the largest code."""
    rng = np.random.default_rng(seed)
    scales = 2 ** rng.integers(0, 30, n)
    c = rng.integers(-1000, 1001, (n, length)) * scales[:, None]
    c[1] = 0
    c[2, :3] = [255 << 8, 1, -1]  # 8 bits: 255 * 2**8 rounds at 2**9 to 127.5 -> saturates
    return c


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("exp", [-30, 0, 5])
def test_rows_equal_the_rational_oracle(bits, exp):
    c = batch(bits * 7 + exp + 40)
    got, counts = quantize_rows(QTensor(c, exp), bits)
    want, floor, saturated, zeroed = rows_oracle(
        [[Fraction(int(v)) * Fraction(2) ** exp for v in row] for row in c], bits)
    assert got.exp == floor and got.q.dtype == np.int16
    assert got.q.tolist() == want
    assert (counts.saturated, counts.zeroed, counts.total) == (saturated, zeroed, c.size)
    assert np.abs(got.q.astype(np.int64)).max() < 2 ** ROW_WIDTH


def test_rows_keep_small_samples_that_one_batch_exponent_zeroes():
    """A sample 2**12 times smaller than the batch's largest keeps its bits (the batch's
    exponent rounds it to zero); the largest sample rounds as with the batch's exponent."""
    c = np.array([[1000 << 12, -700 << 12, 3], [244, -171, 0]], np.int64)
    rows, _ = quantize_rows(QTensor(c, -20), 8)
    whole, _ = quantize_nearest(QTensor(c, -20), 8)
    assert not whole.q[1].any() and rows.q[1, :2].all()
    as_value = rows.q.astype(np.int64) * 2.0 ** rows.exp
    np.testing.assert_array_equal(as_value[0], whole.q[0] * 2.0 ** whole.exp)


def test_given_floor_and_refusal():
    """A coarser common exponent (a floor above the batch's own) rounds the rows that would
    go below it there; a floor the codes cannot reach in int16 is refused."""
    c = batch(3)
    own, _ = quantize_rows(QTensor(c, 0), 8)
    got, _ = quantize_rows(QTensor(c, 0), 8, floor=own.exp + 2)
    want, _, _, _ = rows_oracle([[Fraction(int(v)) for v in row] for row in c], 8,
                                floor=own.exp + 2)
    assert got.exp == own.exp + 2 and got.q.tolist() == want
    with pytest.raises(ValueError, match="int16"):
        quantize_rows(QTensor(c, 0), 8, floor=own.exp - 1)


@pytest.mark.parametrize("bits", [3, 8, 16])
def test_f32_rows_equal_the_codes_path(bits):
    """On a float32 container (N, C, H, W) the kernel on bit patterns gives the codes and
    counts of quantize_rows on the container's exact codes, denormal-free rows of very
    different ranges included."""
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((5, 3, 4, 4)) * (2.0 ** rng.integers(-20, 10, 5))[:, None, None,
                                                                               None])
    x = x.astype(np.float32)
    x[3] = 0
    got, counts = quantize_f32_rows(x, bits)
    exact = f32_to_codes(x, 62, np.int64)  # 62 bits hold every value's bits at one exponent
    assert np.ldexp(exact.q.astype(np.float64), exact.exp).tolist() == x.astype(
        np.float64).tolist()
    want, want_counts = quantize_rows(exact, bits)
    assert got.exp == want.exp and np.array_equal(got.q, want.q)
    assert counts == want_counts
