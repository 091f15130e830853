"""Stage 6, run: numpy arrays in, numpy arrays out, through the compiled library.

Every array that reaches C is checked here first (shape, dtype, contiguity, label
range); C trusts its sizes because Python allocated and checked them.

A Net may be shared by threads: every method that reads or writes its buffers (the C
calls release the GIL and share one set of activations) holds the Net's lock, so
concurrent calls run one at a time, in some order.  The arrays in `params` and `buffers`
are views into those buffers: writing them while another thread trains is the caller's
business.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .build import load_fastcall
from .check import DEFAULT_MEMORY_BUDGET, OPTIMIZERS, TRAIN_KEYS, Network, train_value
from .errors import WeightsError
from .render import Rendered

DTYPES = {"float32": np.float32, "float64": np.float64}
MAX_BATCH = 2**31 - 1
THREAD_MEMORY_LIMIT = DEFAULT_MEMORY_BUDGET  # bytes of per-thread buffers (16 GiB)
MAX_THREADS = 1024  # a fixed cap, not one from this machine's cores: a run made elsewhere can be repeated here


def _locked(method):
    """`method` holding the Net's lock (re-entrant: locked methods call each other)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


def available_cores() -> int:
    """The default thread count: the cores this process may run on (its affinity), fewer when
    its cgroup's CPU quota (a container's --cpus) allows less; threads beyond the quota would
    only wait for each other at every barrier."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


# The default thread count leaves out the cores other processes keep busy when it is chosen:
# a thread sharing a core with another process is descheduled for whole time slices (ms), and
# every barrier then waits for it, so 2 threads with one core busy ran at 0.86-1.02x the
# 1-thread speed, median 0.96x (bench/busy.py; README, Threads).  /proc/stat is read twice, LOAD_WINDOW apart;
# the result is kept for LOAD_CACHE seconds, so making many nets in a row measures once.
LOAD_WINDOW = 0.05
LOAD_CACHE = 10.0
_load_seen: tuple[float, int] | None = None  # (time.monotonic() of the measurement, busy cores)


def _cpu_ticks(cpus: set[int], stat: str) -> tuple[int, int] | None:
    """(busy, total) clock ticks of `cpus` since boot from /proc/stat's cpuN lines (busy: user,
    nice, system, irq, softirq, steal; total adds idle and iowait), or None when unreadable."""
    busy = total = 0
    seen = 0
    try:
        with open(stat, "rb") as f:
            text = f.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        fields = rest.split()
        if len(fields) < 8 or not all(v.isdigit() for v in fields[:8]):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
        seen += 1
    return (busy, total) if seen == len(cpus) else None


def busy_cores(window: float = LOAD_WINDOW, stat: str = "/proc/stat", sleep=time.sleep,
               cpus: set[int] | None = None) -> float:
    """Cores' worth of time that other processes used, over the next `window` seconds, on the
    cores this process may run on: their busy time in /proc/stat less this process's own CPU
    time.  0.0 where /proc/stat cannot be read (not Linux)."""
    try:
        cpus = set(os.sched_getaffinity(0)) if cpus is None else cpus
    except AttributeError:  # pragma: no cover - not Linux
        return 0.0
    t0 = os.times()
    a = _cpu_ticks(cpus, stat)
    if a is None:
        return 0.0
    sleep(window)
    b = _cpu_ticks(cpus, stat)
    t1 = os.times()
    if b is None or b[1] <= a[1]:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    own = (t1.user + t1.system - t0.user - t0.system) * hz
    per_cpu = (b[1] - a[1]) / len(cpus)  # ticks that passed on each core
    return max(0.0, (b[0] - a[0] - own) / per_cpu)


def default_threads(fresh: bool = False) -> int:
    """The thread count when none is given: available_cores() less the cores other processes
    keep busy now (busy_cores(), rounded half up), at least 1.  Measured at most once every
    LOAD_CACHE seconds, unless `fresh`."""
    global _load_seen
    now = time.monotonic()
    if fresh or _load_seen is None or now - _load_seen[0] > LOAD_CACHE:
        _load_seen = (now, int(busy_cores() + 0.5))
    return max(1, available_cores() - _load_seen[1])


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time this process's own cgroup may use (cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or None when unlimited or unreadable.  A quota
    set only on a parent cgroup is not seen."""
    try:
        entries = [line.split(":", 2) for line in Path(self_cgroup).read_text().splitlines()]
    except OSError:
        return None
    for _, controllers, path in (e for e in entries if len(e) == 3):
        rel = path.strip("/")
        try:
            if controllers == "":  # v2: cpu.max holds "max 100000" or "150000 100000"
                quota, period = Path(root, rel, "cpu.max").read_text().split()[:2]
            elif "cpu" in controllers.split(","):  # v1, mounted as e.g. /sys/fs/cgroup/cpu,cpuacct
                d = Path(root, controllers, rel)
                quota, period = (Path(d, f).read_text().strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
            else:
                continue
            if quota not in ("max", "-1") and float(period) > 0 and int(quota) > 0:
                return int(quota) / float(period)
        except (OSError, ValueError):
            continue
    return None


def check_threads(value) -> int | None:
    """The one rule for a thread count, wherever it is given (`Net.threads`, `compile(threads=)`,
    `--threads`): an integer from 1 to MAX_THREADS, or None for the default (default_threads()).
    0 is refused like any other count out of range, never read as "the default"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_THREADS:
        raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS}, got {value!r} (leave it unset "
                         f"for the default: the available cores that are not busy, {default_threads()} here now)")
    return int(value)


def optimizer_value(what: str, value: Any, below: float | None = None) -> float:
    """The one rule for optimizer settings (set_optimizer, Net.lr): lr, momentum and
    weight_decay as check.train_value has them (the spec's and the CLI's rule); eps and the
    betas a real, finite number >= 0 (and < `below` when given).  -> float, else ValueError."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if what in TRAIN_KEYS:  # lr, momentum, weight_decay: the rule of the spec and the CLI
        try:
            return float(train_value(what, value))
        except ValueError as exc:
            raise ValueError(f"{what} {exc}") from None
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0 and (below is None or value < below))
    if not ok:
        rule = "a finite number >= 0" + (f" and < {below:g}" if below is not None else "")
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return float(value)


ALIGN = 64  # bytes


def _zeros(shape, dtype) -> np.ndarray:
    """np.zeros, its data at an address that is a multiple of 64 (a cache line): the C's vector
    loads of parameters and activations then never straddle two lines."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class Net:
    """A compiled network: parameters as numpy views, forward/backward/train in C."""

    def __init__(self, rendered: Rendered, ffi, lib, dtype: str = "float32", threads: int | None = None,
                 paths: Any = None):
        self._lock = threading.RLock()  # held by every call that touches the buffers below
        self.network: Network = rendered.plan.net
        self.plan = rendered.plan
        self.name = rendered.name
        self._real_t = f"{self.name}_real"  # C element type of params, activations and x
        self.dtype = np.dtype(DTYPES[dtype])
        self._in_shape = tuple(self.network.input_shape)
        self._flat_output = len(self.network.output_shape) == 1
        self.paths = paths  # Built: .c, .h, .so
        self._ffi, self._lib = ffi, lib
        # the C entry points, looked up once
        self._c = types.SimpleNamespace(**{f: getattr(lib, f"{self.name}_{f}") for f in (
            "forward", "backward", "zero_grad", "optimizer_step", "train_step", "train_batches")})
        P = self.plan.num_params
        self._params = _zeros(max(P, 1), self.dtype)
        # the gradients, then two spare slots: a data-parallel step (distributed.py) reduces the
        # batch's loss and correct count across processes in the same call as the gradients
        self._grad_ext = _zeros(self._params.size + 2, self.dtype)
        self._grads = self._grad_ext[:self._params.size]
        self._opt_m = _zeros(self._params.size, self.dtype)
        self._opt_v = _zeros(self._params.size, self.dtype)
        self._buffers = _zeros(max(self.plan.num_buffers, 1), self.dtype)
        self._stats = _zeros(max(self.plan.stats_size, 1), self.dtype)
        self._cache = _zeros(max(self.plan.cache_size, 1), self.dtype)
        self.params = {t.name: self._params[t.offset:t.offset + t.size].reshape(t.shape) for t in self.plan.params}
        self.buffers = {t.name: self._buffers[t.offset:t.offset + t.size].reshape(t.shape)
                        for t in self.plan.buffers}
        self._ctx = ffi.new(f"{self.name}_ctx *")
        self._keep: dict[str, np.ndarray] = {}
        for field, arr in (("params", self._params), ("grads", self._grads), ("opt_m", self._opt_m),
                           ("opt_v", self._opt_v), ("buffers", self._buffers), ("stats", self._stats),
                           ("cache", self._cache)):
            self._bind(field, arr)
        self._capacity = 0
        # batches smaller than these run on one thread (plan.py, parallel_min)
        self._ctx.parallel_min_eval = self.plan.parallel_min_eval
        self._ctx.parallel_min_train = self.plan.parallel_min_train
        self._fast_forward = None  # set by _reserve when the fastcall extension builds here
        self._threads = 0
        self._team: int | None = None  # None: one thread per chunk
        threads = check_threads(threads)
        self.threads = threads
        self._optim = ffi.new(f"{self.name}_optim *")
        self.frozen: list[str] = []  # layers whose parameters stay fixed (freeze)
        train = self.network.train
        self.set_optimizer(train.get("optimizer", "adam"), lr=train.get("lr", 1e-3),
                           momentum=train.get("momentum", 0.9), weight_decay=train.get("weight_decay", 0.0))
        self.seed(0)
        self.init(0)
        self.set_normalization(train.get("mean"), train.get("std"))
        self.class_names: list[str] | None = None  # set by load_weights when the file names the classes

    # ---- memory ------------------------------------------------------------------------
    def _bind(self, field: str, arr: np.ndarray) -> None:
        self._keep[field] = arr
        ctype = ("int32_t *" if arr.dtype == np.int32 else f"{self.name}_real *" if arr.dtype == self.dtype
                 else "double *")
        setattr(self._ctx, field, self._ffi.cast(ctype, arr.ctypes.data))

    @_locked
    def _reserve(self, n: int) -> None:
        if n <= self._capacity:
            return
        p = self.plan
        self._acts = _zeros((n, max(p.acts_per_sample, 1)), self.dtype)
        self._dacts = _zeros(self._acts.shape, self.dtype)
        self._ints = _zeros((n, max(p.ints_per_sample, 1)), np.int32)
        self._bind("acts", self._acts)
        off = p.out_offset
        self._out_view = self._acts[:, off:off + p.out_size]  # the outputs (logits) of every sample
        fastcall = load_fastcall()
        if fastcall is not None:  # forward's checks and call in C, bound to these activations
            ffi = self._ffi
            self._fast_forward = fastcall.Forward(
                fn=int(ffi.cast("uintptr_t", self._c.forward)), ctx=int(ffi.cast("uintptr_t", self._ctx)),
                outs=self._out_view.ctypes.data, stride=self._acts.strides[0], dtype=self.dtype, capacity=n,
                in_shape=self._in_shape, out_shape=tuple(p.net.output_shape),
                keep=(self._lib, self._ctx, self._keep, self._acts)).run  # _keep: the arrays ctx points into
        self._bind("dacts", self._dacts)
        self._bind("ints", self._ints)
        self._bind("losses", _zeros(n, np.float64))
        self._capacity = self._ctx.capacity = n

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    @_locked
    def threads(self, value: int | None) -> None:
        """Threads of the C code; None: the default, the available cores that other processes do
        not keep busy now (default_threads()).  Each thread has its own gradient sums and
        scratch: their size is checked before anything is allocated."""
        value = check_threads(value)
        value = default_threads() if value is None else value
        per_thread = (max(self.plan.num_params, 1) + max(self.plan.scratch_per_thread, 1)) * self.dtype.itemsize
        if value * per_thread > THREAD_MEMORY_LIMIT:
            raise ValueError(f"threads={value} needs {value * per_thread / 2**30:.1f} GiB of per-thread gradient "
                             f"sums and scratch ({per_thread:,} bytes a thread), over the "
                             f"{THREAD_MEMORY_LIMIT // 2**30} GiB limit: use fewer threads")
        self._threads = value
        self._grads_tls = _zeros(self._threads * max(self.plan.num_params, 1), self.dtype)
        self._bind("grads_tls", self._grads_tls)
        self._scratch = _zeros(self._threads * max(self.plan.scratch_per_thread, 1), self.dtype)
        self._bind("scratch", self._scratch)
        self._ctx.threads = self._threads
        self._ctx.team = self._team or 0

    @property
    def team(self) -> int | None:
        return self._team

    @team.setter
    @_locked
    def team(self, value: int | None) -> None:
        """Threads that run a call's chunks: None (the default) all of them; an integer
        forces it (the largest divisor of a call's chunk count not above it).  The chunks, and so
        the results, are fixed by `threads` alone, whatever the team."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or not 1 <= value <= MAX_THREADS):
            raise ValueError(f"team must be an integer from 1 to {MAX_THREADS}, or None (one per chunk), "
                             f"got {value!r}")
        self._team = None if value is None else int(value)
        self._ctx.team = self._team or 0

    @_locked
    def seed(self, seed: int) -> None:
        """Seed dropout masks (and restart their sequence)."""
        self._ctx.seed = int(seed) & (2**64 - 1)
        self._ctx.counter = 0

    # ---- parameters ----------------------------------------------------------------------
    @_locked
    def init(self, seed: int = 0) -> None:
        """PyTorch's default initialisation (kaiming-uniform conv/linear, batch-norm 1/0),
        drawn from numpy's generator with `seed`; resets gradients and optimizer state."""
        rng = np.random.default_rng(seed)
        for layer in self.network.layers:
            for k, v in layer.kind.init_params(layer, rng).items():
                key = f"{layer.name}.{k}"
                (self.params.get(key) if key in self.params else self.buffers[key])[...] = v
        self._grads[:] = 0
        self.reset_optimizer()

    @_locked
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of all parameters and buffers, by PyTorch name."""
        return {k: v.copy() for k, v in {**self.params, **self.buffers}.items()}

    def state_problems(self, state: dict[str, Any], values: bool = True) -> list[str]:
        """What keeps `state` (name -> array, or anything with .shape and .dtype when
        values=False) from loading: missing, extra, misshapen, non-real, or (values=True)
        not finite in the build's dtype.  Metadata entries of a netc train file ('__meta__/',
        '__optim__/') get one line pointing to load_weights."""
        from .weights import state_problems

        return state_problems({k: v.shape for k, v in {**self.params, **self.buffers}.items()}, state, self.dtype,
                              values)

    def misfit(self, problems: list[str]) -> WeightsError:
        """The error for `state_problems`: one line for one problem, else one line each."""
        head = f"weights do not fit network '{self.name}':"
        return WeightsError(f"{head} {problems[0]}" if len(problems) == 1 else "\n  ".join([head, *problems]))

    @_locked
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Strict: every name present, none extra, shapes equal; values must be real and
        finite in the build's dtype.  Files written by netc train: `load_weights`."""
        problems = self.state_problems(state)
        if problems:
            raise self.misfit(problems)
        expected = {**self.params, **self.buffers}
        for k, v in state.items():
            expected[k][...] = np.asarray(v, dtype=self.dtype)

    # ---- files written by netc train -------------------------------------------------------
    @_locked
    def load_weights(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load a weights.npz or checkpoint.npz written by `netc train` (or `save_weights`):
        strict names and shapes, checked from the file's headers before anything is read;
        values finite in the build's dtype.  Sets the input normalisation `predict` applies,
        as netc eval/predict find it (stored in the file, else normalization.json next to
        it, else the spec's train: section), and `class_names`.  Returns
        {'mean', 'std', 'pad', 'source', 'class_names'}.  Raises `WeightsError` and then
        changes nothing."""
        from . import weights as W

        state, raw, _ = W.split(W.read_for(self, path))
        meta = W.read_meta(raw, path, self.network.num_classes)
        mean, std, source = W.normalisation(path, meta, self.network)
        W.apply_state(self, state, path)
        self.set_normalization(mean, std, meta.pad)
        self.class_names = meta.class_names
        return {**self.normalization, "source": source, "class_names": meta.class_names}

    @_locked
    def save_weights(self, path: str | os.PathLike) -> None:
        """Write parameters, buffers, the normalisation and class names to `path` (atomically)
        in the format netc train writes: `load_weights`, netc eval and netc predict read it."""
        from . import weights as W

        meta: dict[str, Any] = {"pad": np.bool_(self._norm_pad), "spec_hash": np.array(self.network.spec_hash)}
        if self._norm_mean is not None and self._norm_std is not None:
            meta.update(mean=np.asarray(self._norm_mean, np.float64), std=np.asarray(self._norm_std, np.float64))
        if self.class_names:
            meta["class_names"] = np.array(self.class_names)
        W.save_weights(path, self, meta)

    @_locked
    def set_normalization(self, mean: float | Sequence[float] | None = None,
                          std: float | Sequence[float] | None = None, pad: bool = False) -> None:
        """The input normalisation of `predict`: x = (pixels/255 - mean) / std (None: skip
        that step), each one number or a sequence of one per input channel (as torchvision's
        Normalize); pad=True zero-pads smaller images, centred, to the input size."""
        shape = self.network.input_shape
        values = []
        for what, v in (("mean", mean), ("std", std)):
            per_channel = isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) == 1
            items = list(v) if per_channel else [v]
            ok = v is None or (all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
                x, (bool, np.bool_)) and math.isfinite(x) and (what == "mean" or x > 0) for x in items)
                and (not per_channel or (len(shape) == 3 and len(items) == shape[0])))
            if not ok:
                each = f" (one per channel: {shape[0]})" if len(shape) == 3 else ""
                raise ValueError(f"normalisation {what} must be a finite number{' > 0' if what == 'std' else ''}, "
                                 f"a list of them{each} or None, got {v!r}")
            values.append(None if v is None else [float(x) for x in items] if per_channel else float(v))
        self._norm_mean, self._norm_std = values
        self._norm_pad = bool(pad)

    @property
    def normalization(self) -> dict[str, Any]:
        """{'mean', 'std', 'pad'} as `predict` applies them (see `set_normalization`)."""
        return {"mean": self._norm_mean, "std": self._norm_std, "pad": self._norm_pad}

    def prepare(self, images: Any, what: str = "images") -> np.ndarray:
        """Images as netc predict takes them -> the checked network input: one image
        (input shape, or (H, W) for one channel) or a batch; uint8 (and other integer
        arrays in 0..255) divided by 255, float arrays taken on the 0..1 scale (a warning
        when they are not); then the normalisation and padding of `normalization`."""
        from .data import images_batch
        from .train import to_inputs

        x = images_batch(images, tuple(self.network.input_shape), what)
        n = self.normalization
        return self.check_x(to_inputs(self.network, x, n["mean"], n["std"], n["pad"], self.dtype.name), what)

    @_locked
    def predict(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Evaluation-mode outputs of images prepared by `prepare` (the stored normalisation
        applied): class probabilities (softmax of the logits, rows sum to 1) for a
        cross_entropy network, the raw outputs for mse; shape (N, classes), N = 1 for one
        image.  `forward` is the raw call: network inputs in, logits out."""
        from .train import predict_outputs, softmax

        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        out = predict_outputs(self, self.prepare(images), int(batch_size))
        return softmax(out) if self.network.loss == "cross_entropy" else out

    # ---- optimizer ---------------------------------------------------------------------
    @_locked
    def set_optimizer(self, kind: str = "adam", lr: float = 1e-3, momentum: float = 0.9,
                      weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                      eps: float = 1e-8, nesterov: bool = False, clip_grad_norm: float = 0.0) -> None:
        """sgd: torch.optim.SGD without momentum; momentum: torch.optim.SGD with `momentum` (both
        add weight_decay * p to the gradient; nesterov=True as torch's, momentum only); adam and
        adamw, two names of one optimizer: torch.optim.AdamW (decoupled decay: p *= 1 - lr *
        weight_decay, then the Adam step).  clip_grad_norm > 0 scales the gradients first as
        torch.nn.utils.clip_grad_norm_(trainable parameters, clip_grad_norm) (0: no clipping)."""
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
        lr, momentum, weight_decay, eps, clip_grad_norm = (optimizer_value(w, v) for w, v in (
            ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps),
            ("clip_grad_norm", clip_grad_norm)))
        if nesterov and not (kind == "momentum" and momentum > 0):
            raise ValueError("nesterov needs optimizer 'momentum' with momentum > 0 (as torch.optim.SGD)")
        betas = (optimizer_value("beta1", betas[0], below=1.0), optimizer_value("beta2", betas[1], below=1.0))
        if getattr(self, "optimizer", kind) != kind:
            self.reset_optimizer()  # another optimizer's moments are not this one's state
        o = self._optim
        o.kind = 1 if kind in ("adam", "adamw") else 0
        o.lr, o.weight_decay, o.eps = float(lr), float(weight_decay), float(eps)
        o.momentum = float(momentum) if kind == "momentum" else 0.0
        o.beta1, o.beta2 = float(betas[0]), float(betas[1])
        o.nesterov, o.clip_norm = int(bool(nesterov)), float(clip_grad_norm)
        self.optimizer = kind

    @_locked
    def freeze(self, layers: Any = ()) -> None:
        """Keep the parameters of these layers (names) fixed: no update, no weight decay, no
        optimizer state change, and left out of clip_grad_norm (as requires_grad=False in torch;
        batch-norm running statistics still update in training mode, as there).  () unfreezes."""
        names = [str(n) for n in layers]
        known = [l.name for l in self.network.layers]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"no layer {', '.join(repr(n) for n in unknown)} in network '{self.name}' "
                             f"(layers: {', '.join(known)})")
        frozen = {f"{l.name}.{k}" for l in self.network.layers if l.name in names for k in l.param_shapes()}
        ranges: list[int] = []
        for t in sorted(self.plan.params, key=lambda t: t.offset):
            if t.name in frozen:
                continue
            if ranges and ranges[-1] == t.offset:
                ranges[-1] = t.offset + t.size
            else:
                ranges += [t.offset, t.offset + t.size]
        self.frozen = [n for n in known if n in names]
        self._ranges = np.array(ranges or [0, 0], np.int64)
        o = self._optim
        o.ranges = self._ffi.NULL if not frozen else self._ffi.cast("int64_t *", self._ranges.ctypes.data)
        o.nranges = len(ranges) // 2

    @_locked
    def set_label_smoothing(self, eps: float) -> None:
        """cross_entropy against (1 - eps) one-hot + eps / classes, as torch's CrossEntropyLoss(label_smoothing)."""
        eps = optimizer_value("label_smoothing", eps)
        if eps > 1 or (eps and self.network.loss != "cross_entropy"):
            raise ValueError(f"label smoothing must be in [0, 1] and needs loss cross_entropy, got {eps}")
        self._ctx.label_smoothing = eps

    @_locked
    def set_augment(self, shift: int = 0, hflip: bool = False, erase: float = 0.0,
                    fill: float | Sequence[float] = 0.0, seed: int = 0, epoch: int = 0) -> None:
        """Augment training inputs in C (training forwards only): a random shift by up to `shift`
        pixels (`fill` outside: one value, or one per input channel), a left-right flip with
        probability 1/2, and with probability `erase` a zeroed rectangle (torchvision
        RandomErasing's defaults), each drawn from (seed, epoch, sample row), so any chunking
        or resume draws the same."""
        if (shift or hflip or erase) and len(self.network.input_shape) != 3:
            raise ValueError("augmentation needs an image input (C, H, W)")
        h, w = self.network.input_shape[1:] if len(self.network.input_shape) == 3 else (1, 1)
        if not (isinstance(shift, (int, np.integer)) and 0 <= shift < min(h, w)):
            raise ValueError(f"augment shift must be an integer in 0..{min(h, w) - 1}, got {shift!r}")
        if not (0 <= erase <= 1):
            raise ValueError(f"augment erase must be a probability in [0, 1], got {erase!r}")
        c = self._ctx
        channels = len(c.aug_fill)
        fills = np.broadcast_to(np.asarray(fill, np.float64), (channels,)) if np.ndim(fill) == 0 or (
            np.ndim(fill) == 1 and len(fill) == channels) else None
        if fills is None or not np.all(np.isfinite(fills)):
            raise ValueError(f"augment fill must be a finite number or one per channel ({channels}), got {fill!r}")
        c.aug_shift, c.aug_hflip, c.aug_erase = int(shift), int(bool(hflip)), float(erase)
        for ch in range(channels):
            c.aug_fill[ch] = float(fills[ch])
        c.aug_seed, c.aug_epoch = int(seed) & (2**64 - 1), int(epoch)

    @_locked
    def reset_optimizer(self) -> None:
        self._opt_m[:] = 0
        self._opt_v[:] = 0
        self._optim.step = 0

    @property
    def lr(self) -> float:
        return self._optim.lr

    @lr.setter
    @_locked
    def lr(self, value: float) -> None:
        self._optim.lr = optimizer_value("lr", value)

    @property
    def optimizer_shape(self) -> tuple[int]:
        """The shape of the moments `optimizer_state` returns: every parameter's, back to back in
        plan order (without the gaps that align each in memory, which depend on the vector width
        of the build), so a checkpoint resumes on any target."""
        return (max(self.plan.net.total_params, 1),)

    def _pack(self, flat: np.ndarray) -> np.ndarray:
        out = np.zeros(self.optimizer_shape, flat.dtype)
        at = 0
        for t in self.plan.params:
            out[at:at + t.size] = flat[t.offset:t.offset + t.size]
            at += t.size
        return out

    def _unpack(self, packed: np.ndarray, flat: np.ndarray) -> None:
        at = 0
        for t in self.plan.params:
            flat[t.offset:t.offset + t.size] = packed[at:at + t.size]
            at += t.size

    @_locked
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's moments (packed: `optimizer_shape`), step count and dropout stream."""
        return {"step": np.array(self._optim.step, np.int64), "m": self._pack(self._opt_m),
                "v": self._pack(self._opt_v),
                "dropout_seed": np.array(self._ctx.seed, np.uint64),
                "dropout_counter": np.array(self._ctx.counter, np.uint64)}

    @_locked
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """What `optimizer_state` returned; every entry is checked (KeyError when one is missing)."""
        for k in ("m", "v"):
            a = np.asarray(state[k])
            if a.shape != self.optimizer_shape:
                raise WeightsError(f"optimizer state '{k}' has shape {a.shape}, expected {self.optimizer_shape}")
            if a.dtype.kind not in "fiu" or not np.all(np.abs(a) <= np.finfo(self.dtype).max):
                raise WeightsError(f"optimizer state '{k}' must hold real numbers finite in {self.dtype}")
        ints = {}
        for k, top in (("step", 2**63 - 1), ("dropout_seed", 2**64 - 1), ("dropout_counter", 2**64 - 1)):
            a = np.asarray(state[k])
            if a.shape != () or a.dtype.kind not in "iu" or not 0 <= int(a) <= top:
                raise WeightsError(f"optimizer state '{k}' must be one integer in 0..{top}, got {a.dtype} "
                                   f"{a.shape}")
            ints[k] = int(a)
        self._unpack(np.asarray(state["m"]), self._opt_m)
        self._unpack(np.asarray(state["v"]), self._opt_v)
        self._optim.step = ints["step"]
        self._ctx.seed = ints["dropout_seed"]
        self._ctx.counter = ints["dropout_counter"]

    # ---- checks --------------------------------------------------------------------------
    def check_x(self, x: Any, what: str = "x") -> np.ndarray:
        """(N, *input_shape) real array -> C-contiguous array of the build's dtype."""
        if (type(x) is np.ndarray and x.dtype == self.dtype and x.flags.c_contiguous
                and x.shape[1:] == self._in_shape and 1 <= x.shape[0] <= MAX_BATCH):
            return x  # already checked: the common case, kept cheap for batch-1 calls
        arr = np.asarray(x)
        shape = self.network.input_shape
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{what} must be a real-valued array (it is converted to {self.dtype}), "
                             f"got dtype {arr.dtype}")
        if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != tuple(shape):
            raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape))}) for network "
                             f"'{self.name}', got {arr.shape}")
        if not 1 <= arr.shape[0] <= MAX_BATCH:
            raise ValueError(f"{what} must hold at least one sample, got {arr.shape[0]}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def check_y(self, y: Any, n: int) -> np.ndarray:
        if self.network.loss == "cross_entropy":
            arr = np.asarray(y)
            if arr.dtype.kind not in "iu":
                raise ValueError(f"labels must be an integer array, got dtype {arr.dtype}")
            if arr.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
            k = self.network.num_classes
            if n and (arr.min() < 0 or arr.max() >= k):
                bad = arr[(arr < 0) | (arr >= k)][0]
                raise ValueError(f"labels must be in 0..{k - 1} for network '{self.name}', found {bad}")
            return np.ascontiguousarray(arr, dtype=np.int32)
        arr = np.asarray(y)
        out = self.network.output_shape
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"targets must be a real-valued array, got dtype {arr.dtype}")
        if arr.shape != (n, *out):
            raise ValueError(f"targets must have shape ({n}, {', '.join(map(str, out))}), got {arr.shape}")
        if self.network.loss == "binary_cross_entropy" and arr.size and not np.all((arr >= 0) & (arr <= 1)):
            bad = arr[~((arr >= 0) & (arr <= 1))].flat[0]
            raise ValueError(f"targets must be in [0, 1] for loss binary_cross_entropy, found {bad}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def check_training_batch(self, n: int) -> None:
        """ValueError when a batch of n samples cannot be trained on (batch norm needs more
        than one value per channel)."""
        for layer in self.network.layers:
            if layer.kind.batch_stats(layer) and n * math.prod(layer.in_shape[1:]) < 2:
                maps = f" with {'x'.join(map(str, layer.in_shape[1:]))} maps" if len(layer.in_shape) > 1 else ""
                raise ValueError(f"{layer.where()} needs more than one value per channel in training "
                                 f"(batch of {n}{maps})")

    def _ptr(self, arr: np.ndarray, ctype: str):
        """A pointer to C-contiguous arr for a `ctype *` argument.  ffi.from_buffer is several
        times cheaper than casting arr.ctypes.data (it matters at batch 1) and keeps arr
        alive as long as the pointer."""
        return self._ffi.from_buffer(ctype + "[]", arr)

    def _real_ptr(self, arr: np.ndarray):
        return self._ptr(arr, self._real_t)

    def _y_ptr(self, arr: np.ndarray):
        return self._ptr(arr, "int32_t" if arr.dtype == np.int32 else self._real_t)

    def _outputs(self, n: int) -> np.ndarray:
        out = self._out_view[:n].copy()
        return out if self._flat_output else out.reshape(n, *self.network.output_shape)

    # ---- compute -------------------------------------------------------------------------
    def _forward(self, x: np.ndarray, training: bool) -> int:
        n = x.shape[0]
        if n > self._capacity:
            self._reserve(n)
        # from_buffer inline rather than through _real_ptr: batch-1 inference feels each call
        rc = self._c.forward(self._ctx, self._ffi.from_buffer(self._real_t + "[]", x), self._ffi.NULL, n,
                             int(training))
        if rc != 0:  # pragma: no cover - sizes are checked above
            raise RuntimeError(f"{self.name}_forward returned {rc}")
        return n

    def forward(self, x: Any) -> np.ndarray:
        """Evaluation-mode forward: (N, *input_shape) -> (N, *output_shape) outputs (logits)."""
        self._lock.acquire()  # fastcall's call releases the GIL, as cffi's does; cheaper than `with`
        try:
            if self._fast_forward is not None and (out := self._fast_forward(x)) is not None:
                return out  # fastcall.c: an array check_x would pass as it is, checked and run in C
            x = self.check_x(x)
            return self._outputs(self._forward(x, training=False))
        finally:
            self._lock.release()

    def __call__(self, x: Any) -> np.ndarray:
        return self.forward(x)

    @_locked
    def loss_and_grad(self, x: Any, y: Any) -> tuple[float, dict[str, np.ndarray]]:
        """Training-mode forward (dropout, batch statistics) + loss + backward.
        Returns the mean loss and the gradients by parameter name; nothing is updated but
        batch-norm running statistics (as in PyTorch's train mode)."""
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        self.check_training_batch(x.shape[0])
        n = self._forward(x, training=True)
        self._c.zero_grad(self._ctx)
        loss = self._c.backward(self._ctx, self._y_ptr(y), self._ffi.NULL, n)
        grads = {t.name: self._grads[t.offset:t.offset + t.size].reshape(t.shape).copy() for t in self.plan.params}
        return float(loss), grads

    @_locked
    def train_step(self, x: Any, y: Any) -> float:
        """One optimizer step on a batch (forward, loss, backward, update, all in C).
        A non-finite loss leaves the parameters untouched and is returned as is."""
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        self.check_training_batch(x.shape[0])
        self._reserve(x.shape[0])
        return float(self._c.train_step(
            self._ctx, self._real_ptr(x), self._y_ptr(y), self._ffi.NULL, x.shape[0], self._optim))

    @_locked
    def train_batches(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int,
                      lrs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Train on rows `order` of x/y in batches, in one C call.  x and y are checked like
        everywhere (pass arrays from check_x/check_y to avoid a copy per call).  `lrs`: the
        learning rate of each batch (None: `lr` throughout; given, `lr` ends as the last one
        used).  Returns per-batch losses and correct counts, up to and including a batch whose
        loss was not finite (that batch's update is skipped)."""
        order = np.ascontiguousarray(order, dtype=np.int64)
        if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= x.shape[0])):
            raise ValueError("order must be a 1-D array of row indices into x")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        x = self.check_x(x)  # no copy when x is already checked
        y = self.check_y(y, x.shape[0])
        batch_size = int(min(batch_size, max(order.size, 1)))
        self.check_training_batch(order.size % batch_size or batch_size)  # the smallest batch
        self._reserve(batch_size)
        nb = -(-order.size // batch_size)
        losses = np.zeros(nb, np.float64)
        correct = np.zeros(nb, np.int64)
        lr_ptr = self._ffi.NULL
        if lrs is not None:
            lrs = np.ascontiguousarray(lrs, np.float64)
            if lrs.shape != (nb,) or not (np.all(np.isfinite(lrs)) and np.all(lrs >= 0)):
                raise ValueError(f"lrs must hold {nb} finite numbers >= 0 (one per batch), got shape {lrs.shape}")
            lr_ptr = self._ptr(lrs, "double")
        done = self._c.train_batches(
            self._ctx, self._real_ptr(x), self._y_ptr(y), self._ptr(order, "int64_t"), order.size, batch_size,
            self._optim, lr_ptr, self._ptr(losses, "double"), self._ptr(correct, "int64_t"))
        keep = done + 1 if done < nb else nb  # include the failing batch so callers can see it
        return losses[:keep], correct[:keep]

    @_locked
    def backward_batch(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[float, int]:
        """The first half of a training step on rows `rows` of x/y (checked like everywhere:
        pass arrays from check_x/check_y): zero_grad, training-mode forward, loss, backward.
        Leaves the gradient of the batch's mean loss in `grad_buffer` and updates nothing but
        batch-norm running statistics; `optimizer_step` is the second half.  Returns the mean
        loss and the correct predictions (0 for an mse network)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        if rows.ndim != 1 or not rows.size or rows.min() < 0 or rows.max() >= x.shape[0]:
            raise ValueError("rows must be a non-empty 1-D array of row indices into x")
        n = rows.size
        self.check_training_batch(n)
        self._reserve(n)
        idx = self._ptr(rows, "int64_t")
        self._forward_rows(x, idx, n)
        self._c.zero_grad(self._ctx)
        loss = float(self._c.backward(self._ctx, self._y_ptr(y), idx, n))
        if self.network.loss != "cross_entropy":
            return loss, 0
        return loss, int(np.count_nonzero(self._out_view[:n].argmax(axis=1) == y[rows]))

    def _forward_rows(self, x: np.ndarray, idx, n: int) -> None:
        rc = self._c.forward(self._ctx, self._real_ptr(x), idx, n, 1)
        if rc != 0:  # pragma: no cover - sizes are checked by the callers
            raise RuntimeError(f"{self.name}_forward returned {rc}")

    @_locked
    def optimizer_step(self) -> None:
        """One update of the parameters from `grad_buffer` (the optimizer of `set_optimizer`)."""
        self._c.optimizer_step(self._ctx, self._optim)

    @property
    def grad_buffer(self) -> np.ndarray:
        """The flat gradient array C accumulates into (plan order, as `flat_params`), followed by
        two spare slots that `backward_batch` leaves alone.  Writing it between
        `backward_batch` and `optimizer_step` changes the update."""
        return self._grad_ext

    @property
    def flat_params(self) -> np.ndarray:
        """All parameters as one array (the memory `params` views)."""
        return self._params

    @property
    def flat_buffers(self) -> np.ndarray:
        """All buffers (batch-norm running statistics) as one array (the memory `buffers` views)."""
        return self._buffers

    @property
    def step(self) -> int:
        return int(self._optim.step)
