"""Which status a kvtier error becomes on the wire, shared by both of the daemon's transports.

Status names are gRPC's (``INVALID_ARGUMENT``...): the gRPC servicer sends them as status codes,
the fast path as strings, and the client turns either back into the same kvtier error.
"""

from __future__ import annotations

from kvtier.errors import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    KVTierError,
    LayoutError,
    LeaseError,
    TierFullError,
    TierUnavailableError,
)

# Most specific first.
_STATUS_OF: tuple[tuple[type[KVTierError], str], ...] = (
    (InvalidRequestError, "INVALID_ARGUMENT"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (LayoutError, "FAILED_PRECONDITION"),
    (LeaseError, "NOT_FOUND"),
    (TierFullError, "RESOURCE_EXHAUSTED"),
    (TierUnavailableError, "UNAVAILABLE"),
    (ConfigError, "FAILED_PRECONDITION"),
)


def status_name_of(error: KVTierError) -> str:
    for error_type, name in _STATUS_OF:
        if isinstance(error, error_type):
            return name
    return "INTERNAL"
