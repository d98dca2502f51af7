r"""Operation counts of batch normalization and the paper's ASIC cost estimate (Table IV).

Three sources of counts, all as ``{op: n}`` with Table IV's op names (:data:`OPS`):

* the L1BN kernels, as they actually run (:func:`qkernels.l1bn.count_ops`): on int8 codes, or
  with ``x_bits``/``dy_bits`` on int16 ones (the centred affine's extra SUB per element and,
  in the backward, its per-channel roots and one DIV per call); :func:`bn_report` and its
  tables count int8 codes, the datatype of Table IV's costs;
* a counted reference L2BN (:func:`l2bn_reference`, :func:`count_ops_l2bn`): a plain per-element
  float64 implementation of equations (4)-(8) whose loops tally with the kernels' scheme;
* Table IV's formulas in ``m`` (values per channel, N*H*W) and ``c`` (channels)
  (:func:`table4_counts`).

``docs/opcount.md`` derives the kernels' per-element and per-channel counts and explains every
difference from Table IV.

What is counted (the kernels' rule, which the reference follows): each arithmetic operation a
loop body performs on data, per element, plus the per-channel (and per-call) scalar arithmetic.
Shifts, compares for saturation, negation (a sign flip), loads and stores are not counted.

ASIC model (:func:`asic_estimate`), with Table IV's per-operation figures for one datatype
(``t_op`` in ns, ``P_op`` in uW, ``A_op`` in um^2):

.. math::

    T = \sum_{op} n_{op}\, t_{op}, \qquad
    E = \sum_{op} n_{op}\, P_{op}\, t_{op}, \qquad
    A = \sum_{op:\ n_{op} > 0} A_{op}

One functional unit per op type, and the operations run one after another (no overlap, no
parallel units), so time is the sum of the operation latencies; energy is each operation's
power over its latency (uW * ns = fJ, reported in pJ); area is one unit of every op type used.
This is the simplest model consistent with Table IV's columns; it is a relative estimate for
comparing L1BN with L2BN, not a prediction of a real datapath (no memory, control or pipelining).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numba import njit

from .fixedpoint import M_MAX
from .l1bn import (
    ADD,
    DIV,
    MUL,
    OP_NAMES,
    SQRT,
    SQUARE,
    SUB,
    _as_ncl,
    _from_ncl,
    _tally,
    count_ops,
)

#: Table IV's operation columns, in order.
OPS = OP_NAMES

# ---------------------------------------------------------------------------------------------
# Table IV as data.

#: Table IV, "Quantity" rows: op -> (a, b) with count a*m*c + b*c.
TABLE4_QUANTITY: dict[str, dict[str, tuple[int, int]]] = {
    "L2BN": {"SIGN": (0, 0), "ABS": (0, 0), "ADD": (5, 1), "SUB": (2, 0), "MUL": (4, 2),
             "DIV": (0, 2), "SQUARE": (1, 0), "SQRT": (0, 1)},
    "L1BN": {"SIGN": (1, 0), "ABS": (1, 0), "ADD": (5, 1), "SUB": (2, 0), "MUL": (3, 2),
             "DIV": (0, 2), "SQUARE": (0, 0), "SQRT": (0, 0)},
}


def _row(values: tuple) -> dict[str, float]:
    return dict(zip(OPS, map(float, values)))


#: Table IV, per-operation overheads from ASIC synthesis (SMIC LOGIC013 RVT):
#: dtype -> {"time_ns", "power_uW", "area_um2"} -> {op: value}.
TABLE4_COST: dict[str, dict[str, dict[str, float]]] = {
    "float32": {
        "time_ns": _row((0.00, 0.71, 43.00, 43.00, 35.83, 99.49, 27.23, 99.50)),
        "power_uW": _row((0.00, 0.01, 29.50, 29.60, 97.20, 254.00, 39.10, 59.00)),
        "area_um2": _row((0.00, 3.39, 8095, 8097, 19625, 36387, 11539, 11280)),
    },
    "int8": {
        "time_ns": _row((0.00, 3.47, 5.25, 5.45, 11.46, 24.90, 8.54, 7.60)),
        "power_uW": _row((0.00, 0.59, 0.77, 0.87, 9.55, 5.90, 3.64, 0.82)),
        "area_um2": _row((0.00, 256, 272, 306, 2319, 1762, 1241, 277)),
    },
}


def table4_counts(norm: str, m: int, c: int) -> dict[str, int]:
    """Table IV's operation counts of ``norm`` ("L1BN" or "L2BN") for ``m`` values x ``c``
    channels (forward and backward together; the table does not split them)."""
    if norm not in TABLE4_QUANTITY:
        raise ValueError(f"norm must be 'L1BN' or 'L2BN', got {norm!r}")
    m, c = _check_count(m, "m"), _check_count(c, "c")
    return {op: a * m * c + b * c for op, (a, b) in TABLE4_QUANTITY[norm].items()}


def _check_count(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be at least 1, got {v}")
    return int(v)


# ---------------------------------------------------------------------------------------------
# Counted reference L2BN (float64; a reference, not a kernel). x has shape (N, C, L).
#
# Forward, per channel, equations (5), (6), (4), (7) in three passes over the channel:
#   S = sum x                      ADD per element
#   mu = S * (1/m)                 1/m: DIV, then MUL
#   Q = sum (x - mu)**2            SUB, SQUARE, ADD per element
#   sigma2 = Q * (1/m)             MUL
#   r = 1 / sqrt(sigma2 + eps)     ADD, SQRT, DIV
#   y = gamma * ((x - mu) * r) + beta     SUB, MUL, MUL, ADD per element
# Only (mu, r, 1/m) per channel is kept for the backward, as the int8 kernels keep only
# per-channel statistics (and as torch/cuDNN keep save_mean and save_invstd).
#
# Backward, equation (8) term by term; a per-channel factor inside a sum is applied once to the
# sum (sum a*g_i = a*sum g_i), nothing else is rewritten:
#   pass 1: d = x - mu, gh = dy*gamma (= dl/dxhat), sums of gh*d, gh, dy*d, dy
#           SUB, 3 MUL, 4 ADD per element
#   per channel: (sigma2+eps)**-1.5 = r*r*r, dl/dsigma2 = sum(gh*d) * (-1/2) * r**3,
#           dl/dmu = -r * sum(gh), k_var = 2 * dl/dsigma2 / m, k_mu = dl/dmu / m,
#           dgamma = r * sum(dy*d), dbeta = sum(dy)              9 MUL
#   pass 2: d = x - mu, gh = dy*gamma, dx = gh*r + k_var*d + k_mu
#           SUB, 3 MUL, 2 ADD per element
# No square root or division in the backward: it reuses r and 1/m.


@njit(cache=True)
def _l2bn_forward(x, y, gamma, beta, eps, stats, cnt):
    n_rows, n_ch, n_cols = x.shape
    m = n_rows * n_cols
    for c in range(n_ch):
        s = 0.0
        for n in range(n_rows):
            for l in range(n_cols):
                s += x[n, c, l]
            _tally(cnt, ADD, n_cols)
        inv_m = 1.0 / m
        mu = s * inv_m
        q = 0.0
        for n in range(n_rows):
            for l in range(n_cols):
                d = x[n, c, l] - mu
                q += d * d
            _tally(cnt, SUB, n_cols)
            _tally(cnt, SQUARE, n_cols)
            _tally(cnt, ADD, n_cols)
        sigma2 = q * inv_m
        r = 1.0 / np.sqrt(sigma2 + eps)
        g = gamma[c]
        b = beta[c]
        for n in range(n_rows):
            for l in range(n_cols):
                y[n, c, l] = g * ((x[n, c, l] - mu) * r) + b
            _tally(cnt, SUB, n_cols)
            _tally(cnt, MUL, 2 * n_cols)
            _tally(cnt, ADD, n_cols)
        # per channel: 1/m and 1/sqrt (2 DIV), mu and sigma2 (2 MUL), + eps (ADD), SQRT
        _tally(cnt, DIV, 2)
        _tally(cnt, MUL, 2)
        _tally(cnt, ADD, 1)
        _tally(cnt, SQRT, 1)
        stats[c, 0] = mu
        stats[c, 1] = r
        stats[c, 2] = inv_m


@njit(cache=True)
def _l2bn_backward(x, dy, dx, gamma, stats, dgamma, dbeta, cnt):
    n_rows, n_ch, n_cols = x.shape
    for c in range(n_ch):
        mu = stats[c, 0]
        r = stats[c, 1]
        inv_m = stats[c, 2]
        g = gamma[c]
        s_ghd = 0.0
        s_gh = 0.0
        s_dyd = 0.0
        s_dy = 0.0
        for n in range(n_rows):
            for l in range(n_cols):
                d = x[n, c, l] - mu
                e = dy[n, c, l]
                gh = e * g
                s_ghd += gh * d
                s_gh += gh
                s_dyd += e * d
                s_dy += e
            _tally(cnt, SUB, n_cols)
            _tally(cnt, MUL, 3 * n_cols)
            _tally(cnt, ADD, 4 * n_cols)
        r3 = r * r * r
        d_sigma2 = s_ghd * -0.5 * r3
        d_mu = -(s_gh * r)
        k_var = 2.0 * d_sigma2 * inv_m
        k_mu = d_mu * inv_m
        for n in range(n_rows):
            for l in range(n_cols):
                d = x[n, c, l] - mu
                gh = dy[n, c, l] * g
                dx[n, c, l] = gh * r + k_var * d + k_mu
            _tally(cnt, SUB, n_cols)
            _tally(cnt, MUL, 3 * n_cols)
            _tally(cnt, ADD, 2 * n_cols)
        dgamma[c] = s_dyd * r
        dbeta[c] = s_dy
        # per channel: r**3 (2 MUL), dl/dsigma2 (2 MUL), dl/dmu (1 MUL), k_var (2 MUL),
        # k_mu (1 MUL), dgamma (1 MUL)
        _tally(cnt, MUL, 9)


class L2BNResult(NamedTuple):
    """Outputs of :func:`l2bn_reference` and the operations it performed."""

    y: np.ndarray
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    counts: dict  # {"forward": {op: n}, "backward": {op: n}}


def _channels_and_m(shape: tuple, name: str) -> tuple[int, int]:
    if len(shape) not in (2, 4):
        raise ValueError(f"{name} must be (N, C) or (N, C, H, W), got {tuple(shape)}")
    c = int(shape[1])
    m = int(np.prod(shape, dtype=np.int64)) // max(c, 1)
    if c < 1 or m < 1:
        raise ValueError(f"{name} has an empty dimension: {tuple(shape)}")
    if m < 2:
        raise ValueError(f"{name} needs more than 1 value per channel (N*H*W = 1): "
                         f"{tuple(shape)}")
    return m, c


def l2bn_reference(x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                   eps: float = 1e-5) -> L2BNResult:
    r"""Training-mode L2BN forward (equations 4-7) and backward (equation 8) in float64, counted.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
              \sigma_B^2 = \frac{1}{m}\sum (x_i - \mu_B)^2

    Args:
        x: input, shape (N, C) or (N, C, H, W) (converted to float64).
        dy: upstream gradient dl/dy, the shape of x.
        gamma, beta: per-channel scale and shift, shape (C,).
        eps: epsilon of equation (4).

    Returns:
        :class:`L2BNResult`: y, dx (shapes of x), dgamma, dbeta (shape (C,)), and the counts
        ``{"forward": {op: n}, "backward": {op: n}}`` of the loops that computed them.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    _channels_and_m(x.shape, "x")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected x's {x.shape}")
    c = x.shape[1]
    gamma = np.ascontiguousarray(gamma, dtype=np.float64)
    beta = np.ascontiguousarray(beta, dtype=np.float64)
    for a, name in ((gamma, "gamma"), (beta, "beta")):
        if a.shape != (c,):
            raise ValueError(f"{name} has shape {a.shape}, expected ({c},)")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    x3 = _as_ncl(x)
    dy3 = _as_ncl(dy)
    y3 = np.empty_like(x3)
    dx3 = np.empty_like(x3)
    stats = np.empty((c, 3), dtype=np.float64)
    dgamma = np.empty(c, dtype=np.float64)
    dbeta = np.empty(c, dtype=np.float64)
    fwd = np.zeros(len(OPS), dtype=np.int64)
    bwd = np.zeros(len(OPS), dtype=np.int64)
    _l2bn_forward(x3, y3, gamma, beta, float(eps), stats, fwd)
    _l2bn_backward(x3, dy3, dx3, gamma, stats, dgamma, dbeta, bwd)
    counts = {"forward": dict(zip(OPS, map(int, fwd))),
              "backward": dict(zip(OPS, map(int, bwd)))}
    return L2BNResult(_from_ncl(y3, x.shape, None), _from_ncl(dx3, x.shape, None), dgamma, dbeta,
                       counts)


def count_ops_l2bn(shape: tuple, eps: float = 1e-5, seed: int = 0) -> dict[str, dict]:
    """Operations one reference L2BN forward and backward perform on input of ``shape``.

    Runs :func:`l2bn_reference` on random data and returns its counts,
    ``{"forward": {op: n}, "backward": {op: n}}`` (like :func:`qkernels.l1bn.count_ops`).
    """
    _channels_and_m(tuple(shape), "shape")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    ones = np.ones(shape[1])
    return l2bn_reference(x, dy, ones, np.zeros(shape[1]), eps).counts


# ---------------------------------------------------------------------------------------------
# ASIC estimate and the report.


def asic_estimate(counts: Mapping[str, int], dtype: str) -> dict[str, float]:
    """Time, energy and area of ``counts`` ({op: n}) on Table IV's ``dtype`` units.

    ``time_ns = sum n*t``, ``energy_pJ = sum n*P*t / 1000`` (uW*ns = fJ), ``area_um2`` = sum of
    the unit areas of the op types with a nonzero count (see the module docstring). Op names
    left out count as zero.
    """
    if dtype not in TABLE4_COST:
        raise ValueError(f"dtype must be one of {sorted(TABLE4_COST)}, got {dtype!r}")
    unknown = set(counts) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op names {sorted(unknown)}; expected a subset of {OPS}")
    cost = TABLE4_COST[dtype]
    time_ns = energy_fj = area = 0.0
    for op, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"counts[{op!r}] must be a non-negative int, got {n!r}")
        time_ns += n * cost["time_ns"][op]
        energy_fj += n * cost["power_uW"][op] * cost["time_ns"][op]
        if n:
            area += cost["area_um2"][op]
    return {"time_ns": time_ns, "energy_pJ": energy_fj / 1000.0, "area_um2": area}


def _total(counts: dict[str, dict]) -> dict[str, int]:
    return {op: counts["forward"][op] + counts["backward"][op] for op in OPS}


def _saving(l1: dict[str, float], l2: dict[str, float]) -> dict[str, float]:
    """Fraction of L2BN's time, energy and area that L1BN saves (1 - L1/L2)."""
    return {k: (1.0 - l1[v] / l2[v]) if l2[v] else 0.0
            for k, v in (("time", "time_ns"), ("energy", "energy_pJ"), ("area", "area_um2"))}


def bn_report(shape: tuple, eps_log2: int | None = None, l2_eps: float = 1e-5,
              seed: int = 0) -> dict:
    """Operation counts and ASIC estimates of one BN layer's forward and backward.

    Args:
        shape: the BN input, (N, C) or (N, C, H, W); m = N*H*W, c = C.
        eps_log2: the int8 L1BN kernel's epsilon (None: no epsilon, the kernels' default;
            an epsilon adds one MUL and one ADD per channel).
        l2_eps: the reference L2BN's epsilon (does not change its counts).
        seed: random data the counted code runs on (counts do not depend on it).

    Returns:
        A JSON-serialisable dict: ``shape``, ``m``, ``c``; ``counts`` with ``l1bn_kernel`` and
        ``l2bn_reference`` (each ``forward``, ``backward``, ``total``) and ``l1bn_table4``,
        ``l2bn_table4`` (totals); ``asic`` per dtype ("int8", "float32") with the estimate of
        each total and ``saving`` (fractions 1 - L1/L2 of time, energy, area) for
        ``kernel_vs_reference`` (l1bn_kernel vs l2bn_reference) and ``table4``.
    """
    shape = tuple(int(s) for s in shape)
    m, c = _channels_and_m(shape, "shape")
    if m > M_MAX:
        raise ValueError(f"shape {shape} has N*H*W = {m} values per channel; the int8 L1BN "
                         f"kernels support at most {M_MAX}")
    kernel = count_ops(shape, eps_log2=eps_log2, seed=seed)
    ref = count_ops_l2bn(shape, eps=l2_eps, seed=seed)
    counts = {
        "l1bn_kernel": {**kernel, "total": _total(kernel)},
        "l2bn_reference": {**ref, "total": _total(ref)},
        "l1bn_table4": table4_counts("L1BN", m, c),
        "l2bn_table4": table4_counts("L2BN", m, c),
    }
    asic = {}
    for dtype in ("int8", "float32"):
        est = {name: asic_estimate(v["total"] if "total" in v else v, dtype)
               for name, v in counts.items()}
        est["saving"] = {
            "kernel_vs_reference": _saving(est["l1bn_kernel"], est["l2bn_reference"]),
            "table4": _saving(est["l1bn_table4"], est["l2bn_table4"]),
        }
        asic[dtype] = est
    return {"shape": list(shape), "m": m, "c": c, "eps_log2": eps_log2, "counts": counts,
            "asic": asic}


# ---------------------------------------------------------------------------------------------
def markdown_tables(reports: list[dict]) -> str:
    """Counts, ASIC estimates and savings of :func:`bn_report` results as Markdown tables."""
    names = (("l1bn_kernel", "L1BN int8 kernel"), ("l2bn_reference", "L2BN reference"),
             ("l1bn_table4", "L1BN Table IV"), ("l2bn_table4", "L2BN Table IV"))
    lines = ["| shape | m | c | counted | " + " | ".join(OPS) + " |",
             "|---|--:|--:|---|" + "--:|" * len(OPS)]
    for rep in reports:
        for key, label in names:
            tot = rep["counts"][key].get("total", rep["counts"][key])
            lines.append(f"| {'x'.join(map(str, rep['shape']))} | {rep['m']} | {rep['c']} | "
                         f"{label} | " + " | ".join(str(tot[op]) for op in OPS) + " |")
    lines += ["", "| shape | dtype | counted | time (us) | energy (nJ) | area (um^2) |",
              "|---|---|---|--:|--:|--:|"]
    for rep in reports:
        for dtype in ("int8", "float32"):
            for key, label in names:
                e = rep["asic"][dtype][key]
                lines.append(f"| {'x'.join(map(str, rep['shape']))} | {dtype} | {label} | "
                             f"{e['time_ns'] / 1e3:.1f} | {e['energy_pJ'] / 1e3:.2f} | "
                             f"{e['area_um2']:.0f} |")
    lines += ["", "| shape | dtype | saving | time | energy | area |", "|---|---|---|--:|--:|--:|"]
    for rep in reports:
        for dtype in ("int8", "float32"):
            for key, label in (("kernel_vs_reference", "kernel vs reference"),
                               ("table4", "Table IV formulas")):
                s = rep["asic"][dtype]["saving"][key]
                lines.append(f"| {'x'.join(map(str, rep['shape']))} | {dtype} | {label} | "
                             f"{s['time']:.1%} | {s['energy']:.1%} | {s['area']:.1%} |")
    return "\n".join(lines)
