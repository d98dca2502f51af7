r"""SGD with momentum for float and for integer networks.

For a quantized network every parameter lives in a wide integer store (``QConfig.store_bits``
significant bits and a per-tensor exponent, first chosen from its initial range with 4x
headroom; the float32 parameter holds ``code * 2**e`` exactly) with an int64 velocity, and a
step is :func:`qkernels.optim.sgd_step` (run on the float32 containers of the gradient and the
parameter, the parameter's updated in place by a :class:`~qkernels.optim.F32Store` kept per
parameter, whose arrays are checked once):

.. math:: v \leftarrow \mu v + g + N \lambda w, \qquad w \leftarrow w - \frac{\eta}{N} v

with ``mu``, ``eta / N`` and ``N lambda`` as fixed-point constants (``N`` the batch size: the
integer loss passes back per-sample errors, so ``g`` is a sum over the batch and torch's
weight decay ``lambda`` of the batch mean enters as ``N lambda``) and the gradient ``g``
already rounded to ``bits_g`` by its layer.
When an update would take a code out of the store, the store's exponent rises instead (the
weights behind batch norm grow during training; nothing is clipped).
The ``int`` backend runs the qkernels kernel; ``emulate`` runs the same integer formulas as torch
int64 operations on the parameter's device. A float network gets torch's SGD semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from qkernels.fixedpoint import MOMENTUM_BITS
from qkernels.ieee import codes_to_f32, f32_to_codes
from qkernels.optim import (DECAY_BITS, LR_BITS, VELOCITY_BITS, F32Store, SgdResult, decay_code,
                            lr_code, momentum_code, sgd_step, sgd_step_f32_inplace, store_shift)

from .quant import FLOAT_BITS, QConfig, pow2, top_exponent, to_codes

#: Headroom of the store over the initial range: 2**STORE_HEADROOM.
STORE_HEADROOM = 2
#: The store's exponent rises no further than where its largest code is worth about
#: 2**WEIGHT_MAX_LOG2 (far beyond any trained weight); a diverging run saturates there instead
#: of overflowing the float32 containers.
WEIGHT_MAX_LOG2 = 20


@dataclass
class StoreStats:
    """One parameter's store: its exponent now, how far it rose over ``steps`` steps, and how
    many codes saturated at the exponent's ceiling (a diverging run)."""

    exp: int
    raised: int = 0
    steps: int = 0
    saturated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"exp": self.exp, "raised": self.raised, "steps": self.steps,
                "saturated": self.saturated}


class QSGD(torch.optim.Optimizer):
    """SGD with momentum; integer updates on a wide store when ``qconfig`` is quantized.

    Args:
        params: parameters (or groups).
        lr: learning rate (per sample of the batch mean, as torch's).
        momentum: momentum factor (0.9 in the paper).
        weight_decay: L2 penalty as torch's SGD applies it (``g + weight_decay * w``); in
            integers a fixed-point constant of ``DECAY_BITS`` fractional bits times the store
            codes (:mod:`qkernels.optim`). 0: none.
        qconfig: the network's quantization; None or float for torch's SGD.

    ``step(batch_size=N)`` must be told the batch size in quantized mode. ``self.stats`` holds
    a :class:`StoreStats` per parameter (by ``id``): the store's exponent and its rises.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9,
                 qconfig: QConfig | None = None, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr={lr} must be positive")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        if not 0 <= weight_decay < 1:
            raise ValueError(f"weight_decay={weight_decay} must be in [0, 1)")
        super().__init__(params, {"lr": lr, "momentum": momentum,
                                  "weight_decay": weight_decay})
        self.qconfig = qconfig
        self.stats: dict[int, StoreStats] = {}
        self._f32_stores: dict[int, tuple] = {}  # by id(p): see _f32_store
        if self.integer and qconfig.wage:
            if momentum or weight_decay:
                raise ValueError(f"scheme wage updates by plain SGD (WAGE's rule): set momentum "
                                 f"0 and weight_decay 0, not {momentum} and {weight_decay}")
            from .wage import STREAM_BASE, lr_exponent

            lr_exponent(lr)  # a power of two, or a one-line error now
            #: each parameter's random stream for WAGE's stochastic update
            self._streams = {id(p): STREAM_BASE + i for i, p in enumerate(
                p for group in self.param_groups for p in group["params"])}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, keeping the integer state exact.

        ``Optimizer.load_state_dict`` casts state tensors to their parameter's dtype, which would
        turn an int64 velocity into float32; the saved velocities are put back as they were and
        the per-parameter store counters (not saved) start afresh.
        """
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            live = self.state[p]
            if "velocity" in saved:
                live["velocity"] = saved["velocity"].clone().to(live["velocity"].device)
            if "store_exp" in live:
                self.stats[id(p)] = StoreStats(int(live["store_exp"]))

    def reset_stats(self) -> None:
        """Zero the per-parameter counts of exponent rises (e.g. at the start of an epoch)."""
        for key, st in self.stats.items():
            self.stats[key] = StoreStats(st.exp)

    @property
    def integer(self) -> bool:
        return self.qconfig is not None and self.qconfig.quantized

    @torch.no_grad()
    def step(self, closure=None, *, batch_size: int | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.integer and batch_size is None:
            raise ValueError("QSGD.step needs batch_size= for a quantized network")
        for group in self.param_groups:
            if self.integer and not self.qconfig.wage:
                consts = _StepConstants(lr_code(group["lr"] / batch_size),
                                        momentum_code(group["momentum"]),
                                        decay_code(group.get("weight_decay", 0.0) * batch_size))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.integer and self.qconfig.wage:
                    self._wage_step(p, group)
                elif self.integer:
                    self._integer_step(p, consts)
                else:
                    self._float_step(p, group)
        return loss

    def _float_step(self, p, group):
        state = self.state[p]
        grad = p.grad
        if group.get("weight_decay", 0.0):  # groups saved before weight decay have none
            grad = grad.add(p, alpha=group["weight_decay"])
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(group["momentum"]).add_(grad)
        p.add_(buf, alpha=-group["lr"])

    def _store(self, p, state) -> int:
        """The store exponent (set at the first step, then raised by updates); the first call
        snaps the parameter to its grid."""
        if "store_exp" not in state:
            top = top_exponent(p)
            top = 1 if top is None else top
            exp = top + STORE_HEADROOM - (self.qconfig.store_bits - 1)
            codes = torch.floor(p.double() * pow2(-exp) + 0.5)
            p.copy_(codes * pow2(exp))
            state["store_exp"] = exp
            state["velocity"] = torch.zeros(p.shape, dtype=torch.int64,
                                            device="cpu" if self.qconfig.backend == "int"
                                            else p.device)
            self.stats[id(p)] = StoreStats(exp)
        return state["store_exp"]

    def _integer_step(self, p, consts: _StepConstants):
        state = self.state[p]
        exp = self._store(p, state)
        bits = self.qconfig.store_bits
        exp_max = max(exp, WEIGHT_MAX_LOG2 - (bits - 1))
        if self.qconfig.engine.kernels(p):
            rise, sat = self._kernel_step(p, state["velocity"], exp, exp_max, consts)
        else:
            codes, rise, sat = _sgd_torch(p, state["velocity"], to_codes(p.grad), exp,
                                          *consts, bits, exp_max)
            p.copy_(codes * pow2(exp + rise))
        state["store_exp"] = exp + rise
        st = self.stats[id(p)]
        st.exp, st.raised, st.steps = exp + rise, st.raised + rise, st.steps + 1
        st.saturated += sat

    def _kernel_step(self, p, velocity: torch.Tensor, exp: int, exp_max: int,
                     consts: _StepConstants) -> SgdResult:
        """qkernels' update of ``p`` (its store at ``exp``) and its velocity."""
        kw = {"lr_q": consts.lr_q, "momentum_q": consts.momentum_q, "exp_max": exp_max,
              "decay_q": consts.decay_q}
        bits = self.qconfig.store_bits
        grad = p.grad.detach().cpu().float().contiguous().numpy()
        if self.qconfig.bits_g >= FLOAT_BITS:
            # a float gradient: its 24-bit codes, as emulate's torch operations read it
            store = f32_to_codes(p.detach().float().numpy(), 24, np.int32, exp=exp)
            res = sgd_step(store, velocity.numpy(), f32_to_codes(grad, 24), store_bits=bits,
                           **kw)
            p.copy_(torch.from_numpy(codes_to_f32(store._replace(exp=exp + res.rise))))
            return res
        if p.dtype == torch.float32 and p.is_contiguous():
            # a quantized gradient's container, and the parameter's float32 storage as the
            # store: the kernel reads both and writes the new container in place
            res = self._f32_store(p, velocity).step(exp, grad, **kw)
            torch.autograd.graph.increment_version(p)  # as an in-place op would
            return res
        param = p.detach().float().contiguous().numpy()  # a float32 copy as the store
        res = sgd_step_f32_inplace(param, exp, velocity.numpy(), grad, store_bits=bits, **kw)
        p.copy_(torch.from_numpy(param))
        return res

    def _f32_store(self, p, velocity: torch.Tensor) -> F32Store:
        """The kernels' store on ``p``'s own float32 storage, made at its first step and
        remade when the parameter's or the velocity's memory changed (say, a parameter's
        ``.data`` replaced, or the velocity loaded from a checkpoint)."""
        key = (p.data_ptr(), p.shape, velocity.data_ptr())
        held = self._f32_stores.get(id(p))
        if held is None or held[0] != key:
            held = self._f32_stores[id(p)] = (key, F32Store(p.detach().numpy(), velocity.numpy(),
                                                            self.qconfig.store_bits))
        return held[1]

    def _wage_step(self, p, group):
        """WAGE's update (:func:`qtrain.wage.update`): integer steps of the ``bits_g`` grid,
        the store clipped; its random stream keyed by the parameter's update count."""
        from .wage import update

        q = self.qconfig
        state = self.state[p]
        count = state.get("wage_steps", 0)
        update(p, p.grad, group["lr"], q.bits_w, q.bits_g, q.engine, q.seed, count,
               self._streams[id(p)], clip=p.dim() > 1)  # a weight; not a norm's scale, shift
        state["wage_steps"] = count + 1


class _StepConstants(NamedTuple):
    """A group's fixed-point constants for one step: learning rate per sample (``lr / N``),
    momentum and weight decay (``N * weight_decay``), as :mod:`qkernels.optim` takes them."""

    lr_q: int
    momentum_q: int
    decay_q: int


def _round_shift(v: torch.Tensor, s: int) -> torch.Tensor:
    """round(v / 2**s), ties up, on int64 tensors (s >= 0); left shift for s < 0."""
    if s <= 0:
        return v << -s
    return (v + (1 << (s - 1))) >> s


def _sgd_torch(p, velocity, grad, exp, lr_q, mom_q, decay_q, bits, exp_max):
    """qkernels.optim's update as torch int64 operations on the parameter's device."""
    w = (p.double() * pow2(-exp)).to(torch.int64)
    g = torch.from_numpy(grad.q).to(p.device, torch.int64).reshape(p.shape)
    vmax = 1 << VELOCITY_BITS  # shifts past it saturate: cap them, as the kernel does
    g = _round_shift(g, max(exp - grad.exp, -VELOCITY_BITS))
    if decay_q:
        g += _round_shift(decay_q * w, DECAY_BITS)
    g.clamp_(-vmax, vmax)
    velocity.copy_((_round_shift(mom_q * velocity, MOMENTUM_BITS) + g).clamp_(-vmax, vmax))
    w = w - _round_shift(lr_q * velocity, LR_BITS)
    qmax = (1 << (bits - 1)) - 1
    lo, hi = (int(v) for v in torch.aminmax(w))
    rise = min(int(store_shift(lo, hi, qmax)), exp_max - exp)
    sat = 0
    if rise or lo < -qmax or hi > qmax:
        w = _round_shift(w, rise)
        velocity.copy_(_round_shift(velocity, rise))
        sat = int((w.abs() > qmax).sum())
        w.clamp_(-qmax, qmax)
    return w.double(), rise, sat
