"""Loading and preparing image datasets for `netc train`.

Supported sources (see `load_dataset`):

* a directory holding the four IDX files of MNIST / Fashion-MNIST / EMNIST
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` or ``emnist-<split>-{train,test}-{images,labels}-...``,
  each plain or ``.gz``);
* the name ``fashion-mnist``: the files installed by the Debian package
  ``dataset-fashion-mnist`` in `FASHION_MNIST_DIR` (override with the environment
  variable ``NETC_FASHION_MNIST_DIR``);
* a ``.npz`` file with arrays ``x``/``y`` (or ``x_train``/``y_train``) and optionally
  ``x_test``/``y_test``.

Every problem with the input (missing, unreadable, corrupt or inconsistent files, images
that do not fit the spec) is reported as a `DataError` whose message names the file and
what is wrong; no raw ``struct``/``zlib``/``numpy`` exception escapes for a bad file.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import numpy.typing as npt

from .errors import DataError, NetcWarning
from .npyfile import MAX_DATA_BYTES, open_regular, read_npz

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "Dataset",
    "read_idx",
    "load_dataset",
    "prepare_inputs",
    "train_val_split",
    "dataset_stats",
    "norm_values",
]

PathLike = Union[str, "os.PathLike[str]"]
#: A normalisation mean or std: one value for all pixels, or a list of one per channel.
Norm = Union[float, "list[float]"]

#: Where the Debian package ``dataset-fashion-mnist`` installs the four gzipped IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable overriding `FASHION_MNIST_DIR`.
FASHION_MNIST_ENV = "NETC_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
EMNIST_LETTERS_CLASSES: list[str] = [chr(ord("a") + i) for i in range(26)]

# IDX type byte -> big-endian dtype of the stored items.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- IDX files


def _read_exact(f, n: int, path: Path) -> bytes:
    """Up to `n` bytes of `f`, in chunks, so memory follows the data really there."""
    parts, got = [], 0
    try:
        while got < n:
            part = f.read(min(n - got, 16 << 20))
            if not part:
                break
            parts.append(part)
            got += len(part)
    except EOFError:
        raise DataError(f"{path}: gzip data is truncated (file incomplete?)") from None
    except (OSError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    return b"".join(parts)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (MNIST-style ``*-idx3-ubyte`` / ``*-idx1-ubyte``, plain or gzipped).

    The header is two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of dimensions, then
    each dimension as a big-endian uint32; the items follow, big-endian, row-major.
    Gzip is recognised by its magic bytes, so a ``.gz`` file that a browser already
    decompressed still loads.

    Returns a writable array in native byte order with the shape given by the header.
    Raises `DataError` for a file that is not a regular file or is unreadable, corrupt
    gzip, wrong magic, unknown type, truncated header, or a data section that is shorter
    (truncated) or longer (trailing garbage) than the product of the dimensions times the
    item size.  The header's size is checked before the data are read: against the file's
    size (plain files) or `npyfile.MAX_DATA_BYTES`, and gzip data are inflated only as far
    as the header says (plus one byte to detect trailing garbage).
    """
    path = Path(path)
    with open_regular(path, DataError, "IDX file") as raw:
        magic = raw.read(2)
        raw.seek(0)
        gz = magic == _GZIP_MAGIC
        if not gz and path.suffix == ".gz" and magic != b"\x00\x00":
            raise DataError(f"{path}: not a valid gzip file (bad gzip magic bytes)")
        f = gzip.GzipFile(fileobj=raw) if gz else raw
        head = _read_exact(f, 4, path)
        if len(head) < 4:
            raise DataError(f"{path}: truncated IDX header ({len(head)} bytes, need at least 4)")
        if head[0] != 0 or head[1] != 0:
            raise DataError(
                f"{path}: not an IDX file (magic starts with 0x{head[0]:02x}{head[1]:02x}, expected 0x0000)")
        type_code, ndims = head[2], head[3]
        if type_code not in _IDX_TYPES:
            known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
            raise DataError(f"{path}: unknown IDX data type 0x{type_code:02X} (known: {known})")
        if ndims == 0:
            raise DataError(f"{path}: IDX header declares 0 dimensions")
        dims = _read_exact(f, 4 * ndims, path)
        if len(dims) < 4 * ndims:
            raise DataError(f"{path}: truncated IDX header ({4 + len(dims)} bytes, {ndims} dimensions "
                            f"need {4 + 4 * ndims})")
        shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndims))
        dtype = _IDX_TYPES[type_code]
        expected = math.prod(shape) * dtype.itemsize
        dims_text = "x".join(str(d) for d in shape)
        need = f"dimensions {dims_text} of {dtype.itemsize}-byte items need {expected} bytes"
        if not gz:
            actual = os.fstat(raw.fileno()).st_size - 4 - 4 * ndims
            if actual != expected:
                raise DataError(f"{path}: truncated IDX data: {need}, file has {actual}" if actual < expected else
                                f"{path}: {actual - expected} trailing bytes after IDX data: {need}, file has {actual}")
        elif expected > MAX_DATA_BYTES:
            raise DataError(f"{path}: IDX header declares {expected:,} bytes of data ({dims_text}), beyond the "
                            f"limit of {MAX_DATA_BYTES:,} bytes")
        data = _read_exact(f, expected + 1, path)
        if len(data) < expected:
            raise DataError(f"{path}: truncated IDX data: {need}, file has {len(data)}")
        if len(data) > expected:
            rest = len(data) - expected + len(_read_exact(f, 1 << 20, path))
            raise DataError(f"{path}: {rest} trailing bytes after IDX data: {need}, file has {expected + rest}")
    items = np.frombuffer(data, dtype=dtype, count=math.prod(shape))
    return items.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """A labelled image dataset split into training and test parts.

    ``*_x`` are uint8 or floating images of shape (N, H, W) or (N, C, H, W); ``*_y`` are
    int64 labels of shape (N,) in ``range(num_classes)``, or float targets of shape
    (N, *output shape) (an .npz's floating ``y`` of 2 or more dimensions; then
    ``num_classes`` is 0).  The test part may be empty
    (shape (0, ...)).  ``class_names`` is known for Fashion-MNIST and EMNIST letters.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    name: str
    num_classes: int
    class_names: list[str] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image (C is 1 for (N, H, W) data)."""
        s = self.train_x.shape[1:]
        return (1, s[0], s[1]) if len(s) == 2 else (s[0], s[1], s[2])


@dataclass(frozen=True)
class _Known:
    """Facts about a known dataset: its class count and names."""

    num_classes: int
    class_names: list[str] | None


_FASHION = _Known(10, FASHION_MNIST_CLASSES)
_LETTERS = _Known(26, EMNIST_LETTERS_CLASSES)

# Roles of the four files and the names tried for each (without ".gz").
_ROLES = ("train images", "train labels", "test images", "test labels")
_STANDARD_NAMES: dict[str, tuple[str, ...]] = {
    "train images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_EMNIST_RE = re.compile(
    r"^emnist-(?P<split>[A-Za-z0-9_]+)-(?:train|test)-(?:images-idx3|labels-idx1)-ubyte"
    r"(?:\.gz)?$")


def _prefixed_names(prefix: str) -> dict[str, tuple[str, ...]]:
    """File names (without ".gz") of a prefixed set, e.g. prefix ``emnist-letters``."""
    return {
        "train images": (f"{prefix}-train-images-idx3-ubyte",),
        "train labels": (f"{prefix}-train-labels-idx1-ubyte",),
        "test images": (f"{prefix}-test-images-idx3-ubyte", f"{prefix}-t10k-images-idx3-ubyte"),
        "test labels": (f"{prefix}-test-labels-idx1-ubyte", f"{prefix}-t10k-labels-idx1-ubyte"),
    }


def _find_files(directory: Path, names: dict[str, tuple[str, ...]]
                ) -> tuple[dict[str, Path], list[str]]:
    """Find each role's file in `directory` (plain preferred over ``.gz``).

    Returns the files found and the roles with no file.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role in _ROLES:
        for base in names[role]:
            hit = next((directory / n for n in (base, base + ".gz")
                        if (directory / n).is_file()), None)
            if hit is not None:
                found[role] = hit
                break
        else:
            missing.append(role)
    return found, missing


def _missing_message(directory: Path, names: dict[str, tuple[str, ...]],
                     missing: list[str], extra: str = "") -> str:
    """A DataError message listing, for each missing role, the file names looked for."""
    lines = [f"{directory}: missing dataset files; looked for:"]
    for role in missing:
        alternatives = " or ".join(f"{n}[.gz]" for n in names[role])
        lines.append(f"  {role}: {alternatives}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def _locate_idx_files(directory: Path, prefix: str | None = None) -> dict[str, Path]:
    """Resolve the four IDX files of a dataset directory.

    Standard MNIST names win; otherwise a single EMNIST split is used (several splits
    in one directory is an error unless `prefix`, e.g. ``emnist-letters``, picks one).
    """
    if prefix is not None:
        names = _prefixed_names(prefix)
        found, missing = _find_files(directory, names)
        if missing:
            raise DataError(_missing_message(directory, names, missing))
        return found

    found, missing = _find_files(directory, _STANDARD_NAMES)
    if found and not missing:
        return found
    if found:  # a partial standard set: report it rather than guessing EMNIST
        raise DataError(_missing_message(directory, _STANDARD_NAMES, missing))

    try:
        entries = sorted(p.name for p in directory.iterdir())
    except OSError as exc:
        raise DataError(f"{directory}: cannot list directory: {exc.strerror or exc}") from None
    splits = sorted({m["split"] for n in entries if (m := _EMNIST_RE.match(n))})
    if len(splits) > 1:
        choices = ", ".join(str(directory / f"emnist-{s}") for s in splits)
        raise DataError(
            f"{directory}: holds several EMNIST splits ({', '.join(splits)}); choose one "
            f"by passing its path prefix, one of: {choices}")
    if len(splits) == 1:
        names = _prefixed_names(f"emnist-{splits[0]}")
        found, missing = _find_files(directory, names)
        if missing:
            raise DataError(_missing_message(directory, names, missing))
        return found
    raise DataError(_missing_message(
        directory, _STANDARD_NAMES, list(_ROLES),
        "  (or EMNIST files named emnist-<split>-{train,test}-{images-idx3,labels-idx1}"
        "-ubyte[.gz])"))


def _check_images(x: np.ndarray, where: str) -> np.ndarray:
    """Validate an image array: 3-D/4-D, uint8 or finite float (0..255 ints -> uint8)."""
    if x.ndim not in (3, 4):
        raise DataError(
            f"{where}: images must be 3-D (N,H,W) or 4-D (N,C,H,W), got shape "
            f"{_shape_text(x.shape)}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not np.isfinite(x).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(
                f"{where}: integer images must lie in 0..255, found values "
                f"{x.min()}..{x.max()}")
        return x.astype(np.uint8)
    raise DataError(f"{where}: images must be uint8 or floating point, got dtype {x.dtype}")


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Validate labels: 1-D, non-negative integer values; returns them as int64.  A floating
    array of two or more dimensions holds float targets instead, (N, *output shape) (an
    autoencoder's images, multi-label outputs): returned as they are, once checked finite."""
    if y.ndim >= 2 and np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise DataError(f"{where}: float targets must be finite, found {y[~np.isfinite(y)].flat[0]}")
        return y
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D (N,), got shape {_shape_text(y.shape)}")
    if np.issubdtype(y.dtype, np.floating):
        if y.size and not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{where}: labels must be integers, found non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be non-negative, found {y.min()}")
    if np.issubdtype(y.dtype, np.unsignedinteger) and y.size and y.max() > np.iinfo(np.int64).max:
        raise DataError(f"{where}: label {y.max()} is too large")
    return y.astype(np.int64)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _finish(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
            test_y: np.ndarray, *, name: str, where: dict[str, str],
            letters: bool, transpose: bool, known: _Known | None) -> Dataset:
    """Validate the four arrays, apply the EMNIST fix-ups and build the `Dataset`.

    `where` maps each role to a description (file name) used in error messages.
    """
    train_x = _check_images(train_x, where["train images"])
    test_x = _check_images(test_x, where["test images"])
    train_y = _check_labels(train_y, where["train labels"])
    test_y = _check_labels(test_y, where["test labels"])
    for xs, ys, part in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if len(xs) != len(ys):
            raise DataError(
                f"{where[part + ' images']} has {len(xs)} images but "
                f"{where[part + ' labels']} has {len(ys)} labels")
    if len(train_x) == 0:
        raise DataError(f"{where['train images']}: no training images")
    if len(test_x) and test_x.shape[1:] != train_x.shape[1:]:
        raise DataError(
            f"test images {where['test images']} have shape {_shape_text(test_x.shape[1:])} "
            f"but train images {where['train images']} have {_shape_text(train_x.shape[1:])}")

    if train_y.ndim > 1 or (test_y.ndim > 1 and test_y.size):  # float targets: no classes
        if test_y.size and test_y.shape[1:] != train_y.shape[1:]:
            raise DataError(f"{where['test labels']} has shape {_shape_text(test_y.shape[1:])} per sample, "
                            f"{where['train labels']} {_shape_text(train_y.shape[1:])} (labels are 1-D, float "
                            f"targets 2-D or more)")
        return Dataset(train_x, train_y, test_x, test_y, name=name, num_classes=0)
    if letters:
        known = _LETTERS
        for ys, role in ((train_y, "train labels"), (test_y, "test labels")):
            if ys.size and (ys.min() < 1 or ys.max() > 26):
                raise DataError(
                    f"{where[role]}: EMNIST letters labels must be 1..26, found "
                    f"{ys.min()}..{ys.max()}")
        train_y, test_y = train_y - 1, test_y - 1
    if transpose:  # EMNIST stores each image transposed (column-major)
        train_x = np.ascontiguousarray(np.swapaxes(train_x, -1, -2))
        test_x = np.ascontiguousarray(np.swapaxes(test_x, -1, -2))

    top = max(int(train_y.max()), int(test_y.max()) if test_y.size else 0)
    if known is not None:
        for ys, role in ((train_y, "train labels"), (test_y, "test labels")):
            if ys.size and ys.max() >= known.num_classes:
                raise DataError(
                    f"{where[role]}: label {ys.max()} is out of range for {name} "
                    f"({known.num_classes} classes, labels 0..{known.num_classes - 1})")
        num_classes = known.num_classes
        class_names = list(known.class_names) if known.class_names else None
    else:
        num_classes, class_names = top + 1, None
    return Dataset(train_x, train_y, test_x, test_y, name=name,
                   num_classes=num_classes, class_names=class_names)


def _load_idx_dir(directory: Path, *, prefix: str | None, name: str,
                  emnist_letters: bool | None, known: _Known | None) -> Dataset:
    """Load a directory (optionally restricted to file-name `prefix`) of four IDX files."""
    files = _locate_idx_files(directory, prefix)
    arrays = {role: read_idx(files[role]) for role in _ROLES}
    file_names = [p.name.lower() for p in files.values()]
    letters = (emnist_letters if emnist_letters is not None
               else any("letters" in n for n in file_names))
    emnist = all(n.startswith("emnist-") for n in file_names)
    return _finish(
        arrays["train images"], arrays["train labels"],
        arrays["test images"], arrays["test labels"],
        name=name, where={role: str(files[role]) for role in _ROLES},
        letters=letters, transpose=letters or emnist, known=known)


def _load_npz(path: Path, *, emnist_letters: bool | None) -> Dataset:
    """Load an ``.npz`` with ``x``/``y`` (or ``x_train``/``y_train``), ``x_test``/``y_test``."""
    arrays = read_npz(path, DataError, "data file (.npz)")
    if not arrays:
        raise DataError(f"{path}: .npz file holds no arrays (expected x and y)")

    def pick(*candidates: str) -> str | None:
        return next((k for k in candidates if k in arrays), None)

    kx, ky = pick("x", "x_train"), pick("y", "y_train")
    if kx is None or ky is None:
        raise DataError(
            f"{path}: .npz must hold arrays 'x' and 'y' (or 'x_train' and 'y_train'); "
            f"it has: {', '.join(sorted(arrays)) or 'nothing'}")
    x, y = arrays[kx], arrays[ky]
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataError(f"{path}: has '{have}' but no '{lack}'")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    else:
        x_test = np.empty((0,) + x.shape[1:], dtype=x.dtype)
        y_test = np.empty((0,), dtype=np.int64)
    for key, arr in ((kx, x), (ky, y), ("x_test", x_test), ("y_test", y_test)):
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{path}: array '{key}' has non-numeric dtype {arr.dtype}")
    letters = (emnist_letters if emnist_letters is not None
               else "letters" in path.name.lower())
    where = {"train images": f"{path}['{kx}']", "train labels": f"{path}['{ky}']",
             "test images": f"{path}['x_test']", "test labels": f"{path}['y_test']"}
    return _finish(x, y, x_test, y_test, name=path.stem, where=where,
                   letters=letters, transpose=letters, known=None)


IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPY_PAIR = ("x.npy", "y.npy")  # and optionally x_test.npy, y_test.npy


def _class_dirs(directory: Path) -> list[Path]:
    """Subdirectories holding at least one image (torchvision ImageFolder's classes), sorted."""
    return sorted(d for d in _safe_listdir(directory) if d.is_dir() and any(
        f.suffix.lower() in IMAGE_FILE_SUFFIXES for f in _safe_listdir(d)))


def _is_image_folder(directory: Path) -> bool:
    return bool(_class_dirs(directory)) or (directory / "train").is_dir() and bool(_class_dirs(directory / "train"))


def _read_folder(directory: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every DIR/CLASS/*.png|jpg|jpeg -> uint8 (N, H, W) (all greyscale) or (N, 3, H, W), labels."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{directory}: reading an image folder needs Pillow, which is not installed: "
                        f"pip install Pillow") from None
    from .npyfile import open_regular

    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted(_safe_listdir(directory / c)):
            if f.suffix.lower() in IMAGE_FILE_SUFFIXES:
                files.append(f)
                labels.append(k)
    images, grey = [], True
    for f in files:
        try:
            with open_regular(f, DataError, "image") as fh, Image.open(fh) as img:
                if img.width * img.height > 1 << 24:
                    raise DataError(f"{f}: image too large ({img.width}x{img.height})")
                grey = grey and img.mode in ("1", "L", "I;16", "I", "F")
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{f}: cannot read the image ({exc})") from None
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        (w0, h0), (w1, h1) = sorted(sizes)[:2]
        raise DataError(f"{directory}: images differ in size ({w0}x{h0} and {w1}x{h1}, width x height); "
                        f"an image folder's images must all have one size")
    arr = np.stack([np.asarray(im, np.uint8) for im in images])  # (N, H, W, 3)
    x = arr[..., 0].copy() if grey else np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    return x, np.array(labels, np.int64)


def _load_image_folder(directory: Path) -> Dataset:
    """DIR/CLASS/*.png|jpg (all training images), or DIR/train/CLASS/... and DIR/test/CLASS/...
    Classes are the sorted subdirectory names (as torchvision's ImageFolder)."""
    root = directory / "train" if not _class_dirs(directory) else directory
    classes = [d.name for d in _class_dirs(root)]
    x, y = _read_folder(root, classes)
    test = directory / "test"
    if root != directory and test.is_dir():
        extra = sorted({d.name for d in _class_dirs(test)} - set(classes))
        if extra:
            raise DataError(f"{test}: classes {', '.join(extra)} are not in {root}")
        tx, ty = _read_folder(test, classes)  # a class missing from test/ has no test images
    else:
        tx, ty = np.empty((0,) + x.shape[1:], np.uint8), np.empty(0, np.int64)
    where = {"train images": str(root), "train labels": str(root), "test images": str(test), "test labels": str(test)}
    ds = _finish(x, y, tx, ty, name=directory.resolve().name, where=where, letters=False, transpose=False,
                 known=None)
    ds.num_classes, ds.class_names = len(classes), classes
    return ds


def _load_npy_pair(directory: Path) -> Dataset:
    """x.npy / y.npy (and x_test.npy / y_test.npy) in `directory`."""
    from .npyfile import read_npy

    arrays = {}
    for key in ("x", "y", "x_test", "y_test"):
        f = directory / f"{key}.npy"
        if f.exists():
            arrays[key] = read_npy(f, DataError, ".npy array")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{directory}: has {'x_test' if 'x_test' in arrays else 'y_test'}.npy but not its pair")
    x, y = arrays["x"], arrays["y"]
    tx = arrays.get("x_test", np.empty((0,) + x.shape[1:], x.dtype))
    ty = arrays.get("y_test", np.empty(0, np.int64))
    for key, arr in (("x", x), ("y", y), ("x_test", tx), ("y_test", ty)):
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{directory / (key + '.npy')}: non-numeric dtype {arr.dtype}")
    where = {"train images": str(directory / "x.npy"), "train labels": str(directory / "y.npy"),
             "test images": str(directory / "x_test.npy"), "test labels": str(directory / "y_test.npy")}
    return _finish(x, y, tx, ty, name=directory.resolve().name, where=where, letters=False, transpose=False,
                   known=None)


def _fashion_mnist_dir() -> Path:
    override = os.environ.get(FASHION_MNIST_ENV)
    return Path(override) if override else FASHION_MNIST_DIR


def load_dataset(source: str, *, emnist_letters: bool | None = None) -> Dataset:
    """Load a dataset from `source`.

    `source` is one of:

    * ``fashion-mnist``: the Debian package's files in `FASHION_MNIST_DIR` (or in
      ``$NETC_FASHION_MNIST_DIR``); 10 classes with their names;
    * a directory with the four MNIST-style IDX files (standard or EMNIST names,
      plain or ``.gz``);
    * a path prefix such as ``DIR/emnist-letters`` selecting one EMNIST split in a
      directory that holds several;
    * a ``.npz`` file (loaded with ``allow_pickle=False``);
    * a directory holding ``x.npy`` and ``y.npy`` (and ``x_test.npy``, ``y_test.npy``), or
      its ``x.npy``;
    * an image folder (Pillow): ``DIR/CLASS/*.png|jpg|jpeg`` (training images only) or
      ``DIR/train/CLASS/...`` with ``DIR/test/CLASS/...``; classes are the sorted folder
      names, images greyscale when every file is, else RGB (N, 3, H, W).

    EMNIST letters (file names containing ``letters``, or ``emnist_letters=True``) have
    labels 1..26 shifted to 0..25 and 26 classes named a..z.  EMNIST images are stored
    transposed and are transposed back (for every ``emnist-*`` file set, and whenever
    letters mode is on).  ``emnist_letters=False`` turns the letters label shift off.

    Raises `DataError` when the source is missing, malformed or inconsistent.
    """
    if source.strip().lower() == "fashion-mnist":
        directory = _fashion_mnist_dir()
        found, missing = _find_files(directory, _STANDARD_NAMES) if directory.is_dir() \
            else ({}, list(_ROLES))
        if missing:
            override = os.environ.get(FASHION_MNIST_ENV)
            where = (f"{directory} (from ${FASHION_MNIST_ENV})" if override
                     else str(directory))
            detail = ("directory does not exist" if not directory.is_dir() else
                      "missing " + ", ".join(_STANDARD_NAMES[r][0] + "[.gz]" for r in missing))
            raise DataError(
                f"Fashion-MNIST not found in {where}: {detail}; install it with "
                f"`apt-get install -y dataset-fashion-mnist`")
        return _load_idx_dir(directory, prefix=None, name="fashion-mnist",
                             emnist_letters=False, known=_FASHION)

    path = Path(source).expanduser()
    if path.is_file() and path.name == NPY_PAIR[0]:
        path = path.parent
    if path.is_dir() and all((path / f).is_file() for f in NPY_PAIR):
        return _load_npy_pair(path)
    if path.is_dir() and _is_image_folder(path):
        return _load_image_folder(path)
    if path.is_dir():
        name = path.resolve().name or str(path)
        return _load_idx_dir(path, prefix=None, name=name,
                             emnist_letters=emnist_letters, known=None)
    if path.is_file():
        if path.suffix.lower() == ".npz" or _is_zip(path):
            return _load_npz(path, emnist_letters=emnist_letters)
        raise DataError(
            f"{path}: unsupported data file (expected a directory of IDX files, a .npz "
            f"file, or 'fashion-mnist')")
    if path.parent.is_dir() and path.name and any(
            c.name.startswith(path.name + "-") for c in _safe_listdir(path.parent)):
        return _load_idx_dir(path.parent, prefix=path.name, name=path.name,
                             emnist_letters=emnist_letters, known=None)
    if path.exists():
        raise DataError(f"{path}: not a regular file or directory (a FIFO or device is never read)")
    raise DataError(
        f"{source}: no such file or directory (expected a directory of IDX files, a .npz "
        f"file, or 'fashion-mnist')")


def _safe_listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


# --------------------------------------------------------------------------- preparation
#: The one pixel-scale rule (train, eval, predict, Net.predict): uint8 pixels are divided by
#: 255; float images are taken as they are, on the 0..1 scale.
FLOAT_SCALE_WARNING = (
    "float images hold values in {lo:g}..{hi:g}, beyond [0, 1]: float images are taken as they are (only uint8 "
    "pixels are divided by 255), so 0..255 floats do not match PNG/JPEG inputs of netc predict; store uint8 "
    "pixels or divide by 255")


def as_batch(arr: np.ndarray, input_shape: tuple[int, ...]) -> tuple[np.ndarray, bool] | None:
    """One sample (the input shape, or (H, W) for one channel) or a batch of them -> (array
    with a leading sample axis, batch?); None when the shape fits neither."""
    shape, s = tuple(input_shape), arr.shape
    if s == shape:
        return arr[None], False
    if s[1:] == shape:
        return arr, True
    if len(shape) == 3 and shape[0] == 1:
        if s == shape[1:]:
            return arr[None, None], False
        if len(s) == 3 and s[1:] == shape[1:]:
            return arr[:, None], True
    return None


def batch_shapes_text(input_shape: tuple[int, ...]) -> str:
    dims = ", ".join(map(str, input_shape))
    alt = f", ({', '.join(map(str, input_shape[1:]))}) or (N, {', '.join(map(str, input_shape[1:]))})" \
        if len(input_shape) == 3 and input_shape[0] == 1 else ""
    return f"({dims}) or (N, {dims}){alt}"


def pixel_values(arr: np.ndarray, where: str) -> np.ndarray:
    """Pixels by the rule of `prepare_inputs`: bool -> 0/1 floats, other integers must lie in
    0..255 (-> uint8), floats must be finite; anything else is a `DataError`."""
    if arr.dtype.kind == "b":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{where}: integer pixels must lie in 0..255, found {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{where}: array contains NaN or infinite values")
        return arr
    raise DataError(f"{where}: array has non-numeric dtype {arr.dtype}")


def images_batch(images, input_shape: tuple[int, ...], where: str = "images") -> np.ndarray:
    """Images as netc predict takes them (one or a batch, see `as_batch`; pixels by
    `pixel_values`) -> a batch for `prepare_inputs`."""
    arr = np.asarray(images)
    fit = as_batch(arr, input_shape)
    if fit is None:
        raise DataError(f"{where} of shape {arr.shape} do not fit the spec's input; expected "
                        f"{batch_shapes_text(input_shape)}")
    return pixel_values(fit[0], where)




def _chw_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def prepare_inputs(x: np.ndarray, input_shape: tuple[int, int, int], *,
                   mean: Norm | None = None, std: Norm | None = None,
                   pad: bool = False, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """Turn images into the (N, C, H, W) float tensor a network with `input_shape` takes.

    Steps: uint8 images are scaled to [0, 1] (divided by 255); float images are taken as
    they are, on the 0..1 scale (a `NetcWarning` when their values go beyond [0, 1]:
    0..255 floats would train while PNGs, divided by 255, would not fit); (N, H, W) data
    gets a channel axis; the (C, H, W) of the data must equal
    `input_shape`, except that with ``pad=True`` smaller images are zero-padded, centered,
    up to the spec's size; finally ``(x - mean) / std`` is applied when given (after
    padding, so the padding becomes ``-mean / std`` like torchvision's Pad+Normalize).
    `mean` and `std` are one number, or a list of one per channel (torchvision's Normalize).

    Returns a C-contiguous array of `dtype`.  Raises `DataError` on a shape mismatch,
    e.g. "data images are 1x28x28 but the spec's input is 1x32x32 (use --pad to zero-pad)".
    """
    x = np.asarray(x)
    target = tuple(int(d) for d in input_shape)
    if len(target) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim != 4:
        raise DataError(
            f"data images must be 3-D (N,H,W) or 4-D (N,C,H,W), got shape {_shape_text(x.shape)}")
    if x.dtype == np.uint8:
        out = x.astype(dtype)
        out /= 255
    elif np.issubdtype(x.dtype, np.floating):
        out = x.astype(dtype)
        if out.size and (out.min() < 0 or out.max() > 1):
            warnings.warn(FLOAT_SCALE_WARNING.format(lo=float(out.min()), hi=float(out.max())), NetcWarning,
                          stacklevel=2)
    else:
        raise DataError(f"data images must be uint8 or floating point, got dtype {x.dtype}")

    have = tuple(x.shape[1:])
    if have != target:
        message = f"data images are {_chw_text(have)} but the spec's input is {_chw_text(target)}"
        smaller = have[0] == target[0] and have[1] <= target[1] and have[2] <= target[2]
        if not (pad and smaller):
            if smaller:
                message += " (use --pad to zero-pad)"
            elif have[0] == target[0]:
                message += " (images larger than the input cannot be padded)"
            elif x.shape[-1] == target[0]:
                message += " (the data looks channels-last; it must be N,C,H,W)"
            raise DataError(message)
        top = (target[1] - have[1]) // 2
        left = (target[2] - have[2]) // 2
        padded = np.zeros((out.shape[0],) + target, dtype=out.dtype)
        padded[:, :, top:top + have[1], left:left + have[2]] = out
        out = padded

    if mean is not None:
        out -= norm_values(mean, "mean", out.shape[1], out.dtype)
    if std is not None:
        out /= norm_values(std, "std", out.shape[1], out.dtype)
    return np.ascontiguousarray(out, dtype=dtype)


def train_val_split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off a random validation set: returns (x_train, y_train, x_val, y_val).

    Which samples go to validation is chosen by a permutation seeded with `seed` (same
    seed, same split).  Each part keeps the original sample order.  The validation size
    is ``round(N * val_fraction)``, at least 1 when the fraction is positive and at most
    N - 1.  `val_fraction` must be in [0, 1), else `DataError`.
    """
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"validation fraction must be a number, got {val_fraction!r}") from None
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if len(x) != len(y):
        raise DataError(f"cannot split {len(x)} images with {len(y)} labels")
    n = len(x)
    n_val = int(round(n * fraction))
    if fraction > 0:
        n_val = max(n_val, 1)
    n_val = max(0, min(n_val, n - 1))
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:n_val])
    train_idx = np.sort(perm[n_val:])
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def dataset_stats(x: np.ndarray, per_channel: bool = False) -> tuple[Norm, Norm]:
    """Mean and (population) standard deviation of all pixels, on the [0, 1] scale: two
    floats, or with `per_channel` two lists of one value per channel (axis 1 of (N, C, H, W)
    images; (N, H, W) images have one channel).

    uint8 images are divided by 255; float images are taken as they are.  Computed in
    float64, in chunks, so it does not materialise a float copy of the whole dataset.
    """
    x = np.asarray(x)
    if x.size == 0:
        raise DataError("cannot compute statistics of an empty dataset")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"data images must be uint8 or floating point, got dtype {x.dtype}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    channels = x.shape[1] if per_channel and x.ndim == 4 else 1
    flat = x.reshape(len(x), channels, -1) if x.ndim > 1 else x.reshape(-1, 1, 1)
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    chunk = max(1, (1 << 22) // max(1, flat.shape[1] * flat.shape[2]))
    for start in range(0, len(flat), chunk):
        part = flat[start:start + chunk].astype(np.float64) / scale
        total += part.sum(axis=(0, 2))
        total_sq += np.square(part).sum(axis=(0, 2))
    count = x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(0.0, total_sq / count - mean * mean))
    if not per_channel:
        return float(mean[0]), float(std[0])
    return [float(m) for m in mean], [float(d) for d in std]


def norm_values(v: Norm, what: str, channels: int, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
    """A normalisation mean or std (one number, or one per channel) as an array that
    broadcasts over (N, C, H, W): shape () or (C, 1, 1).  `DataError` when a value is not
    finite (std: not > 0) or a list does not have one value per channel."""
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim > 1 or (arr.ndim == 1 and len(arr) != channels):
        raise DataError(f"normalisation {what} has {arr.size} values for images of {channels} "
                        f"channel{'s' if channels != 1 else ''}")
    if not np.all(np.isfinite(arr)) or (what == "std" and not np.all(arr > 0)):
        want = "a positive number" if what == "std" else "finite"
        raise DataError(f"normalisation {what} must be {want}, got {v}")
    return arr.astype(dtype).reshape(-1, 1, 1) if arr.ndim else arr.astype(dtype)


def norm_text(mean: Norm | None, std: Norm | None) -> str:
    """'mean 0.2860 std 0.3530', or per channel 'mean [0.4914, 0.4822] std [...]'."""
    def show(v: Norm | None, default: float) -> str:
        v = default if v is None else v
        return f"[{', '.join(f'{x:.4f}' for x in v)}]" if isinstance(v, (list, tuple)) else f"{v:.4f}"
    return f"mean {show(mean, 0.0)} std {show(std, 1.0)}"
