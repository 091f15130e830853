"""Files written atomically: a temporary file in the target's directory, flushed and
renamed over the target, so a reader sees the old file or the new one, never half of one.
Also the lock of a directory one process owns at a time (a run directory), and the
removal of temporary files such a process left behind when it was killed."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import NetcError, os_error_text

LOCK_NAME = ".netc.lock"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 is for secrets
EXEC_MODE = 0o777 & ~_umask()  # what a compiler gives the libraries it links


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(binary_file)` on a temporary file next to `path`, then rename it over `path`.
    An OSError (full disk, read-only directory) leaves `path` as it was and names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # see TEMP_NAME
    except OSError as exc:
        exc.filename = str(path)  # not the temporary name nobody asked for
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            exc.filename, exc.filename2 = str(path), None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# atomic_write's temporary names: mkstemp's 8 random characters between ".NAME." and ".tmp"
TEMP_NAME = r"\.{name}\.[a-z0-9_]{{8}}\.tmp"


def remove_stale_temps(directory: str | os.PathLike, names: Iterable[str], older_than: float | None = None
                       ) -> list[str]:
    """Remove the temporary files atomic_write left in `directory` for the files `names`
    (a process killed while writing one): regular files named exactly as atomic_write names
    them, nothing else.  Call it while owning the directory (`locked_directory`), when no
    other writer can be half-way, or with `older_than` (seconds since the file was last
    written) longer than any writer takes.  Returns the names removed."""
    pattern = re.compile("|".join(TEMP_NAME.format(name=re.escape(n)) for n in names))
    removed = []
    now = time.time()
    with os.scandir(directory) as entries:
        for e in entries:
            if not pattern.fullmatch(e.name):
                continue
            try:  # a concurrent writer may rename its temporary between the listing and here
                if not e.is_file(follow_symlinks=False) or (
                        older_than is not None and now - e.stat(follow_symlinks=False).st_mtime < older_than):
                    continue
                os.unlink(e.path)
            except FileNotFoundError:
                continue
            removed.append(e.name)
    return sorted(removed)


@contextlib.contextmanager
def locked_directory(directory: str | os.PathLike, what: str, hint: str) -> Iterator[Path]:
    """Own `directory` (created if missing) while the block runs: an exclusive flock on
    DIRECTORY/.netc.lock, which holds the owner's pid.  The kernel drops the lock when the
    process ends, however it ends (SIGKILL too), so a lock is never stale.  A second owner
    gets NetcError naming the holder's pid (`what`: who holds such locks, `hint`: what to do).
    A directory this call created and the block left empty is removed again (a run that
    failed before writing anything leaves nothing)."""
    directory = Path(directory)
    lock_path = directory / LOCK_NAME
    try:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
                raise NetcError(f"{directory} is in use by another {what} ({pid}); {hint}") from None
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its owner removed on leaving (below): lock the current one
    except OSError as exc:
        raise NetcError(f"cannot use {directory} as a directory: {os_error_text(exc, directory)}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield directory
    finally:
        if created and os.listdir(directory) == [LOCK_NAME]:
            lock_path.unlink(missing_ok=True)  # while still locked: a waiting opener then retries
            with contextlib.suppress(OSError):
                directory.rmdir()
        os.close(fd)  # releases the lock


class Refused(Exception):
    """Why `read_bounded` read nothing: `why` is "unreadable" (detail: the OS's words),
    "not_regular" (detail: what the file is) or "too_big" (size: its size, None when it
    grew past the limit while being read)."""

    def __init__(self, why: str, detail: str = "", size: int | None = None):
        super().__init__(why, detail, size)
        self.why, self.detail, self.size = why, detail, size


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a stat mode that is not a regular file."""
    import stat

    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path` when it is a regular file of at most `limit` bytes, else `Refused`.
    The file is opened without blocking (a FIFO nobody writes would hang a plain open) and its
    type checked on the open descriptor, so /dev/zero, a pipe or a directory is refused
    before any read; reading stops past `limit` even if the file grows meanwhile."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise Refused("unreadable", exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not_regular", file_kind(st.st_mode))
        if st.st_size > limit:
            raise Refused("too_big", size=st.st_size)
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(16 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Refused("unreadable", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise Refused("too_big")
    return b"".join(chunks)
