r"""Quantized layers: drop-ins for ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm1d/2d``.

With ``qconfig=None`` (or all widths 32) every layer here behaves exactly like its torch
counterpart (L1 batch norm then uses the float reference of :mod:`qtrain.reference`). With a
quantized :class:`~qtrain.quant.QConfig`:

* :class:`QuantConv2d` / :class:`QuantLinear` round the weight store to ``bits_w`` (nearest,
  range exponent; straight-through backward), multiply codes exactly (int8 x int8 -> int32
  GEMMs on CPU for codes of up to 8 bits, and on int8 limbs for codes of up to 16 bits,
  :mod:`qtrain.intgemm`; otherwise a float32 BLAS call where the sum provably stays below
  2**24, float64 beyond), and round their weight gradient
  to ``bits_g`` stochastically before it reaches ``.grad``.
* :class:`L1BatchNorm2d` / :class:`L1BatchNorm1d` run the integer L1BN kernels of
  :mod:`qkernels` (int8 codes up to 8 bits, int16 above; outputs ``bits_a``, one bit more
  before a ReLU with unsigned activations; errors ``bits_e``; exponents chosen from the
  range), keep
  running statistics as exact fixed-point codes, and in eval mode apply the folded integer
  affine (Algorithm 1, step 9) with the output exponent of the last training batch.

ReLU and max-pool select codes, so they are exact on the float32 containers.
:class:`QuantMaxPool2d` is ``nn.MaxPool2d`` with a faster path for the 2x2, stride-2 windows of
the models here (one-pass kernels on CPU, strided views elsewhere; the same selection and tie
rule as torch's kernel, which is an order of magnitude slower on CPU for these shapes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from qkernels import QTensor, l1bn_backward, l1bn_fold, l1bn_forward, l1bn_inference
from qkernels.conv import conv2d_weight_grad
from qkernels.ieee import (codes_to_f32, f32_to_codes, f32_to_codes_where, peak_exponent,
                           quantize_f32_rows, quantize_f32_to_codes)
from qkernels.pool import (maxpool2x2, maxpool2x2_backward, maxpool2x2_relu_backward_codes,
                           maxpool2x2_relu_backward_of_codes, maxpool2x2_relu_codes)
from qkernels import l1bn_update_running
from qkernels.fixedpoint import MOMENTUM_BITS, RUN_EXP
from qkernels.format import code_dtype
from qkernels.quant import code_top, codes_where, quantize_stochastic

from . import distributed as dist
from . import intgemm
from .quant import (BACKEND, FLOAT_BITS, QConfig, QState, Quantize, QuantStats, from_codes,
                    nearest, pow2, stochastic, top_exponent, weight_exponent)
from .reference import l1_batch_norm

#: A float32 sum of integers is exact while every partial sum stays below this.
F32_EXACT = 1 << 24
#: Input pixels enter as 8-bit codes whatever bits_a is.
INPUT_BITS = 8


def _code_max(bits: int) -> int:
    return 1 << (max(bits, INPUT_BITS) - 1)


class _Quantized:
    """Mixin: the qconfig, shared state and counters of a quantized layer."""

    def _setup_quant(self, qconfig: QConfig | None, qstate: QState | None,
                     fan_in: int | None = None) -> None:
        """``fan_in``: a weight layer's inputs per output (WAGE's scale and initialisation);
        None for a batch norm."""
        self.qconfig = qconfig
        self.qstate = qstate if qstate is not None else QState()
        self.fan_in = fan_in
        self.wage_shift = 0  # log2 of WAGE's fixed scale alpha (qtrain.wage)
        if self.quantized:
            self.grad_ids = (self.qstate.new_id(), self.qstate.new_id())  # weight, bias
            self.stats_w = QuantStats()
            self.stats_g = QuantStats()
            if qconfig.wage and fan_in is not None:  # (a batch norm keeps its init)
                from . import wage

                if self.bias is not None:
                    raise ValueError("scheme wage trains layers without a bias (as WAGE's "
                                     "networks); build the layer with bias=False")
                self.wage_shift = wage.weight_limits(fan_in, qconfig.bits_w)[1]
                wage.init_store(self.weight, fan_in, qconfig.bits_w, qconfig.bits_g)

    @property
    def quantized(self) -> bool:
        return self.qconfig is not None and self.qconfig.quantized

    def _quantize_grad(self, grad: torch.Tensor, which: int = 0, reduce: bool = True
                       ) -> torch.Tensor:
        """Exact gradient -> bits_g codes, stochastically (stream id per parameter).

        In a synchronized step the processes' exact gradients are added up first
        (``reduce``; False for a gradient that is already the whole batch's)."""
        q = self.qconfig
        if reduce and dist.active():
            grad = dist.sum_float(grad)
        if q.wage:  # 16 bits to nearest; the optimizer's update rounds it (qtrain.wage)
            from .wage import GRAD_BITS

            return nearest(grad, GRAD_BITS, q.engine, self.stats_g, replicated=True).float()
        return stochastic(grad, q.bits_g, q.engine, q.seed, self.qstate.step,
                          self.grad_ids[which], self.stats_g)

    def _quantize_grad_codes(self, grad: QTensor, like: torch.Tensor, which: int = 0,
                             reduce: bool = True) -> torch.Tensor:
        """:meth:`_quantize_grad` of an exact gradient given as integer codes: where the
        kernels run, rounded from the codes themselves (the result depends only on the
        values, so it is the same), without a float64 container in between."""
        q = self.qconfig
        if reduce and dist.active():
            grad = dist.sum_codes(grad)
        if not q.engine.kernels(like) or q.bits_g >= FLOAT_BITS or q.wage:
            return self._quantize_grad(from_codes(grad, like, torch.float64), which, False)
        out, counts = quantize_stochastic(grad, q.bits_g, seed=q.seed, step=self.qstate.step,
                                          tensor_id=self.grad_ids[which])
        self.stats_g.add(*counts)
        return torch.from_numpy(codes_to_f32(out)).to(like.device)


class _WeightFn(torch.autograd.Function):
    """Weight store -> bits_w codes (nearest; range or mean exponent); straight-through
    backward.

    With the mean exponent the largest weights saturate, and a plain straight-through
    gradient would move them without changing the forward at all: nothing pulls them back, they
    grow without bound, drag the mean up and round every other weight to zero (LeNet-5 at 2
    bits collapsed so within two epochs). So there the gradient stops at saturated weights,
    as a clipped straight-through estimator's does. (With the range exponent only the largest
    weight can round past the top code; its gradient passes as before.)
    """

    @staticmethod
    def forward(ctx, weight, layer):
        return _weight_forward(ctx, weight, layer)

    @staticmethod
    def backward(ctx, grad):
        return _weight_backward(ctx, grad), None


def _weight_forward(ctx, weight: torch.Tensor, layer) -> torch.Tensor:
    """:class:`_WeightFn`'s forward, which a GEMM block's node also runs (no node of its own):
    the bits_w container (with its codes, :func:`qtrain.intgemm.attach`, where the kernels
    round); ``ctx.inside`` for the backward."""
    q = layer.qconfig
    ctx.inside = None
    if q.wage:  # WAGE's fixed grid and scale, straight through
        from .wage import weight_codes

        return weight_codes(weight, q.bits_w, layer.wage_shift, layer.stats_w)
    exp = weight_exponent(weight, q.bits_w, q.engine, q.weight_exp)
    if exp is not None:  # the mean exponent: which weights stay inside the codes
        codes = torch.floor(weight.detach().double() * pow2(-exp) + 0.5)  # exact
        ctx.inside = codes.abs_() <= (1 << (q.bits_w - 1)) - 1
    if (q.bits_w <= 8 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and q.engine.kernels(weight)):
        # nearest's rounding, keeping the codes with the container for the integer GEMM
        wq, counts = quantize_f32_to_codes(weight.detach().numpy(), q.bits_w, 7, np.int8, exp)
        layer.stats_w.add(*counts)
        return intgemm.attach(torch.from_numpy(codes_to_f32(wq)), wq.q, wq.exp)
    return nearest(weight, q.bits_w, q.engine, layer.stats_w, exp, replicated=True)


def _weight_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """:class:`_WeightFn`'s backward: straight through, stopped at saturated weights where the
    mean exponent saturates them."""
    return grad if ctx.inside is None else grad * ctx.inside


#: Bias codes saturate here, as an int32 accumulator holds them.
BIAS_MAX = (1 << 31) - 1


def _acc_exponent(x: torch.Tensor, w: torch.Tensor, bits_x: int, bits_w: int) -> int:
    """The exponent of a layer's exact accumulators, where a bias joins them: the sum of the
    operands' exponents when their codes fill their storage (``E - 7`` for int8, ``E - 15`` for
    int16, ``E`` of the operand's peak; 0 for an all-zero operand), as the int backend holds
    them. In a synchronized step the input's peak is the whole batch's."""
    tx = top_exponent(x)
    if dist.active():
        tx = dist.max_int(tx)
    tw = top_exponent(w)
    return ((0 if tx is None else tx - _storage(bits_x)[1])
            + (0 if tw is None else tw - _storage(bits_w)[1]))


def _bias_codes(bias: torch.Tensor, exp: int) -> torch.Tensor:
    """The bias at the accumulators' exponent ``exp``: its store value rounded half up to a
    multiple of ``2**exp`` and saturated at :data:`BIAS_MAX`, as float64 integers (exact)."""
    return torch.floor(bias.detach().double() * pow2(-exp) + 0.5).clamp_(-BIAS_MAX, BIAS_MAX)


def _bias_at_accumulators(b: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor,
                          q: QConfig) -> intgemm.Codes | None:
    """A layer's bias as float64 codes at its accumulators' exponent (None without one)."""
    if b is None:
        return None
    exp = _acc_exponent(x, w, max(q.act_code_bits, INPUT_BITS), q.bits_w)
    return intgemm.Codes(_bias_codes(b, exp), exp)


def _bias_grad(layer, gy: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The bias gradient: the output error summed over everything but the channels (exact in
    float64), rounded to ``bits_g`` like a weight gradient (the layer's second stream)."""
    dims = [d for d in range(gy.dim()) if d != channel_dim % gy.dim()]
    return layer._quantize_grad(gy.detach().double().sum(dims), 1)


def _exact_matmul_dtype(terms: int, bits_x: int, bits_y: int) -> torch.dtype:
    """float32 when a sum of ``terms`` products of such codes cannot reach 2**24."""
    return torch.float32 if terms * _code_max(bits_x) * _code_max(bits_y) < F32_EXACT \
        else torch.float64


def _gemm(x: torch.Tensor, q: QConfig, *bits: int) -> bool:
    """Whether a product of codes of these widths runs as an integer GEMM
    (:mod:`qtrain.intgemm`): CPU tensors the kernels handle, operands of at most 16 bits."""
    return (max(bits) <= intgemm.WIDE_BITS and x.device.type == "cpu" and q.engine.kernels(x)
            and intgemm.enabled())


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, layer):
        q = layer.qconfig
        ctx.save_for_backward(x, w)
        ctx.layer = layer
        ctx.cols = None
        bias = _bias_at_accumulators(b, x, w, q)
        wide = max(q.act_code_bits, INPUT_BITS, q.bits_w) > 8
        if _gemm(x, q, max(q.act_code_bits, INPUT_BITS), q.bits_w) and intgemm.conv_applies(layer):
            x8, w8 = intgemm.codes(x, wide), intgemm.codes(w, wide)
            if x8 is not None and w8 is not None:
                y, ctx.cols = intgemm.conv2d(x8, w8, layer.stride, layer.padding, bias)
                ctx.x_exp, ctx.w8 = x8.exp, w8
                return y
        k = w.shape[1] * w.shape[2] * w.shape[3]
        dt = (torch.float64 if bias is not None
              else _exact_matmul_dtype(k, q.act_code_bits, q.bits_w))
        y = F.conv2d(x.to(dt), w.to(dt), None, layer.stride, layer.padding, layer.dilation,
                     layer.groups)
        if bias is not None:  # exact in float64; then rounded once, as the int64 sums are
            y += (bias.q * pow2(bias.exp)).view(1, -1, 1, 1)
        return y.float()

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        q = layer.qconfig
        g8 = None
        columns = ctx.needs_input_grad[0]  # the error's layout: see conv2d_error_codes
        if ctx.cols is not None and _gemm(gy, q, q.error_code_bits):
            g8 = intgemm.conv2d_error_codes(gy.float(), columns, q.error_code_bits > 8)
        gx = _conv_gx(x, w, g8, ctx.w8 if g8 is not None else None, lambda: gy, layer) \
            if ctx.needs_input_grad[0] else None
        gb = _bias_grad(layer, gy, 1) if ctx.needs_input_grad[2] else None
        if g8 is not None:
            gw = intgemm.conv2d_weight_grad(g8, columns, ctx.cols, ctx.x_exp, w.shape)
            return gx, layer._quantize_grad_codes(gw, w), gb, None
        return gx, _conv_weight_grad(x, w, gy, layer), gb, None


def _conv_args(layer) -> tuple:
    return layer.stride, layer.padding, layer.dilation, layer.groups


def _conv_gx(x, w, g8, w8, gy, layer) -> torch.Tensor:
    """The conv's input gradient: col2im of the integer GEMM of the error matrix ``g8``
    (columns layout) and the weight codes ``w8`` where that applies, else the float path on
    the error container ``gy()``."""
    if g8 is not None and intgemm.conv2d_input_applies(g8, w8, layer.stride):
        return intgemm.conv2d_input_grad(g8, w8, x.shape, layer.stride, layer.padding)
    return _conv_input_grad(x, w, gy(), layer)


def _conv_input_grad(x, w, gy, layer) -> torch.Tensor:
    """The float path's exact input gradient (float32 where provably exact, else float64)."""
    q = layer.qconfig
    terms = w.shape[0] // layer.groups * w.shape[2] * w.shape[3]
    dt = _exact_matmul_dtype(terms, q.error_code_bits, q.bits_w)
    return torch.nn.grad.conv2d_input(x.shape, w.to(dt), gy.to(dt), *_conv_args(layer)).float()


def _conv_weight_grad(x, w, gy, layer) -> torch.Tensor:
    """The float path's weight gradient, rounded to bits_g: the torch-free int8 kernel where
    float32 would not be exact, float32 or float64 BLAS otherwise."""
    q = layer.qconfig
    terms = gy.shape[0] * gy.shape[2] * gy.shape[3]
    dt = _exact_matmul_dtype(terms, q.act_code_bits, q.error_code_bits)
    if dt == torch.float64 and _int8_weight_grad_ok(layer, q, x):
        return layer._quantize_grad_codes(_int8_weight_grad(x, gy, layer), w)
    gw = torch.nn.grad.conv2d_weight(x.to(dt), w.shape, gy.to(dt), *_conv_args(layer))
    return layer._quantize_grad(gw)


def _int8_weight_grad_ok(layer, q: QConfig, x: torch.Tensor) -> bool:
    """The integer kernel applies: int8 codes, CPU, no dilation/groups, numeric padding."""
    return (max(q.act_code_bits, INPUT_BITS) <= 8 and q.error_code_bits <= 8
            and x.device.type == "cpu"
            and intgemm.conv_applies(layer))


def _int8_weight_grad(x: torch.Tensor, gy: torch.Tensor, layer) -> QTensor:
    """Exact conv weight gradient from int8 codes (qkernels.conv), as int64 codes."""
    return conv2d_weight_grad(f32_to_codes(x.detach().numpy(), 7, np.int8),
                              f32_to_codes(gy.detach().numpy(), 7, np.int8), layer.kernel_size,
                              layer.stride, layer.padding)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, layer):
        q = layer.qconfig
        ctx.save_for_backward(x, w)
        ctx.layer = layer
        ctx.x8 = None
        bias = _bias_at_accumulators(b, x, w, q)
        if _gemm(x, q, max(q.act_code_bits, INPUT_BITS), q.bits_w):
            wide = max(q.act_code_bits, INPUT_BITS, q.bits_w) > 8
            x8 = intgemm.codes(x.reshape(-1, x.shape[-1]), wide)
            w8 = intgemm.codes(w, wide)
            if x8 is not None and w8 is not None:
                ctx.x8, ctx.w8 = x8, w8
                return intgemm.linear(x8, w8, bias).reshape(*x.shape[:-1], w.shape[0])
        dt = torch.float64 if bias is not None else _exact_matmul_dtype(w.shape[1], q.act_code_bits,
                                                                         q.bits_w)
        y = x.to(dt) @ w.to(dt).t()
        if bias is not None:  # exact in float64; then rounded once, as the int64 sums are
            y += bias.q * pow2(bias.exp)
        return y.float()

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        q = layer.qconfig
        g8 = None
        if ctx.x8 is not None and _gemm(gy, q, q.error_code_bits):
            g8 = intgemm.codes(gy.float().reshape(-1, gy.shape[-1]), q.error_code_bits > 8)
        gb = _bias_grad(layer, gy, -1) if ctx.needs_input_grad[2] else None
        if g8 is not None:
            gx = None
            if ctx.needs_input_grad[0]:
                gx = intgemm.linear_input_grad(g8, ctx.w8).reshape(x.shape)
            gw = intgemm.linear_weight_grad(g8, ctx.x8)
            return gx, layer._quantize_grad_codes(gw, w), gb, None
        gx = None
        if ctx.needs_input_grad[0]:
            dt = _exact_matmul_dtype(w.shape[0], q.error_code_bits, q.bits_w)
            gx = (gy.to(dt) @ w.to(dt)).float()
        g2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])  # any batch dims
        dt = _exact_matmul_dtype(g2.shape[0], q.act_code_bits, q.error_code_bits)
        gw = g2.to(dt).t() @ x2.to(dt)
        return gx, layer._quantize_grad(gw), gb, None


class QuantConv2d(nn.Conv2d, _Quantized):
    """``nn.Conv2d`` with integer weights, exact accumulation and stochastic weight gradients.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as ``nn.Conv2d``. A quantized bias lives in the integer weight store like the
            weight; it joins the exact accumulators as int32 codes at their exponent (rounded
            half up, saturated) and its gradient, the error summed per channel, is rounded
            to ``bits_g`` like the weight's. (Before a batch norm a bias does nothing: its
            beta plays that role, so the built-in models have none.)
        qconfig: widths and backend; None (or all 32) is a plain ``nn.Conv2d``.
        qstate: the network's shared :class:`~qtrain.quant.QState`.

    Shape: as ``nn.Conv2d``. The output is the exact accumulator (integer times a power of
    two); a :class:`~qtrain.quant.Quantize` after it rounds it to ``bits_a``.

    Example::

        >>> conv = QuantConv2d(1, 6, 5, bias=False, qconfig=QConfig())
        >>> conv(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 6, 24, 24])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None, *, qconfig: QConfig | None = None, qstate: QState | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        if padding_mode != "zeros" and qconfig is not None and qconfig.quantized:
            raise ValueError("a quantized QuantConv2d supports padding_mode='zeros' only")
        self._setup_quant(qconfig, qstate, self.weight[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return super().forward(x)
        return _ConvFn.apply(x, _WeightFn.apply(self.weight, self), self.bias, self)


class QuantLinear(nn.Linear, _Quantized):
    """``nn.Linear`` with integer weights, exact accumulation and stochastic weight gradients.

    Args and behaviour as :class:`QuantConv2d`; shape as ``nn.Linear``.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 qconfig: QConfig | None = None, qstate: QState | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup_quant(qconfig, qstate, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return super().forward(x)
        return _LinearFn.apply(x, _WeightFn.apply(self.weight, self), self.bias, self)


# ---------------------------------------------------------------------------------------------
# Max-pool on codes


def _quadrants(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four elements of every 2x2 window, in torch's scan order (row-major)."""
    return t[..., 0::2, 0::2], t[..., 0::2, 1::2], t[..., 1::2, 0::2], t[..., 1::2, 1::2]


class _MaxPool2x2Fn(torch.autograd.Function):
    """2x2/stride-2 max-pool whose backward routes each error to the first largest element of
    its window (row-major), as ``F.max_pool2d`` does. float32 CPU tensors run the one-pass
    kernels of :mod:`qkernels.pool`; other tensors (and any under
    :func:`~qtrain.quant.torch_emulation`) torch operations."""

    @staticmethod
    def forward(ctx, x):
        # one decision for both passes (the backward may run outside torch_emulation)
        ctx.kernel = BACKEND["emulate"].kernels(x) and x.dtype == torch.float32
        if ctx.kernel:
            ctx.save_for_backward(x)
            return torch.from_numpy(maxpool2x2(x.detach().numpy()))
        a, b, c, d = _quadrants(x)
        y = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, gy):
        if ctx.kernel:
            (x,) = ctx.saved_tensors
            return torch.from_numpy(maxpool2x2_backward(
                x.detach().numpy(), gy.detach().float().contiguous().numpy()))
        x, y = ctx.saved_tensors
        gx = torch.zeros_like(x)
        zero = gy.new_zeros(())
        free = None  # windows whose error is not yet placed
        for src, dst in zip(_quadrants(x), _quadrants(gx)):
            hit = src == y if free is None else free & (src == y)
            dst.copy_(torch.where(hit, gy, zero))
            free = ~hit if free is None else free & ~hit
        return gx


class QuantMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``; 2x2 windows with stride 2 (no padding, dilation, ceil mode or indices)
    on even-sized inputs take a strided path that is exact and selects like torch's.

    Example::

        >>> QuantMaxPool2d(2)(torch.arange(16.).reshape(1, 1, 4, 4))
        tensor([[[[ 5.,  7.],
                  [13., 15.]]]])
    """

    def _fast(self, x: torch.Tensor) -> bool:
        pair = (lambda v: v if isinstance(v, tuple) else (v, v))
        return (pair(self.kernel_size) == (2, 2) and pair(self.stride) == (2, 2)
                and pair(self.padding) == (0, 0) and pair(self.dilation) == (1, 1)
                and not self.ceil_mode and not self.return_indices and x.dim() in (3, 4)
                and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast(x):
            return _MaxPool2x2Fn.apply(x)
        return super().forward(x)


# ---------------------------------------------------------------------------------------------
# L1 batch norm


def _eps_log2(eps: float) -> int | None:
    """Epsilon as the nearest power of two (the integer kernels' form); None for 0."""
    return None if eps == 0 else round(math.log2(eps))


def _storage(bits: int) -> tuple[np.dtype, int]:
    """Code dtype of the L1BN kernels for ``bits`` and the width it holds (int8: 7 bits plus
    sign; int16 for 9..16 bits: 15 plus sign)."""
    dtype = np.dtype(code_dtype(bits))
    return dtype, 8 * dtype.itemsize - 1


def _ncl(c: QTensor) -> QTensor:
    """The kernels' layout: (N, C) stays 2-D, anything wider becomes (N, C, L, 1)."""
    q = c.q
    return QTensor(q if q.ndim == 2 else q.reshape(q.shape[0], q.shape[1], -1, 1), c.exp)


def _bn_codes(t: torch.Tensor, bits: int) -> QTensor:
    """Codes of a container of ``bits``-wide codes at the full width of their storage, exact,
    in the kernels' layout."""
    dtype, width = _storage(bits)
    return _ncl(f32_to_codes(t.detach().cpu().numpy(), width, dtype))


def _param_codes(p: torch.Tensor) -> QTensor:
    """Codes of a parameter store (at most 24 bits) as int32."""
    return f32_to_codes(p.detach().cpu().numpy(), 24, np.int32)


def _container(q: QTensor, like: torch.Tensor) -> torch.Tensor:
    """float32 container of int8/int16 codes, shaped like ``like``."""
    return torch.from_numpy(codes_to_f32(q)).to(like.device).reshape(like.shape)


class _L1BNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn):
        y, ctx.cache = bn._forward_codes(_bn_codes(x, bn.qconfig.norm_in_bits))
        ctx.bn = bn
        return _container(y, x)

    @staticmethod
    def backward(ctx, gy):
        dx, grad_w, grad_b = ctx.bn._backward_codes(_bn_codes(gy, ctx.bn.qconfig.error_code_bits),
                                                    ctx.cache, gy)
        return _container(dx, gy), grad_w, grad_b, None


def _block_forward(ctx, xq: QTensor, bn, quant, pool: bool, out) -> torch.Tensor:
    """The fused nodes' common forward from the norm's input codes ``xq`` (N, C, ...): L1BN,
    ReLU [and the 2x2 max-pool] on codes; the output container. ``out``: the block's output
    quantizer where it joins the node (:func:`_out_joins`; its forward changes nothing and is
    counted here), else None."""
    shape = xq.q.shape
    y, ctx.cache = bn._forward_codes(_ncl(xq))
    ctx.bn, ctx.quant, ctx.pool, ctx.shape, ctx.out = bn, quant, pool, shape, out
    if pool:  # the backward needs the pool's selection, not y
        pooled, ctx.sel = maxpool2x2_relu_codes(y.q.reshape(shape))
        result = intgemm.attach(torch.from_numpy(codes_to_f32(QTensor(pooled, y.exp))),
                                pooled, y.exp)
    else:
        ctx.y = y.q
        result = intgemm.attach(torch.from_numpy(codes_to_f32(y, relu=True)).reshape(shape),
                                y.q.reshape(shape), y.exp, relu=True)
    if out is not None:  # as Quantize.forward counts codes it leaves as they are
        out.stats_fwd.add(0, 0, result.numel())
    return result


def _block_backward(ctx, gy: torch.Tensor) -> tuple[QTensor, torch.Tensor, torch.Tensor]:
    """The fused nodes' common backward: the error at the quantizer's input as codes (rounded
    to ``bits_e`` by the quantizer's backward, laid out as the forward's input), and the norm's
    parameter gradients."""
    bn, quant = ctx.bn, ctx.quant
    dtype, width = _storage(bn.qconfig.error_code_bits)
    gy_f32 = gy.detach().float().contiguous().numpy()
    if ctx.out is not None:  # the output quantizer's backward (nearest), rounding to codes
        gq, counts = quantize_f32_to_codes(gy_f32, ctx.out.bits_bwd, width, dtype)
        ctx.out.stats_bwd.add(*counts)
        g = (maxpool2x2_relu_backward_of_codes(ctx.sel, gq, width, dtype) if ctx.pool
             else codes_where(gq, ctx.y, width, dtype))
    elif ctx.pool:
        g = maxpool2x2_relu_backward_codes(ctx.sel, gy_f32, width, dtype)
    else:
        g = f32_to_codes_where(gy_f32, ctx.y, width, dtype)
    dx, grad_w, grad_b = bn._backward_codes(_ncl(g), ctx.cache, gy)
    dx = quant.round_error_codes(dx)
    return QTensor(dx.q.reshape(ctx.shape), dx.exp), grad_w, grad_b


class _QuantBNReLUFn(torch.autograd.Function):
    """``Quantize -> L1 batch norm -> ReLU [-> 2x2 max-pool]`` of the int kernels as one
    autograd node.

    The integers are those of the modules in a row (``_QuantizeFn``, ``_L1BNFn``, ReLU,
    ``_MaxPool2x2Fn``; ``tests/qtrain/test_fused.py`` checks bit equality, counters included),
    with fewer passes over the large tensors: the rounding writes the norm's input codes
    directly; ReLU and pool work on the norm's int8/int16 output codes, and only their result
    becomes a container; going back, the error reaches the norm as codes without a float
    error of its size, and the quantizer's backward rounds the norm's error codes without a
    container in between.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, quant, bn, pool, out):
        dtype, width = _storage(bn.qconfig.norm_in_bits)
        x32 = x.detach().numpy()
        if quant.channels:  # each channel at its own exponent: 16-bit codes (nearest_channels)
            xq, counts = quantize_f32_rows(np.ascontiguousarray(np.moveaxis(x32, 1, 0)),
                                           quant.bits_fwd)
            xq = QTensor(np.ascontiguousarray(np.moveaxis(xq.q, 0, 1)),
                         xq.exp if xq.q.any() else 0)
            quant.stats_fwd.add(*counts)
            return _block_forward(ctx, xq, bn, quant, pool, out)
        exp = None
        if dist.active():
            exp = dist.range_exponent(peak_exponent(x32), quant.bits_fwd)
        xq, counts = quantize_f32_to_codes(x32, quant.bits_fwd, width, dtype, exp)
        quant.stats_fwd.add(*counts)
        return _block_forward(ctx, xq, bn, quant, pool, out)

    @staticmethod
    def backward(ctx, gy):
        dx, grad_w, grad_b = _block_backward(ctx, gy)
        return torch.from_numpy(codes_to_f32(dx)), grad_w, grad_b, None, None, None, None


def _weight_codes8(w: torch.Tensor) -> intgemm.Codes:
    w8 = intgemm.codes8(w)
    assert w8 is not None, "weights rounded to bits_w <= 8 are 8-bit codes (a GEMM block)"
    return w8


def _norm_input(acc: torch.Tensor, exp: int, quant, bn) -> QTensor:
    """A GEMM block's int32 accumulators (O, N, ...) at ``exp`` rounded by ``quant`` straight
    to the norm's input codes (N, O, ...), counted: what ``quant`` gives on their exact float32
    container."""
    if quant.channels:  # each channel at its own exponent (nearest_channels)
        xq, counts = intgemm.requantize_channels(acc, exp, quant.bits_fwd)
    else:
        round_exp = None
        if dist.active():
            round_exp = dist.range_exponent(intgemm.top_exponent(acc, exp), quant.bits_fwd)
        xq, counts = intgemm.requantize(acc, exp, quant.bits_fwd,
                                        *_storage(bn.qconfig.norm_in_bits), round_exp=round_exp)
    quant.stats_fwd.add(*counts)
    return xq


class _ConvBlockFn(torch.autograd.Function):
    """``QuantConv2d -> Quantize -> L1 batch norm -> ReLU [-> 2x2 max-pool]`` of 8-bit codes as
    one autograd node: :class:`_QuantBNReLUFn` with the convolution inside.

    The conv's int32 accumulators are rounded straight to the norm's input codes (no float32
    container of the conv output), and going back the quantizer's error codes feed the conv's
    integer GEMMs (no error container, no conversion back to codes). The node takes the
    weight store and rounds it as :class:`_WeightFn` does (``weight_store``; ``weight`` and
    ``bias`` are the norm's), and ``out``, the block's output quantizer where it joins
    (:func:`_out_joins`). The integers are those of the modules in a row
    (``tests/qtrain/test_fused.py``).
    """

    @staticmethod
    def forward(ctx, x, weight_store, weight, bias, conv, quant, bn, pool, x8, out):
        w = _weight_forward(ctx, weight_store, conv)
        w8 = _weight_codes8(w)
        acc, ctx.cols = intgemm.conv2d_acc(x8, w8, conv.stride, conv.padding)
        ctx.save_for_backward(x)
        ctx.conv, ctx.x_exp, ctx.w8, ctx.w = conv, x8.exp, w8, w
        return _block_forward(ctx, _norm_input(acc, x8.exp + w8.exp, quant, bn), bn, quant, pool,
                              out)

    @staticmethod
    def backward(ctx, gy):
        dx, grad_bn_w, grad_bn_b = _block_backward(ctx, gy)
        (x,), w, conv = ctx.saved_tensors, ctx.w, ctx.conv
        columns = ctx.needs_input_grad[0]
        g8 = intgemm.error_matrix(dx.q, dx.exp, columns)
        gx = _conv_gx(x, w, g8, ctx.w8, lambda: torch.from_numpy(codes_to_f32(dx)), conv) \
            if columns else None
        gw = intgemm.conv2d_weight_grad(g8, columns, ctx.cols, ctx.x_exp, w.shape)
        return (gx, _weight_backward(ctx, conv._quantize_grad_codes(gw, w)), grad_bn_w,
                grad_bn_b, None, None, None, None, None, None)


class _LinearBlockFn(torch.autograd.Function):
    """``QuantLinear -> Quantize -> L1 batch norm -> ReLU`` of 8-bit codes as one autograd
    node, as :class:`_ConvBlockFn` for a convolution: the int32 accumulators, computed
    transposed (O, N) as the convolution's are, are rounded straight to the norm's input
    codes, and going back the quantizer's error codes feed both GEMMs. The integers are those
    of the modules in a row (``tests/qtrain/test_fused.py``)."""

    @staticmethod
    def forward(ctx, x, weight_store, weight, bias, linear, quant, bn, x8, out):
        w = _weight_forward(ctx, weight_store, linear)
        w8 = _weight_codes8(w)
        acc = intgemm.matmul(w8.q, x8.q.t())  # (O, N)
        ctx.linear, ctx.x8, ctx.w8, ctx.w = linear, x8, w8, w
        return _block_forward(ctx, _norm_input(acc, x8.exp + w8.exp, quant, bn), bn, quant,
                              False, out)

    @staticmethod
    def backward(ctx, gy):
        dx, grad_bn_w, grad_bn_b = _block_backward(ctx, gy)
        g = intgemm.Codes(torch.from_numpy(dx.q), dx.exp)
        gx = intgemm.linear_input_grad(g, ctx.w8) if ctx.needs_input_grad[0] else None
        gw = intgemm.linear_weight_grad(g, ctx.x8)
        return (gx, _weight_backward(ctx, ctx.linear._quantize_grad_codes(gw, ctx.w)), grad_bn_w,
                grad_bn_b, None, None, None, None, None)


def _fusable(quant, bn, relu, x: torch.Tensor) -> bool:
    """Whether the int kernels would run ``relu(bn(quant(x)))``: a quantized L1 batch norm in
    training mode on a float32 CPU tensor."""
    if not (isinstance(bn, _L1BatchNorm) and bn.quantized and isinstance(relu, nn.ReLU)):
        return False
    if getattr(quant, "grid", False):  # WAGE's fixed grid before a norm: the modules run it
        return False
    q = bn.qconfig
    return ((bn.training or not bn.track_running_stats)
            and x.dtype == torch.float32 and x.device.type == "cpu"
            and q.engine.kernels(x) and quant.bits_fwd < FLOAT_BITS
            and quant.bits_fwd - 1 <= _storage(q.norm_in_bits)[1]
            and not (quant.channels and dist.active())
            and x.dim() in bn._ndims)


def _pool_joins(pool, x: torch.Tensor) -> bool:
    """A 2x2 ``QuantMaxPool2d`` after the ReLU joins a fused node when its fast path applies."""
    return isinstance(pool, QuantMaxPool2d) and x.dim() == 4 and pool._fast(x)


def _hooked(m: nn.Module) -> bool:
    """Whether a hook would see ``m`` run: its own, or a global module hook."""
    return any((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                m._backward_pre_hooks, torch_module._global_forward_hooks,
                torch_module._global_forward_pre_hooks, torch_module._global_backward_hooks,
                torch_module._global_backward_pre_hooks))


def _out_joins(out, bn, pool, fuse_pool: bool) -> bool:
    """Whether the block's output quantizer ``out`` (the ``Quantize`` after the ReLU [and
    pool]) joins a fused node: where its forward leaves the norm's codes as they are and its
    backward rounds the error to nearest at the range exponent (not WAGE's grid or rule, not
    stochastically, not per sample; one process), into codes the norm's error storage holds;
    where nothing runs between the node and it (a pool outside the node would); and where no
    hook waits to see it run (a fused block calls ``out`` as a module otherwise)."""
    if not isinstance(out, Quantize) or out.grid or out.wage or out.stochastic_bwd \
            or out.sample_exp or (pool is not None and not fuse_pool) or _hooked(out):
        return False
    return (bn.out_bits <= out.bits_fwd < FLOAT_BITS and out.bits_bwd < FLOAT_BITS
            and (out.frozen_exp is None or out.training) and not dist.active()
            and out.bits_bwd - 1 <= _storage(bn.qconfig.error_code_bits)[1])


def quant_bn_relu(quant, bn, relu, x: torch.Tensor, pool=None, out=None
                  ) -> tuple[torch.Tensor, bool, bool] | None:
    """``relu(bn(quant(x)))`` as one fused node when the int kernels would run all three
    (:func:`_fusable`); None when they would not, and the caller runs the modules. A 2x2
    ``QuantMaxPool2d`` ``pool`` (the next module) joins the node when its fast path applies,
    and so does the output quantizer ``out`` (the module after them) where
    :func:`_out_joins`. Returns the output and whether ``pool`` and ``out`` were applied."""
    if not _fusable(quant, bn, relu, x):
        return None
    fuse_pool = _pool_joins(pool, x)
    fuse_out = _out_joins(out, bn, pool, fuse_pool)
    return (_QuantBNReLUFn.apply(x, bn.weight, bn.bias, quant, bn, fuse_pool,
                                 out if fuse_out else None), fuse_pool, fuse_out)


def _gemm_block_applies(q: QConfig, x: torch.Tensor, terms: int) -> bool:
    """A GEMM block's products run on 8-bit codes, with dot products of ``terms`` products
    whose sums stay below ``2**24`` (so the unfused layer's float32 output is exact)."""
    return (max(q.act_code_bits, INPUT_BITS, q.bits_w, q.error_code_bits) <= 8
            and _gemm(x, q, max(q.act_code_bits, INPUT_BITS), q.bits_w, q.error_code_bits)
            and terms * intgemm.CODE_MAX ** 2 < F32_EXACT)


def conv_block(conv, quant, bn, relu, x: torch.Tensor, pool=None, out=None
               ) -> tuple[torch.Tensor, bool, bool] | None:
    """``relu(bn(quant(conv(x))))`` as one fused node (:class:`_ConvBlockFn`) when
    :func:`quant_bn_relu` would fuse the last three and the conv runs as an integer GEMM of
    8-bit codes whose sums stay below ``2**24`` (so the unfused conv's float32 output would be
    exact); None otherwise. ``pool`` and ``out`` join as in :func:`quant_bn_relu`. Returns the
    output and whether ``pool`` and ``out`` were applied."""
    if not (isinstance(conv, QuantConv2d) and conv.quantized and conv.bias is None
            and isinstance(quant, Quantize)):
        return None
    if not (intgemm.conv_applies(conv)
            and _gemm_block_applies(conv.qconfig, x, conv.weight[0].numel())
            and _fusable(quant, bn, relu, x)):
        return None
    x8 = intgemm.codes8(x)
    if x8 is None:
        return None
    fuse_pool = _pool_joins(pool, x)
    fuse_out = _out_joins(out, bn, pool, fuse_pool)
    return (_ConvBlockFn.apply(x, conv.weight, bn.weight, bn.bias, conv, quant, bn, fuse_pool,
                               x8, out if fuse_out else None), fuse_pool, fuse_out)


def linear_block(linear, quant, bn, relu, x: torch.Tensor, out=None
                 ) -> tuple[torch.Tensor, bool, bool] | None:
    """``relu(bn(quant(linear(x))))`` as one fused node (:class:`_LinearBlockFn`) on the
    conditions of :func:`conv_block` (2-D input, no pool); None otherwise. Returns the output,
    False (no pool) and whether ``out`` was applied."""
    if not (isinstance(linear, QuantLinear) and linear.quantized and linear.bias is None
            and isinstance(quant, Quantize) and x.dim() == 2
            and _gemm_block_applies(linear.qconfig, x, linear.in_features)
            and _fusable(quant, bn, relu, x)):
        return None
    x8 = intgemm.codes8(x)
    if x8 is None:
        return None
    fuse_out = _out_joins(out, bn, None, False)
    return (_LinearBlockFn.apply(x, linear.weight, bn.weight, bn.bias, linear, quant, bn, x8,
                                 out if fuse_out else None), False, fuse_out)


class _L1BatchNorm(nn.Module, _Quantized):
    r"""Shared base of :class:`L1BatchNorm1d` and :class:`L1BatchNorm2d`.

    .. math::

        y = \gamma\, \frac{x - \mathrm{E}[x]}{\mathrm{E}|x - \mathrm{E}[x]| + \epsilon} + \beta

    Mirrors ``nn.BatchNorm``: parameters ``weight`` (gamma) and ``bias`` (beta), buffers
    ``running_mean``, ``running_dev`` (the running L1 deviation, where BatchNorm keeps a
    variance) and ``num_batches_tracked``; ``momentum``, ``eps``, ``affine``,
    ``track_running_stats`` and eval mode mean what they mean there; ``momentum=None`` is the
    cumulative average (the update's factor ``1 / num_batches_tracked``, counting this batch).
    Quantized, every factor is a 16-bit fixed-point fraction (``round(factor * 2**16)``), so the
    cumulative average's ``1/n`` is exact for n = 1, 2, 4, ... and rounded otherwise, and
    after about 131,000 batches it rounds to 0 (the statistics then stay).

    ``frozen_in_exp`` (None until :func:`qtrain.frozen.freeze` sets it to the preceding
    quantizer's frozen exponent): quantized inference reads its input codes at this exponent,
    so the folded multiplier, offset and shift are the same for every batch.

    ``relu_after``: a ReLU follows the norm, so under ``act_codes = "unsigned"`` its output
    codes are one bit wider (``out_bits``: the negative half they add is dropped by the ReLU).
    """

    _ndims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, qconfig: QConfig | None = None, qstate: QState | None = None,
                 relu_after: bool = False):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._setup_quant(qconfig, qstate)
        #: width of the output codes: ``bits_a``, or with ``relu_after`` (a ReLU follows, which
        #: drops the negative half) the activations' :attr:`~QConfig.act_code_bits`
        self.out_bits = None
        if self.quantized:
            self.out_bits = qconfig.act_code_bits if relu_after else qconfig.bits_a
            if not affine:
                raise ValueError("a quantized L1 batch norm needs affine=True")
            if qconfig.stochastic_norm_errors and qconfig.wage:
                raise ValueError("scheme wage rounds errors to nearest (WAGE's rule): set "
                                 "norm_errors nearest")
            if qconfig.stochastic_norm_errors:  # the stream and counts of its input's error
                self.error_id = self.qstate.new_id()
                self.stats_e = QuantStats()
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            # quantized: exact fixed-point values code * 2**RUN_EXP (float64 holds them)
            run_dtype = torch.float64 if self.quantized else dtype
            self.register_buffer("running_mean",
                                 torch.zeros(num_features, device=device, dtype=run_dtype))
            self.register_buffer("running_dev",
                                 torch.ones(num_features, device=device, dtype=run_dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            for name in ("running_mean", "running_dev", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.register_buffer("last_out_exp", torch.tensor(0, dtype=torch.long))
        self.frozen_in_exp: int | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_dev.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ndims:
            want = " or ".join(f"{d}D" for d in self._ndims)
            raise ValueError(f"expected {want} input (got {x.dim()}D input)")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    # -- running statistics in fixed point (quantized mode) --------------------------------

    @staticmethod
    def _codes_of(buf: torch.Tensor) -> np.ndarray:
        """Exact RUN_EXP codes of a float64 running-statistics buffer."""
        return np.ldexp(buf.detach().cpu().numpy().astype(np.float64), -RUN_EXP).astype(np.int64)

    def _forward_codes(self, x: QTensor) -> tuple[QTensor, object]:
        """Training-mode forward on the kernels' codes: output codes (``out_bits``) and the
        kernels' cache; updates the running statistics and the last output exponent."""
        if dist.active():  # a synchronized batch norm (qtrain.distributed)
            x = dist.align(x, _storage(self.qconfig.norm_in_bits)[1])
        y, cache = l1bn_forward(x, _param_codes(self.weight), _param_codes(self.bias),
                                out_bits=self.out_bits, eps_log2=_eps_log2(self.eps),
                                collective=dist.collective())
        if self.track_running_stats:
            self._update_running(cache)
        self.last_out_exp.fill_(y.exp)
        return y, cache

    def _backward_codes(self, gy: QTensor, cache, like: torch.Tensor
                        ) -> tuple[QTensor, torch.Tensor, torch.Tensor]:
        """Backward on the kernels' codes: the input error codes (``bits_e``) and the
        ``bits_g`` gradients of gamma and beta (containers on ``like``'s device)."""
        q = self.qconfig
        if cache.collective is not None:
            gy = dist.align(gy, _storage(q.error_code_bits)[1])
        if q.stochastic_norm_errors:  # 16 bits from the kernel, then bits_e stochastically
            dx = l1bn_backward(gy, cache, dx_bits=16)
            dgamma, dbeta = dx[1:]
            dx = self._round_error(dx[0])
        else:
            dx, dgamma, dbeta = l1bn_backward(gy, cache, dx_bits=q.error_code_bits)
        # a synchronized norm's dgamma and dbeta are already the whole batch's
        return (dx, self._quantize_grad_codes(dgamma, like, 0, reduce=False),
                self._quantize_grad_codes(dbeta, like, 1, reduce=False))

    def _round_error(self, dx: QTensor) -> QTensor:
        """The input's error codes rounded stochastically to ``bits_e`` at their range exponent
        (in a synchronized step the whole batch's, each element taking the stream's element
        at its place in the whole batch)."""
        q = self.qconfig
        exp, first = None, 0
        if dist.active():  # None: every process's error is zero, and so is the rounding's
            exp = dist.range_exponent(code_top(dx), q.bits_e)
            first = dist.first_element(dx.q)
        out, counts = quantize_stochastic(dx, q.bits_e, seed=q.seed, step=self.qstate.step,
                                          tensor_id=self.error_id, exp=exp, first=first)
        self.stats_e.add(*counts)
        return out

    def _factor(self) -> float:
        """This training batch's weight in the running statistics: ``momentum``, or with
        ``momentum=None`` the cumulative average's ``1 / n`` (n batches, this one counted)."""
        if self.momentum is None:
            return 1.0 / (int(self.num_batches_tracked) + 1)
        return self.momentum

    def _update_running(self, cache) -> None:
        mean, dev = self._codes_of(self.running_mean), self._codes_of(self.running_dev)
        l1bn_update_running(mean, dev, cache, round(self._factor() * (1 << MOMENTUM_BITS)))
        for codes, buf in ((mean, self.running_mean), (dev, self.running_dev)):
            buf.copy_(torch.from_numpy(np.ldexp(codes.astype(np.float64), RUN_EXP)))
        self.num_batches_tracked += 1

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not self.quantized:
            factor = 0.0
            if self.training and self.track_running_stats:
                factor = self._factor()
                self.num_batches_tracked += 1
            return l1_batch_norm(x, self.running_mean if self.track_running_stats else None,
                                 self.running_dev if self.track_running_stats else None,
                                 self.weight, self.bias, use_batch, factor, self.eps)
        if use_batch:
            return _L1BNFn.apply(x, self.weight, self.bias, self)
        return self._inference(x)

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        """Folded integer affine with the running statistics and the last training exponent (the
        input read at its frozen exponent, if any, else at its peak's)."""
        q = self.qconfig
        if self.frozen_in_exp is None:
            xq = _bn_codes(x, q.norm_in_bits)
        else:
            xq = f32_to_codes(x.detach().cpu().numpy(), 0, _storage(q.norm_in_bits)[0],
                              exp=self.frozen_in_exp)
        if xq.q.ndim == 2:
            xq = QTensor(xq.q[:, :, None, None], xq.exp)
        y = l1bn_inference(xq, self.folded(xq.exp), out_bits=self.out_bits,
                           out_exp=int(self.last_out_exp))
        return _container(y, x)

    def folded(self, x_exp: int) -> np.ndarray:
        """The quantized inference as one (multiplier, offset, shift) per channel (int64, shape
        (C, 3)) for input codes of ``norm_in_bits`` bits at exponent ``x_exp``
        (:func:`qkernels.l1bn_fold`): code ``x`` maps to ``saturate((A*x + B) >> sh)`` at
        the last training batch's output exponent (``last_out_exp``)."""
        q = self.qconfig
        return l1bn_fold(_param_codes(self.weight), _param_codes(self.bias),
                         self._codes_of(self.running_mean), self._codes_of(self.running_dev),
                         x_exp=x_exp, out_bits=self.out_bits, out_exp=int(self.last_out_exp),
                         eps_log2=_eps_log2(self.eps), x_bits=q.norm_in_bits)


class L1BatchNorm2d(_L1BatchNorm):
    """L1 batch norm over a 4D input (N, C, H, W); statistics per channel over N, H, W.

    Example::

        >>> bn = L1BatchNorm2d(6)
        >>> bn(torch.randn(8, 6, 4, 4)).shape
        torch.Size([8, 6, 4, 4])
    """

    _ndims = (4,)


class L1BatchNorm1d(_L1BatchNorm):
    """L1 batch norm over a 2D (N, C) or 3D (N, C, L) input; statistics per channel."""

    _ndims = (2, 3)


def l1_batch_norm_functional(*args, **kwargs):
    """Alias of :func:`qtrain.reference.l1_batch_norm` (``F.batch_norm``'s argument order)."""
    return l1_batch_norm(*args, **kwargs)


__all__ = ["QuantConv2d", "QuantLinear", "QuantMaxPool2d", "L1BatchNorm1d", "L1BatchNorm2d",
           "l1_batch_norm_functional", "FLOAT_BITS"]
