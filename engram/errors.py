"""One error type for every layer: shard, coordinator and server raise `EngramError(code, message)`; the server
maps each `ErrorCode` to one gRPC status (engram/coordinator/server.py: STATUS; a test checks every code maps).

Messages go to clients as they are: say what to fix, never a path or a traceback.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID = "invalid"  # the request is wrong: fix it and send it again
    NOT_FOUND = "not_found"  # no such namespace or document
    ALREADY_EXISTS = "already_exists"  # the document exists (written by another request)
    UNAVAILABLE = "unavailable"  # a shard is down: retry later with the same request_id
    BUSY = "busy"  # an operation that excludes this one is running (a rebalance)
    EXHAUSTED = "exhausted"  # a bounded queue or quota is full: retry later (with backoff)
    STALE = "stale"  # blocks a writer staged on a shard were lost in a restart: send them again (internal)


class EngramError(Exception):
    """A request error with a code the server maps to a gRPC status. Pickles by (code, message), so it crosses
    Ray actor boundaries intact."""

    def __init__(self, code: ErrorCode | str, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)

    def __reduce__(self):
        return (type(self), (self.code, str(self)))


def error_of(exc: BaseException) -> EngramError | None:
    """The EngramError an actor raised, whether Ray hands it back as such or wrapped in a RayTaskError."""
    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, EngramError) and hasattr(e, "code"):
            return e
    return None
