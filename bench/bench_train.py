#!/usr/bin/env python
"""Benchmark training time per epoch of both LeNets on Fashion-MNIST (CPU): qtrain int, emulate,
float torch and Brevitas W8A8 quantization-aware training.

Usage (from the repository root)::

    python bench/bench_train.py            # readable table
    python bench/bench_train.py --json     # exactly one JSON object on stdout
    python bench/bench_train.py --full-epoch --json    # time one real full epoch per method
    python bench/bench_train.py --methods int,emulate,float    # without Brevitas
    python bench/bench_train.py --models lenet5-paper          # one network
    python bench/bench_train.py --device cuda --methods emulate,float   # on a GPU

Progress and info go to stderr; with ``--json`` stdout carries only the JSON object. Brevitas
is an optional dependency (``pip install -e .[bench]``); without it the ``brevitas`` method
stops the script with a one-line error (leave it out with ``--methods``).

Networks (``--models``, each timed in turn in one run): ``lenet5`` (conv5x5 6, max-pool 2,
conv5x5 16, max-pool 2, fc 120, fc 84, fc 10) and ``lenet5-paper`` (the paper's: conv5x5 32,
max-pool 2, conv5x5 64, max-pool 2, fc 512, fc 10), for 28x28 inputs, with batch norm after
every conv and hidden fc; conv and hidden fc without bias. Methods, for each network:

* ``int``: ``qtrain.models.build(model, "l1", QConfig(backend="int"))``, i.e. W8A8G8E8 with int8
  L1 batch norm through the qkernels Numba kernels, qtrain's integer base-2 softmax
  cross-entropy and ``QSGD`` (integer SGD with momentum on the 24-bit weight store).
* ``emulate``: the same network, bits and optimizer with ``QConfig(backend="emulate")`` (the
  same integer arithmetic as torch operations).
* ``float``: ``qtrain.models.build(model, "l2", None)``: torch float32 with ``nn.BatchNorm2d/1d``,
  ``F.cross_entropy`` and ``torch.optim.SGD`` (same semantics as ``QSGD`` in float mode).
* ``brevitas``: W8A8 quantization-aware training in Brevitas: the same topology from
  ``brevitas.nn.QuantIdentity`` (input), ``QuantConv2d`` / ``QuantLinear`` with
  ``weight_quant=Int8WeightPerTensorFixedPoint`` and ``QuantReLU`` with
  ``act_quant=Int8ActPerTensorFixedPoint`` (8-bit, power-of-two scales, fake-quantized float
  with straight-through estimators, ``return_quant_tensor=False``), ``nn.BatchNorm2d/1d``
  between conv/fc and ReLU, float logits and bias of the last layer, ``F.cross_entropy`` and
  ``torch.optim.SGD``. Gradients and errors are float32, as in any QAT framework.

All methods use learning rate ``--lr`` (0.1) and momentum ``--momentum`` (0.9), the same seed
for their initialization (``torch.manual_seed(--seed)`` before each build), and the same
input: ``qtrain.train.to_input`` (pixel codes ``clip(p - 128, -127, 127) * 2**-7``, float32).

What is timed: one training step, exactly the body of ``qtrain.train.train_epoch``'s loop:
build the input batch from the uint8 images, forward, loss, ``zero_grad(set_to_none=True)``,
backward, optimizer step (``QSGD.step(batch_size=N)`` and the qstate step counter for int and
emulate), and the loss value and correct-count bookkeeping (``float(loss)``,
``(out.argmax(1) == y).sum()``). Batches come from ``qtrain.data.batches(images, labels,
--batch-size, --seed, epoch)`` for epochs 0, 1, ... in turn; step ``i`` of every method sees the
same batch ``i`` of that stream.

Methodology (the machine is assumed noisy), default mode:

1. Warm-up: every method runs ``--warmup`` steps (default 10) untimed, in order (Numba JIT or
   cache load, torch kernel selection, optimizer state, allocator warm-up).
2. Rounds: ``--rounds`` rounds (default 8) of ``--steps`` consecutive steps per method (default
   25) each. The method order rotates by one position per round (round r starts with method r
   mod 4), so with 8 rounds every method runs twice in every position, and a slow phase of the
   machine hits all methods instead of one. Each step is timed on its own with
   ``time.perf_counter``. ``gc.collect()`` runs before each method's block of steps (so a
   collection of one method's garbage does not land on the next); the garbage collector
   stays enabled during the steps, as in a training run.
3. Statistic: ``step_ms`` is the MEDIAN over all ``rounds * steps`` timed steps of a method
   (robust to the stalled steps of a noisy 2-core machine and to the rare slow step of a
   collector pass); ``step_ms_min``, ``step_ms_mean`` and the per-round medians
   (``step_ms_rounds``) are reported for reference. ``epoch_s`` = median step time x
   ``steps_per_epoch`` = ceil(N / batch size) (the epoch's last, shorter batch is counted as a
   full one; that overstates by < 1 step).

``--full-epoch`` mode: after the same warm-up, every method trains one real full epoch (the
stream's epoch 1, the same batches for all methods) in turn, and ``epoch_s`` is its wall time
(``step_ms`` = epoch_s / steps_per_epoch; min/mean/rounds are then omitted).

Sanity check: every method must actually train. ``loss.initial`` is the mean training loss of
the first ``w`` steps a method ran (warm-up included) and ``loss.final`` that of its last ``w``
steps, ``w = min(10, steps / 4)``; ``final_loss`` repeats the latter. The script warns on
stderr if a loss did not decrease (``loss.decreased`` false). The quantized methods' loss is
qtrain's base-2 cross-entropy in bits, the others' is in nats (divide by ln 2 to compare).

Derived, per network under ``models``: ``ratio_to_float`` = epoch_s[method] /
epoch_s["float"]; ``targets`` (:data:`TARGETS`): int <= 1.0 on ``lenet5`` and <= 0.6 on
``lenet5-paper``, emulate <= 1.3 on both; ``meets_targets`` holds one boolean per target (null
when a method was not run) and ``all``; the top level repeats ``ratio_to_float`` per network and
``meets_targets.all`` over both.

Allocator: glibc's mmap/trim thresholds are raised at start for all methods alike
(``bench_bn.keep_freed_memory``; ``--default-malloc`` turns this off). Threads: torch uses as
many threads as Numba (``NUMBA_NUM_THREADS`` sets both). Contention: ``foreign_cpu_load`` (per
method over its timed blocks, and for the whole run) is the CPU time other processes used
while timing, in cores, from /proc/stat (see bench_bn.py); when a method's timed blocks saw
more than 0.2 (``foreign_cpu_load_timed``, the largest) the script warns.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_bn import (CONTENTION_WARN, cpu_snapshot, fmt_load, foreign_load,  # noqa: E402
                      keep_freed_memory, machine_info)
from qtrain.data import DataError, batches, load_mnist_like, stratified_subset  # noqa: E402
from qtrain.loss import cross_entropy  # noqa: E402
from qtrain.models import build  # noqa: E402
from qtrain.optim import QSGD  # noqa: E402
from qtrain.peers import MissingBrevitas, brevitas_model, import_brevitas  # noqa: E402,F401
from qtrain.quant import QConfig  # noqa: E402
from qtrain.train import to_input  # noqa: E402

METHODS = ("int", "emulate", "float", "brevitas")
#: The networks timed: qtrain's small LeNet-5 and the paper's (conv 32-64, fc 512).
MODELS = ("lenet5", "lenet5-paper")
#: Per model, the largest ratio_to_float each method may reach.
TARGETS = {"lenet5": {"int": 1.0, "emulate": 1.3}, "lenet5-paper": {"int": 0.6, "emulate": 1.3}}
SEED = 0
LOSS_WINDOW = 10

DEFINITIONS = {
    "models": "lenet5: conv5x5 6-pool-conv5x5 16-pool-fc 120-fc 84-fc 10; lenet5-paper: "
              "conv5x5 32-pool-conv5x5 64-pool-fc 512-fc 10; BN after every conv and hidden fc",
    "int": "qtrain build(model, 'l1', QConfig(8, 8, 8, 8, backend='int')): W8A8G8E8, int8 "
           "GEMMs (torch._int_mm) for conv and linear, int8 L1BN (qkernels), max-pool on codes, "
           "integer base-2 softmax cross-entropy, QSGD integer SGD with momentum",
    "emulate": "the same network, bits and optimizer with backend='emulate' (the integer "
               "arithmetic as torch operations; on CPU it shares the int backend's kernels and "
               "GEMMs)",
    "float": "qtrain build(model, 'l2', None): plain torch float32, nn.MaxPool2d, "
             "nn.BatchNorm2d/1d, F.cross_entropy, torch.optim.SGD",
    "brevitas": "Brevitas W8A8 QAT of the same topology: QuantIdentity input, QuantConv2d/"
                "QuantLinear (Int8WeightPerTensorFixedPoint), nn.BatchNorm2d/1d, QuantReLU "
                "(Int8ActPerTensorFixedPoint, return_quant_tensor=False), float last-layer "
                "bias and logits, F.cross_entropy, torch.optim.SGD",
    "step": "one iteration of qtrain.train.train_epoch's loop: input batch from uint8 images "
            "(to_input), forward, loss, zero_grad, backward, optimizer step, float(loss) and "
            "correct count",
    "step_ms": "median over all timed steps (rounds x steps) of one method's step time, ms; in "
               "--full-epoch mode epoch_s / steps_per_epoch",
    "epoch_s": "step_ms / 1000 x steps_per_epoch (steps mode) or the wall time of one full "
               "epoch (--full-epoch mode)",
    "steps_per_epoch": "ceil(images / batch_size)",
    "ratio_to_float": "epoch_s[method] / epoch_s['float']",
    "targets": "maximum ratio_to_float per method",
    "loss": "mean training loss of a method's first (initial) and last (final) w steps, "
            "w = min(10, steps / 4); int/emulate in bits (base-2 cross-entropy), float/"
            "brevitas in nats",
    "foreign_cpu_load": "(machine busy CPU seconds from /proc/stat, steal included, minus this "
                        "process's CPU seconds) / wall seconds, in cores, over the whole run "
                        "(warm-up and JIT included); foreign_cpu_load_by_method: over a "
                        "method's timed blocks; foreign_cpu_load_timed: the largest of those, "
                        "> ~0.2 means the numbers were taken under contention",
}


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


class Method:
    """One model and optimizer; ``step(idx)`` is one training step on batch ``idx``."""

    def __init__(self, name: str, model: str, images: np.ndarray, labels: np.ndarray, lr: float,
                 momentum: float, seed: int, device: str = "cpu"):
        self.name = name
        self.images, self.labels = images, labels
        self.device = device
        torch.manual_seed(seed)
        if name in ("int", "emulate"):
            self.model = build(model, "l1", QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=8,
                                                    backend=name))
            self.opt = QSGD(self.model.parameters(), lr=lr, momentum=momentum,
                            qconfig=self.model.qconfig)
        elif name == "float":
            self.model = build(model, "l2", None)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        elif name == "brevitas":
            self.model = brevitas_model(model)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        else:
            raise ValueError(f"unknown method {name!r}")
        self.qnet = name in ("int", "emulate")
        self.model.to(device).train()
        self.losses: list[float] = []
        self.correct = self.seen = 0

    def step(self, idx: np.ndarray) -> None:
        # the body of qtrain.train.train_epoch's loop
        x = to_input(self.images[idx], self.device)
        y = torch.from_numpy(self.labels[idx].astype(np.int64)).to(self.device)
        out = self.model(x)
        if self.qnet:
            loss = cross_entropy(out, y, self.model.qconfig)
        else:
            loss = F.cross_entropy(out, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.qnet:
            self.opt.step(batch_size=len(idx))
            self.model.qstate.step += 1
        else:
            self.opt.step()
        self.losses.append(float(loss.detach()))
        self.correct += int((out.argmax(1) == y).sum())
        self.seen += len(idx)


class BatchStream:
    """Index batches of epochs 0, 1, ... from qtrain.data.batches, shared by all methods."""

    def __init__(self, images, labels, batch_size: int, seed: int):
        self.args = (images, labels, batch_size, seed)
        self.per_epoch = math.ceil(len(labels) / batch_size)
        self._epochs: dict[int, list[np.ndarray]] = {}

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._epochs:
            images, labels, bs, seed = self.args
            self._epochs[e] = list(batches(images, labels, bs, seed, e))
        return self._epochs[e]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.epoch(i // self.per_epoch)[i % self.per_epoch]


class Timer:
    """Accumulates a method's timed wall seconds and other processes' CPU seconds."""

    def __init__(self):
        self.wall = self.foreign = 0.0
        self._snap = None

    def __enter__(self):
        gc.collect()
        self._snap = cpu_snapshot()
        return self

    def __exit__(self, *exc):
        after = cpu_snapshot()
        load = foreign_load(self._snap, after)
        if load is not None:
            dt = after[0] - self._snap[0]
            self.wall += dt
            self.foreign += load * dt

    @property
    def load(self) -> float | None:
        return self.foreign / self.wall if self.wall > 0 else None


def run_steps(methods: dict[str, Method], stream: BatchStream, pos: int, rounds: int,
              steps: int, progress) -> tuple[dict, dict]:
    names = list(methods)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    timers = {n: Timer() for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            progress(f"round {r + 1}/{rounds}: {n}")
            m, block = methods[n], []
            with timers[n]:
                for s in range(steps):
                    idx = stream[pos + r * steps + s]
                    t0 = time.perf_counter()
                    m.step(idx)
                    block.append(time.perf_counter() - t0)
            times[n].append(block)
    out = {}
    for n in names:
        flat = [t for block in times[n] for t in block]
        out[n] = {"step_ms": 1e3 * statistics.median(flat),
                  "step_ms_min": 1e3 * min(flat),
                  "step_ms_mean": 1e3 * statistics.mean(flat),
                  "step_ms_rounds": [1e3 * statistics.median(b) for b in times[n]],
                  "steps_timed": len(flat)}
    return out, {n: timers[n].load for n in names}


def run_full_epoch(methods: dict[str, Method], stream: BatchStream, epoch: int,
                   progress) -> tuple[dict, dict]:
    out, loads = {}, {}
    batches_ = stream.epoch(epoch)
    for n, m in methods.items():
        progress(f"full epoch: {n}")
        timer = Timer()
        with timer:
            t0 = time.perf_counter()
            for idx in batches_:
                m.step(idx)
            seconds = time.perf_counter() - t0
        out[n] = {"epoch_s": seconds, "step_ms": 1e3 * seconds / len(batches_),
                  "steps_timed": len(batches_)}
        loads[n] = timer.load
    return out, loads


def loss_summary(m: Method) -> dict:
    w = max(1, min(LOSS_WINDOW, len(m.losses) // 4))
    initial = statistics.mean(m.losses[:w])
    final = statistics.mean(m.losses[-w:])
    return {"initial": initial, "final": final, "window": w, "steps": len(m.losses),
            "unit": "bits" if m.qnet else "nats",
            "decreased": bool(final < initial and math.isfinite(final)),
            "train_error": 1 - m.correct / m.seen if m.seen else None}


def parse_names(flag: str, choices: tuple[str, ...]):
    """An argparse type: a comma-separated list of distinct names from ``choices``."""

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"{flag} takes distinct names from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def print_table(res: dict) -> None:
    d = res["data"]
    print(f"{d['name']} {d['split']}: {d['images']} images, batch {d['batch_size']}, "
          f"{d['steps_per_epoch']} steps/epoch ({d['source']})")
    for model, r in res["models"].items():
        hdr = (f"{model:>12} {'step ms':>9} {'epoch s':>9} {'x float':>8} {'loss':>16} "
               f"{'load':>6}")
        print()
        print(hdr)
        print("-" * len(hdr))
        for n in r["epoch_s"]:
            ratio = r["ratio_to_float"].get(n)
            lo = r["loss"][n]
            load = r["foreign_cpu_load_by_method"][n]
            print(f"{n:>12} {r['step_ms'][n]:>9.2f} {r['epoch_s'][n]:>9.2f} "
                  f"{'' if ratio is None else f'{ratio:.2f}':>8} "
                  f"{lo['initial']:>6.3f} -> {lo['final']:<6.3f} "
                  f"{'' if load is None else f'{load:.2f}':>6}")
        print("-" * len(hdr))
        for n, t in r["targets"].items():
            met = r["meets_targets"][n]
            state = "n/a" if met is None else ("met" if met else "NOT met")
            print(f"target {model} {n}: ratio_to_float <= {t}: {state}")
    m = res["machine"]
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, numba {m['numba_version']} "
          f"({m['numba_threads']} threads), torch {m['torch_version']} "
          f"({m['torch_threads']} threads), brevitas {m.get('brevitas_version')}")
    print(f"mode: {res['settings']['mode']}; loss: bits for int/emulate, nats otherwise; "
          f"load = other processes' CPU use in cores")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    ap.add_argument("--full-epoch", action="store_true",
                    help="time one real full epoch per method instead of sampled steps")
    ap.add_argument("--models", type=parse_names("--models", MODELS), default=list(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)} (default: both)")
    ap.add_argument("--methods", type=parse_names("--methods", METHODS), default=list(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per method (10)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--steps", type=int, default=25,
                    help="timed steps per method per round (default 25)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--per-class", type=int, default=None,
                    help="train on a stratified subset of this many images per class "
                         "(default: the whole train split)")
    ap.add_argument("--data-dir", default=None, help="directory holding the IDX files")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the emulate, float and brevitas methods (cpu; cuda)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator as it is")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.rounds < 1 or args.steps < 1 or args.batch_size < 1:
        ap.error("--warmup must be >= 0, --rounds, --steps and --batch-size >= 1")
    if args.device != "cpu" and "int" in args.methods:
        ap.error(f"the int method runs on the CPU, not {args.device}: leave it out with "
                 "--methods emulate,float")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device here")

    try:
        # anything a library prints goes to stderr: stdout carries only the result
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args)
    except (MissingBrevitas, DataError) as err:
        hint = (" (or leave it out with --methods int,emulate,float)"
                if isinstance(err, MissingBrevitas) else "")
        print(f"bench_train: {err}{hint}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def run(args) -> dict:
    brevitas_version = None
    if "brevitas" in args.methods:
        brevitas_version = import_brevitas()[0].__version__
    malloc = "default" if args.default_malloc else keep_freed_memory()
    t_start = time.perf_counter()
    snap_start = cpu_snapshot()
    torch.set_num_threads(numba.get_num_threads())

    ds = load_mnist_like("fashion-mnist", "train", args.data_dir)
    if args.per_class is not None:
        ds = stratified_subset(ds, args.per_class, args.seed)
    stream = BatchStream(ds.images, ds.labels, args.batch_size, args.seed)
    log(f"[bench_train] {ds.name} {ds.split}: {len(ds)} images from {ds.source}; "
        f"{stream.per_epoch} steps/epoch; {numba.get_num_threads()} numba / "
        f"{torch.get_num_threads()} torch threads")

    tty = sys.stderr.isatty()

    def progress(msg):
        if tty:
            log(f"\r[bench_train] {msg:<40}", end="")

    per_model = {model: time_model(model, args, ds, stream, progress) for model in args.models}
    if tty:
        log("\r" + " " * 56 + "\r", end="")
    timed_load = max((r["foreign_cpu_load_timed"] for r in per_model.values()
                      if r["foreign_cpu_load_timed"] is not None), default=None)
    machine = machine_info()
    machine["brevitas_version"] = brevitas_version
    if args.device.startswith("cuda"):
        machine["cuda_device"] = torch.cuda.get_device_name(args.device)
        machine["torch_cuda"] = torch.version.cuda
    result = {
        "models": per_model,
        "ratio_to_float": {model: r["ratio_to_float"] for model, r in per_model.items()},
        "meets_targets": {"all": all(r["meets_targets"]["all"] for r in per_model.values())},
        "data": {"name": ds.name, "split": ds.split, "source": ds.source, "images": len(ds),
                 "batch_size": args.batch_size, "steps_per_epoch": stream.per_epoch},
        "foreign_cpu_load_timed": timed_load,
        "machine": machine,
        "settings": {"mode": "full_epoch" if args.full_epoch else "steps",
                     "device": args.device,
                     "models": list(args.models),
                     "methods": list(args.methods), "warmup_steps": args.warmup,
                     "rounds": None if args.full_epoch else args.rounds,
                     "steps_per_round": None if args.full_epoch else args.steps,
                     "lr": args.lr, "momentum": args.momentum, "seed": args.seed,
                     "per_class": args.per_class,
                     "time_statistic": "wall time of one epoch" if args.full_epoch else
                     "median step time x steps_per_epoch",
                     "order": "sequential" if args.full_epoch else
                     "rotating by one method per round",
                     "gc": "enabled; gc.collect() before each method's timed block",
                     "malloc": malloc},
        "definitions": DEFINITIONS,
        "foreign_cpu_load": foreign_load(snap_start, cpu_snapshot()),
        "elapsed_s": time.perf_counter() - t_start,
    }
    if (timed_load or 0) > CONTENTION_WARN:
        log(f"[bench_train] WARNING: other processes kept up to {timed_load:.2f} cores busy "
            f"while a method was timed; the timings are contended, rerun on a quiet machine")
    log(f"[bench_train] done in {result['elapsed_s']:.1f} s")
    return result


def time_model(model: str, args, ds, stream: BatchStream, progress) -> dict:
    """Warm up and time every method on one network; its epoch times, ratios and losses."""
    methods = {n: Method(n, model, ds.images, ds.labels, args.lr, args.momentum, args.seed,
                         args.device) for n in args.methods}
    tty = sys.stderr.isatty()
    for n, m in methods.items():
        progress(f"{model} warm-up: {n}")
        t0 = time.perf_counter()
        for i in range(args.warmup):
            m.step(stream[i])
        if not tty:
            log(f"[bench_train] {model} warm-up {n}: {args.warmup} steps in "
                f"{time.perf_counter() - t0:.1f} s")

    if args.full_epoch:
        if args.warmup > stream.per_epoch:
            raise SystemExit("bench_train: --warmup must not exceed one epoch in --full-epoch")
        timed, loads = run_full_epoch(methods, stream, 1, progress)
        epoch_s = {n: timed[n]["epoch_s"] for n in methods}
    else:
        timed, loads = run_steps(methods, stream, args.warmup, args.rounds, args.steps,
                                 progress)
        epoch_s = {n: timed[n]["step_ms"] / 1e3 * stream.per_epoch for n in methods}

    step_ms = {n: timed[n]["step_ms"] for n in methods}
    ratio = ({n: epoch_s[n] / epoch_s["float"] for n in methods if n != "float"}
             if "float" in methods else {})
    targets = TARGETS[model]
    meets = {n: (None if n not in ratio else ratio[n] <= t) for n, t in targets.items()}
    meets["all"] = all(v is True for v in meets.values())
    losses = {n: loss_summary(m) for n, m in methods.items()}
    for n in methods:
        lo = losses[n]
        log(f"[bench_train] {model} {n:>9}: {step_ms[n]:7.2f} ms/step, {epoch_s[n]:6.2f} "
            f"s/epoch" + (f", {ratio[n]:.2f}x float" if n in ratio else "")
            + f", loss {lo['initial']:.3f} -> {lo['final']:.3f} {lo['unit']}"
            + fmt_load(loads[n]))
        if not lo["decreased"]:
            log(f"[bench_train] WARNING: {model} {n}'s training loss did not decrease "
                f"({lo['initial']:.4f} -> {lo['final']:.4f}); it may not be training")
    return {"epoch_s": epoch_s, "ratio_to_float": ratio, "step_ms": step_ms,
            "targets": targets, "meets_targets": meets,
            "final_loss": {n: losses[n]["final"] for n in methods}, "loss": losses,
            "timing": timed, "foreign_cpu_load_by_method": loads,
            "foreign_cpu_load_timed": max((v for v in loads.values() if v is not None),
                                          default=None)}


if __name__ == "__main__":
    sys.exit(main())
