"""What training reads: :func:`stratified_subset` (a class-balanced, seeded subset),
:func:`to_codes` (pixels to 8-bit signed input codes, exponent :data:`INPUT_EXP`) and
:func:`batches` (index batches whose order depends only on ``(seed, epoch)``)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from .errors import DataError
from .sources import Dataset


def stratified_subset(ds: Dataset, per_class: int, seed: int | None = 0) -> Dataset:
    """``per_class`` examples of every class, in a deterministic order.

    With an integer ``seed`` the examples of each class are drawn at random without
    replacement and the result is shuffled, both from ``numpy.random.default_rng(seed)``; with
    ``seed=None`` the first ``per_class`` examples of each class are kept in file order.
    The same ``(ds, per_class, seed)`` always gives the same subset in the same order.

    Raises:
        ValueError: ``per_class < 1``.
        DataError: a class has fewer than ``per_class`` examples.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    rng = None if seed is None else np.random.default_rng(seed)
    chosen = []
    for c, cls in enumerate(ds.classes):
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) < per_class:
            raise DataError(f"class {c} ({cls}) of {ds.name} {ds.split} has {len(idx)} examples, "
                            f"fewer than per_class={per_class}; ask for at most {len(idx)}")
        chosen.append(idx[:per_class] if rng is None
                      else rng.choice(idx, per_class, replace=False))
    order = np.concatenate(chosen)
    order = np.sort(order) if rng is None else rng.permutation(order)
    how = "first" if seed is None else f"seed {seed}"
    return dataclasses.replace(ds, images=ds.images[order], labels=ds.labels[order],
                               source=f"{ds.source}, {per_class} per class ({how})")


#: Exponent of the input codes: value = code * 2**INPUT_EXP.
INPUT_EXP = -7


def to_codes(images: np.ndarray) -> tuple[np.ndarray, int]:
    r"""Pixels to the training input format, 8-bit signed codes.

    .. math:: q = \mathrm{clip}(p - 128, -127, 127), \qquad x = q \cdot 2^{-7}

    so a pixel's value is :math:`(p - 128)/128` in :math:`[-127/128, 127/128]`. The code
    -128 is outside the symmetric 8-bit range, so pixels 0 and 1 both give -127; nothing else
    is lost.

    Args:
        images: uint8 array of any shape.

    Returns:
        ``(codes, exp)``: int8 codes of the same shape and ``exp = INPUT_EXP = -7``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"to_codes expects uint8 pixels, got {images.dtype.name}")
    codes = images.view(np.int8) ^ np.int8(-128)  # p - 128, in two's complement
    return np.maximum(codes, np.int8(-127), out=codes), INPUT_EXP


def batches(ds_images: np.ndarray, ds_labels: np.ndarray, batch_size: int, seed: int,
            epoch: int, shuffle: bool = True, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Yield int64 index arrays covering one epoch, e.g. ``x, y = images[i], labels[i]``.

    The epoch's permutation comes from
    ``numpy.random.default_rng(numpy.random.SeedSequence([seed, epoch]))`` and nothing else, so
    a run resumed at epoch ``k`` sees the order it would have seen. Every index appears exactly
    once per epoch; the last batch is shorter unless ``drop_last`` drops it. ``shuffle=False``
    gives ``0..N-1`` in order.

    Raises:
        ValueError: images and labels differ in length, ``batch_size < 1``, or a negative
            ``seed`` or ``epoch``.
    """
    n = len(ds_images)
    if len(ds_labels) != n:
        raise ValueError(f"{n} images but {len(ds_labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    else:
        order = np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
