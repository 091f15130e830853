"""`netc draw`: a diagram of the network with Graphviz `dot`.

One box per layer (name, kind, main options, output shape), an edge per tensor read (a
skip connection, an edge from anything but the layer just before, is drawn curved and
coloured), block uses as clusters.  Everything written into the dot text is a layer name
(validated), a kind, numbers or option values, quoted for dot.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .check import Network
from .errors import NetcError
from .fileio import atomic_write, atomic_write_text
from .layers import INPUT, fmt_shape

FORMATS = {".svg": "svg", ".png": "png", ".dot": None}
INSTALL = "apt-get install -y graphviz"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(net: Network) -> str:
    ids = {INPUT: "input"}
    lines = [f"digraph {_q(net.name)} {{",
             '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, nodesep=0.3, ranksep=0.3];',
             '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9, color="#555555"];',
             f"  input [label={_q('input' + chr(10) + fmt_shape(net.input_shape))}, shape=ellipse, "
             'fillcolor="#dde8f4"];']
    open_blocks: list[str] = []
    for layer in net.layers:
        want = [name for name, _ in layer.blocks]
        while open_blocks and open_blocks != want[:len(open_blocks)]:
            open_blocks.pop()
            lines.append("  " * (len(open_blocks) + 1) + "}")
        for name, block in layer.blocks[len(open_blocks):]:
            indent = "  " * (len(open_blocks) + 1)
            lines.append(f"{indent}subgraph {_q('cluster_' + name)} {{")
            lines.append(f'{indent}  label={_q(f"{name} ({block})")}; style="rounded,dashed"; color="#8899aa";')
            open_blocks.append(name)
        ids[layer.output] = f"n{layer.index}"
        opts = layer.kind.describe_options(layer)
        local = layer.name[len(open_blocks[-1]) + 1:] if open_blocks else layer.name
        label = "\n".join([f"{local}: {layer.kind.kind}"] + ([opts] if opts else []) + [fmt_shape(layer.out_shape)])
        fill = ', fillcolor="#fbe9d0"' if layer.kind.max_inputs > 1 else ""
        lines.append("  " * (len(open_blocks) + 1) + f"n{layer.index} [label={_q(label)}{fill}];")
    while open_blocks:
        open_blocks.pop()
        lines.append("  " * (len(open_blocks) + 1) + "}")
    for layer in net.layers:
        before = INPUT if layer.index == 0 else net.layers[layer.index - 1].output
        for t in layer.inputs:
            style = "" if t == before else ' [color="#c0392b", penwidth=1.4]'
            lines.append(f"  {ids[t]} -> n{layer.index}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(net: Network, out: str | Path, dot: str | None = None) -> None:
    """Write the diagram to `out` (.svg, .png, or .dot for the dot text itself)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise NetcError(f"cannot draw to '{out}': the file name must end in .svg, .png or .dot")
    text = to_dot(net)
    if FORMATS[suffix] is None:
        atomic_write_text(out, text)
        return
    exe = dot or shutil.which("dot")
    if exe is None or not Path(exe).exists():
        raise NetcError(f"netc draw needs Graphviz's 'dot', which is not installed (Debian/Ubuntu: {INSTALL})")
    try:
        run = subprocess.run([exe, f"-T{FORMATS[suffix]}"], input=text.encode(), capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetcError(f"Graphviz 'dot' failed: {exc}") from None
    if run.returncode != 0 or not run.stdout:
        msg = run.stderr.decode(errors="replace").strip().splitlines()
        raise NetcError(f"Graphviz 'dot' failed (exit status {run.returncode}): {msg[0] if msg else 'no output'}")
    atomic_write(out, lambda f: f.write(run.stdout))
