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
of one.  Files are read by npyfile.py: sizes bounded before anything is allocated, and,
for a known network (`read_for`), names and shapes checked from the headers first.
Everything read back is validated (`read_meta` for metadata, `check_settings`,
`check_position`, `check_history`, `check_order` for checkpoints) as strictly as
command-line input.  Every way a file can be bad (missing, truncated, not a zip, pickled
objects, names or shapes that do not fit the network, damaged metadata) is a
`WeightsError` saying which file and what is wrong.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import WeightsError
from .fileio import FILE_MODE, atomic_write, atomic_write_text  # noqa: F401 (part of this module's API)
from .npyfile import MAX_META_BYTES, Header, open_regular, read_npz

MAX_NORM_CHANNELS = 4096  # values of a per-channel mean or std (far beyond any image input)

META = "__meta__/"
OPTIM = "__optim__/"


def save_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Write `arrays` as an uncompressed .npz, atomically.  Object arrays are refused."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise TypeError(f"refusing to save object array '{k}' (it would need pickle)")
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike, what: str = "weights file",
             check: Callable[[dict[str, Header]], None] | None = None,
             cap: Callable[[str], int] | int = MAX_META_BYTES) -> dict[str, np.ndarray]:
    """Read every array of an .npz file (no pickle, sizes bounded before reading, see
    npyfile.py) or raise a clear `WeightsError`.  `check(headers)` sees every member's
    shape and dtype before any data is read; `cap` bounds each member's size."""
    return read_npz(path, WeightsError, what, check=check, cap=cap)


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


def state_problems(expected: dict[str, tuple[int, ...]], state: dict[str, Any], dtype, values: bool = True
                   ) -> list[str]:
    """What keeps `state` (name -> array, or anything with .shape and .dtype when
    values=False) from loading into tensors of shapes `expected` in `dtype`: missing,
    extra, misshapen, non-real, or (values=True) not finite in `dtype`.  Metadata entries of
    a netc train file ('__meta__/', '__optim__/') get one line pointing to load_weights."""
    dtype = np.dtype(dtype)
    problems = []
    for k in sorted(set(expected) - set(state)):
        problems.append(f"missing '{k}' {tuple(expected[k])}")
    reserved = sorted(k for k in set(state) - set(expected) if str(k).startswith("__"))
    for k in sorted(set(state) - set(expected) - set(reserved)):
        problems.append(f"unexpected '{k}'")
    if reserved:
        problems.append(f"unexpected metadata entries ({', '.join(repr(k) for k in reserved[:3])}"
                        f"{', ...' if len(reserved) > 3 else ''}): this is a weights or checkpoint file "
                        f"written by netc train; load it with net.load_weights(path)")
    for k in sorted(set(expected) & set(state)):
        v = state[k] if not values else np.asarray(state[k])
        want = tuple(expected[k])
        if tuple(v.shape) != want:
            problems.append(f"'{k}' has shape {tuple(v.shape)}, the network needs {want}")
        elif v.dtype.kind not in "fiu":
            problems.append(f"'{k}' has dtype {v.dtype}, expected a real number array")
        elif values and v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            problems.append(f"'{k}' contains NaN or infinity")
        elif values and not np.all(np.abs(v) <= np.finfo(dtype).max):
            problems.append(f"'{k}' has values up to {np.max(np.abs(v)):.3g}, beyond the range of "
                            f"{dtype} (largest {np.finfo(dtype).max:.3g})")
    return problems


def header_check(net, path, optim: bool = False) -> Callable[[dict[str, Header]], None]:
    """A `load_npz` check refusing, before any data is read, a file whose parameter names
    or shapes do not fit `net` (and, with `optim`, whose optimizer moments do not)."""
    def check(headers: dict[str, Header]) -> None:
        state = {k: h for k, h in headers.items() if not k.startswith("__")}
        if not state:
            raise WeightsError(f"{path}: holds no weights (only metadata)")
        problems = net.state_problems(state, values=False)
        if optim:
            for k in ("m", "v"):
                h = headers.get(OPTIM + k)
                if h is not None and h.shape != net.optimizer_shape:
                    problems.append(f"optimizer state '{OPTIM + k}' has shape {h.shape}, the network needs "
                                    f"{net.optimizer_shape}")
        if problems:
            raise WeightsError(f"{path}: {net.misfit(problems)}")
    return check


def size_cap(net) -> Callable[[str], int]:
    """Bytes allowed per member: a parameter's or moment's own size (at 16 bytes per value,
    the widest real dtype), `MAX_META_BYTES` for metadata and anything unknown."""
    sizes = {k: v.size for k, v in {**net.params, **net.buffers}.items()}
    sizes[OPTIM + "m"] = sizes[OPTIM + "v"] = net.optimizer_shape[0]
    return lambda name: 16 * sizes[name] if name in sizes else MAX_META_BYTES


def network_cap(network) -> int:
    """Bytes allowed per member of a checkpoint read before its network is compiled: the
    metadata limit plus every parameter at 16 bytes per value."""
    return MAX_META_BYTES + 16 * network.total_params


def read_for(net, path: str | os.PathLike, what: str = "weights file", optim: bool = False
             ) -> dict[str, np.ndarray]:
    """Every array of a weights or checkpoint file meant for `net`, sizes and shapes checked
    against the network from the headers before anything is read."""
    return load_npz(path, what, check=header_check(net, path, optim), cap=size_cap(net))


def load_weights(path: str | os.PathLike, net=None, what: str = "weights file") -> dict[str, np.ndarray]:
    """Read `path`; if `net` is given, load its parameters and buffers into it (strict:
    every name present, none extra, shapes equal).  Returns the metadata ('__meta__/' keys,
    prefix stripped).  Also reads checkpoints (their optimizer state is ignored here)."""
    arrays = load_npz(path, what) if net is None else read_for(net, path, what)
    state, meta, _ = split(arrays)
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


# ---- metadata, validated ----------------------------------------------------------------
@dataclass
class Meta:
    """The '__meta__/' facts of a weights or checkpoint file, each checked."""

    mean: float | list[float] | None = None  # one value, or one per input channel
    std: float | list[float] | None = None
    pad: bool = False
    class_names: list[str] | None = None
    spec_hash: str | None = None
    epoch: int | None = None


def read_meta(meta: dict[str, np.ndarray], path, num_classes: int | None = None) -> Meta:
    """Validate the metadata netc train writes; a value of the wrong kind is a `WeightsError`
    naming the entry (absent entries are None)."""
    def bad(key: str, want: str) -> WeightsError:
        v = meta[key]
        return WeightsError(f"{path}: damaged metadata '{META}{key}': expected {want}, got {v.dtype} of shape "
                            f"{v.shape}")

    out = Meta()
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is None:
            continue
        if (v.ndim > 1 or (v.ndim == 1 and not 1 <= len(v) <= MAX_NORM_CHANNELS) or v.dtype.kind not in "fiu"
                or not np.all(np.isfinite(v)) or (key == "std" and not np.all(v > 0))):
            raise bad(key, "a finite number" + (" > 0" if key == "std" else "") + " or a list of one per channel")
        setattr(out, key, float(v) if v.ndim == 0 else [float(x) for x in v])
    if (v := meta.get("pad")) is not None:
        if v.shape != () or v.dtype.kind != "b":
            raise bad("pad", "a boolean")
        out.pad = bool(v)
    for key in ("spec_hash",):
        if (v := meta.get(key)) is not None:
            if v.shape != () or v.dtype.kind != "U":
                raise bad(key, "a string")
            out.spec_hash = str(v)
    if (v := meta.get("epoch")) is not None:
        if v.shape != () or v.dtype.kind not in "iu" or int(v) < 0:
            raise bad("epoch", "an integer >= 0")
        out.epoch = int(v)
    if (v := meta.get("class_names")) is not None:
        if v.ndim != 1 or v.dtype.kind != "U":
            raise bad("class_names", "a list of strings")
        if num_classes is not None and len(v) != num_classes:
            raise WeightsError(f"{path}: damaged metadata '{META}class_names': {len(v)} names for a network of "
                               f"{num_classes} classes")
        out.class_names = [str(s) for s in v]
    return out


def _norm_fits(where, mean, std, network) -> None:
    """A per-channel mean or std must have one value per channel of the network's image input."""
    shape = network.input_shape
    for what, v in (("mean", mean), ("std", std)):
        if isinstance(v, list) and (len(shape) != 3 or len(v) != shape[0]):
            takes = f"{shape[0]} channels" if len(shape) == 3 else f"{shape[0]} features, not images"
            raise WeightsError(f"{where}: the normalisation {what} has {len(v)} values (one per channel), but "
                               f"network '{network.name}' takes {takes}")


def _json_norm(v):
    """A mean or std of normalization.json: a number, or a list of numbers (per channel)."""
    if isinstance(v, list):
        if not 1 <= len(v) <= MAX_NORM_CHANNELS:
            raise ValueError(f"{len(v)} values")
        return [float(x) for x in v]
    return float(v)


def normalisation(path, meta: Meta, network) -> tuple[float | list[float] | None, float | list[float] | None, str]:
    """(mean, std, where from) for weights at `path`: the values stored in the file, else
    normalization.json next to it, else the spec's train: section, else none.  Each is one
    number or a list of one per input channel."""
    path = Path(path)
    if meta.mean is not None and meta.std is not None:
        _norm_fits(path, meta.mean, meta.std, network)
        return meta.mean, meta.std, f"stored in {path.name}"
    side = path.parent / "normalization.json"
    if side.is_file():
        try:
            with open_regular(side, WeightsError, "normalisation file") as f:
                text = f.read(1 << 16)  # netc train writes a few lines
            info = json.loads(text)
            mean, std = _json_norm(info["mean"]), _json_norm(info["std"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise WeightsError(f"{side}: unreadable normalisation file ({exc})") from None
        m, d = np.asarray(mean), np.asarray(std)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(d)) and np.all(d > 0)):
            raise WeightsError(f"{side}: normalisation must be a finite mean and a std > 0, got {mean}, {std}")
        _norm_fits(side, mean, std, network)
        return mean, std, f"from {side}"
    t = network.train
    if t.get("mean") is not None or t.get("std") is not None:
        return t.get("mean"), t.get("std"), "from the spec's train: section"
    return None, None, "none (no mean/std stored with the weights or in the spec)"


# ---- metadata values --------------------------------------------------------------------
def meta_float(meta: dict[str, np.ndarray], key: str) -> float | None:
    v = meta.get(key)
    if v is None or v.shape != () or v.dtype.kind not in "fiu" or not np.isfinite(v):
        return None
    return float(v)


def meta_str(meta: dict[str, np.ndarray], key: str) -> str | None:
    v = meta.get(key)
    return str(v) if v is not None and v.shape == () and v.dtype.kind == "U" else None


def json_array(value: Any) -> np.ndarray:
    """A JSON-encodable value as a 0-d unicode array (loads without pickle)."""
    return np.array(json.dumps(value))


def from_json_array(meta: dict[str, np.ndarray], key: str, path) -> Any:
    text = meta_str(meta, key)
    if text is None:
        raise WeightsError(f"{path}: checkpoint lacks '{META}{key}' (not a checkpoint written by netc train?)")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WeightsError(f"{path}: checkpoint entry '{META}{key}' is not valid JSON ({exc})") from None


# ---- checkpoint contents, validated as strictly as command-line input ----------------------
def _damaged(path, what: str) -> WeightsError:
    return WeightsError(f"{path}: damaged checkpoint: {what}")


def _is_int(v) -> bool:
    return type(v) is int


def _is_real(v) -> bool:
    return type(v) in (int, float)


def _real_or_list(v, ok: Callable[[float], bool]) -> bool:
    """A number, or a non-empty list of numbers (one per channel), each passing `ok`."""
    vals = v if isinstance(v, list) and 1 <= len(v) <= MAX_NORM_CHANNELS else [v]
    return all(_is_real(x) and ok(x) for x in vals)


def check_settings(settings: Any, path) -> dict[str, Any]:
    """The run settings of a checkpoint, each checked by the rule its command-line option
    (or spec train: key) has; `WeightsError` naming the first bad one."""
    from .check import OPTIMIZERS, TRAIN_KEYS, train_value
    from .runtime import DTYPES

    if not isinstance(settings, dict):
        raise _damaged(path, f"settings are {type(settings).__name__}, not a mapping")
    settings.setdefault("normalize", "global")  # checkpoints written before per-channel normalisation
    missing = [k for k in (*TRAIN_KEYS, "limit", "pad", "dtype", "norm_source", "init", "freeze") if k not in settings]
    if missing:
        raise _damaged(path, f"settings lack {', '.join(missing)}")
    for key, (kind, default) in TRAIN_KEYS.items():
        if key in ("optimizer", "mean", "std") or (default is None and settings[key] is None):
            continue  # checked below, with what a finished run stores for them; or not set
        try:
            train_value(key, settings[key])
        except ValueError as exc:
            raise _damaged(path, f"setting '{key}' is {json.dumps(settings[key])}: {exc}") from None
    rules = {
        "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
        "mean": (lambda v: _real_or_list(v, lambda x: math.isfinite(x)), "a finite number or a list of them"),
        "std": (lambda v: _real_or_list(v, lambda x: math.isfinite(x) and x > 0),
                "a finite number > 0 or a list of them"),
        "limit": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
        "pad": (lambda v: type(v) is bool, "true or false"),
        "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
        "norm_source": (lambda v: isinstance(v, str), "a string"),
        "init": (lambda v: v is None or isinstance(v, str), "null or a path"),
        "freeze": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of layer names"),
        "target": (lambda v: v in ("labels", "input"), "labels or input"),
        "perturb": (lambda v: v is None or (isinstance(v, str) and _perturb_ok(v)), "null or a --perturb list"),
    }
    settings.setdefault("target", "labels")  # checkpoints written before --target and --perturb
    settings.setdefault("perturb", None)
    for key, (ok, want) in rules.items():
        if not ok(settings[key]):
            raise _damaged(path, f"setting '{key}' is {json.dumps(settings[key])}, expected {want}")
    return settings


def _perturb_ok(text: str) -> bool:
    from .perturb import parse_perturb

    try:
        parse_perturb(text)
    except ValueError:
        return False
    return True


def check_position(pos: Any, path, n_used: int, batch_size: int) -> dict[str, Any]:
    """Where a checkpoint stands in the run: whole epochs, a sample position within the
    epoch's order, counts and seconds of the right kinds and ranges."""
    if not isinstance(pos, dict):
        raise _damaged(path, "position is not a mapping")
    rules = {
        "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "pos": (lambda v: _is_int(v) and 0 <= v <= n_used and (v == n_used or v % batch_size == 0),
                f"a whole number of batches of {batch_size} in 0..{n_used}"),
        "correct": (lambda v: _is_int(v) and 0 <= v <= pos["pos"], "an integer in 0..pos"),  # pos checked
        "train_seconds": (lambda v: _is_real(v) and math.isfinite(v) and v >= 0, "a number >= 0"),
        "seconds": (lambda v: _is_real(v) and math.isfinite(v) and v >= 0, "a number >= 0"),
    }
    for key, (ok, want) in rules.items():
        if key not in pos:
            raise _damaged(path, f"position lacks '{key}'")
        if not ok(pos[key]):
            raise _damaged(path, f"position '{key}' is {json.dumps(pos[key])}, expected {want}")
    t = pos.get("threads")
    if t is not None and not (_is_int(t) and t >= 1):
        raise _damaged(path, f"position 'threads' is {json.dumps(t)}, expected an integer >= 1")
    return pos


def check_history(history: Any, path, columns: int, epochs_done: int) -> list[list[float]]:
    """One metrics row per completed epoch: `columns` numbers, the first the epoch (1, 2, ...)."""
    if not isinstance(history, list) or len(history) != epochs_done:
        n = len(history) if isinstance(history, list) else type(history).__name__
        raise _damaged(path, f"history has {n} rows for {epochs_done} completed epochs")
    for i, row in enumerate(history):
        if (not isinstance(row, list) or len(row) != columns or not all(_is_real(v) for v in row)
                or row[0] != i + 1):
            raise _damaged(path, f"history row {i + 1} is {json.dumps(row)}, expected {columns} numbers "
                                 f"starting with the epoch {i + 1}")
    return [[float(v) for v in row] for row in history]


def check_order(order: Any, losses: Any, path, n_samples: int, n_used: int, batches: int) -> None:
    """A mid-epoch checkpoint's sample order (distinct row indices) and per-batch losses."""
    if order is None or order.dtype.kind not in "iu" or order.shape != (n_used,):
        what = "missing" if order is None else f"{order.dtype} of shape {order.shape}"
        raise _damaged(path, f"the saved sample order is {what}, expected {n_used} integer indices")
    if n_used and (order.min() < 0 or order.max() >= n_samples or len(np.unique(order)) != n_used):
        raise _damaged(path, f"the saved sample order holds indices outside 0..{n_samples - 1} or repeats")
    if losses is None or losses.dtype.kind != "f" or losses.shape != (batches,) or not np.all(np.isfinite(losses)):
        what = "missing" if losses is None else f"{losses.dtype} of shape {losses.shape}"
        raise _damaged(path, f"the saved batch losses are {what}, expected {batches} finite numbers")
