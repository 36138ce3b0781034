"""The one error hierarchy of the gateway.

Every failure a caller can see is an :class:`McpError` with a stable
:class:`ErrorCode`. Foreign exceptions (OSError, pydantic, wasmtime, sqlite...)
are translated once, at the edge that caught them, with ``raise ... from exc``.
Each code maps once to an HTTP status here; the gRPC and JSON-RPC adapters map
the same codes in their own modules.

::

    McpError
     ├── InvalidArgument      INVALID_ARGUMENT     400  (bad input; ``field`` names it)
     ├── Unauthenticated      UNAUTHENTICATED      401
     │    └── InvalidToken    UNAUTHENTICATED      401  (a token was given and refused)
     ├── PermissionDenied     PERMISSION_DENIED    403  (policy deny; ``reasons``)
     ├── NotFound             NOT_FOUND            404
     ├── FailedPrecondition   FAILED_PRECONDITION  409
     ├── PayloadTooLarge      PAYLOAD_TOO_LARGE    413
     ├── ResourceExhausted    RESOURCE_EXHAUSTED   429  (``retry_after`` seconds)
     ├── DeadlineExceeded     DEADLINE_EXCEEDED    504
     ├── Unavailable          UNAVAILABLE          503
     └── Internal             INTERNAL             500  (message never carries a trace)
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class McpError(Exception):
    """Base of every error the gateway reports to a caller."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reasons: list[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.reasons = list(reasons or [])
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self) -> dict[str, Any]:
        """The JSON body every transport uses for this error."""
        body: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.reasons:
            body["reasons"] = self.reasons
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return {"error": body}


class InvalidArgument(McpError):
    code = ErrorCode.INVALID_ARGUMENT


class Unauthenticated(McpError):
    code = ErrorCode.UNAUTHENTICATED


class InvalidToken(Unauthenticated):
    """A bearer token was presented and refused (RFC 6750 ``invalid_token``)."""


class PermissionDenied(McpError):
    code = ErrorCode.PERMISSION_DENIED


class NotFound(McpError):
    code = ErrorCode.NOT_FOUND


class FailedPrecondition(McpError):
    code = ErrorCode.FAILED_PRECONDITION


class PayloadTooLarge(McpError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class ResourceExhausted(McpError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(McpError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Unavailable(McpError):
    code = ErrorCode.UNAVAILABLE


class Internal(McpError):
    code = ErrorCode.INTERNAL


BY_CODE: dict[ErrorCode, type[McpError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        FailedPrecondition,
        PayloadTooLarge,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Internal,
    )
}


def from_dict(body: dict[str, Any]) -> McpError:
    """Rebuild an error from :meth:`McpError.to_dict` output (used by the client)."""
    err = body.get("error", {})
    try:
        code = ErrorCode(err.get("code", "INTERNAL"))
    except ValueError:
        code = ErrorCode.INTERNAL
    return BY_CODE[code](
        str(err.get("message", "")),
        field=err.get("field"),
        reasons=err.get("reasons"),
        retry_after=err.get("retry_after"),
    )
