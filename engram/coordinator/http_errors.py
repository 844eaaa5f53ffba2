"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
each kind of failure has; no traceback, path or address ever reaches a client."""

from __future__ import annotations

import logging
import uuid

import grpc

from ..errors import EngramError, ErrorCode
from .auth import AuthError

log = logging.getLogger("engram")

HTTP_STATUS = {  # every ErrorCode (tests/test_layout.py checks none is missing): (status, OpenAI error type)
    ErrorCode.INVALID: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.ALREADY_EXISTS: (409, "conflict_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorCode.BUSY: (409, "conflict_error"),
    ErrorCode.EXHAUSTED: (429, "rate_limit_error"),
    ErrorCode.STALE: (503, "service_unavailable_error"),
}
AUTH_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
}


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


def api_error(exc: BaseException) -> ApiError:
    """Any failure as the client sees it: its own messages for request and auth errors, an incident id else."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngramError):
        return ApiError(*HTTP_STATUS[exc.code], str(exc))
    if isinstance(exc, AuthError):
        return ApiError(*AUTH_STATUS[exc.code], str(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in the HTTP API", incident, exc_info=exc)
    return ApiError(500, "server_error", f"internal error (incident {incident}); the server log has the details")
