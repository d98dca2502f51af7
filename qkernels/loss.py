r"""The output error of a base-2 softmax cross-entropy, computed without floating point.

For logits ``L = z * 2**e`` (codes ``z``) the network's class probabilities are
:math:`p_i = 2^{L_i} / \sum_j 2^{L_j}` (a softmax with base 2 instead of e, i.e. the logits'
scale is learned ln 2 larger), the loss is :math:`-\log_2 p_y` bits and its gradient is exactly
:math:`p_i - [i = y]`. Per sample, in integers:

* ``d_i = z_i - max(z) <= 0`` taken to ``EXP2_FRAC_BITS`` fractional bits: ``t_i`` (rounded
  half up; for coarse logits saturated far below where ``2**t_i`` is still a unit);
* :math:`2^{t_i} = 2^{\lfloor t_i \rfloor} \cdot 2^{\{t_i\}}`: a table of
  ``round(2**(j / 2**EXP2_FRAC_BITS) * 2**15)`` for the fraction, a right shift for the integer
  part: ``v_i`` (the largest is ``2**15``, so their sum ``s`` is at least ``2**15``);
* one reciprocal per sample, ``r = 2**46 // s``, then ``p_i = (v_i * r) >> 30`` in units of
  ``2**-PROB_BITS``;
* the error ``p_i - [i = y] * 2**PROB_BITS``, exponent ``-PROB_BITS``.

The table is built once from exact decimal arithmetic, so it is the same on every machine.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np
from numba import njit, prange

from .fixedpoint import round_shift
from .format import QTensor, check_array, check_exp

#: Fractional bits of the exponent fed to the 2**x table (table size 2**EXP2_FRAC_BITS).
EXP2_FRAC_BITS = 10
#: Probabilities and errors are integers in units of 2**-PROB_BITS.
PROB_BITS = 16
#: Coarse logits (shift >= 0) saturate t: d is floored at D_FLOOR and the shift capped at
#: SHIFT_CAP, which changes no probability (2**t then lies far below one unit) and keeps
#: huge logits (a diverging run) from overflowing instead of being refused.
D_FLOOR = np.int64(-(1 << 22))
SHIFT_CAP = 40


def _exp2_table() -> np.ndarray:
    n = 1 << EXP2_FRAC_BITS
    with localcontext() as ctx:
        ctx.prec = 40
        two = Decimal(2)
        return np.array([int((two ** (Decimal(j) / n) * (1 << 15)).to_integral_value())
                         for j in range(n)], dtype=np.int64)


#: round(2**(j / 2**EXP2_FRAC_BITS) * 2**15) for j in 0 .. 2**EXP2_FRAC_BITS - 1.
EXP2_TABLE = _exp2_table()


@njit(cache=True, parallel=True)
def _xent_error(z, z_shift, labels, table, err):
    n_classes = z.shape[1]
    mask = np.int64((1 << EXP2_FRAC_BITS) - 1)
    for n in prange(z.shape[0]):
        top = np.int64(z[n, 0])
        for i in range(1, n_classes):
            top = max(top, np.int64(z[n, i]))
        v = np.empty(n_classes, dtype=np.int64)
        total = np.int64(0)
        for i in range(n_classes):
            d = np.int64(z[n, i]) - top
            if z_shift >= 0:
                # saturating: any d <= -2**22, or any d < 0 shifted by more than 40, gives
                # whole >= 2**12 and v = 0 exactly as the unbounded shift would
                t = max(d, D_FLOOR) << min(z_shift, SHIFT_CAP)
            else:
                t = round_shift(d, -z_shift)
            whole = -(t >> EXP2_FRAC_BITS)  # >= 0
            v[i] = table[t & mask] >> whole if whole < 63 else np.int64(0)
            total += v[i]
        recip = (np.int64(1) << np.int64(46)) // total
        for i in range(n_classes):
            p = (v[i] * recip) >> np.int64(30)
            err[n, i] = p - ((np.int64(1) << PROB_BITS) if i == labels[n] else np.int64(0))


def softmax_xent_error(logits: QTensor, labels: np.ndarray) -> QTensor:
    """Gradient of the base-2 softmax cross-entropy (in bits) w.r.t. the logits, per sample.

    Args:
        logits: codes (N, K), any integer dtype, and their exponent.
        labels: class indices (N,), integers in ``[0, K)``.

    Returns:
        int64 codes (N, K) with exponent ``-PROB_BITS``: ``p - onehot(labels)``.
    """
    check_array(logits.q, "logits.q", (np.int8, np.int16, np.int32, np.int64), (2,))
    check_exp(logits.exp, "logits.exp")
    check_array(labels, "labels", (np.int8, np.uint8, np.int16, np.int32, np.int64), (1,))
    n, k = logits.q.shape
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries, expected {n} (one per row)")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k}), got {int(labels.min())}.."
                         f"{int(labels.max())}")
    if logits.q.size and max(-int(logits.q.min()), int(logits.q.max())) >= (1 << 61):
        raise ValueError("logits.q must hold codes below 2**61 (requantize them to 16 bits)")
    err = np.empty((n, k), dtype=np.int64)
    _xent_error(np.ascontiguousarray(logits.q), logits.exp + EXP2_FRAC_BITS,
                labels.astype(np.int64), EXP2_TABLE, err)
    return QTensor(err, -PROB_BITS)
