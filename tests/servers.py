"""Real servers for tests: ``moto_server`` (S3), ``redis-server``, and a fault-injecting proxy.

Each server runs as a separate process on a free port, is waited for until it answers, and is
stopped (terminate, then kill) when its context manager exits. A missing binary raises
:class:`ServerBinaryMissing` so fixtures can skip with a clear message.

:class:`FaultProxy` is a small threaded HTTP proxy put in front of moto to make S3 misbehave:

- ``pass``: forward every request unchanged
- ``error_503``: answer every request with a 503 ``SlowDown`` S3 error
- ``error_n_then_pass``: the first ``n`` requests get the 503, the rest are forwarded
- ``truncate_n_then_pass``: the first ``n`` responses are cut off halfway through their body (the
  connection is closed after sending half), the rest are forwarded whole
- ``blackhole``: read each request and never answer (until ``hold_s`` passes or the mode changes),
  so the client's read timeout has to fire
- ``down``: the listening socket is closed and open connections are dropped (connection refused)

Everything is bounded in time: the proxy stops by itself after ``max_lifetime_s``.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from typing_extensions import Self

from kvtier.testing.daemon import free_port

MODES = ("pass", "error_503", "error_n_then_pass", "truncate_n_then_pass", "blackhole", "down")

SLOW_DOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>kvtier-fault-proxy</RequestId></Error>"
)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)


class ServerBinaryMissing(RuntimeError):
    """The server's executable is not installed."""


def _stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


@contextlib.contextmanager
def _process(argv: list[str], name: str, ready: Callable[[], bool], timeout_s: float) -> Iterator[None]:
    """Start ``argv``, wait until ``ready()`` is true, stop it on exit."""
    log = Path(tempfile.mkstemp(prefix=f"kvtier-{name}-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {_log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer within {timeout_s:.0f}s: {_log_tail(log)}")
            time.sleep(0.05)
        yield
    finally:
        _stop_process(proc)
        with contextlib.suppress(OSError):
            log.unlink()


def _http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except (OSError, http.client.HTTPException):
        return False


def _redis_answers(port: int, tls_ca_file: Path | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw:
            sock = ssl.create_default_context(cafile=str(tls_ca_file)).wrap_socket(raw, server_hostname="127.0.0.1") if tls_ca_file else raw
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@contextlib.contextmanager
def moto_server(timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``moto_server`` on a free port; yield its endpoint URL (``http://127.0.0.1:PORT``)."""
    binary = shutil.which("moto_server")
    if binary is not None:
        base = [binary]
    else:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise ServerBinaryMissing('moto_server not found: pip install "moto[server]"') from None
        base = [sys.executable, "-m", "moto.server"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [*base, "-H", "127.0.0.1", "-p", str(port)]
    with _process(argv, "moto_server", lambda: _http_answers(url + "/moto-api/"), timeout_s):
        yield url


@contextlib.contextmanager
def redis_server(timeout_s: float = 30.0, port: int | None = None, password: str | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> Iterator[str]:
    """Run ``redis-server`` (no persistence) on ``port`` (default a free one); yield
    ``redis://127.0.0.1:PORT/0``. Starting it again on the same port is a Redis restart.
    ``tls=(cert, key, ca)``: TLS only on that port (clients need no certificate); yields ``rediss://``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerBinaryMissing("redis-server not found: apt-get install -y redis-server")
    port = port or free_port()
    argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if tls:
        cert, key, ca = tls
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                 "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    else:
        argv += ["--port", str(port)]
    if password:
        argv += ["--requirepass", password]
    with _process(argv, "redis-server", lambda: _redis_answers(port, tls[2] if tls else None), timeout_s):
        yield f"{'rediss' if tls else 'redis'}://127.0.0.1:{port}/0"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint
    timeout = 30  # idle client connections are closed after this
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, add=True)
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.proxy._track(self.connection, add=False)
        if self._upstream is not None:
            self._upstream.close()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        proxy = self.server.proxy
        action = proxy._next_action()
        if action == "down":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "blackhole":
            proxy._released.wait(proxy.hold_s)
            self.close_connection = True
            return
        if action == "error_503":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN_XML)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN_XML)
            return
        self._forward(body, truncate=action == "truncate")

    def _forward(self, body: bytes, *, truncate: bool = False) -> None:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(self.server.proxy.upstream_host, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            self._upstream.request(self.command, self.path, body=body, headers=headers)
            response = self._upstream.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self._upstream.close()
            self._upstream = None
            self.send_error(502, "upstream failed")
            return
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if truncate else data)
        if truncate:
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


class FaultProxy:
    """A threaded HTTP proxy to ``upstream_url`` whose behaviour ``set_mode`` changes at run time."""

    def __init__(self, upstream_url: str, *, hold_s: float = 30.0, max_lifetime_s: float = 600.0) -> None:
        self.upstream_host = upstream_url.removeprefix("http://").rstrip("/")
        self.hold_s = hold_s  # how long a blackholed request is held before its connection is closed
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.requests = 0  # requests received, whatever the mode
        self._n_errors = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self._timer = threading.Timer(max_lifetime_s, self.stop)
        self._timer.daemon = True

    def start(self) -> Self:
        self._listen()
        self._timer.start()
        return self

    def _listen(self) -> None:
        server = _ProxyServer(("127.0.0.1", self.port), _ProxyHandler)
        server.proxy = self
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(sock)

    def _drop_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _next_action(self) -> str:
        with self._lock:
            self.requests += 1
            if self.mode in ("error_n_then_pass", "truncate_n_then_pass"):
                if self._n_errors > 0:
                    self._n_errors -= 1
                    return "error_503" if self.mode == "error_n_then_pass" else "truncate"
                return "pass"
            return self.mode

    def set_mode(self, mode: str, n: int = 0) -> None:
        """Switch behaviour; ``n`` is the number of failed requests for the ``*_n_then_pass`` modes."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; modes: {', '.join(MODES)}")
        with self._lock:
            previous, self.mode, self._n_errors = self.mode, mode, n
        if previous == "blackhole" and mode != "blackhole":
            self._released.set()
            self._released = threading.Event()
        if mode == "down" and previous != "down":
            self._close_listener()
            self._drop_connections()
        elif previous == "down" and mode != "down":
            self._listen()

    def stop(self) -> None:
        """Close the listener and every connection; idempotent, also run after ``max_lifetime_s``."""
        self._timer.cancel()
        self._released.set()
        self._close_listener()
        self._drop_connections()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def fault_proxy(upstream_url: str, **kwargs: float) -> Iterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of ``upstream_url``, stopped on exit."""
    with FaultProxy(upstream_url, **kwargs) as proxy:
        yield proxy
