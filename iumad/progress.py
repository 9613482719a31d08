"""Progress on stderr for long jobs: a live bar on a terminal, sparse plain lines otherwise (logs, CI).

Library code takes a `ProgressFn` callback (stage, done, total) and never prints; the CLI passes
`StderrProgress`.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

ProgressFn = Callable[..., None]
"""progress(stage, done, total, info="") — `info` is a short status such as the current loss."""


def no_progress(stage: str, done: int, total: int, info: str = "") -> None:
    """Default callback: report nothing."""


class StderrProgress:
    """Callable progress reporter; one line per stage every ~10% (or live redraw on a tty)."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: dict[str, int] = {}
        self._start: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if self.quiet:
            return
        info = f" {info}" if info else ""
        now = time.monotonic()
        start = self._start.setdefault(stage, now)
        pct = 100 if total <= 0 else int(100 * done / total)
        if self.tty:
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{stage}: {_bar(pct)} {done}/{total} {now - start:5.1f}s{info}{end}")
            self.stream.flush()
            return
        step = pct // 10
        if done >= total or step > self._last.get(stage, -1):
            self._last[stage] = step
            self.stream.write(f"{stage}: {done}/{total} ({pct}%) {now - start:.1f}s{info}\n")
            self.stream.flush()


def _bar(pct: int, width: int = 24) -> str:
    filled = width * pct // 100
    return "[" + "#" * filled + "-" * (width - filled) + "]"
