"""Jobs: one training run each, ``--jobs`` of them side by side in spawned processes.

:func:`execute` runs a list of :class:`Job` (in this process when one at a time), each child
pinned to ``cores // jobs`` threads before torch and numba load (:func:`_init_child`) and
stopped by the kernel when its parent dies. :func:`finished_summary` decides, from a run
directory, whether a job is done (skipped), interrupted (resumed) or new. A run's per-epoch
lines and progress bar go to its ``train.log``, not to the sweep's output. The spawned
children import this module by name (``qtrain.sweep.jobs``) to unpickle :func:`_run_job`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from ..config import RunConfig, UserError

#: Fields whose difference from a saved run does not make it another run.
_IGNORED_FIELDS = ("epochs", "device", "data_dir")
LOG = "train.log"


@dataclasses.dataclass
class Job:
    """One training run: ``config`` trained into ``run_dir`` by :func:`qtrain.run.train`
    (``kind`` ``"qtrain"``, resumed when ``resume``) or by the Brevitas peer of width ``bits``
    (``kind`` ``"brevitas"``, :func:`qtrain.peers.train_brevitas`)."""

    name: str
    config: RunConfig
    run_dir: Path
    kind: str = "qtrain"  # qtrain or brevitas
    bits: int = 8  # the Brevitas peer's width
    resume: bool = False


def thread_count(jobs: int) -> int:
    """Threads per run: the cores this process may use, shared among ``jobs`` runs."""
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
                from ..peers import train_brevitas

                summary = train_brevitas(job.config, job.run_dir, bits=job.bits,
                                         download=download, stdout=log, recipe=label)
            else:
                from ..run import train

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


def _defaults() -> dict:
    """The defaults of the config fields a recipe may leave out (``config.DEFAULTED``), as
    ``to_dict`` writes them."""
    from ..config import DEFAULTED, RunConfig

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    return {k: fields[k].default for k in DEFAULTED}


def finished_summary(job: Job) -> dict | None:
    """The summary of a finished run in ``job.run_dir``, or None (then it is (re)trained).

    A run directory holding another config is an error; an unfinished qtrain run is resumed.
    """
    from ..run import CONFIG, SUMMARY

    cfg_path = job.run_dir / CONFIG
    if not cfg_path.is_file():
        return None
    try:
        saved = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        saved = None
    wanted = job.config.to_dict()
    if isinstance(saved, dict):
        saved = {**_defaults(), **saved}  # a field added since the run was made: its default
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


def execute(jobs: list[Job], n_jobs: int, download: bool, label: str | None,
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
                             initargs=(thread_count(n_jobs),)) as pool:
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


def say(line: str) -> None:
    print(line, flush=True)


def pct(v) -> str:
    """A test error as a percentage, ``-`` for none."""
    return "-" if v is None else f"{100 * v:.2f}%"


def progress(prefix: str, result: dict, job) -> str:
    """One finished run's progress line: its errors and time, or why it failed."""
    if "summary" in result:
        s = result["summary"]
        return (f"{prefix}: final test error {pct(s['final_test_error'])}, best "
                f"{pct(s['best_test_error'])}, {s['wall_s']:.1f} s")
    return f"{prefix}: FAILED: {result['error']} (log: {job.run_dir / LOG})"
