"""Many training runs at once: ``qtrain sweep`` (accuracy vs bit width) and ``qtrain compare``.

``sweep`` trains every combination of bit widths, norms, backends and seeds of a recipe, each
into ``DIR/runs/<name>``, ``--jobs`` of them side by side (spawned processes, each running
:func:`qtrain.run.train` with ``cores // jobs`` threads). A run whose ``summary.json`` says it
is finished is not trained again, an interrupted one is resumed, and a combination that cannot
run (``int`` backend with ``l2`` norm, L1BN with activations or errors above 8 bits, ...) is
reported as skipped with the reason. ``DIR`` gets ``sweep.json`` (a list of records),
``sweep.csv`` and ``sweep.png`` (test error vs bit width, mean and standard deviation over
seeds, one line per norm/backend), each written atomically, and ``sweep-grid.json`` (its grid).
``--shard K/N`` trains the K-th of N disjoint shares of the grid (array jobs of a cluster over
a shared ``DIR``); the shard that finds the grid complete writes the summary files, or
``--collect`` does, from the finished runs, training nothing.

``compare`` trains int8 L1BN (int backend), float L1BN, float L2BN and Brevitas W8A8 QAT
(:mod:`qtrain.peers`) on the same seeds and data order, prints one table and writes
``compare.json`` and ``compare.png`` (the test-error curves, the paper's Fig. 1 style).

The modules: :mod:`.args` (the options), :mod:`.grid` (the combinations, run names, what
cannot run), :mod:`.jobs` (the process pool, resuming finished runs), :mod:`.records` (a
sweep's :class:`Record`), :mod:`.plots` (both figures), :mod:`.sweep` and :mod:`.compare`
(the two commands). The CLI wiring calls :func:`add_sweep_arguments` / :func:`run_sweep` and
:func:`add_compare_arguments` / :func:`run_compare`; user errors raise
:class:`qtrain.config.UserError`. The package imports no torch at import time.
"""

from __future__ import annotations

from .args import COMPARE_METHODS, add_compare_arguments, add_sweep_arguments
from .compare import compare_table, run_compare
from .grid import CLASSES, run_name, shard_of, shard_share
from .jobs import LOG, Job
from .plots import plot_compare, plot_sweep
from .records import RECORD_FIELDS, Record
from .sweep import GRID, run_sweep, write_sweep

__all__ = [
    "CLASSES",
    "COMPARE_METHODS",
    "GRID",
    "Job",
    "LOG",
    "RECORD_FIELDS",
    "Record",
    "add_compare_arguments",
    "add_sweep_arguments",
    "compare_table",
    "plot_compare",
    "plot_sweep",
    "run_compare",
    "run_name",
    "run_sweep",
    "shard_of",
    "shard_share",
    "write_sweep",
]
