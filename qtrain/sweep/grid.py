"""The combinations a sweep trains: bit widths of the four tensor classes (every combination,
or one class at a time) x norms x backends x seeds, the name of each run, why a combination
cannot run, and which shard of a sweep split across machines trains it."""

from __future__ import annotations

import itertools

from ..config import DATASETS, RunConfig, UserError
from .args import int_list

#: The tensor classes, in the order of their widths: weights, activations, gradients, errors.
CLASSES = ("w", "a", "g", "e")
CLASS_NAMES = {"w": "weights", "a": "activations", "g": "weight gradients", "e": "errors"}

Widths = tuple[int, int, int, int]


def run_name(cfg: RunConfig) -> str:
    """``<norm>-<backend|float>-W?A?G?E?-s<seed>``: a float run does not depend on the backend."""
    return f"{cfg.norm}-{cfg.backend if cfg.quantized else 'float'}-{cfg.bits}-s{cfg.seed}"


def widths(args, base: RunConfig) -> tuple[list[Widths], Widths | None]:
    """The ``(W, A, G, E)`` widths to train, once each, from ``--bits`` and ``--bits-X``, and
    with ``--one-at-a-time`` the widths held fixed (else None)."""
    together = int_list(args.bits, "--bits")
    per = {c: int_list(getattr(args, f"bits_{c}"), f"--bits-{c}") for c in CLASSES}
    out: list[Widths] = []
    if getattr(args, "one_at_a_time", False):
        if not any(per.values()):
            raise UserError("--one-at-a-time needs at least one --bits-w/-a/-g/-e list")
        if together is not None and len(together) != 1:
            raise UserError("--one-at-a-time takes one --bits width for the classes held fixed, "
                            f"got {args.bits!r}")
        fixed = tuple(together[0] if together else getattr(base, f"bits_{c}") for c in CLASSES)
        out.append(fixed)  # every line's reference point
        for i, c in enumerate(CLASSES):
            for v in per[c] or []:
                out.append(tuple(v if j == i else fixed[j] for j in range(len(CLASSES))))
        return list(dict.fromkeys(out)), fixed
    for b in together or [None]:
        lists = [per[c] or [b if b is not None else getattr(base, f"bits_{c}")] for c in CLASSES]
        out += list(itertools.product(*lists))
    return list(dict.fromkeys(out)), None


def default_backend(base: RunConfig, norm: str) -> str:
    """Without --backend: the recipe's, except that float L2BN in a quantized network needs
    emulate (the int backend runs integer L1BN only)."""
    return "emulate" if base.backend == "int" and norm == "l2" else base.backend


def combinations(widths: list[Widths], norms: list[str], backends: list[str] | None,
                 seeds: list[int], base: RunConfig) -> list[tuple[Widths, str, str, int]]:
    """Every ``(widths, norm, backend, seed)``, in that nesting order; without ``backends``
    each norm's :func:`default_backend`."""
    return [(w, norm, backend, seed) for w, norm in itertools.product(widths, norms)
            for backend in backends or [default_backend(base, norm)] for seed in seeds]


def varied(widths: tuple[int, ...], fixed: tuple[int, ...] | None) -> str | None:
    """In a one-at-a-time sweep, the class whose width differs from the fixed ones (None for
    the run with every class at the fixed width, which belongs to every line)."""
    if fixed is None:
        return None
    diff = [c for c, w, f in zip(CLASSES, widths, fixed) if w != f]
    return diff[0] if diff else None


def shard_of(index: int, shards: int) -> int:
    """The shard (1..``shards``) that trains grid point ``index`` (0-based, in the grid's
    canonical order): points are dealt round-robin, so the shares are disjoint, cover the grid
    and differ in size by at most one, whatever has already run."""
    return index % shards + 1


def shard_share(points: list, shard: int, shards: int) -> list:
    """The points of ``points`` (the grid in canonical order) that shard ``shard`` of
    ``shards`` trains."""
    return [p for i, p in enumerate(points) if shard_of(i, shards) == shard]


def cannot_run(cfg: RunConfig) -> str | None:
    """Why a combination cannot run (one line: the model builder's error), or None. The user's
    data (a path) is checked when its run loads it."""
    from ..run import build

    if cfg.data not in DATASETS:
        return None
    try:
        h, w, c = DATASETS[cfg.data]
        build(cfg, (h, w, c))
    except UserError as err:
        return str(err)
    return None
