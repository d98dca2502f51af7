#!/usr/bin/env python
"""The three products of every conv and linear layer of both LeNets, int path against float32
torch, on CPU.

Usage (from the repository root)::

    python bench/bench_gemm.py            # readable table
    python bench/bench_gemm.py --json     # one JSON object on stdout, progress on stderr
    python bench/bench_gemm.py --models lenet5-paper --rounds 9

Layers: each ``nn.Conv2d`` and ``nn.Linear`` of ``qtrain.models.build(model)`` at batch
``--batch-size`` (default 128), with the input shape it sees in a forward pass. Per layer and
product, timed as a training step calls it:

* ``fwd``: int: conv :func:`qtrain.intgemm.conv2d_acc` (im2col of int8 codes, then
  ``torch._int_mm``: the int32 accumulators the fused conv block rounds), linear
  :func:`qtrain.intgemm.linear` (``_int_mm`` and the float32 container of its result);
  float: ``F.conv2d`` / ``F.linear`` on float32.
* ``input_grad`` (not for a network's first layer, whose input needs no gradient): int: the
  error codes laid out as a matrix (:func:`qtrain.intgemm.error_matrix`), then
  :func:`~qtrain.intgemm.conv2d_input_grad` (``_int_mm``, ``col2im``, float32 container) or
  :func:`~qtrain.intgemm.linear_input_grad`; float: ``torch.nn.grad.conv2d_input`` (aten's
  ``convolution_backward``, as autograd runs it) or ``g @ w``.
* ``weight_grad``: int: :func:`~qtrain.intgemm.conv2d_weight_grad` from the im2col columns the
  forward kept (a first layer lays out its errors itself, included), or
  :func:`~qtrain.intgemm.linear_weight_grad`; float: ``torch.nn.grad.conv2d_weight`` or
  ``g.T @ x``.

Data: int8 codes uniform in [0, 127] for inputs (images and post-ReLU activations) and in
[-127, 127] for weights and errors; float32 tensors of the same values for torch. Before timing,
every int result is checked against torch's float64 result on the same codes (exact integers).

Methodology (as ``bench_bn.py``): per product, the int and float sides each get a repeat count
so one measurement lasts ``--min-time`` seconds; ``--rounds`` rounds interleave them with the
order alternating; the reported time is the min over rounds of the per-call time (the median is
in ``*_median_s``). Torch runs with as many threads as Numba. ``ratio`` = int / float time
(below 1: the int path is faster); ``totals`` sums each network's layers and products.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench_bn import (CONTENTION_WARN, calibrate, cpu_snapshot, fmt_load,  # noqa: E402
                      foreign_load, keep_freed_memory, log, machine_info, time_calls)
from qtrain import intgemm  # noqa: E402
from qtrain.models import build  # noqa: E402

MODELS = ("lenet5", "lenet5-paper")
PRODUCTS = ("fwd", "input_grad", "weight_grad")
X_EXP, W_EXP, G_EXP = -7, -7, -10


def layer_shapes(model: str, batch: int) -> list[dict]:
    """Name, kind, input shape and geometry of every conv and linear layer of ``model``."""
    net = build(model, "l2", None)
    found: list[dict] = []

    def hook(mod, args, _out):
        entry = {"kind": "conv" if isinstance(mod, nn.Conv2d) else "linear",
                 "x_shape": tuple(args[0].shape), "w_shape": tuple(mod.weight.shape)}
        if isinstance(mod, nn.Conv2d):
            entry.update(stride=tuple(mod.stride), padding=tuple(mod.padding))
        found.append(entry)

    for mod in net.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.register_forward_hook(hook)
    net.eval()
    with torch.no_grad():
        net(torch.zeros(batch, 1, 28, 28))
    for i, entry in enumerate(found):
        entry["name"] = f"{model}/{entry['kind']}{i + 1}"
        entry["first"] = i == 0
    return found


class Layer:
    """One layer's operands, for both sides, and its products as callables."""

    def __init__(self, spec: dict, rng: np.random.Generator):
        self.spec = spec
        x_shape, w_shape = spec["x_shape"], spec["w_shape"]
        xq = rng.integers(0, 128, size=x_shape, dtype=np.int8)
        wq = rng.integers(-127, 128, size=w_shape, dtype=np.int8)
        self.x8 = intgemm.Codes(torch.from_numpy(xq), X_EXP)
        self.w8 = intgemm.Codes(torch.from_numpy(wq), W_EXP)
        self.xf = torch.from_numpy(xq.astype(np.float32))
        self.wf = torch.from_numpy(wq.astype(np.float32))
        if spec["kind"] == "conv":
            self.stride, self.padding = spec["stride"], spec["padding"]
            y_shape = F.conv2d(self.xf[:1], self.wf, stride=self.stride,
                               padding=self.padding).shape[1:]
            _, self.cols = intgemm.conv2d_acc(self.x8, self.w8, self.stride, self.padding)
        else:
            y_shape = (w_shape[0],)
        gq = rng.integers(-127, 128, size=(x_shape[0], *y_shape), dtype=np.int8)
        self.gq = gq
        self.gf = torch.from_numpy(gq.astype(np.float32))
        self.g8 = intgemm.Codes(torch.from_numpy(gq), G_EXP)

    # --- int path, as a training step calls it --------------------------------------------------

    def int_fwd(self):
        if self.spec["kind"] == "conv":
            return intgemm.conv2d_acc(self.x8, self.w8, self.stride, self.padding)[0]
        return intgemm.linear(self.x8, self.w8)

    def int_input_grad(self):
        if self.spec["kind"] == "conv":
            g = intgemm.error_matrix(self.gq, G_EXP, True)
            return intgemm.conv2d_input_grad(g, self.w8, self.spec["x_shape"], self.stride,
                                             self.padding)
        return intgemm.linear_input_grad(self.g8, self.w8)

    def int_weight_grad(self):
        if self.spec["kind"] == "conv":
            columns = not self.spec["first"]  # a first layer has no input gradient to share with
            g = intgemm.error_matrix(self.gq, G_EXP, columns)
            return intgemm.conv2d_weight_grad(g, columns, self.cols, X_EXP, self.spec["w_shape"])
        return intgemm.linear_weight_grad(self.g8, self.x8)

    # --- float32 torch ---------------------------------------------------------------------------

    def float_fwd(self):
        if self.spec["kind"] == "conv":
            return F.conv2d(self.xf, self.wf, stride=self.stride, padding=self.padding)
        return F.linear(self.xf, self.wf)

    def float_input_grad(self):
        if self.spec["kind"] == "conv":
            return torch.nn.grad.conv2d_input(self.xf.shape, self.wf, self.gf, self.stride,
                                              self.padding)
        return self.gf @ self.wf

    def float_weight_grad(self):
        if self.spec["kind"] == "conv":
            return torch.nn.grad.conv2d_weight(self.xf, self.wf.shape, self.gf, self.stride,
                                               self.padding)
        return self.gf.t() @ self.xf

    def check(self) -> None:
        """Every int product equals the float64 product of the same codes."""
        x, w, g = self.xf.double(), self.wf.double(), self.gf.double()
        if self.spec["kind"] == "conv":
            want = {"fwd": F.conv2d(x, w, stride=self.stride, padding=self.padding),
                    "input_grad": torch.nn.grad.conv2d_input(x.shape, w, g, self.stride,
                                                             self.padding),
                    "weight_grad": torch.nn.grad.conv2d_weight(x, w.shape, g, self.stride,
                                                               self.padding)}
            got = {"fwd": self.int_fwd().permute(1, 0, 2, 3)}  # (O, N, OH, OW) accumulators
        else:
            want = {"fwd": x @ w.t(), "input_grad": g @ w, "weight_grad": g.t() @ x}
            got = {"fwd": self.int_fwd() / 2.0 ** (X_EXP + W_EXP)}
        got["input_grad"] = self.int_input_grad() / 2.0 ** (G_EXP + W_EXP)
        wg = self.int_weight_grad()
        got["weight_grad"] = torch.from_numpy(np.asarray(wg.q)).reshape(w.shape)
        for name in PRODUCTS:
            if not torch.equal(got[name].double(), want[name]):
                raise AssertionError(f"{self.spec['name']}: int {name} differs from float64")


def products(layer: Layer) -> list[str]:
    return [p for p in PRODUCTS if not (p == "input_grad" and layer.spec["first"])]


def time_pair(int_fn, float_fn, rounds: int, min_time: float) -> dict:
    k_int, k_float = calibrate(int_fn, min_time), calibrate(float_fn, min_time)
    t_int, t_float = [], []
    for r in range(rounds):
        order = ((int_fn, k_int, t_int), (float_fn, k_float, t_float))
        for fn, k, out in (order if r % 2 == 0 else order[::-1]):
            out.append(time_calls(fn, k, 5 * min_time))
    return {"int_s": min(t_int), "float_s": min(t_float),
            "int_median_s": statistics.median(t_int),
            "float_median_s": statistics.median(t_float),
            "ratio": min(t_int) / min(t_float)}


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    layers_out, totals = {}, {}
    gc.disable()
    try:
        for model in args.models:
            total_int = total_float = 0.0
            for spec in layer_shapes(model, args.batch_size):
                layer = Layer(spec, rng)
                layer.check()
                before = cpu_snapshot()
                row = {"kind": spec["kind"], "x_shape": list(spec["x_shape"]),
                       "w_shape": list(spec["w_shape"])}
                for prod in products(layer):
                    res = time_pair(getattr(layer, f"int_{prod}"),
                                    getattr(layer, f"float_{prod}"), args.rounds, args.min_time)
                    row[prod] = res
                    total_int += res["int_s"]
                    total_float += res["float_s"]
                    log(f"{spec['name']:>24} {prod:>11}: int {res['int_s'] * 1e3:7.3f} ms, "
                        f"float {res['float_s'] * 1e3:7.3f} ms, ratio {res['ratio']:.2f}")
                row["foreign_cpu_load"] = foreign_load(before, cpu_snapshot())
                if (row["foreign_cpu_load"] or 0) > CONTENTION_WARN:
                    log(f"warning: {spec['name']} ran with foreign CPU load "
                        f"{fmt_load(row['foreign_cpu_load'])}")
                layers_out[spec["name"]] = row
            totals[model] = {"int_s": total_int, "float_s": total_float,
                             "ratio": total_int / total_float}
    finally:
        gc.enable()
    return {"benchmark": "bench_gemm", "batch_size": args.batch_size,
            "settings": {"rounds": args.rounds, "min_time_s": args.min_time, "seed": args.seed,
                         "malloc": args.malloc, "int_gemm": intgemm.enabled()},
            "machine": machine_info(), "layers": layers_out, "totals": totals}


def print_table(res: dict) -> None:
    print(f"{'layer':>22} {'product':>11} {'int ms':>9} {'float ms':>9} {'int/float':>9}")
    for name, row in res["layers"].items():
        for prod in PRODUCTS:
            if prod in row:
                r = row[prod]
                print(f"{name:>22} {prod:>11} {r['int_s'] * 1e3:9.3f} {r['float_s'] * 1e3:9.3f} "
                      f"{r['ratio']:9.2f}")
    for model, t in res["totals"].items():
        print(f"{model:>22} {'all':>11} {t['int_s'] * 1e3:9.3f} {t['float_s'] * 1e3:9.3f} "
              f"{t['ratio']:9.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        ap.error(f"--models: unknown {unknown or 'none given'}; choose from {', '.join(MODELS)}")
    if args.batch_size < 1 or args.rounds < 1 or not math.isfinite(args.min_time) \
            or args.min_time <= 0:
        ap.error("--batch-size and --rounds must be >= 1 and --min-time > 0")
    if not intgemm.enabled():
        print("bench_gemm: torch._int_mm is not exact or not available on this machine (or "
              "QTRAIN_INT_GEMM=0): nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(numba.get_num_threads())
    args.malloc = keep_freed_memory()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
