"""One `netc train` owns a run directory at a time; temporary files a killed run left
behind are removed by the next run, and no other file is."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from test_train import make_case

from netcompiler.cli import main
from netcompiler.fileio import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def train_cmd(spec, data, run, *extra):
    return [sys.executable, "-m", "netcompiler", "train", spec, "--data", data, "--out", str(run), "--threads", "1",
            "--epochs", "1", "--no-progress", *extra]


def test_a_second_train_on_a_locked_run_directory_is_refused(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from netcompiler.fileio import locked_directory
        with locked_directory({str(run)!r}, "netc train", "wait"):
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["train", spec, "--data", data, "--out", str(run), "--threads", "1", "--epochs", "1"])
        err = capsys.readouterr().err
        assert rc == 1
        assert err.strip() == (f"netc: error: {run} is in use by another netc train (pid {holder.pid}); wait for it "
                               f"to finish, or pass --out to train in another directory")
        assert not (run / "checkpoint.npz").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, the next run may start
        holder.wait()
    assert main(["train", spec, "--data", data, "--out", str(run), "--threads", "1", "--epochs", "1"]) == 0


def test_two_trains_started_together_one_fails(tmp_path):
    """Before the lock both exited 0 and one run's files silently replaced the other's."""
    spec, data = make_case(tmp_path)
    run = tmp_path / "run"
    subprocess.run(train_cmd(spec, data, tmp_path / "warm"), env=ENV, capture_output=True, timeout=300)  # cache
    procs = [subprocess.Popen(train_cmd(spec, data, run, "--seed", str(seed)), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    # refused by the lock, or (when the first already finished) by its checkpoint: never both written
    assert "is in use by another netc train (pid " in err or "already holds a checkpoint" in err, err
    assert "Traceback" not in err


def test_stale_temporary_files_are_removed_and_others_kept(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    stale = [".checkpoint.npz.k3j_x9q2.tmp", ".weights.npz.abcdefgh.tmp", ".metrics.csv.00000000.tmp"]
    kept = [".checkpoint.npz.mine.tmp", "checkpoint.npz.abcdefgh.tmp", ".checkpoint.npz.abcdefgh.tmp.bak",
            ".notes.txt.abcdefgh.tmp", ".checkpoint.npz.ABCDEFGH.tmp", ".checkpoint.npz.abcdefghi.tmp"]
    for name in stale + kept:
        (run / name).write_bytes(b"x" * 100)
    (run / ".weights.npz.dir12345.tmp").mkdir()  # not a regular file: kept
    (run / ".spec.yaml.link1234.tmp").symlink_to(tmp_path / "tiny.yaml")  # a link: kept, and its target
    assert main(["train", spec, "--data", data, "--out", str(run), "--threads", "1", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    names = {p.name for p in run.iterdir()}
    assert not names & set(stale)
    assert set(kept) | {".weights.npz.dir12345.tmp", ".spec.yaml.link1234.tmp", LOCK_NAME} <= names
    assert (tmp_path / "tiny.yaml").exists()
    assert f"removed {', '.join(sorted(stale))} from {run}" in err


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path, capsys):
    spec, _ = make_case(tmp_path)
    run = tmp_path / "new" / "run"
    assert main(["train", spec, "--data", str(tmp_path / "missing.npz"), "--out", str(run)]) == 1
    assert not run.exists()
    capsys.readouterr()
