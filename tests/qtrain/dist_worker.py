"""One process of a data-parallel test run (spawned by ``test_distributed.py``): train a few
steps on tiny data at some world size and save rank 0's weights, optimizer and metrics."""

from __future__ import annotations

import os

import numpy as np
import torch


def train_worker(rank: int, world_size: int, port: int, cfg_dict: dict, data_path: str,
                 out_path: str) -> None:
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from qtrain import distributed as dist
    from qtrain.config import RunConfig
    from qtrain.quant import quant_report, reset_stats
    from qtrain.run import build
    from qtrain.train import evaluate, train_epoch

    dist.init()
    try:
        data = np.load(data_path)
        cfg = RunConfig.from_dict(cfg_dict)
        model, optimizer = build(cfg, data["x_train"].shape[1:])
        metrics = []
        for epoch in range(cfg.epochs):
            reset_stats(model)
            m = train_epoch(model, optimizer, data["x_train"], data["y_train"],
                            batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch)
            m["test_error"] = evaluate(model, data["x_test"], data["y_test"], batch_size=8)
            m["quant"] = quant_report(model)
            del m["seconds"], m["images_per_s"]
            metrics.append(m)
        if dist.world().main:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": model.qstate.step, "metrics": metrics}, out_path)
    finally:
        dist.shutdown()
