"""Smoke test of the benchmark: it runs and prints its tables.  No time is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs(tmp_path):
    pytest.importorskip("torch")
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


def test_busy_mode_runs_and_kills_its_busy_process(tmp_path):
    """bench/busy.py at minimal size: the default, all cores and 1 thread, with and without the busy process,
    and the busy process gone afterwards.  No time is asserted."""
    env = dict(os.environ, NETC_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, str(ROOT / "bench" / "busy.py"), "--nets", "lenet5", "--seconds", "0.01", "--reps", "1",
           "--samples", "64", "--batch", "8", "--json", str(tmp_path / "busy.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "busy.json").read_text())["results"]
    assert [r["load"] for r in rows] == ["none", "busy"]
    assert all(set(r["img_s"]) == {str(r["default_threads"]), str(r["all_threads"]), "1"}
               and 1 <= r["default_threads"] <= r["all_threads"] and all(v > 0 for v in r["img_s"].values())
               for r in rows)
    assert "default/1" in proc.stdout and "loadavg" in proc.stdout
    pid = rows[1]["busy_pid"]
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or b"getppid" not in cmdline.read_bytes()  # (unless the pid was reused)


def test_time_to_accuracy_quick_runs(tmp_path):
    """bench/tta.py --quick on a synthetic 28x28 data set: both sides train, both accuracies
    and wall times are printed and written.  No time or accuracy is asserted."""
    pytest.importorskip("torch")
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=rng.integers(0, 256, (600, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 600),
             x_test=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 300))
    env = dict(os.environ, NETC_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, str(ROOT / "bench" / "tta.py"), "--quick", "--net", "lenet5", "--threads", "1",
           "--data", str(tmp_path / "tiny.npz"), "--json", str(tmp_path / "tta.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final test accuracy: netc " in proc.stdout and "wall: netc " in proc.stdout
    got = json.loads((tmp_path / "tta.json").read_text())
    assert got["epochs"] == 1 and got["threads"] == 1
    for side in ("netc", "torch"):
        r = got[side]
        assert len(r["acc"]) == 1 and 0 <= r["acc"][0] <= 1 and r["wall"] > 0
    assert "512 training and 256 test images" in proc.stdout  # --quick's limits


def test_layer_profile_counts_every_layers_backward():
    """bench/prof_hook.py wraps each layer call of the forward and of backward_team (where the
    layer backwards are called) with a timer: after one training step every layer that has a
    backward has counted calls in the backward column.  No time is asserted."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    import prof_hook

    net, _ = prof_hook.profiled_net(str(ROOT / "specs" / "resnet8.yaml"), threads=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    net.set_optimizer("sgd", lr=0.0)
    prof_hook.reset_profile(net)
    net.train_step(x, np.array([1, 2], np.int32))
    rows = {lp.layer.name: d for lp, d in prof_hook.read_profile(net)}
    for name in ("conv1", "stack1.conv1", "stack1.bn1", "stack2.shortcut", "fc"):
        assert rows[name]["backward"][1] > 0 and rows[name]["train_forward"][1] > 0, name
    # a split batch norm (plan.split_layers): its two per-sample passes a direction, on each of
    # the 2 samples, and the step that combines their sums, all counted as its own
    assert rows["stack1.bn1"]["train_forward"][1] == rows["stack1.bn1"]["backward"][1] == 2 * 2 + 1
