"""examples/mlp_qkernels.py: a torch-free MLP trained on Fashion-MNIST with qkernels alone.

Invariants checked here:

* it learns: on 200 training images per class, 3 epochs, the integer network reaches a test
  accuracy well above chance (10%) on the full test set, with BN folded from its running
  statistics, and its training loss falls;
* it is reproducible: two runs with the same seed end with bit-identical stores, velocities and
  BN running statistics (every step is integer arithmetic with counter-based random rounding);
  another seed gives other stores;
* it is torch-free: run as a script in a fresh interpreter where importing torch (or qtrain,
  which may import torch) raises, it trains and evaluates, and torch is never in sys.modules.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "mlp_qkernels.py"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

pytestmark = pytest.mark.skipif(not all((DATA_DIR / f).is_file() for f in FILES),
                                reason=f"Fashion-MNIST IDX files not found in {DATA_DIR}")

#: Measured: 200 per class, 3 epochs, batch 128 reach 77-78% test accuracy (seeds 0 and 1;
#: 86% after 2 epochs on all 60 000 images). 70% leaves ~7 points for harmless numeric
#: changes in the kernels while staying far above chance (10%) and above what a network that
#: learned little would reach (a single epoch on 20 per class: ~56%).
MIN_TEST_ACCURACY = 0.70


def load_example():
    spec = importlib.util.spec_from_file_location("mlp_qkernels_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def trained(example):
    return example.train(DATA_DIR, epochs=3, per_class=200, batch_size=128, seed=0)


def test_loads_subset_as_int8_codes(example):
    """The IDX reader gives per_class images of each class as int8 codes in [-127, 127]."""
    x, y = example.load_split(DATA_DIR, "train", 7)
    assert x.shape == (70, 784) and x.dtype == np.int8
    assert -127 <= int(x.min()) and int(x.max()) <= 127
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 7))
    x_test, y_test = example.load_split(DATA_DIR, "test", None)
    assert x_test.shape == (10_000, 784) and len(y_test) == 10_000


def test_learns_well_above_chance(trained):
    """Test accuracy >= MIN_TEST_ACCURACY (see its comment), the loss falls, and the stores
    stay integers: int32 codes, int64 velocities and running statistics."""
    history = trained["history"]
    assert len(history) == 3
    assert history[-1]["test_acc"] >= MIN_TEST_ACCURACY, history
    assert history[-1]["loss_bits"] < 0.7 * history[0]["loss_bits"], history
    for p in trained["params"].values():
        assert p.store.q.dtype == np.int32 and p.velocity.dtype == np.int64
        assert isinstance(p.store.exp, int)
    assert trained["bn"]["mean"].dtype == np.int64 and trained["bn"]["dev"].dtype == np.int64


def final_state(run) -> dict:
    state = {}
    for name, p in run["params"].items():
        state[f"{name}.store"] = (p.store.q, p.store.exp)
        state[f"{name}.velocity"] = (p.velocity, None)
    state["bn.mean"] = (run["bn"]["mean"], None)
    state["bn.dev"] = (run["bn"]["dev"], None)
    return state


def test_same_seed_bit_identical(example):
    """Two runs with one seed end bit-identical; another seed ends elsewhere."""
    kwargs = dict(epochs=2, per_class=50, batch_size=64, test_per_class=20)
    runs = [example.train(DATA_DIR, seed=seed, **kwargs) for seed in (3, 3, 4)]
    first, second, other = map(final_state, runs)
    for key, (codes, exp) in first.items():
        np.testing.assert_array_equal(second[key][0], codes, err_msg=key)
        assert second[key][1] == exp, key
    assert runs[0]["bn"]["out_exp"] == runs[1]["bn"]["out_exp"]
    assert [h["test_acc"] for h in runs[0]["history"]] == \
        [h["test_acc"] for h in runs[1]["history"]]
    assert not np.array_equal(other["w1.store"][0], first["w1.store"][0])


BLOCK_AND_RUN = r"""
import importlib.abc, runpy, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "qtrain"):
            raise ImportError(f"{name} is blocked: the example must not need it")
        return None

sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], "--data-dir", sys.argv[2], "--epochs", "1", "--per-class", "20",
            "--test-per-class", "10", "--batch-size", "50"]
runpy.run_path(sys.argv[0], run_name="__main__")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "qtrain"))
assert not leaked, leaked
print("TORCH-FREE OK")
"""


def test_runs_without_torch():
    """The script trains and evaluates where torch and qtrain cannot be imported."""
    res = subprocess.run([sys.executable, "-c", BLOCK_AND_RUN, str(SCRIPT), str(DATA_DIR)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "epoch 1: train loss" in res.stdout and "test error" in res.stdout
    assert "TORCH-FREE OK" in res.stdout
