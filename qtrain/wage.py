r"""WAGE's quantization rules (Wu, Li, Chen and Shi, ICLR 2018) as a scheme of qtrain
(``QConfig.scheme = "wage"``), in integers.

WAGE puts every tensor class on a fixed grid instead of a range exponent. With
``S(k) = 2**(k-1)``, ``Q(x, k) = round(x S) / S`` and ``C(x, k) = clip(x, -1 + 1/S, 1 - 1/S)``:

* **Weights.** The store lives on the ``k_G`` grid (steps of ``1/S(k_G)``) inside
  ``C(., k_W)``; the forward uses ``Q(C(w, k_W), k_W) / alpha`` with a fixed power of two
  ``alpha = 2**round(log2(W_m / L))`` per layer (``W_m = 1.5 / S(k_W)``, ``L`` the uniform
  fan-in initialisation limit ``sqrt(3 / fan_in)``; divided only when ``alpha > 1.8``). The
  store starts uniform in ``[-max(W_m, L), max(W_m, L)]`` and is rounded to the ``k_W`` grid
  once. The backward is straight through.
* **Activations.** ``Q(C(x, k_A), k_A)``: codes at the fixed exponent ``-(k_A - 1)``,
  saturated; the backward passes the error where ``x`` lies inside the clip, zero outside.
* **Errors.** ``Q(C(e / Shift(max|e|), k_E), k_E)`` with ``Shift(x) = 2**round(log2 x)``:
  codes at the exponent ``R - (k_E - 1)``, ``R = round(log2 max|e|)``, saturated. (WAGE keeps
  the error divided by ``Shift``; qtrain keeps its exponent instead. Every later step divides
  by a power of two of its own peak again, so the weights receive the same updates.)
* **Weight updates.** ``g / Shift(max|g|)`` times the learning rate, rounded stochastically to
  an integer ``n``: the store moves by ``n`` steps of the ``k_G`` grid and is clipped. The
  learning rate (8, 1, 1/8 in WAGE's schedules) must be a power of two here, so the whole
  update is a shift and a stochastic rounding of integer codes. No momentum, no weight decay.
* **Batch norm** (WAGE's networks have none; ``norm = "l1"`` puts qtrain's integer L1BN in):
  the norm's input keeps its range exponent (WAGE has no quantizer there), its output after
  ReLU is an activation on the fixed grid, and its scale and shift take the same integer-step
  update on the ``k_G`` grid, without the clip (they start at 1 and 0 off the grid's range).
* **Loss.** WAGE's sum of squared errors, ``0.5 * sum (logits - onehot)**2``, whose error
  ``logits - onehot`` is exact on the logits' grid (:func:`sse`).

Where qtrain differs from WAGE's TensorFlow code, and why:

* activations and errors round to nearest half up (qtrain's rounding) where TensorFlow rounds
  half to even (weights, whose store sits on ties often, round half to even as WAGE's);
* the logits are the exact accumulators rounded to 16 bits at their range exponent (the
  project's integer loss input; exact at 2-8-8-8, whose sums stay below 2**16), not float;
* the stochastic rounding of the update draws 24 random bits from qtrain's counter-based stream
  (``qkernels.rng``: reproducible, the same on every backend and process count) and rounds
  ``floor(x + r)``; WAGE first rounds ``lr * g / Shift`` to 16 bits and rounds the magnitude
  up with probability its fraction. Both are unbiased;
* the layer rounds its exact weight gradient to 16 bits (WAGE's ``bitsR``) at its range
  exponent before the update rounds it again;
* the input is qtrain's (``pixel - 128``) / 128, WAGE's ``pixel / 127.5 - 1`` rounded to 8 bits.

Both backends run these rules bit-identically: they are built from qtrain's rounding
operations with given exponents (:func:`qtrain.quant.nearest`, :func:`qtrain.quant.stochastic`)
and exact float arithmetic on small integers. Under torchrun an error's ``R`` is the whole
batch's (the largest of the processes'); weights and their updates are the same everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed as dist
from .quant import FLOAT_BITS, Backend, QuantStats, _peak, nearest, pow2, stochastic

#: WAGE's beta: the smallest initialisation range is 1.5 steps of the weight grid.
BETA = 1.5
#: Width the layer rounds its exact weight gradient to before the update (WAGE's ``bitsR``).
GRAD_BITS = 16
#: Stream ids of the updates' stochastic rounding: ``STREAM_BASE + parameter index``, above the
#: ids a network's quantizers take.
STREAM_BASE = 1 << 20


def grid_exp(bits: int) -> int:
    """The exponent of WAGE's ``k``-bit grid: steps of ``1 / S(k) = 2**-(k-1)``."""
    return -(bits - 1)


def shift_exponent(peak: float) -> int | None:
    """``round(log2(peak))`` exactly (None for 0): the exponent of WAGE's ``Shift(peak)``.

    With ``peak = m * 2**E``, ``m`` in [1/2, 1): ``E`` when ``m >= 2**-0.5``, else ``E - 1``,
    decided on integers (``m**2 >= 1/2``; no tie: ``2**-0.5`` is irrational)."""
    if peak == 0:
        return None
    m, e = math.frexp(peak)
    mantissa = int(m * (1 << 53))  # exact: m has at most 53 significant bits
    return e if mantissa * mantissa >= 1 << 105 else e - 1


def weight_limits(fan_in: int, bits_w: int) -> tuple[float, int]:
    """The initialisation range ``max(W_m, L)`` of a layer with ``fan_in`` inputs, and
    ``log2 alpha`` of its forward scale (0 where WAGE does not divide: ``alpha <= 1.8``)."""
    limit = math.sqrt(3.0 / fan_in)
    w_m = BETA / 2 ** (bits_w - 1)
    shift = max(round(math.log2(w_m / limit)), 0)
    return max(w_m, limit), shift if 2 ** shift > 1.8 else 0


def store_max(bits_w: int, bits_g: int) -> int:
    """The largest store code (on the ``k_G`` grid) inside ``C(., k_W)``: ``1 - 1/S(k_W)``."""
    return (1 << (bits_g - 1)) - (1 << (bits_g - bits_w))


def weight_codes(store: torch.Tensor, bits_w: int, shift: int, stats: QuantStats | None
                 ) -> torch.Tensor:
    """The forward weights ``Q(C(w, k_W), k_W) / alpha`` (``alpha = 2**shift``), rounded half
    to even as WAGE's TensorFlow does: the store sits on the finer ``k_G`` grid, so ties are
    common, and half up would round +1/4 to 1/2 but -1/4 to 0 at 2 bits (a sign bias). Exact
    float64 arithmetic on the store's codes, the same on every backend and device."""
    top = (1 << (bits_w - 1)) - 1
    codes = torch.round(store.detach().double() * pow2(bits_w - 1))  # half to even
    if stats is not None:
        stats.add(int((codes.abs() > top).sum()),
                  int(store.detach().bool().sum()) - int(codes.clamp(-top, top).bool().sum()),
                  store.numel())
    return (codes.clamp_(-top, top) * pow2(grid_exp(bits_w) - shift)).to(store.dtype)


def activation(x: torch.Tensor, bits: int, backend: Backend, stats: QuantStats | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(C(x, k_A), k_A)`` and the clip's gradient mask (1 inside ``C``'s range)."""
    inside = x.detach().abs() <= 1 - pow2(grid_exp(bits))
    return nearest(x, bits, backend, stats, grid_exp(bits)), inside


def error(e: torch.Tensor, bits: int, backend: Backend, stats: QuantStats | None
          ) -> torch.Tensor:
    """``Q(C(e / Shift(max|e|), k_E), k_E) * Shift(max|e|)``: codes at ``R - (k_E - 1)``."""
    if bits >= FLOAT_BITS:
        return e
    exp = error_exponent(_peak(e), bits)
    if exp is None:
        if stats is not None:
            stats.add(0, 0, e.numel())
        return torch.zeros_like(e)
    return nearest(e, bits, backend, stats, exp)


def error_exponent(peak: float, bits: int) -> int | None:
    """The exponent WAGE's error rule rounds to: ``round(log2 peak) - (bits - 1)`` (None for an
    all-zero error). Under torchrun the peak is the whole batch's: ``round(log2 .)`` is
    monotone, so it is the largest of the processes' exponents."""
    r = shift_exponent(peak)
    if dist.active():
        r = dist.max_int(r)
    return None if r is None else r + grid_exp(bits)


def lr_exponent(lr: float) -> int:
    """``log2 lr`` for a power of two; a one-line error otherwise."""
    m, e = math.frexp(lr)
    if lr <= 0 or m != 0.5:
        raise ValueError(f"scheme wage needs a learning rate that is a power of two (WAGE's 8, "
                         f"1, 1/8), not {lr}; set lr and lr_gamma accordingly")
    return e - 1


def init_store(weight: torch.Tensor, fan_in: int, bits_w: int, bits_g: int,
               generator: torch.Generator | None = None) -> None:
    """WAGE's initialisation, in place: uniform in ``[-max(W_m, L), max(W_m, L)]``, rounded to
    the ``k_W`` grid and clipped (WAGE clips at its first update), so on the store's grid."""
    bound, _ = weight_limits(fan_in, bits_w)
    with torch.no_grad():
        u = torch.rand(weight.shape, generator=generator, dtype=torch.float64) * 2 - 1
        codes = torch.round(u * bound * 2 ** (bits_w - 1))  # the k_W grid
        codes = codes * 2 ** (bits_g - bits_w)  # on the store's k_G grid
        top = store_max(bits_w, bits_g)
        weight.copy_((codes.clamp_(-top, top) * pow2(grid_exp(bits_g))).to(weight.dtype))


def update(p: torch.Tensor, grad: torch.Tensor, lr: float, bits_w: int, bits_g: int,
           backend: Backend, seed: int, step: int, stream: int, clip: bool = True) -> None:
    """One WAGE update of the store ``p`` (on the ``k_G`` grid) from its gradient, in place:
    ``n = SR(lr * grad / Shift(max|grad|))`` integer steps, ``p -= n / S(k_G)``, clipped to
    ``C(., k_W)`` (with ``clip``: a weight; a batch norm's scale and shift are not, as WAGE
    leaves its batch norm's parameters alone)."""
    r = shift_exponent(_peak(grad))
    if r is None:
        return
    exp = r - lr_exponent(lr)  # n * 2**exp is the rounded gradient: n = SR(grad * 2**-exp)
    steps = stochastic(grad, GRAD_BITS, backend, seed, step, stream, exp=exp) * pow2(-exp)
    e = grid_exp(bits_g)
    codes = p.detach().double() * pow2(-e) - steps.double()
    if clip:
        top = store_max(bits_w, bits_g)
        codes.clamp_(-top, top)
    p.copy_((codes * pow2(e)).to(p.dtype))


class _SSEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        err = logits.detach().double()
        err[torch.arange(len(labels), device=err.device), labels] -= 1.0
        ctx.save_for_backward(err)
        return 0.5 * err.square().sum() / max(len(labels), 1)

    @staticmethod
    def backward(ctx, grad):
        err, = ctx.saved_tensors
        return err.to(torch.float32), None


def sse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """WAGE's loss, per sample of the batch: ``0.5 * sum_c (logits - onehot)**2``, averaged for
    people; its backward hands back ``logits - onehot`` per sample (the sum's gradient: the
    error rounding divides by a power of two of its peak anyway), exact where the logits'
    grid holds 1."""
    return _SSEFn.apply(logits, labels)


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's ``0.5 * sum_c (logits - onehot)**2`` in float64."""
    target = F.one_hot(labels, logits.shape[1]).double()
    return 0.5 * (logits.detach().double() - target).square().sum(1)
