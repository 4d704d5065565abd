"""``kvtier demo-chain``: the tier chain alone on a shared-prefix workload (no vLLM, GPU, Redis or S3).

Requests are long shared documents followed by short questions (RAG / multi-turn shape). Each
request's prompt is hashed into block keys; the chain is asked for the longest cached prefix;
cached blocks are read back and checked byte for byte against what a recompute would produce;
missing blocks are "computed" (deterministic bytes standing in for KV) and stored. Host memory
is deliberately smaller than the working set, so blocks are demoted to disk, evicted from host
memory and promoted back. The demo then restarts the chain (disk blocks survive) and corrupts a
block on disk (detected, never served).
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.blocks import BlockKey, KVLayout, hash_prompt, keys_for
from kvtier.chain import TierChain
from kvtier.cli.format import render_chain_stats, render_table
from kvtier.config import ChainConfig, DiskTierConfig, HostTierConfig
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier
from kvtier.units import format_size, parse_size

LAYOUT = KVLayout(model="demo/llama-like-1b", dtype="bfloat16", num_layers=8, num_kv_heads=4, head_size=64, block_size=16)


def simulated_kv(key: BlockKey, nbytes: int) -> bytes:
    """The bytes a recompute of this block would produce (deterministic per key)."""
    return random.Random(key.block_hash).randbytes(nbytes)


@dataclass
class PhaseResult:
    name: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    recomputed_tokens: int = 0
    wrong_blocks: int = 0
    seconds: float = 0.0

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached_tokens_by_tier.values())


def make_workload(documents: int, questions: int, doc_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(32000) for _ in range(64)]
    docs = [system + [rng.randrange(32000) for _ in range(doc_tokens)] for _ in range(documents)]
    prompts = []
    for round_ in range(questions):
        for doc in docs:
            prompts.append(doc + [rng.randrange(32000) for _ in range(48 + round_)])
    return prompts


def serve(chain: TierChain, prompts: list[list[int]], name: str) -> PhaseResult:
    result = PhaseResult(name)
    start = time.perf_counter()
    for tokens in prompts:
        keys = keys_for(LAYOUT.layout_id, hash_prompt(tokens, LAYOUT.block_size))
        result.requests += 1
        result.prompt_tokens += len(tokens)
        cached = 0
        for key, tier_name in zip(keys, chain.lookup(keys)):
            data = chain.get(key)
            if data is None:
                break  # e.g. corrupt on disk: a miss, recomputed below
            if data != simulated_kv(key, LAYOUT.block_nbytes):
                result.wrong_blocks += 1
                break
            result.cached_tokens_by_tier[tier_name] = result.cached_tokens_by_tier.get(tier_name, 0) + LAYOUT.block_size
            cached += 1
        for key in keys[cached:]:
            chain.put(key, simulated_kv(key, LAYOUT.block_nbytes))
        result.recomputed_tokens += len(tokens) - cached * LAYOUT.block_size
    result.seconds = time.perf_counter() - start
    return result


def open_chain(root: Path, host_capacity: int, disk_capacity: int, eviction: str) -> TierChain:
    host = HostTier(HostTierConfig(capacity=host_capacity, slab_size=min(host_capacity, 4 << 20)))
    disk = DiskTier(DiskTierConfig(path=root / "disk", capacity=disk_capacity))
    return TierChain([host, disk], ChainConfig(eviction=eviction))


def corrupt_one_block(root: Path) -> Path | None:
    files = sorted((root / "disk").rglob("*.kvb"))
    if not files:
        return None
    with open(files[0], "r+b") as handle:
        handle.seek(4096 + 1000)
        byte = handle.read(1)
        handle.seek(4096 + 1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return files[0]


def render_phases(phases: list[PhaseResult]) -> str:
    rows = []
    for phase in phases:
        by_tier = ", ".join(f"{tier} {tokens}" for tier, tokens in sorted(phase.cached_tokens_by_tier.items())) or "-"
        rows.append([
            phase.name,
            str(phase.requests),
            str(phase.prompt_tokens),
            f"{phase.cached_tokens} ({phase.cached_tokens / max(phase.prompt_tokens, 1):.0%})",
            by_tier,
            str(phase.recomputed_tokens),
            str(phase.wrong_blocks),
            f"{phase.seconds:.2f}",
        ])
    return render_table(["phase", "requests", "prompt tokens", "from cache", "by tier", "recomputed", "wrong", "s"], rows)


def run_demo(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    host_capacity, disk_capacity = parse_size(args.host_capacity), parse_size(args.disk_capacity)
    prompts = make_workload(args.documents, args.questions, args.doc_tokens, seed=7)
    print(f"layout {LAYOUT.layout_id}: {LAYOUT.model}, {LAYOUT.num_layers} layers, block of {LAYOUT.block_size} tokens "
          f"= {format_size(LAYOUT.block_nbytes)}")
    print(f"host tier {format_size(host_capacity)} (shared-memory arena), disk tier {format_size(disk_capacity)} in {root / 'disk'}, "
          f"eviction {args.eviction}, write-back\n")

    phases = []
    chain = open_chain(root, host_capacity, disk_capacity, args.eviction)
    first, rest = prompts[: args.documents], prompts[args.documents :]
    phases.append(serve(chain, first, "cold: first question per document"))
    phases.append(serve(chain, rest, "warm: follow-up questions"))
    chain.flush(60)
    print(render_chain_stats(chain.stats()) + "\n")
    chain.close()

    chain = open_chain(root, host_capacity, disk_capacity, args.eviction)
    phases.append(serve(chain, prompts[: args.documents], "after restart (disk survives)"))
    chain.flush(60)
    chain.close()

    damaged = corrupt_one_block(root)
    chain = open_chain(root, host_capacity, disk_capacity, args.eviction)
    phases.append(serve(chain, prompts[: args.documents], "after corrupting a disk block"))
    chain.flush(60)
    print(render_phases(phases) + "\n")
    if damaged is not None:
        print(f"flipped one byte in {damaged.name}: detected by its checksum, deleted and recomputed\n")
    print(render_chain_stats(chain.stats()))
    chain.close()
    wrong = sum(p.wrong_blocks for p in phases)
    print(f"\nwrong blocks served: {wrong}")
    return 1 if wrong else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo-chain", help="the tier chain alone on a shared-prefix workload (no vLLM needed)")
    parser.add_argument("--dir", default=".kvtier-demo/chain", help="working folder (deleted and recreated)")
    parser.add_argument("--host-capacity", default="16MiB")
    parser.add_argument("--disk-capacity", default="1GiB")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--eviction", choices=["lru", "s3fifo"], default="lru")
    parser.set_defaults(handler=run_demo)
