r"""Quantizers of the integer training step, for the ``int`` and ``emulate`` backends.

Tensors flow between layers as float32 torch tensors whose values are integer codes times a
power of two (``code * 2**e``), held exactly: autograd needs float tensors, and a float32 holds
any code of up to 24 bits. A quantizer never needs to be told a tensor's exponent: it reads the
binary exponent ``E`` of the largest magnitude (``frexp``, exact) and quantizes to ``k`` bits
with exponent ``e = E - (k - 1)`` (:mod:`qkernels.quant`), so the largest value lands in the top
half of the format. Both backends implement the same arithmetic:

* ``int``: the tensor is converted to integer codes (exactly) and :mod:`qkernels` computes;
* ``emulate``: torch operations compute the same integers in float32/float64 where that is
  provably exact, on any device. On CPU tensors the rounding (and the optimizer's update) runs
  the int backend's qkernels kernels instead (fused: two passes over the data instead of
  torch's six; bit-identical), unless :func:`torch_emulation` is in effect.

They agree bit for bit (``tests/qtrain/test_train_step.py``, which runs emulate's torch
operations under :func:`torch_emulation`). With ``bits = 32`` a quantizer is the identity.

Per quantizer the counts of saturated codes and of nonzero values rounded to zero accumulate in
a :class:`QuantStats` and are readable per layer (:func:`quant_report`).
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from qkernels import QTensor
from qkernels.ieee import f32_to_codes, quantize_f32, quantize_f32_rows
from qkernels.format import code_dtype
from qkernels.quant import (ROW_WIDTH, SR_BITS, QuantCounts, code_top, max_abs, mean_exponent,
                            quantize_nearest, quantize_rows, quantize_stochastic,
                            range_exponent)
from qkernels.rng import random_top_bits

from . import distributed as dist
from .spec import (BACKENDS, FLOAT_BITS, WEIGHT_EXPS, act_codes_problem, backend_problem,
                   error_rules_problem, norm_input_exp_problem, scheme_problem, width_problem)

def check_width(bits: int, name: str) -> int:
    """A code width: 2..16, or 32 for float (no quantization)."""
    if problem := width_problem(bits, name):
        raise (TypeError if isinstance(bits, bool) or not isinstance(bits, int)
               else ValueError)(problem)
    return bits


@dataclass(frozen=True)
class QConfig:
    """Bit widths and arithmetic of a quantized network.

    Attributes:
        bits_w, bits_a, bits_g, bits_e: widths of weights, activations, weight gradients and
            back-propagated errors: 2..16, or 32 for float.
        backend: ``"int"`` (integer codes through qkernels) or ``"emulate"`` (the same
            arithmetic in torch, any device).
        store_bits: significant bits of the wide weight store the optimizer updates.
        stochastic_errors: round errors stochastically (weight gradients always are).
        weight_exp: how weights pick their exponent: ``"max"`` (the range, as every
            quantizer) or ``"mean"`` (from the mean magnitude: for 2-3 bit weights, where the
            range exponent rounds most weights to zero).
        seed: key of the counter-based random stream.
        scheme: ``"qtrain"`` (the rules above) or ``"wage"``: WAGE's fixed grids,
            shift-normalized errors and integer-step updates (:mod:`qtrain.wage`).
        error_exp: how errors pick their exponent: ``"batch"`` (the range of the whole
            tensor) or ``"sample"`` (each sample its own range, never more than 16 bits
            below the batch's: :func:`qkernels.quant.quantize_rows`).
        norm_errors: how an L1 batch norm rounds the error it hands back to the layer before
            it: ``"nearest"`` (in the kernel) or ``"stochastic"`` (the kernel's 16-bit error
            rounded to ``bits_e`` with the counter-based stream: nearest rounding makes the
            same error in every sample's share of the norm's batch terms, and those errors
            add up in the weight gradient).
        act_codes: the codes of an activation after a ReLU: ``"signed"`` (``bits_a`` codes,
            whose sign bit a non-negative value never uses) or ``"unsigned"`` (``0 ..
            2**bits_a - 1``: twice the resolution, held as signed codes of
            :attr:`act_code_bits`). A block's norm then rounds its output one bit wider too
            (the ReLU drops the negative half).
        norm_input_exp: how the quantizer before a batch norm picks its exponent: ``"tensor"``
            (the range of the whole tensor) or ``"channel"`` (each channel its own range,
            never more than 16 bits below the tensor's: the norm's input is then 16-bit codes,
            :attr:`norm_in_bits`). The norm divides each channel by its own deviation, so a
            channel whose values are small beside the largest channel's keeps ``bits_a``
            significant bits instead of rounding to a few levels.
    """

    bits_w: int = 8
    bits_a: int = 8
    bits_g: int = 8
    bits_e: int = 8
    backend: str = "int"
    store_bits: int = 24
    stochastic_errors: bool = False
    weight_exp: str = "max"
    seed: int = 0
    scheme: str = "qtrain"
    error_exp: str = "batch"
    norm_errors: str = "nearest"
    act_codes: str = "signed"
    norm_input_exp: str = "tensor"

    def __post_init__(self):
        for name in ("bits_w", "bits_a", "bits_g", "bits_e"):
            check_width(getattr(self, name), name)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.weight_exp not in WEIGHT_EXPS:
            raise ValueError(f"weight_exp {self.weight_exp!r} is not one of "
                             f"{', '.join(WEIGHT_EXPS)}")
        if not 8 <= self.store_bits <= 24:
            raise ValueError(f"store_bits={self.store_bits} is outside 8..24 (a float32 holds "
                             f"24-bit codes exactly)")
        if problem := backend_problem((self.bits_w, self.bits_a, self.bits_g, self.bits_e),
                                      self.backend):
            raise ValueError(problem)
        if problem := scheme_problem(self.scheme, (self.bits_w, self.bits_a, self.bits_g,
                                                   self.bits_e), None, self.stochastic_errors):
            raise ValueError(problem)
        if problem := error_rules_problem(self.error_exp, self.stochastic_errors, self.scheme,
                                          self.norm_errors):
            raise ValueError(problem)
        if problem := act_codes_problem(self.act_codes, self.bits_a, self.scheme):
            raise ValueError(problem)
        if problem := norm_input_exp_problem(self.norm_input_exp, self.scheme):
            raise ValueError(problem)

    @property
    def wage(self) -> bool:
        """WAGE's rules (:mod:`qtrain.wage`) instead of qtrain's."""
        return self.scheme == "wage"

    @property
    def sample_errors(self) -> bool:
        """Errors take one exponent per sample (``error_exp = "sample"``, ``bits_e < 16``)."""
        return self.error_exp == "sample" and self.bits_e < 16

    @property
    def stochastic_norm_errors(self) -> bool:
        """An L1 batch norm rounds its input's error stochastically (``norm_errors``, errors
        below 16 bits)."""
        return self.norm_errors == "stochastic" and self.bits_e < 16

    @property
    def error_code_bits(self) -> int:
        """Width of the error codes the layers and kernels receive: ``bits_e``, or 16 with
        per-sample exponents (``bits_e`` significant bits per sample, at the batch's
        exponent)."""
        return 16 if self.sample_errors else self.bits_e

    @property
    def act_code_bits(self) -> int:
        """Width of the signed codes that carry an activation after a ReLU, and so the widest
        input a layer receives: ``bits_a``, or ``bits_a + 1`` for unsigned ones."""
        unsigned = self.act_codes == "unsigned" and self.bits_a < FLOAT_BITS
        return self.bits_a + 1 if unsigned else self.bits_a

    @property
    def norm_in_bits(self) -> int:
        """Width of the codes a batch norm receives: ``bits_a``, or 16 with per-channel
        exponents (``norm_input_exp = "channel"``: codes at the tensor's 16-bit exponent)."""
        return 16 if self.norm_input_exp == "channel" and self.bits_a < FLOAT_BITS \
            else self.bits_a

    @property
    def engine(self) -> "Backend":
        """The :class:`Backend` object named by ``backend``."""
        return BACKEND[self.backend]

    @property
    def quantized(self) -> bool:
        """True when any of W, A, G, E is quantized."""
        return min(self.bits_w, self.bits_a, self.bits_g, self.bits_e) < FLOAT_BITS

    @property
    def fully_quantized(self) -> bool:
        return max(self.bits_w, self.bits_a, self.bits_g, self.bits_e) < FLOAT_BITS


@dataclass
class QuantStats:
    """Running counts of one quantizer: saturated, rounded to zero, and total elements."""

    saturated: int = 0
    zeroed: int = 0
    total: int = 0

    def add(self, saturated: int, zeroed: int, total: int) -> None:
        self.saturated += int(saturated)
        self.zeroed += int(zeroed)
        self.total += int(total)

    def as_dict(self) -> dict[str, int]:
        return {"saturated": self.saturated, "zeroed": self.zeroed, "total": self.total}


@dataclass
class QState:
    """Mutable state shared by the quantizers of one network: the training step (a key of the
    random stream), and unique tensor ids handed out at construction."""

    step: int = 0
    _ids: itertools.count = field(default_factory=itertools.count, repr=False)

    def new_id(self) -> int:
        return next(self._ids)


# ---------------------------------------------------------------------------------------------
# Exponents and code conversion (exact).


def _peak(t: torch.Tensor) -> float:
    """max|t| as a Python float (exact: every float32 and float64 is a Python float), from one
    ``aminmax`` pass (several times faster on CPU than an infinity-norm)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi))


def top_exponent(t: torch.Tensor, peak: float | None = None) -> int | None:
    """Binary exponent ``E`` with ``max|t| < 2**E <= 2*max|t|``, or None for an all-zero tensor."""
    peak = _peak(t) if peak is None else peak
    if peak == 0:
        return None
    return math.frexp(peak)[1]


def _nonzero(t: torch.Tensor) -> int:
    """Number of nonzero elements (``bool().sum()``: on CPU many times faster than
    ``torch.count_nonzero``)."""
    return int(t.bool().sum())


def pow2(e: int) -> float:
    """2**e as a Python float (exact): scaling a tensor by it is exact (no torch.ldexp, which
    is slow)."""
    return float(2.0 ** e)


def to_codes(t: torch.Tensor, width: int = 24, dtype: torch.dtype | None = None) -> QTensor:
    """The exact integer codes of a container: exponent ``E - width`` (``E`` from the maximum).

    Exact for every tensor this module produces (codes of at most ``width`` bits). The codes
    come back as a numpy array of ``dtype`` (default int32 up to 31 bits, else int64).
    """
    top = top_exponent(t)
    exp = 0 if top is None else top - width
    if dtype is None:
        dtype = torch.int32 if width <= 31 else torch.int64
    codes = (t.detach() * pow2(-exp)).to(dtype)
    return QTensor(codes.cpu().numpy(), exp)


def from_codes(q: QTensor, like: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Codes back to a container on ``like``'s device (float32: codes of up to 24 bits)."""
    codes = torch.from_numpy(np.ascontiguousarray(q.q)).to(like.device, dtype)
    return codes * pow2(q.exp)


def _ldexp(t: torch.Tensor, e: int) -> torch.Tensor:
    return t * pow2(e)


# ---------------------------------------------------------------------------------------------
# The two implementations of each quantization.

_cpu_kernels = True


@contextmanager
def torch_emulation():
    """Within this block the emulate backend uses its torch operations on CPU tensors too (as
    it always does on other devices) for rounding and for the optimizer's update, instead of
    the int backend's qkernels kernels."""
    global _cpu_kernels
    saved, _cpu_kernels = _cpu_kernels, False
    try:
        yield
    finally:
        _cpu_kernels = saved


class Backend:
    """Where a network's integer arithmetic runs; chosen once per :class:`QConfig`
    (``qconfig.engine``, one object per name in :data:`BACKEND`).

    ``int`` runs qkernels' kernels on every tensor; ``emulate`` runs them on CPU tensors outside
    :func:`torch_emulation` and the same arithmetic as torch operations elsewhere (any
    device). The rounding operations take the backend and pick the implementation per tensor.
    """

    def __init__(self, name: str):
        self.name = name

    def kernels(self, t: torch.Tensor) -> bool:
        """Whether integer work on ``t`` runs qkernels' kernels."""
        return self.name == "int" or (_cpu_kernels and t.device.type == "cpu")

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


#: The backends by name.
BACKEND = {name: Backend(name) for name in BACKENDS}


def _int_round(t: torch.Tensor, bits: int, stats: QuantStats | None, stream: dict | None,
               exp: int | None = None) -> torch.Tensor:
    """The int backend: round through qkernels (nearest, or stochastic with ``stream``; at the
    range exponent, or at ``exp``).

    float32 containers are read and written as bit patterns (qkernels.ieee); float64 ones
    (exact weight-gradient sums) are converted to int64 codes first.
    """
    if t.dtype == torch.float32:
        extra = {**(stream or {}), **({} if exp is None else {"exp": exp})}
        y, _, counts = quantize_f32(t.detach().cpu().numpy(), bits, stochastic=stream is not None,
                                    **extra)
        out = torch.from_numpy(y).to(t.device)
    else:
        codes = to_codes(t, 53)
        q, counts = (quantize_stochastic(codes, bits, exp=exp, **stream) if stream is not None
                     else quantize_nearest(codes, bits, exp))
        out = from_codes(q, t)
    if stats is not None:
        stats.add(*counts)
    return out


def _zeros(t: torch.Tensor, stats: QuantStats | None) -> torch.Tensor:
    if stats is not None:
        stats.add(0, 0, t.numel())
    return torch.zeros_like(t, dtype=torch.float32)


def nearest(t: torch.Tensor, bits: int, backend: Backend, stats: QuantStats | None = None,
            exp: int | None = None, replicated: bool = False) -> torch.Tensor:
    """Round to ``bits`` with the range exponent (or ``exp``), half up, saturating; identity
    for 32 bits.

    In a synchronized step (:mod:`qtrain.distributed`) the range is the whole global batch's,
    unless ``t`` is ``replicated`` (the same in every process: a weight)."""
    if bits >= FLOAT_BITS:
        return t
    if exp is None and not replicated and dist.active():
        exp = dist.range_exponent(top_exponent(t), bits)
        if exp is None:
            return _zeros(t, stats)
    if backend.kernels(t):
        return _int_round(t, bits, stats, None, exp)
    peak = _peak(t)
    top = top_exponent(t, peak)
    if top is None:
        return _zeros(t, stats)
    e = top - (bits - 1) if exp is None else exp
    qmax = (1 << (bits - 1)) - 1
    # s = t * 2**-e is exact. s + 0.5 is exact in float32 whenever floor(s + 0.5) < 2**(bits-1)
    # (s has at most 24 significant bits, the lowest at or above 2**(bits-25)); otherwise the
    # sum only rounds to a value >= 2**(bits-1), which saturates as the exact one does.
    # 0.5 + 2**-e * t in one op: the product is exact, so this rounds once, like (t*s) + 0.5.
    src = t.detach()
    if src.dtype != torch.float32:
        src = src.double()
    y = torch.add(src.new_tensor(0.5), src, alpha=pow2(-e)).floor_()
    saturated = 0
    if peak * pow2(-e) >= qmax + 0.5:  # only the largest values can round past qmax
        saturated = int((y.abs() > qmax).sum())
        y.clamp_(-qmax, qmax)
    if stats is not None:
        stats.add(saturated, _nonzero(src) - _nonzero(y), t.numel())
    return y.mul_(pow2(e)).float()


def rows_floor(top: int | None) -> int | None:
    """The common exponent of per-sample codes (:func:`nearest_rows`) of a batch whose peak
    exponent is ``top``: the 16-bit range exponent, in a synchronized step the whole global
    batch's; None when every value is zero."""
    if dist.active():
        return dist.range_exponent(top, ROW_WIDTH + 1)
    return None if top is None else top - ROW_WIDTH


def nearest_rows(t: torch.Tensor, bits: int, backend: Backend,
                 stats: QuantStats | None = None) -> torch.Tensor:
    """Round each sample (row of the first axis) of ``t`` to ``bits`` at its own range
    exponent, half up, saturating, never below the batch's 16-bit range exponent
    (:func:`qkernels.quant.quantize_rows`); identity for 32 bits. The result holds 16-bit
    codes at that exponent."""
    if bits >= FLOAT_BITS:
        return t
    floor = rows_floor(top_exponent(t))
    if floor is None:
        return _zeros(t, stats)
    if backend.kernels(t):
        if t.dtype == torch.float32:
            q, counts = quantize_f32_rows(t.detach().cpu().numpy(), bits, floor)
        else:
            q, counts = quantize_rows(to_codes(t, 53), bits, floor)
        if stats is not None:
            stats.add(*counts)
        return from_codes(q, t)
    src = t.detach().double()  # a float32 or exact float64 value times a power of two: exact
    rows = src.reshape(src.shape[0], -1)
    peak = rows.abs().amax(dim=1)
    top = torch.frexp(peak)[1].to(torch.float64)  # max|row| < 2**top; 0 for an all-zero row
    e = torch.where(peak > 0, top - (bits - 1), torch.full_like(top, float(floor)))
    e = torch.clamp(e, min=float(floor)).unsqueeze(1)
    y = torch.floor(rows * torch.exp2(-e) + 0.5)  # exact: at most 53 significant bits
    qmax = (1 << (bits - 1)) - 1
    saturated = _nonzero(y.abs() > qmax)
    y.clamp_(-qmax, qmax)
    if stats is not None:
        stats.add(saturated, _nonzero(rows) - _nonzero(y), t.numel())
    return (y * torch.exp2(e)).float().reshape(t.shape)


def nearest_channels(t: torch.Tensor, bits: int, backend: Backend,
                     stats: QuantStats | None = None) -> torch.Tensor:
    """Round each channel (the second axis) of ``t`` to ``bits`` at its own range exponent,
    half up, saturating, never below the tensor's 16-bit range exponent: :func:`nearest_rows`
    along the channels. The result holds 16-bit codes at that exponent. Not in a synchronized
    step (a channel's range would be the whole batch's)."""
    if bits >= FLOAT_BITS:
        return t
    if dist.active():
        raise RuntimeError("per-channel exponents (norm_input_exp channel) are not supported "
                           "across processes yet")
    return nearest_rows(t.movedim(1, 0).contiguous(), bits, backend, stats).movedim(0, 1) \
        .contiguous()


def weight_exponent(t: torch.Tensor, bits: int, backend: Backend, rule: str) -> int | None:
    """The exponent a weight quantizer rounds ``t`` to under ``rule``; None for the range
    exponent (``"max"``, or an all-zero tensor)."""
    if rule == "max" or bits >= FLOAT_BITS:
        return None
    if backend.kernels(t):
        codes = f32_to_codes(t.detach().cpu().float().numpy(), 24, np.int32)
        abs_sum, exp = int(np.abs(codes.q.astype(np.int64)).sum()), codes.exp
    else:  # the same codes: at E - 24, rounded half up (exact for a store's 24-bit codes)
        top = top_exponent(t)
        exp = 0 if top is None else top - 24
        codes = torch.floor(t.detach().double() * pow2(-exp) + 0.5)
        abs_sum = int(codes.abs().sum())  # float64 sum of integers below 2**53: exact
    return mean_exponent(abs_sum, t.numel(), exp, bits)


def stochastic(t: torch.Tensor, bits: int, backend: Backend, seed: int, step: int, tensor_id: int,
               stats: QuantStats | None = None, shared: bool = False, exp: int | None = None
               ) -> torch.Tensor:
    """Round to ``bits`` with the range exponent (or ``exp``, saturating), stochastically (24
    random bits per element from the counter-based stream keyed by ``(seed, step,
    tensor_id)``).

    ``shared``: ``t`` is this process's share of a batch (an error) in a synchronized step
    (:mod:`qtrain.distributed`): the exponent is the whole batch's, and element ``i`` takes
    the stream's element at its place in the whole batch's tensor."""
    if bits >= FLOAT_BITS:
        return t
    first = 0
    if exp is None and shared and dist.active():
        exp, first = dist.range_exponent(top_exponent(t), bits), dist.first_element(t)
        if exp is None:
            return _zeros(t, stats)
    if backend.kernels(t):
        return _int_round(t, bits, stats, {"seed": seed, "step": step, "tensor_id": tensor_id,
                                           "first": first}, exp)
    top = top_exponent(t)
    if top is None:
        return _zeros(t, stats)
    e = top - (bits - 1) if exp is None else exp
    qmax = (1 << (bits - 1)) - 1
    r = random_top_bits(seed, step, tensor_id, t.numel(), SR_BITS, first)
    r = torch.from_numpy(r).to(t.device, torch.float64).reshape(t.shape)
    w = _ldexp(t.detach().double(), SR_BITS - e).floor_()  # < 2**(bits-1+24): exact
    y = w.add_(r).mul_(pow2(-SR_BITS)).floor_()
    if stats is not None:
        saturated = _nonzero(y.abs() > qmax)
        stats.add(saturated, _nonzero(t) - _nonzero(y), t.numel())
    return _ldexp(y.clamp_(-qmax, qmax).float(), e)


# ---------------------------------------------------------------------------------------------
# Autograd: an activation quantizer that also quantizes the error flowing back through it.


class _QuantizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, quant, exact=False):
        ctx.quant = quant
        ctx.inside = None
        if exact:  # x holds codes of at most bits_fwd bits: the rounding is the identity
            quant.stats_fwd.add(0, 0, x.numel())
            return x.view_as(x)  # the same values: no copy (autograd tracks it as a view)
        if quant.grid:  # WAGE's fixed grid; its clip stops the error outside
            from .wage import activation

            y, ctx.inside = activation(x, quant.bits_fwd, quant.engine, quant.stats_fwd)
            return y
        if quant.channels:
            return nearest_channels(x, quant.bits_fwd, quant.engine, quant.stats_fwd)
        return nearest(x, quant.bits_fwd, quant.engine, quant.stats_fwd)

    @staticmethod
    def backward(ctx, grad):
        q = ctx.quant
        if ctx.inside is not None:
            grad = grad * ctx.inside
        if q.bits_bwd >= FLOAT_BITS:
            return grad, None, None
        if q.wage:
            from .wage import error

            return error(grad, q.bits_bwd, q.engine, q.stats_bwd), None, None
        if q.sample_exp:
            out = nearest_rows(grad, q.bits_bwd, q.engine, q.stats_bwd)
        elif q.stochastic_bwd:
            out = stochastic(grad, q.bits_bwd, q.engine, q.seed, q.state.step, q.tensor_id,
                             q.stats_bwd, shared=True)
        else:
            out = nearest(grad, q.bits_bwd, q.engine, q.stats_bwd)
        return out, None, None


def _nearest_codes(c: QTensor, bits: int, exp: int | None) -> tuple[QTensor, QuantCounts]:
    """:func:`qkernels.quant.quantize_nearest` of codes, which gives back codes of ``bits``
    at their own range exponent as they are (an L1BN backward's error, say): rounding
    them would change nothing, and counts nothing saturated or rounded to zero."""
    if exp is None and c.q.dtype == code_dtype(bits):
        peak = max_abs(np.ascontiguousarray(c.q).reshape(-1))
        exp = int(range_exponent(peak, c.exp, bits))
        if exp == c.exp:
            return c, QuantCounts(0, 0, c.q.size)
    return quantize_nearest(c, bits, exp)


class Quantize(torch.nn.Module):
    """Quantize activations to ``bits_fwd`` going forward and errors to ``bits_bwd`` coming back.

    One mechanism for both directions (as QPyTorch's ``quantizer(forward_number,
    backward_number)``): forward rounds to nearest with the range exponent; backward rounds the
    error to nearest, or stochastically with ``QConfig.stochastic_errors``. The rounding itself
    is passed straight through.

    ``frozen_exp`` (None until :func:`qtrain.frozen.freeze` sets it): in eval mode the forward
    rounds to this fixed exponent (saturating) instead of the batch's range, so a prediction
    does not depend on the batch it is computed in. Training ignores it.

    Under ``scheme = "wage"`` errors take WAGE's rule (:func:`qtrain.wage.error`), and with
    ``grid`` (activations; not the logits) the forward rounds to WAGE's fixed ``bits_fwd``
    grid, whose clip stops the error outside it (:func:`qtrain.wage.activation`).

    With ``channels`` the forward rounds each channel at its own range exponent
    (:func:`nearest_channels`: the quantizer before a norm under ``norm_input_exp =
    "channel"``); such a quantizer cannot be frozen.
    """

    def __init__(self, qconfig: QConfig, qstate: QState, bits_fwd: int | None = None,
                 bits_bwd: int | None = None, grid: bool = False, channels: bool = False):
        super().__init__()
        self.bits_fwd = qconfig.bits_a if bits_fwd is None else check_width(bits_fwd, "bits_fwd")
        self.bits_bwd = qconfig.bits_e if bits_bwd is None else check_width(bits_bwd, "bits_bwd")
        self.wage = qconfig.wage
        self.grid = grid and qconfig.wage and self.bits_fwd < FLOAT_BITS
        #: one exponent per channel (:func:`nearest_channels`): the quantizer before a norm
        #: under ``norm_input_exp = "channel"``
        self.channels = channels and self.bits_fwd < FLOAT_BITS and not self.grid
        self.engine = qconfig.engine
        self.seed = qconfig.seed
        self.stochastic_bwd = qconfig.stochastic_errors
        self.sample_exp = qconfig.sample_errors and self.bits_bwd < 16
        self.state = qstate
        self.tensor_id = qstate.new_id()
        self.stats_fwd = QuantStats()
        self.stats_bwd = QuantStats()
        self.frozen_exp: int | None = None

    def forward(self, x: torch.Tensor, code_bits: int | None = None) -> torch.Tensor:
        """Round ``x`` to ``bits_fwd`` (its errors to ``bits_bwd`` coming back).

        ``code_bits``: the caller knows ``x`` holds codes of at most this many bits (say, a
        batch norm's output after ReLU and max-pool: :class:`qtrain.fusion.QuantBlock` says
        so). Rounding such codes to ``bits_fwd >= code_bits`` with the range exponent changes
        nothing (the exponent is at most theirs, and the largest code stays below
        ``2**(bits_fwd-1)``), so the pass is skipped and the elements are counted as it would
        count them: none saturated, none rounded to zero. The backward is unchanged.
        """
        if self.bits_fwd >= FLOAT_BITS and self.bits_bwd >= FLOAT_BITS:
            return x
        if self.frozen_exp is not None and not self.training:
            return nearest(x, self.bits_fwd, self.engine, self.stats_fwd, self.frozen_exp)
        exact = (code_bits is not None and code_bits <= self.bits_fwd < FLOAT_BITS
                 and not self.grid)  # codes of a range: on WAGE's grid they round again
        return _QuantizeFn.apply(x, self, exact)

    def round_error_codes(self, err: QTensor) -> QTensor:
        """The backward's rounding (to ``bits_bwd``, nearest or stochastic, counted) applied to
        an error already held as integer codes: the same values and counts as rounding its
        container (both depend only on the values)."""
        if self.bits_bwd >= FLOAT_BITS:
            return err
        if self.wage:  # WAGE's rule: the exponent of round(log2 max|e|), nearest
            from .wage import error_exponent

            out, counts = quantize_nearest(err, self.bits_bwd, error_exponent(
                code_top_value(err), self.bits_bwd))
            self.stats_bwd.add(*counts)
            return out
        if self.sample_exp:
            floor = rows_floor(code_top(err))
            if floor is None:
                self.stats_bwd.add(0, 0, err.q.size)
                return QTensor(np.zeros(err.q.shape, np.int16), err.exp)
            out, counts = quantize_rows(err, self.bits_bwd, floor)
            self.stats_bwd.add(*counts)
            return out
        exp, first = None, 0
        if dist.active():  # the whole batch's exponent, and this share's place in the batch
            exp = dist.range_exponent(code_top(err), self.bits_bwd)
            first = dist.first_element(err.q)
        if self.stochastic_bwd:
            out, counts = quantize_stochastic(err, self.bits_bwd, seed=self.seed,
                                              step=self.state.step, tensor_id=self.tensor_id,
                                              exp=exp, first=first)
        else:
            out, counts = _nearest_codes(err, self.bits_bwd, exp)
        self.stats_bwd.add(*counts)
        return out

    def extra_repr(self) -> str:
        frozen = "" if self.frozen_exp is None else f", frozen_exp={self.frozen_exp}"
        wage = ", scheme=wage" + (", grid" if self.grid else "") if self.wage else ""
        wage += ", channels" if self.channels else ""
        return (f"bits_fwd={self.bits_fwd}, bits_bwd={self.bits_bwd}, "
                f"backend={self.engine.name}{wage}{frozen}")


def code_top_value(q: QTensor) -> float:
    """max|codes| * 2**exp as a Python float (exact for codes below 2**53)."""
    if q.q.size == 0:
        return 0.0
    return math.ldexp(int(np.abs(q.q.astype(np.int64)).max()), q.exp)


def quant_report(model: torch.nn.Module) -> dict[str, dict[str, dict[str, int]]]:
    """Saturation and zero-rounding counts of every quantizer in ``model``, by module name."""
    out = {}
    for name, module in model.named_modules():
        stats = {k: getattr(module, k).as_dict() for k in vars(module)
                 if isinstance(getattr(module, k, None), QuantStats)}
        if stats:
            out[name or "model"] = stats
    return out


def reset_stats(model: torch.nn.Module) -> None:
    """Zero every quantizer's counts (e.g. at the start of an epoch)."""
    for module in model.modules():
        for k in list(vars(module)):
            if isinstance(getattr(module, k, None), QuantStats):
                setattr(module, k, QuantStats())
