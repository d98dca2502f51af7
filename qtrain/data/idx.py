"""IDX files, the format of MNIST and Fashion-MNIST: :func:`read_idx` (gzipped or not, fully
validated) and :func:`write_idx` (deterministic bytes, written atomically)."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..files import write_bytes
from .errors import fail

#: IDX type code (third magic byte) -> numpy dtype of the big-endian payload.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a native-endian, writable numpy array.

    The file may be gzipped; that is recognized by the gzip magic bytes ``1f 8b``, not by the
    name. The header is ``00 00 <type> <ndim>`` then ``ndim`` big-endian uint32 sizes, then the
    big-endian payload of ``prod(sizes)`` items of the type (:data:`IDX_DTYPES`: 0x08 ubyte,
    0x09 sbyte, 0x0B short, 0x0C int, 0x0D float, 0x0E double).

    Raises:
        DataError: the file is unreadable, not gzip-valid, has a bad magic number, an unknown
            type code, ``ndim`` 0, a short header, or a payload shorter or longer than the
            sizes promise.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise fail(path, f"cannot read IDX file ({reason})",
                    "check the path or point --data-dir elsewhere") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise fail(path, f"corrupt or truncated gzip data ({reason})") from None

    if len(raw) < 4:
        raise fail(path, f"not an IDX file (only {len(raw)} bytes, no 4-byte magic number)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise fail(path, f"not an IDX file (magic number {raw[:4].hex(' ')}, "
                          "expected 00 00 <type> <ndim>)")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise fail(path, f"unsupported IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise fail(path, "IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise fail(path, f"truncated IDX header ({len(raw)} bytes, {ndim} dimensions "
                          f"need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        shape = "x".join(map(str, dims))
        kind = "truncated IDX payload" if got < expected else "extra bytes after IDX payload"
        raise fail(path, f"{kind} ({got} bytes, a {shape} {dtype.name} array needs "
                          f"{expected})")
    array = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a copy: native order, writable


def write_idx(path: str | os.PathLike, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write ``array`` as an IDX file that :func:`read_idx` reads back equal; returns the path.

    The dtype must be one of :data:`IDX_DTYPES` (any byte order) and ``ndim`` 1..255. With
    ``gz=None`` the file is gzipped when its name ends in ``.gz``. Gzip output is deterministic
    (level 9, mtime 0, no file name), so the same array always gives the same bytes. The file is
    written to a temporary file in the same directory and renamed over ``path``.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    code = next((c for c, dt in IDX_DTYPES.items() if dt.newbyteorder("=") == native), None)
    if code is None:
        raise TypeError(f"write_idx: no IDX type for dtype {array.dtype.name}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: ndim must be 1..255, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if gz if gz is not None else path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=9, mtime=0)
    write_bytes(path, [raw])
    return path

