"""`netc export`: standalone inference C (NAME.c, NAME.h) for microcontrollers and servers,
an ONNX model (--format onnx) or PyTorch source (--format torch); `netc import`: an ONNX
model -> spec and weights."""
from __future__ import annotations

from pathlib import Path

from .check import load
from .errors import NetcError


def _export_c(args, net, state, normalisation) -> int:
    from .export import calibration_inputs, export_c, export_int8

    if args.quantize:
        x = calibration_inputs(net, args.calibration, args.calibration_images, normalisation)
        exported = export_int8(net, state, x, args.target, weights_name=Path(args.weights).name,
                               normalisation=normalisation, calibration_name=f"{args.calibration} training images")
    else:
        exported = export_c(net, state, args.target, weights_name=Path(args.weights).name, normalisation=normalisation)
    out = Path(args.out)
    try:
        c_path, h_path = exported.write(out)
    except OSError as exc:
        raise NetcError(f"cannot write to {out}: {exc.strerror or exc}") from None
    print(f"source: {c_path}")
    print(f"header: {h_path}")
    steps = ", ".join("+".join(l.name for l in s.layers) or s.name for s in exported.steps)
    print(f"{net.name}: {len(exported.steps)} steps ({steps}), target {args.target}"
          + (f", int8 calibrated on {args.calibration_images} {args.calibration} training images" if args.quantize else ""))
    for line in exported.summary():
        print(line)
    return 0


def _export_onnx(args, net, state, normalisation) -> int:
    from .onnx_export import write_onnx

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise NetcError(f"--format onnx needs the onnx package: {ONNX_HINT}") from None
    write_onnx(net, state, args.out, normalisation)
    print(f"model: {args.out}")
    print(f"{net.name}: input 'input' [batch, {', '.join(map(str, net.input_shape))}] -> output 'output' "
          f"[batch, {', '.join(map(str, net.output_shape))}], opset 17, evaluation mode")
    if normalisation:
        mean, std = (_shown(v) for v in normalisation)
        per = " in channel c" if isinstance(normalisation[0], list) or isinstance(normalisation[1], list) else ""
        print(f"inputs in [0, 1] are normalised outside the model{per}: (x - {mean}) / {std} "
              f"(also in the model's metadata netc.mean, netc.std)")
    return 0


def _shown(v) -> str:
    """A mean or std for a message: 0.286, or [0.491, 0.482, 0.447][c] for one per channel."""
    return f"[{', '.join(f'{x:.6g}' for x in v)}][c]" if isinstance(v, list) else f"{v:.6g}"


def _export_torch(args, net, state, normalisation) -> int:
    from .fileio import atomic_write_text

    try:
        from .torchref import torch_source
    except ImportError:
        raise NetcError("--format torch needs torch: pip install torch") from None

    atomic_write_text(args.out, torch_source(net))
    print(f"module: {args.out}")
    print(f"{net.name}: load with load_netc_weights(model, {str(args.weights)!r}) from that file")
    return 0


ONNX_HINT = "pip install 'netcompiler[onnx]' (or pip install onnx)"
FORMATS = {"c": _export_c, "onnx": _export_onnx, "torch": _export_torch}


def cmd_export(args) -> int:
    from .export import load_state

    if (args.quantize is None) != (args.calibration is None):
        raise NetcError("--quantize int8 and --calibration DATA go together")
    if args.quantize and args.format != "c":
        raise NetcError(f"--quantize int8 is for --format c, not {args.format}")
    net = load(args.spec)
    state, normalisation = load_state(net, args.weights)
    return FORMATS[args.format](args, net, state, normalisation)


def cmd_import(args) -> int:
    from .onnx_import import import_onnx

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise NetcError(f"netc import needs the onnx package: {ONNX_HINT}") from None
    imported = import_onnx(args.model, args.name)
    yaml_path, npz_path = imported.write(args.out)
    print(f"spec: {yaml_path}")
    print(f"weights: {npz_path}")
    for note in imported.notes:
        print(f"note: {note}")
    print(f"{yaml_path}: ok ({imported.summary()})")
    return 0


def register(sub) -> None:
    from .cli import positive_int
    from .export import TARGET_DOC, TARGETS
    from .export.quant import CALIBRATION_IMAGES

    e = sub.add_parser("export", help="standalone inference C for a trained network: DIR/NAME.c and NAME.h "
                       "(no heap, no Python, weights as static const arrays)")
    e.add_argument("spec", help="network spec (YAML)")
    e.add_argument("weights", help="weights file (.npz, as written by netc train)")
    e.add_argument("--format", choices=list(FORMATS), default="c",
                   help="c: DIR/NAME.c and NAME.h; onnx: FILE.onnx (opset 17, evaluation mode); torch: a Python "
                        "file with an nn.Module whose state_dict names are the weights' (default c)")
    e.add_argument("-o", "--out", metavar="DIR|FILE", required=True,
                   help="output directory (c) or file (onnx, torch)")
    e.add_argument("--target", choices=TARGETS, default="generic",
                   help="; ".join(f"{t}: {d}" for t, d in TARGET_DOC.items()) + " (default generic)")
    e.add_argument("--quantize", choices=["int8"], help="int8 post-training static quantisation: per-channel "
                   "weights, per-tensor activations, integer-only kernels (needs --calibration)")
    e.add_argument("--calibration", metavar="DATA", help="data for the activation ranges, as netc train's --data "
                   "('fashion-mnist', an IDX directory or an .npz): its first training images, scaled as in training")
    e.add_argument("--calibration-images", type=positive_int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"how many training images calibrate (default {CALIBRATION_IMAGES})")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("import", help="an ONNX model -> DIR/NAME.yaml (spec) and DIR/NAME.npz (weights, as netc "
                                      "train writes them)")
    i.add_argument("model", help="ONNX model file (.onnx)")
    i.add_argument("-o", "--out", metavar="DIR", required=True, help="output directory")
    i.add_argument("--name", help="network name (default: from the model's file name)")
    i.set_defaults(func=cmd_import)
