"""The integer GEMM path of conv and linear layers (qtrain.intgemm) against the float path: the
same forward containers, input gradients and rounded weight gradients, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkernels import QTensor
from qkernels.ieee import codes_to_f32
from qtrain import intgemm
from qtrain.loss import cross_entropy
from qtrain.models import build
from qtrain.nn import QuantConv2d, QuantLinear
from qtrain.optim import QSGD
from qtrain.quant import QConfig, QState
from qtrain.train import to_input

pytestmark = pytest.mark.skipif(not intgemm.enabled(),
                                reason="torch._int_mm is not exact on this machine")


def codes(shape, exp, gen, extreme=False):
    """A float32 container of 8-bit codes (|code| <= 127) at exponent ``exp``."""
    q = torch.randint(-127, 128, shape, generator=gen)
    if extreme:
        q[0] = 127
    return (q * 2.0 ** exp).float()


class Spy:
    """Counts the integer GEMM calls: products through ``matmul``, through ``limb_products``
    outside of ``matmul`` (a wide conv's input gradient), or an int8 conv's input gradient by
    blocks of images (``_input_grad8``)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.inside = False
        matmul, limb_products = intgemm.matmul, intgemm.limb_products

        def counting(a, b):
            self.calls += 1
            self.inside = True
            try:
                return matmul(a, b)
            finally:
                self.inside = False

        def counting_limbs(a, b):
            self.calls += not self.inside
            return limb_products(a, b)

        def counting_blocks(*args):
            self.calls += 1
            return input_grad8(*args)

        input_grad8 = intgemm._input_grad8
        monkeypatch.setattr(intgemm, "matmul", counting)
        monkeypatch.setattr(intgemm, "limb_products", counting_limbs)
        monkeypatch.setattr(intgemm, "_input_grad8", counting_blocks)


def run_layer(make, x, gy, weight, first: bool):
    """Forward and backward of a fresh layer: output, input gradient, weight gradient."""
    layer = make()
    with torch.no_grad():
        layer.weight.copy_(weight)
    x = x.clone().requires_grad_(not first)
    y = layer(x)
    y.backward(gy)
    return y.detach(), (None if first else x.grad), layer.weight.grad


def both_paths(make, x, gy, weight, first=False, monkeypatch=None):
    spy = Spy(monkeypatch)
    got = run_layer(make, x, gy, weight, first)
    assert spy.calls == (2 if first else 3), "the integer GEMM did not run"
    with intgemm.float_gemm():
        want = run_layer(make, x, gy, weight, first)
    assert spy.calls == (2 if first else 3), "float_gemm() still ran the integer GEMM"
    return got, want


def assert_same(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype and torch.equal(g, w)


CONVS = [  # (N, C, H, W), O, kernel, stride, padding
    ((8, 1, 28, 28), 6, 5, 1, 0), ((4, 6, 12, 12), 16, 5, 1, 0), ((3, 3, 9, 7), 5, (3, 2),
                                                                   (2, 1), (1, 0)),
    ((2, 4, 8, 8), 8, 3, 2, 1), ((2, 64, 6, 6), 40, 5, 1, 2)]  # last: float64 on the float path


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("shape, o, k, stride, pad", CONVS)
def test_conv_gemm_equals_the_float_path(shape, o, k, stride, pad, first, monkeypatch):
    gen = torch.Generator().manual_seed(sum(shape) + o)
    q = QConfig(seed=5)
    make = (lambda: QuantConv2d(shape[1], o, k, stride, pad, bias=False, qconfig=q,
                                qstate=QState()))
    weight = torch.randn(make().weight.shape, generator=gen)
    x = codes(shape, -7, gen, extreme=True)
    out_shape = make()(x).shape
    gy = codes(out_shape, -11, gen, extreme=True)
    got, want = both_paths(make, x, gy, weight, first, monkeypatch)
    assert_same(got, want)


@pytest.mark.parametrize("images_per_block", [1, 3, 8])
def test_conv_input_grad_by_blocks_of_images(images_per_block, monkeypatch):
    """The int8 input gradient's blocks of images (a shorter last one: 8 = 3 + 3 + 2) give the
    float path's input gradient."""
    shape, o, k = (8, 6, 12, 12), 16, 5
    per_image = 4 * 6 * k * k * 8 * 8  # bytes of one image's int32 products
    monkeypatch.setattr(intgemm, "BLOCK_BYTES", images_per_block * per_image)
    gen = torch.Generator().manual_seed(7)
    q = QConfig(seed=5)
    make = lambda: QuantConv2d(6, o, k, bias=False, qconfig=q, qstate=QState())  # noqa: E731
    weight = torch.randn(make().weight.shape, generator=gen)
    x = codes(shape, -7, gen, extreme=True)
    gy = codes((8, o, 8, 8), -11, gen, extreme=True)
    blocks = []
    col2im_add = intgemm.col2im_add
    monkeypatch.setattr(intgemm, "col2im_add",
                        lambda cols, out, *a: blocks.append(len(out)) or col2im_add(cols, out, *a))
    got, want = both_paths(make, x, gy, weight, monkeypatch=monkeypatch)
    assert blocks == {1: [1] * 8, 3: [3, 3, 2], 8: [8]}[images_per_block]
    assert_same(got, want)


@pytest.mark.parametrize("batch_shape", [(16,), (3, 5)])
def test_linear_gemm_equals_the_float_path(batch_shape, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q = QConfig(seed=2)
    make = lambda: QuantLinear(1024, 48, bias=False, qconfig=q, qstate=QState())  # noqa: E731
    weight = torch.randn(48, 1024, generator=gen) * 0.05
    x = codes(batch_shape + (1024,), -7, gen, extreme=True)
    gy = codes(batch_shape + (48,), -9, gen)
    got, want = both_paths(make, x, gy, weight, monkeypatch=monkeypatch)
    assert_same(got, want)


def test_rounded_sums_agree_beyond_float32_integers(monkeypatch):
    """Products of 1,600 extreme codes pass 2**24: both paths round the exact sum to the same
    float32 (nearest even), so the containers still agree."""
    q = QConfig()
    make = lambda: QuantConv2d(64, 4, 5, bias=False, qconfig=q, qstate=QState())  # noqa: E731
    x = torch.full((2, 64, 5, 5), 127 * 2.0 ** -7)
    weight = torch.full((4, 64, 5, 5), 127 / 128)
    weight[0, 0, 0, 0] = 126 / 128  # a sum that is odd: not a float32 value
    gy = torch.full((2, 4, 1, 1), 2.0 ** -8)
    got, want = both_paths(make, x, gy, weight, True, monkeypatch)
    assert_same(got, want)
    exact = (1600 * 127 * 127 - 127)
    assert exact > 1 << 24 and float(got[0][0, 0, 0, 0]) * 2 ** 14 != exact


def test_containers_that_are_not_8bit_codes_take_the_float_path(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q = QConfig()
    make = lambda: QuantConv2d(2, 3, 3, bias=False, qconfig=q, qstate=QState())  # noqa: E731
    x = torch.randn(2, 2, 6, 6, generator=gen)  # not codes of 8 bits
    weight = torch.randn(3, 2, 3, 3, generator=gen)
    spy = Spy(monkeypatch)
    y = make()
    with torch.no_grad():
        y.weight.copy_(weight)
    out = y(x)
    assert spy.calls == 0
    with intgemm.float_gemm():
        ref = make()
        with torch.no_grad():
            ref.weight.copy_(weight)
        assert torch.equal(out, ref(x))


def test_long_dot_products_are_split_and_summed_in_int64(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    a = torch.randint(-127, 128, (5, 300), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (300, 7), generator=gen, dtype=torch.int8)
    a[:] = 127
    b[:] = 127
    want = a.long() @ b.long()
    monkeypatch.setattr(intgemm, "MAX_TERMS", 64)
    got = intgemm.matmul(a, b)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_an_inexact_int_mm_turns_the_gemm_off(monkeypatch):
    monkeypatch.setattr(intgemm, "_int_mm_exact", lambda: False)
    assert not intgemm.enabled()
    spy = Spy(monkeypatch)
    layer = QuantLinear(8, 4, bias=False, qconfig=QConfig(), qstate=QState())
    layer(torch.ones(3, 8) * 2.0 ** -7).sum().backward()
    assert spy.calls == 0


# --- codes of 9..16 bits: int8 limbs ------------------------------------------------------------


def wide_codes(shape, exp, gen, peak=32767):
    """A float32 container of 16-bit codes (|code| <= 32767) at ``exp``, the extremes included
    (the largest, above ``split_limbs``' LIMB_PEAK, needs the offset)."""
    q = torch.randint(-32767, 32768, shape, generator=gen).clamp_(max=peak)
    q.view(-1)[0] = peak
    q.view(-1)[-1] = -32767
    return (q * 2.0 ** exp).float()


@pytest.mark.parametrize("peak", [32767, 32000])  # with and without the limbs' offset
@pytest.mark.parametrize("wide_a, wide_b", [(True, True), (True, False), (False, True)])
def test_limb_products_are_exact(peak, wide_a, wide_b):
    gen = torch.Generator().manual_seed(peak + 2 * wide_a + wide_b)
    a = torch.randint(-32767, 32768, (37, 300), generator=gen).clamp_(max=peak)
    b = torch.randint(-32767, 32768, (300, 23), generator=gen).clamp_(max=peak)
    a[0, :], b[:, 0] = peak, peak  # the largest sums of extreme codes
    a[1, :], b[:, 1] = -32767, -32767
    if not wide_a:
        a = torch.randint(-127, 128, a.shape, generator=gen)
    if not wide_b:
        b = torch.randint(-127, 128, b.shape, generator=gen)
    want = a.long() @ b.long()
    to = (lambda t, wide: t.to(torch.int16) if wide else t.to(torch.int8))
    got = intgemm.matmul(to(a, wide_a), to(b, wide_b).t().contiguous().t())
    assert got.dtype == torch.int64 and torch.equal(got, want)
    la, lb = intgemm.operand(to(a, wide_a)), intgemm.operand(to(b, wide_b))
    for m, wide in ((la, wide_a), (lb, wide_b)):
        assert isinstance(m, intgemm.Limbs) == wide
        assert not wide or m.off == (128 if peak > 32639 else 0)
    assert torch.equal(intgemm.matmul(la, lb), want)


@pytest.mark.parametrize("peak", [32767, 32000])
def test_long_limb_products_are_split_and_summed_in_int64(peak):
    """140,000 terms of limb products near 127 * 127 pass 2**31: unsplit, int32 would wrap."""
    k = intgemm.LIMB_TERMS + 8929
    a = torch.full((17, k), peak, dtype=torch.int16)
    b = torch.full((k, 3), -peak, dtype=torch.int16)
    b[:, 1] = peak - 255  # a low limb of 1
    assert 127 * 127 * k > 1 << 31
    assert torch.equal(intgemm.matmul(a, b), a.long() @ b.long())


WIDE = QConfig(bits_w=16, bits_a=16, bits_g=16, bits_e=16, seed=7)


@pytest.mark.parametrize("peak", [32767, 30000])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("shape, o, k, stride, pad", CONVS[:4])
def test_wide_conv_gemm_equals_the_float_path(shape, o, k, stride, pad, first, peak,
                                              monkeypatch):
    """16-bit codes: the limb GEMMs give the float path's (float64 BLAS) containers and
    rounded weight gradients bit for bit, with the limbs' offset and without."""
    gen = torch.Generator().manual_seed(sum(shape) + o + peak)
    make = (lambda: QuantConv2d(shape[1], o, k, stride, pad, bias=False, qconfig=WIDE,
                                qstate=QState()))
    weight = torch.randn(make().weight.shape, generator=gen)
    x = wide_codes(shape, -20, gen, peak)
    gy = wide_codes(make()(x).shape, -25, gen, peak)
    got, want = both_paths(make, x, gy, weight, first, monkeypatch)
    assert_same(got, want)


def test_wide_conv_with_8bit_input_equals_the_float_path(monkeypatch):
    """A first layer: 8-bit pixel codes against 16-bit weights and errors (two limb products)."""
    gen = torch.Generator().manual_seed(11)
    make = lambda: QuantConv2d(1, 6, 5, bias=False, qconfig=WIDE, qstate=QState())  # noqa: E731
    weight = torch.randn(make().weight.shape, generator=gen)
    x = codes((4, 1, 12, 12), -7, gen, extreme=True)
    gy = wide_codes((4, 6, 8, 8), -22, gen)
    got, want = both_paths(make, x, gy, weight, True, monkeypatch)
    assert_same(got, want)


@pytest.mark.parametrize("peak", [32767, 30000])
def test_wide_linear_gemm_equals_the_float_path(peak, monkeypatch):
    gen = torch.Generator().manual_seed(peak)
    make = lambda: QuantLinear(1024, 48, bias=False, qconfig=WIDE, qstate=QState())  # noqa: E731
    weight = torch.randn(48, 1024, generator=gen) * 0.05
    x = wide_codes((16, 1024), -15, gen, peak)
    gy = wide_codes((16, 48), -30, gen, peak)
    got, want = both_paths(make, x, gy, weight, monkeypatch=monkeypatch)
    assert_same(got, want)


# --- codes carried by containers (intgemm.attach) ------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("peak", [0, 1, 5, 64, 127, 128, 300])
def test_a_record_gives_the_codes_reading_the_container_gives(dtype, relu, peak):
    """codes8 from a container's record of codes: the same int8 codes and exponent as reading
    the container (the peak's exponent, codes shifted up to it), or None where its codes do
    not fit int8 either way."""
    if peak > np.iinfo(dtype).max:
        pytest.skip("int8 codes end at 127")
    rng = np.random.default_rng(peak)
    for exp in (-9, 0, 3):
        q = rng.integers(-peak, peak + 1, (3, 4, 5)).astype(dtype)
        q.flat[7], q.flat[8] = peak, -peak
        values = np.maximum(q, 0) if relu else q
        container = torch.from_numpy(codes_to_f32(QTensor(values, exp)))
        read = intgemm.codes8(container)
        held = intgemm.codes8(intgemm.attach(container.clone(), q, exp, relu))
        assert (read is None) == (held is None)
        if read is not None:
            assert held.exp == read.exp and held.q.dtype == torch.int8
            assert torch.equal(held.q, read.q)


def test_a_record_lapses_when_the_container_changes_in_place():
    q = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    t = intgemm.attach(torch.from_numpy(codes_to_f32(QTensor(q, -4))), q, -4)
    view = t.view_as(t)
    held = intgemm._held_codes8(view)  # the record's codes, shifted up to the peak
    assert held.exp == -5 and torch.equal(held.q, torch.from_numpy(q << 1))
    view.mul_(0.5)  # through the view: the base's version moves too
    for c in (intgemm.codes8(t), intgemm.codes8(view)):
        assert c.exp == -6 and torch.equal(c.q, torch.from_numpy(q << 1))  # read: halved
    assert intgemm._held_codes8(t) is False and intgemm._held_codes8(view) is False


def train_steps(model: str, steps: int) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    qconfig = QConfig(backend="int", bits_w=8, bits_a=8, bits_g=8, bits_e=8)
    net = build(model, "l1", qconfig)
    opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=qconfig)
    for _ in range(steps):
        x = to_input(rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
        loss = cross_entropy(net(x), torch.from_numpy(rng.integers(0, 10, 16)), qconfig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(batch_size=16)
        net.qstate.step += 1
    return net.state_dict()


def test_training_with_records_equals_training_without(monkeypatch):
    """A few steps of LeNet-5 give the same weights, norms and running statistics bit for bit
    whether the containers carry their codes or every layer reads them again; and the
    records were used (the input image, the blocks' outputs and the weights)."""
    used = []
    held_codes8 = intgemm._held_codes8

    def counting(t):
        c = held_codes8(t)
        used.append(c is not False)
        return c

    monkeypatch.setattr(intgemm, "_held_codes8", counting)
    with_records = train_steps("lenet5", 3)
    assert sum(used) == 3 * 10  # per step: 5 layers' inputs and weights (errors: none)
    monkeypatch.setattr(intgemm, "attach", lambda t, *args, **kw: t)
    without = train_steps("lenet5", 3)
    assert with_records.keys() == without.keys()
    for key, value in with_records.items():
        assert torch.equal(value, without[key]), key
