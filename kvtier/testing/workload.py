"""The shared-prefix workload and the paired TTFT measurement used by ``kvtier demo`` and
``benchmarks/ttft.py``: long documents, each followed by different questions (RAG and
multi-turn chat shape), run on an engine with kvtier and one without, alternating."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.testing.engine import EngineSession

# vLLM's own prefix cache off: a repeated prefix can then only come from the connector, the
# situation kvtier exists for (the GPU cache evicted it, or another replica computed it).
NO_PREFIX_CACHE = {"enable_prefix_caching": False}


def kvtier_connector_config(socket_path: Path | None, **extra: Any) -> dict[str, Any]:
    """The ``--kv-transfer-config`` of KVTierConnector (``socket_path`` None: embedded daemon)."""
    extra_config = dict(extra)
    if socket_path is not None:
        extra_config["socket_path"] = str(socket_path)
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "connectors.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra_config,
    }


def make_workload(documents: int, doc_tokens: int, questions: int, seed: int) -> list[list[list[int]]]:
    """``workload[q][d]``: question ``q`` about document ``d`` (document tokens + 64 question tokens)."""
    rng = random.Random(seed)
    docs = [[rng.randrange(4, 2048) for _ in range(doc_tokens)] for _ in range(documents)]
    return [[doc + [rng.randrange(4, 2048) for _ in range(64)] for doc in docs] for _ in range(questions)]


def paired(engine: EngineSession, base: EngineSession, prompts: list[list[int]],
           before_engine: Callable[[], None] | None = None) -> dict[str, list]:
    """TTFT of each prompt on ``engine`` and on ``base``, alternating which goes first, one prompt
    per generate call with max_tokens=1 (the call's time is the TTFT). Interleaving makes both
    see the same machine load, so their ratio holds on a noisy machine. ``before_engine`` runs
    (untimed) before each of ``engine``'s prompts."""
    out: dict[str, list] = {"ms": [], "base_ms": [], "cached": [], "tokens": [], "base_tokens": []}
    for index, prompt in enumerate(prompts):
        order = [(engine, "ms", "tokens"), (base, "base_ms", "base_tokens")]
        for session, time_key, token_key in (order if index % 2 == 0 else reversed(order)):
            if session is engine and before_engine is not None:
                before_engine()
            result = session.generate([[prompt]], max_tokens=1)[0]
            out[time_key].append(result["seconds"] * 1000)
            out[token_key].append(result["token_ids"])
            if session is engine:
                out["cached"].append(result["num_cached_tokens"])
    return out
