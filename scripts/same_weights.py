#!/usr/bin/env python
"""Are runs' final checkpoints equal bit for bit? For speed-ups and refactors that must leave
every integer result as it was.

Usage (from the repository root)::

    python scripts/same_weights.py RUN_DIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a directory written by ``qtrain --out``. Every tensor of each checkpoint (the
model's state: weights, norms' running statistics and exponents; the optimizer's state:
velocities and store exponents) is compared with the first run's, and the step count and
epoch too. Prints one JSON object: per run its wall time, epochs, final test error and commit
(from ``summary.json``), the number of tensors compared, and ``equal`` (true when every run
matches the first bit for bit); the tensors that differ, if any, are named. Exit status 0 when
all are equal, 1 when some differ, 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def tensors(obj, prefix: str = "") -> dict[str, object]:
    """Every leaf of a checkpoint's nested dicts and lists, by its path."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    return a == b


def load(run: Path) -> tuple[dict, dict]:
    ckpt_path, summary_path = run / "checkpoint.pt", run / "summary.json"
    if not ckpt_path.is_file() or not summary_path.is_file():
        raise SystemExit(f"same_weights.py: {run} has no checkpoint.pt and summary.json; give "
                         "run directories written by qtrain --out")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = {"model": ckpt["model"], "optimizer": ckpt["optimizer"]["state"],
             "step": ckpt["step"], "epoch": ckpt["epoch"]}
    return tensors(state), json.loads(summary_path.read_text())


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python scripts/same_weights.py RUN_DIR RUN_DIR [RUN_DIR ...]",
              file=sys.stderr)
        return 2
    try:
        loaded = [(Path(a), *load(Path(a))) for a in argv]
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    _, ref, _ = loaded[0]
    runs, all_equal = [], True
    for run, leaves, summary in loaded:
        differ = sorted(k for k in ref.keys() | leaves.keys()
                        if k not in ref or k not in leaves or not same(ref[k], leaves[k]))
        all_equal &= not differ
        runs.append({"run": str(run), "wall_s": summary["wall_s"],
                     "epochs_done": summary["epochs_done"],
                     "final_test_error": summary["final_test_error"],
                     "commit": summary.get("commit"), "compared": len(leaves),
                     "tensors": sum(isinstance(v, torch.Tensor) for v in leaves.values()),
                     "differ_from_first": differ})
    print(json.dumps({"equal": all_equal, "runs": runs}, indent=1))
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
