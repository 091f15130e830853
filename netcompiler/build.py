"""Stage 5, compile and load: C text -> shared library (cached) -> cffi handle.

The library is built with the system C compiler (`$CC`, else cc) and loaded with
`cffi.FFI.dlopen`; cffi reads the declarations from the same API text the header holds.
Builds are cached under a hash of the source, header, flags and compiler version; every
file is written under a temporary name and renamed, so concurrent builds of one spec
both succeed.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, os_error_text
from .fileio import EXEC_MODE, atomic_write_text, remove_stale_temps
from .render import Rendered

WARNINGS = ["-Wall", "-Wextra"]
COMPILE_TIMEOUT = 600  # seconds
STALE_SECONDS = 2 * COMPILE_TIMEOUT  # a build's temporary file this old belongs to a killed build
# -ffp-contract=fast lets the compiler fuse multiply-adds (ISO C mode turns it off).
BASE_FLAGS = ["-std=c11", "-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno"]


CHOOSE_CC = "set CC to an installed C compiler (e.g. CC=gcc or CC=clang)"


def compiler() -> str:
    """$CC (a program name or path), else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        if not shutil.which(cc):
            raise BuildError(f"the C compiler CC='{cc}' was not found or is not executable; {CHOOSE_CC}")
        return cc
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise BuildError("no C compiler found (tried cc, gcc, clang): install gcc (apt-get install -y gcc) or set "
                         "CC")
    return cc


@functools.lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot run the C compiler '{cc}': {exc}; {CHOOSE_CC}") from None
    return out.stdout.splitlines()[0] if out.stdout else cc


@functools.lru_cache(maxsize=None)
def has_openmp(cc: str) -> bool:
    """Whether `cc -fopenmp` builds and links a shared object here."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "probe.c")
        src.write_text("#include <omp.h>\nint probe(void) { return omp_get_max_threads(); }\n")
        try:
            r = subprocess.run([cc, "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(Path(d, "probe.so"))],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False  # the build itself then says what is wrong with cc
        return r.returncode == 0


def default_flags(cc: str | None = None) -> list[str]:
    cc = cc or compiler()
    return BASE_FLAGS + (["-fopenmp"] if has_openmp(cc) else []) + WARNINGS


SHARED_MAGIC = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe")  # ELF, Mach-O


def cache_dir() -> Path:
    root = os.environ.get("NETC_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netcompiler"


FASTCALL_SOURCE = Path(__file__).resolve().parent / "fastcall.c"


@functools.lru_cache(maxsize=None)
def load_fastcall():
    """The `netcompiler_fastcall` extension module (Net.forward's fast path, fastcall.c), or
    None when it cannot be built here (no Python or numpy headers, no compiler) or
    NETC_NO_FASTCALL is set; Net.forward then keeps its cffi path.  Built once per source,
    interpreter, numpy and compiler version, in the cache, like the networks."""
    if os.environ.get("NETC_NO_FASTCALL"):
        return None
    import importlib.machinery
    import importlib.util
    import sys
    import sysconfig

    import numpy

    try:
        cc = compiler()
        source = FASTCALL_SOURCE.read_text()
        includes = [sysconfig.get_paths()["include"], numpy.get_include()]
        key = hashlib.sha256("\0".join([source, sys.version, numpy.__version__, compiler_version(cc), *includes])
                             .encode()).hexdigest()[:20]
        directory = cache_dir() / f"fastcall-{key}"
        so_path = directory / f"netcompiler_fastcall{importlib.machinery.EXTENSION_SUFFIXES[0]}"
        if not so_path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            compile_shared(cc, ["-std=c11", "-O2", *WARNINGS, *(f"-I{i}" for i in includes)], FASTCALL_SOURCE,
                           so_path, f"netcompiler's extension {FASTCALL_SOURCE}")
        spec = importlib.util.spec_from_file_location("netcompiler_fastcall", so_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (OSError, ImportError, BuildError):
        return None


def compile_shared(cc: str, args: list[str], c_path: Path, so_path: Path, what: str) -> None:
    """`cc args -fPIC -shared c_path -lm` into so_path, through a temporary file renamed into
    place, so concurrent builds both succeed; BuildError (naming `what`) when it fails."""
    fd, tmp_so = tempfile.mkstemp(dir=so_path.parent, prefix=f".{so_path.name}.", suffix=".tmp")  # fileio.TEMP_NAME
    os.close(fd)
    cmd = [cc, *args, "-fPIC", "-shared", "-o", tmp_so, str(c_path), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        Path(tmp_so).unlink(missing_ok=True)
        raise BuildError(f"compiling {c_path} failed: {exc}") from None
    if proc.returncode != 0:
        Path(tmp_so).unlink(missing_ok=True)
        raise BuildError(f"the C compiler failed on {what} (command: {shlex.join(cmd)}):\n{proc.stderr.strip()}")
    with open(tmp_so, "rb") as f:
        magic = f.read(4)
    if magic not in SHARED_MAGIC:  # e.g. CC=true: exit status 0 and nothing written
        Path(tmp_so).unlink(missing_ok=True)
        raise BuildError(f"the C compiler '{cc}' exited 0 but wrote no shared library ("
                         f"{'an empty file' if not magic else 'not an ELF or Mach-O file'}) for {what}; {CHOOSE_CC}")
    os.chmod(tmp_so, EXEC_MODE)  # mkstemp made it 0600
    os.replace(tmp_so, so_path)


@dataclass
class Built:
    c_path: Path
    h_path: Path
    so_path: Path  # NAME.so, the library a user sees
    flags: list[str]
    cached: bool
    load_path: Path  # the file to dlopen: its name is distinct per build (see compile_rendered)


def compile_rendered(rendered: Rendered, out_dir: Path | None = None, flags: list[str] | None = None,
                     cc: str | None = None) -> Built:
    """Write NAME.c / NAME.h and compile NAME.so.  Without out_dir, use the cache.

    dlopen of a path already loaded returns the library loaded first, so a process that built
    two networks of one name, or one spec as float32 then float64, into one out_dir would run
    the first library on the second network's arrays.  A build in out_dir is therefore loaded
    from `.NAME-KEY.so` beside NAME.so (the same file, hard-linked or copied), KEY being the
    build's content hash; the cache's directories are already named by it."""
    cc = cc or compiler()
    flags = list(flags) if flags is not None else default_flags(cc)
    key = hashlib.sha256("\0".join([rendered.source, rendered.header, " ".join(flags),
                                    compiler_version(cc)]).encode()).hexdigest()[:20]
    directory = Path(out_dir) if out_dir is not None else cache_dir() / f"{rendered.name}-{key}"
    try:
        return _compile_into(rendered, directory, key, out_dir is not None, flags, cc)
    except OSError as exc:  # the directory cannot be made or written: read-only, under a file, disk full
        if out_dir is not None:
            raise  # a path the user named: the CLI reports it (cli.main, errors.os_error_text)
        raise BuildError(f"cannot write the build cache {directory} (set NETC_CACHE_DIR to a writable "
                         f"directory): {os_error_text(exc, directory)}") from None


def _compile_into(rendered: Rendered, directory: Path, key: str, own_dir: bool, flags: list[str], cc: str) -> Built:
    directory.mkdir(parents=True, exist_ok=True)
    name = rendered.name
    c_path, h_path, so_path = directory / f"{name}.c", directory / f"{name}.h", directory / f"{name}.so"
    load_path = directory / f".{name}-{key}.so" if own_dir else so_path
    stamp = directory / f".{name}.key"
    if so_path.exists() and load_path.exists() and stamp.exists() and stamp.read_text() == key:
        return Built(c_path, h_path, so_path, flags, True, load_path)
    atomic_write_text(c_path, rendered.source)
    atomic_write_text(h_path, rendered.header)
    # what killed builds left: no build runs longer than the compiler's timeout
    remove_stale_temps(directory, {p.name for p in (c_path, h_path, so_path, load_path, stamp)}, STALE_SECONDS)
    cached = load_path != so_path and load_path.exists()  # built here before, then replaced by another build
    if not cached:
        compile_shared(cc, flags, c_path, load_path, f"generated file {c_path}")
    if load_path != so_path:
        _link_or_copy(load_path, so_path)
        for old in directory.glob(f".{name}-*.so"):  # other builds' copies: NAME.so is no longer them
            if old != load_path and re.fullmatch(rf"\.{name}-[0-9a-f]{{20}}\.so", old.name):
                old.unlink(missing_ok=True)
    atomic_write_text(stamp, key)
    return Built(c_path, h_path, so_path, flags, cached, load_path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the file src is (a hard link, or a copy where links fail), atomically."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")  # unique, as fileio.TEMP_NAME: builds may race
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
