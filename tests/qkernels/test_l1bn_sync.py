"""A synchronized L1BN (``collective=``): a batch split across processes gives each process its
share of the outputs, errors and parameter gradients exactly as one process holding the whole
batch does. Processes are simulated by threads that meet in an all-reduce."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qkernels import QTensor
from qkernels.format import code_dtype
from qkernels.l1bn import l1bn_backward, l1bn_forward, l1bn_update_running


class ThreadCollective:
    """An all-reduce among ``n`` threads (each calls it with its own array, in order)."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n)
        self.lock = threading.Lock()
        self.parts: list[np.ndarray] = []
        self.calls = 0

    def member(self):
        return _Member(self)


class _Member:
    def __init__(self, group: ThreadCollective):
        self.group = group

    def allreduce(self, a: np.ndarray, op: str) -> None:
        g = self.group
        assert a.dtype == np.int64
        with g.lock:
            g.parts.append(a.copy())
        g.barrier.wait()
        total = {"sum": np.sum, "max": np.max}[op](np.stack(g.parts), axis=0)
        g.barrier.wait()
        with g.lock:
            g.parts.clear()
            g.calls += 1
        g.barrier.wait()
        a[...] = total


def _run_split(shards, fn):
    group = ThreadCollective(len(shards))
    results = [None] * len(shards)
    errors = []

    def work(i):
        try:
            results[i] = fn(shards[i], group.member())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, group.calls


def _codes(rng, shape, bits):
    q = (1 << (bits - 1)) - 1
    return rng.integers(-q, q + 1, size=shape).astype(code_dtype(bits))


@pytest.mark.parametrize("x_bits,dy_bits", [(8, 8), (16, 16), (8, 16)])
@pytest.mark.parametrize("shape,splits", [((12, 3, 4, 5), [5, 4, 3]), ((6, 7), [1, 2, 3]),
                                          ((8, 2, 3, 3), [4, 4])])
@pytest.mark.parametrize("out_exp", [None, -4])
def test_split_batch_equals_whole(x_bits, dy_bits, shape, splits, out_exp):
    rng = np.random.default_rng(sum(shape) + x_bits + dy_bits)
    x = QTensor(_codes(rng, shape, x_bits), -5)
    dy = QTensor(_codes(rng, shape, dy_bits), -9)
    c = shape[1]
    gamma = QTensor(rng.integers(1 << 10, 1 << 13, size=c).astype(np.int32), -12)
    beta = QTensor(rng.integers(-(1 << 12), 1 << 12, size=c).astype(np.int32), -12)
    kw = {"out_bits": x_bits, "out_exp": out_exp, "eps_log2": -12}

    def whole():
        y, cache = l1bn_forward(x, gamma, beta, **kw)
        dx, dg, db = l1bn_backward(dy, cache, dx_bits=dy_bits)
        rm, rd = np.zeros(c, np.int64), np.full(c, 1 << 20, np.int64)
        l1bn_update_running(rm, rd, cache, 1 << 10)
        return y, dx, dg, db, rm, rd

    y, dx, dg, db, rm, rd = whole()
    bounds = np.cumsum([0] + splits)
    shards = [(x.q[a:b], dy.q[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def part(shard, member):
        xs, dys = shard
        ys, cache = l1bn_forward(QTensor(xs, x.exp), gamma, beta, collective=member, **kw)
        dxs, dgs, dbs = l1bn_backward(QTensor(dys, dy.exp), cache, dx_bits=dy_bits)
        rms, rds = np.zeros(c, np.int64), np.full(c, 1 << 20, np.int64)
        l1bn_update_running(rms, rds, cache, 1 << 10)
        return ys, dxs, dgs, dbs, rms, rds

    results, calls = _run_split(shards, part)
    assert calls == 5 * len(shards)  # per process: three all-reduces forward, two backward
    assert np.array_equal(np.concatenate([r[0].q for r in results]), y.q)
    assert all(r[0].exp == y.exp for r in results)
    assert np.array_equal(np.concatenate([r[1].q for r in results]), dx.q)
    assert all(r[1].exp == dx.exp for r in results)
    for r in results:  # parameter gradients and running statistics: the whole batch's
        assert np.array_equal(r[2].q, dg.q) and r[2].exp == dg.exp
        assert np.array_equal(r[3].q, db.q) and r[3].exp == db.exp
        assert np.array_equal(r[4], rm) and np.array_equal(r[5], rd)


def test_one_process_collective_is_the_plain_kernel():
    rng = np.random.default_rng(0)
    x = QTensor(_codes(rng, (4, 3, 2, 2), 8), -3)
    gamma = QTensor(np.full(3, 1 << 12, np.int32), -12)
    beta = QTensor(np.zeros(3, np.int32), -12)
    y, _ = l1bn_forward(x, gamma, beta, out_bits=8)
    (ys, _), = _run_split([x.q], lambda s, m: l1bn_forward(QTensor(s, x.exp), gamma, beta,
                                                             out_bits=8, collective=m))[0]
    assert np.array_equal(ys.q, y.q) and ys.exp == y.exp


def test_a_batch_of_one_value_per_channel_is_refused_across_processes():
    x = QTensor(np.ones((1, 2), np.int8), 0)
    gamma = QTensor(np.ones(2, np.int32), 0)
    beta = QTensor(np.zeros(2, np.int32), 0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _run_split([x.q], lambda s, m: l1bn_forward(QTensor(s, 0), gamma, beta, out_bits=8,
                                                    collective=m))
