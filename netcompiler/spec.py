"""Stage 1, parse: YAML text -> a tree of `Node`s that remember their line and column.

The YAML is composed (never constructed) with PyYAML's safe loader, so tags that build
Python objects are refused; every scalar is then turned into a plain value by the safe
constructor.  Nothing here knows about layers: this is only "YAML with marks".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import Diagnostic, SpecErrors
from .fileio import Refused, read_bounded

# Tags the safe constructor turns into plain data; anything else (python/object, ...)
# is refused before any value is constructed.
_PLAIN_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "seq", "map")
}


@dataclass
class Node:
    """A YAML value with its position (1-based line and column)."""

    value: Any  # str/int/float/bool/None, list[Node] or dict[str, Node]
    line: int
    col: int
    key_line: int = 0  # for mapping values: where the key stands
    key_col: int = 0

    def plain(self) -> Any:
        """The value without marks (recursively)."""
        if isinstance(self.value, list):
            return [n.plain() for n in self.value]
        if isinstance(self.value, dict):
            return {k: n.plain() for k, n in self.value.items()}
        return self.value


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2's core schema for plain scalars.

    PyYAML resolves plain scalars by YAML 1.1, where `1e-5` is a string (a float needs a
    dot), `yes`/`on`/`off` are booleans, `0x10`, `010` (octal) and `1_000` are integers,
    `1:30` is sexagesimal and `2024-01-01` a date.  The core schema of YAML 1.2 is what
    users of JSON and of other YAML libraries expect: decimal integers, floats with or
    without a dot or exponent (`1e-5`, `.5`, `5e2`, `-1.5e-3`, `+2`), `.inf`/`.nan`,
    `true`/`false`, `null`/`~`.  Everything else is a string, so `0x10`, `1_000`, `yes`
    reach the checker as text and are refused where a number or a boolean is needed.
    """


_Loader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^[-+]?[0-9]+$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
):
    _Loader.add_implicit_resolver("tag:yaml.org,2002:" + _tag, re.compile(_regexp), list(_first))


class _Constructor(yaml.constructor.SafeConstructor):
    """Builds the values the core schema resolved (the 1.1 constructor would read `010` as
    octal 8 and accept `1_0`)."""

    def construct_yaml_int(self, node):
        return int(self.construct_scalar(node), 10)

    def construct_yaml_float(self, node):
        text = self.construct_scalar(node).lower()
        return float(text.replace(".inf", "inf").replace(".nan", "nan"))

    def construct_yaml_bool(self, node):
        return self.construct_scalar(node).lower() == "true"


_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)
_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_yaml_float)
_Constructor.add_constructor("tag:yaml.org,2002:bool", _Constructor.construct_yaml_bool)


MAX_VALUES = 100_000  # YAML values after expanding aliases (a real spec has a few hundred)


def _short_tag(tag: str) -> str:
    """'tag:yaml.org,2002:python/object' -> '!!python/object', as the user wrote it."""
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


class _TooBig(Exception):
    pass


def _convert(node: yaml.Node, file: str, errors: list[Diagnostic], state: dict | None = None) -> Node:
    # `state` counts values and tracks the nodes being converted: YAML aliases may share
    # a node many times (exponential "billion laughs") or point at an enclosing node.
    state = {"count": 0, "open": set()} if state is None else state
    state["count"] += 1
    if state["count"] > MAX_VALUES:
        raise _TooBig
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if node.tag not in _PLAIN_TAGS:
        errors.append(Diagnostic(file, line, col, f"unsupported YAML tag '{_short_tag(node.tag)}' "
                                                  f"(only plain data is allowed)"))
        return Node(None, line, col)
    if id(node) in state["open"]:
        errors.append(Diagnostic(file, line, col, "recursive YAML alias (a value that contains itself)"))
        return Node(None, line, col)
    if isinstance(node, yaml.SequenceNode):
        state["open"].add(id(node))
        items = [_convert(n, file, errors, state) for n in node.value]
        state["open"].discard(id(node))
        return Node(items, line, col)
    if isinstance(node, yaml.MappingNode):
        state["open"].add(id(node))
        out: dict[str, Node] = {}
        for knode, vnode in node.value:
            kline, kcol = knode.start_mark.line + 1, knode.start_mark.column + 1
            if not isinstance(knode, yaml.ScalarNode):
                errors.append(Diagnostic(file, kline, kcol, "mapping keys must be plain names"))
                continue
            key = knode.value if knode.tag in _PLAIN_TAGS else None  # as written: 'null', not 'None'
            if key is None:
                errors.append(Diagnostic(file, kline, kcol, f"unsupported YAML tag '{_short_tag(knode.tag)}'"))
                continue
            if key in out:
                errors.append(Diagnostic(file, kline, kcol, f"duplicate key '{key}'"))
                continue
            value = _convert(vnode, file, errors, state)
            value.key_line, value.key_col = kline, kcol
            out[key] = value
        state["open"].discard(id(node))
        return Node(out, line, col)
    try:
        value = _Constructor().construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:  # e.g. a malformed timestamp
        errors.append(Diagnostic(file, line, col, f"cannot read value: {exc}"))
        value = None
    return Node(value, line, col)


def parse_text(text: str, file: str = "<spec>") -> Node:
    """Parse YAML text into a `Node` tree; raise `SpecErrors` on any problem."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context and exc.problem.startswith("but "):  # "expected X" + "but found Y"
            problem = f"{exc.context}, {exc.problem}"
        elif exc.problem and exc.context and exc.context_mark and exc.context_mark is not mark:
            # e.g. an unclosed '[': say where it was opened
            problem += (f" ({exc.context} started at line {exc.context_mark.line + 1}, "
                        f"column {exc.context_mark.column + 1})")
        raise SpecErrors([Diagnostic(file, line, col, f"YAML syntax error: {problem}")]) from None
    except yaml.reader.ReaderError as exc:  # a control character (e.g. NUL in a binary file)
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise SpecErrors([Diagnostic(file, line, col, f"YAML syntax error: unacceptable character #x{char:04x} "
                                                      f"({exc.reason})")]) from None
    except yaml.YAMLError as exc:
        raise SpecErrors([Diagnostic(file, 1, 1, f"YAML error: {exc}")]) from None
    except RecursionError:
        raise SpecErrors([Diagnostic(file, 1, 1, "YAML is nested too deeply")]) from None
    if root is None:
        raise SpecErrors([Diagnostic(file, 1, 1, "empty spec: expected a mapping with 'input', 'layers' and 'loss'")])
    errors: list[Diagnostic] = []
    try:
        tree = _convert(root, file, errors)
    except RecursionError:
        raise SpecErrors([Diagnostic(file, 1, 1, "YAML is nested too deeply")]) from None
    except _TooBig:
        raise SpecErrors([Diagnostic(file, 1, 1, f"spec has more than {MAX_VALUES:,} values (after expanding "
                                                 f"YAML aliases); refused")]) from None
    if errors:
        raise SpecErrors(errors)
    return tree


MAX_SPEC_BYTES = 1 << 20  # 1 MiB; a spec of a hundred layers is a few kB


def read_spec_text(path: str | Path) -> str:
    """Read a spec file, turning I/O and encoding problems into diagnostics.

    Only a regular file of at most MAX_SPEC_BYTES is read: the file is opened without
    blocking (a FIFO nobody writes would hang a plain open) and its type checked on the
    open descriptor, so /dev/zero, a pipe or a directory is refused before any read."""
    where = str(path)

    def refuse(message: str) -> SpecErrors:
        return SpecErrors([Diagnostic(where, 1, 1, message)])

    try:
        data = read_bounded(path, MAX_SPEC_BYTES)
    except Refused as r:
        if r.why == "not_regular":
            raise refuse(f"cannot read spec: it is {r.detail}, not a regular file") from None
        if r.why == "too_big" and r.size is not None:
            raise refuse(f"spec is {r.size:,} bytes; specs over 1 MiB are refused") from None
        if r.why == "too_big":
            raise refuse(f"spec is over {MAX_SPEC_BYTES:,} bytes; specs over 1 MiB are refused") from None
        raise refuse(f"cannot read spec: {r.detail}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"spec is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
