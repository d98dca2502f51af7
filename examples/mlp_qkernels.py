"""Train a 784-256-10 MLP on Fashion-MNIST with qkernels alone: numpy + numba, no torch.

Everything the network computes during training is an integer (W8 A8 G8 E8):

* weights: int32 stores (24 significant bits, fixed exponent) rounded each step to 8-bit codes
  (``quantize_nearest``, range exponent); gamma and beta are used straight from their stores;
* forward: input pixels -> int8 codes ``clip(p - 128, -127, 127)`` at exponent -7; exact integer
  matmuls; accumulators -> 8 bits (nearest); L1BN (``l1bn_forward``, 8-bit output); ReLU on
  codes; logits -> 16 bits (nearest);
* backward: base-2 softmax error ``p - onehot`` (``softmax_xent_error``, exponent -16) -> 8 bits;
  errors through the matmuls exactly, -> 8 bits (nearest); L1BN backward (``l1bn_backward``);
  weight gradients ``a^T e`` exact, -> 8 bits stochastically (``quantize_stochastic`` keyed by
  ``(seed, step, tensor_id)``), and so dgamma / dbeta;
* update: ``sgd_step`` on the batch-mean gradient (lr 0.1, momentum 0.9, as fixed point).

Floating point appears only in what is printed for people (the loss in bits) and in constants
set once (the learning-rate code, the init bound). A run is bit-identical for a given seed.

    python examples/mlp_qkernels.py [--data-dir DIR] [--epochs 2] [--per-class N]
                                    [--batch-size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from pathlib import Path

import numpy as np

from qkernels.format import QTensor
from qkernels.l1bn import (l1bn_backward, l1bn_fold, l1bn_forward, l1bn_inference,
                           l1bn_update_running)
from qkernels.loss import softmax_xent_error
from qkernels.optim import lr_code, momentum_code, sgd_step
from qkernels.quant import quantize_nearest, quantize_stochastic

DATA_DIR = "/usr/share/datasets/fashion-mnist"
BITS = 8  # W, A, G and E
LOGIT_BITS = 16
STORE_BITS = 24
STORE_HEADROOM = 4  # the store spans 2**4 times the initial range (weights and gradients grow)
IN_EXP = -7  # input codes p - 128 in [-127, 127] stand for [-1, 1)
EPS_LOG2 = -17  # L1BN epsilon 2**-17 (about torch's 1e-5)
LR, MOMENTUM, BN_MOMENTUM = 0.1, 0.9, 0.1
W1, W2, GAMMA, BETA = range(4)  # tensor ids of the gradient streams


# --------------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) of unsigned bytes: magic 0, 0, 0x08, ndim; big-endian sizes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir, split: str, per_class: int | None):
    """(int8 codes (N, 784) at exponent IN_EXP, labels); the first per_class of each class."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz")
    if per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class]
                                       for c in range(10)]))
        images, labels = images[keep], labels[keep]
    codes = np.clip(images.reshape(len(images), -1).astype(np.int16) - 128, -127, 127)
    return codes.astype(np.int8), labels.astype(np.int64)


# --------------------------------------------------------------------------------- arithmetic
def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact product of two code matrices (|codes| <= 127) in integers.

    numpy's integer matmul (no BLAS, so no float anywhere) in int32 while a sum of k products,
    k * 127**2, cannot reach 2**31 (k < 133 000: every product here), else int64. float64 BLAS
    on the codes would be exact too (sums stay far below 2**53) and ~10x faster, but the point
    of this example is a training step an integer-only device can run as written.
    """
    k = a.shape[-1]
    dt = np.int32 if k * 127 * 127 < 2**31 else np.int64
    return a.astype(dt) @ b.astype(dt)


class Param:
    """A trainable tensor: int32 store codes and their exponent (which rises when the weights
    outgrow the store) plus an int64 velocity."""

    def __init__(self, codes: np.ndarray, exp: int):
        self.store = QTensor(np.ascontiguousarray(codes, dtype=np.int32), exp)
        self.velocity = np.zeros(codes.shape, np.int64)

    def step(self, grad: QTensor, tensor_id: int, *, seed: int, step: int, mean_shift: int,
             lr_q: int) -> None:
        """Exact batch-sum gradient -> 8 bits (stochastic) -> times 2**-mean_shift (exact: an
        exponent change), then one integer SGD step."""
        g, _ = quantize_stochastic(grad, BITS, seed=seed, step=step, tensor_id=tensor_id)
        done = sgd_step(self.store, self.velocity, QTensor(g.q, g.exp - mean_shift), lr_q=lr_q,
                        momentum_q=momentum_code(MOMENTUM), store_bits=STORE_BITS)
        self.store = self.store._replace(exp=self.store.exp + done.rise)


def store_exponent(limit: float) -> int:
    """Store exponent for values of magnitude up to ``limit``, with STORE_HEADROOM bits."""
    top = math.frexp(limit)[1]  # limit < 2**top
    return top + STORE_HEADROOM - (STORE_BITS - 1)


def init_params(seed: int, hidden: int = 256) -> dict[str, Param]:
    """Weights uniform in +-1/sqrt(fan_in) drawn directly as store codes; gamma 1, beta 0."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in (("w1", (784, hidden)), ("w2", (hidden, 10))):
        limit = 1 / math.sqrt(shape[0])
        exp = store_exponent(limit)
        bound = int(limit * 2.0**-exp)  # the init bound as a store code (set once)
        params[name] = Param(rng.integers(-bound, bound + 1, size=shape), exp)
    exp = store_exponent(1.0)
    params["gamma"] = Param(np.full(hidden, 1 << -exp), exp)
    params["beta"] = Param(np.zeros(hidden), exp)
    return params


# --------------------------------------------------------------------------------- training
def train_step(p: dict[str, Param], bn: dict, x: QTensor, labels: np.ndarray, *, seed: int,
               step: int) -> QTensor:
    """One forward, backward and update on a batch; returns the 16-bit logits."""
    w1, _ = quantize_nearest(p["w1"].store, BITS)
    a1, _ = quantize_nearest(QTensor(int_matmul(x.q, w1.q), x.exp + w1.exp), BITS)
    h, cache = l1bn_forward(a1, p["gamma"].store, p["beta"].store, out_bits=BITS,
                            eps_log2=EPS_LOG2)
    l1bn_update_running(bn["mean"], bn["dev"], cache, momentum_code(BN_MOMENTUM))
    bn["out_exp"] = h.exp
    r = np.maximum(h.q, 0)  # ReLU on codes
    w2, _ = quantize_nearest(p["w2"].store, BITS)
    logits, _ = quantize_nearest(QTensor(int_matmul(r, w2.q), h.exp + w2.exp), LOGIT_BITS)

    e2, _ = quantize_nearest(softmax_xent_error(logits, labels), BITS)
    g_w2 = QTensor(int_matmul(r.T, e2.q), h.exp + e2.exp)
    dr = int_matmul(e2.q, w2.q.T)
    dr[h.q <= 0] = 0  # ReLU': no error where the code was clipped to 0
    dh, _ = quantize_nearest(QTensor(dr, e2.exp + w2.exp), BITS)
    dx, dgamma, dbeta = l1bn_backward(dh, cache, dx_bits=BITS)
    g_w1 = QTensor(int_matmul(x.q.T, dx.q), x.exp + dx.exp)

    # Batch mean: 1/N = 2**-k * (2**k / N) with 2**k >= N. The power of two moves the
    # gradient's exponent (exact; it keeps the gradient inside the store's range, which
    # sgd_step requires), the rest goes into the fixed-point rate (exactly lr for N = 2**k).
    k = (len(labels) - 1).bit_length()
    lr_q = lr_code(LR * (1 << k) / len(labels))
    for name, grad, tid in (("w1", g_w1, W1), ("w2", g_w2, W2), ("gamma", dgamma, GAMMA),
                            ("beta", dbeta, BETA)):
        p[name].step(grad, tid, seed=seed, step=step, mean_shift=k, lr_q=lr_q)
    return logits


def loss_bits(logits: QTensor, labels: np.ndarray) -> np.ndarray:
    """Per-sample base-2 cross-entropy -log2 p_y, in float64, for people only."""
    z = logits.value()
    z = z - z.max(axis=1, keepdims=True)
    return np.log2(np.exp2(z).sum(axis=1)) - z[np.arange(len(z)), labels]


def evaluate(p: dict[str, Param], bn: dict, x: np.ndarray, labels: np.ndarray,
             chunk: int = 1000) -> float:
    """Accuracy with L1BN folded from the running statistics (integer inference)."""
    w1, _ = quantize_nearest(p["w1"].store, BITS)
    w2, _ = quantize_nearest(p["w2"].store, BITS)
    correct = 0
    for i in range(0, len(labels), chunk):
        xi = x[i:i + chunk]
        a1, _ = quantize_nearest(QTensor(int_matmul(xi, w1.q), IN_EXP + w1.exp), BITS)
        folded = l1bn_fold(p["gamma"].store, p["beta"].store, bn["mean"], bn["dev"],
                           x_exp=a1.exp, out_bits=BITS, out_exp=bn["out_exp"],
                           eps_log2=EPS_LOG2)
        h = l1bn_inference(a1, folded, out_bits=BITS, out_exp=bn["out_exp"])
        scores = int_matmul(np.maximum(h.q, 0), w2.q)  # exact; argmax needs no requantizing
        correct += int((scores.argmax(axis=1) == labels[i:i + chunk]).sum())
    return correct / len(labels)


def train(data_dir=DATA_DIR, epochs: int = 2, per_class: int | None = None,
          batch_size: int = 128, seed: int = 0, test_per_class: int | None = None,
          hidden: int = 256, log=print) -> dict:
    """Train and evaluate; returns the parameters, BN running statistics and per-epoch history."""
    x_train, y_train = load_split(data_dir, "train", per_class)
    x_test, y_test = load_split(data_dir, "test", test_per_class)
    params = init_params(seed, hidden)
    bn = {"mean": np.zeros(hidden, np.int64), "dev": np.zeros(hidden, np.int64),
          "out_exp": 0}
    history, step = [], 0
    for epoch in range(epochs):
        start = time.perf_counter()
        order = np.random.default_rng([seed, epoch]).permutation(len(y_train))
        losses, correct = [], 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            logits = train_step(params, bn, QTensor(x_train[idx], IN_EXP), y_train[idx],
                                seed=seed, step=step)
            losses.append(loss_bits(logits, y_train[idx]))
            correct += int((logits.q.argmax(axis=1) == y_train[idx]).sum())
            step += 1
        test_acc = evaluate(params, bn, x_test, y_test)
        rec = {"epoch": epoch + 1, "loss_bits": float(np.concatenate(losses).mean()),
               "train_acc": correct / len(order), "test_acc": test_acc,
               "seconds": time.perf_counter() - start}
        history.append(rec)
        log(f"epoch {rec['epoch']}: train loss {rec['loss_bits']:.4f} bits, train error "
            f"{1 - rec['train_acc']:.2%}, test error {1 - test_acc:.2%} "
            f"({rec['seconds']:.1f} s)")
    return {"params": params, "bn": bn, "history": history}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=DATA_DIR, help="folder of the gzipped IDX files")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=None,
                    help="training images per class (default: all 6000)")
    ap.add_argument("--test-per-class", type=int, default=None,
                    help="test images per class (default: all 1000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return train(args.data_dir, args.epochs, args.per_class, args.batch_size, args.seed,
                 args.test_per_class)


if __name__ == "__main__":
    main()
