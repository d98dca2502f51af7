#!/usr/bin/env python
"""Benchmark data-parallel training (qtrain.distributed) at world sizes 1 and 2 on this machine.

Usage (from the repository root)::

    python bench/bench_distributed.py --json          # one JSON object on stdout
    python bench/bench_distributed.py --model lenet5-paper --sizes 1,2,4

Each world size runs as that many processes (gloo on 127.0.0.1, one torch and one Numba thread
per process) training the recipe's network (``lenet5-fmnist``: W8A8G8E8, int8 L1BN, ``int``
backend) on the first Fashion-MNIST images with the global batch ``--batch-size`` (128): the
same steps, the same data, the same weights at every world size. After ``--warmup`` untimed
steps, ``--rounds`` rounds of ``--steps`` steps are timed; the world sizes alternate round by
round (round r runs them in rotated order) so a slow phase of the machine hits all of them.

Reported per world size (rank 0's view; every rank makes the same all-reduces):

* ``images_per_s``: global images per second of each round (median and spread);
* ``step_ms``: milliseconds per step, median and min-max over rounds;
* ``allreduce_ms_per_step``: time inside all-reduces per step (the transfer and the wait for the
  slowest process: on a busy machine mostly waiting);
* ``messages_per_step`` and ``bytes_per_step``: all-reduces per step and their payload.

Weights after the timed steps are compared between world sizes (``identical``): the benchmark
also checks that the work it times is the same work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank, size, port, args, steps_per_round, queue):
    os.environ.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(size))
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from qtrain import distributed as dist
    from qtrain.config import load_recipe
    from qtrain.data import batches, load_dataset
    from qtrain.run import build
    from qtrain.train import _train_step

    dist.init()
    cfg = dataclasses.replace(load_recipe(args.recipe), model=args.model,
                              batch_size=args.batch_size)
    train, _ = load_dataset(cfg.data, download_missing=False, stream=sys.stderr)
    images, labels = train.images, train.labels
    model, optimizer = build(cfg, images.shape[1:])
    model.train()
    stream = (idx for epoch in range(1000)
              for idx in batches(images, labels, cfg.batch_size, cfg.seed, epoch))
    for _ in range(args.warmup):
        _train_step(model, optimizer, images, labels, next(stream), "cpu")
    rounds = []
    for steps in steps_per_round:
        dist.reset_traffic()
        start = time.perf_counter()
        for _ in range(steps):
            _train_step(model, optimizer, images, labels, next(stream), "cpu")
        rounds.append({"wall_s": time.perf_counter() - start, "steps": steps,
                       "allreduce_s": dist.TRAFFIC["seconds"],
                       "messages": dist.TRAFFIC["messages"], "bytes": dist.TRAFFIC["bytes"]})
    if dist.world().main:
        weights = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
        queue.put({"rounds": rounds, "weights": weights.tobytes()})
    dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(size: int, args, steps_per_round: list[int]) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, size, port, args, steps_per_round, queue))
             for r in range(size)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="lenet5-fmnist")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--sizes", default="1,2", help="world sizes, comma-separated")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    # each round starts a fresh group of processes per world size (the same steps from the
    # same start, so the same weights); the world sizes take turns in rotated order
    results = {n: [] for n in sizes}
    weights = {}
    for rep in range(args.rounds):
        for n in sizes[rep % len(sizes):] + sizes[:rep % len(sizes)]:
            print(f"world size {n}, repetition {rep + 1}/{args.rounds}", file=sys.stderr)
            r = _run(n, args, [args.steps])
            results[n] += r["rounds"]
            weights.setdefault(n, r["weights"])
    out = {"benchmark": "bench_distributed", "model": args.model, "recipe": args.recipe,
           "batch_size": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
           "cpu_count": os.cpu_count(), "threads_per_process": 1,
           "identical": len(set(weights.values())) == 1, "world_sizes": {}}
    for n, rounds in results.items():
        ms = [1000 * r["wall_s"] / r["steps"] for r in rounds]
        ips = [args.batch_size * r["steps"] / r["wall_s"] for r in rounds]
        comm = [1000 * r["allreduce_s"] / r["steps"] for r in rounds]
        out["world_sizes"][str(n)] = {
            "images_per_s": {"median": statistics.median(ips), "min": min(ips),
                             "max": max(ips)},
            "step_ms": {"median": statistics.median(ms), "min": min(ms), "max": max(ms)},
            "allreduce_ms_per_step": {"median": statistics.median(comm), "min": min(comm),
                                      "max": max(comm)},
            "messages_per_step": rounds[0]["messages"] / rounds[0]["steps"],
            "bytes_per_step": rounds[0]["bytes"] / rounds[0]["steps"],
        }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for n, r in out["world_sizes"].items():
            print(f"world size {n}: {r['images_per_s']['median']:.0f} images/s, "
                  f"{r['step_ms']['median']:.1f} ms/step, all-reduce "
                  f"{r['allreduce_ms_per_step']['median']:.1f} ms/step, "
                  f"{r['messages_per_step']:.0f} messages, {r['bytes_per_step']:.0f} bytes")
        print(f"identical weights: {out['identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
