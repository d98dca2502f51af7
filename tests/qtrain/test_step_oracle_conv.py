"""Two full training steps of the paper's LeNet-5 (``lenet5-paper``: two conv blocks with L1BN,
ReLU and 2x2 max-pool, a hidden fc block with L1BN, a 10-way classifier) on the int backend
against a numpy int64 oracle.

The oracle below re-derives every integer of the steps from the definitions -- range
exponents, round half up, stochastic rounding from the counter-based stream, the convolutions
as exact integer products of an im2col written here (patches in torch's (c, kh, kw) weight
order; the weight gradient e^T @ columns, the input gradient the columns of e @ W added back
into the image), the 2x2 max-pool of the ReLU's codes routing each error to the first largest
element of its window (row-major; none where the window's maximum is a ReLU zero), the
base-2 softmax error, integer SGD with momentum, the BN running statistics with their dyadic
1/m -- with numpy int64 arrays and Python integers; for the L1BN forward and backward (on
(N, C, H, W) codes for the conv blocks, (N, C) for the fc block) it calls qkernels' own slow
oracle. Nothing of qtrain's code path is reused (the blocks run fused on the int backend; the
oracle computes the modules one by one). The second step starts from the first's weights,
velocities and statistics; the pool's tie rule is shown to matter (the last largest element
of a window gives other gradients).

The integer definitions both step oracles use are in int64_oracle.py.
"""

import numpy as np
import torch

from qkernels import oracle as bn_oracle
from qkernels.optim import LR_BITS
from qtrain.fusion import QuantBlock
from qtrain.loss import cross_entropy
from qtrain.models import build
from qtrain.nn import L1BatchNorm1d, L1BatchNorm2d, QuantConv2d, QuantLinear
from qtrain.optim import QSGD
from qtrain.quant import QConfig, Quantize
from qtrain.train import to_input

from . import int64_oracle as oracle
from .int64_oracle import (check_running, check_updates, codes_of, initial_running,
                           initial_stores, int8_view, nearest, softmax_error)

BITS = dict(bits_w=6, bits_a=8, bits_g=7, bits_e=8)
SEED = 5
N = 4  # images per batch


# --- the definitions, in numpy int64 (the shared ones in int64_oracle.py) ----------------------

def stochastic(c, exp, bits, step, tensor_id):
    return oracle.stochastic(c, exp, bits, SEED, step, tensor_id)


# --- convolution and pool on codes ----------------------------------------------------------

def im2col(x, k):
    """(N, C, H, W) -> (N*OH*OW, C*k*k): one row per output position (n, oh, ow), its patch in
    the order (c, kh, kw) of torch's weight layout (O, C, kh, kw). No padding, stride 1."""
    n, c, h, w = x.shape
    oh, ow = h - k + 1, w - k + 1
    cols = np.empty((n, oh, ow, c, k, k), np.int64)
    for i in range(k):
        for j in range(k):
            cols[..., i, j] = x[:, :, i:i + oh, j:j + ow].transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * k * k)


def col2im(cols, shape, k):
    """im2col's adjoint: every patch row of ``cols`` added back where it was taken from."""
    n, c, h, w = shape
    oh, ow = h - k + 1, w - k + 1
    cols = cols.reshape(n, oh, ow, c, k, k)
    out = np.zeros(shape, np.int64)
    for i in range(k):
        for j in range(k):
            out[:, :, i:i + oh, j:j + ow] += cols[..., i, j].transpose(0, 3, 1, 2)
    return out


def windows(y):
    """(N, C, H, W) -> (N, C, H/2, W/2, 4): each 2x2 window's elements in row-major order."""
    n, c, h, w = y.shape
    return y.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5) \
        .reshape(n, c, h // 2, w // 2, 4)


def pool_relu(y, first=True):
    """2x2 max-pool of relu(y): the pooled codes, and per window the element the error goes
    back to (0..3 row-major: the first largest, or with ``first=False`` the last), -1 where
    the maximum is a ReLU zero."""
    win = windows(np.maximum(y, 0))
    top = win.max(axis=-1)
    pick = win.argmax(axis=-1) if first else 3 - win[..., ::-1].argmax(axis=-1)
    return top, np.where(top > 0, pick, -1)


def unpool(d, sel):
    """The pooled error ``d`` back at the selected element of each window (zeros elsewhere)."""
    n, c, h, w = d.shape
    win = np.zeros((n, c, h, w, 4), np.int64)
    for k in range(4):
        win[..., k] = np.where(sel == k, d, 0)
    return win.reshape(n, c, h, w, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h, 2 * w)


# --- the oracle's step ---------------------------------------------------------------------------

LR, MOMENTUM, BN_MOMENTUM = 0.1, 0.9, 0.1
BLOCKS = (("conv0", "bn0", True), ("conv1", "bn1", True), ("fc0", "bn2", False))


def block_forward(x, x_exp, stores, layer, bn, conv, first):
    """``layer -> Quantize(bits_a) -> L1BN -> ReLU [-> 2x2 max-pool] -> Quantize`` forward:
    the output codes, their exponent and what the backward needs."""
    w, w_exp = nearest(*stores[f"{layer}.w"], BITS["bits_w"])
    if conv:
        k = w.shape[-1]
        cols = im2col(x, k)
        oh = x.shape[2] - k + 1
        acc = (cols @ w.reshape(len(w), -1).T).reshape(len(x), oh, oh, -1).transpose(0, 3, 1, 2)
    else:
        cols, acc = x, x @ w.T
    a, a_exp = nearest(acc, x_exp + w_exp, BITS["bits_a"])
    a8, a8_exp = int8_view(a, a_exp)
    gq, gexp = stores[f"{bn}.g"]
    bq, bexp = stores[f"{bn}.b"]
    yb, yb_exp, stats = bn_oracle.l1bn_forward_oracle(a8, a8_exp, gq, gexp, bq, bexp,
                                                      BITS["bits_a"], None, -17)
    if conv:
        y, sel = pool_relu(yb, first)
    else:
        y, sel = np.maximum(yb, 0), None
    out, out_exp = nearest(y, yb_exp, BITS["bits_a"])  # the codes again: the same values
    return out, out_exp, dict(x_shape=x.shape, x_exp=x_exp, cols=cols, w=w, w_exp=w_exp, a8=a8,
                              a8_exp=a8_exp, stats=stats, yb=yb, sel=sel, gq=gq, gexp=gexp)


def block_backward(d, d_exp, s, want, ids, layer, bn, conv, step):
    """The block's backward from the error ``d`` at its output: the norm's and the layer's
    gradients into ``want``; returns the error at the layer's input."""
    e_bits, g_bits = BITS["bits_e"], BITS["bits_g"]
    d, d_exp = nearest(d, d_exp, e_bits)                       # the block's output quantizer
    if conv:
        d = unpool(d, s["sel"])                                # max-pool
    d = d * (s["yb"] > 0)  # ReLU (after the pool a no-op: a selected element is above 0)
    g8, g8_exp = int8_view(d, d_exp)
    dx, dx_exp, dgam, dbet = bn_oracle.l1bn_backward_oracle(
        s["a8"], g8, s["stats"], s["gq"], s["gexp"], s["a8_exp"], g8_exp, e_bits, None,
        g8_exp - 16)
    want[f"{bn}.g"] = stochastic(dgam, g8_exp - 16, g_bits, step, ids[f"{bn}.g"])
    want[f"{bn}.b"] = stochastic(dbet, g8_exp, g_bits, step, ids[f"{bn}.b"])
    d, d_exp = nearest(dx, dx_exp, e_bits)                     # the quantizer before the norm
    w = s["w"]
    if conv:
        d = d.transpose(0, 2, 3, 1).reshape(-1, len(w))        # (N*OH*OW, O)
    w2 = w.reshape(len(w), -1)
    want[f"{layer}.w"] = stochastic((d.T @ s["cols"]).reshape(w.shape), d_exp + s["x_exp"],
                                    g_bits, step, ids[f"{layer}.w"])
    back = d @ w2
    if conv:
        back = col2im(back, s["x_shape"], w.shape[-1])
    return back, d_exp + s["w_exp"]


def oracle_step(images, labels, stores, ids, step, first=True):
    """The forward and backward of one step from the store codes: (logit codes, their exponent,
    {name: (gradient codes, exponent)}, [per norm: (statistics, input exponent, m)])."""
    n = len(labels)
    h, h_exp = (images.astype(np.int64) - 128).clip(-127, 127).reshape(n, 1, 28, 28), -7
    saved = []
    for layer, bn, conv in BLOCKS:
        if not conv:
            h = h.reshape(n, -1)                               # Flatten: (c, h, w) order
        h, h_exp, s = block_forward(h, h_exp, stores, layer, bn, conv, first)
        saved.append(s)
    w, w_exp = nearest(*stores["fc1.w"], BITS["bits_w"])
    z, z_exp = nearest(h @ w.T, h_exp + w_exp, 16)             # the logits: 16 bits

    err, err_exp = softmax_error(z, z_exp, labels)
    e, e_exp = nearest(err, err_exp, BITS["bits_e"])           # the logits' quantizer
    want = {"fc1.w": stochastic(e.T @ h, e_exp + h_exp, BITS["bits_g"], step, ids["fc1.w"])}
    d, d_exp = e @ w, e_exp + w_exp
    for (layer, bn, conv), s in reversed(list(zip(BLOCKS, saved))):
        if conv and d.ndim == 2:
            d = d.reshape(n, -1, *s["sel"].shape[2:])          # Flatten's backward
        d, d_exp = block_backward(d, d_exp, s, want, ids, layer, bn, conv, step)
    # (the last d, the image's error, is not used: qtrain does not compute it)
    return z, z_exp, want, [(s["stats"], s["a8_exp"], s["a8"][0, 0].size * n) for s in saved]


# --- the test -----------------------------------------------------------------------------------

def autograd_nodes(t):
    """The class names of the autograd nodes behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
    return sorted(type(f).__name__ for f in seen)


def test_two_lenet5_paper_steps_equal_int64_oracle():
    """Two int-backend steps of lenet5-paper at N = 4: the logits, every parameter's gradient
    (both conv weights, the fc weights, every norm's gamma and beta), every optimizer state
    after the SGD update with momentum (store codes, store exponent, velocity) and the three
    norms' running mean and L1 deviation equal the numpy int64 oracle bit for bit after each
    step."""
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, size=(N, 28, 28), dtype=np.uint8),
                rng.integers(0, 10, N)) for _ in range(2)]
    torch.manual_seed(0)
    cfg = QConfig(**BITS, seed=SEED)
    net = build("lenet5-paper", "l1", cfg)
    kinds = [type(m) for m in net]
    assert kinds == [QuantBlock, QuantBlock, torch.nn.Flatten, QuantBlock, QuantLinear, Quantize]
    assert all(b.fused for b in net.modules() if isinstance(b, QuantBlock))
    assert net[-1].bits_fwd == 16 and net[-2].bias is None
    convs = [m for m in net.modules() if isinstance(m, QuantConv2d)]
    fcs = [m for m in net.modules() if isinstance(m, QuantLinear)]
    bns = [m for m in net.modules() if isinstance(m, (L1BatchNorm2d, L1BatchNorm1d))]
    assert [c.weight.shape[:2] for c in convs] == [(32, 1), (64, 32)]
    assert [f.weight.shape for f in fcs] == [(512, 1024), (10, 512)]
    assert [type(b) for b in bns] == [L1BatchNorm2d, L1BatchNorm2d, L1BatchNorm1d]
    params = {"conv0.w": convs[0].weight, "conv1.w": convs[1].weight,
              "fc0.w": fcs[0].weight, "fc1.w": fcs[1].weight}
    ids = {name: layer.grad_ids[0] for name, layer in zip(params, convs + fcs)}
    for i, bn in enumerate(bns):
        params[f"bn{i}.g"], params[f"bn{i}.b"] = bn.weight, bn.bias
        ids[f"bn{i}.g"], ids[f"bn{i}.b"] = bn.grad_ids
    assert len(params) == len(list(net.parameters())) == 10
    opt = QSGD(net.parameters(), lr=LR, momentum=MOMENTUM, qconfig=cfg)

    stores, velocity = initial_stores(params, opt)
    run_mean, run_dev = initial_running(bns)
    mom_q = round(BN_MOMENTUM * (1 << 16))
    lr_q, sgd_mom_q = round(LR / N * (1 << LR_BITS)), round(MOMENTUM * (1 << 16))

    for step, (images, labels) in enumerate(batches):
        # ---- qtrain: one step
        assert net.qstate.step == step
        logits_t = net(to_input(images))
        nodes = autograd_nodes(logits_t)  # the int backend's fused nodes ran
        assert nodes.count("_ConvBlockFnBackward") == 2, nodes
        assert nodes.count("_LinearBlockFnBackward") == 1, nodes
        cross_entropy(logits_t, torch.from_numpy(labels.astype(np.int64)), cfg).backward()
        grads = {name: p.grad.detach().clone() for name, p in params.items()}
        opt.step(batch_size=len(labels))
        opt.zero_grad()
        net.qstate.step += 1

        # ---- the oracle
        z, z_exp, want, bn_stats = oracle_step(images, labels, stores, ids, step)
        if step == 0:  # the pool's tie rule is in force: the last largest gives other grads
            last = oracle_step(images, labels, stores, ids, step, first=False)[2]
            assert any(not np.array_equal(last[k][0], want[k][0]) for k in want)
        assert np.array_equal(codes_of(logits_t, z_exp), z), f"logits, step {step}"
        assert len(want) == len(params)
        for name, (g, g_exp) in want.items():
            assert np.abs(g).max() > 0, f"{name} grad is zero, step {step}"
            assert np.array_equal(codes_of(grads[name], g_exp), g), f"{name} grad, step {step}"
        check_updates(want, stores, velocity, params, opt, lr_q, sgd_mom_q, step)
        check_running(bns, bn_stats, run_mean, run_dev, mom_q, step)
