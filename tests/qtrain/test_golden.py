"""Golden checksums: the exact integer state after a fixed number of training steps.

The default recipe's model and optimizer (``lenet5-fmnist`` through :func:`qtrain.run.build`)
train :data:`STEPS` steps of :data:`BATCH` images on the Fashion-MNIST subset shipped in the
package (read from the package directory itself, never from Debian's set or ``$QTRAIN_DATA``,
so the checksum is the same on every machine). The checksum is a sha256 over, in a fixed order,

* every parameter, by its name in the flat (unfused, :func:`qtrain.fusion.unfuse`) model so that
  grouping modules into fused blocks is not a change, as its int64 weight-store codes (``param = code * 2**store_exp``, checked
  exact) with its ``store_exp``,
* every optimizer state entry of every parameter (``store_exp``, the int64 ``velocity`` and
  anything QSGD adds later), and the param groups' ``lr`` and ``momentum``,
* every buffer of the model (L1BN running statistics, step counters, exponents) as little-endian
  bytes of its own dtype, and ``qstate.step``,
* the eval-mode logits (their float32 containers of integer codes) of the first
  :data:`EVAL_IMAGES` test images of the subset: the folded L1BN inference and the eval
  forward behind every quoted test error.

Any change to the arithmetic of training (kernels, rounding, the random stream, the optimizer,
the data order) changes it. That may be intended; then update the constant deliberately::

    python -m tests.qtrain.test_golden --print     # from the repository root

and say in the commit message (and in docs/results.md if results move) that the numerics changed
and why. The ``int`` and ``emulate`` backends agree bit for bit by design, so they share one
constant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import struct
import sys
from pathlib import Path

import pytest
import torch

#: Training steps and images per step (the recipe's batch size): 20 steps, one pass over the
#: first 2560 images of the shipped subset in the order batches(seed=0, epoch=0) gives.
STEPS = 20
BATCH = 128
#: Test images whose eval-mode logits enter the checksum.
EVAL_IMAGES = 256

#: name -> overrides of the default recipe's fields.
CONFIGS = {
    "W8A8G8E8-int": {"backend": "int"},
    "W8A8G8E8-emulate": {"backend": "emulate"},
    "W8A8G8E8-emulate-torch": {"backend": "emulate"},  # run within quant.torch_emulation()
    "W16A16G16E16-int": {"backend": "int", "bits_w": 16, "bits_a": 16, "bits_g": 16,
                         "bits_e": 16},
}

#: name -> sha256 of the state after STEPS steps (`python -m tests.qtrain.test_golden --print`).
GOLDEN = {
    "W8A8G8E8-int": "a4008ae154a15485b16e6846b6686a1b45336dd5471df6c159505bed6fb3ed50",
    "W8A8G8E8-emulate": "a4008ae154a15485b16e6846b6686a1b45336dd5471df6c159505bed6fb3ed50",
    "W8A8G8E8-emulate-torch": "a4008ae154a15485b16e6846b6686a1b45336dd5471df6c159505bed6fb3ed50",
    "W16A16G16E16-int": "8aec8d5a339d73d76b38558671ec6a9b44c144a00bbe9ee499e36b38ebb81b75",
}

UPDATE = ("a numeric change: if it is intended, print the new values with "
          "`python -m tests.qtrain.test_golden --print` (from the repository root), paste them "
          "into GOLDEN in tests/qtrain/test_golden.py, and note the numeric change and its reason "
          "in the commit message")


def subset_dir() -> Path:
    """The package's own Fashion-MNIST subset (not the data search: the same files everywhere)."""
    from qtrain import data

    return Path(str(importlib.resources.files("qtrain").joinpath("datasets", data.SUBSET_DIR)))


def train_steps(overrides: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                          torch.Tensor]:
    """The default recipe with ``overrides``, trained STEPS steps on the shipped subset; the
    model, its optimizer, and the eval-mode logits of the first EVAL_IMAGES test images."""
    from qtrain.config import load_recipe
    from qtrain.data import load_mnist_like
    from qtrain.run import build
    from qtrain.train import to_input, train_epoch

    cfg = dataclasses.replace(load_recipe("lenet5-fmnist"), batch_size=BATCH, **overrides)
    train = load_mnist_like("fashion-mnist", "train", subset_dir())
    assert len(train) == 3000, train.source
    n = STEPS * BATCH
    model, opt = build(cfg, train.images.shape[1:])
    for group in opt.param_groups:
        group["lr"] = cfg.lr_at(0)
    train_epoch(model, opt, train.images[:n], train.labels[:n], batch_size=BATCH,
                seed=cfg.seed, epoch=0, device=cfg.device)
    assert model.qstate.step == STEPS
    test = load_mnist_like("fashion-mnist", "test", subset_dir())
    model.eval()
    with torch.no_grad():
        logits = model(to_input(test.images[:EVAL_IMAGES], cfg.device))
    model.train()
    return model, opt, logits


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    head = f"{t.dtype}|{tuple(t.shape)}|".encode()
    return head + t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


def _value_bytes(v) -> bytes:
    if isinstance(v, torch.Tensor):
        return _tensor_bytes(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"golden checksum: no canonical bytes for {type(v).__name__} {v!r}")
    return (b"i" + struct.pack("<q", v)) if isinstance(v, int) else (b"f" + struct.pack("<d", v))


def checksum(model: torch.nn.Module, opt: torch.optim.Optimizer, logits: torch.Tensor) -> str:
    """sha256 of the integer state of ``model`` and ``opt`` and of the eval ``logits`` (see the
    module docstring)."""
    from qtrain.fusion import unfuse

    unfuse(model)  # flat module names (the parameters, buffers and optimizer state are the same)
    h = hashlib.sha256()

    def put(tag: str, payload: bytes) -> None:
        h.update(struct.pack("<I", len(tag)) + tag.encode())
        h.update(struct.pack("<Q", len(payload)) + payload)

    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        state = opt.state[p]
        exp = state["store_exp"]
        codes = torch.floor(p.detach().double() * 2.0 ** -exp).to(torch.int64)
        assert torch.equal(codes.double() * 2.0 ** exp, p.detach().double()), (
            f"{name} is not on its store grid 2**{exp}")
        put(f"param {name} codes", _tensor_bytes(codes))
        for key in sorted(state):
            put(f"param {name} state {key}", _value_bytes(state[key]))
    for i, group in enumerate(opt.param_groups):
        for key in ("lr", "momentum"):
            put(f"group {i} {key}", _value_bytes(float(group[key])))
    buffers = dict(model.named_buffers())
    for name in sorted(buffers):
        put(f"buffer {name}", _tensor_bytes(buffers[name]))
    put("qstate.step", _value_bytes(int(model.qstate.step)))
    put("eval logits", _tensor_bytes(logits))
    return h.hexdigest()


def run(name: str, device: str = "cpu") -> str:
    """The checksum of configuration ``name`` of :data:`CONFIGS`, trained on ``device``."""
    from qtrain.quant import torch_emulation

    with torch_emulation() if name.endswith("-torch") else contextlib.nullcontext():
        return checksum(*train_steps({**CONFIGS[name], "device": device}))


@pytest.fixture(scope="module")
def int8_checksum() -> str:
    return run("W8A8G8E8-int")


def test_golden_int8(int8_checksum):
    """W8A8G8E8 int backend after STEPS steps: the stored checksum, and the same again when
    trained a second time in the same process (no state leaks between runs)."""
    expected = GOLDEN["W8A8G8E8-int"]
    assert int8_checksum == expected, (
        f"W8A8G8E8-int checksum {int8_checksum} != {expected}: {UPDATE}")
    again = run("W8A8G8E8-int")
    assert again == int8_checksum, "two identical runs in one process differ: a state leak"


@pytest.mark.parametrize("name", ["W8A8G8E8-emulate", "W8A8G8E8-emulate-torch"])
def test_golden_emulate_equals_int(int8_checksum, name):
    """The emulate backend ends in the same state as int, bit for bit (by design), both as it
    runs on CPU (qkernels' rounding and update kernels) and with its torch operations
    (quant.torch_emulation(), what it runs on other devices)."""
    got = run(name)
    assert got == int8_checksum, (
        f"{name} ({got}) and int ({int8_checksum}) no longer agree bit for bit: a bug in one of "
        "the backends, not a golden value to update")
    expected = GOLDEN[name]
    assert got == expected, f"{name} checksum {got} != {expected}: {UPDATE}"


def test_golden_int16():
    """W16A16G16E16 int backend (the int16 kernels) after STEPS steps: the stored checksum."""
    got = run("W16A16G16E16-int")
    expected = GOLDEN["W16A16G16E16-int"]
    assert got == expected, f"W16A16G16E16-int checksum {got} != {expected}: {UPDATE}"


def main(argv: list[str]) -> int:
    if argv not in ([], ["--print"]):
        print("usage: python -m tests.qtrain.test_golden [--print]", file=sys.stderr)
        return 2
    print("GOLDEN = {")
    changed = []
    for name in CONFIGS:
        got = run(name)
        print(f'    "{name}": "{got}",')
        if got != GOLDEN.get(name):
            changed.append(f"{name} (was {GOLDEN.get(name)})")
    print("}")
    print("changed: " + (", ".join(changed) if changed else "nothing"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
