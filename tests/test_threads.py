"""Thread counts: one rule for Net.threads, compile(threads=) and --threads."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import build, spec

import netcompiler as nc
from netcompiler import runtime
from netcompiler.check import check_text
from netcompiler.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = spec([3], ["linear: {out_features: 2}"], name="threads_tiny")
BAD = [0, -1, 1025, 10**9, 1.5, True, "2"]


@pytest.mark.parametrize("bad", BAD)
def test_one_rule_refuses_the_same_values_everywhere(bad):
    net = build(TINY)
    with pytest.raises(ValueError, match="from 1 to 1024"):
        net.threads = bad
    with pytest.raises(ValueError, match="from 1 to 1024"):
        runtime.check_threads(bad)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="from 1 to 1024"):  # refused before the build, not after
        nc.compile(check_text(TINY, "tiny.yaml"), dtype="float64", threads=bad)
    assert time.perf_counter() - t < 5
    assert net.threads == 1  # unchanged by the refused values


def test_none_means_all_available_cores_and_the_cap_is_accepted():
    net = build(TINY)
    net.threads = None
    assert net.threads == len(os.sched_getaffinity(0))
    net.threads = 1024
    assert net.threads == 1024
    net.threads = 1
    assert nc.compile(check_text(TINY, "tiny.yaml"), dtype="float64").threads == len(os.sched_getaffinity(0))


def test_per_thread_memory_is_bounded_before_allocating(monkeypatch):
    net = build(TINY)
    per_thread = (net.plan.num_params + max(net.plan.scratch_per_thread, 1)) * 8
    monkeypatch.setattr(runtime, "THREAD_MEMORY_LIMIT", 3 * per_thread)
    net.threads = 3
    with pytest.raises(ValueError, match="per-thread gradient sums.*use fewer threads"):
        net.threads = 4
    assert net.threads == 3
    net.threads = 1


@pytest.mark.parametrize("command", ["train", "verify"])
@pytest.mark.parametrize("value", ["0", "1000000000", "-3", "two"])
def test_cli_threads_is_a_one_line_error(command, value, tmp_path, capsys):
    args = [command, str(ROOT / "specs" / "lenet5.yaml"), "--threads", value]
    if command == "train":
        args += ["--data", "fashion-mnist", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    want = "not an integer: 'two'" if value == "two" else f"from 1 to 1024, got {value}"
    assert err.startswith(f"netc {command}: error: argument --threads:") and want in err, err
    assert not (tmp_path / "run").exists()
