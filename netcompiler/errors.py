"""Error types shared by every stage of the pipeline.

`NetcError` is what the CLI catches and prints as `error: ...` (exit status 1, no
traceback).  `SpecErrors` carries the compiler-style diagnostics of a spec file, all of
them, each with file, line and column.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with control, format and line-separator characters escaped (`\\n`, `\\x1b`,
    `\\u2028`), so a name or a path from a spec can neither break a diagnostic across
    lines nor send terminal control sequences."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable():  # categories Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs (but ' ')
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
                       else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


class NetcError(Exception):
    """A user-facing error: its message is printed as is, without a traceback."""


class DataError(NetcError, ValueError):
    """A data file (IDX, npz, image) is missing, malformed or does not fit the spec."""


class WeightsError(NetcError, ValueError):
    """A weights or checkpoint file is corrupt or does not fit the spec."""


class NetcWarning(UserWarning):
    """Something probably wrong that does not stop the work; the CLI prints it as
    `netc: warning: ...`."""


class KernelError(NetcError, ValueError):
    """A forced kernel path that names no layer, no path of it, or one that does not apply."""


class TargetError(NetcError, ValueError):
    """A vector width that is not one of the targets' (NETC_VEC, `compile(vec=...)`)."""


class BuildError(NetcError):
    """The C compiler failed on generated code."""


@dataclass(frozen=True)
class Diagnostic:
    file: str
    line: int  # 1-based
    col: int  # 1-based
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{printable(self.file)}:{self.line}:{self.col}: {self.severity}: {printable(self.message)}"


class SpecErrors(NetcError):
    """One or more diagnostics for a spec file."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


def os_error_text(exc: OSError, known: object = None) -> str:
    """One line for an OSError: the path(s) (but `known`, a path the message names already),
    what went wrong, and a hint for the common cases."""
    what = exc.strerror or str(exc)
    hint = {errno.ENOTDIR: " (a file is in the way: a directory is needed there)",
            errno.EEXIST: " (a file is in the way: a directory is needed there)",
            errno.ENOSPC: " (free some space; files written before are intact)",
            errno.EROFS: " (choose a writable location)",
            errno.EACCES: " (choose another location or change its permissions)"}.get(exc.errno, "")
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2)
                       if p is not None and (known is None or str(p) != str(known)))
    return f"{paths}: {what}{hint}" if paths else f"{what}{hint}"
