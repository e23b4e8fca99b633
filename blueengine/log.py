"""Logging for the CLI and step processes: time, level, step, replica and pid on every line."""

from __future__ import annotations

import json
import logging
import os
import time

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(where)s[%(process)d] %(name)s: %(message)s"


class _WhereFilter(logging.Filter):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        record.where = self.where
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "where": getattr(record, "where", ""),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(where: str, level: str | int = "INFO", json_lines: bool = False) -> None:
    """Send log records to stderr in the project's format; `where` names the process."""
    handler = logging.StreamHandler()
    handler.addFilter(_WhereFilter(where))
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def settings_from_env() -> tuple[str, bool]:
    """The log level and format chosen for this process and the ones it starts."""
    return os.environ.get("BLUEENGINE_LOG_LEVEL", "INFO"), os.environ.get(
        "BLUEENGINE_LOG_JSON", ""
    ) not in ("", "0")
