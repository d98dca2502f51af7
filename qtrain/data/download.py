"""The downloader: :func:`download` fetches the four canonical IDX files of an MNIST-like set
into the user cache, where :func:`qtrain.data.search_dirs` looks. A file is checked before it
takes its canonical name, so an interrupted or bad download never leaves a broken file there."""

from __future__ import annotations

import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

from ..files import write_bytes
from .errors import DataError
from .idx import read_idx
from .sources import CLASSES, SPLITS, check_name, check_pair, user_cache_dir

#: The four canonical files of an MNIST-like dataset, in download order.
IDX_FILES: tuple[str, ...] = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

#: Base URL per dataset that :func:`download` appends the file names of :data:`IDX_FILES` to.
DOWNLOAD_URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

_CHUNK = 1 << 16


def _no_network_hint(name: str) -> str:
    extra = " or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else ""
    return f"there is no network here? use --data-dir{extra}"


def _fetch(url: str, dest: Path, timeout: float, name: str, stream: TextIO) -> None:
    """Download ``url`` to ``dest`` atomically, with a progress line on ``stream``."""
    tty = hasattr(stream, "isatty") and stream.isatty()
    label = f"downloading {url}"

    def chunks(response):
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            done += len(chunk)
            if tty:
                of = f" / {total / 1e6:.1f}" if total else ""
                print(f"\r{label}: {done / 1e6:.1f}{of} MB", end="", file=stream, flush=True)
            yield chunk
        print(f"\r{label}: {done / 1e6:.1f} MB, done" if tty else
              f"{label}: {done} bytes, done", file=stream, flush=True)

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            write_bytes(dest, chunks(response))
    except urllib.error.HTTPError as err:  # the server answered, but not with the file
        if tty:
            print(file=stream)
        raise DataError(f"could not download {url} (HTTP {err.code} {err.reason}); the mirror "
                        f"may have moved; use --data-dir"
                        f"{_no_network_hint(name).split('--data-dir', 1)[1]}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout,
            ConnectionError, TimeoutError) as err:
        if tty:
            print(file=stream)
        reason = getattr(err, "reason", None) or err
        reason = str(reason).splitlines()[0] if str(reason) else type(err).__name__
        raise DataError(f"could not download {url} ({reason}); "
                        f"{_no_network_hint(name)}") from None
    except OSError as err:  # writing the cache failed
        reason = err.strerror or type(err).__name__
        raise DataError(f"cannot write {dest} ({reason}); make the cache writable or set "
                        "$XDG_CACHE_HOME, or use --data-dir") from None


def download(name: str, cache_dir: str | os.PathLike | None = None,
             base_url: str | None = None, timeout: float = 30,
             stream: TextIO | None = None) -> Path:
    """Download the four canonical IDX files of ``name`` into ``cache_dir``; return that dir.

    ``cache_dir`` defaults to :func:`user_cache_dir` ``(name)``, where the search for data
    looks; ``base_url`` to :data:`DOWNLOAD_URLS` ``[name]`` (the file names of
    :data:`IDX_FILES` are appended to it). Each file is streamed into a temporary file in
    ``cache_dir``, checked with :func:`read_idx` (and each split's images against its labels),
    and only then renamed into place, so an interrupted or bad download never leaves a partial
    or corrupt file under the canonical name. A file already present that reads as valid IDX is
    kept, not fetched again. Progress goes to ``stream`` (default ``sys.stderr``).

    Raises:
        ValueError: unknown ``name`` (only MNIST-like sets download; CIFAR-10 does not).
        DataError: the network fails (one line: the URL, the reason, what to do instead), a
            downloaded file is not valid IDX or the pair does not match (nothing is kept), or
            the cache directory cannot be written.
    """
    check_name(name)
    stream = sys.stderr if stream is None else stream
    base = DOWNLOAD_URLS[name] if base_url is None else base_url
    base = base if base.endswith("/") else base + "/"
    target = user_cache_dir(name) if cache_dir is None else Path(cache_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the download directory {target} "
                        f"({err.strerror or type(err).__name__}); make it writable or set "
                        "$XDG_CACHE_HOME, or use --data-dir") from None
    try:
        return _download_into(name, target, base, timeout, stream)
    except BaseException:
        try:
            target.rmdir()  # only if the failed attempt left it empty
        except OSError:
            pass
        raise


def _download_into(name: str, target: Path, base: str, timeout: float,
                   stream: TextIO) -> Path:
    arrays = {}
    for fname in IDX_FILES:
        dest = target / fname
        if dest.is_file():
            try:
                arrays[fname] = read_idx(dest)
                continue
            except DataError:
                pass  # a bad earlier copy: fetch it again
        url = base + fname
        tmp = target / f".{fname}.{os.getpid()}.download"
        try:
            _fetch(url, tmp, timeout, name, stream)
            try:
                arrays[fname] = read_idx(tmp)
            except DataError as err:
                detail = str(err).split(f" in {tmp}", 1)[0]
                raise DataError(f"downloaded {url} is not a valid IDX file ({detail}); it was "
                                f"not kept in {target}; try again later or use "
                                "--data-dir") from None
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    for split, prefix in SPLITS.items():
        image_path = target / f"{prefix}-images-idx3-ubyte.gz"
        label_path = target / f"{prefix}-labels-idx1-ubyte.gz"
        try:
            check_pair(arrays[image_path.name], arrays[label_path.name], image_path,
                        label_path, len(CLASSES[name]))
        except DataError:
            image_path.unlink(missing_ok=True)
            label_path.unlink(missing_ok=True)
            raise
    return target
