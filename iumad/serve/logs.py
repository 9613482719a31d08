"""Log lines of `iumad serve`, on stderr: human text, or with `--json` one JSON object per line (time,
level, logger, message; an access line also its client, method, path, HTTP version and status) that a
log shipper can take as it is. The same configuration goes to uvicorn, so its own lines and every
worker's follow it."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")  # uvicorn.access's five arguments


class JsonLines(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(ACCESS_FIELDS):
            out.update(zip(ACCESS_FIELDS, record.args))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_config(as_json: bool) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary for the service and uvicorn (its `log_config`)."""
    formatter = {"()": f"{__name__}.JsonLines"} if as_json else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
                    for name in ("uvicorn", "uvicorn.access")}
        | {"uvicorn.error": {"level": "INFO"}, "alembic": {"level": "WARNING"}},  # a schema check is not news
        "root": {"handlers": ["stderr"], "level": "INFO"},
    }
