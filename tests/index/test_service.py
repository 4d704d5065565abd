"""The index as users run it: `kvtier serve` daemons publishing, `kvtier index serve`, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from kvtier.blocks.hashing import hash_prompt
from kvtier.blocks.layout import KVLayout
from kvtier.errors import AuthenticationError, IndexServiceError, InvalidRequestError
from kvtier.events.model import IndexTier
from kvtier.index.client import IndexClient
from kvtier.index.service import tier_to_proto
from kvtier.testing.daemon import LocalDaemon, free_port, wait_until
from kvtier.v1 import index_pb2 as pb

pytestmark = pytest.mark.slow

TOKEN = "index-token-0123456789"
LAYOUT = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)  # 8 KiB blocks
PROMPT = list(range(1000, 1000 + 16 * 12))


def kvtier_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier", *args], check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def fill(daemon: LocalDaemon, blocks: int) -> None:
    with daemon.client() as client:
        layout_id = client.register_layout(LAYOUT).layout_id
        client.write_blocks(layout_id, {h: bytes(LAYOUT.block_nbytes) for h in hash_prompt(PROMPT, 16)[:blocks]})


class RunningIndex(NamedTuple):
    address: str  # gRPC
    fast_address: str  # the fast path (Score, LookupBlocks)


@contextlib.contextmanager
def running_index(tmp_path: Path, env: dict[str, str], *extra_args: str, **client_options) -> Iterator[RunningIndex]:
    """``kvtier index serve`` on free ports with ``env``, once a client made with
    ``client_options`` gets answers; yields its addresses."""
    index = RunningIndex(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    log = open(tmp_path / "index.log", "wb")  # noqa: SIM115 - the server writes to it until the block ends
    process = subprocess.Popen([sys.executable, "-m", "kvtier", "index", "serve", "--address", index.address,
                                "--fast-address", index.fast_address, "--ttl", "2", *extra_args],
                               env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        with IndexClient(index.address, timeout_s=1, **client_options) as client:
            assert wait_until(lambda: _answers(client), timeout=30), (tmp_path / "index.log").read_text()
        yield index
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def index_service(tmp_path: Path) -> Iterator[RunningIndex]:
    with running_index(tmp_path, {"KVTIER_INDEX_AUTH_TOKEN": TOKEN}, token=TOKEN) as index:
        yield index


def _answers(client: IndexClient) -> bool:
    try:
        client.nodes()
        return True
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason
        return False


def test_a_daemon_alone_answers_for_its_own_tiers(tmp_path: Path) -> None:
    daemon = LocalDaemon(tmp_path / "d", host_capacity="32MiB", args=["--node-name", "node-a"])
    daemon.start()
    try:
        fill(daemon, 10)
        tokens_file = tmp_path / "tokens.json"
        tokens_file.write_text(json.dumps(PROMPT))
        socket = f"unix:{daemon.socket_path}"

        def scored() -> dict:
            result = kvtier_cli("index", "score", "--index", socket, "--model", "test/tiny", "--tokens-file", str(tokens_file), "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        assert wait_until(lambda: scored()["scores"] and scored()["scores"][0]["blocks"] == 10, timeout=20)
        [score] = scored()["scores"]
        assert score["node"] == "node-a" and score["tokens"] == 160
        assert score["runs"] == [{"tier": "host", "start_block": 0, "blocks": 10}]
        table = kvtier_cli("index", "score", "--index", socket, "--model", "test/tiny", "--tokens-file", str(tokens_file))
        assert "node-a" in table.stdout and "host 10" in table.stdout
        nodes = json.loads(kvtier_cli("index", "nodes", "--index", socket, "--json").stdout)
        assert nodes[0]["node"] == "node-a" and nodes[0]["layouts"][0]["model"] == "test/tiny"
        stats = json.loads(kvtier_cli("stats", "--socket", str(daemon.socket_path), "--json").stdout)
        assert stats["publish"]["target"] == "local" and stats["publish"]["publishing"]
        assert "publishing" in kvtier_cli("stats", "--socket", str(daemon.socket_path)).stdout
    finally:
        daemon.stop()


def test_the_cli_tokenizes_a_prompt_file_with_the_models_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from kvtier.testing.tiny_model import tiny_model_path

    model_dir = tiny_model_path(seed=0)
    text = " ".join(f"the router asks which node holds prompt {i} of the shared document" for i in range(40))
    tokens = transformers.AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=True)["input_ids"]
    assert len(tokens) >= 16 * 8, len(tokens)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(text)
    daemon = LocalDaemon(tmp_path / "d", host_capacity="32MiB", args=["--node-name", "node-a"])
    daemon.start()
    try:
        with daemon.client() as client:
            layout_id = client.register_layout(LAYOUT).layout_id
            client.write_blocks(layout_id, {h: bytes(LAYOUT.block_nbytes) for h in hash_prompt(tokens, 16)[:8]})

        def scored() -> list[dict]:
            result = kvtier_cli("index", "score", "--index", f"unix:{daemon.socket_path}", "--model", "test/tiny",
                                "--prompt-file", str(prompt_file), "--tokenizer", str(model_dir), "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)["scores"]

        assert wait_until(lambda: [(s["node"], s["blocks"]) for s in scored()] == [("node-a", 8)], timeout=20)
        no_tokenizer = kvtier_cli("index", "score", "--index", f"unix:{daemon.socket_path}", "--model", "test/tiny",
                                  "--prompt-file", str(prompt_file))
        assert no_tokenizer.returncode == 2 and "--prompt-file needs --tokenizer" in no_tokenizer.stderr
    finally:
        daemon.stop()


def test_daemons_publish_to_the_index_service_and_a_dead_one_leaves(tmp_path: Path, index_service: RunningIndex) -> None:
    env = {"KVTIER_PUBLISH_AUTH_TOKEN": TOKEN, "KVTIER_PUBLISH_HEARTBEAT_S": "0.3"}
    address = index_service.address
    a = LocalDaemon(tmp_path / "a", host_capacity="32MiB", args=["--node-name", "a", "--index", address], env=env)
    b = LocalDaemon(tmp_path / "b", host_capacity="32MiB", args=["--node-name", "b", "--index", address], env=env)
    a.start()
    b.start()
    try:
        fill(a, 12)
        fill(b, 4)
        with IndexClient(address, token=TOKEN) as client, \
                IndexClient(address, token=TOKEN, fast_address=index_service.fast_address) as fast:
            assert wait_until(lambda: [(s.node, s.blocks) for s in client.score("test/tiny", token_ids=PROMPT)] == [("a", 12), ("b", 4)],
                              timeout=20)
            by_hash = client.score("test/tiny", block_hashes=hash_prompt(PROMPT, 16))
            assert [s.node for s in by_hash] == ["a", "b"] and by_hash[0].runs[0].tier is IndexTier.HOST
            # The fast path answers the same, from tokens and from hashes.
            assert fast.score("test/tiny", token_ids=PROMPT) == by_hash
            assert fast.score("test/tiny", block_hashes=hash_prompt(PROMPT, 16)) == by_hash
            assert {n.info.node for n in client.nodes() if n.alive} == {"a", "b"}
            holders = client.lookup("test/tiny", hash_prompt(PROMPT, 16)[:1])
            assert {h.node for h in holders[0]} == {"a", "b"}
            assert fast.lookup("test/tiny", hash_prompt(PROMPT, 16)) == client.lookup("test/tiny", hash_prompt(PROMPT, 16))
            tokens_file = tmp_path / "prompt.json"
            tokens_file.write_text(json.dumps(PROMPT))
            cli_scores = [json.loads(kvtier_cli("index", "score", "--index", address, *fast_flag, "--model", "test/tiny",
                                                "--tokens-file", str(tokens_file), "--json",
                                                env={**os.environ, "KVTIER_INDEX_AUTH_TOKEN": TOKEN}).stdout)["scores"]
                          for fast_flag in ((), ("--fast-address", index_service.fast_address))]
            assert cli_scores[0] == cli_scores[1] and [s["node"] for s in cli_scores[0]] == ["a", "b"]
            b.stop(signal.SIGKILL)
            started = time.monotonic()
            assert wait_until(lambda: [s.node for s in fast.score("test/tiny", token_ids=PROMPT)] == ["a"], timeout=10)
            assert time.monotonic() - started < 2 + 1.5  # the TTL (2 s) plus a sweep
    finally:
        a.stop()
        if b.process and b.process.poll() is None:
            b.stop()


def test_the_index_refuses_bad_credentials_and_bad_queries(index_service: RunningIndex) -> None:
    address, fast_address = index_service
    for via in ({}, {"fast_address": fast_address}):
        with IndexClient(address, **via) as anonymous, pytest.raises(AuthenticationError):
            anonymous.score("m", token_ids=PROMPT, block_size=16)
        with IndexClient(address, token="wrong-token-0123456789", **via) as wrong, pytest.raises(AuthenticationError):
            wrong.score("m", token_ids=PROMPT, block_size=16)
        with IndexClient(address, token=TOKEN, **via) as client:
            with pytest.raises(InvalidRequestError, match="block size"):
                client.score("nobody/serves-this", token_ids=PROMPT)
            with pytest.raises(InvalidRequestError, match="not both"):
                client.score("m", token_ids=[1] * 16, block_hashes=[b"\0" * 16], block_size=16)
            with pytest.raises(InvalidRequestError, match="16 bytes"):
                client.score("m", block_hashes=[b"short"], block_size=16)
            with pytest.raises(InvalidRequestError, match="token ids must be integers"):
                client.score("m", token_ids=[-1] * 16, block_size=16)
            with pytest.raises(InvalidRequestError, match="model is required"):
                client.lookup("", [b"\0" * 16], block_size=16)
    with IndexClient(address, token=TOKEN) as client:
        with pytest.raises(InvalidRequestError, match="not both"):
            client._call("Score", pb.ScoreRequest(model="m", block_size=16, block_hashes=[b"\0" * 16], packed_block_hashes=b"\0" * 16))
        with pytest.raises(InvalidRequestError, match="4 bytes each"):
            client._call("Score", pb.ScoreRequest(model="m", block_size=16, packed_token_ids=b"\0" * 6))
        with pytest.raises(InvalidRequestError, match="msgpack"):
            client._call("Publish", pb.PublishRequest(batch=b"\xc1 not msgpack"))
        with pytest.raises(InvalidRequestError):
            client._call("Heartbeat", pb.HeartbeatRequest(heartbeat=b"\x93\x01\x02\x03"))
        assert client.nodes() == []  # still serving, nothing applied
    assert tier_to_proto(IndexTier.GPU) == pb.TIER_GPU


def test_the_index_with_mutual_tls_admits_only_clients_with_a_certificate_from_its_ca(tmp_path: Path) -> None:
    from tests.certs import ca_pem, issue, make_ca

    ca = make_ca("index-test-ca")
    files = dict(zip(("server.key", "server.crt"), issue(ca, "kvtier-index"), strict=True)) | {"ca.crt": ca_pem(ca)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {"KVTIER_INDEX_TLS_CERT_FILE": str(tmp_path / "server.crt"), "KVTIER_INDEX_TLS_KEY_FILE": str(tmp_path / "server.key"),
           "KVTIER_INDEX_TLS_CLIENT_CA_FILE": str(tmp_path / "ca.crt")}
    env = {**{k: "" for k in os.environ if k.startswith("KVTIER_INDEX_")}, **env}  # mTLS alone, no token
    router = issue(ca, "router")
    files = dict(zip(("daemon.key", "daemon.crt"), issue(ca, "node-a"), strict=True))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with running_index(tmp_path, env, tls_root_certificates=ca_pem(ca), tls_client_cert=router) as (address, fast_address):
        # A daemon publishing with its own certificate (no token anywhere).
        daemon = LocalDaemon(tmp_path / "a", host_capacity="32MiB", args=["--node-name", "node-a", "--index", address], env={
            "KVTIER_PUBLISH_TLS_CA_FILE": str(tmp_path / "ca.crt"), "KVTIER_PUBLISH_TLS_CERT_FILE": str(tmp_path / "daemon.crt"),
            "KVTIER_PUBLISH_TLS_KEY_FILE": str(tmp_path / "daemon.key")})
        daemon.start()
        try:
            fill(daemon, 6)
            with IndexClient(address, tls_root_certificates=ca_pem(ca), tls_client_cert=router) as trusted, \
                    IndexClient(address, tls_root_certificates=ca_pem(ca), tls_client_cert=router, fast_address=fast_address) as fast:
                assert wait_until(lambda: [(s.node, s.blocks) for s in trusted.score("test/tiny", token_ids=PROMPT)] == [("node-a", 6)],
                                  timeout=20)
                assert fast.score("test/tiny", token_ids=PROMPT) == trusted.score("test/tiny", token_ids=PROMPT)
        finally:
            daemon.stop()
        cli_tls = ["--tls-ca-file", str(tmp_path / "ca.crt"), "--tls-cert-file", str(tmp_path / "daemon.crt"),
                   "--tls-key-file", str(tmp_path / "daemon.key")]
        nodes = kvtier_cli("index", "nodes", "--index", address, *cli_tls, "--json")
        assert nodes.returncode == 0 and json.loads(nodes.stdout)[0]["node"] == "node-a", nodes.stderr
        half = kvtier_cli("index", "nodes", "--index", address, *cli_tls[:4])
        assert half.returncode == 2 and "both --tls-cert-file and --tls-key-file" in half.stderr
        for refused in ({"tls_root_certificates": ca_pem(ca)},  # no certificate
                        {"tls_root_certificates": ca_pem(ca), "tls_client_cert": issue(make_ca("another-ca"), "intruder")},
                        {}):  # plaintext
            with IndexClient(address, timeout_s=3, **refused) as stranger, pytest.raises(IndexServiceError):
                stranger.nodes()
            with IndexClient(address, timeout_s=3, fast_address=fast_address, **refused) as stranger, pytest.raises(IndexServiceError):
                stranger.score("test/tiny", token_ids=PROMPT)


def test_an_index_on_tcp_without_credentials_does_not_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_INDEX_")}
    result = subprocess.run([sys.executable, "-m", "kvtier", "index", "serve", "--address", f"127.0.0.1:{free_port()}"],
                            check=False, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "authenticate" in result.stderr


@pytest.mark.redis
def test_daemons_publish_straight_into_redis_and_an_index_replica_answers(tmp_path: Path, redis_url: str) -> None:
    port, fast_port = free_port(), free_port()
    log = open(tmp_path / "index.log", "wb")  # noqa: SIM115 - closed below
    index = subprocess.Popen([sys.executable, "-m", "kvtier", "index", "serve", "--address", f"127.0.0.1:{port}",
                              "--fast-address", f"127.0.0.1:{fast_port}", "--store", redis_url, "--namespace", "svc", "--ttl", "3"],
                             env={**os.environ, "KVTIER_INDEX_AUTH_TOKEN": TOKEN}, stdout=log, stderr=subprocess.STDOUT)
    daemon = LocalDaemon(tmp_path / "d", host_capacity="32MiB", args=["--node-name", "redis-node", "--index", redis_url],
                         env={"KVTIER_PUBLISH_NAMESPACE": "svc", "KVTIER_PUBLISH_HEARTBEAT_S": "0.5"})
    daemon.start()
    try:
        fill(daemon, 7)
        with IndexClient(f"127.0.0.1:{port}", token=TOKEN, timeout_s=2) as client:
            def blocks() -> list[tuple[str, int]]:
                try:
                    return [(s.node, s.blocks) for s in client.score("test/tiny", token_ids=PROMPT)]
                except Exception:  # noqa: BLE001 - the index may still be starting
                    return []

            assert wait_until(lambda: blocks() == [("redis-node", 7)], timeout=30), (tmp_path / "index.log").read_text()
            with IndexClient(f"127.0.0.1:{port}", token=TOKEN, fast_address=f"127.0.0.1:{fast_port}") as fast:
                assert fast.score("test/tiny", token_ids=PROMPT) == client.score("test/tiny", token_ids=PROMPT)
        stats = json.loads(kvtier_cli("stats", "--socket", str(daemon.socket_path), "--json").stdout)
        assert stats["publish"]["publishing"] and stats["publish"]["target"].startswith("redis://")
    finally:
        daemon.stop()
        index.terminate()
        index.wait(timeout=30)
        log.close()
