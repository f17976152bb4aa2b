"""Progress of a long count (images embedded, ...): a bar with rate and ETA on a terminal,
plain lines (about every 10% and at the end) in a redirected log.

    show = progress_reporter("embedding", unit="img")
    show(128, 1000)   # terminal: "\\rembedding [###.....] 128/1000 (95 img/s, ETA 9s)"
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_reporter(label: str, unit: str = "items", stream: TextIO | None = None,
                      quiet: bool = False, width: int = 30) -> Callable[[int, int], None]:
    """``show(done, total)``: redraws one bar line on a TTY, else prints a line per ~10%."""
    out = sys.stderr if stream is None else stream
    tty = bool(getattr(out, "isatty", lambda: False)())
    start = time.monotonic()
    last_tenth = [-1]

    def show(done: int, total: int) -> None:
        if quiet:
            return
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        finished = done >= total
        eta = f"took {format_seconds(elapsed)}" if finished else (
            f"ETA {format_seconds((total - done) / rate)}" if rate > 0 else "ETA ?")
        counts = f"{done}/{total} ({rate:.0f} {unit}/s, {eta})"
        if tty:
            filled = int(width * done / max(total, 1))
            print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {counts}",
                  end="\n" if finished else "", file=out, flush=True)
            return
        tenth = int(10 * done / max(total, 1))
        if tenth > last_tenth[0] or finished:
            last_tenth[0] = tenth
            print(f"{label} {counts}", file=out, flush=True)

    return show
