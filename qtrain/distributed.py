"""Data-parallel training on torch.distributed, bit-identical at every world size.

``torchrun --nproc-per-node N -m qtrain ...`` (or ``qtrain --nproc N ...``) starts N processes;
:func:`init` joins them (:func:`backend_for`: gloo, or NCCL for a float network with a GPU per
process; with NCCL a gloo group carries the host-side collectives). Each global batch (the same
batches, in the same order, as one process would draw) is split into N contiguous shares
(:func:`shard`), and each process runs the forward and backward on its share. Integer
arithmetic makes the result independent of N, bit for bit, because everything that a single
process would compute from the whole batch is computed from the whole batch here too:

* every rounding of activations and errors takes the exponent of the whole batch's range:
  each process's peak exponent, all-reduced by max (:func:`range_exponent`);
* every L1 batch norm is synchronized: its per-channel integer sums are all-reduced between
  the kernels' statistics and apply phases (``qkernels.l1bn``'s ``collective``,
  :class:`TorchCollective`), so the normalization, the error, dgamma, dbeta and the running
  statistics are the whole batch's;
* integer tensors that enter a batch norm are put on the batch's common exponent
  (:func:`align`: exact shifts);
* weight gradients are exact sums: they are all-reduced as exact integers (float64 holds
  them: the sums stay below 2**53 LSBs) before the stochastic rounding, which then runs on the
  same tensor in every process (its counter stream is keyed by the parameter, not by a
  process);
* stochastic rounding of errors takes each element's random number at its place in the whole
  batch's tensor (:func:`first_element`);
* the optimizer divides by the global batch size.

Outside :func:`synchronized` (the training step) nothing is all-reduced: evaluation hands
whole test batches to the processes in turn. What each all-reduce costs is counted in
:data:`TRAFFIC` (messages and bytes).

Float runs (bits 32) use ``DistributedDataParallel``: float sums depend on their order, so they
are not bit-identical across world sizes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from qkernels import QTensor
from qkernels.quant import code_top

#: Exponent all-reduced for "all zero" (below any real one).
_NONE = -(1 << 40)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes the run directory and prints."""
        return self.rank == 0


_world = World()
_host_group = None  # the gloo group of host (CPU) tensors when the default group is NCCL
_sync = False
_first_sample = 0  # where this process's share starts in the step's batch

#: All-reduces made by this process since the last :func:`reset_traffic`: how many, their
#: payload in bytes (an all-reduce among N processes sends about 2 (N-1)/N times the payload
#: per process), and the seconds spent in them (the transfer and the wait for the slowest).
TRAFFIC = {"messages": 0, "bytes": 0, "seconds": 0.0}


def reset_traffic() -> None:
    TRAFFIC.update(messages=0, bytes=0, seconds=0.0)


def world() -> World:
    """This process's :class:`World` (rank 0 of 1 unless :func:`init` joined a group)."""
    return _world


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets
    ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def _gpus_per_process(device: str) -> bool:
    """Whether ``device`` is a bare ``cuda`` (each process its own GPU, see
    :func:`process_device`) and this machine has a GPU for each of its processes (torchrun's
    ``LOCAL_WORLD_SIZE``)."""
    if device != "cuda" or not torch.cuda.is_available():
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.device_count() >= local


def backend_for(device: str, quantized: bool) -> str:
    """The torch.distributed backend of a run on ``device``: NCCL for a float network
    (``DistributedDataParallel``'s all-reduces of GPU tensors) when every process on the
    machine has a GPU of its own; gloo otherwise. A quantized network's collectives all-reduce
    host arrays (exponents, integer sums), which gloo carries whatever the device, and NCCL
    refuses two processes on one GPU."""
    return "nccl" if not quantized and _gpus_per_process(device) else "gloo"


def process_device(device: str) -> str:
    """This process's torch device for a run on ``device``: a bare ``cuda`` on several
    processes means the GPU of the process's ``LOCAL_RANK`` (modulo the machine's GPUs, so
    processes may share one); anything else as given."""
    if device != "cuda" or not launched() or not torch.cuda.is_available():
        return device
    return f"cuda:{_local_rank() % torch.cuda.device_count()}"


def init(backend: str | None = None, device: str = "cpu") -> World:
    """Join the process group torchrun describes in the environment (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), once; a single process stays alone.
    ``backend`` (default gloo); with NCCL this process's GPU is ``process_device(device)`` and
    a gloo group carries the collectives of host tensors."""
    global _world, _host_group
    import torch.distributed as dist

    if not launched():
        return _world
    if not dist.is_initialized():
        backend = backend or "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(process_device(device)))
        dist.init_process_group(backend)
        _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    _world = World(dist.get_rank(), dist.get_world_size())
    return _world


def shutdown() -> None:
    """Leave the process group (a no-op when alone)."""
    global _world, _host_group
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _world, _host_group = World(), None


@contextmanager
def synchronized(first_sample: int = 0) -> Iterator[None]:
    """Within this block (a training step's forward and backward on this process's share of
    the batch, which starts at sample ``first_sample``) roundings, batch norms and weight
    gradients are the whole global batch's (see the module docstring)."""
    global _sync, _first_sample
    saved = _sync, _first_sample
    _sync, _first_sample = _world.size > 1, first_sample
    try:
        yield
    finally:
        _sync, _first_sample = saved


def first_element(t) -> int:
    """Where this process's share of a batch tensor (batch first) starts in the whole batch's
    tensor, in elements (C order): the index its stochastic rounding starts at."""
    n = t.shape[0] if t.ndim else 1
    return _first_sample * (int(np.prod(t.shape)) // n if n else 0)


def active() -> bool:
    """Whether the processes are synchronizing (inside :func:`synchronized`, world size > 1)."""
    return _sync


def shard(n: int, world: World | None = None) -> slice:
    """This process's share of a global batch of ``n``: contiguous, sizes differing by one at
    most, larger shares first (``np.array_split``'s boundaries)."""
    w = world or _world
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (w.rank < extra))


# ---------------------------------------------------------------------------------------------
# All-reduces


class PeerLost(RuntimeError):
    """Another process of the run is gone (it died, or its machine did): a collective failed."""


@contextmanager
def _collective_call(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:  # gloo: "Connection closed by peer", timeouts, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo's source location
        raise PeerLost(f"another process of the run stopped ({what} failed: {first})") from err


def _allreduce(t: torch.Tensor, op: str) -> None:
    import torch.distributed as dist

    TRAFFIC["messages"] += 1
    TRAFFIC["bytes"] += t.numel() * t.element_size()
    start = time.perf_counter()
    with _collective_call("an all-reduce"):
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op],
                        group=_host_group if t.device.type == "cpu" else None)
    TRAFFIC["seconds"] += time.perf_counter() - start


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable object) in every process."""
    import torch.distributed as dist

    if _world.size == 1:
        return obj
    box = [obj]
    with _collective_call("a broadcast"):
        dist.broadcast_object_list(box, src=0, group=_host_group)
    return box[0]


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """What a training step runs on several processes: a float network (no quantizer)
    wrapped in ``DistributedDataParallel`` (gradients averaged by float all-reduces, not
    bit-identical across world sizes; batch norm statistics stay per process); a quantized
    network as it is (its layers synchronize themselves, see the module docstring)."""
    qconfig = getattr(model, "qconfig", None)
    if _world.size == 1 or (qconfig is not None and qconfig.quantized):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


class TorchCollective:
    """``qkernels.l1bn``'s collective on torch.distributed: an in-place all-reduce of an int64
    numpy array."""

    def allreduce(self, a: np.ndarray, op: str) -> None:
        t = torch.from_numpy(a)  # shares a's memory: the result lands in a
        _allreduce(t, op)


_COLLECTIVE = TorchCollective()


def collective() -> TorchCollective | None:
    """The collective of a synchronized batch norm, or None outside :func:`synchronized`."""
    return _COLLECTIVE if _sync else None


def max_int(v: int | None) -> int | None:
    """The largest of the processes' ``v`` (None where a process has none; None if none has)."""
    t = torch.tensor([_NONE if v is None else v], dtype=torch.int64)
    _allreduce(t, "max")
    top = int(t[0])
    return None if top == _NONE else top


def range_exponent(top: int | None, bits: int) -> int | None:
    """The exponent a range quantizer to ``bits`` picks for the whole batch, from this
    process's peak exponent ``top`` (``E`` with ``max|x| < 2**E``; None when all zero)."""
    top = max_int(top)
    return None if top is None else top - (bits - 1)


def sum_float(t: torch.Tensor) -> torch.Tensor:
    """The processes' exact sums of ``t`` (values on a common grid whose total stays below
    2**53 LSBs, as weight gradients of codes are), as float64."""
    out = t.detach().to("cpu", torch.float64).contiguous()
    _allreduce(out, "sum")
    return out.to(t.device)


def sum_codes(q: QTensor) -> QTensor:
    """The processes' sum of integer codes, each at its own exponent: put on the smallest
    exponent (exact left shifts), then added as int64."""
    exp = -max_int(-q.exp)
    codes = np.ascontiguousarray(q.q, dtype=np.int64) << (q.exp - exp)
    _allreduce(torch.from_numpy(codes), "sum")
    return QTensor(codes, exp)


def align(q: QTensor, width: int) -> QTensor:
    """Codes at the exponent the whole batch's codes would have at ``width`` bits (``E -
    width``, ``E`` of the batch's peak): this process's codes shifted right, exactly (their
    values lie on the batch's grid: they are roundings at the batch's exponent)."""
    top = max_int(code_top(q))
    if top is None:
        return q
    exp = top - width
    if exp == q.exp:
        return q
    shift = exp - q.exp
    assert shift > 0, "the batch's peak is at least this process's"
    return QTensor((q.q >> shift).astype(q.q.dtype, copy=False), exp)


def sum_counts(values: list[int]) -> list[int]:
    """The processes' sums of integer counts (one all-reduce)."""
    if _world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    _allreduce(t, "sum")
    return [int(v) for v in t]


def gather_batch(values: np.ndarray, n: int) -> np.ndarray:
    """The global batch's per-sample ``values`` (float64), from each process's share: written at
    the share's place in a zero vector and all-reduced (adding zeros is exact)."""
    if _world.size == 1:
        return np.asarray(values, dtype=np.float64)
    out = torch.zeros(n, dtype=torch.float64)
    out[shard(n)] = torch.from_numpy(np.asarray(values, dtype=np.float64))
    _allreduce(out, "sum")
    return out.numpy()



@contextmanager
def whole_counts(model: torch.nn.Module, replicated: bool) -> Iterator[None]:
    """Make the quantizer counts that the block adds the sum over the processes, as one
    process doing all their work would count (one all-reduce at the end). ``replicated``:
    weight and gradient counters see the same tensors in every process (a training step), so
    only the activation and error quantizers' counts are added up; otherwise (evaluation, where
    each process runs its own batches) every counter's are."""
    from .quant import Quantize, QuantStats

    if _world.size == 1:
        yield
        return
    slots = [(m, k) for m in model.modules() for k in list(vars(m))
             if isinstance(getattr(m, k, None), QuantStats)
             and not (replicated and not isinstance(m, Quantize))]
    before = [getattr(m, k).as_dict() for m, k in slots]
    yield
    delta = sum_counts([getattr(m, k).as_dict()[f] - b[f]
                        for (m, k), b in zip(slots, before) for f in b])
    for i, ((m, k), b) in enumerate(zip(slots, before)):
        setattr(m, k, QuantStats(*(b[f] + d for f, d in zip(b, delta[3 * i:3 * i + 3]))))
