"""No floating point inside any qkernels kernel, proven on compiled LLVM IR; qkernels never
imports torch.

The check enumerates every Numba dispatcher of every qkernels module (the serial and parallel
twins of ``qkernels._jit.serial_and_parallel`` and the ``inline="always"`` helpers included),
runs a workload that drives the package's entry points as qtrain calls them, in a subprocess
whose Numba cache is empty (so every signature is compiled there, from source, and its IR is
kept), and greps the IR of every (dispatcher, signature) the workload compiled for float types
and float instructions. The default workload reaches every dispatcher; the slow test
(``-m slow``) runs the full dtype matrix of the public functions. Helpers with no signature
of their own are covered by their callers' IR, and say so (:data:`HELPERS`); the few kernels
that legitimately touch float say why (:data:`ALLOWLIST`) and must still do. What this
proves and what it does not: ``docs/training.md``, "What the no-float check proves".
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import types

import numba
import numpy as np
import pytest
from numba.core.dispatcher import Dispatcher

import qkernels

FLOAT_IR = re.compile(r"\b(half|bfloat|float|double|x86_fp80|fp128|ppc_fp128|fadd|fsub|fmul|"
                      r"fdiv|frem|fcmp|fneg|sitofp|uitofp|fptosi|fptoui|fpext|fptrunc)\b")

#: Kernels that use floating point, and why that is allowed. Each must still use it (a stale
#: entry fails the test).
ALLOWLIST = {
    "qkernels.pool._forward": (
        "2x2 max-pool on float32 containers (QuantMaxPool2d's unfused path, float networks' "
        "too): float compares pick the first largest element and never round, so the output "
        "is one of the inputs' bit patterns. An order-preserving int32 key (-0.0 equal to "
        "+0.0) gave the same bits on every non-NaN input but took 1.5x the time on (128, 6, "
        "24, 24) float32 (1 thread, best of 60), beyond the 10% this exemption stands for"),
    "qkernels.pool._backward": (
        "routes each error of that max-pool to its window's first largest element, chosen by "
        "float compares (the error's bits are copied with integer masks); the int32 key took "
        "1.4x the time on (128, 6, 24, 24) and on (128, 32, 24, 24)"),
    "qkernels.opcount._l2bn_forward": (
        "the float64 L2 batch norm whose operations the counter tallies beside L1BN's "
        "(Table IV): the reference for the op counts, never part of training"),
    "qkernels.opcount._l2bn_backward": "the backward of that float64 L2BN reference",
}

#: What an allowlisted kernel may use: "only selects" means float32 loads/stores ("float") and
#: compares ("fcmp"), no arithmetic and no conversion. Kernels not named here (the L2BN
#: reference) may use anything.
ALLOWED_FLOAT_IR = {
    "qkernels.pool._forward": {"float", "fcmp"},
    "qkernels.pool._backward": {"float", "fcmp"},
}

#: ``inline="always"`` helpers: Numba substitutes their code into the caller before typing, so
#: they have no signature of their own and appear in no IR under their name. They are covered
#: by the IR of the callers named here (checked by signature; each helper needs at least one
#: caller that is not allowlisted).
HELPERS = {
    "qkernels.conv._span": ("qkernels.conv._col2im",),
    "qkernels.ieee._code_at": (
        "qkernels.ieee._nearest_element",
        "qkernels.ieee._rows_nearest_p", "qkernels.ieee._rows_nearest_s",
        "qkernels.ieee._to_codes_exact_chunk", "qkernels.ieee._to_codes_p",
        "qkernels.ieee._to_codes_s",
        "qkernels.ieee._to_codes_where_p", "qkernels.ieee._to_codes_where_s",
        "qkernels.optim._sgd_inplace_p", "qkernels.optim._sgd_inplace_s",
        "qkernels.optim._sgd_p", "qkernels.optim._sgd_s",
        "qkernels.pool._relu_backward_codes"),
    "qkernels.ieee._decode": (
        "qkernels.ieee._quantize_stochastic_p", "qkernels.ieee._quantize_stochastic_s",
        "qkernels.ieee._top_exponent"),
    "qkernels.ieee._encode": (
        "qkernels.ieee._from_codes_p", "qkernels.ieee._from_codes_relu_p",
        "qkernels.ieee._from_codes_relu_s", "qkernels.ieee._from_codes_s",
        "qkernels.ieee._nearest_element",
        "qkernels.ieee._quantize_stochastic_p", "qkernels.ieee._quantize_stochastic_s",
        "qkernels.optim._encode_all", "qkernels.optim._rescale_bits",
        "qkernels.optim._sgd_inplace_p", "qkernels.optim._sgd_inplace_s",
        "qkernels.optim._sgd_p", "qkernels.optim._sgd_s"),
    "qkernels.ieee._inexact": ("qkernels.ieee._to_codes_exact_chunk",),
    "qkernels.ieee._nearest_element": ("qkernels.ieee._quantize_nearest_chunk",),
    "qkernels.l1bn._apply_channel": (
        "qkernels.l1bn._apply_parallel", "qkernels.l1bn._apply_serial",
        "qkernels.l1bn._forward_parallel", "qkernels.l1bn._forward_serial"),
    "qkernels.l1bn._apply_group": ("qkernels.l1bn._apply_groups_parallel",
                                   "qkernels.l1bn._forward_groups_parallel"),
    "qkernels.l1bn._block": tuple(
        f"qkernels.l1bn._rows_{k}_{b}" for k in ("apply", "backward", "forward", "grad_apply",
                                                 "grad_stats", "stats")
        for b in ("parallel", "serial")),
    "qkernels.l1bn._finish_channel": ("qkernels.l1bn._finish_phase",
                                      "qkernels.l1bn._rows_stats_block",
                                      "qkernels.l1bn._stats_channel",
                                      "qkernels.l1bn._stats_group"),
    "qkernels.l1bn._grad_apply_channel": (
        "qkernels.l1bn._backward_parallel", "qkernels.l1bn._backward_serial",
        "qkernels.l1bn._grad_apply_parallel", "qkernels.l1bn._grad_apply_serial"),
    "qkernels.l1bn._grad_apply_group": ("qkernels.l1bn._backward_groups_parallel",
                                        "qkernels.l1bn._grad_apply_groups_parallel"),
    "qkernels.l1bn._grad_stats_channel": (
        "qkernels.l1bn._backward_parallel", "qkernels.l1bn._backward_serial",
        "qkernels.l1bn._grad_stats_parallel", "qkernels.l1bn._grad_stats_serial"),
    "qkernels.l1bn._grad_stats_group": ("qkernels.l1bn._backward_groups_parallel",
                                        "qkernels.l1bn._grad_stats_groups_parallel"),
    "qkernels.l1bn._rows_apply_block": (
        "qkernels.l1bn._rows_apply_parallel", "qkernels.l1bn._rows_apply_serial",
        "qkernels.l1bn._rows_forward_parallel", "qkernels.l1bn._rows_forward_serial"),
    "qkernels.l1bn._rows_grad_apply_block": (
        "qkernels.l1bn._rows_backward_parallel", "qkernels.l1bn._rows_backward_serial",
        "qkernels.l1bn._rows_grad_apply_parallel", "qkernels.l1bn._rows_grad_apply_serial"),
    "qkernels.l1bn._rows_grad_stats_block": (
        "qkernels.l1bn._rows_backward_parallel", "qkernels.l1bn._rows_backward_serial",
        "qkernels.l1bn._rows_grad_stats_parallel", "qkernels.l1bn._rows_grad_stats_serial"),
    "qkernels.l1bn._rows_stats_block": (
        "qkernels.l1bn._rows_forward_parallel", "qkernels.l1bn._rows_forward_serial",
        "qkernels.l1bn._rows_stats_parallel", "qkernels.l1bn._rows_stats_serial"),
    "qkernels.l1bn._sign_channel": (
        "qkernels.l1bn._sign_phase_parallel", "qkernels.l1bn._sign_phase_serial",
        "qkernels.l1bn._stats_channel"),
    "qkernels.l1bn._stats_channel": (
        "qkernels.l1bn._forward_parallel", "qkernels.l1bn._forward_serial",
        "qkernels.l1bn._stats_parallel", "qkernels.l1bn._stats_serial"),
    "qkernels.l1bn._stats_group": ("qkernels.l1bn._forward_groups_parallel",
                                   "qkernels.l1bn._stats_groups_parallel"),
    "qkernels.l1bn._tally": (
        "qkernels.l1bn._affine_pass", "qkernels.l1bn._affine_pass_c",
        "qkernels.l1bn._backward_affine", "qkernels.l1bn._finish_channel",
        "qkernels.l1bn._forward_affine", "qkernels.l1bn._grad_affine_pass",
        "qkernels.l1bn._grad_affine_pass_c", "qkernels.l1bn._grad_sums_pass",
        "qkernels.l1bn._inv_m", "qkernels.l1bn._sign_pass", "qkernels.l1bn._sum_pass",
        "qkernels.opcount._l2bn_backward", "qkernels.opcount._l2bn_forward"),
    "qkernels.optim._grad_shifts": ("qkernels.optim._sgd_p", "qkernels.optim._sgd_s"),
    "qkernels.optim._rescaled": ("qkernels.optim._rescale", "qkernels.optim._rescale_bits"),
    "qkernels.optim._update": ("qkernels.optim._sgd_inplace_p", "qkernels.optim._sgd_inplace_s",
                               "qkernels.optim._sgd_p", "qkernels.optim._sgd_s"),
    "qkernels.pool._magnitude": ("qkernels.pool._relu_backward_peak",),
    "qkernels.quant._nearest32_element": ("qkernels.quant._nearest32_chunk",),
    "qkernels.quant.chunk_span": (
        "qkernels.ieee._quantize_nearest_p", "qkernels.ieee._quantize_nearest_s",
        "qkernels.ieee._to_codes_exact_p", "qkernels.ieee._to_codes_exact_s",
        "qkernels.quant._nearest32_p", "qkernels.quant._nearest32_s"),
    "qkernels.quant.saturate_count": (
        "qkernels.ieee._quantize_stochastic_p", "qkernels.ieee._quantize_stochastic_s",
        "qkernels.quant._nearest_p", "qkernels.quant._nearest_s",
        "qkernels.quant._rows_nearest_p", "qkernels.quant._rows_nearest_s",
        "qkernels.quant._stochastic_p", "qkernels.quant._stochastic_s"),
    "qkernels.rng._nearest_element": ("qkernels.rng._nearest_parallel",
                                      "qkernels.rng._nearest_serial"),
    "qkernels.rng._stochastic_element": ("qkernels.rng._stochastic_parallel",
                                         "qkernels.rng._stochastic_serial"),
}


# --- enumeration and inspection (used here and by the subprocess) ------------------------------


def qkernels_modules() -> list[types.ModuleType]:
    """Every module of the qkernels package, imported."""
    return [importlib.import_module(f"qkernels.{m.name}")
            for m in pkgutil.iter_modules(qkernels.__path__)]


def _is_dispatcher(obj) -> bool:
    return issubclass(type(obj), Dispatcher)  # type(): safe on proxies, unlike isinstance


def enumerate_dispatchers(modules) -> dict[str, Dispatcher]:
    """Every Numba dispatcher bound in the modules' globals (or one level down in a tuple, list
    or dict there), by ``"module.name"``: the module whose code the dispatcher compiles and the
    name it is bound to there (one dispatcher imported elsewhere is counted once)."""
    seen: dict[int, tuple[str, Dispatcher]] = {}
    candidates = []
    for mod in modules:
        for name, obj in vars(mod).items():
            candidates.append((mod, name, obj))
            inner = (obj.items() if isinstance(obj, dict) else
                     enumerate(obj) if isinstance(obj, (tuple, list)) else ())
            candidates += [(mod, f"{name}[{key!r}]", o) for key, o in inner]
    # home modules first: a dispatcher is named where its Python function lives
    candidates.sort(key=lambda c: not (_is_dispatcher(c[2])
                                        and c[2].py_func.__module__ == c[0].__name__))
    for mod, name, obj in candidates:
        if _is_dispatcher(obj) and id(obj) not in seen:
            seen[id(obj)] = (f"{mod.__name__}.{name}", obj)
    return dict(sorted(seen.values(), key=lambda item: item[0]))


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def callers(target: Dispatcher, dispatchers: dict[str, Dispatcher]) -> tuple[str, ...]:
    """Names of the dispatchers whose Python function uses ``target`` through a global."""
    return tuple(sorted(
        name for name, d in dispatchers.items() if d is not target
        and any(d.py_func.__globals__.get(n) is target for n in _global_names(d.py_func.__code__))))


def inspect_signatures(dispatcher: Dispatcher) -> dict[str, dict]:
    """For every signature the dispatcher has compiled in this process: the float tokens of its
    LLVM IR (all functions of its library: linked callees and prange gufunc bodies included)
    and whether a prange gufunc body is among them. Raises for a signature loaded from Numba's
    cache (whose IR Numba does not keep)."""
    result = {}
    for sig in dispatcher.signatures:
        ir = dispatcher.inspect_llvm(sig)
        result[str(sig)] = {"floats": sorted(set(FLOAT_IR.findall(ir))),
                            "gufunc": "parfor_gufunc" in ir, "defines": ir.count("define ")}
    return result


def is_overload_impl(obj) -> bool:
    """A dispatcher Numba made for the implementation a ``numba.extending.overload`` function
    returns (``qkernels.l1bn._part_jit.<locals>.<lambda>``, say): bound in no module's globals,
    its typing function is a plain module-level function of its module."""
    outer, sep, _ = obj.py_func.__qualname__.partition(".<locals>.")
    home = sys.modules.get(obj.py_func.__module__ or "")
    fn = getattr(home, outer, None) if sep else None
    return callable(fn) and not _is_dispatcher(fn)


def report_entries(found: dict[str, Dispatcher]) -> dict[str, dict]:
    """Per dispatcher: whether it is an inline helper, and :func:`inspect_signatures`."""
    return {name: {"inline": d.targetoptions.get("inline") == "always",
                   "signatures": inspect_signatures(d)} for name, d in found.items()}


# --- the workload --------------------------------------------------------------------------------
#
# Default: the training and eval steps of qtrain's networks (int backend and emulate on CPU),
# L1BN's entry points on int8 and int16 codes (chosen and given exponents, serial and parallel),
# and direct calls that reach every other kernel at least once. Full (the slow test): also
# every code dtype the public functions accept, L1BN with activations and errors of different
# widths, and the slow references (qkernels.oracle).

_BIG = 1 << 17  # above every PARALLEL_MIN: the prange drivers run


def _qtrain_steps(g, full):
    """Two training steps and one eval forward of qtrain networks as the int backend and emulate
    on CPU run them: fused and unfused blocks, int8 and int16 kernels, stochastic errors,
    weight exponents from the mean, a float gradient, torch emulation."""
    import contextlib

    import torch

    from qtrain.loss import cross_entropy
    from qtrain.models import build
    from qtrain.optim import QSGD
    from qtrain.quant import QConfig, torch_emulation
    from qtrain.train import to_input

    images = to_input(g.integers(0, 256, (32, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(g.integers(0, 10, 32))
    configs = [("lenet5", "l1", dict(bits_w=8, bits_a=8, bits_g=8, bits_e=8)),
               ("lenet5", "l1", dict(bits_w=12, bits_a=12, bits_g=12, bits_e=12,
                                     stochastic_errors=True, weight_exp="mean")),
               ("lenet5", "none", dict(bits_w=6, bits_a=6, bits_g=6, bits_e=6)),
               ("mlp", "l1", dict(bits_w=8, bits_a=8, bits_g=32, bits_e=8, backend="emulate")),
               ("lenet5", "l1", dict(bits_w=6, bits_a=6, bits_g=6, bits_e=6, backend="emulate",
                                     stochastic_errors=True))]
    for i, (name, norm, kw) in enumerate(configs):
        cfg = QConfig(seed=3, **kw)
        torch.manual_seed(0)
        net = build(name, norm, cfg)
        opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=cfg)
        with torch_emulation() if i == len(configs) - 1 else contextlib.nullcontext():
            for _ in range(2):
                out = net(images)
                opt.zero_grad()
                cross_entropy(out, labels, cfg).backward()
                opt.step(batch_size=len(labels))
                net.qstate.step += 1
            net.eval()
            with torch.no_grad():
                net(images)


class _Alone:
    """The collective of a process that holds the whole batch."""

    def allreduce(self, a, op):
        pass


def _l1bn_calls(g, full):
    """L1BN forward, backward, running update, fold and inference on int8 and int16 codes,
    chosen and given exponents, serial and parallel; the op counters. Full: activations and
    errors of different widths, and the slow references."""
    from qkernels import QTensor, l1bn, l1bn_spec, opcount, oracle

    widths = [(np.int8, np.int8), (np.int16, np.int16)]  # (x, dy) code dtypes
    if full:
        widths += [(np.int8, np.int16), (np.int16, np.int8)]
    for xdt, gdt in widths:
        xbits, gbits = (8 if xdt == np.int8 else 12), (8 if gdt == np.int8 else 12)
        for shape in ((4, 3, 5, 5), (6, 5)) if full else ((4, 3, 5, 5),):
            c = shape[1]
            x = QTensor(g.integers(-100, 100, shape).astype(xdt), -4)
            gamma = QTensor(g.integers(2000, 6000, c).astype(np.int32), -12)
            beta = QTensor(g.integers(-50, 50, c).astype(np.int32), -12)
            for parallel in (False, True):
                for out_exp, eps in ((None, None), (-5, -8)):
                    y, cache = l1bn.l1bn_forward(x, gamma, beta, out_bits=xbits,
                                                 out_exp=out_exp, eps_log2=eps,
                                                 parallel=parallel)
                    dy = QTensor(g.integers(-100, 100, shape).astype(gdt), -7)
                    l1bn.l1bn_backward(dy, cache, dx_bits=gbits, dx_exp=out_exp,
                                       parallel=parallel)
                # a synchronized norm (here of one process): the phased statistics
                y, cache = l1bn.l1bn_forward(x, gamma, beta, out_bits=xbits, eps_log2=-8,
                                             parallel=parallel, collective=_Alone())
                l1bn.l1bn_backward(dy, cache, dx_bits=gbits, parallel=parallel)
                run_mean, run_dev = np.zeros(c, np.int64), np.full(c, 1 << 20, np.int64)
                l1bn.l1bn_update_running(run_mean, run_dev, cache, 6554)
                folded = l1bn.l1bn_fold(gamma, beta, run_mean, run_dev, x_exp=-4,
                                        out_bits=xbits, out_exp=-5, eps_log2=-8, x_bits=xbits)
                l1bn.l1bn_inference(x, folded, out_bits=xbits, out_exp=-5, parallel=parallel)
    # large (N, C, L) codes on the threads take the group drivers: forced here on small ones
    groups_min, l1bn.GROUPS_MIN = l1bn.GROUPS_MIN, 0
    try:
        for xdt, gdt in widths if full else widths[:1]:
            x = QTensor(g.integers(-100, 100, (4, 3, 5, 5)).astype(xdt), -4)
            dy = QTensor(g.integers(-100, 100, (4, 3, 5, 5)).astype(gdt), -7)
            gamma = QTensor(g.integers(2000, 6000, 3).astype(np.int32), -12)
            beta = QTensor(g.integers(-50, 50, 3).astype(np.int32), -12)
            for out_exp in (None, -5):
                y, cache = l1bn.l1bn_forward(x, gamma, beta, out_bits=8, out_exp=out_exp,
                                             eps_log2=-8)
                l1bn.l1bn_backward(dy, cache, dx_bits=8, dx_exp=out_exp)
    finally:
        l1bn.GROUPS_MIN = groups_min
    # 2-D int8 codes take their own kernels: serial below PARALLEL_MIN values, parallel above
    for shape in ((6, 5), (256, 256)):
        c = shape[1]
        x = QTensor(g.integers(-100, 100, shape).astype(np.int8), -4)
        gamma = QTensor(g.integers(2000, 6000, c).astype(np.int32), -12)
        beta = QTensor(g.integers(-50, 50, c).astype(np.int32), -12)
        dy = QTensor(g.integers(-100, 100, shape).astype(np.int8), -7)
        for out_exp in (None, -5):
            y, cache = l1bn.l1bn_forward(x, gamma, beta, out_bits=8, out_exp=out_exp)
            l1bn.l1bn_backward(dy, cache, dx_bits=8, dx_exp=out_exp)
    l1bn.count_ops((2, 3, 4, 4), eps_log2=-8)
    opcount.bn_report((2, 3, 4, 4), eps_log2=-8)
    for centred in (False, True):  # the spec's entry the oracle calls (kernels: _p's)
        l1bn_spec.backward_params(100, 64, 1, 4, 1 << 40, -60, 30, 500, -20, 20, 4096, 0,
                                  1 << 30, -36, centred)
    if full:  # the slow references call the per-channel spec functions from Python
        for dt in (np.int8, np.int16):
            x = g.integers(-100, 100, (4, 3, 2, 2)).astype(dt)
            gq, bq = np.full(3, 4096, np.int32), np.zeros(3, np.int32)
            for out_exp in (None, -5):
                _, _, stats = oracle.l1bn_forward_oracle(x, -4, gq, -12, bq, -12, 8, out_exp,
                                                         -8)
                oracle.l1bn_backward_oracle(x, x, stats, gq, -12, -4, -7, 8, out_exp, -20)
            oracle.l1bn_inference_oracle(x, -4, gq, -12, bq, -12, np.zeros(3, np.int64),
                                         np.full(3, 1 << 20, np.int64), 8, -5, -8)


def _container_calls(g, full):
    """Rounding, containers and the step kernels called directly, below and above every
    PARALLEL_MIN: in the default run what training does not reach, in the full run every code
    dtype the public functions accept."""
    from qkernels import QTensor, conv, ieee, loss, optim, pool, quant, rng

    codes = (np.int8, np.int16, np.int32) if full else (np.int8,)
    wide = (np.int8, np.int16, np.int32, np.int64) if full else (np.int64,)
    for n in (100, _BIG):
        xf = (g.integers(-100, 100, n) * 0.5).astype(np.float32)
        ieee.peak_exponent(xf)
        ieee.quantize_f32(xf, 8)
        ieee.quantize_f32(xf, 8, exp=-3)
        ieee.quantize_f32(xf, 8, stochastic=True, seed=1, step=2, tensor_id=3)
        ieee.quantize_f32_rows(xf.reshape(4, -1), 8)
        for dt in codes:
            width = 8 * np.dtype(dt).itemsize - 1
            ieee.quantize_f32_to_codes(xf, min(width + 1, 16), width, dt)
            ieee.f32_to_codes(xf, width, dt)
            ieee.f32_to_codes_where(xf, np.ones(n, dt), width, dt)
            ieee.codes_to_f32(QTensor(g.integers(-100, 100, n).astype(dt), -3))
            ieee.codes_to_f32(QTensor(g.integers(-100, 100, n).astype(dt), -3), relu=True)
        for dt in wide:
            c = QTensor(g.integers(-100, 100, n).astype(dt), -3)
            for bits in (8, 12):
                quant.quantize_nearest(c, bits)
                quant.quantize_stochastic(c, bits, seed=1, step=2, tensor_id=3)
                quant.quantize_rows(QTensor(c.q.reshape(4, -1), c.exp), bits)
        w = g.integers(-10**6, 10**6, n)
        for parallel in (False, True):
            for dt in (np.int32, np.int64) if full else (np.int64,):
                rng.round_shift_nearest(w.astype(dt), 4, 8, parallel=parallel)
                rng.stochastic_round_shift(w.astype(dt), 4, 12, seed=1, step=2, tensor_id=3,
                                           parallel=parallel)
        rng.random_top_bits(1, 2, 3, n, 24)
        # the limbs of 16-bit codes for the integer GEMM, and the join of their products
        conv.split_limbs(g.integers(-32767, 32768, n).astype(np.int16))
        for dt in (np.int32, np.int64) if full else (np.int32,):
            parts = [g.integers(-10**6, 10**6, n).astype(dt) for _ in range(4)]
            conv.join_limbs(*parts)
            conv.join_limbs(parts[0], parts[1])
        # SGD: integer and float32-container gradients, and steps that raise the exponent
        for scale in (1, 1 << 14):
            store = QTensor(g.integers(-100, 100, n).astype(np.int32), -10)
            velocity = np.zeros(n, np.int64)
            step = dict(lr_q=optim.lr_code(0.5), momentum_q=optim.momentum_code(0.9),
                        store_bits=8)
            for dt in codes if full else (np.int32,):
                grad = g.integers(-100, 100, n) * (scale if dt == np.int32 else 1)
                optim.sgd_step(store, velocity, QTensor(grad.astype(dt), -8), **step)
            gf = (g.integers(-100, 100, n) * 0.25 * scale).astype(np.float32)
            optim.sgd_step_f32(store, velocity, gf, np.empty(n, np.float32), **step)
            param = ieee.codes_to_f32(store)
            optim.sgd_step_f32_inplace(param, store.exp, velocity, gf, **step)
    if not full:
        return
    for dt in wide:
        loss.softmax_xent_error(QTensor(g.integers(-100, 100, (8, 10)).astype(dt), -3),
                                g.integers(0, 10, 8))
    x = QTensor(g.integers(-100, 100, (4, 3, 8, 8)).astype(np.int8), -4)
    e = QTensor(g.integers(-100, 100, (4, 5, 4, 4)).astype(np.int8), -6)
    conv.conv2d_weight_grad(x, e, (5, 5))
    conv.conv2d_weight_grad(x, e, (3, 3), stride=2, padding=1)
    for shape in ((2, 3, 4, 6), (128, 6, 24, 24)):
        xf = (g.integers(-5, 5, shape) * 0.25).astype(np.float32)
        y = pool.maxpool2x2(xf)
        pool.maxpool2x2_backward(xf, np.ones_like(y))
        for dt, width in ((np.int8, 7), (np.int16, 15)):
            pooled, sel = pool.maxpool2x2_relu_codes(g.integers(-9, 9, shape).astype(dt))
            pool.maxpool2x2_relu_backward_codes(sel, np.ones(pooled.shape, np.float32), width,
                                                dt)
            pool.maxpool2x2_relu_backward_of_codes(sel, QTensor(np.ones(pooled.shape, dt), -3),
                                                   width, dt)


WORKLOAD = (_qtrain_steps, _l1bn_calls, _container_calls)


def _compile_and_inspect(out_path: str, full: bool) -> None:
    """The subprocess: run the workload with an empty Numba cache, then inspect every
    dispatcher's every signature; also list the qkernels dispatchers alive in the process that
    the enumeration does not know (made at run time, say)."""
    import time

    g = np.random.default_rng(0)
    times = {}
    for part in WORKLOAD:
        start = time.perf_counter()
        part(g, full)
        times[part.__name__] = round(time.perf_counter() - start, 1)
    found = enumerate_dispatchers(qkernels_modules())
    known = {id(d) for d in found.values()}
    unbound = [o for o in gc.get_objects() if _is_dispatcher(o) and id(o) not in known
               and (o.py_func.__module__ or "").split(".")[0] == "qkernels"]
    stray = sorted(f"{o.py_func.__module__}.{o.py_func.__qualname__}" for o in unbound
                   if not is_overload_impl(o))
    # overload implementations (the dtype-specialising helpers of qkernels.l1bn): inlined into
    # their callers, and their own IR is checked too
    overloads = [{"name": f"{o.py_func.__module__}.{o.py_func.__qualname__}",
                  "signatures": inspect_signatures(o)} for o in unbound if is_overload_impl(o)]
    report = {"times": times, "stray": stray, "overloads": overloads,
              "dispatchers": report_entries(found)}
    with open(out_path, "w") as f:
        json.dump(report, f)


# --- the tests -----------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(numba.config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT is set")

DISPATCHERS = enumerate_dispatchers(qkernels_modules())


def run_check(tmp, mode: str) -> dict:
    """Run the workload (``"default"`` or ``"full"``) in a subprocess with an empty Numba cache
    and return its report."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp / "numba-cache")}
    env.pop("NUMBA_DISABLE_JIT", None)
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, __file__, str(out), mode], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    entries = report["dispatchers"].values()
    print(f"no-float check ({mode}): {len(entries)} dispatchers, "
          f"{sum(len(e['signatures']) for e in entries)} signatures; workload seconds "
          f"{report['times']}")
    return report


def problems(name: str, entry: dict, helpers=HELPERS, allowlist=ALLOWLIST,
             allowed_ir=ALLOWED_FLOAT_IR) -> list[str]:
    """What is wrong with one dispatcher's report entry (nothing, if the check passes)."""
    sigs = entry["signatures"]
    if name in helpers:
        return [] if entry["inline"] and not sigs else [
            f"{name} is listed as an inline helper but compiled on its own: {list(sigs)}"]
    if not sigs:
        return [f"{name} was never compiled by the workload: extend the workload (or list it "
                f"in HELPERS if it is an inline helper)"]
    found = []
    for sig, info in sigs.items():
        if not info["defines"]:
            found.append(f"{name}{sig}: no function in its IR")
        elif name in allowlist and not info["floats"]:
            found.append(f"{name}{sig} no longer uses floating point: remove it from ALLOWLIST")
        elif name in allowed_ir and set(info["floats"]) - allowed_ir[name]:
            found.append(f"{name}{sig} uses {sorted(set(info['floats']) - allowed_ir[name])} "
                         f"beyond the selection its exemption allows ({sorted(allowed_ir[name])})")
        elif name not in allowlist and info["floats"]:
            found.append(f"{name}{sig} uses floating point in its LLVM IR: {info['floats']}")
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The default workload's report: every dispatcher's signatures and their IR's floats."""
    return run_check(tmp_path_factory.mktemp("no_float"), "default")


def test_every_dispatcher_is_enumerated(compiled):
    """The same dispatchers here and in the subprocess, none alive there that the enumeration
    misses, and both builds of every serial_and_parallel pair."""
    assert sorted(compiled["dispatchers"]) == sorted(DISPATCHERS)
    assert not compiled["stray"], f"dispatchers outside module globals: {compiled['stray']}"
    by_code: dict[types.CodeType, list[str]] = {}
    for name, d in DISPATCHERS.items():
        by_code.setdefault(d.py_func.__code__, []).append(name)
    pairs = [names for names in by_code.values() if len(names) > 1]
    for names in pairs:
        assert sorted(bool(DISPATCHERS[n].targetoptions.get("parallel")) for n in names) == [
            False, True], names
    twins = [n for n, d in DISPATCHERS.items() if d.py_func.__name__ != d.py_func.__code__.co_name]
    assert len(pairs) == len(twins) > 0


def test_overload_implementations_have_no_floating_point(compiled):
    """The implementations Numba compiled for qkernels' ``@overload`` helpers (outside every
    module's globals, so not enumerated) use integers only too."""
    entries = compiled["overloads"]
    assert any(e["name"].startswith("qkernels.l1bn._part_jit.") for e in entries)
    found = [f"{e['name']}{sig}: {info['floats']}" for e in entries
             for sig, info in e["signatures"].items() if info["floats"] or not info["defines"]]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
def test_dispatcher_ir_has_no_floating_point(name, compiled):
    """Every signature of the dispatcher uses integers only in its LLVM IR (linked callees and
    prange bodies included); an allowlisted kernel does use float (or its entry is stale); a
    dispatcher without signatures is a listed inline helper."""
    assert not problems(name, compiled["dispatchers"][name])


def test_helpers_are_covered_by_their_callers(compiled):
    """The dispatchers without signatures are exactly the listed helpers, each inline, with
    exactly the callers named, each checked by signature (or itself a helper), and at least
    one of them not allowlisted."""
    signed = {n for n, e in compiled["dispatchers"].items() if e["signatures"]}
    assert set(HELPERS) == set(DISPATCHERS) - signed
    for name, named in HELPERS.items():
        assert DISPATCHERS[name].targetoptions.get("inline") == "always", name
        assert callers(DISPATCHERS[name], DISPATCHERS) == tuple(named), name
        assert set(named) <= signed | set(HELPERS), name
        assert set(named) & signed - set(ALLOWLIST), f"{name}: only allowlisted callers"


def test_allowlist_names_compiled_kernels():
    assert set(ALLOWLIST) <= set(DISPATCHERS) - set(HELPERS)


@pytest.mark.slow
def test_full_dtype_matrix_has_no_floating_point(tmp_path):
    """The same check on the full workload: every code dtype the public functions accept,
    L1BN with activations and errors of different widths, and the slow references."""
    report = run_check(tmp_path, "full")
    assert sorted(report["dispatchers"]) == sorted(DISPATCHERS) and not report["stray"]
    found = [p for name, entry in report["dispatchers"].items() for p in problems(name, entry)]
    assert not found, "\n".join(found)


def test_float_detector_catches_float():
    """Control: the check flags a kernel that does use floating point."""
    def mean_of(a):
        return a.sum() / a.size

    fn = numba.njit(mean_of)
    fn(np.arange(4, dtype=np.int64))
    (info,) = inspect_signatures(fn).values()
    assert info["floats"]


def test_prange_body_is_inspected(compiled):
    """Control: the IR of a parallel driver contains its prange gufunc body."""
    sigs = compiled["dispatchers"]["qkernels.l1bn._stats_parallel"]["signatures"]
    assert sigs and all(info["gufunc"] for info in sigs.values())


THROWAWAY = """
import numpy as np
from numba import njit, prange

from qkernels._jit import serial_and_parallel


@njit(cache=True, inline="always")
def _twice(v):
    return v + v


def _double(a, out):
    for i in prange(a.shape[0]):
        out[i] = _twice(a[i])


_double_s, _double_p = serial_and_parallel(_double)
KERNELS = {"halve": njit(lambda a: a / 2)}
"""


def test_enumeration_finds_and_flags_a_float_kernel(tmp_path):
    """Control: in a throwaway module, the enumeration finds every dispatcher (a
    serial_and_parallel pair, an inline helper, a float kernel kept in a dict), the helper's
    callers, and the check flags the float kernel only."""
    (tmp_path / "throwaway_kernels.py").write_text(THROWAWAY)
    spec = importlib.util.spec_from_file_location("throwaway_kernels",
                                                  tmp_path / "throwaway_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = enumerate_dispatchers([mod])
    assert list(found) == ["throwaway_kernels.KERNELS['halve']", "throwaway_kernels._double_p",
                           "throwaway_kernels._double_s", "throwaway_kernels._twice"]
    a = np.arange(4, dtype=np.int64)
    mod._double_s(a, np.empty_like(a))
    mod._double_p(a, np.empty_like(a))
    mod.KERNELS["halve"](a)
    assert callers(mod._twice, found) == ("throwaway_kernels._double_p",
                                          "throwaway_kernels._double_s")
    assert not mod._twice.signatures
    report = report_entries(found)
    (parallel,) = report["throwaway_kernels._double_p"]["signatures"].values()
    assert parallel["gufunc"]
    halve, twice = "throwaway_kernels.KERNELS['halve']", "throwaway_kernels._twice"
    helpers = {twice: callers(mod._twice, found)}
    verdict = {name: problems(name, entry, helpers, {}) for name, entry in report.items()}
    assert [name for name, p in verdict.items() if p] == [halve]
    assert "uses floating point" in verdict[halve][0]
    assert not problems(halve, report[halve], helpers, {halve: "a float kernel"})
    # an exemption for selecting only does not cover arithmetic
    assert problems(halve, report[halve], helpers, {halve: "selects"}, {halve: {"float", "fcmp"}})
    assert problems("throwaway_kernels._double_s", report["throwaway_kernels._double_s"],
                    helpers, {"throwaway_kernels._double_s": "stale"})
    assert problems(twice, report[twice], {}, {})  # an unlisted helper fails


def test_import_qkernels_does_not_import_torch():
    """qkernels runs on numpy + numba alone: importing it never loads torch."""
    code = ("import sys, qkernels, qkernels.oracle, qkernels.l1bn\n"
            "import qkernels.fixedpoint, qkernels.format\n"
            "import pkgutil\n"
            "for m in pkgutil.iter_modules(qkernels.__path__):\n"
            "    __import__('qkernels.' + m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    _compile_and_inspect(sys.argv[1], sys.argv[2] == "full")
