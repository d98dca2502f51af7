"""Operation counts (L1BN kernels on int8 and int16 codes, counted reference L2BN, Table IV) and
the ASIC estimate."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qkernels
from qkernels.l1bn import count_ops
from qkernels.opcount import (
    OPS,
    TABLE4_COST,
    asic_estimate,
    bn_report,
    count_ops_l2bn,
    l2bn_reference,
    table4_counts,
)


def counts(**kw):
    """A full {op: n} dict from keyword counts (missing ops are 0)."""
    return {op: kw.get(op, 0) for op in OPS}


def add(a, b):
    return {op: a[op] + b[op] for op in OPS}


def sub(a, b):
    return {op: a[op] - b[op] for op in OPS}


def scale(a, k):
    return {op: a[op] * k for op in OPS}


def shape_for(m_rows, c, hw=(3, 5)):
    """A 4-D shape with m = m_rows*H*W values per channel."""
    return (m_rows, c) + hw


def m_of(shape):
    return int(np.prod(shape)) // shape[1]


# ---------------------------------------------------------------------------------------------
# Table IV as data.


def test_table4_formulas_at_a_given_m_and_c():
    """Table IV's Quantity rows evaluated at m = 1000, c = 7 (mc = 7000)."""
    assert table4_counts("L2BN", 1000, 7) == counts(
        ADD=35007, SUB=14000, MUL=28014, DIV=14, SQUARE=7000, SQRT=7)
    assert table4_counts("L1BN", 1000, 7) == counts(
        SIGN=7000, ABS=7000, ADD=35007, SUB=14000, MUL=21014, DIV=14)
    with pytest.raises(ValueError):
        table4_counts("L3BN", 10, 2)
    with pytest.raises(ValueError):
        table4_counts("L1BN", 0, 2)


def test_table4_costs_are_the_papers():
    """A second transcription of Table IV's overheads, row by row, in OPS order."""
    paper = {
        ("float32", "time_ns"): (0.00, 0.71, 43.00, 43.00, 35.83, 99.49, 27.23, 99.50),
        ("float32", "power_uW"): (0.00, 0.01, 29.50, 29.60, 97.20, 254.00, 39.10, 59.00),
        ("float32", "area_um2"): (0.00, 3.39, 8095, 8097, 19625, 36387, 11539, 11280),
        ("int8", "time_ns"): (0.00, 3.47, 5.25, 5.45, 11.46, 24.90, 8.54, 7.60),
        ("int8", "power_uW"): (0.00, 0.59, 0.77, 0.87, 9.55, 5.90, 3.64, 0.82),
        ("int8", "area_um2"): (0.00, 256, 272, 306, 2319, 1762, 1241, 277),
    }
    assert OPS == ("SIGN", "ABS", "ADD", "SUB", "MUL", "DIV", "SQUARE", "SQRT")
    for (dtype, row), values in paper.items():
        assert TABLE4_COST[dtype][row] == dict(zip(OPS, values))
    assert set(TABLE4_COST) == {"float32", "int8"}


# ---------------------------------------------------------------------------------------------
# The L1BN kernels' counts, derived from the _tally calls in qkernels/l1bn.py: int8 codes, and
# what the centred affine (x or dy int16, docs/l1bn-integer.md section 3) adds.

# forward per element: sum pass ADD; sign pass SIGN, MUL (s*x), 2 ADD; output pass MUL, ADD
KERNEL_FWD_ELEM = counts(SIGN=1, ADD=4, MUL=2)
# forward per channel: thresholds, D, reciprocal, slope, affine (+1 MUL +1 ADD with epsilon)
KERNEL_FWD_CHAN = counts(ADD=2, SUB=2, MUL=7, DIV=1)
KERNEL_FWD_CALL = counts(DIV=1)  # 1/m, once per call
# backward per element: sums pass MUL (g*x), 2 ADD; dx pass SIGN, MUL, ADD
KERNEL_BWD_ELEM = counts(SIGN=1, ADD=3, MUL=2)
KERNEL_BWD_CHAN = counts(ADD=2, SUB=5, MUL=13)
KERNEL_BWD_CALL = counts()
# centred affine, forward (int16 x): the SUB of x - c per element
CENTRED_FWD_ELEM = counts(SUB=1)
# centred affine, backward (int16 x or dy): the SUB of g - c_s per element; per channel P in
# two limbs (1 MUL, 1 SUB) and the three roots c_s (6 MUL, 3 SUB); per call the 1/m of the
# roots (1 DIV)
CENTRED_BWD_ELEM = counts(SUB=1)
CENTRED_BWD_CHAN = counts(MUL=7, SUB=4)
CENTRED_BWD_CALL = counts(DIV=1)

#: (x_bits, dy_bits): int8, int16, and the two mixes; the backward is centred unless both are
#: int8, the forward when x is int16.
WIDTHS = [(8, 8), (16, 16), (8, 16), (16, 8), (12, 4)]


def per_element(x_bits=8, dy_bits=8):
    """(forward, backward) counts per element for codes of these widths."""
    fwd = add(KERNEL_FWD_ELEM, CENTRED_FWD_ELEM) if x_bits > 8 else KERNEL_FWD_ELEM
    wide = x_bits > 8 or dy_bits > 8
    return fwd, add(KERNEL_BWD_ELEM, CENTRED_BWD_ELEM) if wide else KERNEL_BWD_ELEM


def per_channel(x_bits=8, dy_bits=8):
    """(forward, backward) counts per channel (the forward's does not depend on the width)."""
    wide = x_bits > 8 or dy_bits > 8
    return KERNEL_FWD_CHAN, add(KERNEL_BWD_CHAN, CENTRED_BWD_CHAN) if wide else KERNEL_BWD_CHAN


def kernel_formula(m, c, eps=False, x_bits=8, dy_bits=8):
    (fwd_e, bwd_e), (fwd_c, bwd_c) = per_element(x_bits, dy_bits), per_channel(x_bits, dy_bits)
    bwd_call = (add(KERNEL_BWD_CALL, CENTRED_BWD_CALL) if x_bits > 8 or dy_bits > 8
                else KERNEL_BWD_CALL)
    fwd = add(add(scale(fwd_e, m * c), scale(fwd_c, c)), KERNEL_FWD_CALL)
    if eps:
        fwd = add(fwd, counts(MUL=c, ADD=c))
    bwd = add(add(scale(bwd_e, m * c), scale(bwd_c, c)), bwd_call)
    return {"forward": fwd, "backward": bwd}


@pytest.mark.parametrize("x_bits, dy_bits", WIDTHS)
@pytest.mark.parametrize("rows,c", [(4, 3), (2, 5)])
def test_kernel_counts_are_linear_in_m_and_c(rows, c, x_bits, dy_bits):
    """Doubling m adds exactly the per-element part; doubling c doubles all but the per-call."""
    def run(shape):
        return count_ops(shape, x_bits=x_bits, dy_bits=dy_bits)

    base = run(shape_for(rows, c))
    m = m_of(shape_for(rows, c))
    two_m = run(shape_for(2 * rows, c))
    two_c = run(shape_for(rows, 2 * c))
    (fwd_e, bwd_e), (fwd_c, bwd_c) = per_element(x_bits, dy_bits), per_channel(x_bits, dy_bits)
    assert sub(two_m["forward"], base["forward"]) == scale(fwd_e, m * c)
    assert sub(two_m["backward"], base["backward"]) == scale(bwd_e, m * c)
    assert sub(two_c["forward"], base["forward"]) == add(scale(fwd_e, m * c), scale(fwd_c, c))
    assert sub(two_c["backward"], base["backward"]) == add(scale(bwd_e, m * c),
                                                           scale(bwd_c, c))
    assert base["forward"]["SIGN"] == m * c and base["backward"]["SIGN"] == m * c


@pytest.mark.parametrize("x_bits, dy_bits", WIDTHS)
@pytest.mark.parametrize("shape", [(2, 3), (128, 7), (4, 3, 5, 5), (2, 6, 1, 9)])
@pytest.mark.parametrize("eps_log2", [None, -10])
def test_kernel_counts_closed_form(shape, eps_log2, x_bits, dy_bits):
    """(N, C) and (N, C, H, W) alike, every width: m = N*H*W, and the counts are the derived
    formula."""
    got = count_ops(shape, eps_log2=eps_log2, x_bits=x_bits, dy_bits=dy_bits)
    assert got == kernel_formula(m_of(shape), shape[1], eps_log2 is not None, x_bits, dy_bits)


def test_centred_affine_counts():
    """What 16-bit codes cost beyond int8, written out at m = 75, c = 3: the forward on int16 x
    one SUB per element; every backward with an int16 operand one SUB per element, 7 MUL and
    4 SUB per channel and one DIV per call; dy_bits defaults to x_bits."""
    shape, mc, c = (3, 3, 5, 5), 225, 3
    int8 = count_ops(shape)
    for (x_bits, dy_bits), fwd in (((16, 16), counts(SUB=mc)), ((8, 16), counts()),
                                   ((16, 8), counts(SUB=mc)), ((12, None), counts(SUB=mc))):
        got = count_ops(shape, x_bits=x_bits, dy_bits=dy_bits)
        assert sub(got["forward"], int8["forward"]) == fwd
        assert sub(got["backward"], int8["backward"]) == counts(SUB=mc + 4 * c, MUL=7 * c,
                                                                DIV=1)


@pytest.mark.parametrize("x_bits, dy_bits", WIDTHS)
def test_kernel_counts_do_not_depend_on_data(x_bits, dy_bits):
    assert (count_ops((4, 3, 5, 5), seed=1, x_bits=x_bits, dy_bits=dy_bits)
            == count_ops((4, 3, 5, 5), seed=2, x_bits=x_bits, dy_bits=dy_bits))


def test_kernel_vs_table4_l1bn_differences():
    """The kernel's totals differ from Table IV's L1BN by exactly the documented amounts."""
    m, c = 100, 6
    run = count_ops((4, c, 5, 5))
    got = add(run["forward"], run["backward"])
    mc = m * c
    # per element: a second SIGN (backward recomputes it), no ABS and no SUB (sign-weighted sums
    # instead of |x - mu|), 7 ADD and 4 MUL (the backward's sums are counted; Table IV's are
    # not); per channel: one DIV, plus one per call for 1/m
    assert sub(got, table4_counts("L1BN", m, c)) == counts(
        SIGN=mc, ABS=-mc, ADD=2 * mc + 3 * c, SUB=-2 * mc + 7 * c, MUL=mc + 18 * c,
        DIV=1 - c)


# ---------------------------------------------------------------------------------------------
# The counted reference L2BN.

# Table IV reproduced as forward + the per-element dx line of equation (8),
# dx_i = (dl/dxhat_i)*r + k_var*(x_i - mu) + k_mu, given dl/dxhat_i and x_i - mu: 2 MUL, 2 ADD.
TABLE4_DX_LINE_ELEM = counts(MUL=2, ADD=2)
# What the reference's backward does besides that line, per element: pass 1 recomputes
# x - mu (SUB) and dl/dxhat = dy*gamma (MUL) and forms sum(gh*d), sum(gh), sum(dy*d), sum(dy)
# (2 MUL, 4 ADD); pass 2 recomputes x - mu (SUB) and dl/dxhat (MUL). Per channel: 9 MUL.
REF_BWD_EXTRA_ELEM = counts(SUB=2, MUL=4, ADD=4)
REF_BWD_CHAN = counts(MUL=9)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5), (2, 6, 2, 7)])
def test_reference_l2bn_counts_vs_table4(shape):
    """Where the algorithm is the one Table IV counts (the forward, eqs 4-7), the counted code
    equals Table IV exactly; Table IV's backward is only the dx line of eq (8).

    Table IV L2BN = forward + dx line, entry by entry:
      ADD 5mc+c = (3mc + c) + 2mc, SUB 2mc = 2mc + 0, MUL 4mc+2c = (2mc + 2c) + 2mc,
      DIV 2c (1/m and 1/sqrt per channel), SQUARE mc, SQRT c.
    The reference's backward also does the reductions and recomputations a real backward needs
    (REF_BWD_EXTRA_ELEM, REF_BWD_CHAN), which Table IV leaves out.
    """
    m, c = m_of(shape), shape[1]
    got = count_ops_l2bn(shape)
    table = table4_counts("L2BN", m, c)
    dx_line = scale(TABLE4_DX_LINE_ELEM, m * c)
    assert add(got["forward"], dx_line) == table
    assert got["forward"] == counts(ADD=3 * m * c + c, SUB=2 * m * c, MUL=2 * m * c + 2 * c,
                                    DIV=2 * c, SQUARE=m * c, SQRT=c)
    assert got["backward"] == add(add(dx_line, scale(REF_BWD_EXTRA_ELEM, m * c)),
                                  scale(REF_BWD_CHAN, c))
    # the columns where the whole algorithm is the same as Table IV's: equal in total
    total = add(got["forward"], got["backward"])
    for op in ("SIGN", "ABS", "DIV", "SQUARE", "SQRT"):
        assert total[op] == table[op]


def numpy_l2bn(x, dy, gamma, beta, eps):
    """Float64 L2BN with the usual closed-form backward (not equation 8 term by term)."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    m = x.size // x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * inv
    y = gamma.reshape(bshape) * xhat + beta.reshape(bshape)
    g = dy * gamma.reshape(bshape)
    dx = inv / m * (m * g - g.sum(axis=axes, keepdims=True)
                    - xhat * (g * xhat).sum(axis=axes, keepdims=True))
    return y, dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


@pytest.mark.parametrize("shape", [(2, 3), (64, 5), (4, 3, 5, 5), (16, 6, 8, 8), (3, 2, 1, 7)])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_reference_l2bn_matches_numpy_float64(shape, eps):
    rng = np.random.default_rng(len(shape) * 100 + shape[1])
    x = rng.normal(0.3, 2.0, shape)
    dy = rng.normal(0.0, 1.0, shape)
    gamma = rng.uniform(-1.5, 1.5, shape[1])
    beta = rng.uniform(-1.0, 1.0, shape[1])
    res = l2bn_reference(x, dy, gamma, beta, eps)
    want = numpy_l2bn(x, dy, gamma, beta, eps)
    for got, exp in zip(res[:4], want):
        assert got.shape == exp.shape
        np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-11)


def test_reference_l2bn_rejects_bad_input():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError):
        l2bn_reference(x, np.zeros((4, 2)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError):
        l2bn_reference(x, x, np.ones(2), np.zeros(3))
    with pytest.raises(ValueError):
        l2bn_reference(np.zeros((1, 3)), np.zeros((1, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError):
        l2bn_reference(np.zeros((4, 3, 2)), np.zeros((4, 3, 2)), np.ones(3), np.zeros(3))


# ---------------------------------------------------------------------------------------------
# ASIC estimate and the report.


def test_asic_estimate_by_hand():
    # int8: 10 ADD, 2 MUL, 1 SQRT
    est = asic_estimate({"ADD": 10, "MUL": 2, "SQRT": 1}, "int8")
    assert est["time_ns"] == pytest.approx(10 * 5.25 + 2 * 11.46 + 7.60)  # 83.02 ns
    # 10*0.77*5.25 + 2*9.55*11.46 + 0.82*7.60 = 40.425 + 218.886 + 6.232 fJ
    assert est["energy_pJ"] == pytest.approx(0.265543)
    assert est["area_um2"] == pytest.approx(272 + 2319 + 277)
    # float32: SIGN is free but still a unit of zero area; ABS costs 0.71 ns at 0.01 uW
    est = asic_estimate(counts(SIGN=5, ABS=3), "float32")
    assert est == pytest.approx({"time_ns": 2.13, "energy_pJ": 3 * 0.01 * 0.71 / 1000,
                                 "area_um2": 3.39})
    assert asic_estimate(counts(), "int8") == {"time_ns": 0.0, "energy_pJ": 0.0,
                                               "area_um2": 0.0}


def test_asic_estimate_rejects_bad_input():
    with pytest.raises(ValueError):
        asic_estimate({"ADD": 1}, "int4")
    with pytest.raises(ValueError):
        asic_estimate({"FMA": 1}, "int8")
    with pytest.raises(ValueError):
        asic_estimate({"ADD": -1}, "int8")


def _plain_json(v):
    """True if v is built only from dict/list/str/int/float/None (no numpy scalars)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_json(x) for k, x in v.items())
    if isinstance(v, list):
        return all(map(_plain_json, v))
    return v is None or type(v) in (str, int, float)


@pytest.mark.parametrize("shape", [(128, 84), (8, 6, 4, 4)])
def test_bn_report(shape):
    rep = bn_report(shape)
    assert _plain_json(rep)
    assert json.loads(json.dumps(rep)) == rep
    m, c = m_of(shape), shape[1]
    assert (rep["m"], rep["c"], rep["shape"]) == (m, c, list(shape))
    kern = rep["counts"]["l1bn_kernel"]
    assert {"forward": kern["forward"], "backward": kern["backward"]} == kernel_formula(m, c)
    assert kern["total"] == add(kern["forward"], kern["backward"])
    ref = rep["counts"]["l2bn_reference"]
    assert ref["total"] == add(ref["forward"], ref["backward"])
    assert rep["counts"]["l2bn_table4"] == table4_counts("L2BN", m, c)
    assert rep["counts"]["l1bn_table4"] == table4_counts("L1BN", m, c)
    for dtype in ("int8", "float32"):
        a = rep["asic"][dtype]
        assert a["l1bn_kernel"] == asic_estimate(kern["total"], dtype)
        s = a["saving"]["table4"]
        assert s["time"] == pytest.approx(1 - a["l1bn_table4"]["time_ns"]
                                          / a["l2bn_table4"]["time_ns"])
        assert s["energy"] == pytest.approx(1 - a["l1bn_table4"]["energy_pJ"]
                                            / a["l2bn_table4"]["energy_pJ"])
        # L1BN uses no SQUARE or SQRT: it is cheaper than L2BN in every model here
        for key in ("kernel_vs_reference", "table4"):
            assert 0 < a["saving"][key]["time"] < 1
            assert 0 < a["saving"][key]["energy"] < 1


def test_bn_report_rejects_bad_shapes():
    for shape in [(128,), (1, 6, 1, 1), (4, 0), (2, 3, 4)]:
        with pytest.raises(ValueError):
            bn_report(shape)


def test_opcount_does_not_import_torch():
    root = str(Path(qkernels.__file__).resolve().parent.parent)
    code = "import sys, qkernels.opcount; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
