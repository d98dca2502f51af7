"""``qtrain compare``: int8 L1BN (int backend), float L1BN, float L2BN and Brevitas W8A8 QAT
(:mod:`qtrain.peers`) trained on the same seeds and data order as jobs (:mod:`.jobs`); one table
(:func:`compare_table`), ``compare.json`` (per method: its runs, test error mean and std over
seeds, seconds per epoch, the mean test-error curve) and ``compare.png``
(:func:`~.plots.plot_compare`)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from ..config import FLOAT_BITS, RunConfig, UserError
from ..files import write_text
from .args import (COMPARE_METHODS, base_config, choice_list, job_count, on_device,
                   runs_dir, seed_list)
from .grid import cannot_run
from .jobs import Job, execute, finished_summary, progress, say
from .plots import plot_compare
from .records import mean_std


def _compare_methods(base: RunConfig, bits: int) -> list[tuple[str, str, dict, str]]:
    """(key, description, RunConfig changes, kind) of the compared methods, in
    :data:`COMPARE_METHODS`' order."""
    f = FLOAT_BITS
    # a float network rounds no error: its runs keep the error rules' defaults, whatever the
    # recipe sets for the integer run
    flt = dict(bits_w=f, bits_a=f, bits_g=f, bits_e=f, norm_errors="nearest", error_exp="batch")
    return [
        (f"int{bits}-L1BN", f"integer L1BN W{bits}A{bits}G{bits}E{bits}, int backend",
         dict(norm="l1", backend="int", bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits),
         "qtrain"),
        ("float-L1BN", "float32 network with L1 batch norm",
         dict(norm="l1", **flt), "qtrain"),
        ("float-L2BN", "float32 network with standard (L2) batch norm",
         dict(norm="l2", **flt), "qtrain"),
        (f"brevitas-W{bits}A{bits}", f"Brevitas W{bits}A{bits} QAT (fixed-point per-tensor "
         "quantizers, float BN, float gradients), torch SGD",
         dict(norm="l2", **flt), "brevitas"),
    ]


def _history(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                .splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def run_compare(args) -> int:
    """``qtrain compare``: 0 when every method that could run finished, 1 when one failed."""
    from ..peers import BREVITAS_MODELS, brevitas_available

    base, label = base_config(args)
    bits = args.bits
    if not 2 <= bits <= 16:
        raise UserError(f"--bits {bits}: the integer L1BN run takes 2..16 bits")
    chosen = choice_list(getattr(args, "methods", None), "--methods", COMPARE_METHODS) \
        or list(COMPARE_METHODS)
    seeds = seed_list(args.seeds, base.seed)
    n_jobs = job_count(args.jobs)
    out, runs = runs_dir(args.out)

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
            say(f"skipped {key}: {m['reason']}")
            continue
        if kind == "brevitas" and base.model not in BREVITAS_MODELS:
            m.update(status="skipped", reason=f"the Brevitas peer builds "
                                              f"{', '.join(BREVITAS_MODELS)}, not {base.model}")
            continue
        for seed in seeds:
            try:
                cfg = on_device(dataclasses.replace(base, seed=seed, **changes),
                                getattr(args, "device", None))
            except UserError as err:
                m.update(status="skipped", reason=str(err))
                break
            reason = cannot_run(cfg) if kind == "qtrain" else None
            if reason is not None:
                m.update(status="skipped", reason=reason)
                break
            job = Job(f"{key}-s{seed}", cfg, runs / f"{key}-s{seed}", kind=kind, bits=bits)
            summary = finished_summary(job)
            m["runs"][seed] = {"run_dir": str(job.run_dir), "status": "finished"
                               if summary else "pending", "summary": summary}
            if summary is None:
                jobs.append(job)
        if m["status"] == "skipped":
            m["runs"] = {}
            say(f"skipped {key}: {m['reason']}")
    for m in methods.values():
        for seed, r in m["runs"].items():
            if r["status"] == "finished":
                say(f"skipped {m['method']} seed {seed}: finished before ({r['run_dir']})")
    say(f"compare: {len(jobs)} run(s) to train, seeds {', '.join(map(str, seeds))}; runs in "
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
        say(progress(f"[{count}/{len(jobs)}] {key} seed {seed}", result, job))

    execute(jobs, n_jobs, not args.no_download, label, on_done)

    results = []
    for m in methods.values():
        results.append(_compare_stats(m))
    report = {"bits": bits, "seeds": seeds, "recipe": label, "methods_chosen": chosen,
              "config": base.to_dict(), "jobs": n_jobs, "methods": results}
    write_text(out / "compare.json", json.dumps(report, indent=1) + "\n")
    plot_compare(out / "compare.png", results, label)
    print(compare_table(results, seeds))
    say(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
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
        mean, std = mean_std(vals) if vals else (None, None)
        out[f"{what}_test_error_mean"], out[f"{what}_test_error_std"] = mean, std
    epoch_s = [e["seconds"] for h in histories for e in h]
    out["epoch_s_mean"] = statistics.fmean(epoch_s) if epoch_s else None
    out["seeds_done"] = len(finished)
    n = min((len(h) for h in histories), default=0)
    out["curve_epochs"] = list(range(1, n + 1))
    out["curve_test_error_mean"] = [statistics.fmean(h[i]["test_error"] for h in histories)
                                    for i in range(n)]
    out["curve_test_error_std"] = [mean_std([h[i]["test_error"] for h in histories])[1]
                                   for i in range(n)]
    return out


def compare_table(results: list[dict], seeds: list[int]) -> str:
    """The table ``qtrain compare`` prints: a row per method of ``compare.json``."""
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
        final = pm(r["final_test_error_mean"], r["final_test_error_std"])
        best = pm(r["best_test_error_mean"], r["best_test_error_std"])
        lines.append(f"{r['method']:<16} {final:>20} {best:>20} {es:>8} {r['seeds_done']:>5}")
    return "\n".join(lines)
