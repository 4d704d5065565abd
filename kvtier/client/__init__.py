"""Client of the node daemon."""

from kvtier.client.client import DaemonClient
from kvtier.client.commit_pipeline import CommitPipeline
from kvtier.client.types import DaemonStats, LeasedBlock, LeaseGrant, PendingCommit, RegisteredLayout, Reservation, ReserveStatus

__all__ = ["CommitPipeline", "DaemonClient", "DaemonStats", "LeaseGrant", "LeasedBlock", "PendingCommit", "RegisteredLayout",
           "Reservation", "ReserveStatus"]
