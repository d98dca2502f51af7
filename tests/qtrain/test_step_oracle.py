"""One full training step of a small MLP with L1BN (int backend) against a numpy int64 oracle.

The oracle below re-derives every integer of the step from the definitions -- range
exponents, round half up, stochastic rounding from the counter-based stream, exact integer
matrix products, the base-2 softmax error, integer SGD -- with numpy int64 arrays and Python
integers; for L1BN it calls qkernels' own slow oracle. Nothing of qtrain's code path is reused.
"""

import numpy as np
import torch

from qkernels import oracle as bn_oracle
from qkernels.l1bn import running_update
from qkernels.loss import EXP2_TABLE
from qkernels.optim import LR_BITS, lr_code, momentum_code
from qkernels.rng import random_u64_np, stream_key_np
from qtrain.loss import cross_entropy
from qtrain.models import mlp
from qtrain.nn import L1BatchNorm1d, QuantLinear
from qtrain.optim import QSGD
from qtrain.quant import QConfig, Quantize
from qtrain.train import to_input

BITS = dict(bits_w=6, bits_a=8, bits_g=7, bits_e=8)
SEED = 11


# --- the definitions, in numpy int64 -----------------------------------------------------------

def range_exp(c, exp, bits):
    top = int(np.abs(c).max()) if c.size else 0
    return exp if top == 0 else top.bit_length() + exp - (bits - 1)


def nearest(c, exp, bits):
    e = range_exp(c, exp, bits)
    s = e - exp
    y = (c + (1 << (s - 1))) >> s if s > 0 else c << -s
    q = (1 << (bits - 1)) - 1
    return np.clip(y, -q, q), e


def stochastic(c, exp, bits, step, tensor_id):
    e = range_exp(c, exp, bits)
    up = exp - e + 24
    w = c << up if up >= 0 else c >> -up
    key = stream_key_np(SEED, step, tensor_id)
    r = (random_u64_np(key, np.arange(c.size, dtype=np.uint64)) >> np.uint64(40)).astype(np.int64)
    q = (1 << (bits - 1)) - 1
    return np.clip((w + r.reshape(c.shape)) >> 24, -q, q), e


def int8_view(c, exp):
    """The kernels' representation of <= 8-bit codes: exponent E - 7."""
    e = range_exp(c, exp, 8)
    return (c << (exp - e)).astype(np.int8), e


def softmax_error(z, z_exp, labels):
    d = z - z.max(axis=1, keepdims=True)
    shift = z_exp + 10
    t = d << shift if shift >= 0 else (d + (1 << (-shift - 1))) >> -shift
    whole = -(t >> 10)
    v = np.where(whole < 63, EXP2_TABLE[t & 1023] >> np.minimum(whole, 62), 0)
    recip = (1 << 46) // v.sum(axis=1, keepdims=True)
    p = (v * recip) >> 30
    return p - (np.eye(z.shape[1], dtype=np.int64)[labels] << 16), -16


def sgd(w, v, g, g_exp, w_exp, lr_q, mom_q, bits=24):
    def rshift(x, s):
        return x << -s if s <= 0 else (x + (1 << (s - 1))) >> s
    vmax, q = 1 << 38, (1 << (bits - 1)) - 1
    v = np.clip(rshift(mom_q * v, 16) + np.clip(rshift(g, w_exp - g_exp), -vmax, vmax),
                -vmax, vmax)
    w = w - rshift(lr_q * v, LR_BITS)
    s = 0  # the store's exponent rises until every code fits
    while np.abs(rshift(w, s)).max() > q:
        s += 1
    return rshift(w, s), rshift(v, s), w_exp + s


def codes_of(t, exp):
    c = t.detach().double().numpy() * 2.0 ** -exp
    assert np.array_equal(c, np.round(c))
    return c.astype(np.int64)


def store_exp(t):
    return int(torch.frexp(t.detach().abs().max()).exponent) + 2 - 23


# --- the test -----------------------------------------------------------------------------------

def test_full_mlp_step_equals_int64_oracle():
    """Forward (weights, activations, BN, logits), output error, every error and weight
    gradient, the SGD update and the BN running statistics of one int-backend step equal the
    numpy int64 oracle bit for bit."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 24)
    torch.manual_seed(0)
    cfg = QConfig(**BITS, seed=SEED)
    net = mlp("l1", cfg, hidden=32)
    lin = [m for m in net if isinstance(m, QuantLinear)]
    bns = [m for m in net if isinstance(m, L1BatchNorm1d)]
    quants = [m for m in net if isinstance(m, Quantize)]
    opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=cfg)

    # the optimizer's store (initial exponent: 4x headroom) as the oracle sees it
    stores = {}
    for p in net.parameters():
        e = store_exp(p) if p.abs().max() > 0 else 1 + 2 - 23
        stores[p] = (np.floor(p.detach().double().numpy() * 2.0 ** -e + 0.5).astype(np.int64), e)
    with torch.no_grad():
        for p in net.parameters():
            opt._store(p, opt.state[p])
            assert opt.state[p]["store_exp"] == stores[p][1]
            assert np.array_equal(codes_of(p, stores[p][1]), stores[p][0])

    # ---- qtrain: one step
    x = to_input(images)
    y = torch.from_numpy(labels.astype(np.int64))
    logits_t = net(x)
    cross_entropy(logits_t, y, cfg).backward()
    grads = {p: p.grad.detach().clone() for p in net.parameters()}
    opt.step(batch_size=len(labels))

    # ---- oracle: forward
    h, h_exp = (images.astype(np.int64) - 128).clip(-127, 127).reshape(24, -1), -7
    saved = []
    for i in range(2):
        w, w_exp = nearest(*stores[lin[i].weight], BITS["bits_w"])
        acc, acc_exp = h @ w.T, h_exp + w_exp
        a, a_exp = nearest(acc, acc_exp, BITS["bits_a"])
        a8, a8_exp = int8_view(a, a_exp)
        bn = bns[i]
        gq, gexp = stores[bn.weight]
        bq, bexp = stores[bn.bias]
        yb, yb_exp, stats = bn_oracle.l1bn_forward_oracle(a8, a8_exp, gq, gexp, bq, bexp,
                                                          BITS["bits_a"], None, -17)
        r = np.maximum(yb, 0)
        out, out_exp = nearest(r, yb_exp, BITS["bits_a"])
        saved.append(dict(h=h, h_exp=h_exp, w=w, w_exp=w_exp, a8=a8, a8_exp=a8_exp,
                          stats=stats, yb=yb, gq=gq, gexp=gexp))
        h, h_exp = out, out_exp
    w3, w3_exp = nearest(*stores[lin[2].weight], BITS["bits_w"])
    z, z_exp = nearest(h @ w3.T, h_exp + w3_exp, 16)
    assert np.array_equal(codes_of(logits_t, z_exp), z)

    # ---- oracle: backward
    step = 0
    err, err_exp = softmax_error(z, z_exp, labels)
    e, e_exp = nearest(err, err_exp, BITS["bits_e"])
    want = {}
    want[lin[2].weight] = stochastic(e.T @ h, e_exp + h_exp, BITS["bits_g"], step,
                                     lin[2].grad_ids[0])
    d, d_exp = e @ w3, e_exp + w3_exp
    for i in (1, 0):
        s = saved[i]
        d, d_exp = nearest(d, d_exp, BITS["bits_e"])          # block-output quantizer
        d = d * (s["yb"] > 0)                                  # ReLU
        g8, g8_exp = int8_view(d, d_exp)
        dx, dx_exp, dgam, dbet = bn_oracle.l1bn_backward_oracle(
            s["a8"], g8, s["stats"], s["gq"], s["gexp"], s["a8_exp"], g8_exp, BITS["bits_e"],
            None, g8_exp - 16)
        bn = bns[i]
        want[bn.weight] = stochastic(dgam, g8_exp - 16, BITS["bits_g"], step, bn.grad_ids[0])
        want[bn.bias] = stochastic(dbet, g8_exp, BITS["bits_g"], step, bn.grad_ids[1])
        d, d_exp = nearest(dx, dx_exp, BITS["bits_e"])        # quantizer after the linear
        want[lin[i].weight] = stochastic(d.T @ s["h"], d_exp + s["h_exp"], BITS["bits_g"],
                                         step, lin[i].grad_ids[0])
        d, d_exp = d @ s["w"], d_exp + s["w_exp"]
    for p, (g, g_exp) in want.items():
        assert np.array_equal(codes_of(grads[p], g_exp), g), p.shape

    # ---- oracle: update and running statistics
    lr_q, mom_q = lr_code(0.1 / len(labels)), momentum_code(0.9)
    for p, (g, g_exp) in want.items():
        w_new, _, w_exp = sgd(stores[p][0], np.zeros_like(g), g, g_exp, stores[p][1], lr_q,
                              mom_q)
        assert opt.state[p]["store_exp"] == w_exp
        assert np.array_equal(codes_of(p, w_exp), w_new), p.shape
    for i, bn in enumerate(bns):
        mean = np.zeros(bn.num_features, np.int64)
        dev = np.full(bn.num_features, 1 << 24, np.int64)  # running_dev starts at 1.0
        st = saved[i]["stats"]
        table = np.zeros((bn.num_features, 9), np.int64)
        table[:, 0], table[:, 1] = st["sum"], st["dev"]
        running_update(mean, dev, table, 24, saved[i]["a8_exp"], momentum_code(0.1))
        assert np.array_equal(bn._codes_of(bn.running_mean), mean)
        assert np.array_equal(bn._codes_of(bn.running_dev), dev)
    assert len(quants) == 5
