"""The configuration of a training run: one dataclass, read from a TOML recipe.

* :class:`RunConfig` -- every knob of a run, validated on construction.
* :func:`load_recipe` -- a packaged recipe by name (``qtrain/recipes/<name>.toml``) or a
  ``.toml`` / ``.json`` file (a run directory's ``config.json`` reproduces that run).
* :func:`apply_sets` -- ``["key=value", ...]`` overrides, type-checked against the fields.
* :meth:`RunConfig.to_json` / :meth:`RunConfig.from_dict` -- the JSON round trip.

A recipe sets every field except those in :data:`DEFAULTED`, so the file alone says what a run
does. Every problem raises :class:`UserError`, a :class:`ValueError` whose message is one line:
what is wrong and how to fix it. This module imports no torch, so bad input fails fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class UserError(ValueError):
    """A problem with the user's input; the message is one line: what is wrong, how to fix it."""


# The shared names and rules live in qtrain.spec (torch-free); re-exported here for the CLI.
from .spec import (BACKENDS, DATA_PATHS, DATASETS, FLOAT_BITS, MODELS, NORMS,  # noqa: E402
                   WEIGHT_EXPS, act_codes_problem, backend_problem, data_is_path,
                   data_problem, error_rules_problem, input_problem, model_problem,
                   norm_input_exp_problem, scheme_problem, width_problem)

#: Fields a recipe may leave out, with their defaults' meaning.
DEFAULTED = {
    "data_dir": "None: search $QTRAIN_DATA, the system dataset directory, the user cache, ...",
    "per_class": "None: the whole training set",
    "device": "'cpu'",
    "weight_exp": "'max': weights take the range exponent, as every quantizer",
    "weight_decay": "0.0: no weight decay",
    "scheme": "'qtrain': qtrain's quantization rules (not WAGE's)",
    "error_exp": "'batch': errors take one exponent per tensor (the batch's range)",
    "norm_errors": "'nearest': a batch norm rounds its input's error to nearest",
    "act_codes": "'signed': activations after a ReLU are signed bits_a codes",
    "norm_input_exp": "'tensor': a norm's input takes one exponent per tensor",
}

DEFAULT_RECIPE = "lenet5-fmnist"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on; two runs with equal configs are bit-identical.

    The learning rate for (0-based) epoch ``e`` is
    ``lr * lr_gamma ** len([m for m in lr_milestones if m <= e])``: with milestones (30, 60)
    epochs 1..30 (as printed) use ``lr``, 31..60 ``lr * lr_gamma``, the rest ``lr * lr_gamma**2``.
    """

    model: str  # network: a name of MODELS, or your own as package.module:function
    data: str  # dataset: fashion-mnist, mnist, cifar10, or a FILE.npz or DIR/ (made absolute)
    norm: str  # batch norm: l1 (L1BN), l2 (standard BN) or none
    backend: str  # int (integer kernels) or emulate (the same integers in torch, any device)
    bits_w: int  # weight code width, bits: 2..16, or 32 for float
    bits_a: int  # activation code width, bits: 2..16, or 32
    bits_g: int  # weight-gradient code width, bits: 2..16, or 32
    bits_e: int  # back-propagated error code width, bits: 2..16, or 32
    store_bits: int  # significant bits of the optimizer's weight store: 8..24
    stochastic_errors: bool  # round errors stochastically (gradients always are)
    epochs: int  # passes over the training set
    batch_size: int  # images per step
    lr: float  # learning rate (per image of the batch mean, as torch's SGD)
    lr_milestones: tuple[int, ...]  # epochs after which lr is multiplied by lr_gamma
    lr_gamma: float  # factor applied to lr at each milestone
    momentum: float  # SGD momentum factor, in [0, 1)
    seed: int  # weight init, data order, training subset and rounding stream
    data_dir: str | None = None  # first directory searched for the data; None: default search
    per_class: int | None = None  # training images per class (a stratified subset); None: all
    device: str = "cpu"  # torch device: cpu, cuda, cuda:1, ...
    weight_exp: str = "max"  # weight exponent from the largest (max) or mean magnitude (mean)
    weight_decay: float = 0.0  # L2 penalty of SGD, as torch's weight_decay; in [0, 1)
    scheme: str = "qtrain"  # quantization rules: qtrain's, or WAGE's (wage: fixed grids, no BN)
    error_exp: str = "batch"  # error exponent per tensor (batch) or per sample (sample)
    norm_errors: str = "nearest"  # rounding of the error a batch norm hands back: or stochastic
    act_codes: str = "signed"  # activations after a ReLU: signed or unsigned bits_a codes
    norm_input_exp: str = "tensor"  # a norm's input exponent per tensor, or per channel

    def __post_init__(self):
        _check_types(self)
        if problem := model_problem(self.model):
            raise UserError(problem)
        _choice("norm", self.norm, NORMS)
        _choice("backend", self.backend, BACKENDS)
        _choice("weight_exp", self.weight_exp, WEIGHT_EXPS)
        if problem := data_problem(self.data):
            raise UserError(problem)
        if data_is_path(self.data):  # recorded absolute: config.json repeats from anywhere
            object.__setattr__(self, "data", os.path.abspath(os.path.expanduser(self.data)))
        widths = (self.bits_w, self.bits_a, self.bits_g, self.bits_e)
        for name, bits in zip(("bits_w", "bits_a", "bits_g", "bits_e"), widths):
            if problem := width_problem(bits, name):
                raise UserError(problem)
        if problem := backend_problem(widths, self.backend, self.norm):
            raise UserError(problem)
        if problem := scheme_problem(self.scheme, widths, self.norm, self.stochastic_errors):
            raise UserError(problem)
        if problem := error_rules_problem(self.error_exp, self.stochastic_errors, self.scheme,
                                          self.norm_errors, self.norm):
            raise UserError(problem)
        if problem := act_codes_problem(self.act_codes, self.bits_a, self.scheme):
            raise UserError(problem)
        if problem := norm_input_exp_problem(self.norm_input_exp, self.scheme):
            raise UserError(problem)
        if not 8 <= self.store_bits <= 24:
            raise UserError(f"store_bits={self.store_bits} is outside 8..24 (a float32 holds "
                            "24-bit codes exactly)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise UserError(f"lr={self.lr} must be positive")
        if not self.lr_gamma > 0:
            raise UserError(f"lr_gamma={self.lr_gamma} must be positive")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum={self.momentum} must be in [0, 1)")
        if not 0 <= self.weight_decay < 1:
            raise UserError(f"weight_decay={self.weight_decay} must be in [0, 1), e.g. 5e-4")
        if self.seed < 0:
            raise UserError(f"seed={self.seed} must be non-negative")
        ms = self.lr_milestones
        if any(m < 1 for m in ms) or list(ms) != sorted(set(ms)):
            raise UserError(f"lr_milestones={list(ms)} must be increasing positive epochs, "
                            "e.g. [30, 60]")
        try:
            last = self.lr_at(ms[-1]) if ms else self.lr
        except OverflowError:
            last = math.inf
        if not 0 < last < math.inf:
            raise UserError(f"lr={self.lr} times lr_gamma={self.lr_gamma} at each of the "
                            f"{len(ms)} lr_milestones gives lr {last} in the last epochs, not a "
                            "positive finite number; choose an lr_gamma nearer 1 or fewer "
                            "milestones")
        if self.scheme == "wage":
            _check_wage_schedule(self)
        if self.per_class is not None and self.per_class < 1:
            raise UserError(f"per_class={self.per_class} must be at least 1 (or none for all)")
        if self.data in DATASETS and (problem := input_problem(self.model, self.data,
                                                               DATASETS[self.data])):
            raise UserError(problem)  # the user's data: checked when it is loaded
        if self.quantized and self.backend == "int" and self.device != "cpu":
            raise UserError(f"the int backend runs on the CPU, not {self.device}: use device cpu, "
                            "or backend emulate on an accelerator")
        if not self.device or self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise UserError(f"device {self.device!r} is not a torch device like cpu, cuda or "
                            "cuda:1")

    @property
    def quantized(self) -> bool:
        """Whether any of W, A, G, E is rounded (narrower than FLOAT_BITS)."""
        return min(self.bits_w, self.bits_a, self.bits_g, self.bits_e) < FLOAT_BITS

    @property
    def bits(self) -> str:
        """The widths as ``W8A8G8E8``."""
        return f"W{self.bits_w}A{self.bits_a}G{self.bits_g}E{self.bits_e}"

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``."""
        return self.lr * self.lr_gamma ** sum(m <= epoch for m in self.lr_milestones)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> RunConfig:
        """A config from a mapping of field -> value (a recipe, ``config.json``)."""
        names = field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"{where} has unknown field(s) {', '.join(unknown)}; the fields "
                            f"are: {', '.join(names)}")
        missing = [n for n in names if n not in values and n not in DEFAULTED]
        if missing:
            raise UserError(f"{where} lacks field(s) {', '.join(missing)}; a recipe sets every "
                            f"field except {', '.join(DEFAULTED)}")
        values = dict(values)
        if isinstance(values.get("lr_milestones"), list):
            values["lr_milestones"] = tuple(values["lr_milestones"])
        return cls(**values)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def _type_name(tp) -> str:
    if tp is type(None):
        return "none"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(args[0])}"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {"str": "string", "int": "integer", "float": "number", "bool": "true/false"}.get(
        tp.__name__, tp.__name__)


def _is(value, tp) -> bool:
    """isinstance for the field types used here (int is a float; bool is not an int)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return isinstance(value, tuple) and all(_is(v, args[0]) for v in value)
    if args:
        return any(_is(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


def _field_types() -> dict:
    return typing.get_type_hints(RunConfig)


def _check_types(cfg: RunConfig) -> None:
    for name, tp in _field_types().items():
        value = getattr(cfg, name)
        if not _is(value, tp):
            raise UserError(f"{name}={value!r} has the wrong type: expected {_type_name(tp)}")
        if tp is float and isinstance(value, int):
            object.__setattr__(cfg, name, float(value))
        elif tp is float and not math.isfinite(value):
            raise UserError(finite_problem(name, value))


def finite_problem(name: str, value: float) -> str:
    """The one-line error for a non-finite (nan, inf, -inf) value of float field ``name``."""
    return f"{name}={value} is not a finite number; give a value like {name}=0.1"


def _check_wage_schedule(cfg: RunConfig) -> None:
    """WAGE's update: plain SGD whose learning rate, in every epoch, is a power of two."""
    if cfg.momentum or cfg.weight_decay:
        raise UserError(f"scheme wage updates by plain SGD (WAGE's rule): set momentum=0 and "
                        f"weight_decay=0, not {cfg.momentum} and {cfg.weight_decay}")
    for k in range(len(cfg.lr_milestones) + 1):
        lr = cfg.lr * cfg.lr_gamma ** k
        if math.frexp(lr)[0] != 0.5:
            raise UserError(f"scheme wage needs learning rates that are powers of two (WAGE's "
                            f"8, 1, 1/8), but lr={cfg.lr} with lr_gamma={cfg.lr_gamma} gives "
                            f"{lr}; e.g. lr=8 and lr_gamma=0.125")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# Recipes and overrides
# --------------------------------------------------------------------------------------------

def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``qtrain/recipes``."""
    root = resources.files("qtrain") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str | os.PathLike) -> RunConfig:
    """A packaged recipe by name, or a ``.toml`` recipe / ``.json`` config file by path."""
    text = os.fspath(name_or_path)
    if text.endswith((".toml", ".json")) or os.sep in text:
        path = Path(text)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise UserError(f"cannot read recipe file {path} ({err.strerror or err}); give a "
                            f"recipe name ({', '.join(recipe_names())}) or a readable file")
        where = f"recipe file {path}"
    else:
        names = recipe_names()
        if text not in names:
            raise UserError(f"unknown recipe {text!r}: choose one of {', '.join(names)}, or "
                            "give a .toml file")
        raw = (resources.files("qtrain") / "recipes" / f"{text}.toml").read_bytes()
        where = f"recipe {text}"
    try:
        if text.endswith(".json"):
            values = json.loads(raw.decode())
        else:
            values = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{where} is not valid {'JSON' if text.endswith('.json') else 'TOML'} "
                        f"({str(err).splitlines()[0]}); fix the file")
    if not isinstance(values, dict):
        raise UserError(f"{where} must hold a table of fields")
    return RunConfig.from_dict(values, where)


def recipe_label(name_or_path: str | os.PathLike) -> str:
    """A short name for run directories: the recipe name or the file's stem."""
    text = os.fspath(name_or_path)
    return Path(text).stem if text.endswith((".toml", ".json")) or os.sep in text else text


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", ""}


def _parse(text: str, tp):
    """``text`` as a value of field type ``tp``; ValueError if it is not one."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        items = text.strip().strip("[]").replace(" ", "")
        return tuple(_parse(v, args[0]) for v in items.split(",")) if items else ()
    if args:  # X | None
        if text.strip().lower() in _NONE:
            return None
        return _parse(text, next(a for a in args if a is not type(None)))
    if tp is bool:
        if text.strip().lower() in _TRUE | _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return text


def apply_sets(config: RunConfig, sets: list[str], then: dict | None = None) -> RunConfig:
    """``config`` with ``["key=value", ...]`` applied, each value parsed as its field's type,
    and then the fields in ``then`` (the command line's flags), checked once together (so
    ``--set scheme=wage --norm none`` is the one config it names).

    Lists are written ``30,60`` (or ``[30,60]``, or empty for none); optional fields take
    ``none``; booleans ``true``/``false``.
    """
    types = _field_types()
    changes = {}
    for item in sets:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            what = f"unknown field {key!r}" if eq else f"--set {item!r} is not key=value"
            raise UserError(f"{what}; the recipe's fields are: {', '.join(types)}")
        try:
            changes[key] = _parse(text, types[key])
        except ValueError:
            raise UserError(f"--set {key}={text!r}: expected {_type_name(types[key])}; the "
                            f"recipe's fields are: {', '.join(types)}") from None
    return dataclasses.replace(config, **{**changes, **(then or {})})  # a flag wins
