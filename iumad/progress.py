"""Progress on stderr for long jobs, drawn by `rich.progress`: live bars with rate and ETA on a terminal,
sparse plain lines otherwise (logs, CI, cron).

Library code takes a `ProgressFn` callback, `progress(stage, done, total, info="")`, and never prints;
the CLI passes a `StderrProgress`. A stage runs from its first report until `done >= total`; when the
same stage is reported again later (the next step evaluates the same class again), that is a new run
with its own clock, as is a report whose `done` went back. A run's clock starts at its first report,
so work already done by then (cached features, a first epoch reported after it ended) is not in its
time, and the rate counts only what was done after that report.
"""

from __future__ import annotations

import atexit
import time
from typing import Callable, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID,
                           TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

ProgressFn = Callable[..., None]
"""progress(stage, done, total, info="") — `info` is a short status such as the current loss."""

MIN_RATE_S = 1.0  # no rate (nor ETA) in a line before a run has lasted this long: two close reports are noise
SPEED_WINDOW_S = 3600.0  # rate and ETA from the whole run, not rich's 30 s window: an epoch can be longer


def no_progress(stage: str, done: int, total: int, info: str = "") -> None:
    """Default callback: report nothing."""


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed columns are for bytes or for tasks without a total)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.1f}/s", style="progress.data.speed")


class StderrProgress:
    """Callable progress reporter on stderr (or `stream`). On a terminal: one live bar per running stage,
    and a line that stays once a stage finishes; elsewhere: a line per stage at every 10 % and at the
    end. `clock` (seconds, monotonic) is injectable for tests; `terminal` overrides the detection."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False, *,
                 clock: Callable[[], float] = time.monotonic, terminal: bool | None = None) -> None:
        self.quiet = quiet
        self.console = Console(file=stream, stderr=stream is None, force_terminal=terminal, highlight=False,
                               soft_wrap=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.bars = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=self.console, transient=True, get_time=clock, disable=not self.live,
            speed_estimate_period=SPEED_WINDOW_S)
        self._runs: dict[str, TaskID] = {}  # stage -> its current run
        self._tenths: dict[TaskID, int] = {}  # plain lines: the last 10 % step printed per run
        self._closer_registered = False

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if self.quiet:
            return
        total = max(int(total), 0)
        task_id = self._runs.get(stage)
        if task_id is not None and done < self._task(task_id).completed:  # went back: a new run
            self._drop(stage)
            task_id = None
        if task_id is None:
            task_id = self.bars.add_task(stage, total=total, completed=done, info=info)
            self._runs[stage] = task_id
            if self.live:
                self._start_live()
        else:
            self.bars.update(task_id, total=total, completed=done, info=info)
        task = self._task(task_id)
        finished = done >= total
        if not self.live:
            tenth = 10 if finished else int(10 * done / total)
            if tenth > self._tenths.get(task_id, -1):
                self._tenths[task_id] = tenth
                self.console.print(self.line(task), markup=False)
        elif finished:
            self.bars.print(self.line(task), markup=False)
        if finished:
            self._drop(stage)

    @staticmethod
    def line(task: Task) -> str:
        """`stage: done/total (pct%) elapsed[, rate][, ETA][ info]`, the plain form of a run."""
        done, total = int(task.completed), int(task.total or 0)
        pct = 100 if total <= 0 else int(100 * done / total)
        text = f"{task.description}: {done}/{total} ({pct}%) {task.elapsed or 0.0:.1f}s"
        speed = task.finished_speed or (task.speed if (task.elapsed or 0.0) >= MIN_RATE_S else None)
        if speed:
            text += f", {speed:.1f}/s"
            if done < total:
                text += f", ETA {(total - done) / speed:.0f}s"
        info = task.fields.get("info")
        return f"{text} {info}" if info else text

    def close(self) -> None:
        """Stop the live display (restores the cursor); unfinished stages are dropped."""
        for stage in list(self._runs):
            self._drop(stage)
        self.bars.stop()

    def __enter__(self) -> StderrProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _task(self, task_id: TaskID) -> Task:
        return next(t for t in self.bars.tasks if t.id == task_id)

    def _drop(self, stage: str) -> None:
        task_id = self._runs.pop(stage)
        self._tenths.pop(task_id, None)
        self.bars.remove_task(task_id)
        if self.live and not self._runs:
            self.bars.stop()  # nothing runs: leave the terminal to the command's own output

    def _start_live(self) -> None:
        if not self._closer_registered:  # callers that never close (benchmarks) still get their cursor back
            atexit.register(self.close)
            self._closer_registered = True
        self.bars.start()
