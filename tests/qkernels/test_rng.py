"""Tests of qkernels.rng: the counter-based random stream and the rounding of wide codes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numba
import numpy as np
import pytest

from qkernels.fixedpoint import qmax, round_shift, saturate
from qkernels.format import code_dtype
from qkernels.oracle import round_shift_nearest_oracle, stochastic_round_shift_oracle
from qkernels.rng import (
    check_stream_args,
    mix64,
    mix64_np,
    random_u64,
    random_u64_np,
    round_shift_nearest,
    stochastic_round_shift,
    stream_key,
    stream_key_np,
)

# ---------------------------------------------------------------------------------------------
# An independent implementation on Python integers, masked to 64 bits.

M64 = (1 << 64) - 1


def py_mix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_stream_key(seed: int, step: int, tensor_id: int) -> int:
    return py_mix64(py_mix64(py_mix64(seed) ^ step) ^ tensor_id)


def py_random_u64(key: int, index: int) -> int:
    return py_mix64(key + (index + 1) * 0x9E3779B97F4A7C15)


# Computed once with the functions above; a machine or backend that disagrees fails.
MIX64_0 = 0x0
MIX64_1 = 0x5692161D100B05E5
KEY_1_2_3 = 0xA55BDF37C08724B5
RANDOM_KEY_1_2_3_AT_0 = 0xAE4E5DBB3B1FADE8
# SplitMix64's published output for state 0 (Vigna's splitmix64.c): element i of key 0.
SPLITMIX64_SEED0 = (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F)

SHIFTS = (0, 1, 7, 16)
BITS = (2, 4, 8, 16)
SHAPES = ((0,), (1,), (7,), (3, 5), (2, 3, 4), (64, 33))
STREAM = dict(seed=12345, step=678, tensor_id=9)


def wide_codes(rng: np.random.Generator, shape: tuple, dtype) -> np.ndarray:
    """Random wide codes of mixed magnitude, with the dtype's extremes and zero sprinkled in."""
    info = np.iinfo(dtype)
    n = int(np.prod(shape))
    mags = rng.integers(0, info.bits - 1, size=n)
    w = rng.integers(-(1 << 62), 1 << 62, size=n, dtype=np.int64) >> (62 - mags)
    w = np.clip(w, info.min, info.max)
    special = np.array([0, 1, -1, info.max, info.min, info.max - 1, info.min + 1], dtype=np.int64)
    w[: min(n, special.size)] = special[: min(n, special.size)]
    return w.astype(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# The random stream.


def test_known_answers():
    """mix64, stream_key and random_u64 give the pinned constants in Numba, numpy and Python."""
    assert py_mix64(0) == MIX64_0 and py_mix64(1) == MIX64_1
    assert py_stream_key(1, 2, 3) == KEY_1_2_3
    assert py_random_u64(KEY_1_2_3, 0) == RANDOM_KEY_1_2_3_AT_0
    assert int(mix64(0)) == MIX64_0
    assert int(mix64(1)) == MIX64_1
    assert int(stream_key(1, 2, 3)) == KEY_1_2_3
    assert int(random_u64(stream_key(1, 2, 3), 0)) == RANDOM_KEY_1_2_3_AT_0
    assert int(mix64_np(np.uint64(1))) == MIX64_1
    assert int(stream_key_np(1, 2, 3)) == KEY_1_2_3
    assert int(random_u64_np(stream_key_np(1, 2, 3), [0])[0]) == RANDOM_KEY_1_2_3_AT_0


def test_stream_is_splitmix64():
    """Stream key 0 is SplitMix64 started at state 0: its published first outputs."""
    got = random_u64_np(0, np.arange(3))
    assert [int(v) for v in got] == list(SPLITMIX64_SEED0)
    assert [int(random_u64(0, i)) for i in range(3)] == list(SPLITMIX64_SEED0)


def test_stream_equals_python_integers():
    """Numba and numpy streams equal the Python-integer implementation on random 64-bit input."""
    rng = np.random.default_rng(1)
    zs = [0, 1, M64, 1 << 63, (1 << 63) - 1] + [int(v) for v in rng.integers(0, M64, 200,
                                                                             dtype=np.uint64)]
    want = [py_mix64(z) for z in zs]
    assert [int(mix64(z)) for z in zs] == want
    assert [int(v) for v in mix64_np(np.array(zs, dtype=np.uint64))] == want

    ids = [(0, 0, 0), (1, 2, 3), (3, 2, 1), ((1 << 63) - 1, (1 << 63) - 1, (1 << 63) - 1)]
    ids += [tuple(int(v) for v in rng.integers(0, 1 << 63, 3)) for _ in range(20)]
    for seed, step, tid in ids:
        key = py_stream_key(seed, step, tid)
        assert int(stream_key(seed, step, tid)) == key
        assert int(stream_key_np(seed, step, tid)) == key
        idx = [0, 1, 2, 1000, (1 << 40) + 7, M64 - 1]
        want = [py_random_u64(key, i) for i in idx]
        assert [int(random_u64(key, i)) for i in idx] == want
        assert [int(v) for v in random_u64_np(key, np.array(idx, dtype=np.uint64))] == want


def test_same_key_same_stream_other_keys_other_streams():
    """The same (seed, step, tensor_id) repeats the stream exactly; changing any one of them
    (or swapping step and tensor_id) gives an unrelated stream."""
    idx = np.arange(4096)
    base = random_u64_np(stream_key_np(5, 6, 7), idx)
    assert np.array_equal(base, random_u64_np(stream_key_np(5, 6, 7), idx))
    others = [(4, 6, 7), (5, 5, 7), (5, 6, 8), (5, 7, 6), (6, 5, 7), (0, 0, 0)]
    keys = {int(stream_key_np(5, 6, 7))} | {int(stream_key_np(*t)) for t in others}
    assert len(keys) == len(others) + 1
    for t in others:
        other = random_u64_np(stream_key_np(*t), idx)
        assert np.mean(other == base) < 1e-3, t
        # no stream is a shifted copy of another (counter-based keys, not sequential states)
        assert not np.isin(other[:64], base).any(), t


def test_low_bits_are_uniform():
    """Each byte of random_u64 (low, middle, high) is uniform: chi-square over 256 bins of
    2**17 draws stays within 6 standard deviations of its mean (255 degrees of freedom)."""
    r = random_u64_np(stream_key_np(1, 2, 3), np.arange(1 << 17))
    expected = r.size / 256
    for byte in (0, 3, 7):
        counts = np.bincount(((r >> np.uint64(8 * byte)) & np.uint64(255)).astype(np.int64),
                             minlength=256)
        chi2 = float(np.sum((counts - expected) ** 2) / expected)
        assert abs(chi2 - 255) < 6 * np.sqrt(2 * 255), (byte, chi2)
    # and every single bit is set about half the time (4 standard errors)
    bits = (r[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    frac = bits.mean(axis=0)
    assert np.all(np.abs(frac - 0.5) < 4 * 0.5 / np.sqrt(r.size) + 1e-12)


def test_consecutive_steps_are_independent_streams():
    """Low bits of element 0 over consecutive steps are uniform (as the rounding sees them)."""
    r = np.array([random_u64(stream_key(3, step, 1), 0) for step in range(4096)],
                 dtype=np.uint64)
    counts = np.bincount((r & np.uint64(15)).astype(np.int64), minlength=16)
    chi2 = float(np.sum((counts - 256) ** 2) / 256)
    assert abs(chi2 - 15) < 6 * np.sqrt(2 * 15), chi2


# ---------------------------------------------------------------------------------------------
# Rounding kernels against the numpy oracle.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_kernels_equal_oracle(shift, bits):
    """Both kernels, parallel and serial, equal the numpy oracle bit for bit, with the output
    dtype code_dtype(bits) and the input's shape, for int32 and int64 inputs of every shape."""
    rng = np.random.default_rng(100 * shift + bits)
    for dtype in (np.int64, np.int32):
        for shape in SHAPES:
            w = wide_codes(rng, shape, dtype)
            want_sr = stochastic_round_shift_oracle(w, shift, bits, **STREAM)
            want_rn = round_shift_nearest_oracle(w, shift, bits)
            for parallel in (True, False):
                got_sr = stochastic_round_shift(w, shift, bits, parallel=parallel, **STREAM)
                got_rn = round_shift_nearest(w, shift, bits, parallel=parallel)
                for got, want in ((got_sr, want_sr), (got_rn, want_rn)):
                    assert got.dtype == code_dtype(bits) and got.shape == shape
                    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shift", (0, 1, 31, 61, 62))
def test_extreme_values_do_not_overflow(shift):
    """int64 extremes and the largest shift round exactly as the spec's formula on unbounded
    integers says (no wrap-around in w + 2**(s-1) or w + r)."""
    info = np.iinfo(np.int64)
    w = np.array([info.max, info.min, info.max - 1, info.min + 1, 1 << 62, -(1 << 62), 0, -1],
                 dtype=np.int64)
    np.testing.assert_array_equal(round_shift_nearest(w, shift, 16),
                                  round_shift_nearest_oracle(w, shift, 16))
    np.testing.assert_array_equal(stochastic_round_shift(w, shift, 16, **STREAM),
                                  stochastic_round_shift_oracle(w, shift, 16, **STREAM))


def test_non_contiguous_input_uses_logical_c_order():
    """A strided or transposed input is rounded as its C-order copy (element i of the stream
    goes to the i-th element in C order, not in memory order)."""
    w = wide_codes(np.random.default_rng(2), (40, 30), np.int64)
    for view in (w.T, w[::3, 1::2]):
        np.testing.assert_array_equal(
            stochastic_round_shift(view, 7, 8, **STREAM),
            stochastic_round_shift(np.ascontiguousarray(view), 7, 8, **STREAM))
        np.testing.assert_array_equal(stochastic_round_shift(view, 7, 8, **STREAM),
                                      stochastic_round_shift_oracle(view, 7, 8, **STREAM))


def test_parallel_equals_serial_for_any_thread_count():
    """The prange driver equals the serial one bit for bit, whatever the number of threads."""
    w = wide_codes(np.random.default_rng(3), (257, 129), np.int64)
    serial_sr = stochastic_round_shift(w, 16, 8, parallel=False, **STREAM)
    serial_rn = round_shift_nearest(w, 16, 8, parallel=False)
    old = numba.get_num_threads()
    try:
        for n in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            np.testing.assert_array_equal(stochastic_round_shift(w, 16, 8, **STREAM), serial_sr)
            np.testing.assert_array_equal(round_shift_nearest(w, 16, 8), serial_rn)
    finally:
        numba.set_num_threads(old)


def test_stochastic_rounding_repeats_with_same_key_and_changes_with_other_keys():
    """Same (seed, step, tensor_id) -> identical codes; another seed, step or tensor_id ->
    other codes (with shift 8, about half of the elements differ)."""
    w = np.random.default_rng(4).integers(-(1 << 14), 1 << 14, 10_000).astype(np.int64)
    base = stochastic_round_shift(w, 8, 8, seed=1, step=2, tensor_id=3)
    np.testing.assert_array_equal(base, stochastic_round_shift(w, 8, 8, seed=1, step=2,
                                                               tensor_id=3))
    for kw in (dict(seed=2, step=2, tensor_id=3), dict(seed=1, step=3, tensor_id=3),
               dict(seed=1, step=2, tensor_id=4)):
        other = stochastic_round_shift(w, 8, 8, **kw)
        assert 0.3 < np.mean(other != base) < 0.7, kw


# ---------------------------------------------------------------------------------------------
# Semantics: unbiased stochastic rounding, round half up, saturation.


@pytest.mark.parametrize("w0", (1000 * 256 + 77, -(1000 * 256 + 77), 5 * 256 + 1, -3 * 256 - 255,
                                128, -128))
def test_stochastic_rounding_is_unbiased(w0):
    """Over 200k elements holding the same w, the mean of result * 2**8 is within 4 standard
    errors of w, and every result is floor(w / 2**8) or that plus one."""
    n, s = 200_000, 8
    y = stochastic_round_shift(np.full(n, w0, dtype=np.int64), s, 16, **STREAM).astype(np.int64)
    lo = w0 >> s
    assert set(np.unique(y)) <= {lo, lo + 1}
    p = (w0 - (lo << s)) / 2**s                       # probability of rounding up
    se = 2**s * np.sqrt(p * (1 - p) / n)
    assert abs(y.mean() * 2**s - w0) < 4 * se, (y.mean() * 2**s, w0, se)


def test_stochastic_rounding_is_unbiased_across_steps():
    """One element rounded at 4000 consecutive steps averages to w / 2**s (4 standard errors):
    the guarantee a gradient accumulating over training relies on."""
    w, s = np.array([3 * 2**16 + 40_000], dtype=np.int64), 16
    y = np.array([stochastic_round_shift(w, s, 8, seed=9, step=t, tensor_id=0, parallel=False)[0]
                  for t in range(4000)], dtype=np.int64)
    p = 40_000 / 2**16
    assert abs(y.mean() - int(w[0]) / 2**s) < 4 * np.sqrt(p * (1 - p) / y.size)


@pytest.mark.parametrize("w, shift, want", [
    (3, 1, 2), (-3, 1, -1), (-5, 1, -2), (5, 1, 3), (1, 1, 1), (-1, 1, 0), (0, 1, 0),
    (2, 2, 1), (-2, 2, 0), (6, 2, 2), (-6, 2, -1), (5, 2, 1), (-5, 2, -1), (7, 2, 2),
    (-7, 2, -2), (383, 8, 1), (384, 8, 2), (-384, 8, -1), (-385, 8, -2), (42, 0, 42),
])
def test_round_half_up(w, shift, want):
    """round_shift_nearest is floor(w / 2**shift + 1/2): ties go up (toward +inf)."""
    for parallel in (True, False):
        assert round_shift_nearest(np.array([w]), shift, 16, parallel=parallel)[0] == want
    assert round_shift_nearest_oracle(np.array([w]), shift, 16)[0] == want


def test_round_nearest_equals_fixedpoint_round_shift():
    """round_shift_nearest is saturate(fixedpoint.round_shift(w, s)) wherever the latter is
    defined (|w| < 2**62): one rounding rule in the project."""
    rng = np.random.default_rng(5)
    w = wide_codes(rng, (500,), np.int64) >> 2
    for s in (0, 1, 3, 8, 20, 61):
        for bits in (2, 8, 16):
            q = qmax(bits)
            want = [saturate(round_shift(int(v), s), q) for v in w]
            np.testing.assert_array_equal(round_shift_nearest(w, s, bits), want)


@pytest.mark.parametrize("bits", BITS)
def test_saturation(bits):
    """Results lie in [-qmax, qmax] (the symmetric range; -2**(bits-1) never occurs), and
    values beyond it clamp to the nearest end; shift 0 only saturates, whatever the key."""
    q = int(qmax(bits))
    w = np.array([q, q + 1, 10 * q + 7, -q, -q - 1, -10 * q - 7, 1 << 40, -(1 << 40)],
                 dtype=np.int64)
    want = np.array([q, q, q, -q, -q, -q, q, -q])
    np.testing.assert_array_equal(round_shift_nearest(w, 0, bits), want)
    for seed in (0, 1, 2):
        np.testing.assert_array_equal(
            stochastic_round_shift(w, 0, bits, seed=seed, step=0, tensor_id=0), want)
    big = wide_codes(np.random.default_rng(bits), (5000,), np.int64)
    for y in (round_shift_nearest(big, 7, bits),
              stochastic_round_shift(big, 7, bits, **STREAM)):
        assert y.min() >= -q and y.max() <= q
        assert y.min() == -q and y.max() == q


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="needs compiled kernels")
def test_kernels_use_no_floating_point():
    """The compiled rounding kernels (serial and prange, with the stream inlined) contain no
    floating-point type or instruction in their LLVM IR; compiled fresh, as cached code
    cannot be inspected."""
    code = textwrap.dedent("""
        import re
        import numpy as np
        from qkernels import rng
        w = np.arange(-50, 50, dtype=np.int64)
        for parallel in (True, False):
            for dt in (np.int32, np.int64):
                rng.stochastic_round_shift(w.astype(dt), 3, 8, seed=1, step=2, tensor_id=3,
                                           parallel=parallel)
                rng.round_shift_nearest(w.astype(dt), 3, 16, parallel=parallel)
        pat = re.compile(r"\\b(half|float|double|fadd|fsub|fmul|fdiv|fcmp|sitofp|uitofp|"
                         r"fptosi|fptoui|fpext|fptrunc)\\b")
        for k in (rng._stochastic_parallel, rng._stochastic_serial, rng._nearest_parallel,
                  rng._nearest_serial):
            assert k.signatures, k
            for sig in k.signatures:
                ir = k.inspect_llvm(sig)
                assert "random_u64" in ir or "nearest" in k.__name__, (k, sig)
                found = sorted(set(pat.findall(ir)))
                print(k.__name__, len(ir), found)
                assert not found, (k.__name__, sig, found)
        print("OK")
    """)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# Argument checks.

W = np.zeros(4, dtype=np.int64)


def _sr(**kw):
    args = dict(w=W, shift=3, bits=8, seed=1, step=2, tensor_id=3) | kw
    return stochastic_round_shift(args.pop("w"), args.pop("shift"), args.pop("bits"), **args)


def _rn(**kw):
    args = dict(w=W, shift=3, bits=8) | kw
    return round_shift_nearest(args["w"], args["shift"], args["bits"])


@pytest.mark.parametrize("call, kw, exc, name", [
    (_sr, dict(w=[1, 2]), TypeError, "w"),
    (_sr, dict(w=W.astype(np.int16)), TypeError, "w"),
    (_sr, dict(w=W.astype(np.float64)), TypeError, "w"),
    (_sr, dict(w=W.astype(np.uint64)), TypeError, "w"),
    (_sr, dict(shift=1.0), TypeError, "shift"),
    (_sr, dict(shift=True), TypeError, "shift"),
    (_sr, dict(shift=-1), ValueError, "shift"),
    (_sr, dict(shift=63), ValueError, "shift"),
    (_sr, dict(bits=1), ValueError, "bits"),
    (_sr, dict(bits=17), ValueError, "bits"),
    (_sr, dict(bits=8.0), TypeError, "bits"),
    (_sr, dict(seed=-1), ValueError, "seed"),
    (_sr, dict(seed=1 << 63), ValueError, "seed"),
    (_sr, dict(seed=1.5), TypeError, "seed"),
    (_sr, dict(seed=None), TypeError, "seed"),
    (_sr, dict(step=-3), ValueError, "step"),
    (_sr, dict(step=True), TypeError, "step"),
    (_sr, dict(tensor_id=1 << 64), ValueError, "tensor_id"),
    (_sr, dict(tensor_id="0"), TypeError, "tensor_id"),
    (_rn, dict(w=W.astype(np.int8)), TypeError, "w"),
    (_rn, dict(shift=100), ValueError, "shift"),
    (_rn, dict(bits=0), ValueError, "bits"),
])
def test_bad_arguments_raise_naming_the_argument(call, kw, exc, name):
    """Wrong types raise TypeError, out-of-range values ValueError, and the message names the
    offending argument."""
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call(**kw)


def test_stream_argument_checks():
    """check_stream_args accepts numpy ints and the range ends; random_u64_np rejects negative
    or non-integer indices and out-of-range keys, naming them."""
    assert check_stream_args(np.int64(0), np.uint32(5), (1 << 63) - 1) == (0, 5, (1 << 63) - 1)
    with pytest.raises(ValueError, match="index"):
        random_u64_np(0, np.array([1, -1]))
    with pytest.raises(TypeError, match="index"):
        random_u64_np(0, np.array([1.0]))
    with pytest.raises(ValueError, match="key"):
        random_u64_np(1 << 64, [0])
    with pytest.raises(TypeError, match="key"):
        random_u64_np(0.5, [0])
    with pytest.raises(ValueError, match="tensor_id"):
        stream_key_np(0, 0, -1)
