"""The L1BN equations on exact rationals, and the error bounds the kernels promise against them.

Nothing here is shared with the kernels or with :mod:`qkernels.oracle`: every quantity is
computed from its definition (the paper's equations (9)-(11) and (20), the running statistics
and the folded inference of Algorithm 1) with Python integers and :class:`fractions.Fraction`,
so a change to the kernels' per-channel arithmetic (``qkernels.fixedpoint`` and the
``*_params`` functions of ``qkernels.l1bn``) is measured against something it cannot change.

Values are in LSBs of the result (output, dx or dgamma codes) and are never rounded here,
except by :func:`round_half_up`, the rounding the codes are defined by. The bounds are those
derived in ``docs/l1bn-integer.md``; each function names its section. They bound ``E``, the
distance between a kernel's value before rounding and the exact value, which by the rounding
lemma (section 5) puts every code within ``1/2 + E`` of the exact value.

Slow (one Fraction per distinct code and channel): for tests and for porting, not training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

HALF = Fraction(1, 2)
#: The relative error unit of a 31-bit dyadic mantissa (docs section 1).
EPS0 = Fraction(1, 2**30)


def pow2(e: int) -> Fraction:
    """2**e as an exact rational (any integer e)."""
    return Fraction(2) ** int(e)


def dyadic(mant: int, exp: int) -> Fraction:
    """The value mant * 2**exp."""
    return int(mant) * pow2(exp)


def round_half_up(v: Fraction) -> int:
    """floor(v + 1/2): the rounding every code is defined by (docs section 1)."""
    return math.floor(v + HALF)


def saturate(v: int, q: int) -> int:
    return min(max(int(v), -q), q)


def sign(v) -> int:
    return (v > 0) - (v < 0)


@dataclass(frozen=True)
class Channel:
    """Exact statistics of one channel's codes: m, S = sum x, D = sum |m x - S| = m**2 sigma
    (input LSBs), sum of signs, and the distinct codes with their counts."""

    values: tuple[int, ...]
    counts: tuple[int, ...]
    m: int
    s: int
    dev: int
    sign_sum: int

    @classmethod
    def of(cls, codes) -> "Channel":
        """The channel of an array of codes."""
        values, counts = np.unique(np.asarray(codes).ravel().astype(np.int64),
                                   return_counts=True)
        return cls.from_counts(values, counts)

    @classmethod
    def from_counts(cls, values, counts) -> "Channel":
        """A channel given as distinct codes and how often each occurs (any m, no array)."""
        v, c = [int(a) for a in values], [int(a) for a in counts]
        m = sum(c)
        s = sum(a * n for a, n in zip(v, c))
        return cls(tuple(v), tuple(c), m, s, sum(n * abs(m * a - s) for a, n in zip(v, c)),
                   sum(n * sign(m * a - s) for a, n in zip(v, c)))

    def sgn(self, x: int) -> int:
        """sgn(x - mu) = sgn(m x - S)."""
        return sign(self.m * int(x) - self.s)

    def d_eps(self, eps_shift: int | None) -> Fraction:
        """D_eps = D + m**2 * 2**eps_shift (eps_shift = eps_log2 - x_exp; None: no epsilon)."""
        extra = 0 if eps_shift is None else self.m * self.m * pow2(eps_shift)
        return Fraction(self.dev) + extra


# --- forward (equations 9-11, docs section 2) --------------------------------------------------


def forward_slope(ch: Channel, gamma_q: int, gamma_shift: int, eps_shift: int | None) -> Fraction:
    """K: output LSBs per unit of u = m x - S (0 for a constant channel without epsilon)."""
    den = ch.d_eps(eps_shift)
    return Fraction(0) if den == 0 else int(gamma_q) * pow2(gamma_shift) * ch.m / den


def forward_value(ch: Channel, x: int, gamma_q: int, gamma_shift: int, beta_q: int,
                  beta_shift: int, eps_shift: int | None) -> Fraction:
    """y = gamma * (x - mu)/(sigma + eps) + beta in output LSBs: K*(m x - S) + beta."""
    return _forward_affine(ch, gamma_q, gamma_shift, beta_q, beta_shift, eps_shift)(x)


def _forward_affine(ch: Channel, gamma_q: int, gamma_shift: int, beta_q: int, beta_shift: int,
                    eps_shift: int | None):
    """y of one channel as a function of the code x, its per-channel terms computed once."""
    k = forward_slope(ch, gamma_q, gamma_shift, eps_shift)
    beta = int(beta_q) * pow2(beta_shift)
    return lambda x: k * (ch.m * int(x) - ch.s) + beta


# --- backward (equation 20, docs section 4) ----------------------------------------------------


@dataclass(frozen=True)
class GradChannel:
    """Exact per-channel sums of the backward: sum g, sum g*x, P = m sum gx - S sum g, the
    range of g, and the distinct (g, sign) pairs that occur."""

    sg: int
    sgx: int
    p: int
    g_min: int
    g_max: int
    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def from_groups(cls, ch: Channel, groups) -> "GradChannel":
        """The sums of a channel given as ``(x, g, count)`` groups (any m, no array)."""
        sg = sum(int(g) * int(n) for _, g, n in groups)
        sgx = sum(int(x) * int(g) * int(n) for x, g, n in groups)
        gs = [int(g) for _, g, _ in groups]
        pairs = sorted({(int(g), ch.sgn(x)) for x, g, _ in groups})
        return cls(sg, sgx, ch.m * sgx - ch.s * sg, min(gs), max(gs), tuple(pairs))

    @classmethod
    def of(cls, ch: Channel, x_codes, g_codes) -> "GradChannel":
        x = np.asarray(x_codes).ravel().astype(np.int64)
        g = np.asarray(g_codes).ravel().astype(np.int64)
        sg = int(g.sum())
        sgx = int((g * x).sum())  # |g*x| <= 2**30 and m <= 2**23: exact in int64
        keys = np.unique(g * 4 + np.sign(ch.m * x - ch.s) + 1).tolist()
        return cls(sg, sgx, ch.m * sgx - ch.s * sg, int(g.min()), int(g.max()),
                   tuple((k // 4, k % 4 - 1) for k in keys))


def backward_slope(ch: Channel, gamma_q: int, k_shift: int, eps_shift: int | None) -> Fraction:
    """K_b = gamma_q * m / D_eps * 2**k_shift: dx LSBs per unit of m g - sum g."""
    return forward_slope(ch, gamma_q, k_shift, eps_shift)


def backward_value(ch: Channel, gc: GradChannel, g: int, s: int, gamma_q: int, k_shift: int,
                   eps_shift: int | None) -> Fraction:
    """dx in dx LSBs for an element with error code g and sign s:
    K_b*(m g - sum g) - K_b*(P/D_eps)*(m s - sum s), i.e. equation (20)."""
    return _backward_affine(ch, gc, gamma_q, k_shift, eps_shift)(g, s)


def _backward_affine(ch: Channel, gc: GradChannel, gamma_q: int, k_shift: int,
                     eps_shift: int | None):
    """Equation (20) of one channel as a function of (g, s), its per-channel terms computed once."""
    den = ch.d_eps(eps_shift)
    if den == 0:
        return lambda g, s: Fraction(0)
    kb = backward_slope(ch, gamma_q, k_shift, eps_shift)
    kpr = kb * Fraction(gc.p) / den
    return lambda g, s: kb * (ch.m * int(g) - gc.sg) - kpr * (ch.m * s - ch.sign_sum)


def amplification(ch: Channel, gc: GradChannel, gamma_q: int, k_shift: int,
                  eps_shift: int | None) -> Fraction:
    """a = |K_b| m max|g| (docs section 5): the gain from dy codes to dx codes times the largest
    error code."""
    kb = backward_slope(ch, gamma_q, k_shift, eps_shift)
    return abs(kb) * ch.m * max(abs(gc.g_min), abs(gc.g_max))


def deviation_amplification(ch: Channel, gc: GradChannel, gamma_q: int, k_shift: int,
                            eps_shift: int | None) -> Fraction:
    """a' = |K_b| m (max g - min g) (docs section 5, int16 codes)."""
    kb = backward_slope(ch, gamma_q, k_shift, eps_shift)
    return abs(kb) * ch.m * (gc.g_max - gc.g_min)


def dgamma_value(ch: Channel, gc: GradChannel, shift: int, eps_shift: int | None) -> Fraction:
    """sum(g * xhat) * 2**shift = m P / D_eps * 2**shift, in dgamma codes."""
    den = ch.d_eps(eps_shift)
    return Fraction(0) if den == 0 else ch.m * Fraction(gc.p) / den * pow2(shift)


# --- running statistics and folded inference (docs section 7) ----------------------------------


def batch_mean_code(ch: Channel, x_exp: int, run_exp: int) -> Fraction:
    """The batch mean S/m in running-statistics codes (exponent run_exp)."""
    return Fraction(ch.s, ch.m) * pow2(x_exp - run_exp)


def batch_dev_code(ch: Channel, x_exp: int, run_exp: int) -> Fraction:
    """The batch L1 deviation sigma = D/m**2 in running-statistics codes."""
    return Fraction(ch.dev, ch.m * ch.m) * pow2(x_exp - run_exp)


def inference_value(x: int, gamma_q: int, gamma_shift: int, beta_q: int, beta_shift: int,
                    run_mean: int, run_dev: int, to_code: int, eps_shift: int | None) -> Fraction:
    """y = gamma*(x - mu)/(sigma + eps) + beta in output LSBs, with mu = run_mean * 2**to_code
    and sigma = max(run_dev, 0) * 2**to_code in input codes (to_code = RUN_EXP - x_exp)."""
    mu = int(run_mean) * pow2(to_code)
    den = max(int(run_dev), 0) * pow2(to_code) + (0 if eps_shift is None else pow2(eps_shift))
    beta = int(beta_q) * pow2(beta_shift)
    if den == 0:
        return beta
    return int(gamma_q) * pow2(gamma_shift) * (int(x) - mu) / den + beta


# --- codes against exact values -----------------------------------------------------------------


def code_window(exact: Fraction, bound: Fraction, q: int) -> tuple[int, int]:
    """The codes a value within ``bound`` of ``exact`` can round to (half up, saturated):
    a code outside this window is off by more than 1/2 + bound LSB."""
    return (saturate(round_half_up(exact - bound), q), saturate(round_half_up(exact + bound), q))


# --- the documented bounds -----------------------------------------------------------------------
# E (the distance before rounding) per docs/l1bn-integer.md. Each holds where its docstring says;
# elsewhere the docs promise less (only signs of saturated codes) and nothing is checked here.

#: int8 forward, every output with |K u| <= 2**21 (section 5: narrow < 0.073, wide < 0.02).
FORWARD8 = Fraction(73, 1000)
#: int8 backward, narrow form (section 5).
BACKWARD8_NARROW = Fraction(9, 100)
#: 16-bit forward, narrow (section 5, int16 codes).
FORWARD16_NARROW = Fraction(8, 100)
#: 16-bit backward, narrow (section 5, int16 codes).
BACKWARD16_NARROW = Fraction(1, 10)
#: 16-bit forward, every output that is neither saturated nor clamped (section 5).
FORWARD16 = Fraction(27, 100)


def backward8_bound(a: Fraction) -> Fraction | None:
    """int8 backward (section 5): narrow < 0.09, wide 51 eps0 a + 0.003; promised for
    a <= 2**23 (None above: no bound is promised there)."""
    if a > 2**23:
        return None
    return max(BACKWARD8_NARROW, 51 * EPS0 * a + Fraction(3, 1000))


def forward16_bound(k: Fraction, u: int, sh: int) -> Fraction:
    """16-bit forward at u = m x - S (section 5, int16 codes): narrow < 0.08; wide
    8.5 eps0 |K u| + 2**-(sh+1), plus |u| 2**-(sh+1) when sh is held below -ke-1 (K's
    rounding to Kf; ke is K's dyadic exponent)."""
    wide = Fraction(17, 2) * EPS0 * abs(k * u) + pow2(-(sh + 1))
    if k and sh < -(_dyadic_exponent(k)) - 1:
        wide += abs(u) * pow2(-(sh + 1))
    # whatever sh the kernel chose, section 5 promises E < 0.27 (sh >= 40 where this term
    # matters): a lower sh must not widen its own tolerance
    return min(max(FORWARD16_NARROW, wide), FORWARD16)


def _dyadic_exponent(v: Fraction) -> int:
    """The exponent e of v as a normalised dyadic (2**30 <= |v|/2**e < 2**31)."""
    v = abs(v)
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if pow2(e) > v:
        e -= 1
    return e - 30


def backward16_bound(a_dev: Fraction, q: int) -> Fraction | None:
    """16-bit backward (section 5, int16 codes): narrow < 0.1; wide
    8.5 eps0 (a' + q + 1) + 17 eps0 a' + 2**-9 + 2**-6; promised for a' <= 2**24."""
    if a_dev > 2**24:
        return None
    wide = Fraction(17, 2) * EPS0 * (a_dev + q + 1) + 17 * EPS0 * a_dev + pow2(-9) + pow2(-6)
    return max(BACKWARD16_NARROW, wide)


#: dgamma (sections 4 and 5): relative error below 8.5 eps0, plus half a code.
DGAMMA_REL = Fraction(17, 2) * EPS0


# --- whole tensors: the codes the contract allows -------------------------------------------------


def _rows(a: np.ndarray) -> np.ndarray:
    """(N, C[, H, W]) -> (C, m) int64."""
    return np.moveaxis(np.asarray(a), 1, 0).reshape(a.shape[1], -1).astype(np.int64)


def _unrows(rows: np.ndarray, shape: tuple) -> np.ndarray:
    return np.moveaxis(rows.reshape((shape[1], shape[0]) + tuple(shape[2:])), 0, 1)


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def forward_reference(xq, x_exp, gamma_q, gamma_exp, beta_q, beta_exp, out_bits, out_exp,
                      eps_log2=None):
    """For the training forward's output codes: ``(lo, hi)``, int64 arrays shaped like ``xq``:
    the window of codes within ``1/2 + E`` of each element's exact value (E: :data:`FORWARD8` for int8 codes, :data:`FORWARD16` for
    int16; an output with |K u| > 2**21, where the docs promise only saturation, gets the
    saturated code alone)."""
    q = _qmax(out_bits)
    bound = FORWARD8 if np.asarray(xq).dtype == np.int8 else FORWARD16
    eps_shift = None if eps_log2 is None else eps_log2 - x_exp
    rows = _rows(xq)
    out = np.empty((2,) + rows.shape, dtype=np.int64)
    for c, row in enumerate(rows):
        ch = Channel.of(row)
        args = (int(gamma_q[c]), gamma_exp - out_exp, int(beta_q[c]), beta_exp - out_exp,
                eps_shift)
        k = forward_slope(ch, args[0], args[1], eps_shift)
        y_of = _forward_affine(ch, *args)
        vals, inv = np.unique(row, return_inverse=True)
        table = np.empty((2, len(vals)), dtype=np.int64)
        for i, v in enumerate(vals.tolist()):
            y = y_of(v)
            e = bound if abs(k * (ch.m * v - ch.s)) <= 2**21 else abs(y) / 2
            table[:, i] = code_window(y, e, q)
        out[:, c] = table[:, inv.ravel()]
    return tuple(_unrows(r, np.asarray(xq).shape) for r in out)


def backward_reference(xq, gq, x_exp, g_exp, gamma_q, gamma_exp, dx_bits, dx_exp,
                       eps_log2=None):
    """For the backward's dx codes: ``(lo, hi, promised)``: the window of codes within
    ``1/2 + E`` of each element's exact value, and a per-channel
    boolean array, False where the docs promise no bound (int8: amplification a > 2**23;
    16-bit: a' > 2**24), whose windows are then the whole code range."""
    q = _qmax(dx_bits)
    wide_codes = np.asarray(xq).dtype != np.int8 or np.asarray(gq).dtype != np.int8
    eps_shift = None if eps_log2 is None else eps_log2 - x_exp
    k_shift = gamma_exp + g_exp - x_exp - dx_exp
    xr, gr = _rows(xq), _rows(gq)
    out = np.empty((2,) + xr.shape, dtype=np.int64)
    promised = np.ones(xr.shape[0], dtype=bool)
    for c, (xrow, grow) in enumerate(zip(xr, gr)):
        ch = Channel.of(xrow)
        gc = GradChannel.of(ch, xrow, grow)
        gamma = int(gamma_q[c])
        if wide_codes:
            e = backward16_bound(deviation_amplification(ch, gc, gamma, k_shift, eps_shift), q)
        else:
            e = backward8_bound(amplification(ch, gc, gamma, k_shift, eps_shift))
        promised[c] = e is not None
        key = grow * 4 + np.sign(ch.m * xrow - ch.s) + 1
        keys, inv = np.unique(key, return_inverse=True)
        table = np.empty((2, len(keys)), dtype=np.int64)
        dx_of = _backward_affine(ch, gc, gamma, k_shift, eps_shift)
        for i, kv in enumerate(keys.tolist()):
            y = dx_of(kv // 4, kv % 4 - 1)
            table[:, i] = code_window(y, e, q) if e is not None else (-q, q)
        out[:, c] = table[:, inv.ravel()]
    return (*(_unrows(r, np.asarray(xq).shape) for r in out), promised)


def dgamma_reference(xq, gq, x_exp, g_exp, dgamma_exp, eps_log2=None):
    """For dgamma codes: ``(lo, hi)`` per channel, the codes within ``1/2 + DGAMMA_REL*|z|`` of
    the exact z = sum(g * xhat) in dgamma LSBs (no saturation: dgamma codes are int64)."""
    eps_shift = None if eps_log2 is None else eps_log2 - x_exp
    lo, hi = [], []
    for xrow, grow in zip(_rows(xq), _rows(gq)):
        ch = Channel.of(xrow)
        z = dgamma_value(ch, GradChannel.of(ch, xrow, grow), g_exp - dgamma_exp, eps_shift)
        e = DGAMMA_REL * abs(z)
        lo.append(round_half_up(z - e))
        hi.append(round_half_up(z + e))
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
