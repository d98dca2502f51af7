"""The ``qk`` file: a trained qtrain network as integer codes, readable with numpy alone.

A ``.qk`` file is a numpy ``.npz`` archive (a zip of ``.npy`` arrays, no pickles) holding:

* ``manifest.json`` -- a uint8 array of UTF-8 JSON: ``format`` ("qtrain-qk"), ``version``,
  the network (``input``, ``layers``, ``output``), the ``training`` state, and where it came
  from (``source``); every array the network or the state uses is named in it with its dtype
  and shape;
* the arrays themselves (weight codes, folded batch norms, weight stores, velocities, running
  statistics), under the names the manifest gives.

:func:`write` writes one (to an open binary file), :func:`read` loads and validates one:
anything wrong (not an archive, truncated, another format, a newer version, a missing array,
a dtype or shape other than the manifest says, layers whose shapes do not chain) raises
:class:`QKFormatError` with one line saying what and where. The layers are documented in
``docs/export.md``; :mod:`qkernels.engine` runs them.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

FORMAT = "qtrain-qk"
#: The version this qkernels writes and the newest it reads.
VERSION = 1
MANIFEST = "manifest.json"

#: Per layer kind: required fields, and the arrays it names (field -> allowed dtypes).
LAYER_FIELDS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "conv": (("name", "out_channels", "in_channels", "kernel", "stride", "padding", "w_exp",
              "w_bits"), {"weight": ("int8", "int16")}),
    "linear": (("name", "out_features", "in_features", "w_exp", "w_bits"),
               {"weight": ("int8", "int16")}),
    "requant": (("name", "bits", "exp"), {}),
    "l1bn": (("name", "channels", "out_bits", "out_exp", "in_exp"), {"folded": ("int64",)}),
    "relu": ((), {}),
    "maxpool": (("kernel", "stride"), {}),
    "flatten": ((), {}),
}


class QKFormatError(ValueError):
    """A qk file that cannot be used: one line saying what and where."""


@dataclass
class QKFile:
    """A loaded qk file: its manifest (dict) and arrays (name -> numpy array)."""

    manifest: dict
    arrays: dict[str, np.ndarray]
    path: str = "<memory>"

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]

    def array(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _describe(a: np.ndarray) -> dict:
    return {"dtype": a.dtype.name, "shape": list(a.shape)}


def write(f: BinaryIO, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a qk file to the binary file ``f``: ``manifest`` (without ``format``, ``version``
    and ``arrays``, which this adds) and ``arrays``. Validates the result as :func:`read`
    would, before writing a byte."""
    if MANIFEST in arrays:
        raise ValueError(f"an array may not be called {MANIFEST!r}")
    full = {"format": FORMAT, "version": VERSION, **manifest,
            "arrays": {k: _describe(v) for k, v in arrays.items()}}
    validate(QKFile(full, dict(arrays)))
    text = json.dumps(full, indent=1, sort_keys=True).encode()
    buf = io.BytesIO()
    np.savez_compressed(buf, **{MANIFEST: np.frombuffer(text, np.uint8)}, **arrays)
    f.write(buf.getvalue())


def read(path: str | Path) -> QKFile:
    """Load and validate a qk file (:class:`QKFormatError` on any problem)."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if MANIFEST not in names:
                raise QKFormatError(f"{where}: no {MANIFEST} inside: not a qk file (write one "
                                    "with `qtrain export RUN_DIR --format qk`)")
            manifest = json.loads(bytes(z[MANIFEST]).decode())
            arrays = {k: z[k] for k in names if k != MANIFEST}
    except QKFormatError:
        raise
    except FileNotFoundError:
        raise QKFormatError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise QKFormatError(f"{where}: not a readable qk file ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'truncated?'}); "
                            "export it again") from None
    qk = QKFile(manifest, arrays, where)
    validate(qk)
    return qk


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise QKFormatError(f"{where}: {what}")


def validate(qk: QKFile) -> None:
    """Check a qk file's manifest, arrays and layer shapes (:class:`QKFormatError`, one line,
    for anything malformed)."""
    try:
        _validate(qk)
    except QKFormatError:
        raise
    except (TypeError, KeyError, AttributeError, IndexError, ValueError,
            ZeroDivisionError) as err:
        raise QKFormatError(f"{qk.path}: malformed manifest ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); export it "
                            "again") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(layer: dict, at: str, *names: str, low: int | None = None) -> None:
    for f in names:
        v = layer.get(f)
        _need(_is_int(v) and (low is None or v >= low), at,
              f"{f} must be an integer{'' if low is None else f' >= {low}'}, got {v!r}")


def _pairs(layer: dict, at: str, *names: str, low: int = 0) -> None:
    for f in names:
        v = layer.get(f)
        _need(isinstance(v, list) and len(v) == 2 and all(_is_int(i) and i >= low for i in v),
              at, f"{f} must be two integers >= {low}, got {v!r}")


def _bits(layer: dict, at: str, *names: str) -> None:
    for f in names:
        v = layer.get(f)
        _need(_is_int(v) and 2 <= v <= 16, at, f"{f} must be 2..16, got {v!r}")


def _validate(qk: QKFile) -> None:
    m, where = qk.manifest, qk.path
    _need(isinstance(m, dict) and m.get("format") == FORMAT, where,
          f"not a qk file (format {m.get('format') if isinstance(m, dict) else None!r}, "
          f"expected {FORMAT!r})")
    version = m.get("version")
    _need(_is_int(version) and version >= 1, where, f"bad version {version!r}")
    _need(version <= VERSION, where, f"qk version {version} is newer than this qkernels reads "
          f"({VERSION}); upgrade qtrain/qkernels")
    for key, kind in (("input", dict), ("layers", list), ("output", dict), ("arrays", dict)):
        _need(isinstance(m.get(key), kind), where,
              f"manifest's {key!r} is missing or not a {kind.__name__}")
    declared = m["arrays"]
    for name, desc in declared.items():
        _need(isinstance(desc, dict), where, f"array {name!r} has no dtype and shape")
        _need(name in qk.arrays, where, f"array {name!r} named in the manifest is missing")
        a = qk.arrays[name]
        _need(a.dtype.name == desc.get("dtype") and list(a.shape) == desc.get("shape"), where,
              f"array {name!r} is {a.dtype.name} {list(a.shape)}, the manifest says "
              f"{desc.get('dtype')} {desc.get('shape')}")
    inp, out = m["input"], m["output"]
    _ints(inp, f"{where}: input", "exp", "offset", "clip", low=None)
    _bits(inp, f"{where}: input", "bits")
    _ints(out, f"{where}: output", "exp")
    _bits(out, f"{where}: output", "bits")
    _check_chain(qk, where)


def _check_chain(qk: QKFile, where: str) -> None:
    """Every layer's fields present, its arrays declared with the shapes its fields imply, and
    each layer's input shape the previous one's output."""
    inp = qk.manifest["input"]
    raw = inp.get("shape")
    _need(isinstance(raw, list) and len(raw) == 3 and all(_is_int(s) and s > 0 for s in raw),
          where, f"input shape {raw!r} is not (C, H, W)")
    shape = tuple(raw)
    declared = qk.manifest["arrays"]
    for i, layer in enumerate(qk.layers):
        _need(isinstance(layer, dict), where, f"layer {i} is not an object")
        kind = layer.get("op")
        _need(isinstance(kind, str) and kind in LAYER_FIELDS, where,
              f"layer {i} has unknown op {kind!r}")
        at = f"{where}: layer {i} ({kind}{', ' + str(layer['name']) if 'name' in layer else ''})"
        fields, arrays = LAYER_FIELDS[kind]
        for f in fields:
            _need(f in layer, at, f"no field {f!r}")
        for f, dtypes in arrays.items():
            _need(isinstance(layer.get(f), str) and layer[f] in declared, at,
                  f"array {layer.get(f)!r} is not in the file")
            _need(declared[layer[f]]["dtype"] in dtypes, at,
                  f"{f} is {declared[layer[f]]['dtype']}, expected {' or '.join(dtypes)}")
        _check_values(qk, layer, kind, at)
        shape = _out_shape(layer, shape, declared, at)


def _check_values(qk: QKFile, layer: dict, kind: str, at: str) -> None:
    """Field types and ranges, weight codes within their width, folded shifts the kernels
    take."""
    if kind in ("conv", "linear"):
        _bits(layer, at, "w_bits")
        _ints(layer, at, "w_exp")
        if kind == "conv":
            _ints(layer, at, "out_channels", "in_channels", low=1)
            _pairs(layer, at, "kernel", "stride", low=1)
            _pairs(layer, at, "padding", low=0)
        else:
            _ints(layer, at, "out_features", "in_features", low=1)
        w = qk.arrays.get(layer["weight"])
        if w is not None and w.size:
            q = (1 << (layer["w_bits"] - 1)) - 1
            _need(int(w.min()) >= -q and int(w.max()) <= q, at,
                  f"weight codes exceed {layer['w_bits']} bits")
    elif kind == "requant":
        _bits(layer, at, "bits")
        _ints(layer, at, "exp")
    elif kind == "l1bn":
        _bits(layer, at, "out_bits")
        _ints(layer, at, "in_exp", "out_exp")
        _ints(layer, at, "channels", low=1)
        f = qk.arrays.get(layer["folded"])
        if f is not None and f.ndim == 2 and f.shape[1] == 3 and f.size:
            _need(int(f[:, 2].min()) >= 0 and int(f[:, 2].max()) <= 62, at,
                  "folded shifts must lie in 0..62")
            _need(all(abs(int(a)) * (1 << 15) + abs(int(b)) < (1 << 63)
                      for a, b in f[:, :2].tolist()), at,
                  "folded multiplier and offset overflow int64")
    elif kind == "maxpool":
        _pairs(layer, at, "kernel", "stride", low=1)


def _out_shape(layer: dict, shape: tuple, declared: dict, at: str) -> tuple:
    kind = layer["op"]

    def arr(f):
        return tuple(declared[layer[f]]["shape"])

    if kind == "conv":
        k, s, p = layer["kernel"], layer["stride"], layer["padding"]
        want = (layer["out_channels"], layer["in_channels"], k[0], k[1])
        _need(arr("weight") == want, at, f"weight shape {list(arr('weight'))} != {list(want)}")
        _need(len(shape) == 3 and shape[0] == layer["in_channels"], at,
              f"expects {layer['in_channels']} input channels, gets shape {list(shape)}")
        oh = (shape[1] + 2 * p[0] - k[0]) // s[0] + 1
        ow = (shape[2] + 2 * p[1] - k[1]) // s[1] + 1
        _need(oh > 0 and ow > 0, at, f"kernel {k} does not fit input {list(shape)}")
        return (layer["out_channels"], oh, ow)
    if kind == "linear":
        want = (layer["out_features"], layer["in_features"])
        _need(arr("weight") == want, at, f"weight shape {list(arr('weight'))} != {list(want)}")
        _need(shape == (layer["in_features"],), at,
              f"expects {layer['in_features']} features, gets shape {list(shape)}")
        return (layer["out_features"],)
    if kind == "l1bn":
        _need(arr("folded") == (layer["channels"], 3), at,
              f"folded shape {list(arr('folded'))} != [{layer['channels']}, 3]")
        _need(shape[0] == layer["channels"], at,
              f"expects {layer['channels']} channels, gets shape {list(shape)}")
        return shape
    if kind == "maxpool":
        _need(layer["kernel"] == [2, 2] and layer["stride"] == [2, 2], at,
              "only 2x2 max-pools with stride 2 are supported")
        _need(len(shape) == 3 and shape[1] % 2 == 0 and shape[2] % 2 == 0, at,
              f"needs an even-sized (C, H, W) input, gets {list(shape)}")
        return (shape[0], shape[1] // 2, shape[2] // 2)
    if kind == "flatten":
        return (int(np.prod(shape)),)
    return shape


__all__ = ["FORMAT", "VERSION", "QKFile", "QKFormatError", "read", "write", "validate"]
