"""Smoke test of the benchmark: it runs and prints its tables.  No time is asserted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs(tmp_path):
    env = dict(os.environ, NETC_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--nets", "lenet5", "--threads", "1",
           "--batch", "8", "--no-onnx", "--no-build-time", "--min-time", "0.01", "--warmup", "0.01",
           "--reps", "2", "--samples", "32", "--json", str(tmp_path / "out.json")]
    # the budget is generous so a loaded machine does not fail the test; nothing is timed here
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Training throughput" in out
    assert "Inference latency" in out
    assert "netc/torch" in out
    assert "FP32 peak" in out
    assert (tmp_path / "out.json").exists()
