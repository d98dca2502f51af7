"""A golden checksum of the L1BN kernels' integer results, for refactors.

A fixed set of cases (int8, int16 and mixed widths; output and error exponents given and chosen
from the range; with and without epsilon; running statistics, fold and folded inference) is run
through the public functions and every result is hashed. The constant was computed at commit
9d41d86, before the int8 and int16 kernels became one width-generic set, and is unchanged
since: any change to the arithmetic changes it. If a change is meant to move the numbers,
print the new value with ``python -m tests.qkernels.test_l1bn_golden`` and say why in the
commit message.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np

from qkernels import (QTensor, l1bn_backward, l1bn_fold, l1bn_forward, l1bn_inference,
                      l1bn_update_running)
from qkernels.format import code_dtype

GOLDEN = "80683e9997734025bdc35e634f869103719c6ea7fe6804c1a78e6c245dfd394e"


def _codes(rng, bits, shape, spread_div=1, offset=True):
    q = (1 << (bits - 1)) - 1
    spread = max(1, q // spread_div)
    x = rng.integers(-spread, spread + 1, size=shape)
    if offset:
        x = x + rng.integers(-(q // 2), q // 2 + 1)
    return np.clip(x, -q, q).astype(code_dtype(bits))


def checksum() -> str:
    """sha256 over every result of the fixed cases, in order."""
    h = hashlib.sha256()

    def put(a) -> None:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}|{a.shape}|".encode() + a.tobytes())

    rng = np.random.default_rng(2026)
    for shape in ((64, 5), (8, 6, 4, 4), (3, 2, 1, 1)):
        for xb, gb in ((8, 8), (4, 8), (8, 16), (16, 8), (12, 12), (16, 16)):
            for spread_div in (1, 64):
                xq = _codes(rng, xb, shape, spread_div)
                gq = _codes(rng, gb, shape, offset=False)
                c = shape[1]
                gamma = QTensor(rng.integers(-(1 << 14), 1 << 14, size=c).astype(np.int32), -12)
                beta = QTensor(rng.integers(-(1 << 12), 1 << 12, size=c).astype(np.int32), -12)
                eps = None if spread_div == 1 else -10
                for ob in (4, 8, 16):
                    for oe in (None, -6):
                        y, cache = l1bn_forward(QTensor(xq, -5), gamma, beta, out_bits=ob,
                                                out_exp=oe, eps_log2=eps)
                        put(y.q), put(y.exp), put(cache.stats)
                        for de in (None, -9):
                            dx, dg, db = l1bn_backward(QTensor(gq, -7), cache, dx_bits=ob,
                                                       dx_exp=de)
                            put(dx.q), put(dx.exp), put(dg.q), put(db.q)
                        rm = rng.integers(-(1 << 30), 1 << 30, size=c).astype(np.int64)
                        rd = rng.integers(0, 1 << 30, size=c).astype(np.int64)
                        l1bn_update_running(rm, rd, cache, 6554)
                        put(rm), put(rd)
                        folded = l1bn_fold(gamma, beta, rm, rd, x_exp=-5, out_bits=ob,
                                           out_exp=-6, eps_log2=eps, x_bits=xb)
                        put(folded)
                        put(l1bn_inference(QTensor(xq, -5), folded, out_bits=ob, out_exp=-6).q)
    return h.hexdigest()


def test_l1bn_golden_checksum():
    got = checksum()
    assert got == GOLDEN, (f"L1BN results changed: checksum {got} != {GOLDEN}; if meant, "
                           "update GOLDEN (python -m tests.qkernels.test_l1bn_golden)")


if __name__ == "__main__":
    print(checksum())
    sys.exit(0)
