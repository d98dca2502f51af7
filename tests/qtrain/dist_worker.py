"""One process of a data-parallel test run (spawned by ``test_distributed.py``): train a few
steps on tiny data at some world size and save rank 0's weights, optimizer and metrics."""

from __future__ import annotations

import os

import numpy as np
import torch


def train_worker(rank: int, world_size: int, port: int, cfg_dict: dict, data_path: str,
                 out_path: str, launched: bool = False) -> None:
    """``launched``: join a process group even alone (as torchrun starts one process)."""
    if world_size > 1 or launched:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from qtrain import distributed as dist
    from qtrain.config import RunConfig
    from qtrain.quant import quant_report, reset_stats
    from qtrain.run import build
    from qtrain.train import evaluate, train_epoch

    cfg = RunConfig.from_dict(cfg_dict)
    dist.init(dist.backend_for(cfg.device, cfg.quantized), cfg.device)
    device = dist.process_device(cfg.device)
    try:
        data = np.load(data_path)
        model, optimizer = build(cfg, data["x_train"].shape[1:])
        stepped = dist.data_parallel(model)  # DDP for a float network on several processes
        metrics = []
        for epoch in range(cfg.epochs):
            reset_stats(model)
            m = train_epoch(stepped, optimizer, data["x_train"], data["y_train"],
                            batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                            device=device)
            m["test_error"] = evaluate(model, data["x_test"], data["y_test"], batch_size=8,
                                      device=device)
            m["quant"] = quant_report(model)
            del m["seconds"], m["images_per_s"]
            metrics.append(m)
        if dist.world().main:
            torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                        "optimizer": _to_cpu(optimizer.state_dict()),
                        "step": model.qstate.step, "metrics": metrics}, out_path)
    finally:
        dist.shutdown()
    # Done and saved: leave without the interpreter's teardown, where a library thread of a
    # spawned process (3 processes on 2 cores) now and then aborted it ("terminate called
    # without an active exception", exit -6: about one run in seven of the world-size test).
    os._exit(0)


def _to_cpu(obj):
    """``obj`` with every tensor in it on the CPU (so runs on different devices compare)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def biased_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    """Four training steps of ``test_bias.biased_net`` converted to W8A8G8E8 (quantized biases
    in a conv without a norm and in both linears) at some world size; rank 0 saves the state."""
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import qtrain
    from qtrain import distributed as dist
    from qtrain.optim import QSGD
    from qtrain.quant import QConfig
    from qtrain.train import train_epoch

    from .test_bias import biased_net

    dist.init()
    try:
        rng = np.random.default_rng(3)
        # contrasts from 1/64 to 1: the processes' shares (two images) differ in range, so a
        # bias put on a share's own grid instead of the batch's would show
        contrast = 2.0 ** -rng.uniform(0, 6, (16, 1, 1))
        noise = rng.integers(-128, 128, size=(16, 28, 28)) * contrast
        images = (128 + noise).round().clip(0, 255).astype(np.uint8)
        labels = rng.integers(0, 10, 16)
        cfg = QConfig(seed=4)
        net = qtrain.convert(biased_net(), cfg)
        opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=cfg)
        train_epoch(net, opt, images, labels, batch_size=4, seed=0, epoch=0)
        if dist.world().main:
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, out_path)
    finally:
        dist.shutdown()
    os._exit(0)  # as train_worker: gloo's threads, torn down at exit, now and then abort it


def cli_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    """One of the processes torchrun would start for ``qtrain ARGV``: exits 0 if the command
    line succeeded and left the process group behind it (a gloo group still up at exit aborts
    the interpreter now and then: "terminate called without an active exception")."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    os.environ.pop("QTRAIN_DATA", None)
    torch.set_num_threads(1)
    from qtrain.cli import main

    status = main(argv)
    left = not torch.distributed.is_initialized()
    print(f"rank {rank}: qtrain returned {status}, group left: {left}")
    os._exit(0 if status == 0 and left else 1)
