"""An exported network (the qk description, :mod:`qtrain.export`) as an ONNX graph of integer
operators, which onnxruntime runs to the same codes as qtrain's frozen integer inference.

Input ``pixels``: uint8 (N, C, H, W). Outputs ``logit_codes`` (int32 (N, classes)) and
``logits`` (float32: the codes times ``2**logit_exp``, an exact power-of-two scaling; the
exponent is also in the model's metadata). Per layer of the description:

=========  =========================================================================
input      ``Cast`` to int32, ``Sub`` 128, ``Clip`` to [-127, 127], ``Cast`` to int8
conv       ``ConvInteger`` (int8 x int8 -> int32, exact), then ``Cast`` to float32 where a sum
           can reach 2**24 (qtrain's containers round such sums to 24 bits)
linear     ``MatMulInteger`` (int8 x int8 -> int32, exact), the same ``Cast`` where needed
requant    ``Cast`` to int64, then for a rising exponent ``Add`` half and a floor division
           by ``2**s``; for a falling one ``Mul`` by ``2**-s``; ``Clip`` to the width
l1bn       ``Cast`` to int64, ``Mul`` A, ``Add`` B, floor division by ``2**sh`` (all per
           channel), ``Clip`` to the width
relu       ``Relu``; ``maxpool`` ``MaxPool`` 2x2/2; ``flatten`` ``Flatten``
=========  =========================================================================

ONNX's integer ``Div`` truncates toward zero; the floor division a right shift is on two's
complement integers is ``q - (r < 0)`` with ``q = Div(v, d)`` and ``r = v - q*d``. Codes
between layers travel as int8 (so ``ConvInteger``, ``MatMulInteger`` and ``MaxPool`` take
them), which limits ONNX export to widths of at most 8 bits (the logits' 16 bits excepted);
wider networks export to the qk format.

onnx is an optional dependency (``pip install 'qtrain[onnx]'``); importing this module without
it raises a one-line ImportError.
"""

from __future__ import annotations

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as err:  # pragma: no cover - exercised where onnx is absent
    raise ImportError("ONNX export needs the onnx package: pip install 'qtrain[onnx]'") from err

from .export import ExportError

#: The opset the graph is written for (integer Clip/Relu need 13-14).
OPSET = 17


class _Graph:
    """Nodes and initializers under construction, with fresh names."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def floor_div(self, v: str, d: np.ndarray | int) -> str:
        """floor(v / d) for int64 ``v`` and positive int64 ``d`` (a scalar or broadcast)."""
        dc = self.const(d, np.int64, "divisor")
        q = self.op("Div", [v, dc])
        r = self.op("Sub", [v, self.op("Mul", [q, dc])])
        neg = self.cast(self.op("Less", [r, self.const(0, np.int64, "zero")]), TensorProto.INT64)
        return self.op("Sub", [q, neg])

    def clip(self, v: str, bits: int) -> str:
        q = (1 << (bits - 1)) - 1
        return self.op("Clip", [v, self.const(-q, np.int64, "lo"), self.const(q, np.int64, "hi")])


def _narrow(g: _Graph, v: str, bits: int) -> str:
    """int64 codes of ``bits`` bits as int8 (<= 8 bits) or int32."""
    return g.cast(v, TensorProto.INT8 if bits <= 8 else TensorProto.INT32)


def to_onnx(manifest: dict, arrays: dict[str, np.ndarray], *, doc: str = "") -> "onnx.ModelProto":
    """The ONNX model of a qk description (``manifest`` with ``input``, ``layers``, ``output``
    and the ``arrays`` they name). :class:`~qtrain.export.ExportError` for widths ONNX's
    integer operators cannot take."""
    g = _Graph()
    inp = manifest["input"]
    c, h, w = inp["shape"]
    x = g.cast("pixels", TensorProto.INT32)  # (onnxruntime has no int16 Clip)
    x = g.op("Sub", [x, g.const(inp["offset"], np.int32, "offset")])
    x = g.op("Clip", [x, g.const(-inp["clip"], np.int32, "lo"), g.const(inp["clip"], np.int32,
                                                                         "hi")])
    x, exp, bits, rank = g.cast(x, TensorProto.INT8), inp["exp"], inp["bits"], 4
    for i, layer in enumerate(manifest["layers"]):
        op = layer["op"]
        if op in ("conv", "linear"):
            if bits > 8 or layer["w_bits"] > 8:
                raise ExportError(f"layer {i} ({layer['name']}) multiplies {bits}-bit codes by "
                                  f"{layer['w_bits']}-bit weights: ONNX export takes at most 8 "
                                  "bits (ConvInteger/MatMulInteger); use --format qk")
            wq = arrays[layer["weight"]].astype(np.int8)
            if op == "conv":
                pads = layer["padding"] * 2  # [top, left, bottom, right]
                x = g.op("ConvInteger", [x, g.const(wq, np.int8, "weight")], "conv",
                         strides=layer["stride"], pads=pads)
            else:
                x = g.op("MatMulInteger", [x, g.const(np.ascontiguousarray(wq.T), np.int8,
                                                      "weight_t")], "matmul")
            terms = wq[0].size
            if terms * ((1 << (bits - 1)) - 1) * int(np.abs(wq).max(initial=0)) >= 1 << 24:
                # qtrain holds the sums in float32 containers: past 2**24 they round there
                x = g.cast(x, TensorProto.FLOAT)
            exp, bits = exp + layer["w_exp"], 32
        elif op == "requant":
            v = g.cast(x, TensorProto.INT64)
            s = layer["exp"] - exp
            if s > 0:
                v = g.floor_div(g.op("Add", [v, g.const(1 << (s - 1), np.int64, "half")]), 1 << s)
            elif s < 0:
                v = g.op("Mul", [v, g.const(1 << -s, np.int64, "scale")])
            x, exp, bits = _narrow(g, g.clip(v, layer["bits"]), layer["bits"]), layer["exp"], \
                layer["bits"]
        elif op == "l1bn":
            if exp != layer["in_exp"]:
                raise ExportError(f"layer {i} ({layer['name']}) was folded for input exponent "
                                  f"{layer['in_exp']}, gets {exp}")
            folded = arrays[layer["folded"]]
            shape = (1, -1) + (1,) * (rank - 2)
            v = g.cast(x, TensorProto.INT64)
            v = g.op("Mul", [v, g.const(folded[:, 0].reshape(shape), np.int64, "bn_a")])
            v = g.op("Add", [v, g.const(folded[:, 1].reshape(shape), np.int64, "bn_b")])
            v = g.floor_div(v, (np.int64(1) << folded[:, 2]).reshape(shape))
            x, exp, bits = _narrow(g, g.clip(v, layer["out_bits"]), layer["out_bits"]), \
                layer["out_exp"], layer["out_bits"]
        elif op == "relu":
            x = g.op("Relu", [x])
        elif op == "maxpool":
            x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        elif op == "flatten":
            x, rank = g.op("Flatten", [x], axis=1), 2
        else:
            raise ExportError(f"layer {i}: no ONNX form for op {op!r}")
    out = manifest["output"]
    codes = g.cast(x, TensorProto.INT32)
    g.nodes.append(helper.make_node("Identity", [codes], ["logit_codes"]))
    logits = g.op("Mul", [g.cast(x, TensorProto.FLOAT),
                          g.const(2.0 ** out["exp"], np.float32, "logit_scale")])
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    n_classes = len(out["classes"]) if out.get("classes") else None
    graph = helper.make_graph(
        g.nodes, "qtrain_frozen_integer_inference",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", c, h, w])],
        [helper.make_tensor_value_info("logit_codes", TensorProto.INT32, ["N", n_classes]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qtrain", doc_string=doc)
    model.ir_version = 8  # readable by onnxruntime releases since 1.10
    helper.set_model_props(model, {"logit_exp": str(out["exp"]),
                                   "classes": ",".join(out.get("classes") or [])})
    onnx.checker.check_model(model, full_check=True)
    return model
