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
    """Check a qk file's manifest, arrays and layer shapes (:class:`QKFormatError`)."""
    m, where = qk.manifest, qk.path
    _need(isinstance(m, dict) and m.get("format") == FORMAT, where,
          f"not a qk file (format {m.get('format') if isinstance(m, dict) else None!r}, "
          f"expected {FORMAT!r})")
    version = m.get("version")
    _need(isinstance(version, int) and version >= 1, where, f"bad version {version!r}")
    _need(version <= VERSION, where, f"qk version {version} is newer than this qkernels reads "
          f"({VERSION}); upgrade qtrain/qkernels")
    for key in ("input", "layers", "output", "arrays"):
        _need(key in m, where, f"manifest has no {key!r}")
    declared = m["arrays"]
    for name, desc in declared.items():
        _need(name in qk.arrays, where, f"array {name!r} named in the manifest is missing")
        a = qk.arrays[name]
        _need(a.dtype.name == desc.get("dtype") and list(a.shape) == desc.get("shape"), where,
              f"array {name!r} is {a.dtype.name} {list(a.shape)}, the manifest says "
              f"{desc.get('dtype')} {desc.get('shape')}")
    _check_chain(qk, where)


def _check_chain(qk: QKFile, where: str) -> None:
    """Every layer's fields present, its arrays declared with the shapes its fields imply, and
    each layer's input shape the previous one's output."""
    inp = qk.manifest["input"]
    shape = tuple(inp.get("shape", ()))
    _need(len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape), where,
          f"input shape {list(shape)} is not (C, H, W)")
    declared = qk.manifest["arrays"]
    for i, layer in enumerate(qk.layers):
        kind = layer.get("op")
        at = f"{where}: layer {i} ({kind}{', ' + layer['name'] if 'name' in layer else ''})"
        _need(kind in LAYER_FIELDS, where, f"layer {i} has unknown op {kind!r}")
        fields, arrays = LAYER_FIELDS[kind]
        for f in fields:
            _need(f in layer, at, f"no field {f!r}")
        for f, dtypes in arrays.items():
            _need(layer.get(f) in declared, at, f"array {layer.get(f)!r} is not in the file")
            _need(declared[layer[f]]["dtype"] in dtypes, at,
                  f"{f} is {declared[layer[f]]['dtype']}, expected {' or '.join(dtypes)}")
        shape = _out_shape(layer, shape, declared, at)


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
