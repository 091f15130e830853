"""netc train --distributed under mpirun (Open MPI, mpi4py) on localhost: 2 ranks against one
process and against an in-process emulation of the per-rank arithmetic, resume, a killed rank.
Skipped when mpirun or mpi4py is missing, except under CI=true (CI installs both)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_train import final_state, make_case

import netcompiler as nc
from netcompiler import weights as W
from netcompiler.check import load
from netcompiler.train import TrainOptions, read_metrics, to_inputs, train

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun")
TIMEOUT = 180  # seconds for one mpirun


def _missing() -> str | None:
    if MPIRUN is None:
        return "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install mpi4py)"
    return None


if _missing():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs the MPI tests: {_missing()}")
    pytest.skip(_missing(), allow_module_level=True)

# No bias: sgd/adam on a plain conv net; the batch-norm/dropout spec for the emulation test.
PLAIN = """name: plain
input: [1, 8, 8]
layers:
  - conv2d: {out_channels: 4, kernel_size: 3}
  - relu
  - flatten
  - linear: {out_features: 4}
loss: cross_entropy
train: {epochs: 2, batch_size: 15, lr: 0.01, mean: 0.3, std: 0.3}
"""
BN_DROPOUT = """name: bndrop
input: [1, 8, 8]
layers:
  - conv2d: {out_channels: 4, kernel_size: 3}
  - batchnorm2d
  - relu
  - dropout: {p: 0.3}
  - flatten
  - linear: {out_features: 4}
loss: cross_entropy
train: {epochs: 1, batch_size: 16, lr: 0.01, mean: 0.3, std: 0.3}
"""


def mpi_env(**extra) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    env.update(extra)
    return env


def mpirun_cmd(n: int, *args) -> list[str]:
    return [MPIRUN, "-np", str(n), "-x", "PYTHONPATH", sys.executable, *map(str, args)]


def mpirun(n: int, *args, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(mpirun_cmd(n, *args), capture_output=True, text=True, timeout=TIMEOUT, env=mpi_env())
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def netc_mpi(n: int, *args, ok: bool = True) -> subprocess.CompletedProcess:
    return mpirun(n, "-m", "netcompiler", "train", *args, "--threads", "1", "--no-progress", ok=ok)


def rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-30)) for k in a)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi")
    spec, data = make_case(d, n_train=100, n_test=31, spec=PLAIN)
    return d, spec, data


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-5)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_two_ranks_equal_one_process(case, dtype, tol, optimizer):
    """Same global batch (15: shares of 7 and 8; the last batch of 10: 5 and 5) and seed: 2 ranks
    give the single-process parameters and metrics, validation included, up to rounding."""
    d, spec, data = case
    one, two = d / f"one-{dtype}-{optimizer}", d / f"two-{dtype}-{optimizer}"
    train(TrainOptions(spec=spec, data=data, out=str(one), dtype=dtype, optimizer=optimizer, threads=1),
          progress=False)
    r = netc_mpi(2, spec, "--data", data, "--out", two, "--dtype", dtype, "--optimizer", optimizer)
    assert r.stdout.count("epoch 2/2:") == 1, r.stdout  # rank 0 alone prints
    assert "distributed: 2 ranks, global batch 15" in r.stdout
    a, b = final_state(two), final_state(one)
    assert rel_diff(a, b) <= tol
    assert rel_diff(a, b) > 0 or dtype == "float32"  # the sums are added in another order
    ma, mb = read_metrics(two / "metrics.csv"), read_metrics(one / "metrics.csv")
    for ra, rb in zip(ma, mb, strict=True):
        for k in ("train_loss", "val_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5)
        assert ra["train_acc"] == rb["train_acc"] and ra["val_acc"] == rb["val_acc"]


def emulate(spec: str, data: str, ranks: int, rank_seeds: bool = True) -> dict[str, np.ndarray]:
    """One epoch of BN_DROPOUT as N ranks compute it, in one process: each share of a batch gets
    its own batch-norm statistics and dropout seed (rank r: seed + r * 0x9E3779B97F4A7C15), the
    gradients are weighted by share and summed, the running statistics averaged."""
    network = load(spec)
    net = nc.compile(network, dtype="float64", threads=1)
    arrays = np.load(data)
    x = net.check_x(to_inputs(network, arrays["x"], 0.3, 0.3, False, "float64"))
    y = net.check_y(arrays["y"], len(x))
    net.set_optimizer("adam", lr=0.01)
    net.init(0)
    net.seed(0)
    order = np.random.default_rng(0).permutation(len(x))
    g, buf = net.grad_buffer, net.flat_buffers
    npar = g.size - 2
    for start in range(0, len(x), 16):
        batch = order[start:start + 16]
        m = len(batch)
        state, b0 = net.optimizer_state(), buf.copy()
        gsum, bsum = np.zeros(npar), np.zeros_like(buf)
        for r in range(ranks):
            buf[:] = b0
            seed = (int(state["dropout_seed"]) + r * 0x9E3779B97F4A7C15 * rank_seeds) % 2**64
            net.load_optimizer_state({**state, "dropout_seed": np.array(seed, np.uint64)})
            lo, hi = r * m // ranks, (r + 1) * m // ranks
            net.backward_batch(x, y, batch[lo:hi])
            gsum += g[:npar] * ((hi - lo) / m)
            bsum += buf
        g[:npar], buf[:] = gsum, bsum / ranks
        net.load_optimizer_state({**state, "dropout_counter": state["dropout_counter"] + np.uint64(1)})
        net.optimizer_step()
    return net.state_dict()


def test_batch_norm_per_rank_statistics_and_dropout_per_rank(tmp_path):
    """Batch norm normalises each rank's share with its own statistics (as PyTorch DDP), the
    running statistics are averaged, and each rank draws its own dropout masks."""
    spec, data = make_case(tmp_path, n_train=64, n_test=16, spec=BN_DROPOUT)
    netc_mpi(2, spec, "--data", data, "--out", tmp_path / "two", "--dtype", "float64")
    got = final_state(tmp_path / "two")
    assert rel_diff(got, emulate(spec, data, 2)) <= 1e-9
    # neither one process (whole-batch statistics) nor the same masks on both ranks
    assert rel_diff(got, emulate(spec, data, 1)) > 1e-6
    assert rel_diff(got, emulate(spec, data, 2, rank_seeds=False)) > 1e-6
    # reproducible
    netc_mpi(2, spec, "--data", data, "--out", tmp_path / "again", "--dtype", "float64")
    assert rel_diff(final_state(tmp_path / "again"), got) == 0


def test_batch_smaller_than_the_ranks_is_one_error(case):
    d, spec, data = case
    r = netc_mpi(2, spec, "--data", data, "--out", d / "bs1", "--batch-size", "1", ok=False)
    assert r.returncode != 0
    assert r.stderr.count("error: --batch-size 1 is the global batch, split across 2 ranks") == 1, r.stderr
    assert "Traceback" not in r.stderr


SCRIPT = """
import sys
from netcompiler.distributed import train
from netcompiler.train import TrainOptions
spec, data, out, mode = sys.argv[1:5]
opts = TrainOptions(spec=spec, data=data, out=out, threads=1, dtype="float64", chunk_batches=1,
                    epochs=int(sys.argv[5]), resume=mode == "resume")
if mode == "widths":  # one rank builds for 4-real vectors, the other for 8
    import os
    from mpi4py import MPI
    os.environ["NETC_VEC"] = "4" if MPI.COMM_WORLD.Get_rank() == 1 else "8"

def on_chunk(info):
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    if mode == "crash" and rank == 1 and info.chunks == 2:
        raise RuntimeError("simulated failure")
    if mode == "skew" and rank == 1 and info.chunks == 2:
        RUN[0].net.flat_params[0] += 1e-3
    if mode == "interrupt" and info.epoch == 2 and info.batches_done == 3 and rank == 0:
        import os, signal
        os.kill(os.getpid(), signal.SIGUSR1)  # as `kill -USR1 <mpirun pid>` forwards it

import netcompiler.distributed as D
RUN = []
setup = D.DistributedRun.setup
def keep(self):
    setup(self)
    RUN.append(self)
D.DistributedRun.setup = keep
try:
    D.train(opts, on_chunk=on_chunk, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
except D.NetcError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    p = tmp_path_factory.mktemp("script") / "run.py"
    p.write_text(SCRIPT)
    return p


def test_parameters_that_differ_across_ranks_stop_the_run(case, script):
    d, spec, data = case
    r = mpirun(2, script, spec, data, d / "skew", "skew", 2, ok=False)
    assert r.returncode != 0
    assert "error: the parameters differ across ranks after epoch 1 (ranks 1 differ from rank 0" in r.stderr, \
        r.stderr
    assert not (d / "skew" / "weights.npz").exists()


def test_ranks_built_for_different_vector_widths_stop_before_training(case, script):
    """The gradients are summed over the flat parameter arrays, whose layout (each tensor at whole
    vectors) follows the vector width: ranks that disagree on it say so before the first step."""
    d, spec, data = case
    r = mpirun(2, script, spec, data, d / "widths", "widths", 1, ok=False)
    assert r.returncode != 0
    assert "error: the ranks built the network for different vector widths (8, 4 reals, by rank)" in r.stderr, \
        r.stderr
    assert "Traceback" not in r.stderr and not (d / "widths" / "weights.npz").exists()


def test_an_error_on_one_rank_aborts_the_job(case, script):
    d, spec, data = case
    t0 = time.monotonic()
    r = mpirun(2, script, spec, data, d / "crash", "crash", 2, ok=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "RuntimeError: simulated failure" in r.stderr
    assert "error: rank 1 of 2 failed (above); aborting the job" in r.stderr, r.stderr


def test_help_shows_the_mpirun_command(capsys):
    from netcompiler.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "mpirun -np N netc train SPEC --data SRC" in out and "--batch-size is the global batch" in out


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_launchers_are_detected(monkeypatch, var):
    from netcompiler.distributed import WORLD_SIZE_VARS, launcher_world_size

    for v in WORLD_SIZE_VARS:
        monkeypatch.delenv(v, raising=False)
    assert launcher_world_size() == 1
    monkeypatch.setenv(var, "3")
    assert launcher_world_size() == 3


def test_interrupt_and_resume_under_two_ranks(case, script):
    """A stop asked of one rank mid-epoch is agreed at the next chunk; rank 0's checkpoint and
    --resume with 2 ranks give the uninterrupted run's weights bit for bit."""
    d, spec, data = case
    mpirun(2, script, spec, data, d / "whole", "plain", 3)
    r = mpirun(2, script, spec, data, d / "cut", "interrupt", 3, ok=False)
    assert r.returncode != 0, r.stdout + r.stderr
    ckpt = W.load_npz(d / "cut" / "checkpoint.npz", "checkpoint")
    pos = W.from_json_array(W.split(ckpt)[1], "position", "checkpoint")
    assert pos["epoch"] == 1 and pos["pos"] > 0, pos  # mid-epoch 2
    mpirun(2, script, spec, data, d / "cut", "resume", 3)
    a, b = final_state(d / "cut"), final_state(d / "whole")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert read_metrics(d / "cut" / "metrics.csv")[-1]["val_acc"] == read_metrics(
        d / "whole" / "metrics.csv")[-1]["val_acc"]


def _pids_with(marker: str, rank: int) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"NETC_TEST_MARK={marker}".encode() in env and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            found.append(int(p.name))
    return found


def test_a_killed_rank_stops_the_job_within_seconds(tmp_path):
    spec, data = make_case(tmp_path, n_train=2000, n_test=20, spec=PLAIN)
    out = tmp_path / "run"
    marker = uuid.uuid4().hex
    cmd = mpirun_cmd(2, "-m", "netcompiler", "train", spec, "--data", data, "--out", out, "--epochs", "10000",
                     "--threads", "1", "--no-progress")
    cmd[1:1] = ["-x", "NETC_TEST_MARK"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(NETC_TEST_MARK=marker))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.npz").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach an epoch end"
            time.sleep(0.1)
        victim = _pids_with(marker, 1)
        assert len(victim) == 1, victim
        os.kill(victim[0], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        stopped = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert stopped < 10, f"the job took {stopped:.1f} s to stop"
    assert "exited on signal 9" in err or "killed" in err.lower(), err
    assert not _pids_with(marker, 0), "rank 0 is still running"
    W.load_npz(out / "checkpoint.npz", "checkpoint")  # whole: written atomically


def test_sigusr1_to_mpirun_stops_with_a_checkpoint(tmp_path):
    """kill -USR1 <mpirun pid>: Open MPI forwards it to every rank; they stop at the next chunk
    and rank 0 writes the checkpoint, from which --resume under 2 ranks goes on."""
    spec, data = make_case(tmp_path, n_train=2000, n_test=20, spec=PLAIN)
    out = tmp_path / "run"
    cmd = mpirun_cmd(2, "-m", "netcompiler", "train", spec, "--data", data, "--out", out, "--epochs", "10000",
                     "--threads", "1", "--no-progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.npz").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach an epoch end"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.count("netc: SIGUSR1: stopping after the current chunk") == 1, err  # rank 0 alone speaks
    assert err.count("netc: interrupted; checkpoint saved") == 1, err
    assert err.splitlines().count("netc: interrupted") == 1, err
    done = len(read_metrics(out / "metrics.csv"))
    r = netc_mpi(2, spec, "--data", data, "--out", out, "--resume", "--epochs", done + 1)
    assert f"epoch {done + 1}/{done + 1}:" in r.stdout, r.stdout


def test_resume_with_another_rank_count_says_so(case):
    d, spec, data = case
    out = d / "ranks"
    netc_mpi(2, spec, "--data", data, "--out", out, "--epochs", 1)
    r = netc_mpi(1, spec, "--data", data, "--out", out, "--epochs", 2, "--resume", "--distributed")
    assert "note: the run used 2 processes, this session 1" in r.stdout, r.stdout


def test_bench_mpi_quick_runs(tmp_path):
    """bench/mpi.py launches its two configurations and prints both tables (no time asserted)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "mpi.py"), "--nets", "cifar", "--steps", "3",
                        "--reps", "1", "--allreduce-reps", "3", "--batch", "8", "--json", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=TIMEOUT, env=mpi_env())
    assert r.returncode == 0, r.stderr
    for text in ("cifar", "1 x 1", "1 x 2", "2 x 1", "min batch"):
        assert text in r.stdout, text
    assert (tmp_path / "o.json").exists()


def test_two_ranks_equal_one_process_with_a_recipe(case):
    """lr schedule per batch (onecycle), augmentation (keyed by the image's row), label smoothing
    and gradient clipping (of the reduced gradient): 2 ranks still give one process's result."""
    d, spec, data = case
    recipe = ["--lr-schedule", "onecycle", "--augment", "shift=1,hflip", "--label-smoothing", "0.1",
              "--clip-grad-norm", "0.5", "--dtype", "float64", "--threads", "1", "--no-progress"]
    one, two = d / "recipe-one", d / "recipe-two"
    r = subprocess.run([sys.executable, "-m", "netcompiler", "train", spec, "--data", data, "--out", str(one),
                        *recipe], capture_output=True, text=True, timeout=TIMEOUT, env=mpi_env())
    assert r.returncode == 0, r.stderr
    mpirun(2, "-m", "netcompiler", "train", spec, "--data", data, "--out", two, *recipe)
    assert rel_diff(final_state(two), final_state(one)) <= 1e-9
    ma, mb = read_metrics(two / "metrics.csv"), read_metrics(one / "metrics.csv")
    assert [r["lr"] for r in ma] == [r["lr"] for r in mb]


def test_two_ranks_train_towards_float_targets(tmp_path):
    """--target input on 2 ranks: the validation loss is the shares' losses weighted and summed,
    as one process computes it, and there is no accuracy (float targets have no classes)."""
    from test_train_targets import TINY_AE

    spec = tmp_path / "tiny_ae.yaml"
    spec.write_text(TINY_AE)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(40, np.int64), x_test=x[:13], y_test=np.zeros(13, np.int64))
    data, one, two = tmp_path / "d.npz", tmp_path / "one", tmp_path / "two"
    train(TrainOptions(spec=str(spec), data=str(data), out=str(one), target="input", epochs=1, batch_size=8,
                       threads=1), progress=False)
    netc_mpi(2, spec, "--data", data, "--out", two, "--target", "input", "--epochs", 1, "--batch-size", 8)
    (ra,), (rb,) = read_metrics(two / "metrics.csv"), read_metrics(one / "metrics.csv")
    assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    assert np.isnan(ra["val_acc"]) and np.isnan(rb["val_acc"])
