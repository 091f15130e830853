"""Weights and checkpoints as .npz files: written atomically, read without pickle.

A weights file holds one array per parameter and buffer, by PyTorch name
('conv1.weight', 'bn1.running_mean').  Names starting with '__' are reserved for
metadata and never reach `Net.load_state_dict`:

* ``__meta__/<key>``: facts about how the weights were trained: ``mean``/``std`` (the
  input normalisation), ``spec_hash``, ``class_names``, ``pad``;
* ``__optim__/<key>`` (checkpoints only): the optimizer state of `Net.optimizer_state`
  (m, v, step, dropout seed and counter).

Every file is written under a temporary name in its own directory, flushed, and renamed
over the target (`os.replace`), so a reader sees the old file or the new one, never half
of one.  Every way a file can be bad (missing, truncated, not a zip, pickled objects,
names or shapes that do not fit the network) is a `WeightsError` saying which file and
what is wrong.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WeightsError
from .fileio import FILE_MODE, atomic_write, atomic_write_text  # noqa: F401 (part of this module's API)

META = "__meta__/"
OPTIM = "__optim__/"


def save_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Write `arrays` as an uncompressed .npz, atomically.  Object arrays are refused."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise TypeError(f"refusing to save object array '{k}' (it would need pickle)")
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike, what: str = "weights file") -> dict[str, np.ndarray]:
    """Read every array of an .npz file (allow_pickle=False) or raise a clear `WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such {what}" if not path.exists() else f"{path}: not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if magic.startswith(b"\x93NUMPY"):
        raise WeightsError(f"{path}: not a {what}: it is a single .npy array, expected an .npz archive of "
                           f"named arrays")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        size = path.stat().st_size
        raise WeightsError(f"{path}: not a {what}: " + ("the file is empty" if size == 0 else
                           "not an .npz archive (unrecognised content)"))
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise WeightsError(f"{path}: holds pickled (object) arrays, which are refused for safety; a "
                               f"{what} holds plain numeric arrays") from None
        raise WeightsError(f"{path}: corrupt {what} ({exc})") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise WeightsError(f"{path}: corrupt or truncated {what}: not a valid .npz archive ({exc})") from None
    except (OSError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise WeightsError(f"{path}: cannot read {what} ({exc})") from None


# ---- weights ----------------------------------------------------------------------------
def split(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                  dict[str, np.ndarray]]:
    """-> (state for load_state_dict, metadata, optimizer state), prefixes stripped."""
    state = {k: v for k, v in arrays.items() if not k.startswith("__")}
    meta = {k[len(META):]: v for k, v in arrays.items() if k.startswith(META)}
    optim = {k[len(OPTIM):]: v for k, v in arrays.items() if k.startswith(OPTIM)}
    return state, meta, optim


def with_meta(state: dict[str, Any], meta: dict[str, Any] | None = None,
              optim: dict[str, Any] | None = None) -> dict[str, Any]:
    out = dict(state)
    out.update({META + k: v for k, v in (meta or {}).items()})
    out.update({OPTIM + k: v for k, v in (optim or {}).items()})
    return out


def save_weights(path: str | os.PathLike, net, meta: dict[str, Any] | None = None) -> None:
    """Parameters and buffers of `net` (+ metadata under '__meta__/') to `path`, atomically."""
    save_npz(path, with_meta(net.state_dict(), meta))


def load_weights(path: str | os.PathLike, net=None, what: str = "weights file") -> dict[str, np.ndarray]:
    """Read `path`; if `net` is given, load its parameters and buffers into it (strict:
    every name present, none extra, shapes equal).  Returns the metadata ('__meta__/' keys,
    prefix stripped).  Also reads checkpoints (their optimizer state is ignored here)."""
    state, meta, _ = split(load_npz(path, what))
    if net is not None:
        apply_state(net, state, path)
    return meta


def apply_state(net, state: dict[str, np.ndarray], path) -> None:
    if not state:
        raise WeightsError(f"{path}: holds no weights (only metadata)")
    try:
        net.load_state_dict(state)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None


# ---- metadata values --------------------------------------------------------------------
def meta_float(meta: dict[str, np.ndarray], key: str) -> float | None:
    v = meta.get(key)
    if v is None or v.shape != () or v.dtype.kind not in "fiu" or not np.isfinite(v):
        return None
    return float(v)


def meta_str(meta: dict[str, np.ndarray], key: str) -> str | None:
    v = meta.get(key)
    return str(v) if v is not None and v.shape == () and v.dtype.kind == "U" else None


def meta_strings(meta: dict[str, np.ndarray], key: str) -> list[str] | None:
    v = meta.get(key)
    return [str(s) for s in v] if v is not None and v.ndim == 1 and v.dtype.kind == "U" else None


def json_array(value: Any) -> np.ndarray:
    """A JSON-encodable value as a 0-d unicode array (loads without pickle)."""
    return np.array(json.dumps(value))


def from_json_array(meta: dict[str, np.ndarray], key: str, path) -> Any:
    text = meta_str(meta, key)
    if text is None:
        raise WeightsError(f"{path}: checkpoint lacks '{META}{key}' (not a checkpoint written by netc train?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: checkpoint entry '{META}{key}' is not valid JSON ({exc})") from None
