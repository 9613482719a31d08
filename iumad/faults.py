"""Fault injection for crash-safety tests: inert unless IUMAD_FAULT names the phase being entered.

IUMAD_FAULT=<phase>        the process kills itself with SIGKILL at that phase (as a power cut would)
IUMAD_FAULT=raise:<phase>  it raises an error there instead (a bug inside the step)
IUMAD_FAULT=pause:<phase>  it waits there until the file named by IUMAD_FAULT_RELEASE exists (at most
                           60 s), so a test can act while a writer is known to be mid-step
Phases of a step: read, features, train, checkpoint, evaluate, promote; and write: inside every atomic
file write, after the temporary file is complete and before it is renamed into place; gc: after `iumad gc`
has marked versions removed and before it deletes their files.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from iumad.errors import IumadError

ENV = "IUMAD_FAULT"
STEP_PHASES = ("read", "features", "train", "checkpoint", "write", "evaluate", "promote")  # an add-class step's
PHASES = (*STEP_PHASES, "gc")


def reach(phase: str) -> None:
    """Mark that a step enters `phase`; only acts when the environment asks for a fault there."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    if wanted == phase:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"raise:{phase}":
        raise IumadError(f"fault injected at phase {phase!r} ({ENV}={wanted})")
    if wanted == f"pause:{phase}":
        release = Path(os.environ.get(f"{ENV}_RELEASE", "/nonexistent"))
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
