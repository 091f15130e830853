"""The `netc` command line: thin wrappers around the pipeline stages."""
from __future__ import annotations

import argparse
import re
import sys

from . import __version__
from .check import DEFAULT_MEMORY_BUDGET, load
from .errors import NetcError, SpecErrors
from .layers import fmt_shape


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 8GiB, 512MiB)")
    scale = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[(m.group(2) or "")[:1].upper()]
    return int(float(m.group(1)) * scale)


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


positive_int = int_at_least(1)


def _spec_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("spec", nargs="+" if many else None, help="network spec (YAML)")
    p.add_argument("--memory-budget", type=parse_bytes, default=DEFAULT_MEMORY_BUDGET, metavar="SIZE",
                   help="refuse networks whose training memory at batch 1 exceeds SIZE (default 16GiB)")


def cmd_check(args) -> int:
    status = 0
    for path in args.spec:
        try:
            net = load(path, args.memory_budget)
        except SpecErrors as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        if not args.quiet:
            from .report import build_report, table_lines

            print(f"{path}:")
            print("\n".join("  " + l for l in table_lines(build_report(net))))
        print(f"{path}: ok ({net.name}: {fmt_shape(net.input_shape)} -> {fmt_shape(net.output_shape)}, "
              f"{net.total_params:,} parameters)")
    return status


def cmd_report(args) -> int:
    from .report import build_report, format_report

    net = load(args.spec, args.memory_budget)
    text = format_report(build_report(net, args.batch_size, args.dtype, args.optimizer), args.format)
    sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netc", description="netcompiler: check, report, build and train neural "
                                "networks written as YAML specs.")
    p.add_argument("--version", action="version", version=f"netc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="check specs: shapes, sizes, names; print the shape table and 'ok'")
    _spec_args(c, many=True)
    c.add_argument("-q", "--quiet", action="store_true", help="print only 'ok' lines and errors")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("report", help="per-layer parameters, MACs, FLOPs and memory")
    _spec_args(r)
    r.add_argument("--format", choices=["text", "markdown", "json", "csv"], default="text")
    r.add_argument("--batch-size", type=positive_int, default=64, help="batch size for training memory (64)")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    r.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default="adam",
                   help="optimizer whose state counts in training memory (adam)")
    r.set_defaults(func=cmd_report)

    from . import cli_build, cli_export, cli_train

    cli_build.register(sub)
    cli_train.register(sub)
    cli_export.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecErrors as exc:
        print(exc, file=sys.stderr)
        return 1
    except NetcError as exc:
        print(f"netc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `netc show ... | head`
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
