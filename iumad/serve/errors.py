"""The one error shape every endpoint answers with: `{"error", "code", "field", "fix"}`, code = HTTP status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refused request; `field` names the form field at fault (None when it is the request as a whole)."""

    def __init__(self, status: int, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.fix = fix

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        return error_body(str(self), self.status, self.field, self.fix)


def error_body(message: str, status: int, field: str | None = None, fix: str | None = None) -> dict[str, Any]:
    """An error as JSON (also for errors that are not ApiErrors: 401, 404, 413 from the size guard)."""
    return {"error": message, "code": status, "field": field, "fix": fix}
