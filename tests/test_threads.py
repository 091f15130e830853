"""Thread counts: one rule for Net.threads, compile(threads=) and --threads; and the OpenMP
wait setting that netcompiler puts in the environment before any network is loaded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build, spec

import netcompiler as nc
from netcompiler import build as build_mod
from netcompiler import runtime
from netcompiler.check import check_text
from netcompiler.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = spec([3], ["linear: {out_features: 2}"], name="threads_tiny")
BAD = [0, -1, 1025, 10**9, 1.5, True, "2"]


@pytest.mark.parametrize("bad", BAD)
def test_one_rule_refuses_the_same_values_everywhere(bad, monkeypatch):
    net = build(TINY)
    with pytest.raises(ValueError, match="from 1 to 1024"):
        net.threads = bad
    with pytest.raises(ValueError, match="from 1 to 1024"):
        runtime.check_threads(bad)

    def no_build(*a, **kw):
        raise AssertionError("compile() built before checking threads")

    monkeypatch.setattr(build_mod, "compile_rendered", no_build)
    with pytest.raises(ValueError, match="from 1 to 1024"):  # refused before the build
        nc.compile(check_text(TINY, "tiny.yaml"), dtype="float64", threads=bad)
    assert net.threads == 1  # unchanged by the refused values


def _no_load(monkeypatch):
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(runtime, "_load_seen", None)


def test_none_means_all_available_cores_and_the_cap_is_accepted(monkeypatch):
    _no_load(monkeypatch)
    net = build(TINY)
    net.threads = None
    assert net.threads == len(os.sched_getaffinity(0))
    net.threads = 1024
    assert net.threads == 1024
    net.threads = 1
    assert nc.compile(check_text(TINY, "tiny.yaml"), dtype="float64").threads == len(os.sched_getaffinity(0))


def _stat(rows: dict[int, tuple[int, int]], extra: str = "") -> str:
    """/proc/stat text: cpuN lines with (busy, idle) ticks (busy as user time)."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"] + [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (b, i) in rows.items()]
    return "\n".join(lines) + "\n" + extra + "intr 12345\n"


def test_busy_cores_reads_other_processes_load_from_proc_stat(tmp_path):
    """busy_cores: the busy ticks of this process's cores over the window, as cores' worth
    (100 ticks passed on each core: one core busy throughout is 1.0, another half busy 0.5);
    cores outside the affinity are not counted; an unreadable or damaged file is no load."""
    stat = tmp_path / "stat"
    stat.write_text(_stat({0: (1000, 5000), 1: (2000, 5000), 2: (0, 0)}))

    def after(_window):  # the window passes: core 0 busy throughout, core 1 half, core 2 (not ours) busy
        stat.write_text(_stat({0: (1100, 5000), 1: (2050, 5050), 2: (100, 0)}))

    got = runtime.busy_cores(stat=str(stat), sleep=after, cpus={0, 1})
    assert got == pytest.approx(1.5, abs=0.02)  # less this process's own few ticks, if any
    stat.write_text(_stat({0: (1000, 5000)}))
    assert runtime.busy_cores(stat=str(stat), sleep=lambda w: None, cpus={0}) == 0.0  # no time passed
    assert runtime.busy_cores(stat=str(tmp_path / "missing"), sleep=lambda w: None, cpus={0}) == 0.0
    stat.write_text("cpu0 a b c d e f g h\n")
    assert runtime.busy_cores(stat=str(stat), sleep=lambda w: None, cpus={0}) == 0.0
    stat.write_text(_stat({0: (1000, 5000)}))  # core 1 missing
    assert runtime.busy_cores(stat=str(stat), sleep=lambda w: None, cpus={0, 1}) == 0.0


@pytest.mark.parametrize("busy, cores, expect", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (1.7, 2, 1),
                                                 (1.0, 4, 3), (2.5, 4, 1), (3.9, 4, 1), (0.0, 1, 1), (1.0, 1, 1)])
def test_default_threads_leaves_out_busy_cores(busy, cores, expect, monkeypatch):
    """The default count is the available cores less the busy ones (rounded half up), at
    least 1; a net made with threads=None, and `threads = None` later, take it."""
    monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    monkeypatch.setattr(runtime, "_load_seen", None)
    assert runtime.default_threads() == expect
    net = build(TINY)
    net.threads = None
    assert net.threads == expect
    assert nc.compile(check_text(TINY, "tiny.yaml"), dtype="float64").threads == expect


def test_default_threads_measures_once_per_load_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "busy_cores", lambda: calls.append(1) or 1.0)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(runtime, "_load_seen", None)
    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    assert [runtime.default_threads() for _ in range(5)] == [1] * 5 and len(calls) == 1
    assert runtime.default_threads(fresh=True) == 1 and len(calls) == 2  # measured again when asked
    clock[0] += runtime.LOAD_CACHE + 1
    monkeypatch.setattr(runtime, "busy_cores", lambda: calls.append(1) or 0.0)
    assert runtime.default_threads() == 2 and len(calls) == 3


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_busy_process_on_one_core_lowers_the_default(monkeypatch):
    """A real spinning process pinned to one of this process's cores: busy_cores sees about
    a core of load and the default leaves that core out (other load on the machine can only
    lower it further)."""
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "_load_seen", None)
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(proc.pid, {cores[-1]})
        import time
        time.sleep(0.3)
        assert runtime.busy_cores(window=0.2) >= 0.7
        assert runtime.default_threads() <= runtime.available_cores() - 1
    finally:
        proc.kill()
        proc.wait()


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


# ---- the OpenMP wait setting -------------------------------------------------------------------
PROBE = """
import os, sys
before = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
import netcompiler as nc
from netcompiler.check import check_text
after = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
net = nc.compile(check_text(sys.argv[1], "tiny.yaml"), dtype="float64", threads=2)
net.forward(__import__("numpy").zeros((4, 3)))
print(repr(before), repr(after), sep="\\n")
"""


def run_probe(tmp_path, **env) -> tuple[dict, dict, str]:
    """before/after the import, and libgomp's own report of what it read (OMP_DISPLAY_ENV)."""
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONPATH")}
    e.update(env, PYTHONPATH=str(ROOT), OMP_DISPLAY_ENV="verbose")
    proc = subprocess.run([sys.executable, "-c", PROBE, TINY], capture_output=True, text=True, env=e,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = (eval(line) for line in proc.stdout.splitlines()[-2:])  # noqa: S307 (our own repr)
    gomp = {line.split("=")[0].strip(): line.split("=", 1)[1].strip().strip("'") for line in proc.stderr.splitlines()
            if line.strip().startswith(("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))}
    return before, after, gomp


def openmp_built() -> bool:
    """Networks link libgomp here (GCC's OpenMP; clang's libomp reports its settings otherwise)."""
    from netcompiler.build import compiler, compiler_version, default_flags

    return "-fopenmp" in default_flags() and "clang" not in compiler_version(compiler()).lower()


@pytest.mark.skipif(not openmp_built(), reason="no libgomp here")
def test_import_sets_the_short_spin_before_libgomp_loads(tmp_path):
    before, after, gomp = run_probe(tmp_path)
    assert before == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    assert after == {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "100"}
    assert gomp.get("GOMP_SPINCOUNT") == "100", gomp  # libgomp itself read it (its default is 300000)


@pytest.mark.skipif(not openmp_built(), reason="no libgomp here")
@pytest.mark.parametrize("env, spin", [({"OMP_WAIT_POLICY": "active"}, "30000000000"),
                                       ({"OMP_WAIT_POLICY": "passive"}, "0"),
                                       ({"GOMP_SPINCOUNT": "5000"}, "5000")])
def test_a_user_setting_is_kept(tmp_path, env, spin):
    before, after, gomp = run_probe(tmp_path, **env)
    assert before == after == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, **env}
    assert gomp.get("GOMP_SPINCOUNT") == spin, gomp


@pytest.mark.skipif(not openmp_built(), reason="no libgomp here")
def test_the_cli_sets_it_too(tmp_path):
    from test_train import make_case

    spec_path, data = make_case(tmp_path)
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-m", "netcompiler", "train", str(spec_path), "--data", str(data),
                           "--epochs", "1", "--threads", "2", "--out", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(e, PYTHONPATH=str(ROOT), OMP_DISPLAY_ENV="verbose"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GOMP_SPINCOUNT = '100'" in proc.stderr, proc.stderr[-2000:]  # libgomp's report of what it read


def _interrupted(argv: list[str], monkeypatch) -> int:
    """`netc` run with argv, interrupted (Ctrl-C) at its third progress update."""
    import netcompiler.train

    update = netcompiler.train.Progress.update
    calls = {"n": 0}

    def interrupting_update(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return update(self, *a, **kw)

    monkeypatch.setattr(netcompiler.train.Progress, "update", interrupting_update)
    try:
        return main(argv)
    finally:
        monkeypatch.setattr(netcompiler.train.Progress, "update", update)


def test_resume_with_another_thread_count_says_what_happens(tmp_path, capsys, monkeypatch):
    from test_train import make_case

    spec_path, data = make_case(tmp_path)
    args = ["train", spec_path, "--data", data, "--out", str(tmp_path / "run")]
    assert _interrupted([*args, "--threads", "1"], monkeypatch) == 130
    capsys.readouterr()
    assert main([*args, "--threads", "2", "--resume"]) == 0
    out = " ".join(capsys.readouterr())
    assert "the run used 1 threads, this session 2" in out and "--threads 1 repeats it exactly" in out, out


def test_resume_without_threads_takes_the_runs_count(tmp_path, capsys, monkeypatch):
    """--resume without --threads continues on the run's own thread count, whatever the default
    is now (a busy core may have lowered it), so the weights are those of an uninterrupted run."""
    import numpy as np

    from test_train import make_case

    spec_path, data = make_case(tmp_path)
    whole = ["train", spec_path, "--data", data, "--out", str(tmp_path / "whole"), "--threads", "2"]
    assert main(whole) == 0
    args = ["train", spec_path, "--data", data, "--out", str(tmp_path / "run")]
    assert _interrupted([*args, "--threads", "2"], monkeypatch) == 130
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)  # the default here now: 1
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    out = " ".join(capsys.readouterr())
    assert "resuming on 2 threads as the run did (the default here now would be 1" in out, out
    a, b = np.load(tmp_path / "whole" / "weights.npz"), np.load(tmp_path / "run" / "weights.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files if not k.startswith("__meta__/"))


# ---- the default count --------------------------------------------------------------------------
@pytest.mark.parametrize("cgroup, files, quota", [
    ("0::/job\n", {"job/cpu.max": "50000 100000\n"}, 0.5),
    ("0::/job\n", {"job/cpu.max": "250000 100000\n"}, 2.5),
    ("0::/job\n", {"job/cpu.max": "max 100000\n"}, None),
    ("0::/\n", {}, None),  # no cpu.max: unknown
    ("4:cpu,cpuacct:/c\n1:name=systemd:/\n", {"cpu,cpuacct/c/cpu.cfs_quota_us": "100000\n",
                                               "cpu,cpuacct/c/cpu.cfs_period_us": "100000\n"}, 1.0),
    ("4:cpu,cpuacct:/c\n", {"cpu,cpuacct/c/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/c/cpu.cfs_period_us": "100000\n"},
     None),
])
def test_cgroup_cpu_quota(tmp_path, cgroup, files, quota):
    (tmp_path / "self_cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    assert runtime.cgroup_cpu_quota(str(tmp_path / "fs"), str(tmp_path / "self_cgroup")) == quota


def test_default_count_is_the_affinity_capped_by_the_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: None)
    assert runtime.available_cores() == affinity
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 0.5)  # --cpus 0.5: one thread
    assert runtime.available_cores() == 1
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: affinity + 8.0)  # more than the cores
    assert runtime.available_cores() == affinity
    net = build(TINY)
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 0.5)
    net.threads = None
    assert net.threads == 1
    net.threads = 1


# ---- one team of threads per call ---------------------------------------------------------
# batch norm (batch-level, between barriers), dropout, a conv whose gradients each thread sums
# apart, and linear layers on each thread's samples
TEAM = spec([1, 6, 6], ["conv2d: {out_channels: 3, kernel_size: 3, padding: 1}", "batchnorm2d", "relu",
                        "dropout: {p: 0.25}", "flatten", "linear: {out_features: 9}", "relu",
                        "linear: {out_features: 4}"], name="threads_team")


def _data(n, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def _trained(threads, count=37, batch=8):
    """Parameters and losses after train_batches over `count` rows (the last batch smaller
    than the team when count % batch < threads)."""
    import numpy as np

    net = build(TEAM, "float32", threads)
    net.set_optimizer("sgd", lr=0.05, momentum=0.9)
    x, y = _data(count)
    losses, correct = net.train_batches(x, y, np.arange(count, dtype=np.int64), batch)
    return {k: v.copy() for k, v in net.state_dict().items()}, losses, correct


def test_a_thread_count_gives_the_same_bits_on_every_run():
    import numpy as np

    a, la, ca = _trained(2)
    b, lb, cb = _trained(2)
    assert np.array_equal(la, lb) and np.array_equal(ca, cb)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_one_and_two_threads_agree_within_rounding():
    import numpy as np

    one, l1, _ = _trained(1)
    two, l2, _ = _trained(2)
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_train_batches_is_train_step_batch_by_batch():
    """One parallel region for all the batches gives what one call per batch gives, the last
    batch (5 rows, 1 in the second case) included."""
    import numpy as np

    for count in (37, 33):
        many, losses, correct = _trained(2, count)
        net = build(TEAM, "float32", 2)
        net.set_optimizer("sgd", lr=0.05, momentum=0.9)
        x, y = _data(count)
        steps = [net.train_step(x[i:i + 8], y[i:i + 8]) for i in range(0, count, 8)]
        assert np.array_equal(losses, np.array(steps)), count
        for k, v in net.state_dict().items():
            assert np.array_equal(v, many[k]), (count, k)
        assert net._optim.step == len(steps) and net._ctx.counter == len(steps)


def test_small_batches_run_on_one_thread():
    """Below plan.parallel_min_train samples a call does not wake a second thread: 2 threads
    give the bits of 1; forced onto a team of 2, the conv gradients (each thread sums its own
    samples) round differently."""
    import numpy as np

    net = build(TEAM, "float32", 2)
    n = 8
    assert net.plan.parallel_min_train > n and net.plan.parallel_min_eval > n
    x, y = _data(n, 3)
    grads = {}
    for threads, forced in ((1, False), (2, False), (2, True)):
        net.threads = threads
        net.seed(0)
        net._ctx.parallel_min_train = 1 if forced else net.plan.parallel_min_train
        grads[threads, forced] = net.loss_and_grad(x, y)[1]["conv1.weight"].copy()
    assert np.array_equal(grads[1, False], grads[2, False])
    assert not np.array_equal(grads[1, False], grads[2, True])


def test_parallel_min_follows_the_flops_per_sample():
    from netcompiler.plan import PARALLEL_MIN_FLOPS, parallel_min

    assert parallel_min(PARALLEL_MIN_FLOPS) == 1
    assert parallel_min(PARALLEL_MIN_FLOPS // 4) == 4
    assert parallel_min(PARALLEL_MIN_FLOPS // 4 + 1) == 4 and parallel_min(PARALLEL_MIN_FLOPS // 4 - 1) == 5
    assert parallel_min(10 * PARALLEL_MIN_FLOPS) == 1
