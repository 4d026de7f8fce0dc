"""Logging: JSON lines (or readable text on a terminal), and export keys as short keyed hashes."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sys
import time
import traceback
from typing import Any

#: Fields copied from a record's ``extra`` into the log line, when present.
CONTEXT_FIELDS = (
    "job_id",
    "batch_id",
    "key_ref",
    "state",
    "attempt",
    "code",
    "status",
    "reason",
    "event",
    "bytes",
    "profiles",
    "seconds",
    "retry_in",
    "count",
)

#: Hex characters of the keyed hash logged in place of an export key (48 bits: enough to
#: correlate lines, too short to be a lookup table's key on its own).
KEY_REF_CHARS = 12


def key_ref(export_key: str, secret: bytes) -> str:
    """A short keyed hash of an export key: what logs carry instead of the key itself."""
    digest = hmac.new(secret, b"key-ref:" + export_key.encode(), hashlib.sha256).hexdigest()
    return digest[:KEY_REF_CHARS]


#: One encoder for every line (``json.dumps(..., default=str)`` builds a new one each call).
_ENCODE = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the context fields."""

    def __init__(self) -> None:
        super().__init__()
        # The formatted second, reused by every line within it (strftime is most of the
        # cost of a short line); one tuple, so threads always see a matching pair.
        self._second: tuple[int, str] = (-1, "")

    def _timestamp(self, created: float, msecs: float) -> str:
        second, text = self._second
        if int(created) != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            self._second = (int(created), text)
        return f"{text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record.__dict__
        for field in CONTEXT_FIELDS:
            value = fields.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
            # Where it happened, without the exception's message or any values (those can
            # carry personal data); enough for an engineer to find the bug.
            frames = traceback.extract_tb(record.exc_info[2])
            line["stack"] = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames[-12:]]
        return _ENCODE(line)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal, with the context fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
        base += f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = [
            f"{field}={record.__dict__[field]}"
            for field in CONTEXT_FIELDS
            if record.__dict__.get(field) is not None
        ]
        return base + ("  " + " ".join(extras) if extras else "")


def configure_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """Send this process's logs to stderr: JSON lines unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    logging.captureWarnings(True)  # library warnings become log lines too
    # The real stderr: in a celery worker's main process sys.stderr is celery's LoggingProxy,
    # which feeds records back into logging, where they are dropped (the inbox consumer's
    # and the watchdog's logs were lost).
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that log URLs (which can carry callback tokens) stay at WARNING.
    for noisy in ("urllib3", "werkzeug", "botocore", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Celery's DEBUG lines print task arguments, export keys among them: INFO at most.
    logging.getLogger("celery").setLevel(
        max(logging.getLevelNamesMapping().get(level.upper(), logging.INFO), logging.INFO)
    )
    # Celery's two lines per task ("received", "succeeded in"), most of a worker's lines:
    # our own name each step of each job. Failures (ERROR) stay; LOG_LEVEL=DEBUG shows all.
    quiet = logging.INFO if level.upper() == "DEBUG" else logging.WARNING
    for chatty in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(chatty).setLevel(quiet)
