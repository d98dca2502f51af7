"""The names and rules every part of qtrain shares, defined once (no torch: the command line
and the run config import it before anything heavy).

Each rule returns the one-line message of what is wrong, or None; callers raise it as their
error type (:class:`qtrain.config.UserError` for configs, ``ValueError`` for the layers).
"""

from __future__ import annotations

import os
import re

#: A width of 32 bits means float: no quantization.
FLOAT_BITS = 32
#: ``int``: integer codes through qkernels; ``emulate``: the same integers in torch, any device.
BACKENDS = ("int", "emulate")
#: Batch norm: integer L1BN, float L2BN (torch's), or none.
NORMS = ("l1", "l2", "none")
#: How weights pick their exponent: from the largest magnitude or from the mean magnitude.
WEIGHT_EXPS = ("max", "mean")
#: How errors pick their exponent: one for the batch (its range), or one per sample (its own
#: range; the codes reach the layers as 16-bit codes at the batch's exponent).
ERROR_EXPS = ("batch", "sample")
#: How a batch norm rounds the error it hands back to the layer before it (its input's error).
NORM_ERRORS = ("nearest", "stochastic")
#: How the quantizer before a batch norm picks its exponent: one for the tensor (its range),
#: or one per channel (each channel's range; the norm divides each channel by its own
#: deviation, so a power of two per channel costs it nothing). Per-channel codes reach the
#: norm as 16-bit codes at the tensor's exponent.
NORM_INPUT_EXPS = ("tensor", "channel")
#: The codes of an activation after a ReLU: signed ``bits_a`` codes (whose sign bit a
#: non-negative value never uses), or unsigned ``bits_a`` codes (0 .. 2**bits_a - 1: twice the
#: resolution; held as signed codes one bit wider).
ACT_CODES = ("signed", "unsigned")
#: Quantization rules: qtrain's (range exponents, wide store, momentum SGD) or WAGE's (fixed
#: grids, shift-normalized errors and updates, integer steps: :mod:`qtrain.wage`).
SCHEMES = ("qtrain", "wage")


def error_rules_problem(error_exp: str, stochastic_errors: bool, scheme: str,
                        norm_errors: str = "nearest", norm: str | None = None) -> str | None:
    """The error rules' fields (``error_exp``, ``norm_errors``) and what they exclude:
    per-sample exponents round to nearest, and WAGE rounds every error its own way (a norm's
    too: ``norm`` None, not known here, leaves that to the norm's constructor)."""
    if norm_errors not in NORM_ERRORS:
        return f"norm_errors {norm_errors!r} is not one of {', '.join(NORM_ERRORS)}"
    if norm_errors == "stochastic" and scheme == "wage" and norm not in ("none", None):
        return "scheme wage rounds errors to nearest (WAGE's rule): set norm_errors nearest"
    if norm_errors == "stochastic" and error_exp == "sample":
        return ("error_exp sample rounds errors to nearest: set norm_errors nearest or "
                "error_exp batch")
    if error_exp not in ERROR_EXPS:
        return f"error_exp {error_exp!r} is not one of {', '.join(ERROR_EXPS)}"
    if error_exp == "sample" and stochastic_errors:
        return ("error_exp sample rounds errors to nearest: set stochastic_errors false or "
                "error_exp batch")
    if error_exp == "sample" and scheme == "wage":
        return "scheme wage takes its own error exponent (WAGE's shift): set error_exp batch"
    return None


def act_codes_problem(act_codes: str, bits_a: int, scheme: str) -> str | None:
    """``act_codes`` must be a name of :data:`ACT_CODES`; unsigned codes are held one bit
    wider, so they need ``bits_a`` of at most 15 (or 32: float, where they change nothing), and
    WAGE's activations have their own fixed grid."""
    if act_codes not in ACT_CODES:
        return f"act_codes {act_codes!r} is not one of {', '.join(ACT_CODES)}"
    if act_codes == "unsigned" and 15 < bits_a < FLOAT_BITS:
        return (f"act_codes unsigned holds bits_a={bits_a} codes as {bits_a + 1}-bit signed "
                "ones, past the kernels' 16: use bits_a <= 15 or act_codes signed")
    if act_codes == "unsigned" and scheme == "wage":
        return "scheme wage rounds activations to its own fixed grid: set act_codes signed"
    return None


def norm_input_exp_problem(norm_input_exp: str, scheme: str) -> str | None:
    """``norm_input_exp`` must be a name of :data:`NORM_INPUT_EXPS`; WAGE has no quantizer
    before a norm to give per-channel exponents."""
    if norm_input_exp not in NORM_INPUT_EXPS:
        return (f"norm_input_exp {norm_input_exp!r} is not one of "
                f"{', '.join(NORM_INPUT_EXPS)}")
    if norm_input_exp == "channel" and scheme == "wage":
        return "scheme wage feeds a norm its own range (WAGE's rule): set norm_input_exp tensor"
    return None


def scheme_problem(scheme: str, widths: tuple[int, int, int, int], norm: str,
                   stochastic_errors: bool) -> str | None:
    """What the ``wage`` scheme needs: quantized W, A, G, E with ``bits_w <= bits_g`` (the
    store's grid holds the weights'), no batch norm or integer L1BN, nearest errors."""
    if scheme not in SCHEMES:
        return f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}"
    if scheme != "wage":
        return None
    bits_w, _, bits_g, _ = widths
    if max(widths) >= FLOAT_BITS:
        return "scheme wage quantizes every class: give bits_w, bits_a, bits_g, bits_e below 32"
    if bits_w > bits_g:
        return (f"scheme wage keeps the weight store on the bits_g grid, which must hold the "
                f"weights' bits_w grid: bits_w={bits_w} > bits_g={bits_g}")
    if norm not in ("none", "l1", None):
        return (f"scheme wage trains networks without batch norm (WAGE's) or with integer L1BN: "
                f"use norm none or l1, not {norm}")
    if stochastic_errors:
        return "scheme wage rounds errors to nearest (WAGE's rule): set stochastic_errors false"
    return None
#: Dataset name -> image shape (H, W, C).
DATASETS = {"fashion-mnist": (28, 28, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
#: Model name -> the image shapes (H, W, C) it accepts (None: any); the builders are
#: :data:`qtrain.models.MODELS`, in this order.
MODEL_INPUTS = {"lenet5": {(28, 28, 1)}, "lenet5-paper": {(28, 28, 1)}, "mlp": None,
                "vgg7": {(32, 32, 3)}, "resnet20": None}
MODELS = tuple(MODEL_INPUTS)
#: What ``model`` may be besides a name of :data:`MODELS`: the user's own network.
USER_MODEL = "package.module:function (a callable returning a torch nn.Module)"
_USER_MODEL = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def model_is_user(model: str) -> bool:
    """``model`` names the user's own network (``package.module:function``), not a built-in
    one: it holds a colon."""
    return ":" in model


def model_problem(model: str) -> str | None:
    """``model`` must be a name of :data:`MODELS` or ``package.module:function``."""
    if model_is_user(model):
        return None if _USER_MODEL.fullmatch(model) else (
            f"model {model!r} is not {USER_MODEL}, e.g. mymodels:small_cnn")
    if model not in MODELS:
        return (f"model {model!r} is not one of {', '.join(MODELS)}; or give your own as "
                f"{USER_MODEL}")
    return None


#: What ``data`` may be besides a name of :data:`DATASETS`: the user's own files.
DATA_PATHS = "a FILE.npz, or a DIR/ of image folders (a path with a /)"


def data_is_path(data: str) -> bool:
    """``data`` names the user's files, not a built-in dataset: a path ending in ``.npz`` (the
    arrays x_train, y_train, x_test, y_test) or any path with a separator (a directory of
    image folders: ``./flowers``, ``flowers/``, ``/data/flowers``). A bare word is a dataset
    name, so a misspelt one is an error rather than a missing directory."""
    return data not in DATASETS and (data.endswith(".npz") or "/" in data or os.sep in data)


def data_problem(data: str) -> str | None:
    """``data`` must be a name of :data:`DATASETS` or a path (:func:`data_is_path`)."""
    if data in DATASETS or data_is_path(data):
        return None
    return f"unknown data {data!r}: choose one of {', '.join(DATASETS)}, or give {DATA_PATHS}"


def input_problem(model: str, data: str, shape: tuple[int, int, int]) -> str | None:
    """Model ``model`` must accept ``data``'s image shape (H, W, C) (:data:`MODEL_INPUTS`)."""
    if model_is_user(model):
        return None  # checked when it is built, on the data
    accepts = MODEL_INPUTS[model]
    if accepts is None or shape in accepts:
        return None
    fits = [m for m in MODELS if MODEL_INPUTS[m] is None or shape in MODEL_INPUTS[m]]
    return (f"model {model} does not take {data}'s {'x'.join(map(str, shape))} images: use "
            f"model {' or '.join(fits)}, or other data")


def width_problem(bits, name: str) -> str | None:
    """A code width must be an int in 2..16, or 32 for float."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        return f"{name} must be an int (2..16, or 32 for float), got {bits!r}"
    if not (2 <= bits <= 16 or bits == FLOAT_BITS):
        return f"{name}={bits} is not a supported width: use 2..16, or 32 for float"
    return None


def backend_problem(widths: tuple[int, int, int, int], backend: str,
                    norm: str | None = None) -> str | None:
    """The int backend computes integers only: all four widths integer once any is, and L1BN
    (not float L2BN) in a quantized network."""
    quantized = min(widths) < FLOAT_BITS
    if quantized and backend == "int" and max(widths) == FLOAT_BITS:
        return (f"the int backend needs integer W, A, G and E, got bits "
                f"{'/'.join(map(str, widths))}: set all four to 2..16 or use backend emulate "
                "for mixed float/integer widths")
    if quantized and backend == "int" and norm == "l2":
        return ("the int backend runs integer L1 batch norm only: use norm l1 or none, or "
                "backend emulate for float L2BN in a quantized network")
    return None
