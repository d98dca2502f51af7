"""A torch-free engine for exported qtrain networks (numpy and numba only).

:class:`Network` runs a network read from a ``qk`` file (:mod:`qkernels.qkfile`) as frozen
integer inference: raw uint8 pixels in, logit codes out, every exponent fixed in the file,
so an image's answer does not depend on the batch around it. Its codes equal qtrain's frozen
inference of the same checkpoint bit for bit (``tests/qtrain/test_export.py``).

Each layer of the file is one integer operation on codes ``q`` with a per-tensor exponent
``e`` (value ``q * 2**e``):

========  ==================================================================================
input     ``q = clip(pixel - offset, -clip, clip)`` at the input exponent
conv      exact integer convolution with the weight codes (no padding values but 0); the
          exponent adds the weight's
linear    exact integer matrix product with the weight codes
requant   round half up to ``bits`` at a fixed exponent, saturating
l1bn      the folded batch norm: ``saturate((A*q + B) >> sh)`` per channel
          (:func:`qkernels.l1bn_inference`)
relu      ``max(q, 0)``
maxpool   2x2 windows, stride 2
flatten   (N, C, H, W) -> (N, C*H*W)
========  ==================================================================================

Products run as float32 BLAS where every sum provably stays below ``2**24`` and float64
(below ``2**53``) otherwise, so they are exact integers whatever the summation order; a sum
of ``2**24`` or more is then rounded to float32's 24 significant bits, as qtrain's float32
containers hold it (only wide codes or very long sums reach it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .conv import col2im, conv2d_weight_grad, im2col_as
from .format import QTensor, code_dtype
from .l1bn import l1bn_inference
from .qkfile import QKFile, QKFormatError, read
from .quant import quantize_nearest

#: float32 sums of integers are exact below this.
F32_EXACT = 1 << 24

_controller = None


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (threadpoolctl; a no-op without it).

    The engine alternates BLAS products with Numba's parallel kernels; OpenBLAS's threads keep
    spinning after a product and take the cores the next kernel's threads need. On this
    project's 2 cores a lenet5 training step took 131 ms with both pools and 8 ms with BLAS on
    one thread (batch 128)."""
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _peak(q: np.ndarray) -> int:
    return int(np.abs(q).max()) if q.size else 0


def _exact_dtype(bound: int):
    """The BLAS type whose sums of integers stay exact below ``bound`` (None: int64 numpy)."""
    return np.float32 if bound < F32_EXACT else np.float64 if bound < (1 << 53) else None


def exact_matmul(a: np.ndarray, b: np.ndarray, bound: int | None = None) -> np.ndarray:
    """``a @ b`` of integer matrices (or of their exact float copies), exact: float32 BLAS
    when every partial sum stays below 2**24, float64 below 2**53, else int64 numpy, with the
    sums bounded by ``bound`` (default from the operands' peaks). int32 when every sum fits
    it, else int64."""
    if bound is None:
        bound = a.shape[1] * _peak(a) * _peak(b)
    out = np.int32 if bound < (1 << 31) else np.int64
    dt = _exact_dtype(bound)
    if dt is None:
        return a.astype(np.int64) @ b.astype(np.int64)
    return (a.astype(dt, copy=False) @ b.astype(dt, copy=False)).astype(out)


def as_float32(acc: np.ndarray, bound: int) -> np.ndarray:
    """Exact integer sums as qtrain holds them between layers: in float32 containers, so a sum
    of 2**24 or more is rounded to 24 significant bits (to nearest, ties to even) before the
    next rounding reads it. Below ``bound < 2**24`` nothing changes."""
    if bound < F32_EXACT:
        return acc
    return acc.astype(np.float32).astype(np.int64)


#: Images per block of a convolution: the patch matrix of a block stays near this many codes.
BLOCK_CODES = 1 << 22


def _image_blocks(n: int, per_image: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_CODES // max(per_image, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def conv2d(x: QTensor, w: QTensor, kernel, stride, padding) -> QTensor:
    """Exact integer convolution of codes (N, C, H, W) with weight codes (O, C, kh, kw):
    accumulators (N, O, OH, OW) (int32 where they fit, else int64) at exponent
    ``x.exp + w.exp``. Runs in blocks of images, so the patch matrix stays small."""
    n, o = x.q.shape[0], w.q.shape[0]
    oh = (x.q.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (x.q.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    wm = w.q.reshape(o, -1)
    bound = wm.shape[1] * _peak(x.q) * _peak(w.q)
    dt = _exact_dtype(bound) or np.int64
    wd = wm.astype(dt)
    out = np.empty((n, o, oh, ow), np.int32 if bound < (1 << 31) else np.int64)
    for i, j in _image_blocks(n, wm.shape[1] * oh * ow):
        cols = im2col_as(x.q[i:j], tuple(kernel), tuple(stride), tuple(padding), dt)
        # exact products of integers; the assignment converts them to the integer type
        out[i:j] = (wd @ cols).reshape(o, j - i, oh, ow).transpose(1, 0, 2, 3)
    return QTensor(as_float32(out, bound), x.exp + w.exp)


def linear(x: QTensor, w: QTensor) -> QTensor:
    """``x @ w.T`` of codes, exact, then as qtrain's float32 container holds it."""
    bound = w.q.shape[1] * _peak(x.q) * _peak(w.q)
    return QTensor(as_float32(exact_matmul(x.q, np.ascontiguousarray(w.q.T), bound), bound),
                   x.exp + w.exp)


def conv2d_input_grad(e: QTensor, w: QTensor, shape: tuple, kernel, stride, padding) -> QTensor:
    """The input error of :func:`conv2d` for output errors ``e`` (N, O, OH, OW): (N, C, H, W)
    at ``e.exp + w.exp``, exact, then as qtrain's float32 container holds it
    (:func:`as_float32`); int32 through im2col's adjoint in blocks of images, or int64 sums
    where int32 could overflow."""
    o = w.q.shape[0]
    # each input element sums at most O * ceil(kh/sh) * ceil(kw/sw) products
    overlap = -(-kernel[0] // stride[0]) * -(-kernel[1] // stride[1])
    bound = o * overlap * _peak(e.q) * _peak(w.q)
    if bound >= (1 << 31):  # col2im adds in int32: take the exact int64 route
        out64 = np.zeros(shape, np.int64)
        g = e.q.astype(np.int64)
        for u in range(kernel[0]):
            for v in range(kernel[1]):
                # out[n, c, i*s + u - p, j*s + v - p] += sum_o e[n, o, i, j] * w[o, c, u, v]
                contrib = np.einsum("noij,oc->ncij", g, w.q[:, :, u, v].astype(np.int64))
                _scatter_add(out64, contrib, u, v, stride, padding)
        return QTensor(as_float32(out64, bound), e.exp + w.exp)
    wt = np.ascontiguousarray(w.q.reshape(o, -1).T)
    out = np.empty(shape, np.int32)
    per_image = wt.shape[0] * e.q.shape[2] * e.q.shape[3]
    for i, j in _image_blocks(shape[0], per_image):
        rows = np.ascontiguousarray(e.q[i:j].transpose(1, 0, 2, 3)).reshape(o, -1)
        back = exact_matmul(wt, rows)
        out[i:j] = col2im(back.astype(np.int32, copy=False), (j - i, *shape[1:]),
                          tuple(kernel), tuple(stride), tuple(padding))
    return QTensor(as_float32(out, bound), e.exp + w.exp)


def _scatter_add(out: np.ndarray, contrib: np.ndarray, u: int, v: int, stride, padding) -> None:
    """``out[:, :, i*s0 + u - p0, j*s1 + v - p1] += contrib[:, :, i, j]`` where inside."""
    h, w = out.shape[2:]
    oh, ow = contrib.shape[2:]
    for i in range(oh):
        y = i * stride[0] + u - padding[0]
        if not 0 <= y < h:
            continue
        for j in range(ow):
            x = j * stride[1] + v - padding[1]
            if 0 <= x < w:
                out[:, :, y, x] += contrib[:, :, i, j]


def conv2d_weight_grad_any(x: QTensor, e: QTensor, kernel, stride, padding) -> QTensor:
    """The exact weight gradient of :func:`conv2d` (int64 (O, C, kh, kw) at ``x.exp +
    e.exp``): qkernels' int8 kernel for codes of at most 8 bits, else float64/int64 products
    summed over blocks of images (exact)."""
    if max(_peak(x.q), _peak(e.q)) <= 127:
        return conv2d_weight_grad(QTensor(x.q.astype(np.int8, copy=False), x.exp),
                                  QTensor(e.q.astype(np.int8, copy=False), e.exp),
                                  tuple(kernel), stride=tuple(stride), padding=tuple(padding))
    o = e.q.shape[1]
    total = None
    for i, j in _image_blocks(x.q.shape[0], o * e.q.shape[2] * e.q.shape[3]):
        cols = im2col_as(x.q[i:j], tuple(kernel), tuple(stride), tuple(padding), np.int64)
        rows = np.ascontiguousarray(e.q[i:j].transpose(1, 0, 2, 3)).reshape(o, -1)
        part = exact_matmul(rows, np.ascontiguousarray(cols.T)).astype(np.int64)
        total = part if total is None else total + part
    return QTensor(total.reshape(o, x.q.shape[1], *kernel), x.exp + e.exp)


def input_codes(spec: dict, pixels: np.ndarray) -> QTensor:
    """uint8 pixels (N, C, H, W), or (N, H, W) for one channel, as the input codes of a qk
    file's ``input`` spec: ``clip(pixel - offset, -clip, clip)`` at its exponent."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype.name}")
    shape = tuple(spec["shape"])
    if pixels.ndim == 3 and shape[0] == 1:
        pixels = pixels[:, None]
    if pixels.shape[1:] != shape:
        raise ValueError(f"pixels have shape {pixels.shape}, the network takes "
                         f"(N, {', '.join(map(str, shape))})")
    clip = int(spec["clip"])
    q = np.clip(pixels.astype(np.int16) - int(spec["offset"]), -clip, clip)
    return QTensor(q.astype(code_dtype(int(spec["bits"]))), int(spec["exp"]))


class Network:
    """A network from a qk file, run as frozen integer inference.

    Example::

        net = Network.load("model.qk")
        codes = net.logit_codes(pixels)      # uint8 (N, C, H, W) -> int32 (N, classes)
        labels = net.predict(pixels)
    """

    def __init__(self, qk: QKFile):
        self.qk = qk
        self.input = qk.manifest["input"]
        self.layers = qk.layers
        self.output = qk.manifest["output"]
        self.shape = tuple(self.input["shape"])

    @classmethod
    def load(cls, path: str | Path) -> "Network":
        return cls(read(path))

    @property
    def logit_exp(self) -> int:
        """The logits' exponent: value = code * 2**logit_exp."""
        return int(self.output["exp"])

    def forward(self, pixels: np.ndarray) -> QTensor:
        """Logit codes (int64 (N, classes)) and their exponent for uint8 ``pixels``."""
        with one_blas_thread():
            return self._forward(pixels)

    def _forward(self, pixels: np.ndarray) -> QTensor:
        q, exp = input_codes(self.input, pixels)
        for layer in self.layers:
            q, exp = self._apply(layer, q, exp)
        return QTensor(q, exp)

    def logit_codes(self, pixels: np.ndarray) -> np.ndarray:
        """The logits as int32 codes at :attr:`logit_exp`."""
        return self.forward(pixels).q.astype(np.int32)

    def predict(self, pixels: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Class indices (the first largest logit), batch by batch."""
        out = [self.forward(pixels[i:i + batch_size]).q.argmax(1)
               for i in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _apply(self, layer: dict, q: np.ndarray, exp: int) -> tuple[np.ndarray, int]:
        op = layer["op"]
        if op == "conv":
            acc = conv2d(QTensor(q, exp), QTensor(self.qk.array(layer["weight"]),
                                                  int(layer["w_exp"])),
                         layer["kernel"], layer["stride"], layer["padding"])
            return acc.q, acc.exp
        if op == "linear":
            acc = linear(QTensor(q, exp), QTensor(self.qk.array(layer["weight"]),
                                                  int(layer["w_exp"])))
            return acc.q, acc.exp
        if op == "requant":
            bits = int(layer["bits"])
            y, _ = quantize_nearest(QTensor(q, exp), bits, int(layer["exp"]))
            return y.q, y.exp
        if op == "l1bn":
            if exp != int(layer["in_exp"]):
                raise QKFormatError(f"{self.qk.path}: {layer['name']} was folded for input "
                                    f"exponent {layer['in_exp']}, gets {exp}")
            x4 = q if q.ndim == 4 else q.reshape(q.shape[0], q.shape[1], 1, 1)
            y = l1bn_inference(QTensor(np.ascontiguousarray(x4), exp),
                               self.qk.array(layer["folded"]), out_bits=int(layer["out_bits"]),
                               out_exp=int(layer["out_exp"]))
            return y.q.reshape(q.shape), y.exp
        if op == "relu":
            return np.maximum(q, 0), exp
        if op == "maxpool":
            n, c, h, w = q.shape
            return q.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5)), exp
        if op == "flatten":
            return q.reshape(q.shape[0], -1), exp
        raise QKFormatError(f"{self.qk.path}: unknown op {op!r}")  # validate() prevents this


__all__ = ["Network", "as_float32", "conv2d", "conv2d_input_grad", "conv2d_weight_grad_any",
           "exact_matmul", "input_codes", "linear"]
