r"""Convert a float torch model to a quantized qtrain network, in the manner of
``torch.ao.quantization.convert`` and ``nn.SyncBatchNorm.convert_sync_batchnorm``.

``qtrain.convert(model, qconfig, norm="l1")`` (:func:`convert`, also ``qtrain.convert``) swaps the layers and inserts the quantizers
the built-in models have (:mod:`qtrain.models`), then fuses blocks as they are fused
(:func:`qtrain.fusion.fuse`). The result trains with :func:`qtrain.train.train_epoch` and
:class:`qtrain.optim.QSGD` like a built-in model: it carries ``qconfig``, ``qstate`` and ``norm``.

What is swapped (weights copied):

* ``nn.Conv2d`` / ``nn.Linear`` -> :class:`~qtrain.nn.QuantConv2d` /
  :class:`~qtrain.nn.QuantLinear`. A bias directly followed by a batch norm (the next module
  of the same ``nn.Sequential``) is cancelled by that norm, so it is folded into the norm's
  running mean (``running_mean -= bias``, as torch.ao's conv-bn folding does) and dropped; any
  other bias becomes a quantized bias (integer codes at the accumulators' exponent, see
  :class:`~qtrain.nn.QuantConv2d`).
* ``nn.BatchNorm1d/2d`` -> :class:`~qtrain.nn.L1BatchNorm1d/2d` (``norm="l1"``). For a normal
  input the L1 deviation is ``sqrt(2/pi)`` times the standard deviation (Theorem 1 of the
  paper), so ``running_dev = sqrt(2/pi) * sqrt(running_var)`` and, so that the converted norm
  computes what the float one computed (``gamma (x - mu) / sigma``), ``gamma`` is scaled by the
  same factor (``beta`` is copied). In a quantized network the running statistics are rounded
  to nearest on their fixed-point grid (``2**RUN_EXP``). ``momentum=None`` (cumulative average)
  is kept (see :class:`~qtrain.nn.L1BatchNorm2d`); ``affine=False`` is refused. ``norm="l2"`` keeps the float ``nn.BatchNorm`` (backend
  ``emulate`` only, as for the built-in models).
* ``nn.MaxPool2d`` (2x2, stride 2, no padding) -> :class:`~qtrain.nn.QuantMaxPool2d`;
  ``nn.ReLU``, ``nn.Flatten``, ``nn.Identity`` pass through; ``nn.Dropout`` becomes
  ``nn.Identity`` with a warning (its ``1/(1-p)`` scaling leaves the code grid; in eval mode
  dropout is the identity anyway, so evaluation is unchanged and only fine-tuning loses it).
* Anything else of torch's (LayerNorm, GELU, attention, AvgPool, ...) is one ``ValueError``
  naming the module's path and type and listing what is supported.

Where quantizers go (as :meth:`qtrain.models._Parts.block` puts them), in an ``nn.Sequential``
(nested ones included): a :class:`~qtrain.quant.Quantize` after every conv/linear (the exact
accumulator to ``bits_a``), and one after every batch norm, placed after the ``ReLU`` and then
the max-pool that directly follow it (``conv -> Q -> BN -> ReLU [-> pool] -> Q``, the fused
block; after a ReLU it rounds to the activations' code width, ``act_codes``; before a norm it
takes per-channel exponents under ``norm_input_exp = "channel"``). The quantizer after the
model's last layer, when nothing but pass-through modules follow it, rounds the logits to 16
bits (:data:`qtrain.loss.LOGIT_BITS`). There is no input quantizer: inputs enter as 8-bit
codes (:func:`qtrain.train.to_input`), as in the built-ins.

Your own ``nn.Module`` subclass (a ``forward`` qtrain cannot see): its children are converted
in place, each conv/linear as ``nn.Sequential(QuantX, Quantize)`` and each batch norm as
``nn.Sequential(L1BatchNormXd, Quantize)``, its ``nn.Sequential`` children by the rule above,
its ``nn.ModuleList`` / ``nn.ModuleDict`` and own-class children recursively; the last
``nn.Linear`` registered is taken to give the logits. Limits: a conv/linear bias in such a
module stays a quantized bias (qtrain cannot see whether a norm follows it to fold it); the
operations of its
``forward`` (``F.relu``, ``+``, ``torch.cat``, reshapes) are kept as written, and must leave
the codes on a power-of-two grid (a sum of two activations is, up to the exponents' spread;
a mean or a scale by a non-power of two is not); such a module's blocks are not fused.

A converted model's L1 batch norms evaluate with the output exponent of their last training
batch; a freshly converted one has none yet: :func:`calibrate` runs one training-mode forward
pass on example inputs (no weights or running statistics change) to set it.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn as nn

from qkernels.fixedpoint import RUN_EXP

from .fusion import fuse
from .loss import LOGIT_BITS
from .models import QNet, _Parts
from .nn import (L1BatchNorm1d, L1BatchNorm2d, QuantConv2d, QuantLinear, QuantMaxPool2d,
                 _L1BatchNorm)
from .quant import QConfig, Quantize
from .spec import backend_problem

#: Theorem 1: for a normal input, E|x - E x| = sqrt(2/pi) * sigma.
GAUSS_L1_RATIO = math.sqrt(2 / math.pi)
#: What :func:`convert` takes, for its error messages.
SUPPORTED = ("nn.Sequential, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, "
             "nn.MaxPool2d(2), nn.Flatten, nn.Dropout, nn.Identity, nn.ModuleList, "
             "nn.ModuleDict, and your own nn.Module subclasses built from them")

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYER = (nn.Conv2d, nn.Linear)
_PASS = (nn.Flatten, nn.Identity, nn.Dropout)


class _Converter:
    def __init__(self, parts: _Parts):
        self.p = parts
        self.q = parts.qconfig  # None: not quantized
        self.dropped: list[str] = []

    # -- leaves ------------------------------------------------------------------------------

    def layer(self, m: nn.Module, path: str, folds: bool) -> nn.Module:
        """A conv/linear swapped, weights copied; ``folds``: its bias goes into the next BN."""
        bias = m.bias is not None and not folds
        if isinstance(m, nn.Conv2d):
            new = QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                              m.dilation, m.groups, bias, m.padding_mode, qconfig=self.q,
                              qstate=self.p.qstate)
        else:
            new = QuantLinear(m.in_features, m.out_features, bias, qconfig=self.q,
                              qstate=self.p.qstate)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if bias:
                new.bias.copy_(m.bias)
        return new

    def bn(self, m: nn.Module, path: str, bias: torch.Tensor | None) -> nn.Module:
        """A batch norm converted; ``bias``: the bias of the layer before it, folded in."""
        if self.p.norm == "l2":
            if bias is not None and m.track_running_stats:
                with torch.no_grad():
                    m.running_mean -= bias.detach().to(m.running_mean.dtype)
            return m
        if not m.affine:
            raise ValueError(f"{path}: affine=False is not supported (a quantized L1 batch norm "
                             f"learns gamma and beta); use affine=True")
        cls = L1BatchNorm2d if isinstance(m, nn.BatchNorm2d) else L1BatchNorm1d
        new = cls(m.num_features, m.eps, m.momentum, True, m.track_running_stats,
                  qconfig=self.q, qstate=self.p.qstate)
        with torch.no_grad():
            new.weight.copy_(m.weight * GAUSS_L1_RATIO)
            new.bias.copy_(m.bias)
            if m.track_running_stats:
                mean = m.running_mean.double()
                if bias is not None:
                    mean = mean - bias.detach().double()
                dev = GAUSS_L1_RATIO * m.running_var.double().clamp(min=0).sqrt()
                for src, buf in ((mean, new.running_mean), (dev, new.running_dev)):
                    if self.q is not None:  # exact fixed-point codes * 2**RUN_EXP
                        src = torch.round(src * 2.0 ** -RUN_EXP) * 2.0 ** RUN_EXP
                    buf.copy_(src)
                new.num_batches_tracked.copy_(m.num_batches_tracked)
        return new

    def pool(self, m: nn.MaxPool2d, path: str) -> nn.Module:
        def pair(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        stride = m.stride if m.stride is not None else m.kernel_size
        if (pair(m.kernel_size), pair(stride), pair(m.padding), pair(m.dilation),
                m.ceil_mode, m.return_indices) != ((2, 2), (2, 2), (0, 0), (1, 1), False, False):
            raise ValueError(f"{path} ({m!r}): only nn.MaxPool2d(2) (2x2 windows, stride 2, no "
                             f"padding) is supported")
        return QuantMaxPool2d(2) if self.q is not None else m

    def quant(self, bits_fwd: int | None = None, relu: bool = False,
              channels: bool = False) -> list[nn.Module]:
        """The quantizer to insert (none in a float network); ``relu``: a ReLU came just before
        it or comes just after, so it rounds to the activations' code width
        (:attr:`QConfig.act_code_bits`); ``channels``: a norm comes next, so under
        ``norm_input_exp = "channel"`` it rounds each channel at its own exponent."""
        if self.q is None:
            return []
        if relu and bits_fwd is None:
            bits_fwd = self.q.act_code_bits
        return [Quantize(self.q, self.p.qstate, bits_fwd=bits_fwd,
                         channels=channels and self.q.norm_input_exp == "channel")]

    def relu_follows(self, bn: nn.Module) -> None:
        """A ReLU follows the converted norm ``bn``: a quantized L1 norm then rounds its output
        to the activations' code width (the ReLU drops the negative half)."""
        if isinstance(bn, _L1BatchNorm) and bn.quantized:
            bn.out_bits = self.q.act_code_bits

    def unsupported(self, m: nn.Module, path: str) -> ValueError:
        return ValueError(f"{path or 'the model'} ({type(m).__module__}.{type(m).__name__}): "
                          f"qtrain.convert cannot quantize this module; supported: {SUPPORTED}")

    def passthrough(self, m: nn.Module, path: str) -> nn.Module:
        if isinstance(m, nn.Dropout) and m.p > 0 and self.q is not None:
            self.dropped.append(path)
            return nn.Identity()
        if isinstance(m, _PASS + (nn.ReLU,)):
            return m
        raise self.unsupported(m, path)

    # -- containers --------------------------------------------------------------------------

    def sequence(self, seq: nn.Sequential, prefix: str) -> list[nn.Module]:
        """The converted modules of ``seq``, quantizers inserted (see the module docstring)."""
        items = list(seq.named_children())
        out: list[nn.Module] = []
        pending = None  # after a BN: "bn", then "relu"; its quantizer is still to come
        fold: torch.Tensor | None = None
        for k, (name, m) in enumerate(items):
            path = prefix + name
            nxt = items[k + 1][1] if k + 1 < len(items) else None
            if pending and not (isinstance(m, nn.ReLU) and pending == "bn"
                                or isinstance(m, nn.MaxPool2d) and pending == "relu"):
                out += self.quant(relu=pending == "relu")
                pending = None
            if isinstance(m, nn.Sequential):
                out.append(nn.Sequential(*self.sequence(m, path + ".")))
            elif isinstance(m, _LAYER):
                folds = self.q is not None and m.bias is not None and isinstance(nxt, _BN)
                out.append(self.layer(m, path, folds))
                out += self.quant(relu=isinstance(nxt, nn.ReLU),  # (no norm between)
                                  channels=isinstance(nxt, _BN))
                fold = m.bias if folds else None
                continue
            elif isinstance(m, _BN):
                out.append(self.bn(m, path, fold))
                pending = "bn"
            elif isinstance(m, nn.ReLU) and pending == "bn":
                self.relu_follows(out[-1])
                out.append(m)
                pending = "relu"
            elif isinstance(m, nn.MaxPool2d):
                out.append(self.pool(m, path))
                if pending == "relu":
                    out += self.quant(relu=True)
                    pending = None
            elif _own_class(m):
                self.children(m, path)
                out.append(m)
            else:
                out.append(self.passthrough(m, path))
            fold = None
        if pending:
            out += self.quant(relu=pending == "relu")
        return out

    def children(self, module: nn.Module, prefix: str) -> None:
        """Convert the children of a module with its own ``forward`` (or a ModuleList/Dict) in
        place: layers and norms get their quantizer in an ``nn.Sequential``."""
        for name, m in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(m, nn.Sequential):
                new = nn.Sequential(*self.sequence(m, path + "."))
            elif isinstance(m, _LAYER):
                new = nn.Sequential(self.layer(m, path, False), *self.quant())
            elif isinstance(m, _BN):
                new = nn.Sequential(self.bn(m, path, None), *self.quant())
            elif isinstance(m, nn.MaxPool2d):
                new = self.pool(m, path)
            elif isinstance(m, (nn.ModuleList, nn.ModuleDict)) or _own_class(m):
                self.children(m, path)
                new = m
            else:
                new = self.passthrough(m, path)
            setattr(module, name, new)


def _own_class(m: nn.Module) -> bool:
    """A module class of the user's (not torch's): its children are converted one by one."""
    return not type(m).__module__.startswith("torch.")


def _last_quantizer(mods: list[nn.Module]) -> Quantize | None:
    """The quantizer at the end of a sequence (past pass-through modules), nested included."""
    for m in reversed(mods):
        if isinstance(m, Quantize):
            return m
        if isinstance(m, nn.Sequential):
            return _last_quantizer(list(m))
        if not isinstance(m, _PASS):
            return None
    return None


def convert(model: nn.Module, qconfig: QConfig, norm: str = "l1", *,
            inplace: bool = False) -> nn.Module:
    """``model`` as a quantized qtrain network (see the module docstring for the rules).

    Args:
        model: an ``nn.Sequential`` (nested ones allowed), or your own ``nn.Module`` subclass.
        qconfig: the widths and backend; all widths 32 gives qtrain's float layers (biases
            kept, no quantizers).
        norm: ``"l1"`` (batch norms become L1 batch norm) or ``"l2"`` (float batch norm kept;
            backend ``emulate`` only when quantized).
        inplace: convert ``model``'s own modules instead of a deep copy. For an
            ``nn.Sequential`` the result is a new :class:`~qtrain.models.QNet` holding them.

    Returns:
        a :class:`~qtrain.models.QNet` for an ``nn.Sequential``; otherwise ``model`` (or its
        copy) converted in place, with ``qconfig``, ``qstate`` and ``norm`` attributes. Either
        is fused (:func:`~qtrain.fusion.fuse`).

    Raises:
        ValueError: one per problem, naming the module's path (``classifier.2: ...``).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm {norm!r} is not one of l1, l2")
    if not isinstance(model, nn.Sequential) and not _own_class(model):
        raise ValueError(f"the model ({type(model).__name__}): give an nn.Sequential or your own "
                         f"nn.Module subclass")
    widths = (qconfig.bits_w, qconfig.bits_a, qconfig.bits_g, qconfig.bits_e)
    problem = backend_problem(widths, qconfig.backend, norm)
    bns = [name for name, m in model.named_modules() if isinstance(m, _BN)]
    if problem and bns:
        raise ValueError(f"{bns[0]}: {problem}")
    # without a batch norm the norm plays no part (and a model without one is no l2 network)
    parts = _Parts(norm if bns else "none", qconfig)
    src = model if inplace else copy.deepcopy(model)
    conv = _Converter(parts)
    if isinstance(src, nn.Sequential):
        layers = conv.sequence(src, "")
        last = _last_quantizer(layers)
        if last is not None:
            last.bits_fwd = LOGIT_BITS
        out = QNet(parts, layers)
    else:
        conv.children(src, "")
        linears = [m for m in src.modules() if isinstance(m, QuantLinear)]
        if linears and conv.q is not None:
            for seq in src.modules():
                if isinstance(seq, nn.Sequential) and len(seq) == 2 and seq[0] is linears[-1]:
                    seq[1].bits_fwd = LOGIT_BITS
        src.qconfig, src.qstate, src.norm = parts.qconfig, parts.qstate, parts.norm
        out = fuse(src)
    if conv.dropped:
        warnings.warn(f"qtrain.convert: dropout removed at {', '.join(conv.dropped)} (its "
                      f"1/(1-p) scaling leaves the code grid; evaluation is unchanged)",
                      stacklevel=2)
    return out


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Run one training-mode forward pass of ``model`` on ``x`` (network inputs, e.g.
    :func:`qtrain.train.to_input` of some training images) so that each L1 batch norm knows an
    output exponent for evaluation; the running statistics, weights and step are left as they
    were, and the model's mode is restored. Returns ``model``."""
    norms = [m for m in model.modules() if isinstance(m, _L1BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_dev.clone(), m.num_batches_tracked.clone())
             for m in norms]
    was_training = model.training
    model.train()
    try:
        model(x)
    finally:
        for m, (mean, dev, n) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_dev.copy_(dev)
            m.num_batches_tracked.copy_(n)
        model.train(was_training)
    return model


__all__ = ["convert", "calibrate", "GAUSS_L1_RATIO", "SUPPORTED"]
