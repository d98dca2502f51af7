#!/usr/bin/env python
"""Where the time of one training step goes: cProfile's self time per function (Numba kernels
and torch's C functions appear under their own names), per step.

Usage (from the repository root)::

    python bench/profile_step.py --model lenet5-paper            # int backend, table
    QTRAIN_INT_GEMM=0 python bench/profile_step.py --model lenet5-paper   # the float-BLAS path
    python bench/profile_step.py --model lenet5 --backend float --json

A step is ``qtrain.train.train_epoch``'s loop body on random uint8 images of batch
``--batch-size`` (forward, integer or float loss, backward, optimizer step). ``--warmup`` steps
run first (JIT and allocator), then ``--steps`` steps are timed without the profiler
(``step_ms``, the median) and the same number again under cProfile (``functions``: self
milliseconds per step of the ``--top`` costliest functions; the profiler's own overhead makes
their sum exceed ``step_ms``). Freed memory stays in the heap, as in the ``qtrain`` program
(:func:`qtrain.memory.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from qtrain import intgemm, memory
from qtrain.loss import cross_entropy
from qtrain.models import MODELS, build
from qtrain.optim import QSGD
from qtrain.quant import QConfig
from qtrain.train import to_input


def make_step(model: str, backend: str, batch: int, seed: int, bits: int = 8):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch * 8, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, batch * 8)
    if backend == "float":
        net, qconfig = build(model, "l2", None), None
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    else:
        qconfig = QConfig(backend=backend, bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits)
        net = build(model, "l1", qconfig)
        opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=qconfig)
    state = {"i": 0}

    def step():
        idx = np.arange(state["i"] * batch, (state["i"] + 1) * batch) % len(labels)
        state["i"] += 1
        x = to_input(images[idx])
        y = torch.from_numpy(labels[idx].astype(np.int64))
        out = net(x)
        loss = F.cross_entropy(out, y) if qconfig is None else cross_entropy(out, y, qconfig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if qconfig is None:
            opt.step()
        else:
            opt.step(batch_size=batch)
            net.qstate.step += 1
        float(loss.detach())

    return step


def profile(args) -> dict:
    step = make_step(args.model, args.backend, args.batch_size, args.seed, args.bits)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, nc, func) for func, (_, nc, tt, _, _) in stats.items()), reverse=True)
    functions = [{"function": f"{name} ({file.rsplit('/', 1)[-1]}:{line})" if line else name,
                  "ms_per_step": 1e3 * tt / args.steps, "calls_per_step": nc / args.steps}
                 for tt, nc, (file, line, name) in rows[:args.top]]
    return {"model": args.model, "backend": args.backend, "batch_size": args.batch_size,
            "int_gemm": intgemm.enabled() and args.backend != "float",
            "step_ms": 1e3 * statistics.median(times), "steps": args.steps,
            "functions": functions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", choices=MODELS, default="lenet5-paper")
    ap.add_argument("--backend", choices=("int", "emulate", "float"), default="int")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, default=8, help="W, A, G and E width (int/emulate)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if min(args.batch_size, args.steps, args.top) < 1 or args.warmup < 0:
        ap.error("--batch-size, --steps and --top must be >= 1, --warmup >= 0")
    memory.keep_freed_memory()  # as the qtrain program and the other benchmarks
    res = profile(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    gemm = "" if res["backend"] == "float" else \
        f" (int GEMM {'on' if res['int_gemm'] else 'off'})"
    print(f"{res['model']} {res['backend']}{gemm}: "
          f"{res['step_ms']:.1f} ms/step (median of {res['steps']}); self time per step under "
          f"cProfile:")
    for row in res["functions"]:
        print(f"  {row['ms_per_step']:7.2f} ms  {row['calls_per_step']:6.1f} calls  "
              f"{row['function']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
