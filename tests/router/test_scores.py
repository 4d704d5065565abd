"""The router's index client (kvtier.router.scores) against a real index server's fast path: the
same prefixes as the synchronous client, and every way of not answering turned into a fallback
within the deadline, followed by a back-off."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kvtier.index.client import IndexClient
from kvtier.index.memory import MemoryIndex
from kvtier.index.server import IndexServer
from kvtier.router.scores import IndexScores, IndexUnanswered
from tests.index.test_conformance import SPACE
from tests.index.test_fast_path import TOKEN, populated  # noqa: F401 - the fixture

MODEL, BLOCK = SPACE.model, SPACE.block_size


def fast_address(server: IndexServer) -> str:
    return f"127.0.0.1:{server.fast_port}"


def test_scores_match_the_index_clients(populated: tuple[MemoryIndex, IndexServer, list[list[int]]]) -> None:
    _, server, prompts = populated
    scores = IndexScores(fast_address(server), token=TOKEN, deadline_s=5.0)
    nodes = [f"node-{n:02d}" for n in range(12)]

    async def ask() -> list[dict]:
        try:
            return [await scores.score(MODEL, prompt, nodes[:8]) for prompt in prompts]
        finally:
            scores.close()

    answers = asyncio.run(ask())
    with IndexClient(f"127.0.0.1:{server.port}", token=TOKEN, fast_address=fast_address(server)) as client:
        for prompt, answer in zip(prompts, answers):
            expected = client.score(MODEL, token_ids=prompt, candidates=nodes[:8])
            assert {node: cached.tokens for node, cached in answer.items()} == {s.node: s.tokens for s in expected}
            assert {node: cached.saved_tokens for node, cached in answer.items()} == pytest.approx(
                {s.node: s.score * BLOCK for s in expected})
    assert any(answers)


def test_a_wrong_token_is_a_fallback_then_a_back_off(populated: tuple[MemoryIndex, IndexServer, list[list[int]]]) -> None:
    _, server, prompts = populated
    scores = IndexScores(fast_address(server), token="not-the-token-0123", deadline_s=5.0, retry_after_s=60)

    async def ask() -> list[str]:
        reasons = []
        for _ in range(2):
            with pytest.raises(IndexUnanswered) as raised:
                await scores.score(MODEL, prompts[0], ["node-00"])
            reasons.append(raised.value.reason)
        return reasons

    assert asyncio.run(ask()) == ["unavailable", "backoff"]
    assert "UNAUTHENTICATED" in scores.last_error


def test_an_index_that_never_answers_costs_one_deadline() -> None:
    """A listener that takes the connection and never replies (a stopped index looks the same)."""
    listener = socket.create_server(("127.0.0.1", 0))
    scores = IndexScores(f"127.0.0.1:{listener.getsockname()[1]}", deadline_s=0.05, retry_after_s=60)

    async def ask() -> list[str]:
        reasons = []
        for _ in range(3):
            try:
                await scores.score(MODEL, list(range(64)), ["node-00"])
            except IndexUnanswered as exc:
                reasons.append(exc.reason)
        return reasons

    try:
        reasons = asyncio.run(ask())
    finally:
        listener.close()
    assert reasons == ["timeout", "backoff", "backoff"]


def test_nothing_listening_is_unavailable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    scores = IndexScores(f"127.0.0.1:{port}", deadline_s=1.0)
    with pytest.raises(IndexUnanswered) as raised:
        asyncio.run(scores.score(MODEL, [1, 2, 3], ["node-00"]))
    assert raised.value.reason == "unavailable"
