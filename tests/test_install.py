"""A normal install works: the wheel carries the templates and fastcall.c, and `netc` run from
a fresh virtualenv outside the checkout checks, builds and trains.  And the main job's script
(scripts/train_lenet5.sh) can be run twice without losing the first run.

Slow (a wheel build, a virtualenv and its dependencies from the package index): deselected by
default, run with `python -m pytest -m slow tests/test_install.py` (CI does).  The tests share
one wheel and virtualenv and run in file order.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What the checkout holds that a build must not see (a wheel built from a fresh clone has none).
LOCAL = shutil.ignore_patterns(".git", ".venv", "build", "runs", "dist", "__pycache__", "*.egg-info",
                               ".pytest_cache", ".hypothesis", "*.so")


def run(cmd, cwd, env, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(tmp, a copy of the tree, the wheel built from it, a new virtualenv with it installed, env)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=LOCAL)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["NETC_CACHE_DIR"] = str(tmp / "cache")
    dist = tmp / "dist"
    # as `pip install .` does: setuptools from the index in an isolated build environment
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src], tmp, env)
    wheel, = dist.glob("netcompiler-*.whl")
    venv_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    run([venv_dir / "bin" / "python", "-m", "pip", "install", "-q", wheel], tmp, env)
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return tmp, src, wheel, venv_dir, env


def test_wheel_holds_templates_and_fastcall(installed):
    _, _, wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.relative_to(ROOT / "templates").as_posix() for p in (ROOT / "templates").rglob("*.j2")}
    missing = sorted({f"netcompiler/templates/{t}" for t in templates} - names)
    assert not missing, f"the wheel lacks {missing}"
    assert "netcompiler/fastcall.c" in names


def test_installed_netc_checks_builds_and_trains_outside_the_checkout(installed):
    tmp, _, _, venv_dir, env = installed
    bin_dir = venv_dir / "bin"
    work = tmp / "work"  # cwd outside the checkout: only the installed package can be imported
    work.mkdir()
    spec = work / "lenet5.yaml"
    shutil.copy(ROOT / "specs" / "lenet5.yaml", spec)

    where = run([bin_dir / "python", "-c", "import netcompiler; print(netcompiler.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(venv_dir), where

    out = run([bin_dir / "netc", "check", spec], work, env)
    assert "ok (lenet5: 1x28x28 -> 10, 61,706 parameters)" in out
    run([bin_dir / "netc", "build", spec, "-o", work / "build"], work, env)
    assert (work / "build" / "lenet5.so").is_file() and (work / "build" / "lenet5.c").is_file()
    run([bin_dir / "netc", "train", spec, "--data", "fashion-mnist", "--limit", "256", "--epochs", "1",
         "--out", work / "run"], work, env)
    assert (work / "run" / "weights.npz").is_file()

    # Net.forward's C fast path is built from the installed fastcall.c where Python's headers are
    if Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        run([bin_dir / "python", "-c", "from netcompiler.build import load_fastcall; "
             "assert load_fastcall() is not None, 'fastcall extension not built'"], work, env)


def test_train_lenet5_script_twice_keeps_the_first_run(installed):
    """Run last: setup.sh re-installs the package into the virtualenv, editable from the copy."""
    _, src, _, venv_dir, env = installed
    (src / ".venv").symlink_to(venv_dir)  # an existing .venv/: setup.sh keeps it
    script = [src / "scripts" / "train_lenet5.sh", "--limit", "256", "--epochs", "1"]
    first = run(script, src, env)
    assert "run directory: runs/lenet5\n" in first and "accuracy" in first
    where = run([src / ".venv" / "bin" / "python", "-c", "import netcompiler; print(netcompiler.__file__)"],
                src.parent, env)
    assert Path(where.strip()) == src / "netcompiler" / "__init__.py"  # setup.sh installed into .venv
    weights = (src / "runs" / "lenet5" / "weights.npz").read_bytes()

    second = run(script, src, env)
    assert "run directory: runs/lenet5-2\n" in second
    assert (src / "runs" / "lenet5" / "weights.npz").read_bytes() == weights
    assert (src / "runs" / "lenet5-2" / "weights.npz").is_file()
