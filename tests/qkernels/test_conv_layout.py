"""The integer convolution layouts (im2col, col2im, channels_first/last) against readable numpy
definitions, and the exactness check of f32_to_codes_exact."""

from __future__ import annotations

import numpy as np
import pytest

from qkernels.conv import (LIMB_PEAK, channels_first, channels_last, col2im, im2col, join_limbs,
                           split_limbs)
from qkernels.ieee import f32_to_codes, f32_to_codes_exact

GEOMETRIES = [((2, 3, 7, 6), (3, 2), (2, 1), (1, 0)), ((4, 1, 12, 12), (5, 5), 1, 0),
              ((3, 4, 8, 8), (3, 3), 2, 1), ((1, 2, 5, 5), (5, 5), 1, 2),
              ((2, 2, 9, 4), (1, 1), 3, 0), ((2, 3, 3, 4), (2, 2), 3, (2, 3))]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def im2col_oracle(x, k, stride, pad):
    """cols[(c, u, v), (n, i, j)] = x_padded[n, c, i*sh + u, j*sw + v], by loops."""
    (kh, kw), (sh, sw), (ph, pw) = k, _pair(stride), _pair(pad)
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), np.int64)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = np.zeros((c * kh * kw, n * oh * ow), np.int64)
    for ci in range(c):
        for u in range(kh):
            for v in range(kw):
                for ni in range(n):
                    for i in range(oh):
                        for j in range(ow):
                            cols[(ci * kh + u) * kw + v, (ni * oh + i) * ow + j] = \
                                xp[ni, ci, i * sh + u, j * sw + v]
    return cols


@pytest.mark.parametrize("shape, k, stride, pad", GEOMETRIES)
def test_im2col_and_col2im_equal_their_definitions(shape, k, stride, pad):
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-127, 128, shape).astype(np.int8)
    x[0, 0] = -127
    cols = im2col(x, k, stride, pad)
    want = im2col_oracle(x, k, stride, pad)
    assert cols.dtype == np.int8 and np.array_equal(cols, want)
    # col2im is im2col's adjoint: <im2col(x), d> == <x, col2im(d)> for every x, d; check it
    # element by element: col2im(d)[p] sums d over the cells im2col reads p into
    d = rng.integers(-(1 << 20), 1 << 20, cols.shape).astype(np.int32)
    image = col2im(d, shape, k, stride, pad)
    want = np.zeros(shape, np.int64)
    flat = np.arange(np.prod(shape)).reshape(shape) + 1  # position ids, 0 = padding
    ids = im2col_oracle(flat, k, stride, pad)
    np.add.at(want.reshape(-1), ids[ids > 0] - 1, d[ids > 0].astype(np.int64))
    assert image.dtype == np.int32 and np.array_equal(image, want)
    wide = d.astype(np.int64) << 20  # int64 columns (limb products of 16-bit codes)
    image = col2im(wide, shape, k, stride, pad)
    assert image.dtype == np.int64 and np.array_equal(image, want << 20)


def test_layouts_reject_bad_geometry():
    x = np.zeros((1, 1, 4, 4), np.int8)
    with pytest.raises(ValueError, match="does not fit"):
        im2col(x, (5, 5))
    with pytest.raises(ValueError, match="expected"):
        col2im(np.zeros((9, 3), np.int32), (1, 1, 4, 4), (3, 3))
    with pytest.raises(ValueError, match="positive"):
        im2col(x, (3, 3), stride=0)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_channels_first_and_last_are_transposes(dtype):
    a = np.random.default_rng(1).integers(-100, 100, (3, 5, 4, 2)).astype(dtype)
    assert np.array_equal(channels_first(a), a.transpose(1, 0, 2, 3))
    assert np.array_equal(channels_last(a), a.transpose(0, 2, 3, 1))
    assert np.array_equal(channels_first(a[:, :, 0, 0]), a[:, :, 0, 0].T)


def test_f32_to_codes_exact_accepts_codes_and_refuses_the_rest():
    rng = np.random.default_rng(2)
    codes = rng.integers(-127, 128, 1000)
    codes[0] = 127
    x = (codes * 2.0 ** -9).astype(np.float32)
    got = f32_to_codes_exact(x, 7, np.int8)
    assert got is not None and got.exp == -9 and np.array_equal(got.q, codes)
    assert np.array_equal(got.q, f32_to_codes(x, 7, np.int8).q)
    # a half code, a value below the smallest code, a 9-bit code: not 8-bit codes
    for bad in (0.5 * 2.0 ** -9, 2.0 ** -40, 255 * 2.0 ** -10):
        y = x.copy()
        y[5] = bad
        assert f32_to_codes_exact(y, 7, np.int8) is None
    zeros = f32_to_codes_exact(np.zeros(7, np.float32), 7, np.int8)
    assert zeros.exp == 0 and not zeros.q.any()
    neg_zero = f32_to_codes_exact(np.array([-0.0, 1.0], np.float32), 7, np.int8)
    assert neg_zero is not None and list(neg_zero.q) == [0, 64]
    big = (rng.integers(-127, 128, 1 << 17) * 2.0 ** 3).astype(np.float32)  # parallel path
    got = f32_to_codes_exact(big, 7, np.int8)
    assert np.array_equal(got.q * 2.0 ** got.exp, big)
    big[-1] = 2.0 ** -30
    assert f32_to_codes_exact(big, 7, np.int8) is None


@pytest.mark.parametrize("size", [1000, 100_000])  # the serial and the parallel build
def test_split_limbs_rebuilds_every_16bit_code(size):
    rng = np.random.default_rng(size)
    for peak in (32767, LIMB_PEAK):
        a = rng.integers(-32767, peak + 1, size).astype(np.int16)
        a[:2] = peak, -32767
        hi, lo, off = split_limbs(a.reshape(10, -1))
        assert off == (128 if peak > LIMB_PEAK else 0)
        assert hi.dtype == lo.dtype == np.int8 and hi.shape == (10, size // 10)
        rebuilt = hi.astype(np.int64) * 256 + lo + off
        assert np.array_equal(rebuilt.reshape(-1), a)


def test_join_limbs_equals_the_definition():
    rng = np.random.default_rng(3)
    parts = [rng.integers(-(1 << 30), 1 << 30, (7, 9)).astype(np.int32) for _ in range(4)]
    hh, hl, lh, ll = (p.astype(np.int64) for p in parts)
    assert np.array_equal(join_limbs(*parts), hh * 65536 + (hl + lh) * 256 + ll)
    assert np.array_equal(join_limbs(parts[0], parts[3]), hh * 256 + ll)
    with pytest.raises(ValueError, match="2 or 4"):
        join_limbs(*parts[:3])
    with pytest.raises(ValueError, match="shapes"):
        join_limbs(parts[0], parts[1][:3])
