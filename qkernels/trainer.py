r"""Continue training an exported network without torch: the integer training step on codes.

:class:`Trainer` reads a ``qk`` file's layers and training state (weight stores, velocities,
running statistics, counters, the random stream's keys) and runs the step of qtrain's ``int``
backend with qkernels' own kernels, so that continuing from an exported checkpoint for N
steps gives the same weight stores, velocities, running statistics and counters as qtrain
continuing from that checkpoint, bit for bit (``tests/qtrain/test_export.py``).

The step, per block ``layer -> requant -> L1BN -> ReLU [-> 2x2 max-pool] -> requant`` and for
the head ``linear -> requant(16 bits)``:

* forward: the weight store rounded to ``bits_w`` (nearest, range or mean exponent), an exact
  integer product, rounding to ``bits_a`` (nearest, the batch's range exponent), the L1BN
  training kernel (:func:`qkernels.l1bn_forward`, running statistics updated with the
  fixed-point momentum), ReLU and max-pool on codes;
* loss: the integer base-2 softmax cross-entropy error (:func:`qkernels.softmax_xent_error`);
* backward: each quantizer rounds the error coming back to ``bits_e`` (nearest, or
  stochastically from the stream keyed by its tensor id), the L1BN backward kernel, exact
  integer products for the input error and the weight gradient, weight gradients rounded to
  ``bits_g`` stochastically (the layer's stream);
* update: :func:`qkernels.sgd_step` on every store (momentum, learning rate ``lr / N`` and
  weight decay as fixed-point constants), then the step counter advances.

Where qtrain's int backend holds a tensor in a particular representation that an operation
depends on (the L1BN kernels' input and error codes fill their storage width, from the
peak), the same representation is built here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine import (Network, conv2d, conv2d_input_grad, conv2d_weight_grad_any,
                     exact_matmul, input_codes, linear, one_blas_thread)
from .fixedpoint import MOMENTUM_BITS, RUN_EXP
from .format import QTensor, code_dtype
from .ieee import codes_to_f32, f32_to_codes_where
from .l1bn import l1bn_backward, l1bn_fold, l1bn_forward, l1bn_inference, l1bn_update_running
from .loss import softmax_xent_error
from .optim import decay_code, lr_code, momentum_code, sgd_step
from .pool import maxpool2x2_relu_backward_codes, maxpool2x2_relu_codes
from .qkfile import QKFile, QKFormatError, read
from .quant import (calibrated_exponent, mean_exponent, quantize_nearest,
                    quantize_stochastic)

#: Width of the logits the loss reads (qtrain.loss.LOGIT_BITS).
LOGIT_BITS = 16


def _bit_length(q: np.ndarray) -> int:
    return int(np.abs(q).max()).bit_length() if q.size else 0


def at_width(q: np.ndarray, exp: int, width: int, dtype) -> QTensor:
    """Exact codes re-expressed so their peak fills ``width`` bits (exponent ``E - width`` with
    ``max|value| < 2**E``; exponent 0 for all zeros), as ``dtype``: the representation
    qtrain reads from a float32 container (:func:`qkernels.ieee.f32_to_codes`)."""
    bl = _bit_length(q)
    if bl == 0:
        return QTensor(np.zeros(q.shape, dtype), 0)
    new = exp + bl - width
    s = new - exp
    if s <= 0:  # exact: the result fits dtype
        y = q.astype(dtype)
        if s:
            y <<= -s
        return QTensor(y, new)
    q = q.astype(np.int64)
    return QTensor(((q + (1 << (s - 1))) >> s).astype(dtype), new)


def _storage(bits: int) -> tuple[type, int]:
    """The L1BN kernels' code dtype for ``bits`` and the bits it holds (7 or 15)."""
    dtype = code_dtype(bits)
    return dtype, 8 * np.dtype(dtype).itemsize - 1


@dataclass
class Counts:
    """Saturated, rounded-to-zero and total elements of one rounding (as qtrain's
    ``QuantStats``)."""

    saturated: int = 0
    zeroed: int = 0
    total: int = 0

    def add(self, c) -> None:
        self.saturated += int(c[0])
        self.zeroed += int(c[1])
        self.total += int(c[2])

    def as_dict(self) -> dict[str, int]:
        return {"saturated": self.saturated, "zeroed": self.zeroed, "total": self.total}


@dataclass
class Param:
    """A weight store: int32 codes at ``exp``, the int64 velocity, and the gradient of the
    current step."""

    name: str
    store: np.ndarray
    exp: int
    velocity: np.ndarray
    grad: QTensor | None = None
    raised: int = 0
    saturated: int = 0


@dataclass
class _Quant:
    name: str
    bits_fwd: int
    bits_bwd: int
    tensor_id: int
    fwd: Counts = field(default_factory=Counts)
    bwd: Counts = field(default_factory=Counts)


@dataclass
class _Layer:
    """A conv or linear layer: its geometry and its weight's store."""

    spec: dict
    param: Param
    grad_id: int
    stats_w: Counts = field(default_factory=Counts)
    stats_g: Counts = field(default_factory=Counts)


@dataclass
class _Norm:
    spec: dict
    gamma: Param
    beta: Param
    grad_ids: tuple[int, int]
    running_mean: np.ndarray
    running_dev: np.ndarray
    num_batches_tracked: int
    momentum: float | None
    eps_log2: int | None
    last_out_exp: int
    stats_g: Counts = field(default_factory=Counts)
    #: the stream of its input's error when the norm rounds it stochastically (norm_errors)
    error_id: int | None = None
    stats_e: Counts = field(default_factory=Counts)


@dataclass
class _Pooled:
    """The error at a max-pool's output and the pool's selection (the norm's backward routes
    it through both the pool and the ReLU)."""

    sel: np.ndarray
    error: QTensor


class Trainer:
    """qtrain's integer training step on an exported network, torch-free.

    Example::

        trainer = Trainer.load("model.qk")
        for images, labels in batches:          # uint8 (N, C, H, W), int (N,)
            trainer.step(images, labels)        # lr: the file's, or step(..., lr=0.01)
        trainer.network_state()                 # stores, velocities, statistics, counters

    The network is a sequence of blocks ``conv|linear, requant, l1bn, relu, [maxpool],
    requant`` (a ``flatten`` between them) ending in ``linear, requant`` as qtrain's
    sequential models are; the file must come from a run that trained at least one step.
    """

    def __init__(self, qk: QKFile):
        if not isinstance(qk.manifest.get("training"), dict):
            raise QKFormatError(f"{qk.path}: no training state (export with --format qk)")
        self.qk, self.path = qk, qk.path
        try:
            self._load_state(qk.manifest["training"])
        except QKFormatError:
            raise
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as err:
            raise QKFormatError(f"{qk.path}: malformed training state ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); export it "
                                "again") from None

    def _load_state(self, st: dict) -> None:
        qk = self.qk
        self.input = qk.manifest["input"]
        self.step_count = int(st["step"])
        self.seed = int(st["seed"])
        self.bits_w, self.bits_a = int(st["bits_w"]), int(st["bits_a"])
        self.bits_g, self.bits_e = int(st["bits_g"]), int(st["bits_e"])
        for name in ("bits_w", "bits_a", "bits_g", "bits_e"):
            if not 2 <= getattr(self, name) <= 16:
                raise QKFormatError(f"{qk.path}: training {name}={getattr(self, name)}: the "
                                    "trainer continues quantized runs (2..16 bits) only")
        self.store_bits = int(st["store_bits"])
        self.stochastic_errors = bool(st["stochastic_errors"])
        self.norm_errors = st.get("norm_errors", "nearest")  # files before the field: nearest
        if self.norm_errors not in ("nearest", "stochastic"):
            raise QKFormatError(f"{qk.path}: unknown norm_errors {self.norm_errors!r} "
                                "(nearest or stochastic)")
        self.weight_exp = st["weight_exp"]
        if self.weight_exp not in ("max", "mean"):
            raise QKFormatError(f"{qk.path}: unknown weight_exp {self.weight_exp!r} (max or mean)")
        self.weight_max_log2 = int(st["weight_max_log2"])
        self.lr, self.momentum = float(st["lr"]), float(st["momentum"])
        self.weight_decay = float(st["weight_decay"])
        self.params: dict[str, Param] = {}
        for p in st["parameters"]:
            if not p["snapped"] or "velocity" not in p:
                raise QKFormatError(f"{qk.path}: parameter {p['name']} has no optimizer state "
                                    "yet; export a checkpoint after at least one step")
            store, velocity = self._array(p["store"], np.int32), self._array(p["velocity"],
                                                                             np.int64)
            if store.shape != velocity.shape:
                raise QKFormatError(f"{qk.path}: {p['name']}'s store and velocity shapes differ")
            self.params[p["name"]] = Param(p["name"], store.copy(), int(p["store_exp"]),
                                           velocity.copy())
        ids = st["stream_ids"]
        norms = {n["name"]: n for n in st["norms"]}
        self.nodes: list = []
        for spec in qk.layers:
            self.nodes.append(self._node(spec, ids, norms))
        self._check_pattern()
        self._check_shapes()

    def _array(self, name: str, dtype) -> np.ndarray:
        if name not in self.qk.arrays:
            raise QKFormatError(f"{self.path}: array {name!r} of the training state is missing")
        a = self.qk.arrays[name]
        if a.dtype != dtype:
            raise QKFormatError(f"{self.path}: array {name!r} is {a.dtype.name}, expected "
                                f"{np.dtype(dtype).name}")
        return a

    def _check_shapes(self) -> None:
        """Each store fits its layer: weights their layer's shape, norms' parameters and
        running statistics one per channel."""
        for node in self.nodes:
            if isinstance(node, _Layer):
                spec = node.spec
                want = ((spec["out_channels"], spec["in_channels"], *spec["kernel"])
                        if spec["op"] == "conv" else (spec["out_features"], spec["in_features"]))
                got = node.param.store.shape
            elif isinstance(node, _Norm):
                want = (node.spec["channels"],)
                got = {node.gamma.store.shape, node.beta.store.shape,
                       node.running_mean.shape, node.running_dev.shape}
                got = got.pop() if len(got) == 1 else got
            else:
                continue
            if isinstance(got, set) or tuple(got) != tuple(want):
                raise QKFormatError(f"{self.path}: the training state of {node.spec['name']} "
                                    f"has shape {got}, the layer needs {want}")

    @classmethod
    def load(cls, path: str | Path) -> "Trainer":
        return cls(read(path))

    # -- building ---------------------------------------------------------------------------

    def _param(self, name: str) -> Param:
        if name not in self.params:
            raise QKFormatError(f"{self.path}: no store for parameter {name!r}")
        return self.params[name]

    def _norm_error_id(self, ids: dict, name: str) -> int | None:
        """The stream of a norm's input error under ``norm_errors = "stochastic"``."""
        if self.norm_errors != "stochastic" or self.bits_e >= 16:
            return None
        if "error_id" not in ids:
            raise QKFormatError(f"{self.path}: norm {name} has no error_id, which "
                                "norm_errors stochastic needs")
        return int(ids["error_id"])

    def _node(self, spec: dict, ids: dict, norms: dict):
        op = spec["op"]
        try:
            if op in ("conv", "linear"):
                return _Layer(spec, self._param(f"{spec['name']}.weight"),
                              int(ids[spec["name"]]["grad_ids"][0]))
            if op == "requant":
                q = ids[spec["name"]]
                return _Quant(spec["name"], int(spec["bits"]), int(q["bits_bwd"]),
                              int(q["tensor_id"]))
            if op == "l1bn":
                n = norms[spec["name"]]
                if n.get("run_exp") != RUN_EXP:
                    raise QKFormatError(f"{self.path}: {spec['name']}'s running statistics are "
                                        f"at exponent {n.get('run_exp')}, expected {RUN_EXP}")
                return _Norm(spec, self._param(f"{spec['name']}.weight"),
                             self._param(f"{spec['name']}.bias"),
                             tuple(int(i) for i in ids[spec["name"]]["grad_ids"]),
                             self._array(n["running_mean"], np.int64).copy(),
                             self._array(n["running_dev"], np.int64).copy(),
                             int(n["num_batches_tracked"]), n["momentum"], n["eps_log2"],
                             int(n["last_out_exp"]),
                             error_id=self._norm_error_id(ids[spec["name"]], spec["name"]))
        except KeyError as err:
            raise QKFormatError(f"{self.path}: training state has nothing for layer "
                                f"{spec.get('name', op)} ({err})") from None
        return op  # relu, maxpool, flatten

    def _check_pattern(self) -> None:
        kinds = [n if isinstance(n, str) else type(n).__name__ for n in self.nodes]
        i, ok = 0, True
        while i < len(kinds) and ok:
            if kinds[i] == "flatten":
                i += 1
            elif kinds[i:i + 2] == ["_Layer", "_Quant"] and i + 2 == len(kinds):
                i += 2
            elif kinds[i:i + 4] == ["_Layer", "_Quant", "_Norm", "relu"]:
                i += 4 + (kinds[i + 4:i + 5] == ["maxpool"])
                ok = kinds[i:i + 1] == ["_Quant"]
                i += 1
            else:
                ok = False
        if not ok or i != len(kinds):
            ops = [spec["op"] for spec in self.qk.layers]
            raise QKFormatError(f"{self.path}: layers {ops} are not blocks of conv|linear, "
                                "requant, l1bn, relu, [maxpool], requant ending in linear, "
                                "requant: the trainer runs qtrain's sequential models")

    # -- the step ---------------------------------------------------------------------------

    def _round_error(self, q: _Quant, err: QTensor) -> QTensor:
        if self.stochastic_errors:
            out, c = quantize_stochastic(err, q.bits_bwd, seed=self.seed, step=self.step_count,
                                         tensor_id=q.tensor_id)
        else:
            out, c = quantize_nearest(err, q.bits_bwd)
        q.bwd.add(c)
        return out

    def _round_grad(self, grad: QTensor, tensor_id: int, counts: Counts) -> QTensor:
        out, c = quantize_stochastic(grad, self.bits_g, seed=self.seed, step=self.step_count,
                                     tensor_id=tensor_id)
        counts.add(c)
        return out

    def _weight(self, layer: _Layer) -> tuple[QTensor, np.ndarray | None]:
        """The weight codes of this step (counted), and with the mean rule which weights stay
        inside them (the gradient stops at the others, as qtrain's clipped estimator)."""
        p = layer.param
        exp = self._weight_rule_exp(p)
        w, c = quantize_nearest(QTensor(p.store, p.exp), self.bits_w, exp)
        layer.stats_w.add(c)
        inside = None
        if exp is not None:
            s = exp - p.exp
            codes = p.store.astype(np.int64)
            codes = (codes + (1 << (s - 1))) >> s if s > 0 else codes << -s
            inside = np.abs(codes) <= (1 << (self.bits_w - 1)) - 1
        return QTensor(w.q.astype(code_dtype(self.bits_w)), w.exp), inside

    def _weight_rule_exp(self, p: Param) -> int | None:
        """The exponent the weights round to: None for the range rule, else the mean rule's
        (from the store's codes filling 24 bits, as qtrain reads them)."""
        if self.weight_exp != "mean":
            return None
        wide = at_width(p.store, p.exp, 24, np.int64)
        return mean_exponent(int(np.abs(wide.q).sum()), p.store.size, wide.exp, self.bits_w)

    def _pixels(self, pixels: np.ndarray) -> QTensor:
        return input_codes(self.input, pixels)

    def step(self, pixels: np.ndarray, labels: np.ndarray, lr: float | None = None) -> dict:
        """One training step on a batch: uint8 ``pixels`` (N, C, H, W) and class ``labels``
        (N,). ``lr``: this step's learning rate (default the one in the file, which is the
        schedule's at the export). Returns the batch's correct predictions and size."""
        with one_blas_thread():
            return self._step(pixels, labels, lr)

    def _step(self, pixels: np.ndarray, labels: np.ndarray, lr: float | None) -> dict:
        x = self._pixels(pixels)
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (x.q.shape[0],):
            raise ValueError(f"labels have shape {labels.shape}, expected ({x.q.shape[0]},)")
        tape: list[tuple] = []
        for node in self.nodes:
            x = self._forward(node, x, tape)
        logits = at_width(x.q, x.exp, LOGIT_BITS, np.int32)
        err = softmax_xent_error(logits, labels)
        correct = int((x.q.argmax(1) == labels).sum())
        first = next(e for e in tape if e[0] == "layer")  # needs no input error
        g = err
        for entry in reversed(tape):
            g = self._backward(entry, g, first=entry is first)
        self._update(lr if lr is not None else self.lr, len(labels))
        self.step_count += 1
        return {"correct": correct, "images": len(labels)}

    def _forward(self, node, x: QTensor, tape: list) -> QTensor:
        if isinstance(node, _Layer):
            w, inside = self._weight(node)
            tape.append(("layer", node, x, w, inside))
            spec = node.spec
            if spec["op"] == "linear":
                return linear(x, w)
            return self._conv(spec, x, w)
        if isinstance(node, _Quant):
            y, c = quantize_nearest(QTensor(x.q, x.exp), node.bits_fwd)
            node.fwd.add(c)
            tape.append(("quant", node))
            return y
        if isinstance(node, _Norm):
            dtype, width = _storage(self.bits_a)
            xin = at_width(x.q, x.exp, width, dtype)
            y, cache = l1bn_forward(xin, self._codes24(node.gamma), self._codes24(node.beta),
                                    out_bits=node.spec["out_bits"], eps_log2=node.eps_log2)
            factor = (1.0 / (node.num_batches_tracked + 1) if node.momentum is None
                      else node.momentum)
            l1bn_update_running(node.running_mean, node.running_dev, cache,
                                round(factor * (1 << MOMENTUM_BITS)))
            node.num_batches_tracked += 1
            node.last_out_exp = y.exp
            tape.append(("norm", node, cache, y))
            return y
        if node == "relu":
            tape.append(("relu",))
            return QTensor(np.maximum(x.q, 0), x.exp)
        if node == "maxpool":
            pooled, sel = maxpool2x2_relu_codes(x.q)
            tape.append(("maxpool", sel))
            return QTensor(pooled, x.exp)
        tape.append(("flatten", x.q.shape))
        return QTensor(x.q.reshape(x.q.shape[0], -1), x.exp)

    @staticmethod
    def _conv(spec: dict, x: QTensor, w: QTensor) -> QTensor:
        return conv2d(x, w, spec["kernel"], spec["stride"], spec["padding"])

    @staticmethod
    def _codes24(p: Param) -> QTensor:
        """A store as qtrain's L1BN reads its parameters: int32 codes filling 24 bits."""
        return at_width(p.store, p.exp, 24, np.int32)

    def _backward(self, entry: tuple, g: QTensor, first: bool) -> QTensor | None:
        kind = entry[0]
        if kind == "quant":
            return self._round_error(entry[1], g)
        if kind == "relu":  # joined with the norm below: keep the error as it is
            return g
        if kind == "maxpool":
            return _Pooled(entry[1], g)
        if kind == "flatten":
            return None if g is None else QTensor(g.q.reshape(entry[1]), g.exp)
        if kind == "norm":
            _, node, cache, y = entry
            dtype, width = _storage(self.bits_e)
            if isinstance(g, _Pooled):  # through max-pool and ReLU
                gy = maxpool2x2_relu_backward_codes(g.sel, codes_to_f32(g.error), width, dtype)
            else:  # through ReLU
                gy = f32_to_codes_where(codes_to_f32(g), y.q, width, dtype)
            if node.error_id is None:
                dx, dgamma, dbeta = l1bn_backward(gy, cache, dx_bits=self.bits_e)
            else:  # 16 bits from the kernel, then bits_e stochastically with the norm's stream
                dx, dgamma, dbeta = l1bn_backward(gy, cache, dx_bits=16)
                dx, c = quantize_stochastic(dx, self.bits_e, seed=self.seed,
                                            step=self.step_count, tensor_id=node.error_id)
                node.stats_e.add(c)
            node.gamma.grad = self._round_grad(dgamma, node.grad_ids[0], node.stats_g)
            node.beta.grad = self._round_grad(dbeta, node.grad_ids[1], node.stats_g)
            return dx
        _, layer, x, w, inside = entry
        spec = layer.spec
        e8 = g.q
        if spec["op"] == "linear":
            gw = exact_matmul(np.ascontiguousarray(e8.T), x.q)
            gx = None if first else linear(g, QTensor(np.ascontiguousarray(w.q.T), w.exp))
        else:
            k, st, pad = spec["kernel"], spec["stride"], spec["padding"]
            gw = conv2d_weight_grad_any(x, g, k, st, pad).q
            gx = None if first else conv2d_input_grad(g, w, x.q.shape, k, st, pad)
        grad = self._round_grad(QTensor(gw, g.exp + x.exp), layer.grad_id, layer.stats_g)
        if inside is not None:
            grad = QTensor(np.where(inside, grad.q, 0).astype(grad.q.dtype), grad.exp)
        layer.param.grad = grad
        return gx

    def _update(self, lr: float, batch: int) -> None:
        lr_q = lr_code(lr / batch)
        mom_q = momentum_code(self.momentum)
        decay_q = decay_code(self.weight_decay * batch)
        for p in self.params.values():
            if p.grad is None:
                continue
            exp_max = max(p.exp, self.weight_max_log2 - (self.store_bits - 1))
            res = sgd_step(QTensor(p.store, p.exp), p.velocity, p.grad, lr_q=lr_q,
                           momentum_q=mom_q, store_bits=self.store_bits, exp_max=exp_max,
                           decay_q=decay_q)
            p.exp += res.rise
            p.raised += res.rise
            p.saturated += res.saturated
            p.grad = None

    # -- inference --------------------------------------------------------------------------

    def _eval_forward(self, x: QTensor, record: dict[str, list[int]]) -> QTensor:
        """qtrain's eval-mode forward (unfrozen) on codes: weights rounded from the stores,
        each quantizer at its batch's range exponent (appended to ``record``), each norm
        folded from its running statistics at its input's exponent."""
        for node in self.nodes:
            if isinstance(node, _Layer):
                w = self._weight_codes(node)
                x = linear(x, w) if node.spec["op"] == "linear" else self._conv(node.spec, x, w)
            elif isinstance(node, _Quant):
                y, _ = quantize_nearest(x, node.bits_fwd)
                if np.any(x.q):
                    record.setdefault(node.name, []).append(y.exp)
                x = y
            elif isinstance(node, _Norm):
                xin = at_width(x.q, x.exp, _storage(self.bits_a)[1], code_dtype(self.bits_a))
                x4 = xin.q if xin.q.ndim == 4 else xin.q.reshape(*xin.q.shape, 1, 1)
                y = l1bn_inference(QTensor(np.ascontiguousarray(x4), xin.exp),
                                   self._folded(node, xin.exp), out_bits=node.spec["out_bits"],
                                   out_exp=node.last_out_exp)
                x = QTensor(y.q.reshape(xin.q.shape), y.exp)
            elif node == "relu":
                x = QTensor(np.maximum(x.q, 0), x.exp)
            elif node == "maxpool":
                n, c, h, w_ = x.q.shape
                x = QTensor(x.q.reshape(n, c, h // 2, 2, w_ // 2, 2).max(axis=(3, 5)), x.exp)
            else:
                x = QTensor(x.q.reshape(x.q.shape[0], -1), x.exp)
        return x

    def _weight_codes(self, layer: _Layer) -> QTensor:
        p = layer.param
        w, _ = quantize_nearest(QTensor(p.store, p.exp), self.bits_w, self._weight_rule_exp(p))
        return QTensor(w.q.astype(code_dtype(self.bits_w)), w.exp)

    def _folded(self, node: _Norm, x_exp: int) -> np.ndarray:
        return l1bn_fold(self._codes24(node.gamma), self._codes24(node.beta),
                         node.running_mean, node.running_dev, x_exp=x_exp,
                         out_bits=node.spec["out_bits"], out_exp=node.last_out_exp,
                         eps_log2=node.eps_log2, x_bits=self.bits_a)

    def calibrate(self, pixels: np.ndarray, batch_size: int = 500,
                  rule: str = "median") -> dict[str, int]:
        """Each quantizer's exponent for frozen inference: its range rule's exponents on the
        eval-mode batches of ``pixels``, reduced by ``rule``
        (:func:`qkernels.quant.calibrated_exponent`), as :func:`qtrain.frozen.calibrate`
        does."""
        found: dict[str, list[int]] = {}
        with one_blas_thread():
            for s in range(0, len(pixels), batch_size):
                self._eval_forward(self._pixels(pixels[s:s + batch_size]), found)
        return {name: calibrated_exponent(exps, rule) for name, exps in found.items()}

    def frozen_network(self, pixels: np.ndarray, batch_size: int = 500) -> "Network":
        """The network as it is now, frozen on calibration images ``pixels``: a
        :class:`qkernels.engine.Network` for inference (the same file qtrain's export would
        write after the same training)."""
        exps = self.calibrate(pixels, batch_size)
        manifest, arrays = self.description(exps)
        return Network(QKFile({**manifest, "arrays": {}}, arrays, self.path))

    def description(self, exps: dict[str, int]) -> tuple[dict, dict[str, np.ndarray]]:
        """The qk file's ``input``, ``layers`` and ``output`` for the network as it is now,
        with quantizer exponents ``exps``, and the arrays they name."""
        layers, arrays = [], {}
        last_exp = None
        for spec, node in zip(self.qk.layers, self.nodes):
            spec = dict(spec)
            if isinstance(node, _Layer):
                w = self._weight_codes(node)
                arrays[spec["weight"]] = w.q
                spec["w_exp"] = w.exp
            elif isinstance(node, _Quant):
                spec["exp"] = last_exp = int(exps.get(node.name, 0))
            elif isinstance(node, _Norm):
                arrays[spec["folded"]] = self._folded(node, last_exp)
                spec.update(in_exp=last_exp, out_exp=node.last_out_exp)
            layers.append(spec)
        output = {**self.qk.manifest["output"], "exp": last_exp}
        return {"input": self.input, "layers": layers, "output": output}, arrays

    # -- reading the state ------------------------------------------------------------------

    def network_state(self) -> dict:
        """Everything a step changes: per parameter the store (codes, exponent) and velocity,
        per norm the running statistics, counters and last output exponent, per quantizer and
        layer the rounding counts, and the step."""
        out = {"step": self.step_count, "parameters": {}, "norms": {}, "counts": {}}
        for name, p in self.params.items():
            out["parameters"][name] = {"store": p.store.copy(), "exp": p.exp,
                                       "velocity": p.velocity.copy()}
        for node in self.nodes:
            if isinstance(node, _Norm):
                out["norms"][node.spec["name"]] = {
                    "running_mean": node.running_mean.copy(),
                    "running_dev": node.running_dev.copy(),
                    "num_batches_tracked": node.num_batches_tracked,
                    "last_out_exp": node.last_out_exp}
                counts = {"stats_w": Counts().as_dict(),  # as qtrain's
                          "stats_g": node.stats_g.as_dict()}
                if node.error_id is not None:
                    counts["stats_e"] = node.stats_e.as_dict()
                out["counts"][node.spec["name"]] = counts
            elif isinstance(node, _Quant):
                out["counts"][node.name] = {"stats_fwd": node.fwd.as_dict(),
                                            "stats_bwd": node.bwd.as_dict()}
            elif isinstance(node, _Layer):
                out["counts"][node.spec["name"]] = {"stats_w": node.stats_w.as_dict(),
                                                    "stats_g": node.stats_g.as_dict()}
        return out


__all__ = ["Trainer", "Param", "at_width"]
