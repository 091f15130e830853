"""`netc build`, `netc show`, `netc verify`."""
from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path

from .check import load
from .errors import NetcError


def _flags(args) -> list[str] | None:
    if args.cflags is None:
        return None
    from .build import default_flags

    extra = shlex.split(args.cflags)
    return default_flags() + extra


def cmd_build(args) -> int:
    from .build import compile_rendered, default_flags
    from .render import render

    net = load(args.spec)
    flags = _flags(args) or default_flags()
    t0 = time.perf_counter()
    rendered = render(net, args.dtype, flags)
    built = compile_rendered(rendered, out_dir=Path(args.out or Path("build") / net.name), flags=flags)
    dt = time.perf_counter() - t0
    print(f"source:  {built.c_path}")
    print(f"header:  {built.h_path}")
    print(f"library: {built.so_path}")
    print(f"{net.name}: {net.total_params:,} parameters, {len(net.layers)} layers, {args.dtype}, "
          f"{'cached' if built.cached else f'compiled in {dt:.2f} s'} with {' '.join(flags)}")
    return 0


def cmd_show(args) -> int:
    from .build import default_flags
    from .plan import fused_relus
    from .render import render

    net = load(args.spec)
    src = render(net, args.dtype, _flags(args) or default_flags()).source
    if args.layer is None:
        if args.backward:
            raise NetcError("--backward needs --layer NAME")
        sys.stdout.write(src)
        return 0
    names = [l.name for l in net.layers]
    cnames = [l.cname for l in net.layers]  # the C name (layer1_0_conv1) is accepted too
    if args.layer not in names and args.layer not in cnames:
        from .layers import did_you_mean

        raise NetcError(f"no layer '{args.layer}' in {net.name}{did_you_mean(args.layer, names)}; layers: "
                        f"{', '.join(names)}")
    index = names.index(args.layer) if args.layer in names else cnames.index(args.layer)
    layer = net.layers[index].cname
    fused = fused_relus(net.layers).get(index)
    if fused:
        by = fused[1] if args.backward else fused[0]
        grad = ("its output gradient only where its output" if fused[1] is fused[0]
                else "its input gradient only where its input")
        print(f"/* {args.layer}: fused, no function of its own: {by.name}'s "
              + (f"backward keeps {grad} is positive */" if args.backward
                 else "forward stores max(0, y) as its output */"))
        layer = by.cname
    chunks = _layer_functions(src, layer, cnames, args.backward)
    if not chunks:
        print(f"/* {layer}: no {'backward' if args.backward else 'forward'} function "
              f"(see the layer's comment in the full source) */")
    sys.stdout.write("\n".join(chunks))
    return 0


def _layer_functions(src: str, layer: str, names: list[str], backward: bool) -> list[str]:
    """The static functions and tables of `layer` in generated source, each with the comments directly
    above it, in source order.  A layer's template defines its forward helpers (im2col, the
    Winograd steps) and then its forward function(s), then its backward helpers and backward:
    the forward is everything up to the last `<layer>_forward*`, the backward the rest."""
    # a definition: `static <type> name(<parameters>)` then its body from a line `{` to a line `}`,
    # or a table: `static const <type> name[...] = ...;` up to the end of its line or a line `};`
    fn = re.compile(r"((?:/\*(?:(?!\*/).)*\*/\n)*)^static (?:[^\n(]*?\b(\w+)\([^{;]*?\)\n\{\n.*?\n\}\n"
                    r"|const [^\n(=]*?\b(\w+)\[[^\n]*?= (?:[^\n]*;\n|\{\n.*?\n\};\n))", re.S | re.M)
    # names of other layers that extend this one's (conv and conv_b): their functions are theirs
    longer = [n + "_" for n in names if n != layer and n.startswith(layer + "_")]
    funcs = []
    for m in fn.finditer(src):
        comments, name = m.group(1), m.group(2) or m.group(3)
        if name.startswith(layer + "_") and not any(name.startswith(p) for p in longer):
            cut = comments.rfind("\n\n") + 2 if "\n\n" in comments else 0  # only those directly above
            text = m.group(0)[cut:]
            while text.startswith("/* ===="):  # a section banner is not the function's comment
                text = text.split("\n", 1)[1]
            funcs.append((name[len(layer) + 1:], text))
    last_forward = max((i for i, (suffix, _) in enumerate(funcs) if suffix.startswith("forward")), default=-1)
    return [text for i, (_, text) in enumerate(funcs) if (i > last_forward) == backward]


def cmd_verify(args) -> int:
    from .verify import DTYPES, format_rows, verify

    dtypes = DTYPES if args.dtype == "both" else (args.dtype,)
    rows, note = verify(args.spec, batch=args.batch_size, seed=args.seed, per_tensor=args.samples,
                        use_torch=not args.no_torch, threads=args.threads, dtypes=dtypes)
    print(f"{args.spec}: {' and '.join(dtypes)} builds, batch {args.batch_size}, seed {args.seed}")
    if note:
        print(f"note: {note}")
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"verify: FAILED: {len(bad)} mismatch(es): "
              f"{', '.join(f'{r.tensor} ({r.dtype}, {r.reference})' for r in bad)}")
        return 1
    print(f"verify: ok ({len(rows)} comparisons)")
    return 0


def register(sub) -> None:
    from .cli import DTYPE_HELP, positive_int
    from .cli_train import THREADS_HELP, thread_count

    b = sub.add_parser("build", help="generate C and compile it: DIR/NAME.c, NAME.h, NAME.so")
    b.add_argument("spec", help="network spec (YAML) to build")
    b.add_argument("-o", "--out", metavar="DIR", help="output directory (default build/NAME)")
    b.add_argument("--dtype", choices=["float32", "float64"], default="float32", help=DTYPE_HELP)
    b.add_argument("--cflags", metavar="FLAGS", help="extra compiler flags, appended to the defaults "
                   "(e.g. --cflags='-O2 -g')")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("show", help="print the generated C (all of it, or one layer's functions)")
    s.add_argument("spec", help="network spec (YAML) whose C code to print")
    s.add_argument("--layer", metavar="NAME", help="only this layer's forward (or backward) functions, helpers "
                   "included (a fused ReLU: the layer doing its work)")
    s.add_argument("--backward", action="store_true", help="with --layer: the backward functions")
    s.add_argument("--dtype", choices=["float32", "float64"], default="float32", help=DTYPE_HELP)
    s.add_argument("--cflags", metavar="FLAGS", help="extra compiler flags, as for build (recorded in the header)")
    s.set_defaults(func=cmd_show)

    v = sub.add_parser("verify", help="check outputs and every gradient against PyTorch and finite differences")
    v.add_argument("spec", help="network spec (YAML) to verify")
    v.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                   help="samples in the random test batch (default 4)")
    v.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random batch, the initial parameters, dropout and the finite-difference picks "
                        "(default 0)")
    v.add_argument("--samples", type=positive_int, default=6, metavar="N",
                   help="finite-difference checks per tensor (default 6)")
    v.add_argument("--threads", type=thread_count, default=None, metavar="N", help=THREADS_HELP)
    v.add_argument("--no-torch", action="store_true", help="finite differences only: do not compare with PyTorch (float64 build)")
    v.add_argument("--dtype", choices=["float32", "float64", "both"], default="both",
                   help="the build(s) to check (default both): float64 against torch float64 and finite "
                        "differences, float32 against torch float64 with a float32 tolerance")
    v.set_defaults(func=cmd_verify)

