#!/usr/bin/env python
"""Benchmark qkernels' torch-free engine against qtrain's int backend on the same network and
batches: training step time, inference throughput and the memory a training step needs.

Usage (from the repository root)::

    python bench/bench_engine.py                 # readable table
    python bench/bench_engine.py --json          # one JSON object on stdout
    python bench/bench_engine.py --models lenet5-paper --rounds 5 --profile

Setup (in this process, with torch): per model, a quantized W8A8G8E8 L1BN network
(``qtrain.models.build(model, "l1", QConfig())``) trains ``--pretrain`` steps with ``QSGD``
(lr 0.1, momentum 0.9) on Fashion-MNIST batches (``qtrain.data.batches``, batch
``--batch-size``), is calibrated and frozen on 2,000 training images and exported to a qk file
(``qtrain.export``); its torch checkpoint is saved beside it.

Each measurement runs in a fresh child process, alternating ``int`` and ``engine`` (the
order flips every round, ``--rounds`` rounds):

* ``int``: loads the checkpoint into the int backend (qtrain's step: forward, integer loss,
  backward, ``QSGD.step``) and times ``--steps`` training steps after ``--warmup`` untimed
  ones, each on its own (``time.perf_counter``), then eval-mode frozen inference of
  ``--infer`` test images in batches of 500;
* ``engine``: the same with ``qkernels.trainer.Trainer`` and ``qkernels.engine.Network`` built
  from the qk file, in a process that never imports torch.

Both see the same batches in the same order. Reported per model and side: the median step
time with its spread over all timed steps of all rounds (min, quartiles, max), inference
images/s (median over rounds), and memory: ``step_peak_mb``, the resident set's high-water
mark during the timed steps above the resident size before them (``/proc/self/clear_refs``
resets the mark; measured on one extra step with glibc told to return every block of 64 KiB or
more to the system, so earlier steps' heap does not hide it), and ``process_peak_mb``, the process's whole high-water mark (torch's
libraries included on the int side). ``ratio_engine_over_int`` divides the medians; the
issue's aim is at most 3 for the step and a step peak no larger. On the engine side also
``step_arrays_peak_mb`` (the peak of the numpy arrays one step allocates, from tracemalloc)
and ``state_mb`` (weight stores and velocities). ``--profile`` adds the
engine's 15 functions with the most own time over the timed steps (cProfile).

The machine is shared: ``foreign_cpu_load`` is the mean number of cores other processes kept
busy during the children (from /proc/stat minus the children's own CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _step_peak_mb(step) -> float:
    """The resident set's growth during one ``step``, with glibc returning every block of 64 KiB
    or more to the system on free (so the high-water mark shows the step's own peak, not
    the heap a previous step left behind)."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    step()  # a step under these settings, so that only the measured one is counted
    gc.collect()
    libc.malloc_trim(0)
    before = _rss_mb()
    _reset_hwm()
    step()
    return _hwm_mb() - before


def _child(args) -> None:
    """One side's measurement; prints one JSON object."""
    import numpy as np

    data = np.load(args.batches)
    images, labels, test = data["images"], data["labels"], data["test"]
    n_steps = args.warmup + args.steps
    b = args.batch_size
    if args.child == "engine":
        from qkernels.trainer import Trainer

        trainer = Trainer.load(args.qk)
        net = trainer.frozen_network(images[:2000])

        def step(i):
            trainer.step(images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b])

        def infer(x):
            return net.forward(x)
    else:
        import torch

        from qtrain.loss import cross_entropy
        from qtrain.models import build
        from qtrain.optim import QSGD
        from qtrain.quant import QConfig
        from qtrain.train import to_input
        from qtrain.frozen import calibrate_and_freeze

        torch.set_num_threads(int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count())))
        qconfig = QConfig()
        model = build(args.model, "l1", qconfig)
        opt = QSGD(model.parameters(), lr=0.1, momentum=0.9, qconfig=qconfig)
        ckpt = torch.load(args.ckpt, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        model.qstate.step = ckpt["step"]
        calibrate_and_freeze(model, images[:2000, 0])

        def step(i):
            model.train()
            x = to_input(images[i * b:(i + 1) * b, 0])
            y = torch.from_numpy(labels[i * b:(i + 1) * b].astype(np.int64))
            loss = cross_entropy(model(x), y, qconfig)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(batch_size=b)
            model.qstate.step += 1

        def infer(x):
            model.eval()
            with torch.no_grad():
                return model(to_input(x[:, 0]))

    for i in range(args.warmup):
        step(i)
    import gc

    gc.collect()
    times = []
    prof = None
    if args.profile and args.child == "engine":
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    for i in range(args.warmup, n_steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    if prof is not None:
        prof.disable()
    step_peak = _step_peak_mb(lambda: step(n_steps - 1))
    extra = {}
    if args.child == "engine":  # the arrays a step allocates (numpy reports to tracemalloc)
        import tracemalloc

        tracemalloc.start()
        step(n_steps - 1)
        extra["step_arrays_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
        state = trainer.network_state()
        extra["state_mb"] = round(sum(
            a.nbytes for p_ in state["parameters"].values() for a in (p_["store"],
                                                                     p_["velocity"]))
            / 2**20, 2)
    infer(test[:500])  # warm
    t = time.perf_counter()
    for s in range(0, len(test), 500):
        infer(test[s:s + 500])
    infer_s = time.perf_counter() - t
    out = {"side": args.child, "step_s": times, "infer_images_per_s": len(test) / infer_s,
           "step_peak_mb": round(step_peak, 1), "process_peak_mb": round(_hwm_mb(), 1),
           "torch_loaded": "torch" in sys.modules, **extra}
    if prof is not None:
        import pstats

        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]
        out["profile"] = [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})",
                           "own_s_per_step": round(v[2] / args.steps, 4),
                           "calls_per_step": round(v[1] / args.steps, 1)} for k, v in rows]
    print(json.dumps(out))


def _cpu_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def _prepare(model_name: str, args, tmp: Path) -> dict:
    import numpy as np
    import torch

    from qtrain.data import batches, load_dataset
    from qtrain.export import network_description, training_state, write_qk
    from qtrain.frozen import calibrate_and_freeze
    from qtrain.loss import cross_entropy
    from qtrain.models import build
    from qtrain.optim import QSGD
    from qtrain.quant import QConfig
    from qtrain.train import to_input

    train, test = load_dataset("fashion-mnist", download_missing=False)
    n = args.pretrain + args.warmup + args.steps
    idx = np.concatenate([i for e in range(4) for i in batches(train.images, train.labels,
                                                               args.batch_size, 0, e)])
    idx = idx[:n * args.batch_size]
    torch.manual_seed(0)
    qconfig = QConfig()
    model = build(model_name, "l1", qconfig)
    opt = QSGD(model.parameters(), lr=0.1, momentum=0.9, qconfig=qconfig)
    b = args.batch_size
    for i in range(args.pretrain):
        sel = idx[i * b:(i + 1) * b]
        loss = cross_entropy(model(to_input(train.images[sel])),
                             torch.from_numpy(train.labels[sel].astype(np.int64)), qconfig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(batch_size=b)
        model.qstate.step += 1
    ckpt = tmp / f"{model_name}.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "step": model.qstate.step}, ckpt)
    calibrate_and_freeze(model, train.images[:2000])
    manifest, arrays = network_description(model, (1, 28, 28), list(train.classes))
    state, state_arrays = training_state(model, opt, model.qstate.step)
    manifest["training"] = state
    qk = tmp / f"{model_name}.qk"
    write_qk(qk, manifest, {**arrays, **state_arrays})
    rest = idx[args.pretrain * b:]
    batch_file = tmp / f"{model_name}-batches.npz"
    np.savez(batch_file, images=train.images[rest][:, None], labels=train.labels[rest],
             test=test.images[:args.infer][:, None])
    return {"qk": qk, "ckpt": ckpt, "batches": batch_file}


def _quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4)
    return {"min": min(xs), "q1": q[0], "median": statistics.median(xs), "q3": q[2],
            "max": max(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet5,lenet5-paper")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pretrain", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--infer", type=int, default=2000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=("int", "engine"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--qk", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    result = {"batch_size": args.batch_size, "steps_per_round": args.steps,
              "rounds": args.rounds, "threads": os.environ.get("NUMBA_NUM_THREADS",
                                                               str(os.cpu_count())),
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            print(f"bench_engine: preparing {model}", file=sys.stderr)
            files = _prepare(model, args, Path(tmp))
            runs = {"int": [], "engine": []}
            busy0, total0 = _cpu_busy()
            child_cpu = 0.0
            for r in range(args.rounds):
                for side in (("int", "engine") if r % 2 == 0 else ("engine", "int")):
                    cmd = [sys.executable, __file__, "--child", side, "--model", model,
                           "--qk", str(files["qk"]), "--ckpt", str(files["ckpt"]),
                           "--batches", str(files["batches"]), "--batch-size",
                           str(args.batch_size), "--warmup", str(args.warmup), "--steps",
                           str(args.steps)] + (["--profile"] if args.profile else [])
                    t0 = os.times()
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
                    t1 = os.times()
                    child_cpu += (t1.children_user - t0.children_user
                                  + t1.children_system - t0.children_system)
                    if out.returncode:
                        sys.exit(f"bench_engine: {side} child failed:\n{out.stderr}")
                    runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"  round {r + 1} {side}: median step "
                          f"{statistics.median(runs[side][-1]['step_s']) * 1e3:.1f} ms",
                          file=sys.stderr)
            busy1, total1 = _cpu_busy()
            ticks = os.sysconf("SC_CLK_TCK")
            ncpu = os.cpu_count()
            wall_ticks = (total1 - total0) / ncpu
            foreign = ((busy1 - busy0) / ticks - child_cpu) / (wall_ticks / ticks)
            entry = {}
            for side, rs in runs.items():
                steps = [t for r in rs for t in r["step_s"]]
                entry[side] = {"step_s": _quartiles(steps),
                               "infer_images_per_s": statistics.median(
                                   r["infer_images_per_s"] for r in rs),
                               "step_peak_mb": max(r["step_peak_mb"] for r in rs),
                               "process_peak_mb": max(r["process_peak_mb"] for r in rs),
                               "torch_loaded": any(r["torch_loaded"] for r in rs),
                               **{k: rs[-1][k] for k in ("step_arrays_peak_mb", "state_mb")
                                  if k in rs[-1]}}
                if "profile" in rs[-1]:
                    entry[side]["profile"] = rs[-1]["profile"]
            entry["ratio_engine_over_int"] = {
                "step": entry["engine"]["step_s"]["median"] / entry["int"]["step_s"]["median"],
                "inference_time": entry["int"]["infer_images_per_s"]
                / entry["engine"]["infer_images_per_s"],
                "step_peak_memory": entry["engine"]["step_peak_mb"]
                / max(entry["int"]["step_peak_mb"], 1e-9)}
            entry["foreign_cpu_load"] = round(foreign, 2)
            result["models"][model] = entry
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for model, e in result["models"].items():
        print(f"{model} (batch {args.batch_size}, foreign load {e['foreign_cpu_load']}):")
        for side in ("int", "engine"):
            s = e[side]
            print(f"  {side:7s} step {s['step_s']['median'] * 1e3:7.1f} ms "
                  f"[{s['step_s']['min'] * 1e3:.1f}..{s['step_s']['max'] * 1e3:.1f}]  "
                  f"inference {s['infer_images_per_s']:8.0f} img/s  step peak "
                  f"{s['step_peak_mb']:6.1f} MB  process peak {s['process_peak_mb']:6.1f} MB")
        r = e["ratio_engine_over_int"]
        print(f"  engine/int: step {r['step']:.2f}x, inference time {r['inference_time']:.2f}x, "
              f"step peak memory {r['step_peak_memory']:.2f}x")
        for row in e["engine"].get("profile", []):
            print(f"    {row['own_s_per_step'] * 1e3:7.2f} ms/step  {row['function']}")


if __name__ == "__main__":
    main()
