"""The index's fast path (kvtier.index.fast_server): the same answers as gRPC and in process,
authentication before anything else, and malformed frames refused without harm."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator

import pytest

from kvtier.blocks.hashing import HashExtras, hash_prompt, hash_prompt_joined
from kvtier.config import KVTierConfig
from kvtier.daemon.fast_wire import PROTOCOL_VERSION
from kvtier.errors import AuthenticationError, ConfigError, IndexUnavailableError
from kvtier.events.model import IndexTier, index_keys
from kvtier.index.client import IndexClient
from kvtier.index.memory import MemoryIndex
from kvtier.index.server import MAX_FAST_MESSAGE_BYTES, IndexServer
from tests.daemon.test_fast_path import RawConnection, error_of
from tests.index.test_conformance import SPACE, Node, stored

TOKEN = "fast-token-0123456789"
TIERS = (IndexTier.GPU, IndexTier.HOST, IndexTier.DISK)


def start_server(index: MemoryIndex, fast_address: str = "127.0.0.1:0") -> IndexServer:
    config = KVTierConfig.model_validate({"index": {"address": "127.0.0.1:0", "fast_address": fast_address, "auth_token": TOKEN}})
    server = IndexServer(config, index)
    server.start()
    return server


def connect_raw(port: int) -> RawConnection:
    """One fast-path connection driven frame by frame."""
    return RawConnection(("127.0.0.1", port))


@pytest.fixture
def populated() -> Iterator[tuple[MemoryIndex, IndexServer, list[list[int]]]]:
    """An index of 12 nodes holding random prefixes of 6 prompts in random tiers, behind a server."""
    rng = random.Random(7)
    index = MemoryIndex(heartbeat_ttl_s=600)
    prompts = [[rng.randrange(50_000) for _ in range(16 * rng.randint(1, 40))] for _ in range(6)]
    for n in range(12):
        node = Node(index, f"node-{n:02d}")
        events = []
        for prompt in rng.sample(prompts, 3):
            keys = index_keys(hash_prompt(prompt, 16))
            held = rng.randint(1, len(keys))
            cut = rng.randint(0, held)
            events += [stored(rng.choice(TIERS), keys[:cut]), stored(rng.choice(TIERS), keys[cut:held])]
        node.start(*(event for event in events if event.keys))
    server = start_server(index)
    try:
        yield index, server, prompts
    finally:
        server.stop()


def test_the_fast_path_answers_as_grpc_and_the_index_itself(populated: tuple[MemoryIndex, IndexServer, list[list[int]]]) -> None:
    index, server, prompts = populated
    address = f"127.0.0.1:{server.port}"
    with IndexClient(address, token=TOKEN) as grpc_client, \
            IndexClient(address, token=TOKEN, fast_address=f"127.0.0.1:{server.fast_port}") as fast:
        for prompt in prompts:
            expected = index.score_tokens(SPACE.model, prompt, block_size=16)
            assert expected, "each prompt is cached somewhere"
            hashes = hash_prompt(prompt, 16)
            for client in (grpc_client, fast):
                assert client.score(SPACE.model, token_ids=prompt) == expected
                assert client.score(SPACE.model, block_hashes=hashes, block_size=16) == expected
                assert client.score(SPACE.model, block_hashes=hash_prompt_joined(prompt, 16), block_size=16) == expected
                assert client.score(SPACE.model, block_hashes=[h[:8] for h in hashes], block_size=16) == expected  # index keys
                wanted = [s.node for s in expected[1::2]]
                assert client.score(SPACE.model, token_ids=prompt, candidates=wanted) == [s for s in expected if s.node in wanted]
                assert client.lookup(SPACE.model, hashes) == index.lookup(SPACE, index_keys(hashes))
            salted = HashExtras(cache_salt="tenant-b")
            assert fast.score(SPACE.model, token_ids=prompt, extras=salted) == grpc_client.score(SPACE.model, token_ids=prompt,
                                                                                               extras=salted) == []
        assert fast.score(SPACE.model, token_ids=[1, 2, 3], block_size=16) == []  # shorter than a block


def test_nothing_is_served_before_an_authenticated_hello(populated: tuple[MemoryIndex, IndexServer, list[list[int]]]) -> None:
    _, server, prompts = populated
    score = {"op": "Score", "model": SPACE.model, "block_size": 16, "block_hashes": hash_prompt_joined(prompts[0], 16)}
    raw = connect_raw(server.fast_port)
    try:
        assert error_of(raw.call(score)) == "FAILED_PRECONDITION"
        assert error_of(raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION})) == "UNAUTHENTICATED"
        assert error_of(raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION, "token": "wrong-token-0123456789"})) == "UNAUTHENTICATED"
        assert error_of(raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION + 1, "token": TOKEN})) == "INVALID_ARGUMENT"
        assert error_of(raw.call(score)) == "FAILED_PRECONDITION"  # still nothing before a good Hello
        welcome = raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION, "token": TOKEN})
        assert welcome == {"ok": {"protocol": PROTOCOL_VERSION, "max_message_bytes": MAX_FAST_MESSAGE_BYTES}}
        assert raw.call(score)["ok"]["scores"]
    finally:
        raw.close()
    with IndexClient(f"127.0.0.1:{server.port}", fast_address=f"127.0.0.1:{server.fast_port}") as anonymous, \
            pytest.raises(AuthenticationError, match="bearer token"):
        anonymous.score(SPACE.model, token_ids=prompts[0])


@pytest.mark.parametrize(("request_fields", "message"), [
    ({"op": "Score", "block_size": 16, "block_hashes": b""}, "'model' must be a string"),
    ({"op": "Score", "model": SPACE.model, "block_size": "16", "block_hashes": b""}, "'block_size' must be an integer"),
    ({"op": "Score", "model": SPACE.model, "block_size": -1, "block_hashes": b""}, "must not be negative"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "block_hashes": b"\0" * 17}, "16 bytes each"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "block_hashes": [b"\0" * 16, 5]}, "'block_hashes' must be bytes"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "token_ids": b"\0" * 6}, "4 bytes each"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "token_ids": [1, "2"]}, "'token_ids' must be bytes"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "token_ids": [-5] * 16}, "token ids must be integers"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "token_ids": b"\0" * 64, "block_hashes": b"\0" * 16}, "not both"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "candidates": [1]}, "node name"),
    ({"op": "Score", "model": SPACE.model, "block_size": 16, "block_hashes": b"\0" * 16, "cache_salt": "s"}, "apply to token_ids"),
    ({"op": "LookupBlocks", "model": SPACE.model, "block_size": 16, "block_hashes": b"\0" * 8}, "16 bytes each"),
    ({"op": "Score", "model": "nobody/serves-this", "token_ids": b""}, "no block size"),
])
def test_a_malformed_query_is_refused_and_the_connection_goes_on(
    populated: tuple[MemoryIndex, IndexServer, list[list[int]]], request_fields: dict, message: str,
) -> None:
    _, server, prompts = populated
    raw = connect_raw(server.fast_port)
    try:
        assert "ok" in raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION, "token": TOKEN})
        reply = raw.call(request_fields)
        assert error_of(reply) == "INVALID_ARGUMENT" and message in reply["message"], reply
        assert raw.call({"op": "Score", "model": SPACE.model, "block_hashes": hash_prompt_joined(prompts[0], 16)})["ok"]["scores"]
    finally:
        raw.close()


def test_bad_frames_unknown_ops_and_oversized_messages(populated: tuple[MemoryIndex, IndexServer, list[list[int]]]) -> None:
    _, server, _ = populated
    raw = connect_raw(server.fast_port)
    try:
        assert "ok" in raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION, "token": TOKEN})
        raw.send_bytes(b"\xc1 not msgpack")
        assert error_of(raw.reply()) == "INVALID_ARGUMENT"
        assert error_of(raw.call([1, 2, 3])) == "INVALID_ARGUMENT"  # a frame that is not a map
        reply = raw.call({"op": "Publish", "batch": b""})  # publishing stays on gRPC
        assert error_of(reply) == "UNIMPLEMENTED" and "LookupBlocks" in reply["message"]
        raw.sock.sendall(struct.pack("<I", MAX_FAST_MESSAGE_BYTES + 1))  # its body is never read
        assert error_of(raw.reply()) == "RESOURCE_EXHAUSTED"
        assert raw.reply() is None  # and the connection is closed
    finally:
        raw.close()
    with IndexClient(f"127.0.0.1:{server.port}", token=TOKEN, fast_address=f"127.0.0.1:{server.fast_port}") as client:
        assert client.score(SPACE.model, token_ids=[1] * 64) == []  # the server serves on


def test_a_client_reconnects_to_a_restarted_index_and_reports_one_that_is_down() -> None:
    index = MemoryIndex(heartbeat_ttl_s=600)
    node = Node(index, "node-a")
    prompt = list(range(16 * 4))
    node.start(stored(IndexTier.HOST, index_keys(hash_prompt(prompt, 16))))
    server = start_server(index)
    fast_address = f"127.0.0.1:{server.fast_port}"
    with IndexClient(f"127.0.0.1:{server.port}", token=TOKEN, fast_address=fast_address, timeout_s=2) as client:
        assert [s.node for s in client.score(SPACE.model, token_ids=prompt)] == ["node-a"]
        server.stop()
        with pytest.raises(IndexUnavailableError, match="fast path"):
            client.score(SPACE.model, token_ids=prompt)
        server = start_server(index, fast_address)  # the same port: the pooled connection is stale
        try:
            assert [s.node for s in client.score(SPACE.model, token_ids=prompt)] == ["node-a"]
        finally:
            server.stop()


def test_a_fast_address_that_cannot_be_bound_is_a_clear_error() -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(ConfigError, match="index.fast_address"):
            start_server(MemoryIndex(), taken).stop()
        with pytest.raises(ConfigError, match="not a host:port"):
            start_server(MemoryIndex(), "no-port-here").stop()
    finally:
        holder.close()
