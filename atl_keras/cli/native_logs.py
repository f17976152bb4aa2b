"""Quiet native (C++) log lines that ``TF_CPP_MIN_LOG_LEVEL`` does not reach.

ScaNN and gRPC log through Abseil straight to file descriptor 2 ("I0000 00:00:... partitioner
...", "W0000 ... Could not normalize centroid due to zero norm ...": a note that a k-means
partition came out empty, not an error). :func:`filtered_native_stderr` routes descriptor 2
through a pipe whose reader drops Abseil INFO / WARNING lines and forwards everything else
(errors, fatal messages, anything not in Abseil's format) as it arrives. Python's own
``sys.stderr`` keeps writing to the terminal directly, so progress bars are not delayed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from typing import Iterator

#: Abseil's line prefix at INFO or WARNING: ``I1207 04:30:43.818500   11164 file.cc:58] ...`` (seconds
#: since the epoch, ``00:00:1796617843.8185``, before absl::InitializeLog).
ABSL_QUIET_LINE = re.compile(rb"^[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]+\] ")
#: What Abseil prints once before its first line when nobody called absl::InitializeLog().
ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def is_quiet_line(line: bytes) -> bool:
    """True for the native lines `filtered_native_stderr` drops."""
    return bool(ABSL_QUIET_LINE.match(line)) or line.rstrip(b"\r\n") == ABSL_PREAMBLE


def _forward(read_fd: int, out_fd: int) -> None:
    """Copy lines from `read_fd` to `out_fd` until EOF, dropping the quiet ones."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_quiet_line(line))
            if kept:
                os.write(out_fd, kept)
    if pending and not is_quiet_line(pending):
        os.write(out_fd, pending)


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Within the block, native writes to descriptor 2 lose Abseil INFO/WARNING lines."""
    sys.stderr.flush()
    terminal = os.dup(2)  # the real stderr
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    reader = threading.Thread(target=_forward, args=(read_fd, terminal), daemon=True,
                              name="native-stderr-filter")
    reader.start()
    python_stderr = replacement = sys.stderr
    if _writes_to_fd2(python_stderr):  # else (a test's capture object): leave it as it is
        replacement = io.TextIOWrapper(os.fdopen(os.dup(terminal), "wb", buffering=0),
                                       encoding=python_stderr.encoding or "utf-8", errors="backslashreplace",
                                       line_buffering=True, write_through=True)
        sys.stderr = replacement
    try:
        yield
    finally:
        if replacement is not python_stderr:
            sys.stderr = python_stderr
            replacement.close()
        os.dup2(terminal, 2)  # closes the pipe's last write end: the reader sees EOF
        reader.join(timeout=5)
        os.close(terminal)
