"""``qtrain sweep``: train every combination of a recipe's grid (:mod:`.grid`) as jobs
(:mod:`.jobs`), keep a :class:`~.records.Record` of each, and write ``sweep.json``,
``sweep.csv`` and ``sweep.png`` (:mod:`.plots`) atomically, again after every finished run."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from ..config import BACKENDS, NORMS, UserError
from ..files import write_text
from .args import base_config, choice_list, job_count, runs_dir, seed_list
from .grid import cannot_run, combinations, run_name, varied, widths
from .jobs import Job, execute, finished_summary, pct, progress, say, thread_count
from .plots import plot_sweep
from .records import RECORD_FIELDS, Record


def run_sweep(args) -> int:
    """``qtrain sweep``: 0 when every runnable combination finished, 1 when a run failed."""
    base, label = base_config(args)
    norms = choice_list(args.norm, "--norm", NORMS) or [base.norm]
    backends = choice_list(args.backend, "--backend", BACKENDS)
    seeds = seed_list(args.seeds, base.seed)
    n_jobs = job_count(args.jobs)
    grid, fixed = widths(args, base)
    out, runs = runs_dir(args.out)

    records: list[Record] = []
    jobs: dict[str, Job] = {}
    job_records: dict[str, Record] = {}
    for (bw, ba, bg, be), norm, backend, seed in combinations(grid, norms, backends, seeds,
                                                              base):
        try:
            cfg = dataclasses.replace(base, bits_w=bw, bits_a=ba, bits_g=bg, bits_e=be,
                                      norm=norm, backend=backend, seed=seed)
        except UserError as err:
            records.append(Record(None, bw, ba, bg, be, norm, backend, seed, status="skipped",
                                  reason=str(err), varied=varied((bw, ba, bg, be), fixed)))
            continue
        name = run_name(cfg)
        if "-float-" in name:  # one canonical config, whichever backend list found it first
            cfg = dataclasses.replace(cfg, backend="emulate")
        if name in jobs or any(r.name == name for r in records):
            continue  # a float run shared by several backends
        shown_backend = "float" if "-float-" in name else backend
        reason = cannot_run(cfg)
        if reason is not None:
            records.append(Record.of(cfg, name, shown_backend, None, "skipped", reason=reason))
            continue
        job = Job(name, cfg, runs / name)
        summary = finished_summary(job)
        if summary is not None:
            records.append(Record.of(cfg, name, shown_backend, job.run_dir, "finished", summary))
            continue
        rec = Record.of(cfg, name, shown_backend, job.run_dir, "pending")
        records.append(rec)
        jobs[name] = job
        job_records[name] = rec

    for r in records:
        if r.name is not None:
            r.varied = varied(r.widths, fixed)
    for r in records:
        if r.status == "skipped":
            say(f"skipped {r.describe()}: {r.reason}")
        elif r.status == "finished":
            say(f"skipped {r.describe()}: finished before ({r.run_dir}), final test error "
                f"{pct(r.final_test_error)}")
    total = len(jobs)
    say(f"sweep: {len(records)} combinations, {total} to train "
        f"({sum(r.status == 'finished' for r in records)} finished before, "
        f"{sum(r.status == 'skipped' for r in records)} cannot run), {n_jobs} job(s) x "
        f"{thread_count(n_jobs)} thread(s); runs in {runs}")
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
        write_sweep(out, records, plot=False)

    execute(list(jobs.values()), n_jobs, not args.no_download, label, on_done)
    write_sweep(out, records)
    ok = sum(r.status in ("trained", "finished") for r in records)
    failed = sum(r.status == "failed" for r in records)
    say(f"sweep done: {ok} runs finished, {failed} failed, "
        f"{sum(r.status == 'skipped' for r in records)} skipped; {out / 'sweep.json'}, "
        f"{out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 1 if failed else 0


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
