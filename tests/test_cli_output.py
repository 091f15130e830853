"""Output locations that cannot be written (a file in the way, a read-only file system, a full
disk): one line `netc: error: PATH: reason`, exit status 1, and nothing already written lost.

The tests run as root, for whom permission bits stop nothing: a read-only file system and a full
disk are simulated by making the system call fail with EROFS / ENOSPC."""
from __future__ import annotations

import errno
import os
import pathlib
from pathlib import Path

import pytest
from test_train import make_case

import netcompiler.fileio
from netcompiler import weights as W
from netcompiler.cli import main

ROOT = Path(__file__).resolve().parents[1]
LENET = str(ROOT / "specs" / "lenet5.yaml")


def netc(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, err: str, expected: str) -> None:
    assert rc == 1
    assert err == expected + "\n"


def fail_fsync(monkeypatch, code: int, when=lambda name: True) -> None:
    """Make fileio's fsync of a temporary file fail with `code` when `when(its name)`."""
    real = os.fsync

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if when(name):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(netcompiler.fileio.os, "fsync", fsync)


def fail_mkdir_under(monkeypatch, root: Path, code: int) -> None:
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **kw):
        if self == root or root in self.parents:
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


# ---- netc build -o ------------------------------------------------------------------------------
def test_build_out_under_a_file(tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine\n")
    rc, out, err = netc(capsys, "build", LENET, "-o", tmp_path / "a_file" / "sub")
    assert_one_line(rc, err, f"netc: error: {tmp_path}/a_file/sub: Not a directory (a file is in the way: a "
                             f"directory is needed there)")
    assert (tmp_path / "a_file").read_text() == "mine\n"


def test_build_out_is_a_file(tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine\n")
    rc, out, err = netc(capsys, "build", LENET, "-o", tmp_path / "a_file")
    assert_one_line(rc, err, f"netc: error: {tmp_path}/a_file: File exists (a file is in the way: a directory is "
                             f"needed there)")
    assert (tmp_path / "a_file").read_text() == "mine\n"


def test_build_out_read_only(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real = netcompiler.fileio.tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if Path(dir) == out_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir, ".lenet5.c.x1y2.tmp")))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(netcompiler.fileio.tempfile, "mkstemp", mkstemp)
    rc, out, err = netc(capsys, "build", LENET, "-o", out_dir)
    # the file asked for, not the temporary name
    assert_one_line(rc, err, f"netc: error: {out_dir}/lenet5.c: Read-only file system (choose a writable location)")
    assert list(out_dir.iterdir()) == []


def test_build_disk_full(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "b"
    fail_fsync(monkeypatch, errno.ENOSPC)
    rc, out, err = netc(capsys, "build", LENET, "-o", out_dir)
    assert_one_line(rc, err, f"netc: error: {out_dir}/lenet5.c: No space left on device (free some space; files "
                             f"written before are intact)")
    assert list(out_dir.iterdir()) == []  # no temporary file left behind


# ---- netc train --out ---------------------------------------------------------------------------
@pytest.fixture
def case(tmp_path):
    return make_case(tmp_path)


def test_train_out_is_a_file(tmp_path, case, capsys):
    spec, data = case
    (tmp_path / "a_file").write_text("mine\n")
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "a_file", "--threads", 1)
    assert_one_line(rc, err, f"netc: error: cannot use {tmp_path}/a_file as a directory: File exists (a file is in "
                             f"the way: a directory is needed there)")
    assert (tmp_path / "a_file").read_text() == "mine\n"
    assert "epoch" not in out  # refused before any training


def test_train_out_read_only(tmp_path, case, capsys, monkeypatch):
    spec, data = case
    fail_mkdir_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "ro" / "run", "--threads", 1)
    assert_one_line(rc, err, f"netc: error: cannot use {tmp_path}/ro/run as a directory: Read-only file system "
                             f"(choose a writable location)")


def test_train_disk_full_keeps_the_last_checkpoint(tmp_path, case, capsys, monkeypatch):
    spec, data = case
    run = tmp_path / "run"
    seen = []

    def second_epoch(name):  # every write from the second epoch's metrics.csv on fails
        seen.append(name)
        return sum(n.startswith(".metrics.csv.") for n in seen) >= 2

    fail_fsync(monkeypatch, errno.ENOSPC, second_epoch)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", run, "--epochs", 3, "--threads", 1)
    assert_one_line(rc, err, f"netc: error: {run}/metrics.csv: No space left on device (free some space; files "
                             f"written before are intact)")
    assert "epoch 1/3" in out and "epoch 2/3" not in out
    assert {p.name for p in run.iterdir()} == {".netc.lock", "spec.yaml", "normalization.json", "metrics.csv", "weights.npz",
                                               "best.npz", "checkpoint.npz"}  # no temporary files
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1
    assert int(W.load_npz(run / "checkpoint.npz")["__meta__/epoch"]) == 1
    monkeypatch.undo()
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", run, "--epochs", 3, "--threads", 1,
                        "--resume")
    assert rc == 0, err
    assert "resuming" in out and "epoch 3/3" in out


def test_cache_under_a_file(tmp_path, case, capsys, monkeypatch):
    spec, data = case
    (tmp_path / "a_file").write_text("mine\n")
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "run", "--threads", 1)
    assert rc == 1
    assert err.startswith(f"netc: error: cannot write the build cache {tmp_path}/a_file/cache/tiny-")
    assert "(set NETC_CACHE_DIR to a writable directory)" in err and err.count("\n") == 1
    assert err.endswith(": Not a directory (a file is in the way: a directory is needed there)\n")
