r"""Counter-based integer random stream and the rounding of wide codes to k-bit codes.

Random stream
-------------
Every random number is a pure function of ``(seed, step, tensor_id, index)``, so a run is
bit-identical on every machine, for every thread count, in Numba kernels and in numpy. The
mixing function is SplitMix64's finalizer on ``uint64`` (all arithmetic wraps modulo 2**64):

.. math::

    \operatorname{mix64}(z):\quad z \leftarrow (z \oplus (z \gg 30)) \cdot
    \mathtt{0xBF58476D1CE4E5B9};\quad z \leftarrow (z \oplus (z \gg 27)) \cdot
    \mathtt{0x94D049BB133111EB};\quad z \oplus (z \gg 31).

A stream (one tensor at one training step of one run) has the key

.. math::

    \mathit{key} = \operatorname{mix64}(\operatorname{mix64}(\operatorname{mix64}(\mathit{seed})
    \oplus \mathit{step}) \oplus \mathit{tensor\_id}),

each part mixed in before the next is folded in, so nearby triples give unrelated keys. Element
``index`` (the flat C-order position in the tensor) of the stream is SplitMix64's output number
``index`` for the state ``key``:

.. math::

    \operatorname{random\_u64}(\mathit{key}, i) = \operatorname{mix64}(\mathit{key} + (i + 1)
    \cdot \mathtt{0x9E3779B97F4A7C15}).

``seed``, ``step`` and ``tensor_id`` are integers in ``[0, 2**63)``.

Rounding
--------
A wide code ``w`` (int32/int64) becomes a ``bits``-wide code with ``shift`` fractional bits
dropped (see :mod:`qkernels.fixedpoint`):

* :func:`round_shift_nearest`: ``saturate((w + 2**(shift-1)) >> shift)`` (round half up);
* :func:`stochastic_round_shift`: ``saturate((w + (r & (2**shift - 1))) >> shift)`` with
  ``r = random_u64(key, i)``: floor plus a uniform integer in ``[0, 2**shift)``, so
  ``E[result] = w / 2**shift`` exactly before saturation.

Both are computed as ``(w >> s) + (((w & (2**s - 1)) + add) >> s)`` (:func:`shift_add`), which
equals ``(w + add) >> s`` for every int64 ``w`` without overflowing. Each element depends only
on its own value and index, so the ``prange`` driver equals the serial one bit for bit. No
floating point is used inside the kernels. The numpy references are
:func:`qkernels.oracle.stochastic_round_shift_oracle` and
:func:`qkernels.oracle.round_shift_nearest_oracle`.

Example::

    >>> w = np.array([1000, -1000, 383], dtype=np.int64)
    >>> round_shift_nearest(w, 8, 8)                  # 3.906, -3.906, 1.496
    array([ 4, -4,  1], dtype=int8)
    >>> stochastic_round_shift(w, 8, 8, seed=0, step=0, tensor_id=0)   # 3 or 4, -4 or -3, 1 or 2
    array([ 4, -3,  1], dtype=int8)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fixedpoint import qmax, saturate
from .format import check_bits, code_dtype

#: SplitMix64 constants: the two finalizer multipliers and the state increment (golden ratio).
MIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_MUL2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)

#: Exclusive upper bound of seed, step and tensor_id.
ID_LIMIT = 1 << 63

#: Largest shift the rounding functions accept (the carry of two 62-bit fractions fits int64).
SHIFT_MAX = 62

_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_U1 = np.uint64(1)


# ---------------------------------------------------------------------------------------------
# The stream, as Numba functions that kernels call. Their signatures are fixed to uint64: a
# uint64 mixed with an int64 would silently become float64 in Numba, and a fixed signature also
# lets Python callers pass any int in [0, 2**64).


@njit("uint64(uint64)", cache=True)
def mix64(z):
    """SplitMix64's finalizer: a bijection of uint64 that mixes every bit into every bit."""
    z = np.uint64(z)
    z = (z ^ (z >> _S30)) * MIX_MUL1
    z = (z ^ (z >> _S27)) * MIX_MUL2
    return z ^ (z >> _S31)


@njit("uint64(uint64, uint64, uint64)", cache=True)
def stream_key(seed, step, tensor_id):
    """Key of one stream: ``mix64(mix64(mix64(seed) ^ step) ^ tensor_id)`` (no argument checks;
    see :func:`check_stream_args`)."""
    k = mix64(np.uint64(seed))
    k = mix64(k ^ np.uint64(step))
    return mix64(k ^ np.uint64(tensor_id))


@njit("uint64(uint64, uint64)", cache=True)
def random_u64(key, index):
    """Element ``index`` of stream ``key``: ``mix64(key + (index + 1) * 0x9E3779B97F4A7C15)``."""
    return mix64(np.uint64(key) + (np.uint64(index) + _U1) * GOLDEN)


# ---------------------------------------------------------------------------------------------
# The same stream in numpy, for arrays of indices (and the oracle's independent evaluation).


def _check_id(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {type(v).__name__}")
    if not 0 <= int(v) < ID_LIMIT:
        raise ValueError(f"{name}={int(v)} is outside [0, 2**63)")
    return int(v)


def check_stream_args(seed, step, tensor_id) -> tuple[int, int, int]:
    """Validate a stream's ``(seed, step, tensor_id)``: ints in ``[0, 2**63)``.

    Raises TypeError (not an int, or a bool) or ValueError (out of range) naming the argument.
    """
    return _check_id(seed, "seed"), _check_id(step, "step"), _check_id(tensor_id, "tensor_id")


def mix64_np(z) -> np.ndarray:
    """:func:`mix64` on a numpy array (or scalar) of uint64, wrapping modulo 2**64."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * MIX_MUL1
        z = (z ^ (z >> _S27)) * MIX_MUL2
        return z ^ (z >> _S31)


def stream_key_np(seed, step, tensor_id) -> np.uint64:
    """:func:`stream_key` in numpy, with the arguments checked by :func:`check_stream_args`."""
    seed, step, tensor_id = (np.uint64(v) for v in check_stream_args(seed, step, tensor_id))
    return np.uint64(mix64_np(mix64_np(mix64_np(seed) ^ step) ^ tensor_id))


def random_u64_np(key, index) -> np.ndarray:
    """:func:`random_u64` for an array of non-negative integer indices; returns uint64.

    Example::

        >>> random_u64_np(stream_key_np(1, 2, 3), np.arange(2))    # the first two numbers
        array([12560079469515091432,  9643713164311169692], dtype=uint64)
    """
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"key must be an int in [0, 2**64), got {type(key).__name__}")
    if not 0 <= int(key) < 1 << 64:
        raise ValueError(f"key={int(key)} is outside [0, 2**64)")
    idx = np.asarray(index)
    if idx.dtype == np.bool_ or idx.dtype.kind not in "iu":
        raise TypeError(f"index must be an integer array, got dtype {idx.dtype}")
    if idx.dtype.kind == "i" and idx.size and int(idx.min()) < 0:
        raise ValueError("index must be non-negative")
    with np.errstate(over="ignore"):
        return mix64_np(np.uint64(key) + (idx.astype(np.uint64) + _U1) * GOLDEN)


# ---------------------------------------------------------------------------------------------
# Rounding kernels: one per-element function, a serial and a prange driver each.


@njit(cache=True)
def _top_bits(key, bits, out, first):
    for i in range(out.shape[0]):
        out[i] = np.int64(random_u64(key, np.uint64(first) + np.uint64(i)) >> np.uint64(64 - bits))


def check_first(first) -> int:
    """A stream position: a non-negative int below 2**62."""
    if isinstance(first, bool) or not isinstance(first, (int, np.integer)):
        raise TypeError(f"first must be an int, got {type(first).__name__}")
    if not 0 <= first < 1 << 62:
        raise ValueError(f"first={first} is outside 0..2**62-1")
    return int(first)


def random_top_bits(seed: int, step: int, tensor_id: int, n: int, bits: int,
                    first: int = 0) -> np.ndarray:
    """The top ``bits`` bits of elements ``first..first+n-1`` of the stream, as int64 (the
    random fraction stochastic rounding adds); equals ``random_u64_np(...) >> (64 - bits)``."""
    if not 1 <= bits <= 62:
        raise ValueError(f"bits={bits} is outside 1..62")
    out = np.empty(n, dtype=np.int64)
    _top_bits(np.uint64(stream_key(*check_stream_args(seed, step, tensor_id))), bits, out,
              np.int64(check_first(first)))
    return out


@njit(cache=True)
def shift_add(v, s, add):
    """``(v + add) >> s`` for int64 ``v``, ``0 <= s <= 62`` and ``0 <= add < 2**s``, exactly and
    without overflow: the floor of ``v / 2**s`` plus the carry out of the low ``s`` bits."""
    v = np.int64(v)
    s = np.int64(s)
    low = v & ((np.int64(1) << s) - np.int64(1))
    return (v >> s) + ((low + np.int64(add)) >> s)


@njit(cache=True, inline="always")
def _stochastic_element(w, i, s, q, key):
    mask = (_U1 << np.uint64(s)) - _U1
    add = np.int64(random_u64(key, i) & mask)
    return saturate(shift_add(w[i], s, add), q)


@njit(cache=True, inline="always")
def _nearest_element(w, i, s, q):
    half = (np.int64(1) << np.int64(s - 1)) if s > 0 else np.int64(0)
    return saturate(shift_add(w[i], s, half), q)


@njit(cache=True)
def _stochastic_serial(w, out, s, q, key):
    for i in range(w.shape[0]):
        out[i] = _stochastic_element(w, i, s, q, key)


@njit(cache=True, parallel=True)
def _stochastic_parallel(w, out, s, q, key):
    for i in prange(w.shape[0]):
        out[i] = _stochastic_element(w, i, s, q, key)


@njit(cache=True)
def _nearest_serial(w, out, s, q):
    for i in range(w.shape[0]):
        out[i] = _nearest_element(w, i, s, q)


@njit(cache=True, parallel=True)
def _nearest_parallel(w, out, s, q):
    for i in prange(w.shape[0]):
        out[i] = _nearest_element(w, i, s, q)


def check_wide(w, name: str) -> np.ndarray:
    """A numpy int32/int64 array of any shape (TypeError naming ``name`` otherwise)."""
    if not isinstance(w, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(w).__name__}")
    if w.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"{name} must have dtype int32 or int64, got {w.dtype}")
    return w


def check_shift(shift, name: str = "shift") -> int:
    """An int in ``0..SHIFT_MAX`` (TypeError/ValueError naming ``name`` otherwise)."""
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)):
        raise TypeError(f"{name} must be an int in 0..{SHIFT_MAX}, got {type(shift).__name__}")
    if not 0 <= shift <= SHIFT_MAX:
        raise ValueError(f"{name}={shift} is outside 0..{SHIFT_MAX}")
    return int(shift)


def stochastic_round_shift(w: np.ndarray, shift: int, bits: int, *, seed: int, step: int,
                           tensor_id: int, parallel: bool = True) -> np.ndarray:
    r"""Stochastically round wide codes to ``bits``-wide codes, dropping ``shift`` bits.

    .. math::

        y_i = \operatorname{sat}\big((w_i + (r_i \bmod 2^s)) \gg s\big), \qquad
        r_i = \operatorname{random\_u64}(\operatorname{stream\_key}(seed, step, tensor\_id), i),

    with ``i`` the flat C-order index, so ``E[y_i] = w_i / 2**s`` before saturation.

    Args:
        w: int32 or int64 array of wide codes, any shape.
        shift: bits dropped, ``0..62`` (0 only saturates).
        bits: output code width, 2..16; codes are saturated to ``[-(2**(bits-1)-1),
            2**(bits-1)-1]``.
        seed, step, tensor_id: the stream, ints in ``[0, 2**63)``.
        parallel: run on all Numba threads (results are identical either way).

    Returns:
        Codes of ``w``'s shape with dtype ``code_dtype(bits)``.

    Example::

        >>> w = np.full(4, 3, np.int64)                 # 1.5 -> 1 or 2, each half the time
        >>> stochastic_round_shift(w, 1, 8, seed=7, step=0, tensor_id=2)
        array([1, 1, 2, 1], dtype=int8)
    """
    check_wide(w, "w")
    s = check_shift(shift)
    bits = check_bits(bits, "bits")
    key = np.uint64(stream_key(*check_stream_args(seed, step, tensor_id)))
    flat = np.ascontiguousarray(w).reshape(-1)
    out = np.empty(flat.shape[0], dtype=code_dtype(bits))
    (_stochastic_parallel if parallel else _stochastic_serial)(flat, out, s, qmax(bits), key)
    return out.reshape(w.shape)


def round_shift_nearest(w: np.ndarray, shift: int, bits: int, *,
                        parallel: bool = True) -> np.ndarray:
    """Round wide codes to the nearest ``bits``-wide code (ties up), dropping ``shift`` bits.

    ``y = saturate((w + 2**(shift-1)) >> shift, qmax(bits))`` (``shift == 0``: ``y =
    saturate(w)``), i.e. :func:`qkernels.fixedpoint.round_shift` followed by saturation, for
    every int64 ``w``.

    Args:
        w: int32 or int64 array of wide codes, any shape.
        shift: bits dropped, ``0..62``.
        bits: output code width, 2..16.
        parallel: run on all Numba threads (results are identical either way).

    Returns:
        Codes of ``w``'s shape with dtype ``code_dtype(bits)``.

    Example::

        >>> round_shift_nearest(np.array([3, -3, -5, 2000]), 1, 8)
        array([ 2, -1, -2, 127], dtype=int8)
    """
    check_wide(w, "w")
    s = check_shift(shift)
    bits = check_bits(bits, "bits")
    flat = np.ascontiguousarray(w).reshape(-1)
    out = np.empty(flat.shape[0], dtype=code_dtype(bits))
    (_nearest_parallel if parallel else _nearest_serial)(flat, out, s, qmax(bits))
    return out.reshape(w.shape)
