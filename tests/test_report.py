"""Reports: totals by hand, the stable JSON/CSV/Markdown shapes, and training memory."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from netcompiler.check import load
from netcompiler.cli import main
from netcompiler.report import build_report, format_report

ROOT = Path(__file__).resolve().parents[1]
LAYER_KEYS = {"index", "name", "kind", "input_shape", "output_shape", "params", "macs", "flops", "activations"}
TOP_KEYS = {"name", "input", "layers", "total_params", "total_macs", "total_flops"}


def report(spec: str, **kw) -> dict:
    return build_report(load(ROOT / f"specs/{spec}.yaml"), **kw)


def test_lenet5_totals():
    rep = report("lenet5")
    assert rep["total_params"] == 61706
    assert rep["total_macs"] == 117600 + 240000 + 48000 + 10080 + 840 == 416520
    assert [r["macs"] for r in rep["layers"] if r["macs"]] == [117600, 240000, 48000, 10080, 840]
    assert [r["params"] for r in rep["layers"] if r["params"]] == [156, 2416, 48120, 10164, 850]
    # FLOPs by the documented convention: conv/linear 2*MACs + bias, relu 1, 2x2 max-pool 3 compares
    assert [r["flops"] for r in rep["layers"]] == [239904, 4704, 3528, 481600, 1600, 1200, 0, 96120, 120,
                                                   20244, 84, 1690]
    assert rep["total_flops"] == 850794
    # backward: conv/linear 4*MACs + bias, relu 1, max-pool 1 per output; + loss 5 per class;
    # conv1 reads the network input, so its input gradient (2 * 117,600) is not computed
    assert rep["training_flops"] == 850794 + 1680682 - 2 * 117600 + 50 == 2296326
    assert rep["layers"][0]["backward_flops"] == 2 * 117600 + 4704
    # the four ReLUs are fused into their neighbours (no outputs of their own), flatten is a view
    assert [r["activations"] for r in rep["layers"]] == [4704, 0, 1176, 1600, 0, 400, 0, 120, 0, 84, 0, 10]
    assert [r["fused_into"] for r in rep["layers"] if r["kind"] == "relu"] == [
        ["conv1", "pool1"], ["conv2", "pool2"], ["fc1", "fc2"], ["fc2", "fc3"]]
    assert rep["input"] == [1, 28, 28] and rep["output"] == [10]


@pytest.mark.parametrize("spec, params, output", [
    ("lenet5_nobias", 61684, [10]),
    ("alphabet", 137178, [26]),
    ("cifar", 2596, [10]),
    ("fashion_convnet", 135562, [10]),
])
def test_spec_totals(spec, params, output):
    rep = report(spec)
    assert rep["total_params"] == params
    assert rep["output"] == output
    assert rep["layers"][-1]["output_shape"] == output


def test_cifar_ends_in_10_outputs_and_counts_buffers():
    rep = report("cifar")
    assert rep["layers"][-1]["kind"] == "flatten"
    assert rep["layers"][-1]["output_shape"] == [10]
    assert rep["total_buffers"] == 2 * 5 + 2 * 7  # running mean and variance, not parameters
    assert [r["params"] for r in rep["layers"] if r["kind"] == "batchnorm2d"] == [10, 14]


def test_alphabet_macs():
    rep = report("alphabet")
    # 32*26*26*9 + 64*11*11*32*9 + 128*4*4*64*9 + 512*64 + 64*128 + 128*26
    assert rep["total_macs"] == 194688 + 2230272 + 1179648 + 32768 + 8192 + 3328


def test_json_has_stable_keys():
    rep = json.loads(format_report(report("lenet5"), "json"))
    assert TOP_KEYS <= set(rep)
    assert rep["name"] == "lenet5"
    assert rep["input"] == [1, 28, 28]
    assert (rep["total_params"], rep["total_macs"], rep["total_flops"]) == (61706, 416520, 850794)
    assert len(rep["layers"]) == 12
    for i, row in enumerate(rep["layers"], start=1):
        assert LAYER_KEYS <= set(row)
        assert row["index"] == i
        assert all(isinstance(row[k], int) for k in ("params", "macs", "flops", "activations"))
        assert all(isinstance(d, int) for d in row["input_shape"] + row["output_shape"])
    assert {k: rep["layers"][3][k] for k in LAYER_KEYS} == {
        "index": 4, "name": "conv2", "kind": "conv2d", "input_shape": [6, 14, 14], "output_shape": [16, 10, 10],
        "params": 2416, "macs": 240000, "flops": 481600, "activations": 1600}


def test_csv_parses_one_row_per_layer():
    text = format_report(report("alphabet"), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 16
    assert {"index", "name", "kind", "input_shape", "output_shape", "params", "macs", "flops",
            "activations"} <= set(rows[0])
    assert [r["name"] for r in rows[:3]] == ["conv1", "pool1", "gelu1"]
    assert rows[0]["output_shape"] == "32x26x26"
    assert sum(int(r["params"]) for r in rows) == 137178
    assert rows[1]["options"] == "kernel_size=2, ceil_mode=true"


def test_markdown_has_a_table():
    text = format_report(report("lenet5"), "markdown")
    lines = text.splitlines()
    head = lines.index("| # | name | kind | input | output | params | MACs | FLOPs | activations |")
    assert set(lines[head + 1]) <= set("|-:")
    rows = [l for l in lines[head + 2:] if l.startswith("|")]
    assert len(rows) == 12
    assert rows[0] == "| 1 | conv1 | conv2d | 1x28x28 | 6x28x28 | 156 | 117,600 | 239,904 | 4,704 |"
    assert all(r.count("|") == 10 for r in rows)
    assert "- parameters: 61,706" in text


def test_text_table_total_row():
    text = format_report(report("lenet5"), "text")
    total = next(l for l in text.splitlines() if l.split()[:1] == ["total"])
    assert total.split() == ["total", "1x28x28", "10", "61,706", "416,520", "850,794", "8,094"]


def test_training_memory_is_linear_in_batch_size():
    fixed = 4 * 61706 * 4          # parameters, gradients and two Adam moments, float32
    # saved outputs (4704 + 1176 + 1600 + 400 + 120 + 84 + 10 = 8094 floats; fused ReLUs have none)
    # and their gradients + int32 argmax
    per_sample = 2 * 8094 * 4 + 4 * 1576
    for b in (1, 2, 7, 64):
        mem = report("lenet5", batch_size=b)["training_memory"]
        assert mem["activation_bytes"] == b * per_sample
        assert mem["total_bytes"] == fixed + b * per_sample
    assert report("lenet5", batch_size=1)["training_memory"]["total_bytes"] == 1058352


def test_training_memory_by_optimizer_and_dtype():
    sgd = report("lenet5", batch_size=1, optimizer="sgd")["training_memory"]
    momentum = report("lenet5", batch_size=1, optimizer="momentum")["training_memory"]
    f64 = report("lenet5", batch_size=1, dtype="float64")["training_memory"]
    assert sgd["optimizer_bytes"] == 0
    assert momentum["optimizer_bytes"] == 61706 * 4
    assert f64["params_bytes"] == 61706 * 8
    assert f64["activation_bytes"] == 2 * 8094 * 8 + 4 * 1576


def test_winograd_weights_count_in_memory():
    """alphabet's conv2 (32 -> 64 channels) and conv3 (64 -> 128) run Winograd: each keeps a copy
    of its 3x3 weights and 16 transformed planes of cin x cout (+ one vector of padding each)."""
    cache = (64 * 32 * 9 + 16 * (32 * 64 + 16)) + (128 * 64 * 9 + 16 * (64 * 128 + 16))
    for dtype, b in (("float32", 4), ("float64", 8)):
        mem = report("alphabet", batch_size=1, dtype=dtype)["training_memory"]
        assert mem["cache_bytes"] == cache * b
        assert mem["total_bytes"] == sum(v for k, v in mem.items() if k != "total_bytes")
    assert report("lenet5", batch_size=1)["training_memory"]["cache_bytes"] == 0
    assert "Winograd weights 1002.0 KiB" in format_report(report("alphabet"), "text")


def test_batchnorm_buffers_count_in_memory_not_params():
    mem = report("cifar", batch_size=1, optimizer="sgd")["training_memory"]
    assert mem["params_bytes"] == (2596 + 24) * 4
    assert mem["grads_bytes"] == 2596 * 4


def test_cli_report_batch_size(capsys):

    totals = []
    for b in (1, 2, 3):
        assert main(["report", str(ROOT / "specs/lenet5.yaml"), "--format", "json", "--batch-size", str(b)]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["batch_size"] == b
        totals.append((rep["training_memory"]["activation_bytes"], rep["training_memory"]["total_bytes"]))
    assert [a for a, _ in totals] == [71056, 142112, 213168]
    assert totals[2][1] - totals[1][1] == totals[1][1] - totals[0][1] == 71056


@pytest.mark.parametrize("fmt", ["text", "markdown", "json", "csv"])
def test_cli_report_formats(fmt, capsys):

    assert main(["report", str(ROOT / "specs/cifar.yaml"), "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "csv":
        assert len(list(csv.reader(io.StringIO(out)))) == 1 + 10
    elif fmt == "json":
        assert json.loads(out)["total_params"] == 2596
    else:
        assert "2,596" in out and "bn1" in out


def test_cli_report_bad_spec_is_an_error(capsys):

    assert main(["report", str(ROOT / "tests/specs/cifar_first.yaml")]) == 1
    err = capsys.readouterr().err
    assert "expected output 10, but it is 40" in err


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "tests/specs").glob("export_*.yaml")),
                         ids=lambda p: p.stem)
def test_cli_report_runs_on_every_spec_with_export_estimates(path, capsys):
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    # every spec here exports in float32 and int8: both have flash and RAM estimates
    assert "float32" in out and "int8" in out, out[-800:]
