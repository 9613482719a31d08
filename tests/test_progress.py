"""Progress output: each run of a stage has its own clock (issue #16), read from what the reporter
prints in logs and on a terminal, with an injected clock (no sleeps, no wall time)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from iumad.continual.step import StepRequest, learn
from iumad.progress import StderrProgress, no_progress
from iumad.store.db import Store
from tests.tiny import tiny_config, tiny_data

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FINISHED = re.compile(r"^(?P<stage>.+): (?P<done>\d+)/(?P=done) \(100%\) (?P<seconds>\d+\.\d)s")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def finished(text: str) -> list[tuple[str, float]]:
    """(stage, seconds) of every finished-stage line, in order."""
    return [(m["stage"], float(m["seconds"])) for line in ANSI.sub("", text).replace("\r", "\n").splitlines()
            if (m := FINISHED.match(line))]


def feed(progress: StderrProgress, clock: Clock, reports: list[tuple[float, str, int, int]]) -> None:
    for t, stage, done, total in reports:
        clock.now = t
        progress(stage, done, total)


# Two steps that both read features and train: each stage is seen again long after its first run.
TWO_STEPS = [(0, "features", 0, 4), (2, "features", 2, 4), (5, "features", 4, 4),
             (5, "train", 0, 2), (15, "train", 1, 2), (25, "train", 2, 2),
             (100, "features", 0, 4), (101, "features", 4, 4),
             (101, "train", 0, 2), (131, "train", 2, 2)]


def test_each_run_of_a_stage_has_its_own_clock_in_logs() -> None:
    clock, out = Clock(), io.StringIO()
    feed(StderrProgress(out, clock=clock), clock, TWO_STEPS)
    assert finished(out.getvalue()) == [("features", 5.0), ("train", 20.0), ("features", 1.0), ("train", 30.0)]
    lines = out.getvalue().splitlines()
    assert "train: 1/2 (50%) 10.0s" in lines  # sparse: at 0 %, each further 10 % and the end
    assert len(lines) == 10 and all("\x1b" not in line for line in lines)  # plain text in a log


def test_each_run_of_a_stage_has_its_own_clock_on_a_terminal() -> None:
    clock, out = Clock(), io.StringIO()
    with StderrProgress(out, clock=clock, terminal=True) as progress:
        assert progress.live
        feed(progress, clock, TWO_STEPS)
    text = out.getvalue()
    assert "━" in text  # rich drew bars
    assert finished(text) == [("features", 5.0), ("train", 20.0), ("features", 1.0), ("train", 30.0)]


def test_rate_eta_info_and_a_stage_that_goes_back() -> None:
    clock, out = Clock(), io.StringIO()
    progress = StderrProgress(out, clock=clock)
    feed(progress, clock, [(0, "predict", 0, 10), (1, "predict", 2, 10), (3, "predict", 6, 10)])
    assert out.getvalue().splitlines()[-1] == "predict: 6/10 (60%) 3.0s, 2.0/s, ETA 2s"
    feed(progress, clock, [(50, "predict", 1, 10), (52, "predict", 10, 10)])  # restarted without finishing
    assert finished(out.getvalue()) == [("predict", 2.0)]
    clock.now = 60
    progress("train", 1, 1, "loss 0.5000")
    assert out.getvalue().splitlines()[-1] == "train: 1/1 (100%) 0.0s loss 0.5000"
    quiet = io.StringIO()
    StderrProgress(quiet, quiet=True)("train", 1, 1)
    assert quiet.getvalue() == "" and no_progress("train", 1, 1) is None


def test_two_incremental_steps_report_each_stage_with_its_own_time(tmp_path: Path) -> None:
    """A real two-step run: the clock advances one second per report, so a run's time is the number of
    reports between its first and its last; the second step's stages must not count the first step's."""
    data = tiny_data(tmp_path / "synth", seed=1, n_classes=2)
    config = tiny_config(tmp_path / "tiny.yaml", train={"epochs": 2})
    clock, out = Clock(), io.StringIO()
    reporter = StderrProgress(out, clock=clock)
    reports: list[tuple[float, str, int, int]] = []

    def progress(stage: str, done: int, total: int, info: str = "") -> None:
        clock.now += 1.0
        reports.append((clock.now, stage, done, total))
        reporter(stage, done, total, info)

    with Store.open(tmp_path / "store") as store:
        for name in ("disc", "ring"):
            learn(store, StepRequest(name, data, config=config), progress=progress)
    expected, begun, last = [], {}, {}
    for t, stage, done, total in reports:  # a run begins at a stage's first report, or when done goes back
        if stage not in begun or done < last[stage]:
            begun[stage] = t
        last[stage] = done
        if done >= total:
            expected.append((stage, t - begun.pop(stage)))
            del last[stage]
    assert finished(out.getvalue()) == expected
    runs = [stage for stage, _ in expected]
    repeated = {s for s in runs if runs.count(s) > 1}
    assert {"train", "evaluate disc"} <= repeated  # the same stages ran in both steps
    second_train = [seconds for stage, seconds in expected if stage == "train"][1]
    assert second_train == 2.0  # start -> epoch 1 -> epoch 2, not the time since the first step's training


def test_no_rate_or_eta_before_a_run_has_lasted_a_second() -> None:
    """Two reports a millisecond apart give a rate of noise (it printed 400100.0/s in the demo log)."""
    clock, out = Clock(), io.StringIO()
    progress = StderrProgress(out, clock=clock)
    feed(progress, clock, [(0.0, "synth", 0, 100), (0.001, "synth", 10, 100), (0.002, "synth", 20, 100),
                           (5.0, "synth", 50, 100)])
    early, late = [ANSI.sub("", line) for line in out.getvalue().splitlines() if "synth: 20/" in line or
                   "synth: 50/" in line]
    assert "/s" not in early and "ETA" not in early
    assert "/s" in late and "ETA" in late
