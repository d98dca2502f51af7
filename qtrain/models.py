"""Models of the paper and of WAGE, built from qtrain's layers.

Every model takes ``norm`` in {"l1", "l2", "none"} and an optional :class:`QConfig`. A
quantized block is ``conv -> Quantize -> norm -> ReLU [-> pool] -> Quantize``: the first
quantizer rounds the exact accumulator to ``bits_a`` (and the error coming back to ``bits_e``),
the second hands the next layer ``bits_a`` codes (unsigned ones, one bit more than signed,
with ``act_codes = "unsigned"``) and rounds the (wide) error from it to ``bits_e``. The last
layer's logits are rounded to 16 bits for the loss. In a float network the quantizers are
absent, and the classifier has a bias; a quantized built-in network's classifier has none (a
converted float network keeps its biases, quantized: :mod:`qtrain.conversion`).

* ``lenet5``: the paper's LeNet-5 for 28x28 inputs: conv5x5 6, pool, conv5x5 16, pool, fc 120,
  fc 84, fc 10, with BN after every conv and hidden fc.
* ``lenet5-paper``: the network the paper and WAGE call LeNet-5, as the authors' code defines it
  (581,408 weights without BN): conv5x5 32, pool, conv5x5 64, pool, fc 512, fc 10, no padding,
  with BN after both convs and the hidden fc.
* ``mlp``: 784-256-256-10 with BN after each hidden layer.
* ``vgg7``: WAGE's 2x128C3-MP-2x256C3-MP-2x512C3-MP-1024FC-10 for 32x32x3 inputs.
* ``resnet20``: He et al.'s CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels,
  option-A shortcuts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fusion import fuse
from .loss import LOGIT_BITS
from .nn import L1BatchNorm1d, L1BatchNorm2d, QuantConv2d, QuantLinear, QuantMaxPool2d
from .quant import QConfig, QState, Quantize
from .spec import MODELS as MODEL_NAMES
from .spec import NORMS, backend_problem, scheme_problem


class _Parts:
    """Layer factories bound to one network's qconfig, shared state and norm."""

    def __init__(self, norm: str, qconfig: QConfig | None):
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
        if qconfig is not None and (problem := backend_problem(
                (qconfig.bits_w, qconfig.bits_a, qconfig.bits_g, qconfig.bits_e),
                qconfig.backend, norm)):
            raise ValueError(problem)
        if qconfig is not None and (problem := scheme_problem(
                qconfig.scheme, (qconfig.bits_w, qconfig.bits_a, qconfig.bits_g, qconfig.bits_e),
                norm, qconfig.stochastic_errors)):
            raise ValueError(problem)
        self.norm = norm
        self.qconfig = qconfig if qconfig is not None and qconfig.quantized else None
        self.qstate = QState()

    def conv(self, cin, cout, k, stride=1, padding=0):
        return QuantConv2d(cin, cout, k, stride, padding, bias=False, qconfig=self.qconfig,
                           qstate=self.qstate)

    def linear(self, fin, fout, bias=False):
        return QuantLinear(fin, fout, bias=bias and self.qconfig is None, qconfig=self.qconfig,
                           qstate=self.qstate)

    def bn(self, c, dims=2, relu_after=False):
        if self.norm == "none":
            return nn.Identity()
        if self.norm == "l2":
            return nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
        cls = L1BatchNorm2d if dims == 2 else L1BatchNorm1d
        return cls(c, qconfig=self.qconfig, qstate=self.qstate, relu_after=relu_after)

    def quant(self, bits_fwd=None, first=False, relu=False):
        """An activation quantizer (``bits_fwd`` None) or the logits' (``bits_fwd`` given).
        ``first``: a block's quantizer before the norm. ``relu``: a ReLU comes right before
        (pools between) or right after, so it rounds to the activations' code width
        (:attr:`~qtrain.quant.QConfig.act_code_bits`: one bit more for unsigned codes, whose
        negative half the ReLU drops). Under scheme wage an activation
        quantizer rounds to WAGE's fixed grid, except before a norm (the norm's input keeps
        its range: WAGE has no quantizer there); without a norm there is none before the
        ReLU and pool (the exact accumulators go through them, as in WAGE, so the pool picks
        the same maxima), and the block's last quantizer rounds once, errors included."""
        q = self.qconfig
        if q is None or (first and q.wage and self.norm == "none"):
            return nn.Identity()  # WAGE: conv -> pool -> ReLU -> one quantizer, on the grid
        normed = first and self.norm != "none"
        activation = bits_fwd is None
        if activation and relu:
            bits_fwd = q.act_code_bits
        return Quantize(q, self.qstate, bits_fwd=bits_fwd, grid=activation and not normed,
                        channels=normed and q.norm_input_exp == "channel")

    def block(self, layer, c, dims=2, pool=False):
        """layer -> Quantize -> norm -> ReLU [-> max-pool 2] -> Quantize."""
        parts = [layer, self.quant(first=True, relu=self.norm == "none"),
                 self.bn(c, dims, relu_after=True), nn.ReLU()]
        if pool:
            parts.append(QuantMaxPool2d(2) if self.qconfig is not None else nn.MaxPool2d(2))
        return parts + [self.quant(relu=True)]

    def head(self, fin, classes):
        return [self.linear(fin, classes, bias=True), self.quant(bits_fwd=LOGIT_BITS)]


class QNet(nn.Sequential):
    """``nn.Sequential`` that remembers its quantization (``qconfig``, ``qstate``, ``norm``).

    Its quantized L1 blocks are :class:`~qtrain.fusion.QuantBlock` modules (grouped by
    :func:`~qtrain.fusion.fuse` when it is built, nested sequences included), which run as one
    fused node where the int kernels run them. A checkpoint saved before fusion existed (flat
    keys such as ``0.weight``) still loads.
    """

    def __init__(self, parts: _Parts, layers: list[nn.Module]):
        super().__init__(*layers)
        self.qconfig = parts.qconfig
        self.qstate = parts.qstate
        self.norm = parts.norm
        flat = dict(self.named_modules())
        fuse(self)
        where = {id(m): name for name, m in self.named_modules()}
        #: module name before fusion -> its name now, for the modules fusion moved
        self._flat_names = {old: where[id(m)] for old, m in flat.items() if where[id(m)] != old}
        self._register_load_state_dict_pre_hook(self._from_flat_keys)

    def _from_flat_keys(self, state_dict, prefix, *args) -> None:
        """Rename the keys of a state dict saved before fusion (flat names) to this model's, in
        place; a state dict with this model's keys is left alone."""
        ours = {prefix + k for k in self.state_dict()}
        mine = [k for k in state_dict if k.startswith(prefix)]
        if not self._flat_names or all(k in ours for k in mine):
            return
        moved = {}
        for key in mine:
            module, _, leaf = key[len(prefix):].rpartition(".")
            if module in self._flat_names:
                moved[prefix + self._flat_names[module] + "." + leaf] = state_dict.pop(key)
        state_dict.update(moved)


def lenet5(norm: str = "l1", qconfig: QConfig | None = None, in_channels: int = 1,
           classes: int = 10) -> QNet:
    p = _Parts(norm, qconfig)
    return QNet(p, [*p.block(p.conv(in_channels, 6, 5), 6, pool=True),
                    *p.block(p.conv(6, 16, 5), 16, pool=True),
                    nn.Flatten(),
                    *p.block(p.linear(16 * 4 * 4, 120), 120, dims=1),
                    *p.block(p.linear(120, 84), 84, dims=1),
                    *p.head(84, classes)])


def lenet5_paper(norm: str = "l1", qconfig: QConfig | None = None, in_channels: int = 1,
                 classes: int = 10) -> QNet:
    p = _Parts(norm, qconfig)
    return QNet(p, [*p.block(p.conv(in_channels, 32, 5), 32, pool=True),
                    *p.block(p.conv(32, 64, 5), 64, pool=True),
                    nn.Flatten(),
                    *p.block(p.linear(64 * 4 * 4, 512), 512, dims=1),
                    *p.head(512, classes)])


def mlp(norm: str = "l1", qconfig: QConfig | None = None, in_features: int = 784,
        hidden: int = 256, classes: int = 10) -> QNet:
    p = _Parts(norm, qconfig)
    return QNet(p, [nn.Flatten(),
                    *p.block(p.linear(in_features, hidden), hidden, dims=1),
                    *p.block(p.linear(hidden, hidden), hidden, dims=1),
                    *p.head(hidden, classes)])


def vgg7(norm: str = "l1", qconfig: QConfig | None = None, in_channels: int = 3,
         classes: int = 10) -> QNet:
    p = _Parts(norm, qconfig)
    layers: list[nn.Module] = []
    cin = in_channels
    for cout in (128, 256, 512):
        layers += p.block(p.conv(cin, cout, 3, padding=1), cout)
        layers += p.block(p.conv(cout, cout, 3, padding=1), cout, pool=True)
        cin = cout
    layers += [nn.Flatten(), *p.block(p.linear(512 * 4 * 4, 1024), 1024, dims=1),
               *p.head(1024, classes)]
    return QNet(p, layers)


class _BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity (or option-A: subsample and zero-pad) shortcut."""

    def __init__(self, p: _Parts, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*p.block(p.conv(cin, cout, 3, stride, 1), cout),
                                  p.conv(cout, cout, 3, 1, 1), p.quant(first=True), p.bn(cout))
        self.stride = stride
        self.pad = cout - cin
        self.out = nn.Sequential(nn.ReLU(), p.quant(relu=True))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        # codes times powers of two: the float32 sum is exact while the exponents stay close
        return self.out(self.body(x) + self.shortcut(x))


def resnet20(norm: str = "l1", qconfig: QConfig | None = None, in_channels: int = 3,
             classes: int = 10) -> QNet:
    p = _Parts(norm, qconfig)
    layers: list[nn.Module] = [*p.block(p.conv(in_channels, 16, 3, 1, 1), 16)]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_BasicBlock(p, cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), p.quant(relu=True), *p.head(64, classes)]
    return QNet(p, layers)


MODELS: dict[str, Callable[..., QNet]] = dict(zip(MODEL_NAMES, (lenet5, lenet5_paper, mlp, vgg7,
                                                                resnet20), strict=True))


def build(name: str, norm: str = "l1", qconfig: QConfig | None = None, **kwargs) -> QNet:
    """A model by name (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](norm, qconfig, **kwargs)
