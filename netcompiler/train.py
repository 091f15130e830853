"""`netc train`: the training loop, checkpoints, and evaluation metrics.

The loop keeps Python out of the hot path: the whole data set is converted once
(`Net.check_x` / `check_y`); each epoch draws one permutation from a seeded
`np.random.Generator` and hands slices of it ("chunks" of whole batches, sized to about
0.3 s of work) to `Net.train_batches`, which runs forward, loss, backward and the
optimizer step for every batch of the chunk in one C call.  Between chunks Python
updates the progress bar and notices Ctrl-C.

Batches are cut from the epoch's order, never from a chunk, so chunk sizes do not change
results: a run interrupted and resumed gives bit-for-bit the weights of an uninterrupted
run with the same seed and thread count.

Run directory (RUN_DIR, default runs/<spec name>), every file written atomically:

    spec.yaml            copy of the spec
    normalization.json   input normalisation: mean, std, where they came from, pad
    metrics.csv          one row per epoch (see METRICS_COLUMNS)
    weights.npz          latest weights (after the last completed epoch), with the
                         normalisation under '__meta__/' (see weights.py)
    best.npz             the same for the epoch of the lowest validation loss so far
    curves.png           with --plot: loss, accuracy and lr per epoch
    checkpoint.npz       weights + buffers + optimizer state + shuffling RNG state + epoch
                         and position in the epoch + spec hash + settings: what --resume needs
    .netc.lock           held (flock) by the one `netc train` that owns the directory; holds its pid

A run starts by removing the temporary files a killed run left while writing one of
these (fileio.remove_stale_temps: atomic_write's names only, never another file).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from . import recipe
from . import weights as W
from .check import TRAIN_KEYS, Network, load, train_value
from .data import Dataset, Norm, dataset_stats, load_dataset, norm_text, prepare_inputs, train_val_split
from .errors import DataError, NetcError, WeightsError
from .fileio import locked_directory, remove_stale_temps
from .progress import Progress, emit, fmt_seconds

METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s", "lr")
CHUNK_SECONDS = 0.3  # target duration of one train_batches call between progress updates
EVAL_BATCH = 256
CHECKPOINT_VERSION = 1
# A run is diverging when a chunk's mean loss exceeds DIVERGE_FACTOR times the session's first batch
# loss (the loss before any update of this session) and also a floor: for cross_entropy
# log(classes) + DIVERGE_MARGIN nats (that far above chance level is worse than a uniform guess),
# for mse DIVERGE_MARGIN (outputs all zero score 1/classes against one-hot targets).
DIVERGE_FACTOR = 10.0
DIVERGE_MARGIN = 1.0
# Settings that must not change when a run is resumed (they change the result).
# Train options beyond the optimizer's basics (recipe.py): spec train: keys and command-line options.
RECIPE_KEYS = ("lr_schedule", "step_size", "gamma", "milestones", "min_lr", "max_lr", "pct_start", "div_factor",
               "final_div_factor", "warmup_epochs", "nesterov", "label_smoothing", "clip_grad_norm", "patience",
               "augment")
FIXED_ON_RESUME = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "seed", "val_split", "limit",
                   "pad", "dtype", "mean", "std", "normalize", "init", "freeze", "target", "perturb",
                   *(k for k in RECIPE_KEYS if k != "patience"))


class TrainingDiverged(NetcError):
    """The loss became NaN or infinite."""


@dataclass
class TrainOptions:
    """What `netc train` was asked for.  None means "not given": the spec's `train:`
    section applies, then the defaults of `check.TRAIN_KEYS`."""

    spec: str
    data: str
    out: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    seed: int | None = None
    val_split: float | None = None
    limit: int | None = None
    pad: bool | None = None
    dtype: str | None = None
    threads: int | None = None
    resume: bool = False
    force: bool = False
    chunk_batches: int | None = None  # fixed chunk size (tests); None: adaptive
    lr_schedule: str | None = None
    step_size: int | None = None
    gamma: float | None = None
    milestones: list[int] | None = None
    min_lr: float | None = None
    max_lr: float | None = None
    pct_start: float | None = None
    div_factor: float | None = None
    final_div_factor: float | None = None
    warmup_epochs: int | None = None
    nesterov: bool | None = None
    label_smoothing: float | None = None
    clip_grad_norm: float | None = None
    patience: int | None = None
    augment: str | None = None
    normalize: str | None = None  # global | channel (one mean/std per input channel)
    init: str | None = None  # weights to start from (a fresh run only)
    freeze: list[str] | None = None  # layers whose parameters stay fixed
    plot: bool = False  # write curves.png
    target: str | None = None  # "labels" (default: the data's y) or "input" (reconstruct the input images)
    perturb: str | None = None  # perturb.parse_perturb text: applied once to the training and validation inputs


@dataclass
class ChunkInfo:
    """Passed to the `on_chunk` hook after every completed chunk."""

    epoch: int  # 1-based
    batches_done: int  # in this epoch
    batches: int
    samples_done: int
    chunks: int  # chunks completed in this session


@dataclass
class _Position:
    """Where training stands: everything a mid-epoch checkpoint records."""

    epoch: int  # 0-based index of the epoch in progress (== epochs done)
    pos: int = 0  # samples of the epoch's order already trained
    order: np.ndarray | None = None
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-batch mean losses so far
    correct: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0


# ---- settings ---------------------------------------------------------------------------
def resolve_settings(network: Network, opts: TrainOptions) -> dict[str, Any]:
    """Built-in defaults <- spec `train:` section <- command-line options."""
    s = {k: default for k, (_, default) in TRAIN_KEYS.items()}
    s.update(network.train)
    for k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "seed", "val_split",
              "normalize", *RECIPE_KEYS):
        if getattr(opts, k) is not None:
            s[k] = getattr(opts, k)
    s["init"] = str(opts.init) if opts.init else None
    s["freeze"] = list(opts.freeze or [])
    s["limit"] = opts.limit
    s["pad"] = bool(opts.pad)
    s["dtype"] = opts.dtype or "float32"
    s["target"] = opts.target or "labels"
    s["perturb"] = opts.perturb
    if s["target"] not in TARGETS:
        raise NetcError(f"--target must be one of {', '.join(TARGETS)}, got '{s['target']}'")
    if s["perturb"]:
        from .perturb import parse_perturb

        try:
            parse_perturb(s["perturb"])
        except ValueError as exc:
            raise NetcError(f"--perturb: {exc}") from None
    if s["normalize"] == "channel" and len(network.input_shape) != 3:
        raise NetcError(f"--normalize channel needs an image input (C, H, W); '{network.name}' takes "
                        f"{network.input_shape[0]} features")
    if not 0 <= s["val_split"] < 1:
        raise NetcError(f"--val-split must be in [0, 1), got {s['val_split']}")
    for k in ("lr", "momentum", "weight_decay"):
        if not (math.isfinite(s[k]) and s[k] >= 0):
            raise NetcError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {s[k]}")
    if s["milestones"] is not None:
        try:
            s["milestones"] = train_value("milestones", list(s["milestones"]))
        except ValueError as exc:
            raise NetcError(f"--milestones {exc}") from None
    problem = recipe.check_schedule(s)
    if problem:
        raise NetcError(problem)
    try:
        recipe.parse_augment(s["augment"])
    except ValueError as exc:
        raise NetcError(f"--augment: {exc}") from None
    if s["nesterov"] and not (s["optimizer"] == "momentum" and s["momentum"] > 0):
        raise NetcError("--nesterov needs --optimizer momentum with --momentum > 0 (as torch.optim.SGD)")
    if s["label_smoothing"] > 1 or (s["label_smoothing"] and network.loss != "cross_entropy"):
        raise NetcError(f"--label-smoothing must be in [0, 1] and needs loss cross_entropy, got {s['label_smoothing']}")
    return s


# ---- data -------------------------------------------------------------------------------
def to_inputs(network: Network, images: np.ndarray, mean: Norm | None, std: Norm | None, pad: bool,
              dtype: str) -> np.ndarray:
    """Images (N,H,W)/(N,C,H,W), uint8 or float -> the (N, *input) tensor of the network.
    A 1-D input ([features]) takes images of C*H*W == features, flattened."""
    shape = network.input_shape
    if len(shape) == 3:
        return prepare_inputs(images, shape, mean=mean, std=std, pad=pad, dtype=dtype)
    if images.ndim == 2 and images.shape[1] == shape[0]:  # (N, features) vectors
        images = images.reshape(len(images), 1, 1, shape[0])
    img = images.shape[1:] if images.ndim == 4 else (1, *images.shape[1:])
    if len(img) != 3 or math.prod(img) != shape[0]:
        raise DataError(f"data images are {'x'.join(map(str, img))} but the spec's input is {shape[0]} features "
                        f"(flattened images must have exactly {shape[0]} values)")
    x = prepare_inputs(images, tuple(img), mean=mean, std=std, pad=False, dtype=dtype)
    return x.reshape(len(x), shape[0])


TARGETS = ("labels", "input")  # --target: the data's y, or the input images themselves


def input_targets(network: Network, images: np.ndarray, pad: bool, dtype: str) -> np.ndarray:
    """--target input: images -> the targets of a network trained to reproduce its input: the
    clean images on the 0..1 scale (pixels / 255, padded as the inputs, not normalised)."""
    if tuple(network.output_shape) != tuple(network.input_shape):
        raise NetcError(f"--target input trains network '{network.name}' to reproduce its input "
                        f"({'x'.join(map(str, network.input_shape))}), but it outputs "
                        f"{'x'.join(map(str, network.output_shape))}")
    return to_inputs(network, images, None, None, pad, dtype)


def perturbed_images(images: np.ndarray, text: str, seed: int) -> np.ndarray:
    """--perturb on training data: seeded perturbed copies of images (perturb.py), 0..1 floats."""
    from .perturb import parse_perturb, perturb

    if images.ndim not in (3, 4):
        raise DataError(f"--perturb needs images (N, H, W) or (N, C, H, W); the data are {images.shape[1:]} "
                        f"per sample")
    return perturb(images, parse_perturb(text), seed)


def is_float_targets(y: np.ndarray) -> bool:
    """Whether the data's y holds float targets (N, *output) rather than class labels (N,)."""
    return y.ndim > 1


def to_targets(net, labels: np.ndarray, where: str) -> np.ndarray:
    """Integer class labels -> what the network's loss takes (labels, or one-hot targets for mse
    and binary_cross_entropy); float targets (N, *output shape; (N, H, W) for an output of one
    channel) -> the checked target tensor."""
    network = net.network
    if is_float_targets(labels):
        out = tuple(network.output_shape)
        per = tuple(labels.shape[1:])
        if network.loss == "cross_entropy":
            raise DataError(f"{where}: float targets need loss mse or binary_cross_entropy; network "
                            f"'{network.name}' uses cross_entropy, which takes class labels (N,)")
        if per != out and not (len(out) == 3 and out[0] == 1 and per == out[1:]):
            raise DataError(f"{where}: targets are {'x'.join(map(str, per))} per sample, but network "
                            f"'{network.name}' outputs {'x'.join(map(str, out))}")
        try:
            return net.check_y(labels.reshape(len(labels), *out), len(labels))
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
    k = network.num_classes
    if labels.size and labels.max() >= k:
        raise DataError(f"{where}: labels go up to {labels.max()}, but network '{network.name}' has {k} outputs "
                        f"(classes 0..{k - 1})")
    if network.loss == "cross_entropy":
        return net.check_y(labels, len(labels))
    if len(network.output_shape) != 1:
        raise DataError(f"network '{network.name}' uses loss {network.loss} with output {network.output_shape}; "
                        f"training on labelled images needs a 1-D output with one value per class (one-hot targets)")
    onehot = np.zeros((len(labels), k), net.dtype)
    onehot[np.arange(len(labels)), labels] = 1
    return net.check_y(onehot, len(labels))


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr((x.shape, str(x.dtype), y.shape)).encode())
    h.update(np.ascontiguousarray(y).tobytes())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


# ---- evaluation -------------------------------------------------------------------------
def predict_outputs(net, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Evaluation-mode outputs of every row of `x` (already a checked input tensor)."""
    outs = [net.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).reshape(len(x), -1) if outs else np.zeros((0, net.network.num_classes))


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss_of(loss: str, outputs: np.ndarray, labels: np.ndarray) -> float:
    """Mean loss, as the C code computes it (cross-entropy of logits, or mse or binary cross-entropy
    of logits vs one-hot, or vs float targets (N, ...) of the outputs' size)."""
    z = np.asarray(outputs, np.float64)
    if len(z) == 0:
        return float("nan")
    if loss == "cross_entropy":
        m = z.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(lse - z[np.arange(len(z)), labels]))
    if is_float_targets(np.asarray(labels)):
        onehot = np.asarray(labels, np.float64).reshape(z.shape)
    else:
        onehot = np.zeros_like(z)
        onehot[np.arange(len(z)), labels] = 1
    if loss == "binary_cross_entropy":
        return float(np.mean(np.maximum(z, 0) - z * onehot + np.log1p(np.exp(-np.abs(z)))))
    return float(np.mean((z - onehot) ** 2))


def classification_metrics(outputs: np.ndarray, labels: np.ndarray, loss: str, num_classes: int,
                           class_names: list[str] | None = None) -> dict[str, Any]:
    """Loss, accuracy, top-2 accuracy, per-class accuracy and the confusion matrix
    (rows: true class, columns: predicted class)."""
    z = np.asarray(outputs, np.float64)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    pred = z.argmax(axis=1) if n else np.zeros(0, np.int64)
    k2 = min(2, z.shape[1])
    top2 = np.argsort(-z, axis=1, kind="stable")[:, :k2] if n else np.zeros((0, k2), np.int64)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = []
    for c in range(num_classes):
        count = int(confusion[c].sum())
        per_class.append({"class": c, "name": class_names[c] if class_names and c < len(class_names) else None,
                          "count": count, "correct": int(confusion[c, c]),
                          "accuracy": float(confusion[c, c] / count) if count else None})
    return {
        "samples": n,
        "loss": loss_of(loss, z, labels),
        "accuracy": float((pred == labels).mean()) if n else float("nan"),
        "top2_accuracy": float((top2 == labels[:, None]).any(axis=1).mean()) if n else float("nan"),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names) if class_names else None,
    }


def mean_loss(batch_losses: np.ndarray, samples: int, batch_size: int) -> float:
    """Mean loss over `samples` from per-batch mean losses (every batch full but the last).
    Computed from the whole array, so the result does not depend on how batches were chunked."""
    sizes = np.full(len(batch_losses), batch_size, np.float64)
    sizes[-1] = samples - batch_size * (len(batch_losses) - 1)
    return float(np.dot(batch_losses, sizes) / samples)


def _percent(v: float) -> str:
    return f"{100 * v:.2f}%" if math.isfinite(v) else "-"


def _accuracy_loss(net, x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    z = predict_outputs(net, x)
    acc = float((z.argmax(axis=1) == labels).mean()) if len(z) and not is_float_targets(labels) else float("nan")
    return loss_of(net.network.loss, z, labels), acc


# ---- run directory ----------------------------------------------------------------------
def write_metrics(path: Path, history: list[list[float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for row in history:
        w.writerow([int(row[0])] + [("" if not math.isfinite(v) else f"{v:.6g}") for v in row[1:]])
    W.atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else float("nan")) for k, v in row.items()} for row in csv.DictReader(f)]


class _CtrlC:
    """First Ctrl-C: ask the loop to stop at the next chunk boundary.  Second: abort now."""

    def __init__(self, err: TextIO):
        self.err, self.requested, self.old = err, False, None

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C is not ours to handle
            self.old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nnetc: stopping after the current chunk of batches (Ctrl-C again to abort at once)",
              file=self.err, flush=True)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


# ---- the run ----------------------------------------------------------------------------
RUN_FILES = ("spec.yaml", "normalization.json", "metrics.csv", "weights.npz", "checkpoint.npz", "best.npz",
             "curves.png")


class Run:
    """One `netc train` session (a fresh run or a resumed one)."""

    ranks = 1  # processes training the run together (distributed.DistributedRun)

    def __init__(self, opts: TrainOptions, out: TextIO | None = None, err: TextIO | None = None,
                 on_chunk: Callable[[ChunkInfo], None] | None = None, progress: bool | None = None):
        self.opts, self.on_chunk = opts, on_chunk
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.progress = progress
        self.network = load(opts.spec)
        self.run_dir = Path(opts.out) if opts.out else Path("runs") / self.network.name
        self.ckpt_path = self.run_dir / "checkpoint.npz"
        self.weights_path = self.run_dir / "weights.npz"
        self.best_path = self.run_dir / "best.npz"
        self.metrics_path = self.run_dir / "metrics.csv"
        self.classify = self.network.loss == "cross_entropy"  # C counts correct predictions only then
        self._start_loss: float | None = None  # the session's first batch loss
        self._warned = False  # about a diverging loss

    def say(self, text: str) -> None:
        emit(text, self.out)

    # ---- setup ----
    def _settings(self) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
        opts = self.opts
        if not opts.resume:
            if self.ckpt_path.exists() and not opts.force:
                raise NetcError(f"{self.run_dir} already holds a checkpoint: pass --resume to continue that run, "
                                f"--force to start afresh and replace it, or --out to train elsewhere")
            return resolve_settings(self.network, opts), None
        if not self.ckpt_path.exists():
            raise NetcError(f"--resume: no checkpoint {self.ckpt_path} (train without --resume first)")
        arrays = W.load_npz(self.ckpt_path, "checkpoint", cap=W.network_cap(self.network))  # names, shapes: _restore
        meta = W.split(arrays)[1]
        saved_hash = W.meta_str(meta, "spec_hash")
        if saved_hash != self.network.spec_hash:
            raise NetcError(f"--resume: {self.ckpt_path} was written for a different spec (spec hash {saved_hash}, "
                            f"{opts.spec} has {self.network.spec_hash}); the spec must not change within a run: "
                            f"use --force to start afresh or --out for a new run directory")
        settings = W.check_settings(W.from_json_array(meta, "settings", self.ckpt_path), self.ckpt_path)
        asked = resolve_settings(self.network, opts)
        given = {k for k in FIXED_ON_RESUME if getattr(opts, k, None) is not None}
        clashes = [f"--{k.replace('_', '-')} {asked[k]} (the run used {settings[k]})" for k in sorted(given)
                   if asked[k] != settings[k]]
        if clashes:
            raise NetcError("--resume continues a run with its own settings; these options differ: " +
                            ", ".join(clashes) + " (use --out for a new run)")
        if opts.epochs is not None:
            settings["epochs"] = opts.epochs
        return settings, arrays

    def _data(self, s: dict[str, Any]) -> None:
        ds: Dataset = load_dataset(self.opts.data)
        self.class_names = ds.class_names
        x, y, test_y = ds.train_x, ds.train_y, ds.test_y
        if s.get("target", "labels") == "input":  # the clean images are the targets (converted in setup)
            y, test_y = x, ds.test_x
            self.class_names = None
        if s["limit"]:
            x, y = x[:s["limit"]], y[:s["limit"]]
        if s["val_split"] > 0:
            if len(x) < 2:
                raise DataError(f"{self.opts.data}: --val-split needs at least 2 training images, got {len(x)}")
            x, y, vx, vy = train_val_split(x, y, s["val_split"], s["seed"])
            self.val_name = "val"
            self.val_desc = f"a validation split of {len(vx)} training images ({100 * s['val_split']:g}%)"
        elif len(ds.test_x):
            vx, vy = ds.test_x, test_y
            self.val_name = "test"
            self.val_desc = f"the test set ({len(vx)} images)"
        else:
            vx = vy = None
            self.val_name, self.val_desc = "val", "nothing (the data has no test set; use --val-split)"
        if s.get("perturb"):  # once, seeded: a denoising autoencoder's noisy inputs (targets stay clean)
            x = perturbed_images(x, s["perturb"], s["seed"])
            vx = perturbed_images(vx, s["perturb"], s["seed"] + 1) if vx is not None else None
        self.fingerprint = fingerprint(x, y)
        self.raw_train, self.raw_val = (x, y), (vx, vy)
        self.data_name = ds.name

    def _normalisation(self, s: dict[str, Any], init: dict[str, Any] | None) -> None:
        if "norm_source" in s:  # resuming: as recorded by the first session
            self.norm_source = s["norm_source"]
        elif s["mean"] is not None and s["std"] is not None:
            self.norm_source = "from the spec's train: section"
        elif init is not None and init["mean"] is not None and init["std"] is not None:
            s["mean"], s["std"] = (init[k] if s[k] is None else s[k] for k in ("mean", "std"))
            self.norm_source = f"from --init {s['init']}"
        else:
            mean, std = dataset_stats(self.raw_train[0], per_channel=s["normalize"] == "channel")
            std = [d if d > 0 else 1.0 for d in std] if isinstance(std, list) else (std if std > 0 else 1.0)
            s["mean"] = s["mean"] if s["mean"] is not None else mean
            s["std"] = s["std"] if s["std"] is not None else std
            per = " per channel" if s["normalize"] == "channel" else ""
            self.norm_source = f"computed{per} on the {len(self.raw_train[0])} training images"
        if not np.all(np.asarray(s["std"]) > 0):
            raise NetcError(f"normalisation std must be positive, got {s['std']}")
        s["norm_source"] = self.norm_source

    def setup(self) -> None:
        import netcompiler as nc

        s, arrays = self._settings()
        self.s = s
        self._data(s)
        net = nc.compile(self.network, dtype=s["dtype"], threads=self.opts.threads)
        self.net = net
        init = None
        if arrays is None and s["init"]:
            net.init(s["seed"])
            init = net.load_weights(s["init"])  # WeightsError: one line
            self._init_state = net.state_dict()
        self._normalisation(s, init)
        if arrays is not None:
            meta = W.split(arrays)[1]
            if W.meta_str(meta, "data_fingerprint") != self.fingerprint:
                raise NetcError(f"--resume: the training data differ from the run's (--data {self.opts.data}, "
                                f"--limit, --val-split must select the same images)")
        mean, std, pad, dt = s["mean"], s["std"], s["pad"], s["dtype"]
        tx, ty = self.raw_train
        self.X = net.check_x(to_inputs(self.network, tx, mean, std, pad, dt), "training images")
        self.Y = to_targets(net, self._targets(ty), f"{self.opts.data} (training {self._what})")
        vx, vy = self.raw_val
        if vx is not None:
            self.VX = net.check_x(to_inputs(self.network, vx, mean, std, pad, dt), "validation images")
            t = self._targets(vy)
            vt = to_targets(net, t, f"{self.opts.data} ({self.val_name} {self._what})")  # labels: range check
            self.vlabels = vt if is_float_targets(t) else vy  # labels stay labels (accuracy), one-hot or not
        else:
            self.VX = self.vlabels = None
        bs = int(s["batch_size"])
        n = len(self.X)
        self.n_used = n
        rem = n % bs
        if rem and not self._trainable(rem):  # e.g. batch-norm on a last batch of one sample: drop it, as drop_last
            self.n_used = n - rem
        if self.n_used == 0:
            raise DataError(f"{n} training images are too few for one training batch of this network")
        net.set_optimizer(s["optimizer"], lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"],
                          nesterov=s["nesterov"], clip_grad_norm=s["clip_grad_norm"])
        net.set_label_smoothing(s["label_smoothing"])
        try:
            net.freeze(s["freeze"])
        except ValueError as exc:
            raise NetcError(f"--freeze: {exc}") from None
        self.augment = recipe.parse_augment(s["augment"])
        if any(self.augment.values()) and len(self.network.input_shape) != 3:
            raise NetcError("--augment needs an image input (C, H, W); the spec's input is a vector")
        if s["patience"] and self.VX is None:
            raise NetcError("--patience needs validation data: the data has no test set; use --val-split")
        if arrays is None:
            net.init(s["seed"])
            if s["init"]:
                net.load_state_dict(self._init_state)
            net.seed(s["seed"])
            self.rng = np.random.default_rng(s["seed"])
            self.history: list[list[float]] = []
            self.position = _Position(0)
        else:
            self._restore(arrays)

    @property
    def _what(self) -> str:
        return "targets: the input images" if self.s["target"] == "input" else "labels"

    def _targets(self, y: np.ndarray) -> np.ndarray:
        """The data's labels or float targets; with --target input, the clean images."""
        return input_targets(self.network, y, self.s["pad"], self.s["dtype"]) if self.s["target"] == "input" else y

    def _trainable(self, n: int) -> bool:
        """Whether a batch of n samples can be trained on."""
        try:
            self.net.check_training_batch(n)
        except ValueError:
            return False
        return True

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        try:
            self._restore_unchecked(arrays)
        except WeightsError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise WeightsError(f"{self.ckpt_path}: damaged checkpoint ({type(exc).__name__}: {exc})") from None

    def _restore_unchecked(self, arrays: dict[str, np.ndarray]) -> None:
        state, meta, optim = W.split(arrays)
        path = self.ckpt_path
        W.read_meta(meta, path, self.network.num_classes)
        W.apply_state(self.net, state, path)
        try:
            self.net.load_optimizer_state(optim)
        except KeyError as exc:
            raise WeightsError(f"{path}: checkpoint lacks optimizer state {exc}") from None
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from None
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = W.from_json_array(meta, "rng", path)
        bs = self.s["batch_size"]
        pos = W.check_position(W.from_json_array(meta, "position", path), path, self.n_used, bs)
        self.history = W.check_history(W.from_json_array(meta, "history", path), path, len(METRICS_COLUMNS),
                                       pos["epoch"])
        order = meta.get("order")
        losses = meta.get("epoch_losses")
        if pos["pos"]:
            W.check_order(order, losses, path, len(self.X), self.n_used, -(-pos["pos"] // bs))
        self.position = _Position(pos["epoch"], pos["pos"], order if pos["pos"] else None,
                                  np.array(losses if pos["pos"] else [], np.float64), pos["correct"], pos["train_seconds"], pos["seconds"])
        saved_ranks = pos.get("ranks", 1)
        if saved_ranks != self.ranks:
            self.say(f"note: the run used {saved_ranks} process{'es' if saved_ranks != 1 else ''}, this session "
                     f"{self.ranks}: batch-norm statistics and dropout masks differ from an uninterrupted run")
        saved_threads = pos.get("threads")
        if saved_threads and saved_threads != self.net.threads and self.opts.threads is None:
            # no --threads: the run's own count, so the run continues exactly
            self.say(f"resuming on {saved_threads} thread{'s' if saved_threads > 1 else ''} as the run did "
                     f"(the default here now would be {self.net.threads}; --threads chooses)")
            self.net.threads = saved_threads
        elif saved_threads and saved_threads != self.net.threads:
            self.say(f"note: the run used {saved_threads} threads, this session {self.net.threads}: the gradient "
                     f"sums round differently, so the weights will drift from an uninterrupted run's (--threads "
                     f"{saved_threads} repeats it exactly)")

    # ---- files ----
    def _meta(self) -> dict[str, Any]:
        meta = {"mean": np.asarray(self.s["mean"], np.float64), "std": np.asarray(self.s["std"], np.float64),
                "pad": np.bool_(self.s["pad"]),
                "spec_hash": np.array(self.network.spec_hash), "epoch": np.int64(len(self.history))}
        if self.class_names:
            meta["class_names"] = np.array(self.class_names)
        return meta

    def save_checkpoint(self) -> None:
        p = self.position
        meta = self._meta()
        meta.update({
            "version": np.int64(CHECKPOINT_VERSION),
            "settings": W.json_array(self.s),
            "data_fingerprint": np.array(self.fingerprint),
            "rng": W.json_array(self.rng.bit_generator.state),
            "history": W.json_array(self.history),
            "position": W.json_array({"epoch": p.epoch, "pos": p.pos, "correct": int(p.correct),
                                      "train_seconds": p.train_seconds, "seconds": p.seconds,
                                      "threads": self.net.threads, "ranks": self.ranks}),
        })
        if p.pos:
            meta["order"] = p.order
            meta["epoch_losses"] = p.losses
        W.save_npz(self.ckpt_path, W.with_meta(self.net.state_dict(), meta, self.net.optimizer_state()))

    def write_static_files(self) -> None:
        if self.opts.force and not self.opts.resume:
            for p in (self.ckpt_path, self.weights_path, self.metrics_path, self.best_path,
                      self.run_dir / "curves.png"):
                p.unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        W.atomic_write_text(self.run_dir / "spec.yaml", self.network.source)
        W.atomic_write_text(self.run_dir / "normalization.json", json.dumps(
            {"mean": self.s["mean"], "std": self.s["std"], "source": self.norm_source, "pad": self.s["pad"],
             "formula": "x = (pixels / 255 - mean) / std"}, indent=2) + "\n")

    # ---- loop ----
    def run(self) -> dict[str, Any]:
        """The whole session owns the run directory: a second `netc train` on it is refused."""
        with locked_directory(self.run_dir, "netc train",
                              "wait for it to finish, or pass --out to train in another directory"):
            removed = remove_stale_temps(self.run_dir, RUN_FILES)
            if removed:
                print(f"netc: removed {', '.join(removed)} from {self.run_dir} (left by a run that was killed "
                      f"while writing)", file=self.err, flush=True)
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.setup()
        s, net = self.s, self.net
        self.write_static_files()
        self.say(f"{self.network.name}: {self.network.total_params:,} parameters, {s['dtype']}, "
                 f"{net.threads} thread{'s' if net.threads > 1 else ''}; {s['optimizer']} lr {s['lr']:g}"
                 + (f" momentum {s['momentum']:g}" if s["optimizer"] == "momentum" else "")
                 + (f" weight decay {s['weight_decay']:g}" if s["weight_decay"] else "")
                 + f", batch {s['batch_size']}, {s['epochs']} epochs, seed {s['seed']}")
        dropped = len(self.X) - self.n_used
        self.say(f"data: {self.data_name}: {len(self.X)} training images"
                 + (f" ({dropped} left out of each epoch: too few for a batch)" if dropped else "")
                 + (f", perturbed once ({s['perturb']})" if s["perturb"] else "")
                 + ("; targets: the clean input images" if s["target"] == "input" else "")
                 + f"; validating on {self.val_desc}")
        self.say(f"normalisation: {norm_text(s['mean'], s['std'])} ({self.norm_source})")
        p = self.position
        if self.opts.resume:
            where = f"epoch {p.epoch + 1}, sample {p.pos}/{self.n_used}" if p.pos else f"after epoch {p.epoch}"
            self.say(f"resuming {self.ckpt_path} {where}")
        self.say(f"run directory: {self.run_dir}")
        if p.epoch >= s["epochs"]:
            self.say(f"the run already trained {p.epoch} epochs; pass --epochs N (N > {p.epoch}) to train more")
            self._write_weights()
            return self._result()
        if self._early_stop() and p.pos == 0:
            self.say(f"the run stopped early after epoch {p.epoch} (--patience {s['patience']})")
            return self._result()
        self._chunk = self.opts.chunk_batches or 2
        self._consistent = True
        t_start = time.perf_counter()
        with _CtrlC(self.err) as ctrl_c:
            try:
                while p.epoch < s["epochs"] and not (p.pos == 0 and self._early_stop()):
                    self._epoch(ctrl_c)
                    stop, self._chunk = self._next_chunk(ctrl_c.requested, self._chunk)
                    if stop and p.epoch < s["epochs"]:  # pressed during validation
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self._interrupted()
                raise
        if self._early_stop():
            self.say(f"early stop: {self.val_name} loss has not improved for {s['patience']} epochs")
        best = self.best_epoch()
        if best is not None:
            self.say(f"best epoch {best + 1}: {self.val_name} loss {self.history[best][3]:.4f}; weights: {self.best_path}")
        if self.opts.plot:
            from .cli_train import plot_curves

            plot_curves(self.history, self.run_dir / "curves.png", f"{self.network.name}", self.val_name)
        last = self.history[-1] if self.history else None
        summary = f"done: {len(self.history)} epochs, this session {fmt_seconds(time.perf_counter() - t_start)}"
        if last is not None and math.isfinite(last[4]):
            summary += f"; {self.val_name} accuracy {100 * last[4]:.2f}%"
        self.say(summary + f"; weights: {self.weights_path}")
        return self._result()

    def _result(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "history": self.history, "settings": self.s}

    def _write_weights(self) -> None:
        W.save_weights(self.weights_path, self.net, self._meta())

    def best_epoch(self) -> int | None:
        """0-based index of the completed epoch with the lowest validation loss (the first such)."""
        losses = [row[3] for row in self.history]
        finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
        return min(finite, key=lambda i: losses[i]) if finite else None

    def _early_stop(self) -> bool:
        """--patience N: N epochs since the best validation loss (from the history: resume agrees)."""
        best = self.best_epoch()
        return bool(self.s["patience"]) and best is not None and len(self.history) - 1 - best >= self.s["patience"]

    def _epoch(self, ctrl_c: _CtrlC) -> None:
        s, net, p = self.s, self.net, self.position
        bs, n = int(s["batch_size"]), self.n_used
        nb = -(-n // bs)
        if p.pos == 0:
            p.order = self.rng.permutation(len(self.X))[:n]
            p.losses, p.correct, p.train_seconds, p.seconds = np.zeros(0), 0, 0.0, 0.0
        a = self.augment
        fill = -np.asarray(s["mean"], np.float64) / np.asarray(s["std"], np.float64)  # black, normalised
        net.set_augment(a["shift"], a["hflip"], a["erase"], fill=fill.tolist(), seed=s["seed"], epoch=p.epoch)
        scheduled = not recipe.constant(s)
        label = f"epoch {p.epoch + 1}/{s['epochs']}"
        bar = Progress(n, label, self.out, enabled=self.progress, start_done=p.pos)
        t_epoch = time.perf_counter() - p.seconds
        chunks = 0
        try:
            while p.pos < n:
                end = min(n, p.pos + self._chunk * bs)
                self._consistent = False
                t0 = time.perf_counter()
                lrs = recipe.lrs(s, p.epoch, p.pos // bs, -(-(end - p.pos) // bs), nb) if scheduled else None
                lo, co = self._train_batches(p.order[p.pos:end], bs, lrs)
                dt = time.perf_counter() - t0
                if len(lo) and not math.isfinite(lo[-1]):  # C skipped that batch's update and stopped
                    bar.close()
                    batch = p.pos // bs + len(lo)
                    raise TrainingDiverged(
                        f"training stopped: the loss is {lo[-1]} at epoch {p.epoch + 1}, batch {batch} of {nb} "
                        f"(that batch's update was skipped); {self._last_good()}; try a lower --lr")
                self._watch_divergence(lo, p.epoch + 1, p.pos // bs, nb, bar)
                p.losses = np.concatenate([p.losses, lo])
                p.correct += int(co.sum())
                p.train_seconds += dt
                p.pos = end
                self._consistent = True
                chunks += 1
                bar.update(p.pos, mean_loss(p.losses, p.pos, bs), p.correct / p.pos if self.classify else None)
                if self.on_chunk is not None:
                    self.on_chunk(ChunkInfo(p.epoch + 1, len(p.losses), nb, p.pos, chunks))
                chunk = self._chunk
                if self.opts.chunk_batches is None:
                    per_batch = dt / max(len(lo), 1)
                    chunk = int(min(max(CHUNK_SECONDS / max(per_batch, 1e-9), 1), 1 << 20))
                stop, self._chunk = self._next_chunk(ctrl_c.requested, chunk)
                if stop:
                    raise KeyboardInterrupt
        finally:
            bar.close()
            p.seconds = time.perf_counter() - t_epoch
        # the epoch is complete
        train_loss = mean_loss(p.losses, n, bs)
        train_acc = p.correct / n if self.classify else float("nan")
        if self.VX is not None:
            val_loss, val_acc = self._evaluate(self.VX, self.vlabels)
        else:
            val_loss = val_acc = float("nan")
        seconds = time.perf_counter() - t_epoch
        ips = n / p.train_seconds if p.train_seconds > 0 else float("nan")
        lr = float(recipe.lrs(s, p.epoch, 0, 1, nb)[0])  # the rate of the epoch's first batch
        self.history.append([p.epoch + 1, train_loss, train_acc, val_loss, val_acc, seconds, ips, lr])
        p.epoch += 1
        p.pos, p.order, p.losses, p.correct, p.train_seconds, p.seconds = 0, None, np.zeros(0), 0, 0.0, 0.0
        self._save_epoch()
        val = (f"{self.val_name} loss {val_loss:.4f} acc {_percent(val_acc)}" if math.isfinite(val_loss)
               else f"{self.val_name} -")
        self.say(f"epoch {p.epoch:>{len(str(s['epochs']))}}/{s['epochs']}: train loss {train_loss:.4f} "
                 f"acc {_percent(train_acc)} | {val} | {seconds:.1f} s, {ips:,.0f} img/s")

    # ---- what a data-parallel run (distributed.py) does otherwise ----
    def _train_batches(self, order: np.ndarray, bs: int, lrs: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Train on rows `order` in batches of bs (batch k at learning rate lrs[k]; None: the
        optimizer's): per-batch mean losses and correct counts."""
        return self.net.train_batches(self.X, self.Y, order, bs, lrs)

    def _next_chunk(self, stop: bool, chunk: int) -> tuple[bool, int]:
        """After a chunk: (stop now?, batches in the next chunk)."""
        return stop, chunk

    def _evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """(loss, accuracy) on the validation images."""
        return _accuracy_loss(self.net, x, labels)

    def _save_epoch(self) -> None:
        """At the end of each epoch: metrics.csv, weights.npz, best.npz (when this epoch's
        validation loss is the lowest), checkpoint.npz."""
        write_metrics(self.metrics_path, self.history)
        self._write_weights()
        if self.best_epoch() == self.position.epoch - 1:
            W.save_weights(self.best_path, self.net, self._meta())
        self.save_checkpoint()

    def diverging(self, chunk_losses: np.ndarray) -> bool:
        """Whether this chunk's mean loss is far past the session's starting loss (see DIVERGE_FACTOR)."""
        if not len(chunk_losses):
            return False
        if self._start_loss is None:
            self._start_loss = float(chunk_losses[0])
        mean = float(np.mean(chunk_losses))
        floor = DIVERGE_MARGIN + (math.log(self.network.num_classes) if self.classify else 0.0)
        return mean > DIVERGE_FACTOR * self._start_loss and mean > floor

    def _watch_divergence(self, lo: np.ndarray, epoch: int, first: int, nb: int, bar: Progress) -> None:
        """Warn once (stderr) when the loss grows far past its starting value; training goes on."""
        if self._warned or not self.diverging(lo):
            return
        self._warned = True
        bar.close()
        print(f"netc: warning: the loss is diverging: mean {np.mean(lo):.4g} over epoch {epoch}, batches "
              f"{first + 1}-{first + len(lo)} of {nb}, against {self._start_loss:.4g} at the start; the run goes on, "
              f"but try a lower --lr (this run: {self.s['lr']:g})", file=self.err, flush=True)

    def _last_good(self) -> str:
        if self.ckpt_path.exists():
            return f"the last good checkpoint is kept in {self.ckpt_path}"
        return "no checkpoint was written (no epoch completed)"

    def _interrupted(self) -> None:
        p = self.position
        if self._consistent:
            self.save_checkpoint()
            where = (f"at epoch {p.epoch + 1}, after sample {p.pos} of {self.n_used}" if p.pos
                     else f"after epoch {p.epoch}")
            print(f"netc: interrupted; checkpoint saved {where} in {self.ckpt_path}; continue with the same "
                  f"command and --resume", file=self.err, flush=True)
        else:
            print(f"netc: interrupted in the middle of a chunk; {self._last_good()}", file=self.err, flush=True)


def train(opts: TrainOptions, **kw) -> dict[str, Any]:
    """Run `netc train` with `opts`; returns {'run_dir', 'history', 'settings'}."""
    return Run(opts, **kw).run()
