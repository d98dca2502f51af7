"""A training run: data, model and optimizer from a :class:`RunConfig`, one loop, a run directory.

The run directory (``--out``) holds

* ``config.json`` -- the fully resolved :class:`RunConfig`; ``qtrain --recipe DIR/config.json``
  repeats the run;
* ``metrics.jsonl`` -- one JSON object per epoch: ``epoch`` (1-based), ``lr``, ``train_loss``,
  ``train_error``, ``test_error``, ``seconds``, ``images_per_s`` and ``quant``, the per-layer
  saturation and zero-rounding counts of that epoch (:func:`qtrain.quant.quant_report`);
* ``summary.json`` -- final and best test error, wall time, bits, norm, backend, data source;
* ``checkpoint.pt`` -- model, optimizer, ``qstate.step``, epoch, config and metrics history;
* ``curves.png`` -- train loss and test error per epoch.

Every file is replaced atomically (written to a temporary file in the directory, then
``os.replace``), so a kill at any moment leaves the previous epoch's files intact. An epoch
ends by writing the checkpoint, then the curves and summary, then appending its metrics line:
a line in ``metrics.jsonl`` means everything of that epoch is on disk.

Resuming (:func:`resume_config`, ``train(..., resume=True)``) restores the model, the
optimizer's integer state and ``qstate.step``; since the data order depends only on
``(seed, epoch)`` and the rounding stream only on ``(seed, step, tensor id)``, a resumed run
ends with the same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from . import distributed as dist
from .config import RunConfig, UserError, input_problem
from .spec import model_is_user
from .files import (atomic_write, check_unlocked, lock_run_dir, remove_partial, save_figure,
                    write_text)

CONFIG, METRICS, SUMMARY, CHECKPOINT, CURVES = (
    "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png")
#: Fields that may differ between a run and its resumption (the rest must match).
RESUMABLE_CHANGES = ("epochs", "device")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def prepare_out(out: Path, *, resume: bool = False) -> Path:
    """Create (or, resuming, check) the run directory; one-line errors if that cannot be done."""
    if resume:
        if not (out / CONFIG).is_file():
            raise UserError(f"{out} is not a run directory (no {CONFIG}); give a directory "
                            "written by qtrain --out")
        return out
    if (out / CONFIG).exists():
        check_unlocked(out)  # a run still training there says so
        raise UserError(f"{out} already holds a run; continue it with --resume {out} or choose "
                        "another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".qtrain-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the run directory {out} ({err.strerror or err}); choose "
                        "a writable --out") from None
    return out


def read_config(run_dir: Path) -> RunConfig:
    try:
        values = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{run_dir / CONFIG} is unreadable ({err}); give a directory written by "
                        "qtrain --out") from None
    return RunConfig.from_dict(values, str(run_dir / CONFIG))


def resume_config(run_dir: Path, wanted: RunConfig | None = None,
                  given: tuple[str, ...] = ()) -> RunConfig:
    """The saved config of ``run_dir``, checked against the fields ``given`` on the command line.

    ``wanted`` is the saved config with the user's flags and ``--set`` values applied; a
    ``given`` field whose wanted value differs from the saved one is an error naming it, except
    :data:`RESUMABLE_CHANGES` (more epochs, another device), which are taken.
    """
    prepare_out(run_dir, resume=True)
    saved = read_config(run_dir)
    if wanted is None:
        return saved
    for key in given:
        if key not in RESUMABLE_CHANGES and getattr(saved, key) != getattr(wanted, key):
            raise UserError(f"--resume {run_dir}: {key}={getattr(wanted, key)!r} conflicts with "
                            f"the run's {key}={getattr(saved, key)!r}; drop it or start a new "
                            "run with --out")
    return dataclasses.replace(saved, **{k: getattr(wanted, k) for k in given
                                         if k in RESUMABLE_CHANGES})


def plot_curves(path: Path, history: list[dict]) -> None:
    """Train loss and test error per epoch, side by side (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [m["train_loss"] for m in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax2.plot(epochs, [100 * m["test_error"] for m in history], marker="o", color="C1")
    ax2.set(xlabel="epoch", ylabel="test error (%)", title="test error")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Data, model, optimizer
# --------------------------------------------------------------------------------------------

def load_data(cfg: RunConfig, *, download: bool = True):
    """``(train, test)`` datasets of ``cfg`` (the training set cut to ``per_class``)."""
    from . import data

    try:
        train, test = data.load_dataset(cfg.data, data_dir=cfg.data_dir,
                                        download_missing=download)
        if cfg.per_class is not None:
            train = data.stratified_subset(train, cfg.per_class, seed=cfg.seed)
    except UserError:
        raise
    except ValueError as err:  # data.DataError and argument checks: one line each
        raise UserError(str(err).splitlines()[0]) from None
    shape = train.images.shape[1:]  # the user's data: its shape is known only now
    if problem := input_problem(cfg.model, cfg.data, shape if len(shape) == 3 else (*shape, 1)):
        raise UserError(problem)
    return train, test


def build(cfg: RunConfig, in_shape: tuple[int, ...], classes: int = 10):
    """The model (initialized from ``cfg.seed``) for images of ``in_shape`` and ``classes``
    classes, and its optimizer, on ``cfg.device``."""
    import torch

    from .models import build as build_model
    from .optim import QSGD
    from .quant import QConfig

    h, w, c = in_shape if len(in_shape) == 3 else (*in_shape, 1)
    try:
        qconfig = QConfig(cfg.bits_w, cfg.bits_a, cfg.bits_g, cfg.bits_e, backend=cfg.backend,
                          store_bits=cfg.store_bits, stochastic_errors=cfg.stochastic_errors,
                          weight_exp=cfg.weight_exp, seed=cfg.seed, scheme=cfg.scheme,
                          error_exp=cfg.error_exp, norm_errors=cfg.norm_errors,
                          act_codes=cfg.act_codes, norm_input_exp=cfg.norm_input_exp)
        torch.manual_seed(cfg.seed)
        if model_is_user(cfg.model):  # --model package.module:function
            from . import usermodel

            model = usermodel.build(cfg.model, cfg.norm, qconfig, (h, w, c), classes)
        else:
            kwargs = {"in_features": h * w * c} if cfg.model == "mlp" else {"in_channels": c}
            model = build_model(cfg.model, cfg.norm, qconfig, classes=classes, **kwargs)
        device = torch.device(dist.process_device(cfg.device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device} is not available here; use --device cpu")
        model.to(device)
        optimizer = QSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, qconfig=qconfig,
                         weight_decay=cfg.weight_decay)
    except (ValueError, TypeError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    return model, optimizer


def _store_report(model, optimizer) -> dict:
    """Per parameter: the store's exponent and how far it rose this epoch (the weights behind
    batch norm grow; a diverging run shows up here)."""
    return {name: optimizer.stats[id(p)].as_dict() for name, p in model.named_parameters()
            if id(p) in optimizer.stats}


def save_checkpoint(path: Path, model, optimizer, epoch: int, cfg: RunConfig,
                    history: list[dict], wall_s: float,
                    provenance: list[dict] | None = None) -> None:
    import torch

    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": model.qstate.step, "epoch": epoch, "config": cfg.to_dict(),
            "history": history, "wall_s": wall_s, "provenance": provenance or []}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the user's to fix
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}); delete it to "
                        "restart the run from epoch 1") from None


def check_trained(run_dir: Path) -> None:
    """One-line :class:`UserError` unless ``run_dir`` is a run directory with a checkpoint."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give a run directory written by "
                        "qtrain --out")
    prepare_out(run_dir, resume=True)  # UserError: not a run directory
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINT} (no epoch finished yet); train it "
                        f"first: qtrain --resume {run_dir}")


def load_trained(run_dir: Path, data_dir: str | None = None):
    """A finished epoch of a run, for the commands that read one (stats, export): ``(cfg,
    model, optimizer, checkpoint, train_set, test_set)``, on CPU, the model and optimizer
    loaded from ``RUN_DIR/checkpoint.pt``. One-line :class:`UserError` for a directory that is
    not a run, has no checkpoint, or whose checkpoint does not fit its config."""
    import dataclasses

    check_trained(run_dir)
    cfg = dataclasses.replace(read_config(run_dir), device="cpu")
    if data_dir:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    train_set, test_set = load_data(cfg, download=False)
    model, optimizer = build(cfg, train_set.images.shape[1:], len(train_set.classes))
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{run_dir / CHECKPOINT} does not fit the run's {cfg.model} "
                        f"({type(err).__name__}); is it from this run?") from None
    if hasattr(model, "qstate") and "step" in ckpt:
        model.qstate.step = ckpt["step"]
    return cfg, model, optimizer, ckpt, train_set, test_set


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train(cfg: RunConfig, out: Path, *, resume: bool = False, download: bool = True,
          stdout: TextIO | None = None, recipe: str | None = None,
          command: str | None = None) -> dict:
    """Train ``cfg`` into run directory ``out`` (continuing it when ``resume``); the summary.

    ``command`` (the command line, as the CLI passes it) is recorded with the package version
    and the source commit, read once here at the start, as one segment of the run's
    ``provenance`` (kept in the checkpoint: a resumed run appends a segment), so a figure
    quoted from the summary can be traced to the code and command that produced it.

    Prints the data source first, then one line per epoch; a progress bar goes to stderr.
    One process writes a run directory: ``out`` stays locked (:func:`qtrain.files.lock_run_dir`)
    from its checks to the end, and a second writer stops with a one-line error.

    Started by torchrun (:mod:`qtrain.distributed`), the processes train together; rank 0
    alone checks, locks and writes ``out``, prints, and reads the checkpoint it resumes from
    (and hands it to the others), so the run directory need not be shared between machines.
    """
    out = Path(out)
    world = dist.init(dist.backend_for(cfg.device, cfg.quantized), cfg.device)
    created = not out.exists()
    try:
        with contextlib.ExitStack() as held:
            problem = None
            if world.main:
                try:
                    prepare_out(out, resume=resume)
                    held.enter_context(lock_run_dir(out))
                except UserError as err:
                    problem = err
            problem = dist.broadcast_object(problem)  # the others stop with rank 0
            if problem is not None:
                raise problem
            return _train_locked(cfg, out, resume=resume, download=download, stdout=stdout,
                                 recipe=recipe, command=command, writer=world.main)
    except UserError:  # the lock is released: an empty run directory is removed
        if world.main and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train_locked(cfg: RunConfig, out: Path, *, resume: bool, download: bool,
                  stdout: TextIO | None, recipe: str | None, command: str | None,
                  writer: bool = True) -> dict:
    """:func:`train`'s loop, in the prepared and locked run directory ``out``; only the
    ``writer`` (rank 0) writes files and prints."""
    from tqdm import tqdm

    from .quant import quant_report, reset_stats
    from .train import evaluate, train_epoch

    stdout = sys.stdout if stdout is None else stdout
    world = dist.world()

    def say(line: str) -> None:
        if writer:
            print(line, file=stdout, flush=True)

    if resume and writer:  # partial files of a write that was killed (qtrain.files)
        remove_partial(out, (CONFIG, METRICS, SUMMARY, CHECKPOINT, CURVES))
    train_set, test_set = load_data(cfg, download=download)
    source = train_set.source
    say(f"data: {source}")
    _check_world(cfg, world, len(train_set))
    model, optimizer = build(cfg, train_set.images.shape[1:], len(train_set.classes))
    stepped = dist.data_parallel(model)  # what a step runs: DDP for float nets on N processes

    history: list[dict] = []
    provenance: list[dict] = []
    start_epoch, wall_s = 0, 0.0
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if writer and resume and ckpt_path.exists() else None
    ckpt = dist.broadcast_object(ckpt)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        model.qstate.step = ckpt["step"]
        start_epoch, history, wall_s = ckpt["epoch"], ckpt["history"], ckpt["wall_s"]
        provenance = list(ckpt.get("provenance", []))
    provenance.append(_segment(command, start_epoch))
    if writer:
        write_text(out / CONFIG, cfg.to_json() + "\n")
        write_text(out / METRICS, "".join(json.dumps(m) + "\n" for m in history))
    what = f"resuming {out} after epoch {start_epoch}" if resume else f"run: {out}"
    say(f"{what} -- {cfg.model} {cfg.norm} {cfg.bits} backend {cfg.backend}, "
        f"{len(train_set)} train / {len(test_set)} test images, {cfg.epochs} epochs"
        + (f", {world.size} processes" if world.size > 1 else ""))

    device = dist.process_device(cfg.device)
    steps = -(-len(train_set) // cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        lr = cfg.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        reset_stats(model)
        optimizer.reset_stats()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   file=sys.stderr, leave=False, dynamic_ncols=True, disable=not writer)

        def on_batch(i, loss, acc, bar=bar):
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
            bar.update(1)

        try:
            try:
                stats = train_epoch(stepped, optimizer, train_set.images, train_set.labels,
                                    batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                    device=device, on_batch=on_batch)
            finally:
                bar.close()
            t0 = time.perf_counter()
            test_error = evaluate(model, test_set.images, test_set.labels, device=device)
        except dist.PeerLost as err:
            last = f"the checkpoint of epoch {epoch}" if epoch else "no checkpoint yet"
            raise UserError(f"rank {world.rank}: {err}; {out} keeps {last}: continue with "
                            f"qtrain --resume {out} (any number of processes)") from None
        seconds = stats["seconds"] + time.perf_counter() - t0
        wall_s += seconds
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": stats["train_loss"],
                  "train_error": stats["train_error"], "test_error": test_error,
                  "seconds": seconds, "images_per_s": stats["images_per_s"],
                  "world_size": world.size,
                  "quant": quant_report(model), "store": _store_report(model, optimizer)}
        history.append(record)
        if not writer:
            continue
        save_checkpoint(ckpt_path, model, optimizer, epoch + 1, cfg, history, wall_s,
                        provenance)
        plot_curves(out / CURVES, history)
        summary = _summary(cfg, history, wall_s, source, recipe, provenance)
        write_text(out / SUMMARY, json.dumps(summary, indent=1) + "\n")
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        say(f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {stats['train_loss']:.4f}  "
            f"test error {100 * test_error:6.2f}%  {seconds:6.1f} s  "
            f"{stats['images_per_s']:7.0f} img/s")
    summary = _summary(cfg, history, wall_s, source, recipe, provenance)
    if writer:
        write_text(out / SUMMARY, json.dumps(summary, indent=1) + "\n")
    if history:
        say(f"done: final test error {100 * summary['final_test_error']:.2f}%, best "
            f"{100 * summary['best_test_error']:.2f}% (epoch {summary['best_epoch']}); "
            f"{out}")
    return summary


def source_commit(root: Path | None = None) -> str | None:
    """The git commit of the qtrain sources that run (``+dirty`` with uncommitted changes to
    tracked files), or None outside a git checkout (an installed wheel). ``root``: the
    checkout to ask (default: the one this module lives in)."""
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _check_world(cfg: RunConfig, world: dist.World, n_train: int) -> None:
    """What a data-parallel run of ``cfg`` on ``world.size`` processes cannot do, as one line."""
    if world.size == 1:
        return
    n = world.size
    if cfg.norm_input_exp == "channel" and cfg.norm != "none" and cfg.bits_a < 32:
        raise UserError("norm_input_exp channel is not supported across processes yet (each "
                        "channel's range would need the whole batch's): set norm_input_exp "
                        "tensor, or train in one process")
    if cfg.batch_size < n:
        raise UserError(f"batch_size={cfg.batch_size} is smaller than the {n} processes; give "
                        f"each process at least one image (--batch-size {n} or more)")
    last = n_train % cfg.batch_size
    if 0 < last < n:
        raise UserError(f"the last batch of each epoch holds {last} images ({n_train} training "
                        f"images, batch_size={cfg.batch_size}), fewer than the {n} processes; "
                        "choose a batch size that leaves none or at least one per process")


def _segment(command: str | None, from_epoch: int) -> dict:
    """Who ran the epochs from ``from_epoch`` on: the command, the version and the commit."""
    from . import __version__

    return {"command": command, "qtrain_version": __version__, "commit": source_commit(),
            "from_epoch": from_epoch, "world_size": dist.world().size}


def _summary(cfg: RunConfig, history: list[dict], wall_s: float, source: str,
             recipe: str | None, provenance: list[dict] | None = None) -> dict:
    provenance = provenance or [_segment(None, 0)]
    commits = {seg["commit"] for seg in provenance}
    best = min(history, key=lambda m: m["test_error"]) if history else None
    return {"epochs_done": len(history), "epochs": cfg.epochs,
            "final_test_error": history[-1]["test_error"] if history else None,
            "best_test_error": best["test_error"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "wall_s": wall_s, "bits": cfg.bits,
            **{k: getattr(cfg, k) for k in ("bits_w", "bits_a", "bits_g", "bits_e")},
            "norm": cfg.norm, "backend": cfg.backend, "model": cfg.model, "data": cfg.data,
            "data_source": source, "recipe": recipe,
            # the command that started the run, and the commit of every segment if they agree
            "command": provenance[0]["command"], "qtrain_version": provenance[0]["qtrain_version"],
            "commit": provenance[0]["commit"] if len(commits) == 1 else None,
            "world_size": provenance[-1].get("world_size", 1), "provenance": provenance}
