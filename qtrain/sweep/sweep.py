"""``qtrain sweep``: train every combination of a recipe's grid (:mod:`.grid`) as jobs
(:mod:`.jobs`), keep a :class:`~.records.Record` of each, and write ``sweep.json``,
``sweep.csv`` and ``sweep.png`` (:mod:`.plots`) atomically, again after every finished run.

Across machines (array jobs over a shared ``--out``), ``--shard K/N`` trains only the K-th of
N disjoint shares of the grid (:func:`~.grid.shard_of`, on the grid's canonical order) and
writes no summary while the grid is incomplete: the shard that finds every point finished
writes it, or ``--collect`` does later, training nothing. Every sweep saves its grid (the
resolved recipe and the lists) in :data:`GRID`, so ``qtrain sweep --out DIR --collect`` needs
no other argument."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from pathlib import Path

from ..config import BACKENDS, NORMS, RunConfig, UserError
from ..files import write_text
from .args import (base_config, choice_list, job_count, on_device, runs_dir, seed_list,
                   shard_spec)
from .grid import cannot_run, combinations, run_name, shard_share, varied, widths
from .jobs import Job, execute, finished_summary, pct, progress, say, thread_count
from .plots import plot_sweep
from .records import RECORD_FIELDS, Record

#: The grid a sweep trains, saved in its ``--out``: ``{"recipe", "base", "grid"}``.
GRID = "sweep-grid.json"
#: The options that, with the resolved recipe, define the grid.
GRID_OPTIONS = ("bits", "bits_w", "bits_a", "bits_g", "bits_e", "one_at_a_time", "norm",
                "backend", "seeds")


@dataclasses.dataclass
class Point:
    """One grid point: its record and, when it can run, its job."""

    record: Record
    job: Job | None = None

    def refreshed(self) -> Record:
        """The record as the run directory now says: ``finished`` or ``pending``."""
        if self.job is None:
            return self.record
        summary = finished_summary(self.job)
        rec = Record.of(self.job.config, self.job.name, self.record.backend, self.job.run_dir,
                        "pending" if summary is None else "finished", summary)
        rec.varied = self.record.varied
        return rec


def plan(base: RunConfig, grid, runs: Path) -> list[Point]:
    """Every point of the grid (``grid``: the :data:`GRID_OPTIONS` as attributes) in canonical
    order: skipped (cannot run), finished (its run says so) or pending; on ``--device``
    where the run can use it."""
    norms = choice_list(grid.norm, "--norm", NORMS) or [base.norm]
    backends = choice_list(grid.backend, "--backend", BACKENDS)
    seeds = seed_list(grid.seeds, base.seed)
    device = getattr(grid, "device", None)  # --device: the runs that can use one
    sizes, fixed = widths(grid, base)
    points: list[Point] = []
    names: set[str] = set()
    for (bw, ba, bg, be), norm, backend, seed in combinations(sizes, norms, backends, seeds,
                                                              base):
        try:
            cfg = dataclasses.replace(base, bits_w=bw, bits_a=ba, bits_g=bg, bits_e=be,
                                      norm=norm, backend=backend, seed=seed)
        except UserError as err:
            points.append(Point(Record(None, bw, ba, bg, be, norm, backend, seed,
                                       status="skipped", reason=str(err),
                                       varied=varied((bw, ba, bg, be), fixed))))
            continue
        name = run_name(cfg)
        if "-float-" in name:  # one canonical config, whichever backend list found it first
            cfg = dataclasses.replace(cfg, backend="emulate")
        cfg = on_device(cfg, device)
        if name in names:
            continue  # a float run shared by several backends
        names.add(name)
        shown_backend = "float" if "-float-" in name else backend
        reason = cannot_run(cfg)
        if reason is not None:
            point = Point(Record.of(cfg, name, shown_backend, None, "skipped", reason=reason))
        else:
            job = Job(name, cfg, runs / name)
            summary = finished_summary(job)
            point = Point(Record.of(cfg, name, shown_backend, job.run_dir,
                                    "pending" if summary is None else "finished", summary), job)
        point.record.varied = varied(point.record.widths, fixed)
        points.append(point)
    return points


def run_sweep(args) -> int:
    """``qtrain sweep``: 0 when every runnable combination (of the shard) finished, 1 when a
    run failed; ``--collect`` writes the summary files only."""
    shard = shard_spec(getattr(args, "shard", None))
    if getattr(args, "collect", False):
        if shard is not None:
            raise UserError("--collect trains nothing, so it takes no --shard; drop --shard")
        return collect(args)
    base, label = base_config(args)
    n_jobs = job_count(args.jobs)
    points = plan(base, args, Path(args.out) / "runs")
    out, runs = runs_dir(args.out)
    save_grid(out, base, label, args)

    mine = points if shard is None else shard_share(points, *shard)
    records = [p.record for p in mine]
    jobs = {p.job.name: p.job for p in mine if p.record.status == "pending"}
    job_records = {p.job.name: p.record for p in mine if p.record.status == "pending"}
    for r in records:
        if r.status == "skipped":
            say(f"skipped {r.describe()}: {r.reason}")
        elif r.status == "finished":
            say(f"skipped {r.describe()}: finished before ({r.run_dir}), final test error "
                f"{pct(r.final_test_error)}")
    total = len(jobs)
    share = "" if shard is None else f"shard {shard[0]}/{shard[1]}: {len(mine)} of "
    say(f"sweep: {share}{len(points)} combinations, {total} to train "
        f"({sum(r.status == 'finished' for r in records)} finished before, "
        f"{sum(r.status == 'skipped' for r in records)} cannot run), {n_jobs} job(s) x "
        f"{thread_count(n_jobs)} thread(s); runs in {runs}")
    if shard is None:
        write_sweep(out, records)
    count = 0

    def on_done(job: Job, result: dict) -> None:
        nonlocal count
        count += 1
        rec = job_records[job.name]
        if "summary" in result:
            rec.status = "trained"
            rec.add_summary(result["summary"])
            say(progress(f"[{count}/{total}] {rec.describe()}", result, job)
                + f" -> {job.run_dir}")
        else:
            rec.status, rec.reason = "failed", result["error"]
            say(progress(f"[{count}/{total}] {rec.describe()}", result, job))
        if shard is None:  # shards share --out: only a complete grid is written
            write_sweep(out, records, plot=False)

    execute(list(jobs.values()), n_jobs, not args.no_download, label, on_done)
    ok = sum(r.status in ("trained", "finished") for r in records)
    failed = sum(r.status == "failed" for r in records)
    counts = (f"{ok} runs finished, {failed} failed, "
              f"{sum(r.status == 'skipped' for r in records)} skipped")
    if shard is None:
        write_sweep(out, records)
        say(f"sweep done: {counts}; {out / 'sweep.json'}, {out / 'sweep.csv'}, "
            f"{out / 'sweep.png'}")
        return 1 if failed else 0
    say(f"sweep shard {shard[0]}/{shard[1]} done: {counts}")
    grid = [p.refreshed() for p in points]
    missing = [r for r in grid if r.status == "pending"]
    if missing:
        say(f"sweep: {len(missing)} of {len(grid)} grid points are not finished yet; the shard "
            f"that finishes the grid writes {out / 'sweep.json'}, or write it then with "
            f"qtrain sweep --out {out} --collect")
    else:
        write_sweep(out, grid)
        say(f"sweep complete: all {len(grid)} grid points done; {out / 'sweep.json'}, "
            f"{out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 1 if failed else 0


def collect(args) -> int:
    """``qtrain sweep --collect``: the summary files of a finished grid, training nothing; a
    one-line error naming the points that are not finished."""
    out = Path(args.out)
    if any(getattr(args, k, None) for k in (*GRID_OPTIONS, "recipe", "set")):
        base, _ = base_config(args)
        grid = args
    else:
        base, grid = load_grid(out)
    records = [p.record for p in plan(base, grid, out / "runs")]
    missing = [r.name for r in records if r.status == "pending"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise UserError(f"{out}: {len(missing)} of {len(records)} grid points are not finished "
                        f"({shown}); train them (qtrain sweep with the same arguments, each "
                        "--shard K/N), then collect again")
    write_sweep(out, records)
    say(f"sweep collected: {sum(r.status == 'finished' for r in records)} runs finished, "
        f"{sum(r.status == 'skipped' for r in records)} skipped; {out / 'sweep.json'}, "
        f"{out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 0


def save_grid(out: Path, base: RunConfig, label: str, args) -> None:
    """:data:`GRID` in ``out``: the resolved recipe and the grid options (atomically)."""
    grid = {k: getattr(args, k, None) for k in GRID_OPTIONS}
    write_text(out / GRID, json.dumps({"recipe": label, "base": base.to_dict(), "grid": grid},
                                      indent=1) + "\n")


def load_grid(out: Path) -> tuple[RunConfig, argparse.Namespace]:
    """The base config and grid options that :func:`save_grid` saved in ``out``."""
    path = out / GRID
    try:
        saved = json.loads(path.read_text())
        values, options = saved["base"], saved["grid"]
        grid = argparse.Namespace(**{k: options.get(k) for k in GRID_OPTIONS})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        why = err.strerror if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
        raise UserError(f"cannot read the grid of the sweep in {out} from {path} ({why}); give "
                        "the sweep's arguments (--bits, --norm, --seeds, ...) with --collect") \
            from None
    return RunConfig.from_dict(values, str(path)), grid


def write_sweep(out: Path, records: list[Record], plot: bool = True) -> None:
    """``sweep.json`` and ``sweep.csv`` (and ``sweep.png`` when ``plot``), atomically."""
    rows = [r.to_dict() for r in records]
    write_text(out / "sweep.json", json.dumps(rows, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    write_text(out / "sweep.csv", buf.getvalue())
    if plot:
        plot_sweep(out / "sweep.png", records)
