"""The ``qtrain`` command.

Training is the default action::

    qtrain --bits 8 --norm l1                     # the default recipe, lenet5-fmnist
    qtrain --recipe wage-2888 --set per_class=100 # a packaged recipe, overridden
    qtrain --resume runs/lenet5-fmnist-20240101-120000
    qtrain train ...                              # the same, spelled out
    qtrain ops 128x6x24x24 128x16x8x8 [--json]    # BN op counts and Table IV ASIC estimate

Every user error is one line on stderr and exit status 2 (:class:`qtrain.config.UserError`,
data errors and argparse errors alike; a non-finite float such as ``--lr inf``, and a run
directory that another qtrain process is writing, too). Nothing heavy (torch, numba) is
imported before the arguments, the recipe and the config have been checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import __version__, memory
from .config import (BACKENDS, DATA_PATHS, DATASETS, DEFAULT_RECIPE, MODELS, NORMS, UserError,
                     apply_sets, data_problem, load_recipe, model_problem, recipe_label,
                     recipe_names)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exits with status 2."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse hook
        self.exit(2, f"qtrain: error: {message} (see qtrain --help)\n")


def finite_float(text: str) -> float:
    """An argparse type: a float that is not nan, inf or -inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; give e.g. 0.1")
    return value


def data_arg(text: str) -> str:
    """An argparse type: a dataset name or the path of the user's data (:func:`data_problem`)."""
    if data_problem(text):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                         f"{', '.join(DATASETS)}, or give {DATA_PATHS})")
    return text


def model_arg(text: str) -> str:
    """An argparse type: a built-in model's name or ``package.module:function``."""
    if problem := model_problem(text):
        if ":" not in text:
            problem = (f"invalid choice: {text!r} (choose from {', '.join(MODELS)}, or give "
                       f"package.module:function)")
        raise argparse.ArgumentTypeError(problem)
    return text


SUBCOMMANDS = ("train", "ops", "stats", "sweep", "compare", "export")

_DESCRIPTION = """\
Integer-only training with L1-norm batch norm.

Without a subcommand, qtrain trains: it loads a recipe (default: %(default)s), applies --set
values and then the flags below, prints the data source, shows a progress bar and one line per
epoch, and writes a run directory (config.json, metrics.jsonl, summary.json, checkpoint.pt,
curves.png). A run killed at any point continues exactly with --resume RUN_DIR.
"""

_EPILOG = """\
subcommands (qtrain COMMAND --help):
  train                   train (the default action; same options as above)
  ops SHAPE... | --model M  BN operation counts of L1BN vs L2BN, Table IV ASIC estimate
  stats RUN_DIR           sigma_L2 / sigma_L1 per BN layer and channel (Fig. 3), stats.png
  sweep --bits 2,4,8 --norm l1,l2 --out DIR   test error against bit width, sweep.png
        ... --shard K/N | --collect            one share of the grid per machine; summarize
  compare --bits 8 --out DIR                   int8 L1BN vs float L1BN / L2BN vs Brevitas

recipes: %(recipes)s (or a .toml file, or a run's config.json)

examples:
  qtrain --bits 8 --norm l1
  qtrain --bits-w 2 --bits-a 8 --bits-g 8 --bits-e 8 --norm l1
  qtrain --recipe mlp-fmnist --set per_class=100 --epochs 3 --out runs/try
  qtrain --model mlp --data my-images/ --epochs 5     # my-images/{train,test}/<class>/*.png
  qtrain --resume runs/try
"""

#: Training flags -> RunConfig fields.
#: RunConfig fields that have a flag of the same name.
_FLAGS = ("model", "data", "data_dir", "norm", "backend", "bits_w", "bits_a", "bits_g", "bits_e",
          "epochs", "batch_size", "lr", "seed", "device")


def build_parser(prog: str = "qtrain") -> argparse.ArgumentParser:
    """The training parser (the default action); other subcommands have their own
    (:func:`_subcommand_parser`)."""
    p = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                description=_DESCRIPTION % {"default": DEFAULT_RECIPE},
                epilog=_EPILOG % {"recipes": ", ".join(recipe_names())})
    p.add_argument("--version", action="version", version=f"qtrain {__version__}")
    g = p.add_argument_group("what to train (override the recipe)")
    g.add_argument("--recipe", metavar="NAME|FILE",
                   help=f"packaged recipe or .toml/.json file (default: {DEFAULT_RECIPE})")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe field, type-checked, e.g. per_class=100 or "
                        "lr_milestones=30,60 (repeatable)")
    g.add_argument("--model", type=model_arg, metavar="NAME|MODULE:FUNCTION",
                   help=f"network: {', '.join(MODELS)}; or your own: package.module:function, "
                        "a callable returning a torch nn.Module (converted like "
                        "qtrain.convert; the current directory is searched)")
    g.add_argument("--data", type=data_arg, metavar="NAME|FILE.npz|DIR/",
                   help=f"dataset: {', '.join(DATASETS)}; or your own: FILE.npz (arrays "
                        "x_train, y_train, x_test, y_test) or DIR/ holding train/ and test/, "
                        "each with one folder of images per class (docs/your-data.md)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="directory searched first for the data (then $QTRAIN_DATA, the "
                        "system dataset directory, the user cache)")
    g.add_argument("--no-download", action="store_true",
                   help="never download missing data")
    g.add_argument("--norm", choices=NORMS, help="batch norm: L1, standard L2, or none")
    g.add_argument("--backend", choices=BACKENDS,
                   help="int: integer kernels; emulate: the same integers in torch")
    g.add_argument("--bits", type=int, metavar="N",
                   help="width of weights, activations, gradients and errors: 2..16, or 32 "
                        "for float")
    for key, what in (("w", "weights"), ("a", "activations"), ("g", "weight gradients"),
                      ("e", "errors")):
        g.add_argument(f"--bits-{key}", type=int, metavar="N", help=f"width of {what} only")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, metavar="N", help="passes over the training set")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per step")
    g.add_argument("--lr", type=finite_float, metavar="LR", help="learning rate")
    g.add_argument("--seed", type=int, metavar="N",
                   help="init, data order, subset and rounding stream")
    g = p.add_argument_group("where")
    g.add_argument("--out", metavar="DIR",
                   help="run directory (default: runs/<recipe>-<YYYYmmdd-HHMMSS>)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run; flags that differ from its config are errors "
                        "(except --epochs and --device)")
    g.add_argument("--device", metavar="DEV", help="torch device: cpu, cuda, cuda:1")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel on N processes of this machine (as torchrun "
                        "--standalone --nproc-per-node N -m qtrain ... does; the same network "
                        "as one process, bit for bit, for quantized runs)")
    return p


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this command line (without ``--nproc``) as ``nproc`` processes on this machine, with
    the environment torchrun gives its workers (rank, world size, a free loopback port) and the
    cores shared among them. Returns 0, or the exit status of the first process that failed
    (the others are stopped: they would wait for it)."""
    import signal
    import socket

    if nproc < 1:
        raise UserError(f"--nproc {nproc} must be at least 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // nproc))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads,
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc)}
    procs = [subprocess.Popen([sys.executable, "-m", "qtrain", *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    status, deadline = 0, None
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and deadline is None:  # the others notice within moments, and say so
                status, deadline = failed[0], time.monotonic() + 15
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = float("inf")
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return 130
    return status or next((p.returncode for p in procs if p.returncode), 0)


def _without_nproc(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` without its ``--nproc N`` (or ``--nproc=N``), and N (None if absent)."""
    rest, n, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            n = a.partition("=")[2]
        else:
            rest.append(a)
        i += 1
    if n is None:
        return rest, None
    try:
        return rest, int(n)
    except ValueError:
        raise UserError(f"--nproc {n!r} is not a whole number of processes") from None


def _subcommand_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser and runner of a subcommand other than train (imported on demand)."""
    from . import analysis, export_cli, sweep

    add, run, description = {
        "ops": (analysis.add_ops_arguments, analysis.run_ops,
                "Operation counts of L1BN vs L2BN (counted by the int8 kernels, a reference L2BN "
                "and Table IV's formulas) with time/energy/area estimates from Table IV's int8 and "
                "float32 per-operation costs, per BN input shape or for a whole model."),
        "stats": (analysis.add_stats_arguments, analysis.run_stats,
                  "sigma_L2 / sigma_L1 per BN layer and channel of a trained run, averaged over "
                  "test batches (the paper's Fig. 3; Theorem 1 predicts sqrt(pi/2) = 1.2533)."),
        "sweep": (sweep.add_sweep_arguments, sweep.run_sweep,
                  "Test error against bit width: every combination of the lists, J runs side by "
                  "side, finished runs skipped when started again; --shard K/N trains one of N "
                  "shares of the grid (machines over a shared --out), --collect summarizes."),
        "compare": (sweep.add_compare_arguments, sweep.run_compare,
                    "int8 L1BN (int backend), float L1BN, float L2BN and Brevitas W8A8 with the "
                    "same seeds and data order."),
        "export": (export_cli.add_export_arguments, export_cli.run_export,
                   "Freeze a trained run's exponents (calibrated on training images) and write "
                   "it as a qk file (numpy archive for qkernels' torch-free engine, with the "
                   "training state) or an ONNX graph of integer operators; reports the test "
                   "error before and after freezing and checks the file against qtrain's "
                   "frozen inference."),
    }[command]
    parser = _Parser(prog=f"qtrain {command}", description=description)
    add(parser)
    return parser, run


def _overrides(args: argparse.Namespace) -> dict:
    """RunConfig fields given as flags (--bits first, then the per-kind widths)."""
    given = {}
    if args.bits is not None:
        given.update(bits_w=args.bits, bits_a=args.bits, bits_g=args.bits, bits_e=args.bits)
    for field in _FLAGS:
        if getattr(args, field) is not None:
            given[field] = getattr(args, field)
    return given


def _train(args: argparse.Namespace, command: str | None = None) -> int:
    from .config import field_names

    flags = _overrides(args)
    if args.resume is not None:
        run_dir = Path(args.resume)
        if args.recipe is not None:
            raise UserError("--resume continues the run's own config; drop --recipe")
        if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
            raise UserError(f"--out {args.out} differs from --resume {args.resume}; a resumed "
                            "run stays in its directory, drop --out")
        from .run import read_config, resume_config, prepare_out

        prepare_out(run_dir, resume=True)
        saved = read_config(run_dir)
        wanted = apply_sets(saved, args.set, flags)
        given = tuple(k for k in field_names() if k in flags
                      or any(s.partition("=")[0].strip().replace("-", "_") == k
                             for s in args.set))
        cfg = resume_config(run_dir, wanted, given)
        label = _saved_recipe(run_dir)
        out = run_dir
    else:
        recipe = args.recipe or DEFAULT_RECIPE
        cfg = load_recipe(recipe)
        cfg = apply_sets(cfg, args.set, flags)
        label = recipe_label(recipe)
        out = Path(args.out) if args.out else Path("runs") / (
            f"{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    from . import distributed
    from .run import train

    try:
        train(cfg, out, resume=args.resume is not None, download=not args.no_download,
              recipe=label, command=command)
    finally:  # torchrun's processes leave the group: gloo's threads left at exit abort it
        distributed.shutdown()
    return 0


def _saved_recipe(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command_line = shlex.join(["qtrain", *argv])
    parser = build_parser()
    if not argv:
        parser.print_usage(sys.stderr)
        print("qtrain: nothing to do; train with e.g. qtrain --bits 8 --norm l1 (see qtrain "
              "--help)", file=sys.stderr)
        return 2
    command = "train"
    if not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in SUBCOMMANDS:
            parser.error(f"argument COMMAND: invalid choice: {command!r} (choose from "
                         f"{', '.join(SUBCOMMANDS)}, or give training options)")
    try:
        if command != "train":
            parser, run = _subcommand_parser(command)
            return run(parser.parse_args(argv))
        if command == "train" and argv[:1] and not argv[0].startswith("-"):
            parser.error(f"unrecognized arguments: {' '.join(argv)}")
        rest, nproc = _without_nproc(argv)
        if nproc is not None and nproc != 1 and "WORLD_SIZE" not in os.environ:
            build_parser().parse_args(rest)  # bad flags: one error here, not one per process
            return _launch(nproc, rest)
        return _train(build_parser("qtrain" if command == "train" else command)
                      .parse_args(argv), command_line)
    except UserError as err:
        # one line per run: under torchrun rank 0 says it (a lost process: whoever survives)
        if os.environ.get("RANK", "0") == "0" or str(err).startswith("rank "):
            print(f"qtrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qtrain: interrupted; continue a run with qtrain --resume RUN_DIR",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError) as err:  # argument checks of the ops kernels
        if command != "ops":
            raise
        print(f"qtrain: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``qtrain`` program: :func:`main`'s status is the exit status. It keeps freed memory
    in the heap (:func:`qtrain.memory.keep_freed_memory`). A process of a
    several-process run (torchrun, ``--nproc``) exits without the interpreter's teardown, its
    output flushed and its process group left: gloo's transport threads outlive the group,
    and their teardown now and then aborted a process whose run was done and written
    ("terminate called without an active exception")."""
    memory.keep_freed_memory()
    status = main()
    parallel = sys.modules.get("qtrain.distributed")  # imported by every run that trains
    if parallel is not None and parallel.launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
