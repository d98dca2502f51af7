"""Your own network on the command line: ``--model package.module:function``.

The function is imported (the current directory is searched first, as for ``python -m``) and
called with the data's sizes for those of its parameters named in :data:`SIZES` (e.g.
``def small_cnn(num_classes=10, in_channels=1)``), none otherwise; it returns a float torch
``nn.Module`` taking images (N, C, H, W) and giving logits (N, classes). qtrain checks that shape on two blank images of the data's
size, then converts the network as :func:`qtrain.convert` does (quantizers, L1 batch norm,
fused blocks; with every width 32, qtrain's float layers). Each problem is one line that names
the model and says what to fix.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import torch
from torch import nn

from .config import UserError

#: Parameter names of the user's function that qtrain fills from the data: the class count K,
#: the image channels C, and the image height and width.
SIZES = {"num_classes": "classes", "classes": "classes", "in_channels": "channels",
         "height": "height", "width": "width"}


def _sizes_for(func, sizes: dict[str, int]) -> dict[str, int]:
    """The keyword arguments of :data:`SIZES` that ``func`` takes."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it bare
        return {}
    return {name: sizes[what] for name, what in SIZES.items() if name in params}


def load(spec: str, sizes: dict[str, int] | None = None) -> nn.Module:
    """The float network ``package.module:function`` builds (``sizes``: ``classes``,
    ``channels``, ``height``, ``width`` of the data, for the parameters of :data:`SIZES`)."""
    module_name, _, func_name = spec.partition(":")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UserError(f"--model {spec}: cannot import {module_name} ({err}); it must be a "
                        f"module on the Python path or in the current directory {here}") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed as it was imported
        raise UserError(f"--model {spec}: importing {module_name} raised "
                        f"{type(err).__name__}: {_first_line(err)}") from None
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        what = "has no" if func is None else "has a non-callable"
        raise UserError(f"--model {spec}: {module_name} {what} {func_name}; name a function "
                        f"that returns an nn.Module")
    kwargs = _sizes_for(func, sizes or {}) if sizes else {}
    call = f"{func_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        net = func(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's function failed
        raise UserError(f"--model {spec}: {call} raised {type(err).__name__}: "
                        f"{_first_line(err)}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"--model {spec}: {func_name}() returned a {type(net).__name__}, not a "
                        f"torch nn.Module")
    return net


def check_logits(spec: str, net: nn.Module, in_shape: tuple[int, int, int], classes: int
                 ) -> None:
    """``net`` maps two blank images of ``in_shape`` (H, W, C) to (2, classes) logits."""
    h, w, c = in_shape
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, c, h, w))
    except Exception as err:  # noqa: BLE001 - the user's forward failed on the data's shape
        raise UserError(f"--model {spec}: its forward failed on images of {h}x{w}x{c} (N, "
                        f"{c}, {h}, {w}): {type(err).__name__}: {_first_line(err)}") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--model {spec}: it gives {got} for 2 images of {h}x{w}x{c}; it must "
                        f"give (2, {classes}) logits, one per class of the data")


def build(spec: str, norm: str, qconfig, in_shape: tuple[int, int, int], classes: int
          ) -> nn.Module:
    """``spec``'s network, checked on the data's shape and converted with ``qconfig``."""
    from .conversion import convert

    if norm == "none":
        raise UserError(f"--model {spec}: norm none leaves batch norm out of the built-in "
                        f"models; your model's own layers decide: norm l1 makes its BatchNorms "
                        f"L1 batch norm, l2 keeps them float")
    h, w, c = in_shape
    net = load(spec, {"classes": classes, "channels": c, "height": h, "width": w})
    check_logits(spec, net, in_shape, classes)
    try:
        return convert(net, qconfig, norm, inplace=True)
    except ValueError as err:
        raise UserError(f"--model {spec}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]
