"""The user's own data: :func:`load_user_data` reads ``FILE.npz`` or a directory of image
folders into ``(train, test)`` datasets laid out as the built-in ones (docs/your-data.md).

* ``FILE.npz`` holds the arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``: images uint8
  (N, H, W) grayscale or (N, H, W, C) channels last with C = 1 or 3; labels 1-D integers.
  The classes are ``0..K-1`` with K = the largest training label + 1; every class has
  training images, and the test labels lie in ``0..K-1``.
* ``DIR`` holds ``train/`` and ``test/``, each with one folder of images per class
  (``DIR/train/<class>/<image files>``, torchvision's ImageFolder layout, once per split). The
  class index is the position of the folder's name in the sorted names; both splits have the
  same class folders, each holding at least one image (looked for at any depth, by extension,
  :data:`IMAGE_EXTENSIONS`; hidden files and other files are skipped). Images are read with
  Pillow; all images of a split have one size. If every image is grayscale the data is
  (N, H, W), otherwise every image is converted to RGB (N, H, W, 3).

Every problem raises :class:`DataError` with one line: what, which file, how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DataError, DataNotFound, fail
from .sources import Dataset

#: The arrays a ``.npz`` file must hold.
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
#: File name endings read as images in a class folder (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif",
                    ".tiff", ".webp")
#: The split folders of an image-folder directory.
SPLIT_DIRS = ("train", "test")

_NPZ_HOW = "save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
_LAYOUT = "lay it out as DIR/train/<class>/<images> and DIR/test/<class>/<images>"
_GRAY_MODES = {"1", "L", "LA"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def load_user_data(path: str | os.PathLike) -> tuple[Dataset, Dataset]:
    """``(train, test)`` from ``path``: a ``.npz`` file, or a directory of image folders.

    The datasets' ``name`` is the path, ``classes`` the class names (the folder names, or
    ``"0".."K-1"`` for an npz), labels int64.

    Raises:
        DataNotFound: nothing at ``path``.
        DataError: anything else wrong with the data (see the module docstring).
    """
    path = Path(path)
    if os.fspath(path).endswith(".npz"):
        if not path.is_file():
            raise DataNotFound(f"data file {path} not found; give the path of an .npz file "
                               "holding x_train, y_train, x_test and y_test")
        return _load_npz(path)
    if not path.is_dir():
        if path.exists():
            raise DataError(f"{path} is not a directory of image folders nor an .npz file; "
                            f"{_LAYOUT}, or give a FILE.npz")
        raise DataNotFound(f"data directory {path} not found; give a directory holding "
                           "train/ and test/ folders of class folders, or a FILE.npz")
    return _load_folders(path)


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------

def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - anything numpy cannot open is a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise fail(path, f"not a readable .npz file ({reason})", _NPZ_HOW) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise fail(path, "one bare array (an .npy file), not the named arrays of an .npz",
                   _NPZ_HOW)
    with npz:
        missing = [a for a in NPZ_ARRAYS if a not in npz.files]
        if missing:
            held = ", ".join(npz.files) or "nothing"
            raise fail(path, f"no array {', '.join(missing)} (it holds {held})", _NPZ_HOW)
        try:
            return {a: npz[a] for a in NPZ_ARRAYS}
        except Exception as err:  # noqa: BLE001 - object arrays, truncated members
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise fail(path, f"cannot read its arrays ({reason})",
                       "save plain numeric arrays (no Python objects) with numpy.savez") \
                from None


def _npz_images(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """``x`` checked as images: uint8 (N, H, W) or (N, H, W, C), C = 1 (squeezed) or 3."""
    if x.dtype != np.uint8:
        if x.dtype.kind == "f":
            fix = (f"convert before saving, e.g. {name} = ({name} * 255).round().astype("
                   "np.uint8) for values in 0..1")
        elif x.dtype.kind in "iub":
            fix = f"convert before saving: {name} = np.clip({name}, 0, 255).astype(np.uint8)"
        else:
            fix = f"save {name} as uint8 pixels"
        raise fail(path, f"{name} is {x.dtype.name}, but images must be uint8 pixels 0..255",
                   fix)
    colour = x.ndim == 4 and x.shape[3] in (1, 3)
    if not (x.ndim == 3 or colour) or 0 in x.shape[1:]:
        fix = ("for channels-first arrays use x.transpose(0, 2, 3, 1)"
               if x.ndim == 4 and x.shape[1] in (1, 3) else "reshape the images")
        raise fail(path, f"{name} has shape {_shape(x.shape)}, but images must be N x H x W "
                         "(grayscale) or N x H x W x C with C = 1 or 3 (channels last)", fix)
    if len(x) == 0:
        raise fail(path, f"{name} holds no images", "give it at least one image")
    return x[..., 0] if x.ndim == 4 and x.shape[3] == 1 else x


def _npz_labels(y: np.ndarray, name: str, n: int, xname: str, path: Path) -> np.ndarray:
    """``y`` checked as ``n`` non-negative integer labels."""
    if y.dtype.kind not in "iu":
        raise fail(path, f"{name} is {y.dtype.name}, but labels must be integers 0..K-1",
                   f"convert before saving: {name} = {name}.astype(np.int64)")
    if y.ndim != 1:
        fix = (f"one-hot labels? use {name}.argmax(1)" if y.ndim == 2 and y.shape[1] > 1
               else f"flatten it: {name}.reshape(-1)")
        raise fail(path, f"{name} has shape {_shape(y.shape)}, but labels must be a 1-D array "
                         "of class indices", fix)
    if len(y) != n:
        raise fail(path, f"{name} has {len(y)} labels but {xname} has {n} images",
                   "give exactly one label per image")
    negative = np.flatnonzero(y < 0)
    if negative.size:
        i = int(negative[0])
        raise fail(path, f"{name} has label {int(y[i])} at index {i}, but labels must be class "
                         "indices 0..K-1", "renumber the classes from 0")
    return y.astype(np.int64)


def _load_npz(path: Path) -> tuple[Dataset, Dataset]:
    a = _read_npz(path)
    x_train = _npz_images(a["x_train"], "x_train", path)
    x_test = _npz_images(a["x_test"], "x_test", path)
    y_train = _npz_labels(a["y_train"], "y_train", len(x_train), "x_train", path)
    y_test = _npz_labels(a["y_test"], "y_test", len(x_test), "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise fail(path, f"x_train holds {_shape(x_train.shape[1:])} images but x_test "
                         f"{_shape(x_test.shape[1:])}", "give train and test images one shape")
    present = np.unique(y_train)
    k = int(present[-1]) + 1
    if len(present) != k:  # the first class index that is absent
        gap = int(np.flatnonzero(present != np.arange(len(present)))[0])
        raise fail(path, f"class {gap} has no images in y_train (its labels run up to "
                         f"{k - 1}, so every class 0..{k - 1} needs training images)",
                   "renumber the classes 0..K-1 without gaps")
    _check_classes(k, path)
    outside = np.flatnonzero(y_test >= k)
    if outside.size:
        i = int(outside[0])
        raise fail(path, f"y_test has label {int(y_test[i])} at index {i}, outside the {k} "
                         f"classes 0..{k - 1} of y_train",
                   "give train and test the same classes")
    classes = tuple(str(c) for c in range(k))
    source = f"npz file {path} ({k} classes)"
    return (Dataset(x_train, y_train, os.fspath(path), "train", source, classes),
            Dataset(x_test, y_test, os.fspath(path), "test", source, classes))


def _check_classes(k: int, where: Path) -> None:
    if k < 2:
        raise fail(where, "only one class", "a classifier needs at least 2 classes")


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir()
                  and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith(".") and p.is_file())


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W) grayscale or (H, W, 3) colour."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in _GRAY_MODES:
                return np.asarray(im.convert("L"))
            if mode in _COLOUR_MODES:
                return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise fail(path, "cannot read the image (not a format Pillow knows, or corrupt)",
                   "replace or remove the file") from None
    except Exception as err:  # noqa: BLE001 - any decoding failure means a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise fail(path, f"cannot read the image ({reason})", "replace or remove the file") \
            from None
    raise fail(path, f"image mode {mode} is not 8-bit grayscale or colour",
               "save it as an 8-bit grayscale or RGB image")


def _read_split(split_dir: Path, classes: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image of one split (checked for one size) and its labels."""
    images, labels = [], []
    first: tuple[Path, tuple[int, int]] | None = None
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        if not files:
            raise fail(split_dir / name, f"no image files ({' '.join(IMAGE_EXTENSIONS)})",
                       "add images or remove the class folder from both train/ and test/")
        for path in files:
            image = _read_image(path)
            if first is None:
                first = (path, image.shape[:2])
            elif image.shape[:2] != first[1]:
                raise fail(path, f"image is {_shape(image.shape[:2])} (height x width) but "
                                 f"{first[0]} is {_shape(first[1])}",
                           "resize every image to one size first (e.g. PIL's Image.resize)")
            images.append(image)
            labels.append(label)
    return images, np.asarray(labels, np.int64)


def _stack(images: list[np.ndarray], colour: bool) -> np.ndarray:
    if colour:
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    return np.stack(images)


def _load_folders(root: Path) -> tuple[Dataset, Dataset]:
    for split in SPLIT_DIRS:
        if not (root / split).is_dir():
            raise fail(root, f"no {split}/ folder", _LAYOUT)
    classes = _class_dirs(root / "train")
    if not classes:
        raise fail(root / "train", "no class folders", _LAYOUT)
    test_classes = _class_dirs(root / "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        differ = "; ".join(f"only in {s}/: {', '.join(names)}" for s, names
                           in (("train", only_train), ("test", only_test)) if names)
        raise fail(root, f"train/ and test/ hold different class folders ({differ})",
                   "give train/ and test/ the same class folders")
    _check_classes(len(classes), root / "train")
    read = {split: _read_split(root / split, classes) for split in SPLIT_DIRS}
    sizes = {split: images[0].shape[:2] for split, (images, _) in read.items()}
    if sizes["train"] != sizes["test"]:
        raise fail(root, f"train images are {_shape(sizes['train'])} (height x width) but test "
                         f"images {_shape(sizes['test'])}",
                   "resize every image to one size first (e.g. PIL's Image.resize)")
    colour = any(im.ndim == 3 for images, _ in read.values() for im in images)
    source = f"image folders {root} ({len(classes)} classes)"
    train, test = ((_stack(images, colour), labels) for images, labels in read.values())
    return (Dataset(*train, os.fspath(root), "train", source, tuple(classes)),
            Dataset(*test, os.fspath(root), "test", source, tuple(classes)))
