"""Project exceptions: each carries the process exit code the CLI returns for it.

Exit codes (documented in README): 0 ok, 1 error, 2 usage, 3 store needs migration, 4 bad data,
5 locked, 6 forgetting above the limit.

The message is one line that names the file and the fix. Where the raising code knows them, `file` and
`fix` also carry them apart, so that `--json` can report them as fields without parsing the message.
"""

from __future__ import annotations

import os
from typing import Any


class IumadError(Exception):
    """Base of every error the project raises on purpose; message is one line naming file and fix."""

    exit_code: int = 1

    def __init__(self, message: str, *, file: str | os.PathLike[str] | None = None,
                 fix: str | None = None) -> None:
        super().__init__(message)
        self.file = None if file is None else os.fspath(file)
        self.fix = fix

    def to_json(self) -> dict[str, Any]:
        """The `--json` error record: {"error", "code", "file", "fix"} (file and fix may be None)."""
        return error_record(str(self), self.exit_code, self.file, self.fix)


def error_record(message: str, code: int, file: str | None = None, fix: str | None = None) -> dict[str, Any]:
    """One error as `--json` prints it (also for errors that are not IumadErrors, e.g. bad options)."""
    return {"error": message, "code": code, "file": file, "fix": fix}


class UsageError(IumadError):
    """Wrong arguments or options (bad class name, unknown protocol, malformed config)."""

    exit_code = 2


class StoreNeedsMigration(IumadError):
    """The store schema is older than this code; run `iumad db upgrade`."""

    exit_code = 3


class DataError(IumadError):
    """Input data is unreadable or inconsistent (corrupt file, size mismatch, empty split, NaN geometry)."""

    exit_code = 4


class LockedError(IumadError):
    """Another writer holds the store lock."""

    exit_code = 5


class ForgettingLimitError(IumadError):
    """A step's forgetting measure exceeded `--max-forgetting`; the step was not promoted."""

    exit_code = 6


class StoreWriteError(IumadError):
    """A file could not be written (disk full, read-only or not permitted); nothing was half-written."""

    exit_code = 1
