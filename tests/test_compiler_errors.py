"""A missing or wrong C compiler and an unusable build cache are one clear error line that
says what was tried and how to choose another (CLI: exit 1, no traceback)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import netcompiler as nc
from netcompiler import build
from netcompiler.check import check_text
from netcompiler.errors import BuildError

ROOT = Path(__file__).resolve().parent.parent
TINY = "name: tiny_cc\ninput: [1, 2, 2]\nlayers:\n  - flatten\n  - linear: {out_features: 2}\nloss: cross_entropy\n"


def netc(tmp_path, *args, **env):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    e = {**os.environ, "PYTHONPATH": str(ROOT), "NETC_NO_FASTCALL": "1", **env}
    return subprocess.run([sys.executable, "-m", "netcompiler", *args, str(spec)], capture_output=True, text=True,
                          env=e, cwd=tmp_path, timeout=300)


def one_error_line(r) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netc: error: "), r.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def fresh_probes():
    """compiler_version and has_openmp are cached per compiler name: keep other tests' out."""
    build.compiler_version.cache_clear()
    build.has_openmp.cache_clear()
    yield
    build.compiler_version.cache_clear()
    build.has_openmp.cache_clear()


def test_cc_that_does_not_exist(tmp_path):
    line = one_error_line(netc(tmp_path, "build", CC="no-such-cc", NETC_CACHE_DIR=str(tmp_path / "c")))
    assert "'no-such-cc'" in line and "CC=gcc" in line


def test_cc_that_writes_no_library(tmp_path):
    """CC=true exits 0 and writes nothing: that must not pass for a build (an empty NAME.so)."""
    for cmd in ("build", "show"):
        r = netc(tmp_path, cmd, "-o" if cmd == "build" else "--dtype", "out" if cmd == "build" else "float32",
                 CC="true", NETC_CACHE_DIR=str(tmp_path / "c"))
        if cmd == "show":  # show only renders: no compiler run
            assert r.returncode == 0, r.stderr
            continue
        line = one_error_line(r)
        assert "'true'" in line and "no shared library" in line and "CC=gcc" in line
        assert not (tmp_path / "out" / "tiny_cc.so").exists()


def test_cc_true_through_the_api(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "true")
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path))
    with pytest.raises(BuildError, match="wrote no shared library"):
        nc.compile(check_text(TINY, "tiny.yaml"))


def test_cache_dir_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("")
    cache = tmp_path / "afile" / "cache"
    line = one_error_line(netc(tmp_path, "verify", "--samples", "1", NETC_CACHE_DIR=str(cache)))
    assert str(cache) in line and "NETC_CACHE_DIR" in line and "Not a directory" in line


def test_cache_dir_read_only(monkeypatch, tmp_path):
    """chmod does not stop root: a read-only file system is simulated at mkdir."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path / "ro"))
    with pytest.raises(BuildError) as exc:
        nc.compile(check_text(TINY, "tiny.yaml"))
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "ro") in msg and "Read-only file system" in msg
    assert "NETC_CACHE_DIR" in msg


def test_a_damaged_library_in_the_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path))
    from netcompiler.render import render

    net = check_text(TINY, "tiny.yaml")
    flags = build.default_flags()
    so = build.compile_rendered(render(net, "float32", flags), flags=flags).so_path  # built, not loaded
    so.write_bytes(b"\x7fELF" + b"\0" * 60)  # damaged in the cache
    with pytest.raises(BuildError, match=f"cannot load the compiled library {so}.*remove {so.parent}"):
        nc.compile(net)
