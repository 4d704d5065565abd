"""Client of the node daemon."""

from kvtier.client.client import DaemonClient
from kvtier.client.types import DaemonStats, LeasedBlock, LeaseGrant, RegisteredLayout, Reservation, ReserveStatus

__all__ = ["DaemonClient", "DaemonStats", "LeaseGrant", "LeasedBlock", "RegisteredLayout", "Reservation", "ReserveStatus"]
