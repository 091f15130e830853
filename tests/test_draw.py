"""`netc draw`: the dot text of a graph, and a picture of every spec with Graphviz."""
from __future__ import annotations

import re
import shutil

import pytest

from conftest import ROOT
from netcompiler.check import load
from netcompiler.cli import main
from netcompiler.draw import to_dot

SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def test_dot_has_a_box_per_layer_skip_edges_and_block_clusters():
    net = load(ROOT / "specs" / "resnet20.yaml")
    dot = to_dot(net)
    boxes = re.findall(r"^\s*n(\d+) \[label=", dot, re.M)
    assert sorted(map(int, boxes)) == list(range(len(net.layers)))
    edges = re.findall(r"^\s*(\w+) -> n(\d+)(.*);$", dot, re.M)
    assert len(edges) == sum(len(l.inputs) for l in net.layers)
    # skip edges: the 7 identity shortcuts, and in each of the 2 down blocks the projection's input
    # and the add's main branch (its layer before is the projection's batch norm)
    skips = [e for e in edges if "color" in e[2]]
    assert len(skips) == 9 + 2
    clusters = re.findall(r'subgraph "cluster_([\w.]+)"', dot)
    assert clusters == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert '"layer2.0 (down)"' in dot and "conv1: conv2d\\nout_channels=32, kernel_size=3, stride=2" in dot
    assert "16x32x32" in dot


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_draw_renders_every_spec(spec, tmp_path, capsys):
    assert shutil.which("dot"), "Graphviz is not installed (apt-get install -y graphviz; scripts/setup.sh --test)"
    out = tmp_path / f"{spec.stem}.svg"
    assert main(["draw", str(spec), "-o", str(out)]) == 0
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert svg.count('class="node"') == len(load(spec).layers) + 1  # and the input


def test_draw_png_and_dot_text(tmp_path):
    assert main(["draw", str(ROOT / "specs" / "lenet5.yaml"), "-o", str(tmp_path / "n.png")]) == 0
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["draw", str(ROOT / "specs" / "lenet5.yaml"), "-o", str(tmp_path / "n.dot")]) == 0
    assert (tmp_path / "n.dot").read_text().startswith('digraph "lenet5" {')


def test_draw_without_graphviz_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["draw", str(ROOT / "specs" / "lenet5.yaml"), "-o", str(tmp_path / "n.svg")]) == 1
    err = capsys.readouterr().err
    assert err == ("netc: error: netc draw needs Graphviz's 'dot', which is not installed (Debian/Ubuntu: "
                   "apt-get install -y graphviz)\n")
    assert not (tmp_path / "n.svg").exists()


def test_draw_refuses_an_unknown_picture_format(tmp_path, capsys):
    assert main(["draw", str(ROOT / "specs" / "lenet5.yaml"), "-o", str(tmp_path / "n.jpg")]) == 1
    assert "must end in .svg, .png or .dot" in capsys.readouterr().err
