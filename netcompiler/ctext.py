"""What may reach the generated C from outside: escaped comment text, identifiers, numbers.

Paths, compiler flags and anything else a user chose are shown in the generated C only
inside comments, through `comment()`, which makes the text unable to end the comment or
to splice lines.  Everything else that reaches C code is an identifier or a number that
check.py validated; `assert_plan` asserts that again at render time, so a checker bug
cannot turn into injected C.
"""
from __future__ import annotations

import math
import re

from .check import IDENT

# tensor names: conv1.weight, layer1.0.conv1.weight (PyTorch's nested module names)
DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*\Z")
_SHORT = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def comment(text: object) -> str:
    """`text` made safe to place inside a C block comment: one line, no `*/` or `/*`, no
    control, format or lone surrogate characters (newlines, bidi overrides, undecodable
    bytes of a path), no backslash (a splice at a line's end), no `??` (trigraphs, `??/` is
    a backslash under -std=c11).  Such characters are shown escaped (`\\n`, `\\x2f`)."""
    text = str(text)
    out = []
    prev = ""
    for ch in text:
        if (ch == "\\" or not ch.isprintable() or (ch == "/" and prev == "*") or (ch == "*" and prev == "/")
                or (ch == "?" and prev == "?")):
            out.append(_escape(ch))
        else:
            out.append(ch)
        prev = ch
    return "".join(out)


def identifier(name: object, what: str) -> str:
    """`name` when it is a C identifier; AssertionError otherwise (check.py refuses such names)."""
    if not isinstance(name, str) or not IDENT.match(name):
        raise AssertionError(f"{what} {name!r} is not a C identifier: it must not reach the generated C")
    return name


def number(v: object, what: str) -> object:
    """`v` when it is a finite int or float (not a bool); AssertionError otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AssertionError(f"{what} {v!r} is not a finite number: it must not reach the generated C")
    return v


def assert_plan(plan) -> None:
    """Every name and size of `plan` that templates print as C is an identifier or a number."""
    net = plan.net
    identifier(net.name, "network name")
    for d in (*net.input_shape, *net.output_shape):
        number(d, "input/output size")
    for lp in plan.layers:
        identifier(lp.name, "layer name")
        identifier(lp.kind, "layer kind")
        for macro in (lp.in_macro, lp.out_macro, lp.din_macro):
            identifier(macro, "offset macro")
        for e in lp.ins:
            identifier(e.macro, "offset macro")
            if e.din is not None:
                identifier(e.din, "offset macro")
            number(e.size, "size")
            number(e.at, "offset")
        for dst, src, size in lp.grad_sums:
            identifier(dst, "offset macro")
            identifier(src, "offset macro")
            number(size, "size")
    for st in plan.eval_stages:
        for macro, at, size in st.copy_in + st.copy_out:
            identifier(macro, "offset macro")
            number(at, "offset")
            number(size, "size")
    for group in (plan.params, plan.buffers, plan.activations, plan.int_slots, plan.stats, plan.cache, plan.views):
        for t in group:
            identifier(t.macro, "offset macro")
            if not DOTTED.match(t.name):
                raise AssertionError(f"tensor name {t.name!r} is not a dotted C identifier")
            number(t.offset, "offset")
            for d in t.shape:
                number(d, "size")
    for v in (plan.num_params, plan.num_buffers, plan.acts_per_sample, plan.ints_per_sample, plan.stats_size,
              plan.cache_size, plan.scratch_per_thread, plan.eval_work, plan.in_size, plan.out_size):
        number(v, "plan size")
