"""Many training runs at once: ``qtrain sweep`` (accuracy vs bit width) and ``qtrain compare``.

``sweep`` trains every combination of bit widths, norms, backends and seeds of a recipe, each
into ``DIR/runs/<name>``, ``--jobs`` of them side by side (spawned processes, each running
:func:`qtrain.run.train` with ``cores // jobs`` threads). A run whose ``summary.json`` says it
is finished is not trained again, an interrupted one is resumed, and a combination that cannot
run (``int`` backend with ``l2`` norm, L1BN with activations or errors above 8 bits, ...) is
reported as skipped with the reason. ``DIR`` gets ``sweep.json`` (a list of records),
``sweep.csv`` and ``sweep.png`` (test error vs bit width, mean and standard deviation over
seeds, one line per norm/backend), each written atomically.

``compare`` trains int8 L1BN (int backend), float L1BN, float L2BN and Brevitas W8A8 QAT
(:mod:`qtrain.peers`) on the same seeds and data order, prints one table and writes
``compare.json`` and ``compare.png`` (the test-error curves, the paper's Fig. 1 style).

The CLI wiring calls :func:`add_sweep_arguments` / :func:`run_sweep` and
:func:`add_compare_arguments` / :func:`run_compare`; user errors raise
:class:`qtrain.config.UserError`. This module imports no torch at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import itertools
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

from .config import (BACKENDS, DATASETS, DEFAULT_RECIPE, FLOAT_BITS, NORMS, RunConfig,
                     UserError, apply_sets, load_recipe, recipe_label)
from .spec import width_problem
from .files import save_figure, write_text

CLASSES = ("w", "a", "g", "e")
RECORD_FIELDS = ("name", "bits_w", "bits_a", "bits_g", "bits_e", "norm", "backend", "seed",
                 "final_test_error", "best_test_error", "wall_s", "epochs_done", "status",
                 "reason", "run_dir", "varied")
#: Fields whose difference from a saved run does not make it another run.
_IGNORED_FIELDS = ("epochs", "device", "data_dir")
LOG = "train.log"


# --------------------------------------------------------------------------------------------
# Argument helpers
# --------------------------------------------------------------------------------------------

def _int_list(text: str | None, flag: str) -> list[int] | None:
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


def _choice_list(text: str | None, flag: str, choices: tuple[str, ...]) -> list[str] | None:
    if text is None:
        return None
    values = [v for v in text.replace(" ", "").split(",") if v]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise UserError(f"{flag} {text!r}: choose from {', '.join(choices)} (comma-separated)")
    return list(dict.fromkeys(values))


def _seeds(text: str | None, base: int) -> list[int]:
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


def _jobs(j: int | None) -> int:
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


def _progress(prefix: str, result: dict, job) -> str:
    """One finished run's progress line: its errors and time, or why it failed."""
    if "summary" in result:
        s = result["summary"]
        return (f"{prefix}: final test error {_pct(s['final_test_error'])}, best "
                f"{_pct(s['best_test_error'])}, {s['wall_s']:.1f} s")
    return f"{prefix}: FAILED: {result['error']} (log: {job.run_dir / LOG})"


def _runs_dir(out_arg: str) -> tuple[Path, Path]:
    """``--out`` and its ``runs/`` folder, created; a one-line error when it cannot be."""
    out = Path(out_arg)
    runs = out / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {runs} ({err.strerror or err}); choose a writable --out") \
            from None
    return out, runs


def _base_config(args) -> tuple[RunConfig, str]:
    recipe = args.recipe or DEFAULT_RECIPE
    return apply_sets(load_recipe(recipe), list(args.set or [])), recipe_label(recipe)


# --------------------------------------------------------------------------------------------
# Jobs: one training run each, in a spawned child
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    name: str
    config: RunConfig
    run_dir: Path
    kind: str = "qtrain"  # qtrain or brevitas
    bits: int = 8  # the Brevitas peer's width
    resume: bool = False


def _threads(jobs: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def _die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent exits, so runs started
    by a killed ``qtrain sweep``/``compare`` stop with it instead of training on."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - best effort
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _init_child(threads: int) -> None:
    """Pool initializer: pin thread counts before torch/numba are imported in the child, and
    stop the child when the parent dies."""
    _die_with_parent()
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _run_job(job: Job, download: bool, label: str | None) -> dict:
    """Train one job (in a child); ``{"summary": ...}`` or ``{"error": one line}``."""
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        # the per-epoch lines and the progress bar go to the run's log, not the sweep's output
        with contextlib.redirect_stderr(log):
            if job.kind == "brevitas":
                from .peers import train_brevitas

                summary = train_brevitas(job.config, job.run_dir, bits=job.bits,
                                         download=download, stdout=log, recipe=label)
            else:
                from .run import train

                summary = train(job.config, job.run_dir, resume=job.resume, download=download,
                                stdout=log, recipe=label)
        result = {"summary": summary}
    except UserError as err:
        result = {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - a failed run must not stop the sweep
        log.write(traceback.format_exc())
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    result["elapsed_s"] = time.perf_counter() - t0
    try:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        with open(job.run_dir / LOG, "a") as f:
            f.write(log.getvalue())
    except OSError:
        pass
    return result


def _finished_summary(job: Job) -> dict | None:
    """The summary of a finished run in ``job.run_dir``, or None (then it is (re)trained).

    A run directory holding another config is an error; an unfinished qtrain run is resumed.
    """
    from .run import CONFIG, SUMMARY

    cfg_path = job.run_dir / CONFIG
    if not cfg_path.is_file():
        return None
    try:
        saved = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        saved = None
    wanted = job.config.to_dict()
    if isinstance(saved, dict):
        diff = [k for k in wanted if k not in _IGNORED_FIELDS and saved.get(k) != wanted[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{job.run_dir} holds a run with {k}={saved.get(k)!r}, this sweep "
                            f"wants {k}={wanted[k]!r}; use another --out or delete that run")
    try:
        summary = json.loads((job.run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = None
    if summary and summary.get("epochs_done", 0) >= job.config.epochs:
        return summary
    job.resume = job.kind == "qtrain" and saved is not None
    return None


def _execute(jobs: list[Job], n_jobs: int, download: bool, label: str | None,
             on_done) -> None:
    """Run ``jobs``, ``n_jobs`` spawned processes side by side (``n_jobs`` 1: in this process);
    ``on_done(job, result)`` after each."""
    if not jobs:
        return
    if n_jobs == 1:  # one at a time: in this process (no start-up cost of a spawned child)
        for job in jobs:
            on_done(job, _run_job(job, download, label))
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = min(n_jobs, len(jobs))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_child,
                             initargs=(_threads(n_jobs),)) as pool:
        pending = {pool.submit(_run_job, job, download, label): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as err:  # noqa: BLE001 - e.g. a child killed
                        result = {"error": f"{type(err).__name__}: {err}"}
                    on_done(job, result)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _say(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------

def run_name(cfg: RunConfig) -> str:
    """``<norm>-<backend|float>-W?A?G?E?-s<seed>``: a float run does not depend on the backend."""
    float_run = min(cfg.bits_w, cfg.bits_a, cfg.bits_g, cfg.bits_e) == FLOAT_BITS
    return f"{cfg.norm}-{'float' if float_run else cfg.backend}-{cfg.bits}-s{cfg.seed}"


def _widths(args, base: RunConfig) -> list[tuple[int, int, int, int]]:
    together = _int_list(args.bits, "--bits")
    per = {c: _int_list(getattr(args, f"bits_{c}"), f"--bits-{c}") for c in CLASSES}
    out: list[tuple[int, int, int, int]] = []
    if getattr(args, "one_at_a_time", False):
        if not any(per.values()):
            raise UserError("--one-at-a-time needs at least one --bits-w/-a/-g/-e list")
        if together is not None and len(together) != 1:
            raise UserError("--one-at-a-time takes one --bits width for the classes held fixed, "
                            f"got {args.bits!r}")
        fixed = [together[0] if together else getattr(base, f"bits_{c}") for c in CLASSES]
        out.append(tuple(fixed))  # every line's reference point
        for i, c in enumerate(CLASSES):
            for v in per[c] or []:
                out.append(tuple(v if j == i else fixed[j] for j in range(len(CLASSES))))
        return list(dict.fromkeys(out))
    for b in together or [None]:
        lists = [per[c] or [b if b is not None else getattr(base, f"bits_{c}")] for c in CLASSES]
        out += list(itertools.product(*lists))
    return list(dict.fromkeys(out))


def _default_backend(base: RunConfig, norm: str) -> str:
    """Without --backend: the recipe's, except that float L2BN in a quantized network needs
    emulate (the int backend runs integer L1BN only)."""
    return "emulate" if base.backend == "int" and norm == "l2" else base.backend


def _varied(widths: tuple[int, ...], fixed: tuple[int, ...] | None) -> str | None:
    """In a one-at-a-time sweep, the class whose width differs from the fixed ones (None for
    the run with every class at the fixed width, which belongs to every line)."""
    if fixed is None:
        return None
    diff = [c for c, w, f in zip(CLASSES, widths, fixed) if w != f]
    return diff[0] if diff else None


def _cannot_run(cfg_or_error) -> str | None:
    """Why a combination cannot run (one line), or None."""
    if isinstance(cfg_or_error, Exception):
        return str(cfg_or_error)
    from .run import build

    try:
        h, w, c = DATASETS[cfg_or_error.data]
        build(cfg_or_error, (h, w, c))
    except UserError as err:
        return str(err)
    return None


def _describe(r: dict) -> str:
    return (f"{r['norm']} {r['backend']} W{r['bits_w']}A{r['bits_a']}G{r['bits_g']}"
            f"E{r['bits_e']} seed {r['seed']}")


def _record(job_cfg: RunConfig, name: str, backend: str, run_dir: Path | None, status: str,
            summary: dict | None = None, reason: str | None = None) -> dict:
    s = summary or {}
    return {"name": name, "bits_w": job_cfg.bits_w, "bits_a": job_cfg.bits_a,
            "bits_g": job_cfg.bits_g, "bits_e": job_cfg.bits_e, "norm": job_cfg.norm,
            "backend": backend, "seed": job_cfg.seed,
            "final_test_error": s.get("final_test_error"),
            "best_test_error": s.get("best_test_error"), "wall_s": s.get("wall_s"),
            "epochs_done": s.get("epochs_done"), "status": status, "reason": reason,
            "run_dir": str(run_dir) if run_dir is not None else None, "varied": None}


def run_sweep(args) -> int:
    """``qtrain sweep``: 0 when every runnable combination finished, 1 when a run failed."""
    base, label = _base_config(args)
    norms = _choice_list(args.norm, "--norm", NORMS) or [base.norm]
    backends = _choice_list(args.backend, "--backend", BACKENDS)
    seeds = _seeds(args.seeds, base.seed)
    n_jobs = _jobs(args.jobs)
    widths = _widths(args, base)
    together = _int_list(args.bits, "--bits")
    fixed = (tuple(together[0] if together else getattr(base, f"bits_{c}") for c in CLASSES)
             if getattr(args, "one_at_a_time", False) else None)
    out, runs = _runs_dir(args.out)

    records: list[dict] = []
    jobs: dict[str, Job] = {}
    job_records: dict[str, dict] = {}
    combos = [(w, norm, backend, seed) for w, norm in itertools.product(widths, norms)
              for backend in backends or [_default_backend(base, norm)] for seed in seeds]
    for (bw, ba, bg, be), norm, backend, seed in combos:
        try:
            cfg = dataclasses.replace(base, bits_w=bw, bits_a=ba, bits_g=bg, bits_e=be,
                                      norm=norm, backend=backend, seed=seed)
        except UserError as err:
            cfg = err
        if isinstance(cfg, Exception):
            rec = {"name": None, "bits_w": bw, "bits_a": ba, "bits_g": bg, "bits_e": be,
                   "norm": norm, "backend": backend, "seed": seed}
            rec = {k: rec.get(k) for k in RECORD_FIELDS}
            rec.update(status="skipped", reason=str(cfg), varied=_varied((bw, ba, bg, be), fixed))
            records.append(rec)
            continue
        name = run_name(cfg)
        if "-float-" in name:  # one canonical config, whichever backend list found it first
            cfg = dataclasses.replace(cfg, backend="emulate")
        if name in jobs or any(r["name"] == name for r in records):
            continue  # a float run shared by several backends
        shown_backend = "float" if "-float-" in name else backend
        reason = _cannot_run(cfg)
        if reason is not None:
            records.append(_record(cfg, name, shown_backend, None, "skipped", reason=reason))
            continue
        job = Job(name, cfg, runs / name)
        summary = _finished_summary(job)
        if summary is not None:
            records.append(_record(cfg, name, shown_backend, job.run_dir, "finished", summary))
            continue
        rec = _record(cfg, name, shown_backend, job.run_dir, "pending")
        records.append(rec)
        jobs[name] = job
        job_records[name] = rec

    for r in records:
        if r["name"] is not None:
            r["varied"] = _varied(tuple(r[f"bits_{c}"] for c in CLASSES), fixed)
    for r in records:
        if r["status"] == "skipped":
            _say(f"skipped {_describe(r)}: {r['reason']}")
        elif r["status"] == "finished":
            _say(f"skipped {_describe(r)}: finished before ({r['run_dir']}), final test error "
                 f"{_pct(r['final_test_error'])}")
    total = len(jobs)
    _say(f"sweep: {len(records)} combinations, {total} to train "
         f"({sum(r['status'] == 'finished' for r in records)} finished before, "
         f"{sum(r['status'] == 'skipped' for r in records)} cannot run), {n_jobs} job(s) x "
         f"{_threads(n_jobs)} thread(s); runs in {runs}")
    write_sweep(out, records)
    count = 0

    def on_done(job: Job, result: dict) -> None:
        nonlocal count
        count += 1
        rec = job_records[job.name]
        if "summary" in result:
            s = result["summary"]
            rec.update(status="trained", final_test_error=s.get("final_test_error"),
                       best_test_error=s.get("best_test_error"), wall_s=s.get("wall_s"),
                       epochs_done=s.get("epochs_done"))
            _say(_progress(f"[{count}/{total}] {_describe(rec)}", result, job)
                 + f" -> {job.run_dir}")
        else:
            rec.update(status="failed", reason=result["error"])
            _say(_progress(f"[{count}/{total}] {_describe(rec)}", result, job))
        write_sweep(out, records, plot=False)

    _execute(list(jobs.values()), n_jobs, not args.no_download, label, on_done)
    write_sweep(out, records)
    ok = sum(r["status"] in ("trained", "finished") for r in records)
    failed = sum(r["status"] == "failed" for r in records)
    _say(f"sweep done: {ok} runs finished, {failed} failed, "
         f"{sum(r['status'] == 'skipped' for r in records)} skipped; {out / 'sweep.json'}, "
         f"{out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 1 if failed else 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def write_sweep(out: Path, records: list[dict], plot: bool = True) -> None:
    """``sweep.json`` and ``sweep.csv`` (and ``sweep.png`` when ``plot``), atomically."""
    write_text(out / "sweep.json", json.dumps(records, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in RECORD_FIELDS})
    write_text(out / "sweep.csv", buf.getvalue())
    if plot:
        plot_sweep(out / "sweep.png", records)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_sweep(path: Path, records: list[dict]) -> None:
    """Test error vs bit width: a line per norm/backend (and fixed widths), mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["status"] in ("trained", "finished")
            and r["final_test_error"] is not None]
    keys = [f"bits_{c}" for c in CLASSES]
    all_equal = all(len({r[k] for k in keys}) == 1 for r in done)
    if any(r.get("varied") for r in done):
        return _plot_one_at_a_time(path, done, plt)
    if all_equal:
        xkey, xlabel, fixed = "bits_w", "bit width (W = A = G = E)", []
    else:
        varying = [k for k in keys if len({r[k] for r in done}) > 1] or ["bits_e"]
        xkey = varying[0]
        xlabel = f"bit width of {dict(bits_w='weights', bits_a='activations', bits_g='weight gradients', bits_e='errors')[xkey]} ({xkey})"  # noqa: E501
        fixed = [k for k in keys if k != xkey]
    xs = sorted({r[xkey] for r in done})
    pos = {x: i + (0.5 if x == FLOAT_BITS and len(xs) > 1 else 0) for i, x in enumerate(xs)}

    def line_key(r):
        return (r["norm"], r["backend"], tuple(r[k] for k in fixed))

    lines: dict[tuple, dict[int, list[float]]] = {}
    float_points: dict[tuple, dict[int, list[float]]] = {}
    for r in done:
        target = float_points if r["backend"] == "float" else lines
        target.setdefault(line_key(r), {}).setdefault(r[xkey], []).append(
            100 * r["final_test_error"])
    # a float run belongs to every backend's line of its norm
    for (norm, _, fx), pts in float_points.items():
        owners = [k for k in lines if k[0] == norm and k[2] == fx]
        for k in owners or [(norm, "float", fx)]:
            for x, v in pts.items():
                lines.setdefault(k, {}).setdefault(x, []).extend(v)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, pts) in enumerate(sorted(lines.items())):
        norm, backend, fx = key
        xv = sorted(pts)
        stats = [_mean_std(pts[x]) for x in xv]
        label = f"{norm.upper()}BN, {backend}" if norm != "none" else f"no BN, {backend}"
        if fx:
            label += " (" + ", ".join(f"{k[-1].upper()}{v}" for k, v in zip(fixed, fx)) + ")"
        ax.errorbar([pos[x] for x in xv], [m for m, _ in stats], yerr=[s for _, s in stats],
                    marker="o", capsize=3, label=label, color=f"C{i % 10}")
    if xs:
        ax.set_xticks([pos[x] for x in xs])
        ax.set_xticklabels([f"{x}\nfloat" if x == FLOAT_BITS else str(x) for x in xs])
        if FLOAT_BITS in xs and len(xs) > 1:
            ax.axvline(pos[FLOAT_BITS] - 0.75, color="0.7", ls=":", lw=1)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center",
                transform=ax.transAxes)
    n_seeds = max((len(v) for pts in lines.values() for v in pts.values()), default=0)
    ax.set(xlabel=xlabel, ylabel="final test error (%)",
           title=f"test error vs bit width (mean ± std over {n_seeds} seed(s))")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)


_CLASS_NAMES = {"w": "weights", "a": "activations", "g": "weight gradients", "e": "errors"}


def _plot_one_at_a_time(path: Path, done: list[dict], plt) -> None:
    """A one-at-a-time sweep: a line per varied class (and norm/backend), mean ± std; the run
    with every class at the fixed width is a point of every line."""
    lines: dict[tuple, dict[int, list[float]]] = {}
    for r in done:
        classes = [r["varied"]] if r.get("varied") else \
            sorted({x["varied"] for x in done if x.get("varied")})
        for c in classes:
            lines.setdefault((c, r["norm"], r["backend"]), {}).setdefault(
                r[f"bits_{c}"], []).append(100 * r["final_test_error"])
    fixed = [r for r in done if not r.get("varied")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = sorted({x for pts in lines.values() for x in pts})
    pos = {x: i for i, x in enumerate(xs)}
    for i, ((c, norm, backend), pts) in enumerate(sorted(lines.items(), key=lambda kv: (
            CLASSES.index(kv[0][0]), kv[0][1:]))):
        xv = sorted(pts)
        stats = [_mean_std(pts[x]) for x in xv]
        label = f"{_CLASS_NAMES[c]} ({c.upper()})"
        if len({(k[1], k[2]) for k in lines}) > 1:
            label += f", {norm.upper()}BN {backend}"
        ax.errorbar([pos[x] + 0.04 * (i - 1.5) for x in xv], [m for m, _ in stats],
                    yerr=[s for _, s in stats], marker="o", capsize=3, label=label,
                    color=f"C{i % 10}")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{x}\nfloat" if x == FLOAT_BITS else str(x) for x in xs])
    held = (f"the others at {fixed[0]['bits_w']} bits" if fixed
            else "the others at their fixed widths")
    n_seeds = max((len(v) for pts in lines.values() for v in pts.values()), default=0)
    ax.set(xlabel=f"bit width of one tensor class ({held})", ylabel="final test error (%)",
           title=f"test error vs bit width, one class at a time (mean ± std over {n_seeds} "
                 "seed(s))")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------

COMPARE_METHODS = ("int", "float-l1", "float-l2", "brevitas")


def _compare_methods(base: RunConfig, bits: int) -> list[tuple[str, str, dict, str]]:
    """(key, description, RunConfig changes, kind) of the compared methods, in
    :data:`COMPARE_METHODS`' order."""
    f = FLOAT_BITS
    return [
        (f"int{bits}-L1BN", f"integer L1BN W{bits}A{bits}G{bits}E{bits}, int backend",
         dict(norm="l1", backend="int", bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits),
         "qtrain"),
        ("float-L1BN", "float32 network with L1 batch norm",
         dict(norm="l1", bits_w=f, bits_a=f, bits_g=f, bits_e=f), "qtrain"),
        ("float-L2BN", "float32 network with standard (L2) batch norm",
         dict(norm="l2", bits_w=f, bits_a=f, bits_g=f, bits_e=f), "qtrain"),
        (f"brevitas-W{bits}A{bits}", f"Brevitas W{bits}A{bits} QAT (fixed-point per-tensor "
         "quantizers, float BN, float gradients), torch SGD",
         dict(norm="l2", bits_w=f, bits_a=f, bits_g=f, bits_e=f), "brevitas"),
    ]


def _history(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                .splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def run_compare(args) -> int:
    """``qtrain compare``: 0 when every method that could run finished, 1 when one failed."""
    from .peers import BREVITAS_MODELS, brevitas_available

    base, label = _base_config(args)
    bits = args.bits
    if not 2 <= bits <= 16:
        raise UserError(f"--bits {bits}: the integer L1BN run takes 2..16 bits")
    chosen = _choice_list(getattr(args, "methods", None), "--methods", COMPARE_METHODS) \
        or list(COMPARE_METHODS)
    seeds = _seeds(args.seeds, base.seed)
    n_jobs = _jobs(args.jobs)
    out, runs = _runs_dir(args.out)

    methods: dict[str, dict] = {}
    jobs: list[Job] = []
    for name, (key, desc, changes, kind) in zip(COMPARE_METHODS, _compare_methods(base, bits)):
        if name not in chosen:
            continue
        m = {"method": key, "description": desc, "kind": kind, "status": "ok", "reason": None,
             "runs": {}}
        methods[key] = m
        if kind == "brevitas" and not brevitas_available():
            m.update(status="skipped", reason="brevitas is not installed (pip install -e "
                                              ".[bench])")
            print(f"skipped {key}: {m['reason']}", flush=True)
            continue
        if kind == "brevitas" and base.model not in BREVITAS_MODELS:
            m.update(status="skipped", reason=f"the Brevitas peer builds "
                                              f"{', '.join(BREVITAS_MODELS)}, not {base.model}")
            continue
        for seed in seeds:
            try:
                cfg = dataclasses.replace(base, seed=seed, **changes)
            except UserError as err:
                m.update(status="skipped", reason=str(err))
                break
            reason = _cannot_run(cfg) if kind == "qtrain" else None
            if reason is not None:
                m.update(status="skipped", reason=reason)
                break
            job = Job(f"{key}-s{seed}", cfg, runs / f"{key}-s{seed}", kind=kind, bits=bits)
            summary = _finished_summary(job)
            m["runs"][seed] = {"run_dir": str(job.run_dir), "status": "finished"
                               if summary else "pending", "summary": summary}
            if summary is None:
                jobs.append(job)
        if m["status"] == "skipped":
            m["runs"] = {}
            _say(f"skipped {key}: {m['reason']}")
    for m in methods.values():
        for seed, r in m["runs"].items():
            if r["status"] == "finished":
                _say(f"skipped {m['method']} seed {seed}: finished before ({r['run_dir']})")
    _say(f"compare: {len(jobs)} run(s) to train, seeds {', '.join(map(str, seeds))}; runs in "
         f"{runs}")
    count = 0

    def on_done(job: Job, result: dict) -> None:
        nonlocal count
        count += 1
        key, seed = job.name.rsplit("-s", 1)
        r = methods[key]["runs"][int(seed)]
        if "summary" in result:
            r.update(status="trained", summary=result["summary"])
        else:
            r.update(status="failed", reason=result["error"])
        _say(_progress(f"[{count}/{len(jobs)}] {key} seed {seed}", result, job))

    _execute(jobs, n_jobs, not args.no_download, label, on_done)

    results = []
    for m in methods.values():
        results.append(_compare_stats(m))
    report = {"bits": bits, "seeds": seeds, "recipe": label, "methods_chosen": chosen, "config": base.to_dict(),
              "jobs": n_jobs, "methods": results}
    write_text(out / "compare.json", json.dumps(report, indent=1) + "\n")
    plot_compare(out / "compare.png", results, label)
    print(compare_table(results, seeds))
    _say(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return 1 if any(r["status"] == "failed" for m in methods.values()
                    for r in m["runs"].values()) else 0


def _compare_stats(m: dict) -> dict:
    finished = {s: r for s, r in m["runs"].items() if r["status"] in ("finished", "trained")}
    out = {k: m[k] for k in ("method", "description", "kind", "status", "reason")}
    out["runs"] = [{"seed": s, "run_dir": r["run_dir"], "status": r["status"],
                    "reason": r.get("reason"),
                    "final_test_error": (r.get("summary") or {}).get("final_test_error"),
                    "best_test_error": (r.get("summary") or {}).get("best_test_error"),
                    "wall_s": (r.get("summary") or {}).get("wall_s")}
                   for s, r in sorted(m["runs"].items())]
    if m["status"] == "ok" and not finished:
        out["status"] = "failed"
    histories = [_history(Path(r["run_dir"])) for r in finished.values()]
    histories = [h for h in histories if h]
    for what in ("final", "best"):
        vals = [r["summary"][f"{what}_test_error"] for r in finished.values()]
        mean, std = _mean_std(vals) if vals else (None, None)
        out[f"{what}_test_error_mean"], out[f"{what}_test_error_std"] = mean, std
    epoch_s = [e["seconds"] for h in histories for e in h]
    out["epoch_s_mean"] = statistics.fmean(epoch_s) if epoch_s else None
    out["seeds_done"] = len(finished)
    n = min((len(h) for h in histories), default=0)
    out["curve_epochs"] = list(range(1, n + 1))
    out["curve_test_error_mean"] = [statistics.fmean(h[i]["test_error"] for h in histories)
                                    for i in range(n)]
    out["curve_test_error_std"] = [_mean_std([h[i]["test_error"] for h in histories])[1]
                                   for i in range(n)]
    return out


def compare_table(results: list[dict], seeds: list[int]) -> str:
    def pm(mean, std):
        return "-" if mean is None else f"{100 * mean:6.2f} ± {100 * std:4.2f}"

    head = (f"{'method':<16} {'final test error %':>20} {'best test error %':>20} "
            f"{'epoch s':>8} {'seeds':>5}")
    lines = [f"test error over seeds {', '.join(map(str, seeds))} (mean ± std)", head,
             "-" * len(head)]
    for r in results:
        if r["status"] == "skipped":
            lines.append(f"{r['method']:<16} skipped: {r['reason']}")
            continue
        es = "-" if r["epoch_s_mean"] is None else f"{r['epoch_s_mean']:8.2f}"
        lines.append(f"{r['method']:<16} {pm(r['final_test_error_mean'], r['final_test_error_std']):>20} "  # noqa: E501
                     f"{pm(r['best_test_error_mean'], r['best_test_error_std']):>20} {es:>8} "
                     f"{r['seeds_done']:>5}")
    return "\n".join(lines)


def plot_compare(path: Path, results: list[dict], label: str | None) -> None:
    """Test error per epoch per method (mean over seeds, std band), as the paper's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for i, r in enumerate(results):
        if not r["curve_epochs"]:
            continue
        x = r["curve_epochs"]
        y = [100 * v for v in r["curve_test_error_mean"]]
        s = [100 * v for v in r["curve_test_error_std"]]
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, color=f"C{i}",
                label=f"{r['method']} ({r['seeds_done']} seed(s))")
        ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                        color=f"C{i}", alpha=0.15, lw=0)
        drawn += 1
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="test error (%)",
           title=f"test error per epoch{f' ({label})' if label else ''}, mean over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)
