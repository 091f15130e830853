"""The `netc` command line: thin wrappers around the pipeline stages."""
from __future__ import annotations

import argparse
import re
import sys

from . import __version__
from .check import DEFAULT_MEMORY_BUDGET, OPTIMIZERS, load
from .errors import NetcError, NetcWarning, SpecErrors, os_error_text
from .layers import did_you_mean, fmt_shape

FORMAT_HELP = "output format (default text)"
DTYPE_HELP = "floating-point type (real_t) of the generated C code (default float32)"


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


def _suggest(word: str, choices: list[str]) -> str:
    """' (did you mean ...?)' for a mistyped option or command: an option whose letters are the
    initials of the word's parts (--learning-rate -> --lr), else the closest spelling."""
    parts = [w for w in re.split(r"[-_]", word.lstrip("-")) if w]
    initials = "-" * (len(word) - len(word.lstrip("-"))) + "".join(w[0] for w in parts)
    if len(parts) > 1 and initials in choices:
        return f" (did you mean '{initials}'?)"
    return did_you_mean(word, choices)


def _looks_like_option(arg: str) -> bool:
    """As argparse sees it: not '-', a negative number or a string with a space (values, then)."""
    return arg.startswith("-") and arg != "-" and " " not in arg and not re.match(r"-\.?\d", arg)


class Parser(argparse.ArgumentParser):
    """argparse, with a "did you mean" for a mistyped command or option, and an unknown option
    reported with the usage of the command it was given to."""

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        commands = self._commands()
        first = next((a for a in args if not a.startswith("-")), None)
        if commands is not None and first is not None and first not in commands.choices:
            self.error(f"unknown command '{first}'{_suggest(first, list(commands.choices))}; commands: "
                       f"{', '.join(commands.choices)}")
        if commands is not None and first is not None:  # before argparse, which may stop at a missing argument
            parser = commands.choices[first]
            rest = args[args.index(first) + 1:]
            self._unknown_options(parser, [a for a in rest[:rest.index("--") if "--" in rest else None]
                                           if _looks_like_option(a)])
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = commands.choices[ns.command] if commands is not None else self
            self._unknown_options(parser, [a for a in extras if a.startswith("-")])
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    @staticmethod
    def _unknown_options(parser: argparse.ArgumentParser, tokens: list[str]) -> None:
        """parser.error naming each token that is none of parser's options (nor, for a long option,
        the start of exactly one), with a suggestion."""
        options = [o for a in parser._actions for o in a.option_strings]
        unknown = []
        for t in tokens:
            name = t.split("=", 1)[0] if t.startswith("--") else t[:2]
            if name not in options and not (name.startswith("--") and
                                            sum(o.startswith(name) for o in options) == 1):
                unknown.append(name)
        if unknown:
            parser.error(f"unrecognized option{'s' if len(unknown) > 1 else ''} " +
                         ", ".join(f"'{f}'{_suggest(f, options)}" for f in unknown))

    def _commands(self) -> argparse._SubParsersAction | None:
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)


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
    text = format_report(build_report(net, args.batch_size, args.dtype, args.optimizer, args.kernels), args.format)
    sys.stdout.write(text)
    if args.format == "text":
        from .export import export_lines

        sys.stdout.write("\n" + "\n".join(export_lines(net)) + "\n")
    return 0


def cmd_draw(args) -> int:
    from .draw import draw

    net = load(args.spec, args.memory_budget)
    draw(net, args.out)
    print(f"{args.out}: {len(net.layers)} layers of {net.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="netc", description="netcompiler: check, report, build and train neural networks written "
                                        "as YAML specs.")
    p.add_argument("--version", action="version", version=f"netc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of these; netc COMMAND --help tells its arguments")

    c = sub.add_parser("check", help="check specs: shapes, sizes, names; print the shape table and 'ok'")
    _spec_args(c, many=True)
    c.add_argument("-q", "--quiet", action="store_true", help="print only 'ok' lines and errors")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("report", help="per-layer parameters, MACs, FLOPs and memory")
    _spec_args(r)
    r.add_argument("--format", choices=["text", "markdown", "json", "csv"], default="text", help=FORMAT_HELP)
    r.add_argument("--batch-size", type=positive_int, default=64, help="batch size for training memory (64)")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="size of the reals counted in memory (default float32)")
    r.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="optimizer whose state counts in training memory (adam)")
    r.add_argument("--kernels", action="store_true",
                   help="also list the kernel path each convolution runs (forward, backward) and why")
    r.set_defaults(func=cmd_report)

    from . import cli_build, cli_export, cli_train

    cli_build.register(sub)
    cli_train.register(sub)
    cli_export.register(sub)

    d = sub.add_parser("draw", help="a diagram of the network (Graphviz dot): a box per layer, an edge per tensor")
    _spec_args(d)
    d.add_argument("-o", "--out", metavar="FILE", required=True,
                   help="the picture to write: FILE.svg, FILE.png, or FILE.dot (the dot text, no Graphviz needed)")
    d.set_defaults(func=cmd_draw)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None,
                  _default=__import__("warnings").showwarning) -> None:
    if issubclass(category, NetcWarning):
        print(f"netc: warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
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
    except OSError as exc:  # a file or directory that cannot be read or written: full disk, read-only, ...
        print(f"netc: error: {os_error_text(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
