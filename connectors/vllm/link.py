"""The connector's connection to the daemon, built to stay out of the engine's way.

A failed call (daemon down, slow, restarted) makes the link answer ``None`` at once for
``retry_after_s`` instead of calling again, so a dead daemon costs the step loop nothing;
after that it reconnects, registers its layouts again and maps the (new) arena.
Callers treat ``None`` as a miss: the engine recomputes, it never waits and never fails.

Connecting means gRPC calls and, in embedded mode, perhaps starting the daemon: a call made on
the engine's step (``on_step=True``) never does it. If the link is not ready it answers ``None``
and a background thread connects, so the step's only daemon cost is its own fast-path call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from connectors.vllm.embedded import ensure_daemon
from connectors.vllm.settings import ConnectorSettings
from kvtier.blocks import KVLayout
from kvtier.client import DaemonClient
from kvtier.errors import KVTierError, LayoutError

log = logging.getLogger(__name__)
T = TypeVar("T")


class DaemonLink:
    def __init__(self, settings: ConnectorSettings, layouts: Sequence[KVLayout], client_id: str) -> None:
        self.settings = settings
        self.layouts = list(layouts)
        self.client_id = client_id
        self._lock = threading.Lock()
        self._client: DaemonClient | None = None
        self._registered = False
        self._down_until = 0.0
        self._connector = ThreadPoolExecutor(1, thread_name_prefix="kvtier-connect")
        self._connecting: Future[bool] | None = None

    def _connect(self) -> DaemonClient:
        if self._client is None:
            path = ensure_daemon(self.settings.socket_path, self.settings.daemon_args, self.settings.daemon_start_timeout_s)
            self._client = DaemonClient(path, timeout_s=self.settings.timeout_s, client_id=self.client_id)
        if not self._registered:
            for layout in self.layouts:
                self._client.register_layout(layout)
            self._registered = True
        return self._client

    def connect(self) -> bool:
        """Reach (in embedded mode: start) the daemon and register the layouts now, at engine
        start-up, so no later call on the step loop pays for it. False if it is unavailable."""
        return self.call(lambda client: True) is not None

    def call(self, operation: Callable[[DaemonClient], T], *, on_step: bool = False) -> T | None:
        """Run ``operation`` against the daemon; None if it is unavailable (then skipped for a while).

        ``on_step``: the caller is the engine's step, which must not wait for a (re)connection."""
        if time.monotonic() < self._down_until:
            return None
        try:
            if on_step:
                client = self._client
                if client is None or not self._registered:
                    self._connect_in_background()
                    return None
            else:
                with self._lock:
                    client = self._connect()
            try:
                return operation(client)
            except LayoutError:
                # The daemon restarted and forgot our layouts: register again, once.
                self._registered = False  # a plain flag: never wait for the lock a reconnect holds
                if on_step:
                    self._connect_in_background()
                    return None
                with self._lock:
                    client = self._connect()
                return operation(client)
        except KVTierError as exc:  # daemon down, slow, refusing: a miss
            self._registered = False
            self._down_until = time.monotonic() + self.settings.retry_after_s
            log.warning("kvtier daemon call failed (%s); treating kvtier as a miss for %.0fs", exc, self.settings.retry_after_s)
            return None

    def _connect_in_background(self) -> None:
        """Start connecting on the link's own thread, unless that is under way (step thread only)."""
        if self._connecting is None or self._connecting.done():
            self._connecting = self._connector.submit(self.connect)

    def close(self) -> None:
        self._connector.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            if self._client is not None:
                try:
                    self._client.disconnect()
                except KVTierError:
                    pass
                self._client.close()
                self._client = None
