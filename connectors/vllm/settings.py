"""The connector's settings, read once from ``kv_connector_extra_config``.

Example::

    --kv-transfer-config '{"kv_connector": "KVTierConnector",
                           "kv_connector_module_path": "connectors.vllm",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"socket_path": "/run/kvtier/kvtier.sock"}}'

With no ``socket_path`` the connector starts (or reuses) a local daemon on the default socket,
configured from ``daemon_args`` and the usual ``KVTIER_*`` environment variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvtier.errors import ConfigError


class ConnectorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    socket_path: Path | None = None  # a running daemon's socket; None = start or reuse a local one
    daemon_args: list[str] = Field(default_factory=list)  # extra `kvtier serve` flags for a daemon we start
    daemon_start_timeout_s: float = Field(default=60.0, gt=0)
    model_id: str | None = None  # name in the layout (default: vLLM's model); set it when paths differ per node
    # The weights' identity in the layout (default: a fingerprint of the weight files, see
    # connectors/vllm/weights.py); set it where the files are not on this machine.
    model_revision: str | None = Field(default=None, min_length=1, max_length=200)
    # Deadline of each daemon call. A call past it is "late": no request waits for that daemon
    # until it answers a probe again; it is not treated as gone (only an unreachable one is).
    timeout_s: float = Field(default=2.0, gt=0)
    # How long one scheduler call may block for a new request's lookup (started at arrival) while
    # the engine is idle, before asking again next step; a busy engine never blocks. 0 never blocks.
    lookup_wait_s: float = Field(default=0.002, ge=0, le=0.1)
    # Likewise, how long a worker's step with nothing scheduled waits for a load running on a
    # loader thread (requests waiting for their blocks), instead of spinning empty steps.
    load_wait_s: float = Field(default=0.002, ge=0, le=0.1)
    retry_after_s: float = Field(default=5.0, ge=0)  # after the daemon was unreachable, skip it this long
    # How often the connector sends its counters (loads, saves, failures) to the daemon, off the
    # step, for `kvtier stats`; and once more when the engine shuts down.
    report_interval_s: float = Field(default=5.0, gt=0)
    # The most kvtier may add to a request's time to first token, against recomputing it: this
    # fraction of the request's measured recompute time, and at least min_loss_s. Lookups and
    # loads from disk, S3 or peers that would take longer are given up (what arrived is used).
    max_loss_fraction: float = Field(default=0.05, gt=0, le=1)
    min_loss_s: float = Field(default=0.01, gt=0, le=10)
    # A deeper-tier load is tried only if it is expected to take at most this fraction of the
    # recompute time of its blocks.
    load_worth_ratio: float = Field(default=0.5, gt=0, le=1)
    # Where blocks leased in host memory are verified and copied into the engine: "background" on
    # a loader thread while the request waits a step (nothing on the step; vLLM's own offloading
    # does the same), "on_step" before the step's forward (no hand-off, but the copies count in the
    # step). "auto" (kept for older configs) is background. On CPU engines the two gave the same
    # TTFT (benchmarks/ttft.py --host-loads) and background 1.7% of step time against 3.0%.
    host_loads: Literal["auto", "background", "on_step"] = "background"
    save_generated: bool = True  # also save blocks of generated tokens (multi-turn reuse)
    max_save_queue: int = Field(default=1024, ge=1)  # pending save jobs beyond this are skipped

def settings_from(extra_config: Mapping[str, Any] | None) -> ConnectorSettings:
    try:
        return ConnectorSettings.model_validate(dict(extra_config or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid kv_connector_extra_config for KVTierConnector: {problems}") from None
