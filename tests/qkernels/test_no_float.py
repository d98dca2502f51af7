"""No floating point inside any kernel (int8 and 16-bit L1BN included), proven on the compiled
LLVM IR; qkernels never imports torch."""

import re
import subprocess
import sys

import numba
import numpy as np
import pytest

from qkernels import conv, ieee, l1bn, loss, optim, pool, quant

FLOAT_IR = re.compile(r"\b(half|bfloat|float|double|x86_fp80|fp128|ppc_fp128|fadd|fsub|fmul|"
                      r"fdiv|frem|fcmp|fneg|sitofp|uitofp|fptosi|fptoui|fpext|fptrunc)\b")


def fresh_ir(dispatcher, *args) -> str:
    """Compile the dispatcher's Python function anew (the on-disk cache hides IR) and return
    the LLVM IR of every function in its library, including prange gufunc bodies."""
    opts = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
    fn = numba.njit(**opts)(dispatcher.py_func)
    fn(*args)
    return "\n".join(fn.inspect_llvm().values())


def kernel_cases():
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, size=(4, 3, 25), dtype=np.int8)
    gq = np.full(3, 4096, np.int32)
    bq = np.zeros(3, np.int32)
    stats = np.zeros((3, l1bn.N_STATS), np.int64)
    cnt = np.zeros(0, np.int64)
    gstats = np.zeros((3, l1bn.N_GSTATS), np.int64)
    stats_args = (x, 3, True, stats, cnt)
    apply_args = (x, np.empty_like(x), gq, 0, bq, 0, 127, stats, cnt)
    grad_args = (x, x, np.empty_like(x), stats, gstats, gq, 0, 127, 16, np.zeros(3, np.int64),
                 np.zeros(3, np.int64), cnt)
    folded = np.array([[3, 5, 8]] * 3, np.int64)
    run = np.zeros(3, np.int64)
    # the 16-bit kernels (int16 x and dy; the other mixes differ only in load widths)
    x16 = rng.integers(-32768, 32768, size=(4, 3, 25)).astype(np.int16)
    stats_args16 = (x16, 3, True, stats, cnt)
    apply_args16 = (x16, np.empty_like(x16), gq, 0, bq, 0, 32767, stats, cnt)
    grad_args16 = (x16, x16, np.empty_like(x16), stats, gstats, gq, 0, 32767, 16,
                   np.zeros(3, np.int64), np.zeros(3, np.int64), cnt)
    forward_args16 = (x16, np.empty_like(x16), gq, 0, bq, 0, 3, True, 32767, stats, cnt)
    cases16 = {
        "_forward16_serial": forward_args16, "_forward16_parallel": forward_args16,
        "_backward16_serial": grad_args16, "_backward16_parallel": grad_args16,
        "_stats16_serial": stats_args16, "_stats16_parallel": stats_args16,
        "_apply16_serial": apply_args16, "_apply16_parallel": apply_args16,
        "_grad_stats16_serial": (x16, x16, gstats, cnt),
        "_grad_stats16_parallel": (x16, x16, gstats, cnt),
        "_grad_apply16_serial": grad_args16, "_grad_apply16_parallel": grad_args16,
        "grad_exponent16": (stats, gstats, 100, gq, -12, 16),
        "_affine16_serial": (x16, np.empty_like(x16), folded, 32767, cnt),
        "_affine16_parallel": (x16, np.empty_like(x16), folded, 32767, cnt),
        "inference_params16": (gq, 0, bq, 0, run, run + 100, -12, 3, True),
    }
    return {**cases16,
        "_forward_serial": (x, np.empty_like(x), gq, 0, bq, 0, 3, True, 127, stats, cnt),
        "_forward_parallel": (x, np.empty_like(x), gq, 0, bq, 0, 3, True, 127, stats, cnt),
        "_backward_serial": grad_args, "_backward_parallel": grad_args,
        "_stats_serial": stats_args, "_stats_parallel": stats_args,
        "_apply_serial": apply_args, "_apply_parallel": apply_args,
        "_grad_stats_serial": (x, x, gstats, cnt), "_grad_stats_parallel": (x, x, gstats, cnt),
        "_grad_apply_serial": grad_args, "_grad_apply_parallel": grad_args,
        "output_exponent": (stats, 100, gq, -12, bq, -12, 8),
        "grad_exponent": (stats, gstats, 100, gq, -12, 8),
        "_affine_serial": (x, np.empty_like(x), folded, 127, cnt),
        "_affine_parallel": (x, np.empty_like(x), folded, 127, cnt),
        "inference_params": (gq, 0, bq, 0, run, run + 100, -4, 3, True),
        "running_update": (run.copy(), run.copy(), stats, 100, -4, 6554),
    }


def step_kernel_cases():
    """Kernels of the training step (module, name, arguments)."""
    c = np.arange(-50, 50, dtype=np.int64)
    out8 = np.empty(100, np.int8)
    bits = np.arange(-50, 50, dtype=np.float32).view(np.int32)
    key = np.uint64(12345)
    return {
        "quant._nearest": (quant, (c, 3, 127, out8)),
        "quant._stochastic": (quant, (c, 20, 127, key, out8)),
        "ieee._peak_bits_p": (ieee, (bits,)),
        "ieee._quantize_nearest_p": (ieee, (bits, np.empty_like(bits), -3, 127, -1)),
        "ieee._quantize_stochastic_p": (ieee, (bits, np.empty_like(bits), -3, 127, key)),
        "ieee._to_codes_p": (ieee, (bits, np.empty(100, np.int32), -3)),
        "ieee._from_codes_p": (ieee, (out8, np.empty_like(bits), -3)),
        "ieee._from_codes_relu_p": (ieee, (out8, np.empty_like(bits), -3)),
        "ieee._quantize_nearest_p(codes)": (ieee, (bits, np.empty(100, np.int8), -3, 127, 0)),
        "ieee._peak_bits_where_p": (ieee, (bits, out8)),
        "ieee._to_codes_where_p": (ieee, (bits, out8, np.empty(100, np.int8), -3)),
        "pool._relu_forward_codes": (pool, (np.zeros((2, 4, 4), np.int8),
                                             np.empty((2, 2, 2), np.int8),
                                             np.empty((2, 2, 2), np.int8))),
        "pool._relu_backward_peak": (pool, (np.zeros((2, 2, 2), np.int8),
                                            np.zeros((2, 2, 2), np.int32))),
        "pool._relu_backward_codes": (pool, (np.zeros((2, 2, 2), np.int8),
                                             np.zeros((2, 2, 2), np.int32), -3,
                                             np.empty((2, 4, 4), np.int16))),
        "loss._xent_error": (loss, (np.zeros((4, 10), np.int16), 2, np.zeros(4, np.int64),
                                    loss.EXP2_TABLE, np.empty((4, 10), np.int64))),
        "conv._im2col": (conv, (np.zeros((2, 1, 6, 6), np.int8), 3, 3, 1, 0, 4, 4,
                                np.empty((9, 32), np.int8))),
        "conv._rows": (conv, (np.zeros((2, 3, 4, 4), np.int8), np.empty((3, 32), np.int8))),
        "conv._gram": (conv, (np.ones((3, 32), np.int8), np.ones((9, 32), np.int8),
                              np.empty((3, 9), np.int64))),
        "optim._sgd_s": (optim, (np.zeros(8, np.int32), np.zeros(8, np.int64),
                                 np.ones(8, np.int8), 3, 58982, 13107, (1 << 23) - 1,
                                 np.empty(8, np.int64), np.zeros(0, np.int32), -20,
                                 np.zeros(0, np.int32))),
        "optim._sgd_p(f32)": (optim, (np.zeros(8, np.int32), np.zeros(8, np.int64),
                                      np.zeros(0, np.int8), 0, 58982, 13107, (1 << 23) - 1,
                                      np.empty(8, np.int64), bits[:8].copy(), -20,
                                      np.empty(8, np.int32))),
        "optim._encode_all": (optim, (np.zeros(8, np.int32), -20, np.empty(8, np.int32))),
        "optim._rescale": (optim, (np.zeros(8, np.int32), np.zeros(8, np.int64),
                                   np.arange(8, dtype=np.int64), 2, (1 << 23) - 1)),
    }


@pytest.mark.parametrize("name", sorted(step_kernel_cases()))
def test_step_kernel_ir_has_no_floating_point(name):
    """Requantization, container decoding, the softmax error and SGD use integers only."""
    module, args = step_kernel_cases()[name]
    ir = fresh_ir(getattr(module, name.split(".")[1].split("(")[0]), *args)
    hits = sorted(set(FLOAT_IR.findall(ir)))
    assert not hits, f"{name} uses floating point in its LLVM IR: {hits}"


@pytest.mark.parametrize("name", sorted(kernel_cases()))
def test_kernel_ir_has_no_floating_point(name):
    """The compiled kernel (all its functions, inlined helpers included) uses integers only."""
    ir = fresh_ir(getattr(l1bn, name), *kernel_cases()[name])
    assert "define" in ir
    hits = sorted(set(FLOAT_IR.findall(ir)))
    assert not hits, f"{name} uses floating point in its LLVM IR: {hits}"


def test_float_detector_catches_float():
    """Control: the same check flags a kernel that does use floating point."""
    def mean_of(a):
        return a.sum() / a.size

    ir = fresh_ir(numba.njit(mean_of), np.arange(4, dtype=np.int64))
    assert FLOAT_IR.search(ir)


def test_prange_body_is_inspected():
    """Control: the IR of a parallel driver contains the prange gufunc body."""
    ir = fresh_ir(l1bn._stats_parallel, *kernel_cases()["_stats_parallel"])
    assert "parfor_gufunc" in ir


def test_import_qkernels_does_not_import_torch():
    """qkernels runs on numpy + numba alone: importing it never loads torch."""
    code = ("import sys, qkernels, qkernels.oracle, qkernels.l1bn\n"
            "import qkernels.fixedpoint, qkernels.format\n"
            "import pkgutil\n"
            "for m in pkgutil.iter_modules(qkernels.__path__):\n"
            "    __import__('qkernels.' + m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
