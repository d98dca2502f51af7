"""The rules that train below 8 bits (issue 11).

* Unsigned activation codes (``act_codes = "unsigned"``): after a ReLU an activation is one of
  ``0 .. 2**bits_a - 1`` (held as signed codes one bit wider), where signed codes leave it
  ``0 .. 2**(bits_a-1) - 1``.
* Per-channel exponents before a norm (``norm_input_exp = "channel"``): each channel of the
  norm's input rounds at its own range exponent, never below the tensor's 16-bit one.

The step's integers against the int64 oracle and between backends are in
test_step_oracle.py, test_train_step.py, test_fused.py and test_export.py; here: the rounding
against a readable oracle, where the wider codes go, that they are used, and the refusals."""

import contextlib
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn

from qtrain import convert
from qtrain.config import UserError, apply_sets, load_recipe
from qtrain.fusion import QuantBlock
from qtrain.models import build
from qtrain.nn import _L1BatchNorm
from qtrain import intgemm
from qtrain.frozen import calibrate_and_freeze
from qtrain.quant import (BACKEND, QConfig, Quantize, QuantStats, nearest_channels,
                          torch_emulation)
from qtrain.train import to_input


def config(bits=4, act_codes="unsigned", **fields):
    return QConfig(bits_w=bits, bits_a=bits, bits_g=8, bits_e=8, act_codes=act_codes, **fields)


def widths(net):
    """(quantizers' forward widths, norms' output widths) in module order."""
    quants = [m.bits_fwd for m in net.modules() if isinstance(m, Quantize)]
    norms = [m.out_bits for m in net.modules() if isinstance(m, _L1BatchNorm)]
    return quants, norms


def test_the_codes_after_each_relu_are_one_bit_wider():
    # lenet5: per block a quantizer before the norm (bits_a) and one after the ReLU; logits 16
    assert widths(build("lenet5", "l1", config())) == ([4, 5] * 4 + [16], [5] * 4)
    assert widths(build("lenet5", "l1", config(act_codes="signed"))) == ([4, 4] * 4 + [16],
                                                                         [4] * 4)
    # no norm: the quantizer before the ReLU feeds it directly, so it rounds wide too
    assert widths(build("lenet5", "none", config()))[0] == [5, 5] * 4 + [16]
    # float L2BN: its input is a signed activation, its output meets the ReLU unquantized
    l2 = QConfig(bits_w=4, bits_a=4, bits_g=8, bits_e=8, backend="emulate",
                 act_codes="unsigned")
    assert widths(build("lenet5", "l2", l2))[0] == [4, 5] * 4 + [16]
    # resnet20: a basic block's second norm feeds the sum with the shortcut, not a ReLU
    quants, norms = widths(build("resnet20", "l1", config()))
    body = build("resnet20", "l1", config())[1].body
    assert [m.out_bits for m in body if isinstance(m, _L1BatchNorm)] == [4]
    assert norms.count(5) == 1 + 9 and norms.count(4) == 9
    assert quants[-2:] == [5, 16]  # after the average pool, and the logits
    # float activations: nothing to widen
    assert QConfig(bits_a=32, backend="emulate", act_codes="unsigned").act_code_bits == 32


@pytest.mark.parametrize("backend", ["int", "emulate"])
def test_a_block_hands_on_unsigned_codes(backend):
    """Every block's output holds codes 0..15 at one exponent, using more than the 8 levels
    signed 4-bit codes could give a non-negative value (fused on int, module by module under
    emulate's torch rounding)."""
    torch.manual_seed(0)
    net = build("lenet5", "l1", config(backend=backend))
    outs = []
    for m in net.modules():
        if isinstance(m, QuantBlock):
            m.register_forward_hook(lambda mod, args, out: outs.append(out.detach().double()))
    x = to_input(np.random.default_rng(0).integers(0, 256, (32, 28, 28), dtype=np.uint8))
    with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
        net(x)
    assert len(outs) == 4
    for y in outs:
        e = int(torch.frexp(y.max())[1]) - 4  # range exponent of 5-bit codes
        codes = y * 2.0 ** -e
        assert torch.equal(codes, codes.round()) and codes.min() == 0 and codes.max() <= 15
        assert len(torch.unique(codes)) > 8


def test_conversion_widens_what_a_relu_follows():
    float_net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 6, 5), nn.ReLU(), nn.Flatten(), nn.Linear(96, 10))
    net = convert(float_net, config())
    assert widths(net) == ([4, 5, 5, 16], [5])


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="act_codes 'positive' is not one of signed, unsigned"):
        config(act_codes="positive")
    with pytest.raises(ValueError, match="use bits_a <= 15 or act_codes signed"):
        QConfig(bits_a=16, act_codes="unsigned")
    with pytest.raises(ValueError, match="set act_codes signed"):
        QConfig(bits_w=2, scheme="wage", act_codes="unsigned")
    QConfig(bits_w=32, bits_a=32, bits_g=32, bits_e=32, act_codes="unsigned")  # float: fine
    with pytest.raises(UserError, match="act_codes 'yes'"):
        apply_sets(load_recipe("lenet5-fmnist"), ["act_codes=yes"])


# --- per-channel exponents before a norm -----------------------------------------------------


def channel_oracle(x: np.ndarray, bits: int) -> tuple[list, int, int]:
    """Each channel (axis 1) rounded half up at ``max(E_c - (bits-1), floor)``, ``floor`` the
    tensor's 16-bit range exponent, saturated, in exact rationals: (values, saturated,
    nonzero values rounded to zero)."""
    def top(values):  # binary exponent E with max|v| < 2**E
        peak = max(abs(Fraction(float(v))) for v in values.ravel())
        e = 0
        while peak >= Fraction(2) ** e:
            e += 1
        while peak < Fraction(2) ** (e - 1):
            e -= 1
        return e
    floor = top(x) - 15
    qmax = 2 ** (bits - 1) - 1
    out, saturated, zeroed = np.empty(x.shape, dtype=object), 0, 0
    for c in range(x.shape[1]):
        chan = x[:, c]
        e = floor if not chan.any() else max(top(chan) - (bits - 1), floor)
        for idx in np.ndindex(chan.shape):
            v = Fraction(float(chan[idx]))
            q = (v / Fraction(2) ** e + Fraction(1, 2)).__floor__()
            saturated += abs(q) > qmax
            q = max(-qmax, min(qmax, q))
            zeroed += v != 0 and q == 0
            out[(idx[0], c) + idx[1:]] = q * Fraction(2) ** e
    return out, saturated, zeroed


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("backend", ["int", "emulate"])
def test_nearest_channels_equals_the_oracle(bits, backend):
    """Channels of very different ranges (one all zero, one 20 binary orders below the
    largest: it rounds at the floor), values and counts as the rational oracle's, on both
    backends (emulate: its own torch rounding)."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 6, 3, 3, generator=g)
    x *= torch.exp2(torch.tensor([0.0, -3.0, 4.0, -20.0, 1.0, 0.0])).view(1, 6, 1, 1)
    x[:, 5] = 0
    want, saturated, zeroed = channel_oracle(x.numpy(), bits)
    stats = QuantStats()
    with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
        got = nearest_channels(x, bits, BACKEND[backend], stats)
    assert [Fraction(float(v)) for v in got.numpy().ravel()] == list(want.ravel())
    assert (stats.saturated, stats.zeroed, stats.total) == (saturated, zeroed, x.numel())
    assert zeroed > 0  # the channel at the floor loses values


def test_requantize_channels_equals_nearest_channels_on_the_container():
    """The fused conv block's rounding of int32 accumulators (O, N, ...) gives the codes and
    counts nearest_channels gives on the (N, O, ...) float32 container of the same values,
    at the norm's 16-bit view of that container."""
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**20, 2**20, (4, 3, 5, 5), generator=g, dtype=torch.int32)
    acc[1] >>= 12
    acc[2] = 0
    codes, counts = intgemm.requantize_channels(acc, -9, 4)
    stats = QuantStats()
    container = nearest_channels((acc.double() * 2.0 ** -9).float().movedim(0, 1).contiguous(),
                                 4, BACKEND["int"], stats)
    assert codes.q.dtype == np.int16
    assert np.array_equal(np.ldexp(codes.q.astype(np.float64), codes.exp),
                          container.double().numpy())
    assert counts == (stats.saturated, stats.zeroed, stats.total)


def test_the_quantizer_before_each_norm_takes_channel_exponents():
    net = build("lenet5", "l1", config(norm_input_exp="channel"))
    assert [m.channels for m in net.modules() if isinstance(m, Quantize)] == \
        [True, False] * 4 + [False]
    assert not any(m.channels for m in build("lenet5", "none", config(
        norm_input_exp="channel")).modules() if isinstance(m, Quantize))
    float_net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    assert [m.channels for m in convert(float_net, config(norm_input_exp="channel")).modules()
            if isinstance(m, Quantize)] == [True, False, False]
    assert config(norm_input_exp="channel").norm_in_bits == 16
    assert config().norm_in_bits == 4


def test_channel_exponents_are_refused_where_unsupported():
    with pytest.raises(ValueError, match="norm_input_exp 'sample' is not one of tensor, channel"):
        config(norm_input_exp="sample")
    with pytest.raises(ValueError, match="set norm_input_exp tensor"):
        QConfig(bits_w=2, scheme="wage", norm_input_exp="channel")
    torch.manual_seed(0)
    net = build("lenet5", "l1", config(norm_input_exp="channel"))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="frozen inference does not support yet"):
        calibrate_and_freeze(net, pixels)
