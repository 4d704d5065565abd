"""The router's questions to the index: each node's cached prefix of a prompt, within a deadline.

Asked on the index's fast path (msgpack frames on TCP, ``docs/global-index.md``) from the
router's event loop, on pooled connections (each carries one request at a time; one that timed
out or broke is closed, never reused, so a late reply is never read as another request's).
A question unanswered within ``deadline_s`` (a few milliseconds) is given up and the request is
routed without scores; after any failure the router asks nothing for ``retry_after_s``, so a
dead or stopped index costs requests nothing but the first deadline.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any

from kvtier.daemon.fast_wire import LENGTH_BYTES, PROTOCOL_VERSION, decode, encode, frame_length
from kvtier.errors import InvalidRequestError
from kvtier.index.fast_server import host_and_port
from kvtier.index.queries import pack_token_ids
from kvtier.router.policy import CachedPrefix

log = logging.getLogger(__name__)

_MAX_REPLY_BYTES = 64 << 20


class IndexUnanswered(Exception):
    """No scores this time; ``reason`` is the fallback's label (timeout, unavailable, error, backoff)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        self.writer.write(encode(message))
        await self.writer.drain()
        nbytes = frame_length(await self.reader.readexactly(LENGTH_BYTES))
        if nbytes > _MAX_REPLY_BYTES:
            raise ConnectionError(f"the index announced a {nbytes}-byte reply")
        return decode(await self.reader.readexactly(nbytes))

    def close(self) -> None:
        self.writer.close()


class IndexScores:
    """Scores from one index's fast path. Use from one event loop."""

    def __init__(self, fast_address: str, *, token: str | None = None, tls: ssl.SSLContext | None = None,
                 deadline_s: float = 0.005, retry_after_s: float = 1.0) -> None:
        self.address = fast_address
        self.host, self.port = host_and_port(fast_address, "router.index_fast_address")
        self._token = token
        self._tls = tls
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self._idle: list[_Connection] = []
        self._skip_until = 0.0
        self.last_error = ""

    async def score(self, model: str, token_ids: Sequence[int], candidates: Sequence[str], *,
                    lora_name: str = "", cache_salt: str = "") -> dict[str, CachedPrefix]:
        """Each candidate node's cached prefix (nodes holding none are left out), for the
        prompt's blocks as hashed with the adapter's name and the cache salt, if any; raises
        :class:`IndexUnanswered` when there is no answer within the deadline."""
        if time.monotonic() < self._skip_until:
            raise IndexUnanswered("backoff", self.last_error)
        request = {"op": "Score", "model": model, "block_size": 0, "token_ids": pack_token_ids(token_ids),
                   "block_hashes": b"", "lora_name": lora_name, "cache_salt": cache_salt, "candidates": list(candidates)}
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self.deadline_s):
                while not self._idle:  # (another request may take the one just opened)
                    await self._connect()
                connection = self._idle.pop()
                reply = await connection.exchange(request)
        except TimeoutError:
            self._failed(connection, "timeout", f"no answer from the index at {self.address} within {self.deadline_s * 1000:.0f} ms")
        except (OSError, asyncio.IncompleteReadError, InvalidRequestError, ssl.SSLError) as exc:
            self._failed(connection, "unavailable", f"the index at {self.address}: {exc}")
        except asyncio.CancelledError:
            if connection is not None:
                connection.close()
            raise
        self._idle.append(connection)  # (an error reply leaves the connection in step)
        if "ok" not in reply:
            self._failed(None, "error", f"{reply.get('error')}: {reply.get('message')}")
        scores = reply["ok"]
        block_size = int(scores.get("block_size") or 0)
        return {node: CachedPrefix(int(tokens), float(score) * block_size)
                for node, _blocks, tokens, score, _runs in scores.get("scores", ())}

    async def _connect(self) -> None:
        """Open a connection into the pool. Shielded: one that outlasts this request's deadline
        still lands in the pool for the next request, so a slow connect (or Hello) does not make
        every request give up."""
        opening = asyncio.ensure_future(self._open())
        opening.add_done_callback(self._opened)
        await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future) -> None:
        if opening.cancelled():
            return
        if opening.exception() is not None:
            log.debug("cannot connect to the index at %s: %s", self.address, opening.exception())
            return
        self._idle.append(opening.result())

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._tls, limit=1 << 20)
        connection = _Connection(reader, writer)
        hello: dict[str, Any] = {"op": "Hello", "protocol": PROTOCOL_VERSION}
        if self._token:
            hello["token"] = self._token
        reply = await connection.exchange(hello)
        if "ok" not in reply:
            connection.close()
            raise ConnectionError(f"the index refused the router's Hello: {reply.get('error')}: {reply.get('message')}")
        return connection

    def _failed(self, connection: _Connection | None, reason: str, detail: str) -> None:
        if connection is not None:
            connection.close()
        if detail != self.last_error:
            log.warning("routing without the index for %.1fs: %s", self.retry_after_s, detail)
        self.last_error = detail
        self._skip_until = time.monotonic() + self.retry_after_s
        raise IndexUnanswered(reason, detail)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
