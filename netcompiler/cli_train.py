"""`netc train`, `netc eval`, `netc predict`: training runs, evaluation, and class scores."""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from .check import NORMALIZE_MODES, OPTIMIZERS, SCHEDULES, TRAIN_KEYS, Network, load, train_value
from .cli import DTYPE_HELP, FORMAT_HELP, int_at_least
from .errors import DataError, NetcError
from .perturb import PERTURB_HELP
from .progress import emit
from .recipe import AUGMENT_HELP
from .runtime import MAX_THREADS, check_threads
from .train import TARGETS

NORMALISATION_HELP = (
    "Normalisation: inputs are pixels/255 (uint8 images), then (x - mean) / std.  netc train takes mean/std "
    "from the spec's train: section, else computes them on the training images (--normalize channel: one "
    "mean and std per input channel, as torchvision's Normalize); it records them in "
    "RUN_DIR/normalization.json and inside weights.npz and checkpoint.npz (as '__meta__/mean' and "
    "'__meta__/std'), where netc eval and netc predict find them.")
WEIGHTS_HELP = ("weights.npz or checkpoint.npz written by netc train (any .npz with the spec's parameter names "
                "and shapes).  Inputs are normalised with the mean/std stored inside WEIGHTS, else with those "
                "of normalization.json next to WEIGHTS, else with the spec's train: section, else not at all "
                "(how netc train records them: netc train --help)")
OPTIMIZER_HELP = (
    "sgd: torch.optim.SGD without momentum; momentum: torch.optim.SGD with --momentum; both add "
    "--weight-decay * p to the gradient (L2).  adam and adamw: two names of one optimizer, torch.optim.AdamW "
    "(betas 0.9, 0.999, eps 1e-8): weight decay decoupled, p *= 1 - lr * wd before each Adam step; that is "
    "not torch.optim.Adam, which adds the decay to the gradient (with --weight-decay 0 the two agree).  "
    "Default {}")
TARGET_HELP = ("what the outputs are trained towards: labels (default): the data's y, class labels (N,) or, in an "
               ".npz, float targets of the output's shape (N, *output; (N, H, W) for one channel), for loss mse or "
               "binary_cross_entropy; input: the input images themselves on the 0..1 scale (pixels/255, not "
               "normalised), for a network whose output has the input's shape (an autoencoder)")
THREADS_HELP = (f"threads of the C code, 1 to {MAX_THREADS} (default: the available cores, within any CPU quota, "
                "less those other processes keep busy when the run starts)")


def thread_count(text: str) -> int:
    """--threads N: the rule of Net.threads and compile(threads=) (runtime.check_threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
    try:
        return check_threads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def train_arg(key: str):
    """An argparse type for the train setting `key`: the text as a number, then the rule the
    spec's train: section and checkpoints use too (check.train_value)."""

    def parse(text: str):
        try:
            integer = TRAIN_KEYS[key][0] in ("int", "count")
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if integer else 'a number'}: '{text}'") from None
        try:
            return train_value(key, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _perturbations(text: str):
    from .perturb import parse_perturb

    try:
        return text, parse_perturb(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub) -> None:
    from .cli import positive_int

    d = {k: v for k, (_, v) in TRAIN_KEYS.items()}
    t = sub.add_parser(
        "train", help="train a spec on a data set; writes a run directory (metrics, weights, checkpoint)",
        description="Train SPEC on --data.  Options default to the spec's train: section, then to the built-in "
                    "defaults shown; options given here win.  A warning tells when the loss grows far past its "
                    "starting value (a diverging run: lower --lr).  " + NORMALISATION_HELP,
        epilog="RUN_DIR holds spec.yaml, normalization.json, metrics.csv (epoch, train_loss, train_acc, val_loss, "
               "val_acc, seconds, images_per_s, lr; seconds include validation, images/s counts training only, "
               "lr is the rate of the epoch's first batch), weights.npz (after the last completed epoch), best.npz "
               "(the epoch of lowest validation loss) and checkpoint.npz (all --resume needs).  Ctrl-C "
               "stops after the current chunk of batches and saves a checkpoint; --resume then continues with "
               "the run's own settings and gives the same weights as an uninterrupted run (same --threads).  "
               "Data-parallel on N processes, on one machine or many: mpirun -np N netc train SPEC --data SRC "
               "(or srun -n N ...; --distributed is then implied): --batch-size is the global batch, split "
               "across the ranks, and lr needs no change (the same global batch and seed give the "
               "single-process result up to rounding); batch norm uses per-rank statistics; rank 0 writes "
               "RUN_DIR; kill -USR1 <mpirun pid> stops at the next chunk with a checkpoint (--resume with the "
               "same N).  Needs mpi4py and an MPI library.")
    t.add_argument("spec", help="network spec (YAML)")
    t.add_argument("--data", required=True, metavar="SRC",
                   help="'fashion-mnist', a directory of MNIST-style IDX files, an .npz with x/y "
                        "(and x_test/y_test), a directory of x.npy/y.npy (and x_test.npy/y_test.npy), or an "
                        "image folder DIR/CLASS/*.png|jpg (or DIR/train/CLASS and DIR/test/CLASS; Pillow)")
    t.add_argument("--epochs", metavar="N", type=train_arg("epochs"), help=f"number of epochs (default {d['epochs']})")
    t.add_argument("--batch-size", metavar="N", type=train_arg("batch_size"),
                   help=f"samples per batch (default {d['batch_size']})")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help=OPTIMIZER_HELP.format(d["optimizer"]))
    t.add_argument("--lr", metavar="X", type=train_arg("lr"), help=f"learning rate (default {d['lr']:g})")
    t.add_argument("--momentum", metavar="X", type=train_arg("momentum"),
                   help=f"momentum of --optimizer momentum (default {d['momentum']})")
    t.add_argument("--weight-decay", metavar="X", type=train_arg("weight_decay"),
                   help=f"weight decay (default {d['weight_decay']})")
    t.add_argument("--seed", metavar="N", type=train_arg("seed"),
                   help=f"seed of initialisation, shuffling, dropout and --val-split (default {d['seed']})")
    t.add_argument("--val-split", type=train_arg("val_split"), metavar="F",
                   help="validate on this fraction of the training set (seeded); default: validate on the test set")
    t.add_argument("--threads", type=thread_count, metavar="N", help=THREADS_HELP)
    t.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<spec name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--force", action="store_true", help="start afresh even if RUN_DIR holds a checkpoint")
    t.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N training images")
    t.add_argument("--target", choices=TARGETS, help=TARGET_HELP)
    t.add_argument("--perturb", metavar="LIST",
                   help="perturb the training and validation images once (seeded by --seed), before normalisation; "
                        "with --target input the targets stay the clean images (a denoising autoencoder): "
                        + PERTURB_HELP)
    t.add_argument("--pad", action="store_true", default=None,
                   help="zero-pad images smaller than the spec's input (e.g. 28x28 -> 32x32)")
    t.add_argument("--dtype", choices=["float32", "float64"], help=DTYPE_HELP)
    t.add_argument("--normalize", choices=NORMALIZE_MODES,
                   help=f"global: one mean/std over all pixels; channel: one per input channel (colour "
                        f"images) (default {d['normalize']})")
    t.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    t.add_argument("--distributed", action="store_true",
                   help="one rank of a data-parallel run over MPI (implied under mpirun or srun with more than "
                        "one process): see below")
    r = t.add_argument_group("recipe", "schedules (torch.optim.lr_scheduler names and semantics), regularisation, "
                                       "early stopping, fine-tuning; also keys of the spec's train: section "
                                       "(lr_schedule, step_size, ..., augment: 'shift=2,hflip')")
    r.add_argument("--lr-schedule", choices=SCHEDULES,
                   help="step: StepLR; multistep: MultiStepLR; cosine: CosineAnnealingLR to --min-lr over the "
                        "epochs after warm-up (all stepped per epoch); onecycle: OneCycleLR stepped per batch "
                        "(momentum not cycled).  Default none.  metrics.csv records each epoch's lr")
    r.add_argument("--step-size", type=train_arg("step_size"), metavar="N", help="step: epochs between decays")
    r.add_argument("--gamma", type=train_arg("gamma"), metavar="X", help=f"step, multistep: decay factor ({d['gamma']})")
    r.add_argument("--milestones", type=positive_int, nargs="+", metavar="N",
                   help="multistep: epochs (counted after warm-up) at which lr is multiplied by --gamma")
    r.add_argument("--min-lr", type=train_arg("min_lr"), metavar="X", help="cosine: eta_min (0)")
    r.add_argument("--max-lr", type=train_arg("max_lr"), metavar="X", help="onecycle: max_lr (default --lr)")
    r.add_argument("--pct-start", type=train_arg("pct_start"), metavar="F", help="onecycle: pct_start (0.3)")
    r.add_argument("--div-factor", type=train_arg("div_factor"), metavar="X", help="onecycle: div_factor (25)")
    r.add_argument("--final-div-factor", type=train_arg("final_div_factor"), metavar="X", help="onecycle: final_div_factor (1e4)")
    r.add_argument("--warmup-epochs", type=train_arg("warmup_epochs"), metavar="N",
                   help="linear warm-up first: epoch e < N trains at lr (e+1)/(N+1) (LinearLR in SequentialLR)")
    r.add_argument("--nesterov", action="store_true", default=None,
                   help="Nesterov momentum (--optimizer momentum), as torch.optim.SGD(nesterov=True)")
    r.add_argument("--label-smoothing", type=train_arg("label_smoothing"), metavar="X",
                   help="cross_entropy with label smoothing, as torch's CrossEntropyLoss(label_smoothing) (0)")
    r.add_argument("--clip-grad-norm", type=train_arg("clip_grad_norm"), metavar="X",
                   help="scale gradients to global L2 norm <= X, as torch.nn.utils.clip_grad_norm_ (0: off)")
    r.add_argument("--augment", metavar="LIST", help="augment training images in C: " + AUGMENT_HELP)
    r.add_argument("--patience", type=train_arg("patience"), metavar="N",
                   help="stop when validation loss has not improved for N epochs.  Always: RUN_DIR/best.npz "
                        "holds the weights of the epoch of lowest validation loss")
    r.add_argument("--init", metavar="WEIGHTS", help="start from these weights (a .npz of the spec's parameters) "
                                                    "instead of a random initialisation; their normalisation too")
    r.add_argument("--freeze", nargs="+", metavar="LAYER",
                   help="layers whose parameters stay fixed (no update, decay or optimizer state)")
    r.add_argument("--plot", action="store_true", help="write RUN_DIR/curves.png (needs matplotlib)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="loss, accuracy, per-class accuracy and confusion matrix of weights on a data set",
                       description="Evaluate WEIGHTS on the test images of --data (or --split train).")
    _model_args(e)
    e.add_argument("--data", required=True, metavar="SRC", help="'fashion-mnist', an IDX directory or an .npz")
    e.add_argument("--split", choices=["test", "train"], default="test",
                   help="which part of the data set (default test)")
    e.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N images")
    e.add_argument("--target", choices=TARGETS, default="labels",
                   help="as for netc train; with float targets (or input) eval reports the loss only")
    e.add_argument("--format", choices=["text", "json"], default="text", help=FORMAT_HELP)
    e.add_argument("--plot", metavar="FILE.png", help="draw the confusion matrix (needs matplotlib)")
    e.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="images per forward call (256)")
    e.add_argument("--quantized", action="store_true",
                   help="also the int8 accuracy of `netc export --quantize int8` (its integer arithmetic, in numpy)")
    e.add_argument("--calibration", metavar="DATA",
                   help="with --quantized: calibration data as for netc export (default: --data)")
    e.add_argument("--calibration-images", type=positive_int, default=1000, metavar="N",
                   help="with --quantized: calibration images (default 1000, as netc export)")
    e.add_argument("--perturb", metavar="LIST", type=_perturbations,
                   help="also evaluate perturbed copies of the images and show both accuracies: " + PERTURB_HELP)
    e.add_argument("--seed", type=train_arg("seed"), default=0, metavar="N", help="seed of --perturb (0)")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="class probabilities for .npy arrays or PNG/JPEG images",
                       description="Print the top classes of each input.  FILE is an .npy array (one sample, "
                                   "e.g. (1,28,28) or (28,28), or a batch (N,1,28,28) or (N,28,28); uint8 "
                                   "pixels are divided by 255, float arrays are taken on the 0..1 scale) or a "
                                   "PNG/JPEG image (needs Pillow; converted to greyscale, or RGB for 3-channel "
                                   "specs, and resized to the spec's input).")
    _model_args(p)
    p.add_argument("files", nargs="+", metavar="FILE", help=".npy, .png, .jpg or .jpeg")
    p.add_argument("--top", type=positive_int, default=3, help="classes to show per input (3)")
    p.add_argument("--raw", action="store_true", help=".npy arrays are network inputs already: no scaling, "
                                                      "no normalisation")
    p.add_argument("--format", choices=["text", "json"], default="text", help=FORMAT_HELP)
    p.set_defaults(func=cmd_predict)


def _model_args(p: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    p.add_argument("spec", metavar="SPEC", help="network spec (YAML)")
    p.add_argument("weights", metavar="WEIGHTS", help=WEIGHTS_HELP)
    p.add_argument("--threads", type=thread_count, metavar="N", help=THREADS_HELP)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help=DTYPE_HELP)


# ---- train --------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .distributed import launcher_world_size
    from .train import TrainOptions, train

    from .train import RECIPE_KEYS

    if args.distributed or launcher_world_size() > 1:
        from .distributed import train
    if args.plot:
        _matplotlib()  # fail before the work
    opts = TrainOptions(spec=args.spec, data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                        weight_decay=args.weight_decay, seed=args.seed, val_split=args.val_split, limit=args.limit,
                        pad=args.pad, dtype=args.dtype, threads=args.threads, resume=args.resume, force=args.force,
                        init=args.init, freeze=args.freeze, plot=args.plot, target=args.target,
                        perturb=args.perturb, normalize=args.normalize,
                        **{k: getattr(args, k) for k in RECIPE_KEYS})
    train(opts, progress=False if args.no_progress else None)
    return 0


# ---- shared by eval and predict ---------------------------------------------------------------
WEIGHTS_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")  # zip (.npz), empty zip, .npy
SPEC_SUFFIXES = (".yaml", ".yml")


def _magic(path: str) -> bytes | None:
    """The first bytes of a regular file (None for anything else: the readers say what is wrong)."""
    try:
        if not Path(path).is_file():
            return None
        with open(path, "rb") as f:
            return f.read(6)
    except OSError:
        return None


def _check_order(args) -> None:
    """A weights file given as SPEC, or a spec as WEIGHTS: say the order instead of failing to decode."""
    order = f"the order is netc {args.command} SPEC WEIGHTS" + (" FILE..." if args.command == "predict" else " ...")
    spec_magic, weights_magic = _magic(args.spec), _magic(args.weights)
    if spec_magic is not None and spec_magic.startswith(WEIGHTS_MAGIC):
        raise NetcError(f"'{args.spec}' is a weights file, not a spec: {order}")
    if (weights_magic is not None and not weights_magic.startswith(WEIGHTS_MAGIC)
            and Path(args.weights).suffix.lower() in SPEC_SUFFIXES):
        raise NetcError(f"'{args.weights}' is a spec (YAML), not a weights file: {order}")


class Model:
    """A compiled spec with weights loaded and the normalisation to use."""

    def __init__(self, args):
        import netcompiler as nc

        _check_order(args)
        self.network: Network = load(args.spec)
        self.net = nc.compile(self.network, dtype=args.dtype, threads=args.threads)
        info = self.net.load_weights(args.weights)  # strict; metadata validated
        self.mean, self.std, self.norm_source, self.pad = info["mean"], info["std"], info["source"], info["pad"]
        self.class_names = info["class_names"]

    def norm_text(self) -> str:
        if self.mean is None and self.std is None:
            return f"normalisation: {self.norm_source}"
        from .data import norm_text

        return f"normalisation: {norm_text(self.mean, self.std)} ({self.norm_source})"

    def class_name(self, c: int, names: list[str] | None = None) -> str | None:
        names = names or self.class_names
        return names[c] if names and c < len(names) else None


# ---- eval ---------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .data import load_dataset
    from .train import classification_metrics, is_float_targets, predict_outputs, to_inputs

    if args.plot:
        _matplotlib()  # fail before the work
    if args.calibration and not args.quantized:
        raise NetcError("--calibration is for --quantized (the int8 accuracy)")
    model = Model(args)
    net, network = model.net, model.network
    ds = load_dataset(args.data)
    x, y = (ds.test_x, ds.test_y) if args.split == "test" else (ds.train_x, ds.train_y)
    if len(x) == 0:
        raise DataError(f"{args.data} has no {args.split} images" +
                        (" (use --split train)" if args.split == "test" else ""))
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if args.target == "input" or is_float_targets(y):
        return _eval_targets(args, model, ds, x, y)
    k = network.num_classes
    if y.max() >= k:
        raise DataError(f"{args.data}: labels go up to {y.max()}, but network '{network.name}' has {k} outputs")
    if network.loss != "cross_entropy" and len(network.output_shape) != 1:
        raise DataError(f"network '{network.name}' outputs {network.output_shape}: eval needs one output per class")
    X = net.check_x(to_inputs(network, x, model.mean, model.std, model.pad, args.dtype), "images")
    outputs = predict_outputs(net, X, args.batch_size)
    names = ds.class_names or model.class_names
    m = classification_metrics(outputs, y, network.loss, k, names)
    if args.quantized:
        m["int8"] = _int8_metrics(args, network, X, y, k, names, outputs)
    m.update({"network": network.name, "data": ds.name, "split": args.split, "weights": args.weights,
              "normalization": {"mean": model.mean, "std": model.std, "source": model.norm_source}})
    if args.perturb:
        from .perturb import perturb

        text, spec = args.perturb
        px = perturb(x, spec, args.seed)
        PX = net.check_x(to_inputs(network, px, model.mean, model.std, model.pad, args.dtype), "perturbed images")
        pm = classification_metrics(predict_outputs(net, PX, args.batch_size), y, network.loss, k, names)
        m["perturbed"] = {"perturb": text, "seed": args.seed, "loss": pm["loss"], "accuracy": pm["accuracy"],
                          "top2_accuracy": pm["top2_accuracy"],
                          "per_class_accuracy": [c["accuracy"] for c in pm["per_class"]]}
    if args.format == "json":
        emit(json.dumps(_json_safe(m), indent=2))
    else:
        emit(_eval_text(m, model))
        if args.quantized:
            q = m["int8"]
            emit(f"\nint8 (netc export --quantize int8, calibrated on {q['calibration_images']} {q['calibration']} "
                 f"training images): accuracy {100 * q['accuracy']:.2f}% (float {100 * m['accuracy']:.2f}%, "
                 f"{100 * (q['accuracy'] - m['accuracy']):+.2f} points); outputs agree on {100 * q['agreement']:.2f}%")
    if args.plot:
        _plot_confusion(m, args.plot)
        if args.format == "text":
            emit(f"confusion matrix plot: {args.plot}")
    return 0


def _eval_targets(args, model: Model, ds, x: np.ndarray, y: np.ndarray) -> int:
    """eval with float targets (the data's, or the input images): the loss, clean and perturbed."""
    from .train import input_targets, loss_of, predict_outputs, to_inputs, to_targets

    net, network = model.net, model.network
    what = "the input images" if args.target == "input" else "float targets"
    t = input_targets(network, x, model.pad, args.dtype) if args.target == "input" else y
    T = to_targets(net, t, f"{args.data} ({args.split} targets)")
    if args.quantized:
        raise NetcError("--quantized reports accuracy: it needs class labels, not float targets")

    def loss(images) -> float:
        X = net.check_x(to_inputs(network, images, model.mean, model.std, model.pad, args.dtype), "images")
        return loss_of(network.loss, predict_outputs(net, X, args.batch_size), T)

    m = {"network": network.name, "data": ds.name, "split": args.split, "weights": args.weights, "samples": len(x),
         "targets": args.target if args.target == "input" else "float", "loss": loss(x),
         "normalization": {"mean": model.mean, "std": model.std, "source": model.norm_source}}
    if args.perturb:
        from .perturb import perturb

        text, spec = args.perturb
        m["perturbed"] = {"perturb": text, "seed": args.seed, "loss": loss(perturb(x, spec, args.seed))}
    if args.format == "json":
        emit(json.dumps(_json_safe(m), indent=2))
        return 0
    lines = [f"{m['network']} on {m['data']} {m['split']} set: {m['samples']} images; {model.norm_text()}",
             f"loss {m['loss']:.4f} ({network.loss} against {what})"]
    if "perturbed" in m:
        p = m["perturbed"]
        lines.append(f"perturbed inputs ({p['perturb']}, seed {p['seed']}): loss {p['loss']:.4f} (clean inputs "
                     f"{m['loss']:.4f})")
    emit("\n".join(lines))
    return 0


def _int8_metrics(args, network, X, y, k: int, names, outputs) -> dict:
    """Accuracy of the int8 export of the weights on the inputs X (the numpy reference of
    its integer arithmetic, which the C matches bit for bit), and how often its top class
    is the float `outputs`' one."""
    from .export import calibration_inputs, load_state
    from .export.quant import calibrate, quantize
    from .export.quant_ref import infer_float
    from .train import classification_metrics

    state, normalisation = load_state(network, args.weights)
    source = args.calibration or args.data
    calib = calibration_inputs(network, source, args.calibration_images, normalisation)
    qnet = quantize(network, state, calibrate(network, state, calib))
    out = infer_float(qnet, np.asarray(X, np.float32))
    q = classification_metrics(out, y, network.loss, k, names)
    ref = np.asarray(outputs)
    agree = float(np.mean(out.reshape(len(out), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)))
    return {"accuracy": q["accuracy"], "agreement": agree, "calibration": source,
            "calibration_images": len(calib)}


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _eval_text(m: dict, model: Model) -> str:
    lines = [f"{m['network']} on {m['data']} {m['split']} set: {m['samples']} images; {model.norm_text()}",
             f"loss {m['loss']:.4f}  accuracy {100 * m['accuracy']:.2f}%  "
             f"top-2 accuracy {100 * m['top2_accuracy']:.2f}%"]
    if "perturbed" in m:
        p = m["perturbed"]
        lines.append(f"perturbed ({p['perturb']}, seed {p['seed']}): loss {p['loss']:.4f}  accuracy "
                     f"{100 * p['accuracy']:.2f}%  top-2 accuracy {100 * p['top2_accuracy']:.2f}%  "
                     f"(clean {100 * m['accuracy']:.2f}%)")
    lines += ["", "per-class accuracy:"]
    width = max([len(c["name"] or "") for c in m["per_class"]] + [0])
    perturbed = m["perturbed"]["per_class_accuracy"] if "perturbed" in m else None
    for c in m["per_class"]:
        acc = f"{100 * c['accuracy']:6.2f}%" if c["accuracy"] is not None else "      -"
        name = f" {c['name']:<{width}}" if width else ""
        line = f"  {c['class']:>3}{name}  {acc}  ({c['correct']}/{c['count']})"
        if perturbed is not None and perturbed[c["class"]] is not None:
            line += f"  perturbed {100 * perturbed[c['class']]:6.2f}%"
        lines.append(line)
    cm = m["confusion_matrix"]
    k = len(cm)
    cell = max(4, len(str(max(max(r) for r in cm))) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class):",
              "     " + "".join(f"{j:>{cell}}" for j in range(k))]
    for i, row in enumerate(cm):
        lines.append(f"  {i:>3}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NetcError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def _plot_confusion(m: dict, path: str) -> None:
    plt = _matplotlib()
    cm = np.array(m["confusion_matrix"])
    k = len(cm)
    labels = [c["name"] or str(c["class"]) for c in m["per_class"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * k + 2), max(4, 0.6 * k + 1.5)))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{m['network']} on {m['data']} {m['split']}: accuracy {100 * m['accuracy']:.2f}%")
    if k <= 30:
        top = cm.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    from .weights import atomic_write

    try:  # an OSError is reported by cli.main, as for every file written
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_curves(history: list[list[float]], path, title: str, val_name: str = "val") -> None:
    """curves.png of a run: loss, accuracy and lr per epoch (rows of train.METRICS_COLUMNS)."""
    plt = _matplotlib()
    h = np.array(history, np.float64).reshape(-1, 8)
    ep = h[:, 0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (col, what) in zip(axes[:2], ((1, "loss"), (2, "accuracy"))):
        ax.plot(ep, h[:, col], "o-", label="train")
        ax.plot(ep, h[:, col + 2], "o-", label=val_name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(ep, h[:, 7], "o-")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    from .weights import atomic_write

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


# ---- predict ------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 1 << 26  # 8192x8192: images are resized to the spec's input; larger is refused unread


def _read_npy(path: Path, network: Network) -> tuple[np.ndarray, bool]:
    """-> (array of samples, batch?) with a leading sample axis."""
    from .data import as_batch, batch_shapes_text
    from .npyfile import read_npy

    arr = read_npy(path, DataError, ".npy array")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: array has non-numeric dtype {arr.dtype}")
    fit = as_batch(arr, tuple(network.input_shape))
    if fit is None:
        raise DataError(f"{path}: array of shape {arr.shape} does not fit the spec's input; expected "
                        f"{batch_shapes_text(tuple(network.input_shape))}")
    return fit


def _read_image(path: Path, network: Network) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{path}: reading PNG/JPEG images needs Pillow, which is not installed: pip install Pillow "
                        f"(or pass .npy arrays)") from None
    shape = network.input_shape
    if len(shape) != 3:
        raise DataError(f"{path}: the spec's input is {shape[0]} features, not an image (C, H, W); pass .npy arrays")
    c, h, w = shape
    if c not in (1, 3):
        raise DataError(f"{path}: the spec's input has {c} channels; images can be made greyscale (1 channel) or "
                        f"RGB (3 channels) only; pass .npy arrays of shape ({c}, {h}, {w})")
    from .npyfile import open_regular

    try:
        with open_regular(path, DataError, "image") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here
            with Image.open(f) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:  # from the header, before decoding
                    raise DataError(f"{path}: image too large: {img.width}x{img.height} pixels, the limit is "
                                    f"{MAX_IMAGE_PIXELS:,} pixels")
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                arr = np.asarray(img, np.uint8)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked when it opens the file
        raise DataError(f"{path}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None
    return arr[None, None] if c == 1 else arr.transpose(2, 0, 1)[None]


def cmd_predict(args) -> int:
    from .train import predict_outputs, softmax

    model = Model(args)
    network = model.network
    items: list[tuple[str, np.ndarray]] = []  # (label, one prepared input)
    for f in args.files:
        path = Path(f)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            arr, batch = _read_npy(path, network)
            if args.raw:
                x = np.asarray(arr, model.net.dtype)
            else:
                x = model.net.prepare(arr, str(path))  # data.pixel_values' rule, the stored normalisation
            items += [(f"{f}[{i}]" if batch else f, x[i]) for i in range(len(x))]
        elif suffix in IMAGE_SUFFIXES:
            x = model.net.prepare(_read_image(path, network), str(path))
            items.append((f, x[0]))
        else:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (expected .npy, .png, .jpg, .jpeg)")
    if not items:
        raise DataError("no samples to predict (empty arrays)")
    X = model.net.check_x(np.stack([x for _, x in items]), "inputs")
    out = predict_outputs(model.net, X)
    # probabilities: softmax of cross-entropy logits, sigmoid of binary cross-entropy logits
    probs = network.loss in ("cross_entropy", "binary_cross_entropy")
    scores = softmax(out) if network.loss == "cross_entropy" else (1 + np.tanh(out / 2)) / 2 if probs else out
    results = []
    for (label, _), row in zip(items, scores):
        top = np.argsort(-row, kind="stable")[:args.top]
        results.append({"input": label, "predicted": int(top[0]),
                        "top": [{"class": int(c), "name": model.class_name(int(c)),
                                 ("probability" if probs else "output"): float(row[c])} for c in top],
                        ("probabilities" if probs else "outputs"): [float(v) for v in row]})
    if args.format == "json":
        emit(json.dumps({"network": network.name, "weights": args.weights, "class_names": model.class_names,
                         "normalization": {"mean": model.mean, "std": model.std, "source": model.norm_source},
                         "predictions": results}, indent=2))
        return 0
    print(f"# {network.name}, {model.norm_text()}", file=sys.stderr)
    key = "probability" if probs else "output"
    lines = []
    for r in results:
        tops = ", ".join(f"{t['name'] or 'class ' + str(t['class'])} {t[key]:.3f}" for t in r["top"])
        lines.append(f"{r['input']}: {tops}")
    emit("\n".join(lines))
    return 0
