"""The global index beside a real vLLM engine: its GPU blocks from vLLM's own KV events, kvtier's
tiers from the daemons, one answer (issue 11's end-to-end check); and the daemon's tiers as vLLM
KV events, the token ids described by the engine's connector."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import pytest

from kvtier.blocks.hashing import hash_prompt
from kvtier.events.model import IndexTier, index_key
from kvtier.index.client import IndexClient
from kvtier.testing.daemon import LocalDaemon, free_port, wait_until
from kvtier.testing.engine import EngineSession
from kvtier.testing.workload import kvtier_connector_config, make_workload

pytest.importorskip("vllm")
zmq = pytest.importorskip("zmq")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "index-token-0123456789"
BLOCK = 32


def test_score_sees_the_engines_gpu_blocks_and_the_daemons_tiers(tiny_model: Path, tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvi-", dir="/tmp"))
    index_port, events_port = free_port(), free_port()
    index_address = f"127.0.0.1:{index_port}"
    index_log = open(tmp_path / "index.log", "wb")  # noqa: SIM115 - closed below
    index = subprocess.Popen(
        [sys.executable, "-m", "kvtier", "index", "serve", "--address", index_address, "--fast-address", "127.0.0.1:0", "--ttl", "30",
         "--engine-events", f"node-a=tcp://127.0.0.1:{events_port}"],
        env={**os.environ, "KVTIER_INDEX_AUTH_TOKEN": TOKEN}, stdout=index_log, stderr=subprocess.STDOUT)
    publish_env = {"KVTIER_PUBLISH_AUTH_TOKEN": TOKEN, "KVTIER_PUBLISH_HEARTBEAT_S": "0.5"}
    daemon_events = f"tcp://127.0.0.1:{free_port()}"
    a = LocalDaemon(root / "a", host_capacity="16MiB", args=["--node-name", "node-a", "--index", index_address],
                    env={**publish_env, "KVTIER_PUBLISH_VLLM_EVENTS": daemon_events, "KVTIER_PUBLISH_VLLM_EVENTS_ENCODING": "array"})
    b = LocalDaemon(root / "b", host_capacity="16MiB", args=["--node-name", "node-b", "--index", index_address], env=publish_env)
    a.start()
    b.start()
    workload = make_workload(documents=12, doc_tokens=1024, questions=1, seed=5)
    prompt = workload[0][0]
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@node-a@")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(daemon_events)
    try:
        # the topic llm-d's convention names: kv@<node>@<model> (the model as the connector's layouts name it)
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}",
                  "topic": f"kv@node-a@{tiny_model}"}
        with EngineSession(tiny_model, log_path=tmp_path / "engine.log", kv_transfer_config=kvtier_connector_config(a.socket_path),
                           llm_kwargs={"enable_prefix_caching": True, "kv_events_config": events}) as engine, \
                IndexClient(index_address, token=TOKEN) as client:
            engine.generate([[prompt]])
            assert a.wait_for_saves(1024 // BLOCK)
            # the daemon's host copies as vLLM events (positional, llm-d's field order), each with the
            # token ids the engine's connector described
            hashes = hash_prompt(prompt, BLOCK)[: 1024 // BLOCK]
            announced = daemon_cpu_blocks(sub, {index_key(h) for h in hashes})
            assert announced == {index_key(h): prompt[i * BLOCK:(i + 1) * BLOCK] for i, h in enumerate(hashes)}
            model = next(n.info.layouts[0].model for n in client.nodes() if n.info.node == "node-a" and n.info.layouts)
            blocks = len(prompt) // BLOCK

            def holders() -> set[tuple[str, IndexTier]]:
                return {(h.node, h.tier) for h in client.lookup(model, hashes[:1])[0]}

            # the engine's GPU copy (from vLLM's event) and the daemon's host copy (written back to disk too)
            assert model == str(tiny_model)
            expected = {("node-a", IndexTier.GPU), ("node-a", IndexTier.HOST), ("node-a", IndexTier.DISK)}
            assert wait_until(lambda: holders() == expected, timeout=30), holders()
            scores = client.score(model, token_ids=prompt)
            assert [s.node for s in scores] == ["node-a"]  # node-b holds nothing: no score at all
            assert scores[0].blocks == blocks and scores[0].runs[0].tier is IndexTier.GPU
            # other documents push the first out of the 16 MiB host arena; the disk copy stays
            for other in workload[0][1:]:
                engine.generate([[other]])
            assert wait_until(lambda: ("node-a", IndexTier.HOST) not in holders(), timeout=60), (holders(), repr(a.client().stats()))
            assert ("node-a", IndexTier.DISK) in holders()
            assert client.score(model, token_ids=prompt)[0].node == "node-a"
            assert client.score(model, token_ids=prompt, candidates=["node-b"]) == []
    finally:
        sub.close()
        context.term()
        a.stop()
        b.stop()
        index.terminate()
        index.wait(timeout=30)
        index_log.close()


def daemon_cpu_blocks(sub, wanted: set[int], timeout_s: float = 30) -> dict[int, list[int]]:
    """Token ids of the ``BlockStored`` (medium CPU) events for ``wanted`` keys on ``sub``."""
    import time

    found: dict[int, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not wanted <= found.keys():
        if sub.poll(200):
            _topic, _seq, payload = sub.recv_multipart()
            for event in msgpack.unpackb(payload)[1]:
                if event[0] == "BlockStored" and event[6] == "CPU" and event[1][0] in wanted:
                    found[event[1][0]] = event[3]
    return found
