"""Log output of relay and edge: ``--log-format text|json`` and the peer-line throttle.

JSON is one object per line, for log pipelines (Loki, Elasticsearch, ``jq``)::

    {"time": "2026-12-01T12:00:00.123456+00:00", "level": "INFO",
     "logger": "quic_reverse.tunnel.relay", "message": "tcp 127.0.0.1:5123 -> ...",
     "client": "127.0.0.1:5123", "edge": "edgeA", "service": "ssh", "stream": 3,
     "bytes_up": 5120, "bytes_down": 1048576, "duration": 3.21}

The structured fields are the ``extra=`` fields the tunnel logs with (``edge``,
``instance``, ``service``, ``client``, ``stream``, ``bytes_up``, ``bytes_down``,
``duration``); a field is present only on the lines that carry it.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

from .ratelimit import PeerLogThrottle

__all__ = ["FIELDS", "JsonFormatter", "TEXT_FORMAT", "setup_logging"]

#: Structured fields copied from a record into its JSON object.
FIELDS = ("edge", "instance", "service", "client", "stream", "bytes_up", "bytes_down", "duration")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``time`` is UTC, ISO 8601)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                obj[name] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger: one line per record on stderr, in ``fmt``, with
    peer-triggered lines throttled (:class:`~.ratelimit.PeerLogThrottle`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(PeerLogThrottle())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def set_level(level: str) -> None:
    """Change the log level (configuration reload)."""
    logging.getLogger().setLevel(getattr(logging, level.upper()))
