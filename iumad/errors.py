"""Project exceptions: each carries the process exit code the CLI returns for it.

Exit codes (documented in README): 0 ok, 1 error, 2 usage, 3 store needs migration, 4 bad data,
5 locked, 6 forgetting above the limit.
"""

from __future__ import annotations


class IumadError(Exception):
    """Base of every error the project raises on purpose; message is one line naming file and fix."""

    exit_code: int = 1


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
