"""Daemon status names (gRPC's, from either transport) back into kvtier errors."""

from __future__ import annotations

from kvtier.errors import (
    AuthenticationError,
    DaemonError,
    DaemonTimeoutError,
    DaemonUnavailableError,
    InvalidRequestError,
    LayoutError,
    LeaseError,
)

_ERROR_OF: dict[str, type[Exception]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "FAILED_PRECONDITION": LayoutError,
    "NOT_FOUND": LeaseError,
    "UNAVAILABLE": DaemonUnavailableError,
    "DEADLINE_EXCEEDED": DaemonTimeoutError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
}


def error_for_status(code: str, message: str) -> Exception:
    """The kvtier error for a failed call; :class:`DaemonError` (with ``code``) when none is more specific."""
    error_type = _ERROR_OF.get(code, DaemonError)
    if issubclass(error_type, DaemonError):
        return error_type(message, code=code)
    return error_type(message)
