"""Export a frozen qtrain network: the ``qk`` file for :mod:`qkernels` and an ONNX graph.

:func:`network_description` reads a frozen, quantized network (:mod:`qtrain.frozen`) as the
list of integer layers of the qk format (:mod:`qkernels.qkfile`, documented in
``docs/export.md``): input codes, conv/linear with weight codes, requantization to a fixed
exponent, folded L1 batch norm, ReLU, 2x2 max-pool, flatten. :func:`training_state` adds what
continuing training needs (weight stores, velocities, running statistics, counters, the
random stream's keys). :func:`write_qk` writes both, atomically. :mod:`qtrain.onnx_export`
turns the same description into ONNX.

Supported: sequential networks of those layers (``lenet5``, ``lenet5-paper``, ``mlp``,
``vgg7`` and user models of that shape), quantized with L1 batch norm, without biases on
quantized layers. Anything else is refused with one line naming the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qkernels import qkfile
from qkernels.format import code_dtype
from qkernels.ieee import f32_to_codes
from qkernels.fixedpoint import RUN_EXP

from .data import INPUT_EXP
from .files import atomic_write
from .fusion import QuantBlock
from .nn import INPUT_BITS, QuantConv2d, QuantLinear, QuantMaxPool2d, _eps_log2, _L1BatchNorm
from .optim import WEIGHT_MAX_LOG2
from .quant import FLOAT_BITS, Quantize, nearest, top_exponent, weight_exponent

#: The pixel offset and clip of the input codes (qtrain.data.to_codes).
PIXEL_OFFSET, PIXEL_CLIP = 128, 127


class ExportError(ValueError):
    """A network that cannot be exported: one line naming the module and why."""


def _sequence(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The modules of a sequential network in execution order (blocks and nested sequences
    opened up)."""
    if not isinstance(module, nn.Sequential):
        raise ExportError(f"{prefix or 'the model'} ({type(module).__name__}) is not an "
                          "nn.Sequential: only sequential networks export")
    for name, m in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, QuantBlock):
            for sub_name, sub in m.named_children():
                yield f"{full}.{sub_name}", sub
        elif isinstance(m, nn.Sequential):
            yield from _sequence(m, full + ".")
        else:
            yield full, m


def weight_codes(layer: QuantConv2d | QuantLinear) -> tuple[np.ndarray, int]:
    """The codes a quantized layer multiplies by (its store rounded to ``bits_w`` as the
    forward's ``_WeightFn`` rounds it) and their exponent."""
    q = layer.qconfig
    w = layer.weight.detach().cpu()
    rule = weight_exponent(w, q.bits_w, q.engine, q.weight_exp)
    rounded = nearest(w, q.bits_w, q.engine, None, rule, replicated=True)
    top = top_exponent(w)
    exp = rule if rule is not None else (0 if top is None else top - (q.bits_w - 1))
    codes = f32_to_codes(rounded.float().numpy(), 0, np.int64, exp=exp).q
    assert np.abs(codes).max(initial=0) < (1 << (q.bits_w - 1)), "weight codes exceed bits_w"
    return codes.astype(code_dtype(q.bits_w)), exp


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, tuple) else [v, v]


def network_description(model: nn.Module, in_shape: tuple[int, int, int],
                        classes: list[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The qk manifest's ``input``, ``layers`` and ``output`` of a frozen quantized network
    for inputs of ``in_shape`` (C, H, W), and the arrays they name."""
    layers: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    last_requant: dict | None = None
    for name, m in _sequence(model):
        where = f"module {name} ({type(m).__name__})"
        if isinstance(m, (QuantConv2d, QuantLinear)):
            if not m.quantized:
                raise ExportError(f"{where} is not quantized: export needs a quantized network")
            if m.bias is not None:
                raise ExportError(f"{where} has a bias: export supports bias-free quantized "
                                  "layers (the built-in models)")
            if m.qconfig.sample_errors:
                raise ExportError(f"{where} was trained with error_exp sample, which the "
                                  "torch-free trainer does not run: export needs error_exp batch")
            if m.qconfig.wage:
                raise ExportError(f"{where} was trained under scheme wage, whose fixed grids "
                                  "have no export yet (qtrain's scheme exports)")
            codes, exp = weight_codes(m)
            key = f"{name}.weight"
            arrays[key] = codes
            common = {"name": name, "weight": key, "w_exp": exp, "w_bits": m.qconfig.bits_w}
            if isinstance(m, QuantConv2d):
                if m.groups != 1 or _pair(m.dilation) != [1, 1] or m.padding_mode != "zeros" \
                        or isinstance(m.padding, str):
                    raise ExportError(f"{where}: groups, dilation and string padding are not "
                                      "supported")
                layers.append({"op": "conv", **common, "out_channels": m.out_channels,
                               "in_channels": m.in_channels, "kernel": _pair(m.kernel_size),
                               "stride": _pair(m.stride), "padding": _pair(m.padding)})
            else:
                layers.append({"op": "linear", **common, "out_features": m.out_features,
                               "in_features": m.in_features})
        elif isinstance(m, Quantize):
            if m.bits_fwd >= FLOAT_BITS:
                continue
            if m.frozen_exp is None:
                raise ExportError(f"{where} has no frozen exponent: freeze the network first "
                                  "(qtrain.frozen.calibrate_and_freeze)")
            last_requant = {"op": "requant", "name": name, "bits": m.bits_fwd,
                            "exp": m.frozen_exp}
            layers.append(last_requant)
        elif isinstance(m, _L1BatchNorm):
            if not m.quantized or m.frozen_in_exp is None:
                raise ExportError(f"{where} is not a quantized, frozen L1 batch norm")
            key = f"{name}.folded"
            arrays[key] = m.folded(m.frozen_in_exp)
            layers.append({"op": "l1bn", "name": name, "channels": m.num_features,
                           "folded": key, "in_exp": m.frozen_in_exp,
                           "out_bits": m.out_bits, "out_exp": int(m.last_out_exp)})
        elif isinstance(m, nn.ReLU):
            layers.append({"op": "relu"})
        elif isinstance(m, (QuantMaxPool2d, nn.MaxPool2d)):
            if not (m._fast(torch.zeros(1, 1, 2, 2)) if isinstance(m, QuantMaxPool2d) else
                    (_pair(m.kernel_size) == [2, 2] and _pair(m.stride or m.kernel_size)
                     == [2, 2] and _pair(m.padding) == [0, 0] and _pair(m.dilation) == [1, 1]
                     and not m.ceil_mode and not m.return_indices)):
                raise ExportError(f"{where}: only 2x2 max-pools with stride 2 export")
            layers.append({"op": "maxpool", "kernel": [2, 2], "stride": [2, 2]})
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ExportError(f"{where}: only Flatten(start_dim=1) exports")
            layers.append({"op": "flatten"})
        elif isinstance(m, nn.Identity):
            continue
        else:
            raise ExportError(f"{where} has no integer export (supported: quantized conv, "
                              "linear, L1 batch norm, ReLU, 2x2 max-pool, flatten)")
    if last_requant is None or layers[-1] is not last_requant:
        raise ExportError("the network does not end with a quantizer of its logits")
    manifest = {
        "input": {"shape": list(in_shape), "layout": "NCHW", "dtype": "uint8",
                  "offset": PIXEL_OFFSET, "clip": PIXEL_CLIP, "bits": INPUT_BITS,
                  "exp": INPUT_EXP},
        "layers": layers,
        "output": {"bits": last_requant["bits"], "exp": last_requant["exp"],
                   "classes": classes},
    }
    return manifest, arrays


def training_state(model: nn.Module, optimizer, step: int) -> tuple[dict, dict[str, np.ndarray]]:
    """What continuing training from here needs, beside the network: per parameter its store
    (24-bit codes and exponent) and int64 velocity, per L1 norm its running statistics (codes
    at ``RUN_EXP``) and counters, per quantizer and layer the random stream's tensor ids,
    and the step, seed, widths and optimizer constants."""
    arrays: dict[str, np.ndarray] = {}
    params = []
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        exp = st.get("store_exp")
        if exp is None:  # before the first step: the store is not yet snapped to its grid
            top = top_exponent(p.detach())
            exp = (1 if top is None else top) - 23
        arrays[f"store/{name}"] = f32_to_codes(p.detach().cpu().float().numpy(), 0, np.int32,
                                               exp=int(exp)).q
        entry = {"name": name, "store": f"store/{name}", "store_exp": int(exp),
                 "snapped": "store_exp" in st}
        if "velocity" in st:
            arrays[f"velocity/{name}"] = st["velocity"].cpu().numpy().astype(np.int64)
            entry["velocity"] = f"velocity/{name}"
        params.append(entry)
    norms, ids = [], {}
    for name, m in model.named_modules():
        if isinstance(m, _L1BatchNorm) and m.quantized and m.track_running_stats:
            for buf in ("running_mean", "running_dev"):
                arrays[f"{buf}/{name}"] = m._codes_of(getattr(m, buf))
            norms.append({"name": name, "running_mean": f"running_mean/{name}",
                          "running_dev": f"running_dev/{name}", "run_exp": RUN_EXP,
                          "num_batches_tracked": int(m.num_batches_tracked),
                          "momentum": m.momentum, "eps": m.eps,
                          "eps_log2": _eps_log2(m.eps),
                          "last_out_exp": int(m.last_out_exp)})
        if isinstance(m, Quantize):
            ids[name] = {"tensor_id": m.tensor_id, "bits_fwd": m.bits_fwd,
                         "bits_bwd": m.bits_bwd}
        elif getattr(m, "grad_ids", None) is not None and getattr(m, "quantized", False):
            ids[name] = {"grad_ids": list(m.grad_ids)}
            if getattr(m, "error_id", None) is not None:  # norm_errors stochastic
                ids[name]["error_id"] = m.error_id
    q = model.qconfig
    group = optimizer.param_groups[0]
    state = {"step": int(step), "seed": q.seed, "bits_w": q.bits_w, "bits_a": q.bits_a,
             "bits_g": q.bits_g, "bits_e": q.bits_e, "store_bits": q.store_bits,
             "stochastic_errors": q.stochastic_errors, "norm_errors": q.norm_errors,
             "weight_exp": q.weight_exp,
             "weight_max_log2": WEIGHT_MAX_LOG2,
             "lr": group["lr"], "momentum": group["momentum"],
             "weight_decay": group.get("weight_decay", 0.0),
             "parameters": params, "norms": norms, "stream_ids": ids}
    return state, arrays


def write_qk(path: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a qk file atomically (validated first)."""
    atomic_write(path, lambda f: qkfile.write(f, manifest, arrays))

