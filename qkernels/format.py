"""Integer tensors as (codes, exponent) pairs, and argument checks shared by the public kernels."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .fixedpoint import BITS_MAX, BITS_MIN


class QTensor(NamedTuple):
    """An integer tensor: codes ``q`` and a per-tensor power-of-two exponent ``exp``.

    The value it stands for is ``q * 2**exp``. A ``k``-bit code lies in
    ``[-(2**(k-1) - 1), 2**(k-1) - 1]``; codes of up to 8 bits are stored as ``int8``, wider
    ones as ``int16``, accumulators and wide stores as ``int32``/``int64``.

    Example::

        >>> x = QTensor(np.array([3, -5], dtype=np.int8), -4)   # 0.1875, -0.3125
        >>> x.value()
        array([ 0.1875, -0.3125])
    """

    q: np.ndarray
    exp: int

    def value(self) -> np.ndarray:
        """The real values as float64 (for people and tests; never used by the kernels)."""
        return np.ldexp(self.q.astype(np.float64), int(self.exp))


def code_dtype(bits: int) -> type[np.integer]:
    """Storage dtype of ``bits``-wide codes: int8 up to 8 bits, int16 up to 16."""
    check_bits(bits, "bits")
    return np.int8 if bits <= 8 else np.int16


def check_bits(bits: int, name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {BITS_MIN}..{BITS_MAX}, got {type(bits).__name__}")
    if not BITS_MIN <= bits <= BITS_MAX:
        raise ValueError(f"{name}={bits} is outside {BITS_MIN}..{BITS_MAX}")
    return int(bits)


def check_exp(exp: int, name: str) -> int:
    if isinstance(exp, bool) or not isinstance(exp, (int, np.integer)):
        raise TypeError(f"{name} must be an int exponent, got {type(exp).__name__}")
    if not -126 <= exp <= 126:
        raise ValueError(f"{name}={exp} is outside -126..126")
    return int(exp)


def check_array(a, name: str, dtypes: tuple, ndims: tuple[int, ...]) -> np.ndarray:
    """Check type, dtype and rank of an array argument; TypeError/ValueError name it."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in dtypes:  # a dtype equals its scalar type (np.dtype("int8") == np.int8)
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {a.dtype}")
    if a.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {a.shape}")
    return a


def check_qtensor(t, name: str) -> QTensor:
    if not isinstance(t, QTensor):
        raise TypeError(f"{name} must be a qkernels.QTensor(q, exp), got {type(t).__name__}")
    check_exp(t.exp, f"{name}.exp")
    return t


def check_codes(a: np.ndarray, bits: int, name: str) -> None:
    """ValueError if any code of ``a`` lies outside the symmetric ``bits`` range."""
    q = (1 << (bits - 1)) - 1
    if a.size and (int(a.min()) < -q or int(a.max()) > q):
        raise ValueError(f"{name} has codes outside the {bits}-bit range [-{q}, {q}]")
