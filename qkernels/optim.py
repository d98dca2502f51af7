r"""Integer SGD with momentum on a wide weight store.

A trainable tensor lives in a *store*: int32 codes ``w`` with a per-tensor exponent ``e_s`` and
``store_bits`` significant bits (wider than the ``k_W``-bit weights the layers use), plus an
int64 velocity ``v`` with the same exponent. One step with gradient codes ``g`` (exponent
``e_g``, already quantized to ``k_G`` bits) is, with torch's SGD convention,

.. math::

    g_s = \operatorname{round}(g \cdot 2^{e_g - e_s})
          + \operatorname{round}(\lambda_q w / 2^{24}), \qquad
    v' = \operatorname{round}(\mu_q v / 2^{16}) + g_s, \qquad
    w' = w - \operatorname{round}(\eta_q v' / 2^{24}),

where ``mu_q / 2**MOMENTUM_BITS`` is the momentum, ``eta_q / 2**LR_BITS`` the learning rate
(per unit of ``g``: a batch mean folds its ``1/N`` in here) and ``lambda_q / 2**DECAY_BITS``
the weight decay in the same units (``N`` times torch's ``weight_decay`` for a gradient summed
over a batch of ``N``; 0 by default, which adds nothing). Rounding is half up. When some
``|w'|`` exceeds the store's ``2**(store_bits-1) - 1``, the store's exponent rises by the
smallest ``s`` that brings every code back inside, and both ``w'`` and ``v'`` are divided by
``2**s`` (rounded half up); otherwise ``s = 0``:

.. math:: w = \operatorname{round}(w' / 2^s), \qquad v = \operatorname{round}(v' / 2^s),
          \qquad e_s \leftarrow e_s + s .

So the store does not clip weights. (Behind batch norm a layer's weights are scale-free and
their norm grows under SGD; a store with a fixed exponent would pin the growing weights at its
limit.) The exponent only rises, up to ``exp_max`` (where a diverging run's codes saturate
instead, and are counted); the store keeps ``store_bits`` bits relative to the largest
weight. The velocity is capped at ``+-2**VELOCITY_BITS`` codes, which only a diverging run
reaches.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._jit import pick, serial_and_parallel
from .fixedpoint import MOMENTUM_BITS, qmax, round_shift
from .format import QTensor, check_array, check_exp
from .ieee import _bits_of, _code_at, _encode

#: The learning rate is a fixed-point fraction lr_q / 2**LR_BITS.
LR_BITS = 24
#: Widest store the update supports (int32 codes).
STORE_BITS_MAX = 31


#: The weight decay is a fixed-point fraction decay_q / 2**DECAY_BITS of the store's codes.
DECAY_BITS = 24
#: decay_q stays below 2**DECAY_MAX_BITS, so decay_q * w (|w| < 2**31) fits int64.
DECAY_MAX_BITS = 31


def decay_code(decay: float) -> int:
    """Fixed-point weight decay ``round(decay * 2**DECAY_BITS)``, with ``decay`` in gradient
    units (``N * weight_decay`` for a gradient summed over ``N`` samples)."""
    return int(round(decay * (1 << DECAY_BITS)))


def lr_code(lr: float) -> int:
    """Fixed-point learning rate ``round(lr * 2**LR_BITS)`` (a config constant, set once)."""
    return int(round(lr * (1 << LR_BITS)))


def momentum_code(momentum: float) -> int:
    """Fixed-point momentum ``round(momentum * 2**MOMENTUM_BITS)``."""
    return int(round(momentum * (1 << MOMENTUM_BITS)))


#: The velocity saturates at +-2**VELOCITY_BITS codes, so momentum_q * v and lr_q * v stay far
#: inside int64 (momentum_q <= 2**16, lr_q < 2**LR_BITS), and |w'| < 2**31 + 2**38.
VELOCITY_BITS = 38


@njit(cache=True)
def store_shift(lo, hi, q):
    """The smallest ``s >= 0`` with ``round(lo / 2**s) >= -q`` and ``round(hi / 2**s) <= q``."""
    s = 0
    while round_shift(hi, s) > q or round_shift(lo, s) < -q:
        s += 1
    return s


@njit(cache=True, inline="always")
def _grad_shifts(g_shift):
    """(left, right, half): the gradient in store units is ``((g << left) + half) >> right``,
    i.e. ``round_shift(g, -g_shift)``. A left shift past VELOCITY_BITS saturates the velocity
    anyway, so it is capped there (|g| < 2**24 stays inside int64: a diverging run saturates
    instead of overflowing); a right shift past 40 rounds every |g| < 2**24 to 0, as any
    larger one does."""
    left = min(max(g_shift, 0), VELOCITY_BITS)
    right = min(max(-g_shift, 0), 40)
    return left, right, (np.int64(1) << right) >> 1


@njit(cache=True, inline="always")
def _update(wi, gs, vi, momentum_q, lr_q, decay_q):
    """One element's step from its store code ``wi``, gradient ``gs`` in store units and
    velocity ``vi``: (v', w') of the module docstring, the velocity capped."""
    vmax = np.int64(1) << VELOCITY_BITS
    gs += (decay_q * wi + (np.int64(1) << (DECAY_BITS - 1))) >> DECAY_BITS
    vi = ((momentum_q * vi + (np.int64(1) << (MOMENTUM_BITS - 1))) >> MOMENTUM_BITS) \
        + min(max(gs, -vmax), vmax)
    vi = min(max(vi, -vmax), vmax)
    return vi, wi - ((lr_q * vi + (np.int64(1) << (LR_BITS - 1))) >> LR_BITS)


def _sgd(w, v, g, g_shift, momentum_q, lr_q, decay_q, q, w_new, g_bits, w_exp, out):
    """Update ``v`` in place, write ``w'`` (int64) to ``w_new`` and ``sat(w')`` to ``w``;
    returns (min, max) of w'. ``sat(w')`` is the store whenever every w' fits (the common
    case, so that a step without a rise is one pass; otherwise :func:`_rescale` rewrites w
    from w_new). The body calls nothing and its only branches test ``g_bits``'s length, the
    same for every element (LLVM moves them out of the loop), so the loop vectorizes.

    With ``g_bits`` the gradient comes as float32 bit patterns instead (``g`` unused): each
    is read at the store's exponent ``w_exp``, which is ``round_shift`` of its exact code, and
    ``out`` receives the float32 bits of ``sat(w')`` at ``w_exp`` (the new container when the
    exponent does not rise)."""
    left, right, half = _grad_shifts(g_shift)
    lo = np.int64(1) << 62
    hi = -lo
    for i in prange(w.shape[0]):
        if g_bits.shape[0]:
            gs = _code_at(g_bits[i], w_exp)
        else:
            gs = ((np.int64(g[i]) << left) + half) >> right
        vi, wn = _update(np.int64(w[i]), gs, v[i], momentum_q, lr_q, decay_q)
        v[i] = vi
        w_new[i] = wn
        w[i] = min(max(wn, -q), q)
        if g_bits.shape[0]:
            out[i] = _encode(w[i], w_exp)
        lo = min(lo, wn)
        hi = max(hi, wn)
    return lo, hi


@njit(cache=True, parallel=True)
def _encode_all(w, e, out):
    for i in prange(w.shape[0]):
        out[i] = _encode(w[i], e)


def _sgd_inplace(wb, v, g_bits, w_exp, momentum_q, lr_q, decay_q, q, w_new):
    """:func:`_sgd` with the store as the float32 bits ``wb`` of its container (codes at
    ``w_exp``, read exactly by ``_code_at``) and the gradient's container ``g_bits``; writes
    the float32 bits of ``sat(w')`` back into ``wb``, ``w'`` to ``w_new``; returns (min, max)
    of w'. Each element is read before it is written, so the loop vectorizes in place."""
    lo = np.int64(1) << 62
    hi = -lo
    for i in prange(wb.shape[0]):
        vi, wn = _update(_code_at(wb[i], w_exp), _code_at(g_bits[i], w_exp), v[i], momentum_q,
                         lr_q, decay_q)
        v[i] = vi
        w_new[i] = wn
        wb[i] = _encode(min(max(wn, -q), q), w_exp)
        lo = min(lo, wn)
        hi = max(hi, wn)
    return lo, hi


#: serial (small tensors) and parallel (large ones): ``prange`` is ``range`` in the first.
_sgd_s, _sgd_p = serial_and_parallel(_sgd)
_sgd_inplace_s, _sgd_inplace_p = serial_and_parallel(_sgd_inplace)


@njit(cache=True, inline="always")
def _rescaled(wn, s, q):
    """sat(round(w' / 2**s)) and whether it saturated."""
    wi = round_shift(wn, s)
    return min(max(wi, -q), q), np.int64(wi > q or wi < -q)


@njit(cache=True, parallel=True)
def _rescale(w, v, w_new, s, q):
    """w = sat(round(w' / 2**s)), v = round(v / 2**s); returns the number of saturated codes
    (none unless the exponent's ceiling held s down)."""
    saturated = 0
    for i in prange(w.shape[0]):
        w[i], sat = _rescaled(w_new[i], s, q)
        saturated += sat
        v[i] = round_shift(v[i], s)
    return saturated


@njit(cache=True, parallel=True)
def _rescale_bits(wb, v, w_new, s, q, exp):
    """:func:`_rescale` writing the float32 bits of the store's codes at ``exp`` to ``wb``."""
    saturated = 0
    for i in prange(wb.shape[0]):
        wi, sat = _rescaled(w_new[i], s, q)
        wb[i] = _encode(wi, exp)
        saturated += sat
        v[i] = round_shift(v[i], s)
    return saturated


class SgdResult(NamedTuple):
    """What one :func:`sgd_step` did to the store: how far its exponent rose, and how many
    codes saturated (only at the exponent's ceiling)."""

    rise: int
    saturated: int


def _check_arrays(store: QTensor, velocity: np.ndarray, grad_shape: tuple,
                  store_dtype=np.int32) -> None:
    check_array(store.q, "store.q", (store_dtype,), tuple(range(1, 9)))
    check_array(velocity, "velocity", (np.int64,), (store.q.ndim,))
    if velocity.shape != store.q.shape or grad_shape != store.q.shape:
        raise ValueError(f"store, velocity and grad shapes differ: {store.q.shape}, "
                         f"{velocity.shape}, {grad_shape}")
    if not store.q.flags.c_contiguous or not velocity.flags.c_contiguous:
        raise ValueError("store.q and velocity must be C-contiguous (they are updated in place)")


def _check_constants(lr_q: int, momentum_q: int, decay_q: int) -> None:
    if not 0 <= momentum_q < (1 << MOMENTUM_BITS):
        raise ValueError(f"momentum_q={momentum_q} is outside 0..2**{MOMENTUM_BITS}-1")
    if not 0 < lr_q < (1 << LR_BITS):
        raise ValueError(f"lr_q={lr_q} is outside 1..2**{LR_BITS}-1 (a learning rate below 1)")
    if not 0 <= decay_q < (1 << DECAY_MAX_BITS):
        raise ValueError(f"decay_q={decay_q} is outside 0..2**{DECAY_MAX_BITS}-1 (a weight "
                         f"decay times the batch size below {1 << (DECAY_MAX_BITS - DECAY_BITS)})")


def _check_exps(exp: int, exp_max: int) -> int:
    check_exp(exp, "store.exp")
    exp_max = check_exp(exp_max, "exp_max")
    if exp > exp_max:
        raise ValueError(f"store.exp={exp} is above exp_max={exp_max}")
    return exp_max


def _check_step(store: QTensor, velocity: np.ndarray, grad_shape: tuple, lr_q: int,
                momentum_q: int, decay_q: int, store_bits: int, exp_max: int) -> int:
    _check_arrays(store, velocity, grad_shape)
    if not 2 <= store_bits <= STORE_BITS_MAX:
        raise ValueError(f"store_bits={store_bits} is outside 2..{STORE_BITS_MAX}")
    _check_constants(lr_q, momentum_q, decay_q)
    return _check_exps(store.exp, exp_max)


_NONE_I8 = np.zeros(0, np.int8)
_NONE_I32 = np.zeros(0, np.int32)


def _run(store, velocity, g, g_shift, g_bits, out, lr_q, momentum_q, decay_q, store_bits,
         exp_max) -> SgdResult:
    w, v = store.q.reshape(-1), velocity.reshape(-1)
    q = qmax(store_bits)
    w_new = np.empty(w.shape[0], np.int64)
    kernel = pick(_sgd_s, _sgd_p, w.shape[0])
    lo, hi = kernel(w, v, g, g_shift, momentum_q, lr_q, decay_q, q, w_new, g_bits, store.exp,
                    out)
    s = min(int(store_shift(lo, hi, q)), exp_max - store.exp)
    if s or lo < -q or hi > q:
        return SgdResult(s, int(_rescale(w, v, w_new, s, q)))
    return SgdResult(0, 0)  # the kernel already wrote every w


def sgd_step(store: QTensor, velocity: np.ndarray, grad: QTensor, *, lr_q: int,
             momentum_q: int, store_bits: int, exp_max: int = 126, decay_q: int = 0
             ) -> SgdResult:
    """One in-place SGD step on ``store.q`` (int32) and ``velocity`` (int64, same shape),
    with weight decay ``decay_q`` (:func:`decay_code`; 0: none).

    Returns :class:`SgdResult`: the new store is ``QTensor(store.q, store.exp + rise)``. The
    exponent rises only when a code would leave the store, and never above ``exp_max``: there
    codes saturate instead (a diverging run stays finite) and are counted.
    """
    check_array(grad.q, "grad.q", (np.int8, np.int16, np.int32, np.int64), (store.q.ndim,))
    exp_max = _check_step(store, velocity, grad.q.shape, lr_q, momentum_q, decay_q, store_bits,
                          exp_max)
    g_shift = check_exp(grad.exp, "grad.exp") - store.exp
    if grad.q.size and max(-int(grad.q.min()), int(grad.q.max())) >= (1 << 24):
        raise ValueError("grad.q must hold codes of at most 24 bits (quantize it first)")
    if store.q.size == 0:
        return SgdResult(0, 0)
    return _run(store, velocity, np.ascontiguousarray(grad.q).reshape(-1), g_shift, _NONE_I32,
                _NONE_I32, lr_q, momentum_q, decay_q, store_bits, exp_max)


def sgd_step_f32(store: QTensor, velocity: np.ndarray, grad: np.ndarray, out: np.ndarray, *,
                 lr_q: int, momentum_q: int, store_bits: int, exp_max: int = 126,
                 decay_q: int = 0) -> SgdResult:
    """:func:`sgd_step` with the gradient as its float32 container, writing the new store's
    float32 container to ``out`` (a C-contiguous float32 array of the store's shape): one
    pass instead of three conversions and the step.

    The gradient's values are read at the store's exponent from their bit patterns, which is
    what converting them to exact codes and shifting gives: the results equal
    ``sgd_step(store, velocity, f32_to_codes(grad, 24), ...)`` whenever ``grad`` holds codes
    of at most 24 bits at one exponent (a quantized gradient's container; for arbitrary
    float32 values ``f32_to_codes`` would round them to a common grid first), and
    ``out == codes_to_f32(QTensor(store.q, store.exp + rise))``.
    """
    b = _bits_of(grad, "grad")
    exp_max = _check_step(store, velocity, grad.shape, lr_q, momentum_q, decay_q, store_bits,
                          exp_max)
    check_array(out, "out", (np.float32,), (store.q.ndim,))
    if out.shape != store.q.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {store.q.shape}")
    if store.q.size == 0:
        return SgdResult(0, 0)
    bits_out = out.reshape(-1).view(np.int32)
    res = _run(store, velocity, _NONE_I8, 0, b, bits_out, lr_q, momentum_q, decay_q,
               store_bits, exp_max)
    if res.rise or res.saturated:
        _encode_all(store.q.reshape(-1), store.exp + res.rise, bits_out)
    return res


#: Widest store a float32 container holds exactly (a 24-bit significand).
F32_STORE_BITS_MAX = 24


class F32Store:
    """A parameter's float32 container as its own integer store (codes of at most
    ``store_bits <= 24`` bits at one exponent, held exactly), with its int64 velocity, for
    repeated in-place SGD steps (:meth:`step`).

    The arrays are checked once, here; a step then checks only the gradient and the
    constants. (An optimizer steps every parameter of a network on every batch; for the
    small tensors of a small network, checking the arrays again each time took longer than
    the update.) Both arrays are updated in place by each step.
    """

    def __init__(self, param: np.ndarray, velocity: np.ndarray, store_bits: int):
        check_array(param, "param", (np.float32,), tuple(range(1, 9)))
        if not 2 <= store_bits <= F32_STORE_BITS_MAX:
            raise ValueError(f"store_bits={store_bits} is outside 2..{F32_STORE_BITS_MAX} (a "
                             f"float32 container holds codes of at most {F32_STORE_BITS_MAX} "
                             f"bits)")
        if not param.flags.c_contiguous:
            raise ValueError("param must be C-contiguous (it is updated in place)")
        _check_arrays(QTensor(param, 0), velocity, param.shape, np.float32)
        self.param, self.velocity, self.store_bits = param, velocity, store_bits
        self._wb, self._v = param.reshape(-1).view(np.int32), velocity.reshape(-1)
        self._w_new = np.empty(param.size, np.int64)  # the new codes before saturation
        self._kernel = pick(_sgd_inplace_s, _sgd_inplace_p, param.size)
        self._q = int(qmax(store_bits))

    def step(self, exp: int, grad: np.ndarray, *, lr_q: int, momentum_q: int,
             exp_max: int = 126, decay_q: int = 0) -> SgdResult:
        """:func:`sgd_step_f32_inplace` on the store's arrays, with the store at exponent
        ``exp``; the new exponent is ``exp + rise``."""
        b = _bits_of(grad, "grad")
        if grad.shape != self.param.shape:
            raise ValueError(f"grad has shape {grad.shape}, the store {self.param.shape}")
        _check_constants(lr_q, momentum_q, decay_q)
        exp_max = _check_exps(exp, exp_max)
        if self.param.size == 0:
            return SgdResult(0, 0)
        q = self._q
        lo, hi = self._kernel(self._wb, self._v, b, exp, momentum_q, lr_q, decay_q, q,
                              self._w_new)
        if -q <= lo and hi <= q:  # no rise, nothing saturated (store_shift would give 0)
            return SgdResult(0, 0)
        s = min(int(store_shift(lo, hi, q)), exp_max - exp)
        return SgdResult(s, int(_rescale_bits(self._wb, self._v, self._w_new, s, q, exp + s)))


def sgd_step_f32_inplace(param: np.ndarray, exp: int, velocity: np.ndarray, grad: np.ndarray,
                         *, lr_q: int, momentum_q: int, store_bits: int, exp_max: int = 126,
                         decay_q: int = 0) -> SgdResult:
    """:func:`sgd_step_f32` on the store's own float32 container ``param`` (C-contiguous,
    codes of at most ``store_bits <= 24`` bits at ``exp``), updated in place: its codes are
    read from it exactly and its new container written back, so a parameter's storage is the
    store (no int32 copy of the store, no separate output). The new exponent is
    ``exp + rise``. The integers are those of ``sgd_step_f32(f32_to_codes(param, 24,
    np.int32, exp=exp), ...)`` with its ``out``. (:class:`F32Store` checks the arrays once
    for many steps.)"""
    return F32Store(param, velocity, store_bits).step(exp, grad, lr_q=lr_q,
                                                      momentum_q=momentum_q, exp_max=exp_max,
                                                      decay_q=decay_q)
