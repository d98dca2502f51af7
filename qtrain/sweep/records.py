"""What a sweep records: one :class:`Record` per combination (an object of ``sweep.json``, a
line of ``sweep.csv``), and :func:`mean_std`, the statistic over seeds that the tables and
figures show."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from ..config import RunConfig


@dataclasses.dataclass
class Record:
    """One combination of a sweep and what became of it.

    ``status`` is ``pending``, ``trained``, ``finished`` (before this sweep started; in the
    summary of a sharded sweep or of ``--collect``, every run that finished), ``failed`` or
    ``skipped`` (cannot run; ``reason`` says why, as it does for ``failed``).
    ``name`` is None for a combination that is not a valid config; ``backend`` is ``float``
    for a float run (every width 32); ``varied`` is the class a one-at-a-time sweep varies
    (None for the run with every class at the fixed width). The test errors, wall time and
    epochs come from the run's ``summary.json``.
    """

    name: str | None
    bits_w: int
    bits_a: int
    bits_g: int
    bits_e: int
    norm: str
    backend: str
    seed: int
    final_test_error: float | None = None
    best_test_error: float | None = None
    wall_s: float | None = None
    epochs_done: int | None = None
    status: str = "pending"
    reason: str | None = None
    run_dir: str | None = None
    varied: str | None = None

    @classmethod
    def of(cls, cfg: RunConfig, name: str, backend: str, run_dir: Path | None, status: str,
           summary: dict | None = None, reason: str | None = None) -> Record:
        """The record of the run ``cfg`` named ``name``, from its summary if it has one."""
        rec = cls(name, cfg.bits_w, cfg.bits_a, cfg.bits_g, cfg.bits_e, cfg.norm, backend,
                  cfg.seed, status=status, reason=reason,
                  run_dir=str(run_dir) if run_dir is not None else None)
        rec.add_summary(summary or {})
        return rec

    def add_summary(self, summary: dict) -> None:
        """Take the test errors, wall time and epochs of a run's ``summary.json``."""
        self.final_test_error = summary.get("final_test_error")
        self.best_test_error = summary.get("best_test_error")
        self.wall_s = summary.get("wall_s")
        self.epochs_done = summary.get("epochs_done")

    @property
    def widths(self) -> tuple[int, int, int, int]:
        return (self.bits_w, self.bits_a, self.bits_g, self.bits_e)

    def width(self, c: str) -> int:
        """The width of tensor class ``c`` (``w``, ``a``, ``g`` or ``e``)."""
        return getattr(self, f"bits_{c}")

    def describe(self) -> str:
        return (f"{self.norm} {self.backend} W{self.bits_w}A{self.bits_a}G{self.bits_g}"
                f"E{self.bits_e} seed {self.seed}")

    def to_dict(self) -> dict:
        """The ``sweep.json`` object: every field, in :data:`RECORD_FIELDS` order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        """The record a :meth:`to_dict` gave (a ``sweep.json`` object)."""
        return cls(**d)


#: The fields of a record: the keys of a ``sweep.json`` object and the columns of sweep.csv.
RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)
