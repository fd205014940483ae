"""Log lines: every process (web, workers, scheduler, CLI) writes one line per event to
stderr, as text or as JSON objects (LOG_FORMAT).

An event's data goes in `extra={"fields": {...}}`: the JSON format makes each field a
key of its own, the text format appends them as key=value, so a line is searchable by
request id or slot either way.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
TEXT_LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fields_of(record: logging.LogRecord) -> dict:
    return getattr(record, "fields", None) or {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        # default=str: fields may hold datetimes, and a log line must never fail to print.
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The usual text line, with the event's fields appended as key=value."""

    def __init__(self):
        super().__init__(TEXT_LAYOUT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A message may carry what a client sent (a path): a line feed in it would start a
        # line that looks like the service's own.
        record.message = _escaped(record.message)
        line = super().formatMessage(record)
        pairs = (f"{name}={_text_value(value)}" for name, value in fields_of(record).items())
        return " ".join((line, *pairs))


def _escaped(text: str) -> str:
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)


def _text_value(value) -> str:
    text = str(value)
    # A value with spaces or control characters (a path from a client) is quoted, so
    # one line stays one line and its pairs stay apart.
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        return json.dumps(text)
    return text


FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}


class _ServiceHandler(logging.StreamHandler):
    """The root logger's handler that configure() installs, once per process."""


def configure(log_format: str) -> None:
    """Send every logger's lines to stderr in `log_format`; calling it again (another
    app in the same process) only changes the format."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _ServiceHandler)), None)
    if handler is None:
        handler = _ServiceHandler()
        root.addHandler(handler)
    handler.setFormatter(FORMATTERS[log_format]())
    root.setLevel(logging.INFO)
