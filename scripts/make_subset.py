#!/usr/bin/env python3
"""Make the stratified Fashion-MNIST subset embedded in qtrain (qtrain/datasets/fashion-mnist-subset).

Reads the four canonical IDX files of the full Fashion-MNIST (Debian's dataset-fashion-mnist
by default, or --data-dir), keeps --train-per-class train and --test-per-class test images of
every class, drawn without replacement by ``numpy.random.default_rng(seed)`` and kept in their
original file order, and writes them as the four canonical gzipped IDX files plus
``<prefix>-indices-idx1-int.gz`` (the chosen row numbers of the full files, int32) with
qtrain.data.write_idx. The output is deterministic: the same input and seed give the same bytes.

    python scripts/make_subset.py [--data-dir DIR] [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qtrain import data  # noqa: E402

DEFAULT_SRC = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = ROOT / "qtrain" / "datasets" / data.SUBSET_DIR
SEED = 0
PER_CLASS = {"train": 300, "test": 100}


def choose(labels: np.ndarray, per_class: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """Sorted row numbers: ``per_class`` of each class, chosen by ``default_rng(seed)``.

    Classes are visited in label order, each drawing from the same generator, so the result
    depends only on ``(labels, per_class, seed)``.
    """
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} examples, fewer than {per_class}")
        picked.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int32)


def find(directory: Path, stem: str) -> Path:
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            return path
    raise SystemExit(f"{stem}[.gz] not found in {directory}; apt-get install "
                     "dataset-fashion-mnist or give --data-dir")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_SRC,
                    help=f"directory with the full Fashion-MNIST IDX files (default {DEFAULT_SRC})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default: the package's subset directory)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--train-per-class", type=int, default=PER_CLASS["train"])
    ap.add_argument("--test-per-class", type=int, default=PER_CLASS["test"])
    args = ap.parse_args(argv)
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    args.out.mkdir(parents=True, exist_ok=True)
    for split, prefix in data.SPLITS.items():
        images = data.read_idx(find(args.data_dir, f"{prefix}-images-idx3-ubyte"))
        labels = data.read_idx(find(args.data_dir, f"{prefix}-labels-idx1-ubyte"))
        rows = choose(labels, per_class[split], args.seed)
        data.write_idx(args.out / f"{prefix}-images-idx3-ubyte.gz", images[rows])
        data.write_idx(args.out / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
        data.write_idx(args.out / f"{prefix}-indices-idx1-int.gz", rows)
        print(f"{split}: {len(rows)} of {len(labels)} images ({per_class[split]} per class, "
              f"seed {args.seed}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
