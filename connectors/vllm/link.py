"""The connector's connection to the daemon, built to stay out of the engine's way.

A call answers ``None`` (a miss: the engine recomputes) instead of waiting whenever the daemon
cannot serve it now, and what happens next depends on why:

- **Unreachable** (no socket, connection refused or broken): the link backs off for
  ``retry_after_s`` (calls answer ``None`` at once), then reconnects, registers its layouts again
  and maps the (new) arena. In the embedded default it first starts a daemon again if none runs.
  Meanwhile a background thread watches for a daemon on the socket (a restart takes about a
  second) and ends the back-off as soon as it has reconnected to one, on a new connection (a gRPC
  channel that failed to connect keeps failing fast for its own back-off, up to a second).
- **Slow** (the daemon took the call but missed its deadline: busy, stopped, hung): not a dead
  daemon, so no back-off and no reconnect; calls answer ``None`` at once while a background probe
  asks the daemon a trivial question, and the link is usable again the moment one is answered.
- **Refused** (any other kvtier error: a bad request, a layout the daemon does not know...): that
  call is a miss; the next one is tried as usual (a restarted daemon's ``LayoutError`` triggers
  one re-registration).

Connecting means gRPC calls and, in embedded mode, perhaps starting the daemon: a call made on
the engine's step (``on_step=True``) never does it. If the link is not ready it answers ``None``
and a background thread connects. :attr:`DaemonLink.available` tells callers that would make a
request wait for an answer whether to expect one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from connectors.vllm.embedded import default_socket_path, ensure_daemon
from connectors.vllm.settings import ConnectorSettings
from connectors.vllm.stats import FAILURE_COUNTERS
from kvtier.blocks import KVLayout
from kvtier.client import DaemonClient
from kvtier.daemon.server import socket_is_live
from kvtier.errors import DaemonTimeoutError, DaemonUnavailableError, KVTierError, LayoutError

log = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handler, format and VLLM_LOGGING_LEVEL
T = TypeVar("T")

_PROBE_INTERVAL_S = 0.05  # between probes of a slow daemon (doubling up to _PROBE_MAX_INTERVAL_S)
_PROBE_MAX_INTERVAL_S = 1.0
_REPORT_AGAIN_S = 60.0  # unchanged counters are sent again this often (a restarted daemon starts empty)


class DaemonLink:
    def __init__(self, settings: ConnectorSettings, layouts: Sequence[KVLayout], client_id: str, *, role: str,
                 stats: Counter[str]) -> None:
        self.settings = settings
        self.layouts = list(layouts)
        self.client_id = client_id
        self.role = role
        self.stats = stats  # the owner's lifetime counters: the link adds its own and reports them all
        self._reported: tuple[float, dict[str, int]] = (0.0, {})  # when, and what, the daemon last accepted
        self._lock = threading.Lock()
        self._client: DaemonClient | None = None
        self._registered = False
        self._down_until = 0.0
        self._slow = threading.Event()  # set while the daemon is late; cleared by the probe
        self._closed = threading.Event()
        self._background = ThreadPoolExecutor(3, thread_name_prefix="kvtier-link")  # connect, probe, watch
        self._connecting: Future[bool] | None = None
        self._probing: Future[None] | None = None
        self._watching: Future[None] | None = None  # for the daemon's return while backing off
        self.prefill_hint = 0.0  # the prefill rate (tokens/s) the daemon last heard for our layouts
        self.wants_block_descriptions = False  # the daemon publishes vLLM KV events: describe saved blocks
        self._reporter = threading.Thread(target=self._report_loop, name="kvtier-report", daemon=True)
        self._reporter.start()

    @property
    def available(self) -> bool:
        """Whether a call now is tried at all: the daemon is neither late nor being backed off
        (a call may still have to connect first)."""
        return not self._slow.is_set() and time.monotonic() >= self._down_until

    @property
    def client(self) -> DaemonClient | None:
        return self._client

    def _connect(self) -> DaemonClient:
        if self._client is None:
            path = ensure_daemon(self.settings.socket_path, self.settings.daemon_args, self.settings.daemon_start_timeout_s)
            self._client = DaemonClient(path, timeout_s=self.settings.timeout_s, client_id=self.client_id)
        if not self._registered:
            for layout in self.layouts:
                registered = self._client.register_layout(layout)
                self.prefill_hint = max(self.prefill_hint, registered.prefill_tokens_per_s)
                self.wants_block_descriptions = registered.wants_block_descriptions
            self._client.lookup(self.layouts[0].layout_id, [])  # opens the fast path now, not on a request's lookup
            self._registered = True
        return self._client

    def connect(self) -> bool:
        """Reach (in embedded mode: start) the daemon and register the layouts now, at engine
        start-up, so no later call on the step loop pays for it. False if it is unavailable."""
        return self.call(lambda client: True) is not None

    def call(self, operation: Callable[[DaemonClient], T], *, on_step: bool = False) -> T | None:
        """Run ``operation`` against the daemon; None if it cannot be served now (see the module doc).

        ``on_step``: the caller is the engine's step, which must not wait for a (re)connection."""
        if self._slow.is_set() or time.monotonic() < self._down_until:
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
        except DaemonTimeoutError as exc:
            self._on_timeout(exc)
        except DaemonUnavailableError as exc:
            self._on_unreachable(exc)
        except KVTierError as exc:
            self.stats["daemon_refused"] += 1
            log.warning("kvtier daemon refused a call (%s); that call is a miss", exc)
        return None

    def _on_unreachable(self, exc: DaemonUnavailableError) -> None:
        self.stats["daemon_unreachable"] += 1
        self._registered = False
        self._forget_client()  # the next connect opens new connections (and, embedded, may start a daemon)
        self._down_until = time.monotonic() + self.settings.retry_after_s
        log.warning("kvtier daemon unreachable (%s); treating kvtier as a miss for up to %.1fs", exc, self.settings.retry_after_s)
        self._watching = self._submit_unless_running(self._watching, self._watch_for_return)

    def _watch_for_return(self) -> None:
        """Background, while backing off: reconnect as soon as a daemon listens on the socket
        again, and end the back-off then. It never starts a daemon (after the back-off the next
        call does, in the embedded default), so ``kvtier stop`` is not undone at once."""
        path = self.settings.socket_path or default_socket_path()
        interval = _PROBE_INTERVAL_S
        while not self._closed.wait(interval) and time.monotonic() < self._down_until:
            interval = min(interval * 2, _PROBE_MAX_INTERVAL_S)
            if not socket_is_live(path):
                continue
            try:
                with self._lock:
                    self._connect()
            except DaemonUnavailableError:
                self._forget_client()
                continue
            except KVTierError:  # there but late or refusing: the next call finds out how
                return
            self._down_until = 0.0
            log.info("kvtier daemon reachable again")
            return

    def _forget_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _on_timeout(self, exc: DaemonTimeoutError) -> None:
        self.stats["daemon_timeouts"] += 1
        if not self._slow.is_set():
            self._slow.set()
            log.warning("kvtier daemon is late (%s); treating kvtier as a miss until it answers again", exc)
        self._probing = self._submit_unless_running(self._probing, self._probe)

    def _probe(self) -> None:
        """Background: ask the late daemon a trivial question until it answers in time."""
        interval = _PROBE_INTERVAL_S
        while not self._closed.is_set():
            client = self._client
            try:
                if client is not None:
                    client.lookup(self.layouts[0].layout_id, [], timeout_s=min(self.settings.timeout_s, 1.0))
                    self._slow.clear()
                    log.info("kvtier daemon answers again")
                    return
            except DaemonTimeoutError:
                pass
            except KVTierError:  # not late any more but gone or changed: the next call finds out how
                self._slow.clear()
                return
            if self._closed.wait(interval):
                return
            interval = min(interval * 2, _PROBE_MAX_INTERVAL_S)

    def _connect_in_background(self) -> None:
        """Start connecting on the link's own thread, unless that is under way (step thread only)."""
        self._connecting = self._submit_unless_running(self._connecting, self.connect)

    def _submit_unless_running(self, running: Future[T] | None, task: Callable[[], T]) -> Future[T] | None:
        """Run ``task`` on the link's background threads unless ``running`` (its last run) is
        still going; the future of the run that is going now."""
        if (running is None or running.done()) and not self._closed.is_set():
            try:
                return self._background.submit(task)
            except RuntimeError:  # shut down meanwhile
                pass
        return running

    # ---- counters for `kvtier stats` ----------------------------------------------------------

    def _report_loop(self) -> None:
        while not self._closed.wait(self.settings.report_interval_s):
            self.report_counters()

    def report_counters(self) -> bool:
        """Send the owner's counters to the daemon if they changed (or every minute), on the
        calling thread; never connects or starts a daemon, never backs the link off. True if sent."""
        client = self._client
        if client is None or not self._registered or not self.available:
            return False
        counters = dict(self.stats)  # one C-level copy: safe while the step thread counts
        sent_at, sent = self._reported
        if counters == sent and time.monotonic() - sent_at < _REPORT_AGAIN_S:
            return False
        failures = {name: value for name, value in counters.items() if name in FAILURE_COUNTERS}
        try:
            client.report_counters(self.role, counters, failures, timeout_s=min(self.settings.timeout_s, 1.0))
        except KVTierError as exc:  # the calls that matter notice a daemon that is gone or late
            log.debug("reporting counters to the kvtier daemon failed: %s", exc)
            return False
        self._reported = (time.monotonic(), counters)
        return True

    def close(self) -> None:
        self._closed.set()
        self._reporter.join(timeout=5)
        self.report_counters()  # the last word: what this client counted until now
        self._background.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            if self._client is not None:
                try:
                    self._client.disconnect()
                except KVTierError:
                    pass
                self._client.close()
                self._client = None
