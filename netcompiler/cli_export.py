"""`netc export`: standalone inference C (NAME.c, NAME.h) for microcontrollers and servers."""
from __future__ import annotations

from pathlib import Path

from .check import load
from .errors import NetcError


def cmd_export(args) -> int:
    from .export import calibration_inputs, export_c, export_int8, load_state

    if (args.quantize is None) != (args.calibration is None):
        raise NetcError("--quantize int8 and --calibration DATA go together")
    net = load(args.spec)
    state, normalisation = load_state(net, args.weights)
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


def register(sub) -> None:
    from .cli import positive_int
    from .export import TARGET_DOC, TARGETS
    from .export.quant import CALIBRATION_IMAGES

    e = sub.add_parser("export", help="standalone inference C for a trained network: DIR/NAME.c and NAME.h "
                       "(no heap, no Python, weights as static const arrays)")
    e.add_argument("spec", help="network spec (YAML)")
    e.add_argument("weights", help="weights file (.npz, as written by netc train)")
    e.add_argument("--format", choices=["c"], default="c", help="output format (c)")
    e.add_argument("-o", "--out", metavar="DIR", required=True, help="output directory")
    e.add_argument("--target", choices=TARGETS, default="generic",
                   help="; ".join(f"{t}: {d}" for t, d in TARGET_DOC.items()) + " (default generic)")
    e.add_argument("--quantize", choices=["int8"], help="int8 post-training static quantisation: per-channel "
                   "weights, per-tensor activations, integer-only kernels (needs --calibration)")
    e.add_argument("--calibration", metavar="DATA", help="data for the activation ranges, as netc train's --data "
                   "('fashion-mnist', an IDX directory or an .npz): its first training images, scaled as in training")
    e.add_argument("--calibration-images", type=positive_int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"how many training images calibrate (default {CALIBRATION_IMAGES})")
    e.set_defaults(func=cmd_export)
