"""Bounded reading of .npy and .npz files: every size is checked before memory is allocated.

`np.load` trusts the file: a header may declare 10^13 elements, a 1 MB .npz member may
inflate to gigabytes, a member that is not an array comes back as raw bytes, and a text
file is taken for a pickle.  Here the file must be a regular file; each array's .npy
header is read first (`numpy.lib.format.read_magic` / `read_array_header_*`), and its
declared size must equal what the file (or zip member, by the archive's own record)
holds, stay under a cap, and (for compressed members) not inflate more than
`MAX_INFLATION` times beyond `INFLATION_FREE_BYTES`.  A caller that knows the shapes it
needs (a network's parameters) checks them from the headers, before any data is read.
Object arrays are refused (no pickle).  Every failure is one clear `error` (a
`NetcError` subclass chosen by the caller) naming the file.
"""
from __future__ import annotations

import math
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from numpy.lib import format as npformat

MAX_DATA_BYTES = 8 << 30  # one array of a data set
MAX_META_BYTES = 256 << 20  # one metadata array of a weights file or checkpoint
MAX_INFLATION = 200  # compressed members: declared size / compressed size
INFLATION_FREE_BYTES = 64 << 20  # ... checked only above this size
_CHUNK = 16 << 20
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


class Header(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def open_regular(path: Path, error: type[Exception], what: str):
    """Open `path` for reading if it is a regular file (not a FIFO, device or directory)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file (a {what} must be a file, not a directory, FIFO or device)")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def sniff(path: Path, error: type[Exception], what: str) -> str:
    """'npy', 'npz', 'empty' or 'other', from the first bytes of a regular file."""
    with open_regular(path, error, what) as f:
        head = f.read(6)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(ZIP_MAGICS):
        return "npz"
    return "empty" if not head else "other"


def read_header(f, where: str, error: type[Exception]) -> Header:
    """The .npy header at the position of `f`; refuses object arrays and unknown versions."""
    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(f)
        else:
            raise error(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
    except ValueError as exc:
        raise error(f"{where}: not a valid .npy array (bad header: {exc})") from None
    except (EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise error(f"{where}: corrupt or truncated .npy header ({exc})") from None
    if dtype.hasobject:
        raise error(f"{where}: holds pickled (object) arrays, which are refused for safety; save plain "
                    f"numeric arrays")
    if any(d < 0 for d in shape):
        raise error(f"{where}: .npy header declares a negative dimension {shape}")
    return Header(tuple(int(d) for d in shape), dtype, bool(fortran))


def read_data(f, header: Header, where: str, error: type[Exception]) -> np.ndarray:
    """The array data after `header`, read into one allocation of the (already bounded) size."""
    flat = np.empty(math.prod(header.shape), header.dtype)
    view = memoryview(flat.view(np.uint8).reshape(-1))
    got = 0
    try:
        while got < len(view):
            n = f.readinto(view[got:got + _CHUNK])
            if not n:
                break
            got += n
    except (EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise error(f"{where}: corrupt or truncated array data ({exc})") from None
    if got < len(view):
        raise error(f"{where}: truncated array data: its header declares {header.nbytes} bytes, it holds {got}")
    return flat.reshape(header.shape, order="F" if header.fortran else "C")


def _bound(header: Header, available: int, cap: int | None, where: str, error: type[Exception]) -> None:
    if header.nbytes != available:
        raise error(f"{where}: its header declares shape {header.shape} of {header.dtype} ({header.nbytes:,} bytes) "
                    f"but the data hold {available:,} bytes (damaged or forged file)")
    if cap is not None and header.nbytes > cap:
        raise error(f"{where}: array of {header.nbytes:,} bytes exceeds the limit of {cap:,} bytes")


def read_npy(path: str | os.PathLike, error: type[Exception], what: str = ".npy file",
             cap: int = MAX_DATA_BYTES) -> np.ndarray:
    """One array from an .npy file, its declared size checked against the file's size and `cap`."""
    path = Path(path)
    kind = sniff(path, error, what)
    if kind == "npz":
        raise error(f"{path}: is an .npz archive, not a {what} (an .npy array written by np.save)")
    if kind != "npy":
        raise error(f"{path}: not a {what}: " + ("the file is empty" if kind == "empty" else
                    "not an .npy array (no NUMPY magic; a text file?)"))
    with open_regular(path, error, what) as f:
        header = read_header(f, str(path), error)
        _bound(header, os.fstat(f.fileno()).st_size - f.tell(), cap, str(path), error)
        return read_data(f, header, str(path), error)


def read_npz(path: str | os.PathLike, error: type[Exception], what: str = ".npz file",
             check: Callable[[dict[str, Header]], None] | None = None,
             cap: Callable[[str], int] | int = MAX_DATA_BYTES) -> dict[str, np.ndarray]:
    """Every array of an .npz archive by name ('.npy' stripped).  Every member's header is
    read first (inflating only its first bytes), and its declared size must equal the
    member's size in the archive, which must not be a zip bomb; then `check(headers)` may
    refuse the file, then each size must stay under `cap` (bytes, or a function of the
    name); only then is any data read."""
    path = Path(path)
    kind = sniff(path, error, what)
    if kind == "npy":
        raise error(f"{path}: not a {what}: it is a single .npy array, expected an .npz archive of named arrays")
    if kind != "npz":
        raise error(f"{path}: not a {what}: " + ("the file is empty" if kind == "empty" else
                    "not an .npz archive (unrecognised content; a text file?)"))
    f = open_regular(path, error, what)
    try:
        try:
            z = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise error(f"{path}: corrupt or truncated {what}: not a valid .npz archive ({exc})") from None
        with z:
            infos: dict[str, zipfile.ZipInfo] = {}
            headers: dict[str, Header] = {}
            for info in z.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise error(f"{path}: member '{info.filename}' is not an .npy array (a {what} holds only "
                                f"arrays written by numpy)")
                name = info.filename[:-len(".npy")]
                where = f"{path}: member '{name}'"
                if name in infos:
                    raise error(f"{where} appears twice in the archive")
                if (info.compress_type != zipfile.ZIP_STORED and info.file_size > INFLATION_FREE_BYTES
                        and info.file_size > MAX_INFLATION * max(info.compress_size, 1)):
                    raise error(f"{where}: {info.compress_size:,} compressed bytes inflate to {info.file_size:,} "
                                f"(more than {MAX_INFLATION}x: refused as a likely zip bomb)")
                try:
                    with z.open(info) as m:
                        header = read_header(m, where, error)
                        _bound(header, info.file_size - m.tell(), None, where, error)
                except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError, zlib.error) as exc:
                    raise error(f"{where}: cannot read ({exc})") from None
                infos[name], headers[name] = info, header
            if check is not None:  # names and shapes first: the clearest message
                check(headers)
            for name, header in headers.items():
                limit = cap(name) if callable(cap) else cap
                if header.nbytes > limit:
                    raise error(f"{path}: member '{name}': array of {header.nbytes:,} bytes exceeds the limit of "
                                f"{limit:,} bytes")
            out = {}
            for name, info in infos.items():
                where = f"{path}: member '{name}'"
                try:
                    with z.open(info) as m:
                        read_header(m, where, error)
                        out[name] = read_data(m, headers[name], where, error)
                        if m.read(1):  # pragma: no cover - sizes were checked
                            raise error(f"{where}: trailing data")
                except (RuntimeError, NotImplementedError, zipfile.BadZipFile, OSError, zlib.error) as exc:
                    raise error(f"{path}: corrupt or truncated {what}: member '{name}' ({exc})") from None
            return out
    finally:
        f.close()
