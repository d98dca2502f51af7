"""The integer definitions the step oracles share (test_step_oracle.py, the MLP, and
test_step_oracle_conv.py, the paper's LeNet-5), in numpy int64 arrays and Python integers:
range exponents, round half up, stochastic rounding from the counter-based stream, the kernels'
int8/int16 views, the base-2 softmax error, integer SGD with momentum and the BN running
statistics. Nothing of qtrain's code path is used."""

import numpy as np
import torch

from qkernels.loss import EXP2_TABLE
from qkernels.optim import LR_BITS
from qkernels.rng import random_u64_np, stream_key_np


def range_exp(c, exp, bits):
    top = int(np.abs(c).max()) if c.size else 0
    return exp if top == 0 else top.bit_length() + exp - (bits - 1)


def nearest(c, exp, bits):
    e = range_exp(c, exp, bits)
    s = e - exp
    y = (c + (1 << (s - 1))) >> s if s > 0 else c << -s
    q = (1 << (bits - 1)) - 1
    return np.clip(y, -q, q), e


def stochastic(c, exp, bits, seed, step, tensor_id):
    """Round to ``bits`` stochastically: 24 random bits per element from the stream keyed by
    ``(seed, step, tensor_id)``, added below the kept bits."""
    e = range_exp(c, exp, bits)
    up = exp - e + 24
    w = c << up if up >= 0 else c >> -up
    key = stream_key_np(seed, step, tensor_id)
    r = (random_u64_np(key, np.arange(c.size, dtype=np.uint64)) >> np.uint64(40)).astype(np.int64)
    q = (1 << (bits - 1)) - 1
    return np.clip((w + r.reshape(c.shape)) >> 24, -q, q), e


def view(c, exp, bits):
    """The kernels' representation of codes of up to 8 bits (int8, exponent E - 7) or 16
    bits (int16, exponent E - 15)."""
    e = range_exp(c, exp, bits)
    return (c << (exp - e)).astype(np.int8 if bits <= 8 else np.int16), e


def int8_view(c, exp):
    return view(c, exp, 8)


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
    """torch's SGD with momentum on integer codes (docs section 8): velocity and store rounded
    half up, the store's exponent rising until every code fits."""
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


def running(old, batch_num, m_power, m, x_exp, mom_q):
    """One running-statistics update (docs/l1bn-integer.md section 7), on Python integers:
    the batch statistic num/m**k (k = 1: mean S/m, k = 2: deviation D/m**2) through the dyadic
    1/m = 2**62 // mant (31-bit mantissas, truncating), rounded half up to RUN_EXP = -24 codes,
    then old + round(mom_q * (batch - old) / 2**16), everything saturated at 2**44."""
    def norm(v, e):
        if v == 0:
            return 0, 0
        b = abs(v).bit_length()
        a = abs(v) >> (b - 31) if b > 31 else abs(v) << (31 - b)
        return (a if v > 0 else -a), e + b - 31

    def mul(a, b):
        return norm(a[0] * b[0], a[1] + b[1])

    mm, me = norm(m, 0)
    inv = norm((1 << 62) // mm, -62 - me)
    v = norm(batch_num, 0)
    for _ in range(m_power):
        v = mul(v, inv)
    s = v[1] + x_exp + 24
    if v[0] and s + abs(v[0]).bit_length() > 62:
        batch = (1 << 62) if v[0] > 0 else -(1 << 62)
    else:
        batch = v[0] << s if s >= 0 else (v[0] + (1 << (-s - 1))) >> -s
    lim = 1 << 44
    old = max(-lim, min(lim, old))
    delta = max(-lim, min(lim, batch)) - old
    return max(-lim, min(lim, old + ((mom_q * delta + (1 << 15)) >> 16)))


def codes_of(t, exp):
    c = t.detach().double().numpy() * 2.0 ** -exp
    assert np.array_equal(c, np.round(c))
    return c.astype(np.int64)


def store_exp(t):
    return int(torch.frexp(t.detach().abs().max()).exponent) + 2 - 23


def initial_stores(params, opt):
    """The optimizer's stores as the oracle sees them -- codes at the initial exponent (4x
    headroom above each parameter's largest magnitude) -- checked against QSGD's first snap
    of each parameter: ({name: (codes, exponent)}, {name: zero velocity})."""
    stores, velocity = {}, {}
    for name, p in params.items():
        e = store_exp(p) if p.abs().max() > 0 else 1 + 2 - 23
        stores[name] = (np.floor(p.detach().double().numpy() * 2.0 ** -e + 0.5)
                        .astype(np.int64), e)
        velocity[name] = np.zeros(p.shape, np.int64)
    with torch.no_grad():
        for name, p in params.items():
            opt._store(p, opt.state[p])
            assert opt.state[p]["store_exp"] == stores[name][1], f"{name} initial store_exp"
            assert np.array_equal(codes_of(p, stores[name][1]), stores[name][0]), \
                f"{name} initial store"
    return stores, velocity


def check_updates(want, stores, velocity, params, opt, lr_q, mom_q, step):
    """Apply the oracle's SGD to each parameter's store with its gradient ``want[name]`` and
    check the optimizer's store exponent, store codes and velocity against it; ``stores``
    and ``velocity`` are updated in place."""
    for name, (g, g_exp) in want.items():
        w, v, e = sgd(stores[name][0], velocity[name], g, g_exp, stores[name][1], lr_q, mom_q)
        stores[name], velocity[name] = (w, e), v
        state = opt.state[params[name]]
        assert state["store_exp"] == e, f"{name} store_exp, step {step}"
        assert np.array_equal(codes_of(params[name], e), w), f"{name} store, step {step}"
        assert np.array_equal(state["velocity"].numpy(), v), f"{name} velocity, step {step}"


def initial_running(bns):
    """The norms' running statistics as codes at -24 when training starts: every mean 0,
    every deviation 1.0 (``running_mean``, ``running_dev``: one list per norm)."""
    return [[0] * bn.num_features for bn in bns], [[1 << 24] * bn.num_features for bn in bns]


def check_running(bns, bn_stats, run_mean, run_dev, mom_q, step):
    """Update each norm's running statistics with :func:`running` from its batch statistics
    (``bn_stats``: per norm its statistics, input exponent and codes per channel ``m``) and
    check the norm's own against them; ``run_mean`` and ``run_dev`` are updated in place."""
    for i, (bn, (stats, x_exp, m)) in enumerate(zip(bns, bn_stats)):
        for c in range(bn.num_features):
            run_mean[i][c] = running(run_mean[i][c], int(stats["sum"][c]), 1, m, x_exp, mom_q)
            run_dev[i][c] = running(run_dev[i][c], int(stats["dev"][c]), 2, m, x_exp, mom_q)
        assert bn._codes_of(bn.running_mean).tolist() == run_mean[i], \
            f"bn{i} running mean, step {step}"
        assert bn._codes_of(bn.running_dev).tolist() == run_dev[i], \
            f"bn{i} running dev, step {step}"
