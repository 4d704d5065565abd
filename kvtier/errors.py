"""The one exception tree of kvtier.

Every error kvtier raises on purpose is a :class:`KVTierError`; foreign errors (``OSError``,
botocore, CUDA) are translated at the boundary where they happen (``raise X(...) from exc``) so
callers never need to import a backend's exception types.

::

    KVTierError
    ├── ConfigError              invalid or inconsistent configuration
    ├── LayoutError              a block or buffer does not match the layout it claims
    ├── MissingDependencyError   an optional backend's package is not installed
    ├── InvalidRequestError      malformed input: token ids, keys, sizes, offsets
    ├── TierError                a tier could not do what was asked (carries ``tier``)
    │   ├── TierFullError        no room left within the tier's capacity
    │   │   └── DiskFullError    the filesystem itself is full (ENOSPC)
    │   ├── TierUnavailableError the backing service is down or keeps failing after retries
    │   └── CorruptBlockError    stored bytes fail their header or checksum check
    ├── LeaseError               an unknown, released or expired lease
    ├── DaemonError              a call to the node daemon failed (carries the gRPC ``code``)
    │   ├── DaemonUnavailableError  the daemon is not running, not reachable or too slow
    │   │   └── DaemonTimeoutError  it is reachable but did not answer within the deadline
    │   └── AuthenticationError     the daemon refused the caller's credentials
    ├── IndexServiceError        a call to the global index (or its Redis store) failed
    │   └── IndexUnavailableError   the index or its store cannot be reached
    └── CopyError                the page-copy path rejected a request
        └── KernelUnavailableError  the CUDA kernel is not built or no GPU is present

Messages say what happened and what the user can do about it.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class ConfigError(KVTierError):
    """Configuration is invalid; the message names the field and the accepted values."""


class LayoutError(KVTierError):
    """A block, slot or tensor does not match the layout it is used with."""


class MissingDependencyError(KVTierError):
    """An optional backend needs a package that is not installed."""


class InvalidRequestError(KVTierError):
    """A request is malformed (token ids out of range, bad key text, wrong sizes or offsets)."""


class TierError(KVTierError):
    """A tier failed an operation. ``tier`` names the tier (``host``, ``disk``, ``s3``...)."""

    def __init__(self, message: str, *, tier: str = "") -> None:
        super().__init__(message)
        self.tier = tier


class TierFullError(TierError):
    """The tier has no room for the block within its configured capacity."""


class DiskFullError(TierFullError):
    """The filesystem under the disk tier returned ENOSPC (or the quota is exhausted)."""


class TierUnavailableError(TierError):
    """The tier's backing service cannot be reached or keeps failing after retries."""


class CorruptBlockError(TierError):
    """Stored bytes fail their header or checksum check; the block must be treated as a miss."""


class LeaseError(KVTierError):
    """A lease is unknown, already released or expired."""


class DaemonError(KVTierError):
    """A daemon call failed; ``code`` is the gRPC status name (e.g. ``INVALID_ARGUMENT``)."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class DaemonUnavailableError(DaemonError):
    """The daemon is not running, cannot be reached, or did not answer within the timeout."""


class DaemonTimeoutError(DaemonUnavailableError):
    """The daemon took the call but did not answer within its deadline: busy, stopped or hung,
    not (known to be) gone. Callers skip it for this call; only unreachable daemons are backed off."""


class AuthenticationError(DaemonError):
    """The daemon refused the caller's credentials (token or client certificate)."""


class IndexServiceError(KVTierError):
    """A call to the global index or its store failed; ``code`` is the gRPC status name if any."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class IndexUnavailableError(IndexServiceError):
    """The index service or its Redis store cannot be reached, or did not answer in time."""


class CopyError(KVTierError):
    """The page-copy path was given pages or buffers it cannot copy."""


class KernelUnavailableError(CopyError):
    """The CUDA copy kernel is not built or no CUDA device is present."""
