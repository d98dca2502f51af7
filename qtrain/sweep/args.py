"""The options of ``qtrain sweep`` and ``qtrain compare``, and turning their values into lists,
the base config and the output folder; every bad value is a one-line
:class:`qtrain.config.UserError`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import (BACKENDS, DEFAULT_RECIPE, NORMS, RunConfig, UserError, apply_sets,
                      load_recipe, recipe_label)
from ..spec import width_problem

#: The names ``--methods`` takes, in the order ``qtrain compare`` trains and reports them.
COMPARE_METHODS = ("int", "float-l1", "float-l2", "brevitas")


def int_list(text: str | None, flag: str) -> list[int] | None:
    """A ``--bits`` list: the widths once each, in order (None when the option is not given)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. "
                        "2,4,8,32") from None
    if not values:
        raise UserError(f"{flag} is empty; give widths like 2,4,8,32")
    for v in values:
        if width_problem(v, flag):
            raise UserError(f"{flag}: {v} is not a supported width: use 2..16, or 32 for float")
    return list(dict.fromkeys(values))


def choice_list(text: str | None, flag: str, choices: tuple[str, ...]) -> list[str] | None:
    """A list of names from ``choices``, once each, in order (None when not given)."""
    if text is None:
        return None
    values = [v for v in text.replace(" ", "").split(",") if v]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise UserError(f"{flag} {text!r}: choose from {', '.join(choices)} (comma-separated)")
    return list(dict.fromkeys(values))


def seed_list(text: str | None, base: int) -> list[int]:
    """``N`` -> base..base+N-1; ``a,b,c`` -> those seeds."""
    if text is None:
        return [base]
    try:
        if "," in text:
            seeds = [int(v) for v in text.split(",") if v.strip()]
        else:
            n = int(text)
            if n < 1:
                raise UserError(f"--seeds {n} must be at least 1")
            seeds = list(range(base, base + n))
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a count (3) or a list of seeds (0,1,2)") \
            from None
    if any(s < 0 for s in seeds):
        raise UserError(f"--seeds {text!r}: seeds must be non-negative")
    return list(dict.fromkeys(seeds))


def shard_spec(text: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` -> ``(K, N)`` with 1 <= K <= N (None when the option is not given)."""
    if text is None:
        return None
    k, slash, n = text.replace(" ", "").partition("/")
    try:
        shard, shards = int(k), int(n)
    except ValueError:
        shard, shards = 0, 0
    if not slash or not 1 <= shard <= shards:
        raise UserError(f"--shard {text!r} is not K/N with K in 1..N, e.g. --shard 2/4 for the "
                        "second of 4 shares of the grid")
    return shard, shards


def job_count(j: int | None) -> int:
    """``--jobs`` (default 1)."""
    if j is None:
        return 1
    if j < 1:
        raise UserError(f"--jobs {j} must be at least 1")
    return j


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help=f"packaged recipe or .toml/.json file (default: {DEFAULT_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe field, e.g. per_class=100 or epochs=3 (repeatable)")
    p.add_argument("--seeds", metavar="N|LIST",
                   help="N seeds from the recipe's seed on (default 1), or a list like 0,1,2")
    p.add_argument("--jobs", type=int, metavar="J",
                   help="runs side by side, each with cores/J threads (default 1)")
    p.add_argument("--device", metavar="DEV",
                   help="torch device of the runs that can use one (float and emulate), e.g. "
                        "cuda; the int backend's runs stay on the CPU (default: the recipe's)")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (runs go to DIR/runs/<name>); rerunning skips "
                        "finished runs")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``qtrain sweep``'s options to ``parser`` (returned)."""
    parser.description = parser.description or (
        "Train every combination of bit widths x norms x backends x seeds of a recipe and "
        "plot test error against bit width. Finished runs are skipped when started again; "
        "combinations that cannot run are reported as skipped.")
    g = parser.add_argument_group("what to sweep (comma-separated lists)")
    g.add_argument("--bits", metavar="LIST",
                   help="widths of W, A, G and E together, e.g. 2,3,4,6,8,12,16,32 (32: float)")
    for key, what in (("w", "weights"), ("a", "activations"), ("g", "weight gradients"),
                      ("e", "errors")):
        g.add_argument(f"--bits-{key}", metavar="LIST",
                       help=f"widths of {what} only; the other classes from --bits or the "
                            "recipe")
    g.add_argument("--one-at-a-time", action="store_true",
                   help="vary one class at a time: each --bits-X list with the other classes "
                        "at --bits (one width) or the recipe's, plus the run with every class "
                        "there, instead of every combination; sweep.png has a line per class")
    g.add_argument("--norm", metavar="LIST", help=f"norms from {', '.join(NORMS)} "
                                                  "(default: the recipe's)")
    g.add_argument("--backend", metavar="LIST", help=f"backends from {', '.join(BACKENDS)} "
                                                     "(default: the recipe's; emulate for "
                                                     "norm l2 when the recipe's is int)")
    g = parser.add_argument_group("across machines (a shared --out directory)")
    g.add_argument("--shard", metavar="K/N",
                   help="train only the K-th of N disjoint shares of the grid (K in 1..N; "
                        "point i goes to shard i mod N + 1); the shard that finds the grid "
                        "complete writes sweep.json, .csv and .png")
    g.add_argument("--collect", action="store_true",
                   help="train nothing: write sweep.json, .csv and .png from the finished runs "
                        "in --out (the grid from the same arguments, or else from the "
                        "sweep-grid.json a sweep saved there); an error lists missing points")
    _common_arguments(parser)
    return parser


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``qtrain compare``'s options to ``parser`` (returned)."""
    parser.description = parser.description or (
        "Train int8 L1BN, float L1BN, float L2BN and Brevitas W8A8 QAT with the same seeds and "
        "data order; print a table and plot the test-error curves.")
    parser.add_argument("--bits", type=int, default=8, metavar="N",
                        help="width of the integer L1BN run (and the Brevitas peer), default 8")
    parser.add_argument("--methods", metavar="LIST",
                        help=f"which methods to train, from {', '.join(COMPARE_METHODS)} "
                             "(default: all)")
    _common_arguments(parser)
    return parser


def runs_dir(out_arg: str) -> tuple[Path, Path]:
    """``--out`` and its ``runs/`` folder, created; a one-line error when it cannot be."""
    out = Path(out_arg)
    runs = out / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {runs} ({err.strerror or err}); choose a writable --out") \
            from None
    return out, runs


def on_device(cfg: RunConfig, device: str | None) -> RunConfig:
    """``cfg`` on ``--device`` (None: as it is), except a quantized run of the int backend,
    which runs on the CPU wherever the others run."""
    if device is None or (cfg.backend == "int" and cfg.quantized):
        return cfg
    return dataclasses.replace(cfg, device=device)


def base_config(args) -> tuple[RunConfig, str]:
    """The recipe with the ``--set`` changes, and the recipe's label."""
    recipe = args.recipe or DEFAULT_RECIPE
    return apply_sets(load_recipe(recipe), list(args.set or [])), recipe_label(recipe)
