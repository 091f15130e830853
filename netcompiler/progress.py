"""A one-line progress bar for training epochs.

On a terminal the line is redrawn in place ('\\r') after every chunk of batches; when the
stream is not a terminal (a log file, a pipe, a test) nothing is drawn and only the
per-epoch summary lines the caller prints appear.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def emit(text: str, stream: TextIO | None = None) -> None:
    """Print `text` to `stream` (stdout).  When the reader has gone away (`netc ... | head`),
    point stdout at /dev/null and carry on, rather than fail with BrokenPipeError."""
    stream = stream or sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`Progress(total, label)`; `update(done, loss=, acc=)` after each chunk; `close()`."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool | None = None,
                 start_done: int = 0):
        self.stream = stream or sys.stdout
        self.enabled = is_tty(self.stream) if enabled is None else enabled
        self.total, self.label = max(int(total), 1), label
        self.start_done = start_done  # samples already done before this session (resume)
        self.t0 = time.perf_counter()
        self.width = 0
        self.update(start_done)

    def update(self, done: int, loss: float | None = None, acc: float | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        parts = [f"{done}/{self.total}"]
        if rate:
            parts += [f"{rate:,.0f} img/s", f"eta {fmt_seconds(eta)}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if acc is not None:
            parts.append(f"acc {100 * acc:.2f}%")
        tail = " ".join(parts)
        columns = shutil.get_terminal_size((100, 20)).columns
        bar = max(10, min(30, columns - len(self.label) - len(tail) - 6))
        filled = int(bar * min(done, self.total) / self.total)
        line = f"{self.label} [{'#' * filled}{'.' * (bar - filled)}] {tail}"[:columns - 1]
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        """Erase the bar so the caller's summary line takes its place."""
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
