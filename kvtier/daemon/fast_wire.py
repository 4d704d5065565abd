"""Frames of the daemon's fast path: one msgpack map per frame, behind a 4-byte length.

Shared by the daemon (``kvtier.daemon.fast_server``) and the client
(``kvtier.client.fast_channel``); the protocol is described in ``docs/daemon-fast-path.md``.

A frame is a little-endian ``uint32`` byte count followed by that many bytes of msgpack encoding
one map. Requests are ``{"op": <gRPC method name>, ...fields}``; replies are ``{"ok": {...}}`` or
``{"error": <gRPC status name>, "message": <text>}``. msgpack only: nothing on this wire is
ever unpickled or evaluated.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from kvtier.errors import InvalidRequestError

PROTOCOL_VERSION = 1
_LENGTH = struct.Struct("<I")


class FrameTooLargeError(Exception):
    """A peer announced a frame longer than the receiver accepts; the stream cannot continue."""

    def __init__(self, nbytes: int, limit: int) -> None:
        super().__init__(f"a {nbytes}-byte message exceeds the {limit}-byte limit (daemon.max_message_bytes)")
        self.nbytes = nbytes
        self.limit = limit


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length prefix and msgpack body."""
    body = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Frames from one socket. Each ``recv`` takes what the kernel holds (usually a whole frame),
    so a small request costs one system call; bytes past the frame wait for the next call."""

    _RECV_BYTES = 1 << 16

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        self.sock = sock
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def _fill(self, nbytes: int) -> bool:
        """Buffer at least ``nbytes``; False if the peer closed with nothing buffered."""
        while len(self._buffer) < nbytes:
            chunk = self.sock.recv(max(self._RECV_BYTES, nbytes - len(self._buffer)))
            if not chunk:
                if not self._buffer:
                    return False
                raise ConnectionError(f"the peer closed the connection {len(self._buffer)} bytes into a {nbytes}-byte read")
            self._buffer += chunk
        return True

    def receive(self) -> dict[str, Any] | None:
        """The next frame's map; None on a clean close between frames.

        Raises :class:`FrameTooLargeError` for a frame over ``max_bytes`` (its body is not read:
        the stream cannot go on), :class:`InvalidRequestError` for a body that is not one msgpack
        map (the stream can go on), ``ConnectionError`` or ``OSError`` when the connection breaks.
        """
        if not self._fill(_LENGTH.size):
            return None
        (nbytes,) = _LENGTH.unpack_from(self._buffer)
        if nbytes > self.max_bytes:
            raise FrameTooLargeError(nbytes, self.max_bytes)
        end = _LENGTH.size + nbytes
        if not self._fill(end):
            raise ConnectionError(f"the peer closed the connection before a {nbytes}-byte message")
        body = bytes(self._buffer[_LENGTH.size:end])
        del self._buffer[:end]
        return decode(body)


def frame_length(prefix: bytes) -> int:
    """The body length a frame's 4-byte prefix announces."""
    return _LENGTH.unpack(prefix)[0]


LENGTH_BYTES = _LENGTH.size


def decode(body: bytes) -> dict[str, Any]:
    """One frame's body as a map; :class:`InvalidRequestError` if it is anything else."""
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # malformed, truncated, bad UTF-8, extra data
        raise InvalidRequestError(f"the message is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict):
        raise InvalidRequestError(f"the message is a msgpack {type(message).__name__}; it must be a map")
    return message
