"""The emulate backend on a CUDA device: the same integers as the int backend on the CPU.

These tests need a CUDA device and are skipped without one (CI has none); run them where one
is, e.g. ``python -m pytest tests/qtrain/test_cuda.py -v`` (``scripts/cuda_check.sh`` runs them
with the float Table II baselines). On a GPU every product of codes runs in torch (cuDNN and
cuBLAS, float32 where a sum provably stays below 2**24, float64 otherwise), the rounding and
the optimizer's update as torch operations; the L1 batch norm and the loss run qkernels' kernels
on copies of the codes.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from qtrain.loss import cross_entropy
from qtrain.models import build
from qtrain.optim import QSGD
from qtrain.quant import QConfig, quant_report
from qtrain.train import to_input

from . import test_golden

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"


def _batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))


def _train(name: str, norm: str, cfg: QConfig, device: str, n_steps: int, batch: int = 32,
           lr: float = 0.1):
    """``n_steps`` SGD steps of a fresh ``name`` (seeded) on ``device``; the last logits, the
    state dict and the quantizers' counters, on the CPU."""
    images, labels = _batch(n_steps * batch)
    torch.manual_seed(1)
    net = build(name, norm, cfg).to(device)
    opt = QSGD(net.parameters(), lr=lr, momentum=0.9, qconfig=cfg)
    for s in range(n_steps):
        part = slice(s * batch, (s + 1) * batch)
        x = to_input(images[part], device)
        y = torch.from_numpy(labels[part].astype(np.int64)).to(device)
        out = net(x)
        loss = cross_entropy(out, y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step(batch_size=batch)
        net.qstate.step += 1
    state = {k: v.detach().cpu() for k, v in copy.deepcopy(net.state_dict()).items()}
    return out.detach().cpu(), state, quant_report(net)


@pytest.mark.parametrize("name, norm, bits, sr_errors, wexp", [
    ("lenet5", "l1", 8, False, "max"),
    ("lenet5-paper", "l1", 8, False, "max"),  # fc 1024 -> 512: float64 products where needed
    ("lenet5", "l1", 6, True, "max"),         # stochastic errors keyed by sample indices
    ("lenet5", "none", 8, False, "max"),
    ("lenet5", "l1", 2, False, "mean"),
    ("mlp", "l1", 16, False, "max"),          # 16-bit codes: float64 products
])
def test_emulate_on_cuda_equals_int_on_cpu(name, norm, bits, sr_errors, wexp):
    """Three steps of emulate on the GPU and of int on the CPU from the same weights: the same
    logits, parameters, running statistics and quantizer counters, bit for bit."""
    runs = {}
    for backend, device in (("int", "cpu"), ("emulate", CUDA)):
        cfg = QConfig(bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits, backend=backend,
                      seed=3, stochastic_errors=sr_errors, weight_exp=wexp)
        runs[backend] = _train(name, norm, cfg, device, 3)
    (o1, s1, r1), (o2, s2, r2) = runs["int"], runs["emulate"]
    differ = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert not differ, f"emulate on {CUDA} differs from int in {differ}"
    assert torch.equal(o1, o2), "the last logits differ"
    assert r1 == r2, "the quantizers' saturation / underflow counters differ"


def test_quantized_biases_on_cuda_equal_int_on_cpu():
    """A converted model with quantized biases (conv and linears), three steps: emulate on
    the GPU (float64 products with the bias codes) and int on the CPU agree bit for bit."""
    import qtrain

    from .test_bias import _steps, biased_net

    runs = []
    for backend, device in (("int", "cpu"), ("emulate", CUDA)):
        cfg = QConfig(backend=backend, seed=5)
        net = qtrain.convert(biased_net(), cfg).to(device)
        out, state, report = _steps(net, cfg, device=device)
        runs.append((out.cpu(), {k: v.cpu() for k, v in state.items()}, report))
    (o1, s1, r1), (o2, s2, r2) = runs
    assert torch.equal(o1, o2) and r1 == r2
    assert all(torch.equal(s1[k], s2[k]) for k in s1), [k for k in s1
                                                        if not torch.equal(s1[k], s2[k])]


def test_golden_checksum_on_cuda():
    """The golden run (20 steps of the default recipe, eval logits included) of emulate on the
    GPU ends in the int backend's checksum."""
    got = test_golden.run("W8A8G8E8-emulate", device=CUDA)
    assert got == test_golden.GOLDEN["W8A8G8E8-int"], (
        f"emulate on {CUDA} ({got}) is not the int backend's golden state")


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_float_baselines_train_on_cuda(norm):
    """--bits 32 (the float baselines) trains on the GPU and stays near the CPU run: the same
    network in float32, different only by rounding order."""
    cfg = QConfig(bits_w=32, bits_a=32, bits_g=32, bits_e=32, backend="emulate")
    cpu = _train("lenet5", norm, cfg, "cpu", 5)
    gpu = _train("lenet5", norm, cfg, CUDA, 5)
    assert torch.isfinite(gpu[0]).all()
    assert torch.allclose(cpu[0], gpu[0], rtol=1e-3, atol=1e-3), (
        f"float {norm} logits: max |cpu - cuda| = {(cpu[0] - gpu[0]).abs().max():.3g}")


def test_qtrain_trains_on_cuda(tmp_path):
    """The command line on the GPU: a run directory whose summary names the device."""
    import json

    from qtrain.cli import main

    out = tmp_path / "run"
    rc = main(["--bits", "8", "--norm", "l1", "--backend", "emulate", "--device", CUDA,
               "--set", "per_class=50", "--epochs", "1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == CUDA and config["backend"] == "emulate"


# --- several processes on the GPU (torch.distributed) -------------------------------------------

from .test_distributed import _assert_same, spawn, tiny  # noqa: E402,F401 (tiny: a fixture)


def _spawn(world_size: int, cfg, data: str, path, launched: bool = False) -> dict:
    """``world_size`` processes of ``dist_worker.train_worker`` (``launched``: a torchrun
    environment even for one process); rank 0's saved state."""
    from .dist_worker import train_worker

    spawn(train_worker, world_size, dataclasses.asdict(cfg), data, str(path), launched=launched)
    return torch.load(path, weights_only=False)


def test_world_sizes_on_cuda_give_the_int_backends_network(tiny, tmp_path):
    """W8A8G8E8 emulate on the GPU, on one process and on two sharing it (gloo), ends in the
    network that int on the CPU trains on one process, bit for bit."""
    from qtrain.config import load_recipe

    base = dataclasses.replace(load_recipe("lenet5-fmnist"), epochs=2, batch_size=24, lr=0.05)
    cpu = _spawn(1, base, tiny, tmp_path / "int.pt")
    gpu = dataclasses.replace(base, backend="emulate", device=CUDA)
    _assert_same(_spawn(1, gpu, tiny, tmp_path / "gpu1.pt"), cpu, "emulate on cuda, 1 process")
    _assert_same(_spawn(2, gpu, tiny, tmp_path / "gpu2.pt"), cpu, "emulate on cuda, 2 processes")


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_float_network_trains_data_parallel_on_cuda(tiny, tmp_path, world_size):
    """bits 32 under DistributedDataParallel on the GPU: NCCL where each process has a GPU of
    its own (one process here), gloo where processes share one."""
    from qtrain import distributed as dist
    from qtrain.config import load_recipe

    cfg = dataclasses.replace(load_recipe("lenet5-fmnist"), epochs=1, batch_size=24, lr=0.05,
                              bits_w=32, bits_a=32, bits_g=32, bits_e=32, norm="l2",
                              backend="emulate", device=CUDA)
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        want = "nccl" if world_size <= torch.cuda.device_count() else "gloo"
        assert dist.backend_for(CUDA, quantized=False) == want
    finally:
        for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.pop(var)
    out = _spawn(world_size, cfg, tiny, tmp_path / "float.pt", launched=True)
    assert out["step"] == 5 and out["metrics"][-1]["train_loss"] > 0
