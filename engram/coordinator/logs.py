"""The server's log lines: plain text, or one JSON object per line for log shippers (server.log_format)."""

from __future__ import annotations

import logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str) -> None:
    if fmt not in ("text", "json"):
        raise SystemExit(f"engram: server.log_format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
