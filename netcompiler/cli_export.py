"""`netc export`: standalone inference C (NAME.c, NAME.h) for microcontrollers and servers."""
from __future__ import annotations

from pathlib import Path

from .check import load
from .errors import NetcError


def cmd_export(args) -> int:
    from .export import export_c, load_state

    net = load(args.spec)
    state, normalisation = load_state(net, args.weights)
    exported = export_c(net, state, args.target, weights_name=Path(args.weights).name, normalisation=normalisation)
    out = Path(args.out)
    try:
        c_path, h_path = exported.write(out)
    except OSError as exc:
        raise NetcError(f"cannot write to {out}: {exc.strerror or exc}") from None
    print(f"source: {c_path}")
    print(f"header: {h_path}")
    steps = ", ".join("+".join(l.name for l in s.layers) or s.name for s in exported.steps)
    print(f"{net.name}: {len(exported.steps)} steps ({steps}), target {args.target}")
    for line in exported.summary():
        print(line)
    return 0


def register(sub) -> None:
    from .export import TARGET_DOC, TARGETS

    e = sub.add_parser("export", help="standalone inference C for a trained network: DIR/NAME.c and NAME.h "
                       "(no heap, no Python, weights as static const arrays)")
    e.add_argument("spec", help="network spec (YAML)")
    e.add_argument("weights", help="weights file (.npz, as written by netc train)")
    e.add_argument("--format", choices=["c"], default="c", help="output format (c)")
    e.add_argument("-o", "--out", metavar="DIR", required=True, help="output directory")
    e.add_argument("--target", choices=TARGETS, default="generic",
                   help="; ".join(f"{t}: {d}" for t, d in TARGET_DOC.items()) + " (default generic)")
    e.set_defaults(func=cmd_export)
