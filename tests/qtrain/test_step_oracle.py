"""Two full training steps of a small MLP with L1BN and a biased classifier (int backend)
against a numpy int64 oracle.

The oracle below re-derives every integer of the steps from the definitions -- range
exponents, round half up, stochastic rounding from the counter-based stream, exact integer
matrix products, the bias as codes at the accumulators' exponent, the base-2 softmax error, integer SGD with momentum, the BN running statistics
with their dyadic 1/m -- with numpy int64 arrays and Python integers; for the L1BN forward and
backward it calls qkernels' own slow oracle (whose per-channel functions
tests/qkernels/test_l1bn_exact.py checks against exact rationals). Nothing of qtrain's code path
is reused, and the second step starts from the first's weights, velocities and statistics, so
momentum and the running averages are exercised.
"""

import numpy as np
import pytest
import torch

from qkernels import oracle as bn_oracle
from qkernels.optim import LR_BITS
from qtrain.loss import cross_entropy
from qtrain.models import mlp
from qtrain.nn import L1BatchNorm1d, QuantLinear
from qtrain.optim import QSGD
from qtrain.quant import QConfig, Quantize
from qtrain.train import to_input

from . import int64_oracle as oracle
from .int64_oracle import (check_running, check_updates, codes_of, initial_running,
                           initial_stores, int8_view, nearest, range_exp, softmax_error, view)

BITS = dict(bits_w=6, bits_a=8, bits_g=7, bits_e=8)
SEED = 11


# --- the definitions, in numpy int64 (the shared ones in int64_oracle.py) ----------------------

def stochastic(c, exp, bits, step, tensor_id):
    return oracle.stochastic(c, exp, bits, SEED, step, tensor_id)


def per_sample(c, exp, bits):
    """Each row rounded half up at its own range exponent, never below the batch's 16-bit
    range exponent, and written as codes at that exponent."""
    floor = range_exp(c, exp, 16)
    out = np.zeros_like(c)
    q = (1 << (bits - 1)) - 1
    for n, row in enumerate(c):
        e = max(range_exp(row, exp, bits), floor)
        s = e - exp
        y = (row + (1 << (s - 1))) >> s if s > 0 else row << -s
        out[n] = np.clip(y, -q, q) << (e - floor)
    return out, floor


def error_round(c, exp, error_exp):
    """The error quantizers' rounding to ``bits_e``: one exponent for the batch, or one per
    sample."""
    if error_exp == "sample":
        return per_sample(c, exp, BITS["bits_e"])
    return nearest(c, exp, BITS["bits_e"])


# --- the test -----------------------------------------------------------------------------------

LR, MOMENTUM, BN_MOMENTUM = 0.1, 0.9, 0.1


def oracle_step(images, labels, stores, ids, step, error_exp="batch", norm_sr=False,
                out_bits=BITS["bits_a"], channels=False):
    """The forward and backward of one step from the store codes: (logit codes, their exponent,
    {name: (gradient codes, exponent)}, [per BN layer: (statistics, input exponent, m)]).
    ``out_bits``: the width of the norms' output codes and of the activations after the ReLU
    (``bits_a``, or one more for unsigned activations); ``channels``: the norms' inputs round
    each channel at its own exponent (16-bit codes at the tensor's 16-bit exponent)."""
    n = len(labels)
    h, h_exp = (images.astype(np.int64) - 128).clip(-127, 127).reshape(n, -1), -7
    saved = []
    for i in range(2):
        w, w_exp = nearest(*stores[f"lin{i}.w"], BITS["bits_w"])
        if channels:  # the channels as rows: per_sample's rule
            a, a_exp = per_sample((h @ w.T).T, h_exp + w_exp, BITS["bits_a"])
            a8, a8_exp = view(np.ascontiguousarray(a.T), a_exp, 16)
        else:
            a, a_exp = nearest(h @ w.T, h_exp + w_exp, BITS["bits_a"])
            a8, a8_exp = int8_view(a, a_exp)
        gq, gexp = stores[f"bn{i}.g"]
        bq, bexp = stores[f"bn{i}.b"]
        yb, yb_exp, stats = bn_oracle.l1bn_forward_oracle(a8, a8_exp, gq, gexp, bq, bexp,
                                                          out_bits, None, -17)
        out, out_exp = nearest(np.maximum(yb, 0), yb_exp, out_bits)
        saved.append(dict(h=h, h_exp=h_exp, w=w, w_exp=w_exp, a8=a8, a8_exp=a8_exp,
                          stats=stats, yb=yb, gq=gq, gexp=gexp))
        h, h_exp = out, out_exp
    w3, w3_exp = nearest(*stores["lin2.w"], BITS["bits_w"])
    h8, h8_exp = view(h, h_exp, 8 if out_bits <= 8 else 16)  # 9-bit codes: an int16 view
    w8, w8_exp = int8_view(w3, w3_exp)
    acc_exp = h8_exp + w8_exp                  # the accumulators' exponent: the views'
    b, b_exp = stores["lin2.b"]
    s = acc_exp - b_exp                        # the bias on that grid, half up, int32
    bias = (b + (1 << (s - 1))) >> s if s > 0 else b << -s
    bias = np.clip(bias, -(2**31 - 1), 2**31 - 1)
    z, z_exp = nearest(h8.astype(np.int64) @ w8.T.astype(np.int64) + bias, acc_exp, 16)

    err, err_exp = softmax_error(z, z_exp, labels)
    e, e_exp = error_round(err, err_exp, error_exp)
    e_bits = 16 if error_exp == "sample" else BITS["bits_e"]  # the codes the layers receive
    want = {"lin2.w": stochastic(e.T @ h, e_exp + h_exp, BITS["bits_g"], step, ids["lin2.w"]),
            "lin2.b": stochastic(e.sum(axis=0), e_exp, BITS["bits_g"], step, ids["lin2.b"])}
    d, d_exp = e @ w3, e_exp + w3_exp
    for i in (1, 0):
        s = saved[i]
        d, d_exp = error_round(d, d_exp, error_exp)           # block-output quantizer
        d = d * (s["yb"] > 0)                                  # ReLU
        g8, g8_exp = view(d, d_exp, e_bits)
        dx, dx_exp, dgam, dbet = bn_oracle.l1bn_backward_oracle(
            s["a8"], g8, s["stats"], s["gq"], s["gexp"], s["a8_exp"], g8_exp,
            16 if norm_sr else e_bits, None, g8_exp - 16)
        if norm_sr:  # the norm rounds its input's error stochastically, with its own stream
            dx, dx_exp = stochastic(dx, dx_exp, BITS["bits_e"], step, ids[f"bn{i}.e"])
        want[f"bn{i}.g"] = stochastic(dgam, g8_exp - 16, BITS["bits_g"], step, ids[f"bn{i}.g"])
        want[f"bn{i}.b"] = stochastic(dbet, g8_exp, BITS["bits_g"], step, ids[f"bn{i}.b"])
        d, d_exp = error_round(dx, dx_exp, error_exp)         # quantizer after the linear
        want[f"lin{i}.w"] = stochastic(d.T @ s["h"], d_exp + s["h_exp"], BITS["bits_g"],
                                       step, ids[f"lin{i}.w"])
        d, d_exp = d @ s["w"], d_exp + s["w_exp"]
    return z, z_exp, want, [(s["stats"], s["a8_exp"], n) for s in saved]


@pytest.mark.parametrize("error_exp,norm_errors,act_codes,norm_input_exp", [
    ("batch", "nearest", "signed", "tensor"), ("sample", "nearest", "signed", "tensor"),
    ("batch", "stochastic", "signed", "tensor"), ("batch", "nearest", "unsigned", "tensor"),
    ("batch", "nearest", "signed", "channel")])
def test_two_mlp_steps_equal_int64_oracle(error_exp, norm_errors, act_codes, norm_input_exp):
    """Two int-backend steps (errors with one exponent per batch, or per sample; the norms'
    input errors rounded to nearest or stochastically; activations after the ReLU as signed
    or unsigned codes; the norms' inputs with one exponent per tensor or per channel):
    forward (weights, activations, BN, logits), output error, every error and weight
    gradient, the SGD update with momentum (the second step's velocity is not zero), every
    optimizer state (store codes, store exponent, velocity) and the BN running mean and L1
    deviation equal the numpy int64 oracle bit for bit after each step."""
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, size=(24, 28, 28), dtype=np.uint8),
                rng.integers(0, 10, 24)) for _ in range(2)]
    torch.manual_seed(0)
    cfg = QConfig(**BITS, seed=SEED, error_exp=error_exp, norm_errors=norm_errors,
                  act_codes=act_codes, norm_input_exp=norm_input_exp)
    channels = norm_input_exp == "channel"
    norm_sr = norm_errors == "stochastic"
    out_bits = BITS["bits_a"] + (act_codes == "unsigned")
    net = mlp("l1", cfg, hidden=32)
    lin = [m for m in net.modules() if isinstance(m, QuantLinear)]
    lin[2].bias = torch.nn.Parameter(torch.empty(10).uniform_(-0.2, 0.2))  # a biased classifier
    bns = [m for m in net.modules() if isinstance(m, L1BatchNorm1d)]
    assert len([m for m in net.modules() if isinstance(m, Quantize)]) == 5
    params = {"lin0.w": lin[0].weight, "lin1.w": lin[1].weight, "lin2.w": lin[2].weight,
              "lin2.b": lin[2].bias,
              "bn0.g": bns[0].weight, "bn0.b": bns[0].bias,
              "bn1.g": bns[1].weight, "bn1.b": bns[1].bias}
    assert len(params) == len(list(net.parameters()))
    ids = {"lin0.w": lin[0].grad_ids[0], "lin1.w": lin[1].grad_ids[0],
           "lin2.w": lin[2].grad_ids[0], "lin2.b": lin[2].grad_ids[1]}
    for i in range(2):
        ids[f"bn{i}.g"], ids[f"bn{i}.b"] = bns[i].grad_ids
        if norm_sr:
            ids[f"bn{i}.e"] = bns[i].error_id
    opt = QSGD(net.parameters(), lr=LR, momentum=MOMENTUM, qconfig=cfg)

    stores, velocity = initial_stores(params, opt)
    run_mean, run_dev = initial_running(bns)
    mom_q = round(BN_MOMENTUM * (1 << 16))
    lr_q, sgd_mom_q = round(LR / 24 * (1 << LR_BITS)), round(MOMENTUM * (1 << 16))

    for step, (images, labels) in enumerate(batches):
        # ---- qtrain: one step
        assert net.qstate.step == step
        logits_t = net(to_input(images))
        cross_entropy(logits_t, torch.from_numpy(labels.astype(np.int64)), cfg).backward()
        grads = {name: p.grad.detach().clone() for name, p in params.items()}
        opt.step(batch_size=len(labels))
        opt.zero_grad()
        net.qstate.step += 1

        # ---- the oracle
        z, z_exp, want, bn_stats = oracle_step(images, labels, stores, ids, step, error_exp,
                                               norm_sr, out_bits, channels)
        if error_exp == "sample" or norm_sr or out_bits > BITS["bits_a"] or channels:
            # the rule is in force: a gradient differs
            batch = oracle_step(images, labels, stores, ids, step)[2]
            assert any(batch[k][1] != want[k][1] or not np.array_equal(batch[k][0], want[k][0])
                       for k in want)
        assert np.array_equal(codes_of(logits_t, z_exp), z), f"logits, step {step}"
        for name, (g, g_exp) in want.items():
            assert np.array_equal(codes_of(grads[name], g_exp), g), f"{name} grad, step {step}"
        check_updates(want, stores, velocity, params, opt, lr_q, sgd_mom_q, step)
        check_running(bns, bn_stats, run_mean, run_dev, mom_q, step)
    assert all(np.abs(v).max() > 0 for v in velocity.values())
