"""``kvtier index serve | score | nodes``: run the global index, and ask it where prompts are cached.

Without ``--index``, ``score`` and ``nodes`` ask the local daemon's own index on its socket
(``kvtier serve`` alone keeps one). A TCP index needs its token: ``--token-file`` or
``KVTIER_INDEX_AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from kvtier.blocks.hashing import HashExtras
from kvtier.config import load_config
from kvtier.daemon.auth import read_setting_file
from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.index.base import NodeScore, NodeStatus
from kvtier.index.client import IndexClient


def _serve(args: argparse.Namespace) -> int:
    from kvtier.index.server import run_index

    settings: dict[str, Any] = {}
    for flag, key in (("address", "address"), ("fast_address", "fast_address"), ("store", "store"), ("ttl", "heartbeat_ttl_s"),
                      ("token_file", "auth_token_file"), ("namespace", "namespace"), ("redis_password_file", "redis_password_file")):
        value = getattr(args, flag)
        if value is not None:
            settings[key] = value
    if args.engine_events:
        settings["engine_events"] = args.engine_events
    if args.weights:
        settings["weights"] = _weights(args.weights)
    run_index(load_config(args.config, overrides={"index": settings}))
    return 0


def _weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        tier, sep, value = part.partition("=")
        try:
            weights[tier.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--weights takes tier=weight pairs such as host=0.9,disk=0.8; got {part!r}") from None
        if not sep:
            raise ConfigError(f"--weights takes tier=weight pairs such as host=0.9,disk=0.8; got {part!r}")
    return weights


def _client(args: argparse.Namespace) -> IndexClient:
    if args.index:
        target: str | Path = args.index
    else:
        target = Path(load_config(args.config).daemon.socket_path)
    token_file = read_setting_file(args.token_file, "--token-file")
    token = token_file.decode().strip() if token_file is not None else os.environ.get("KVTIER_INDEX_AUTH_TOKEN")
    ca = read_setting_file(args.tls_ca_file, "--tls-ca-file")
    cert, key = read_setting_file(args.tls_cert_file, "--tls-cert-file"), read_setting_file(args.tls_key_file, "--tls-key-file")
    if (cert is None) != (key is None):
        raise ConfigError("pass both --tls-cert-file and --tls-key-file for mutual TLS")
    return IndexClient(target, token=token, tls_root_certificates=ca, tls_client_cert=(key, cert) if cert else None,
                       timeout_s=args.timeout, fast_address=getattr(args, "fast_address", None))


def read_token_ids(path: str) -> list[int]:
    """Token ids from a file: a JSON list, or integers separated by whitespace or commas."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        value = json.loads(text)
        if isinstance(value, list) and all(type(t) is int for t in value):
            return value
    except json.JSONDecodeError:
        pass
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InvalidRequestError(f"{path} holds no token ids: expected a JSON list or integers separated by spaces") from None


def tokenize(prompt_file: str, tokenizer_dir: str) -> list[int]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("--prompt-file needs the transformers package (pip install transformers); or pass --tokens-file") from None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=Path(tokenizer_dir).exists())
    return list(tokenizer(Path(prompt_file).read_text(), add_special_tokens=True)["input_ids"])


def _score(args: argparse.Namespace) -> int:
    if bool(args.tokens_file) == bool(args.prompt_file):
        raise InvalidRequestError("pass --tokens-file, or --prompt-file with --tokenizer")
    if args.prompt_file and not args.tokenizer:
        raise InvalidRequestError("--prompt-file needs --tokenizer (a tokenizer folder or name)")
    tokens = read_token_ids(args.tokens_file) if args.tokens_file else tokenize(args.prompt_file, args.tokenizer)
    extras = HashExtras(lora_name=args.lora or None, cache_salt=args.cache_salt or None)
    with _client(args) as client:
        scores = client.score(args.model, token_ids=tokens, block_size=args.block_size or 0, extras=extras,
                              candidates=args.candidates.split(",") if args.candidates else ())
    if args.json:
        print(json.dumps({"model": args.model, "prompt_tokens": len(tokens), "scores": [_score_dict(s) for s in scores]}))
    else:
        print(render_scores(scores, len(tokens)))
    return 0


def _score_dict(score: NodeScore) -> dict[str, Any]:
    return {"node": score.node, "blocks": score.blocks, "tokens": score.tokens, "score": score.score,
            "runs": [{"tier": run.tier.label, "start_block": run.start, "blocks": run.blocks} for run in score.runs]}


def render_scores(scores: list[NodeScore], prompt_tokens: int) -> str:
    if not scores:
        return f"no node holds a prefix of this prompt ({prompt_tokens} tokens)"
    lines = [f"{'node':<24} {'tokens':>8} {'blocks':>7} {'score':>9}  tiers"]
    for s in scores:
        tiers = ", ".join(f"{run.tier.label} {run.blocks}" for run in s.runs)
        lines.append(f"{s.node:<24} {s.tokens:>8} {s.blocks:>7} {s.score:>9.1f}  {tiers}")
    return "\n".join(lines)


def _nodes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        nodes = client.nodes()
    if args.json:
        print(json.dumps([_node_dict(n) for n in nodes]))
    else:
        print(render_nodes(nodes))
    return 0


def _node_dict(status: NodeStatus) -> dict[str, Any]:
    return {**dataclasses.asdict(status.info), "heartbeat_age_s": round(status.heartbeat_age_s, 3), "alive": status.alive,
            "indexed_blocks": status.indexed_blocks}


def render_nodes(nodes: list[NodeStatus]) -> str:
    if not nodes:
        return "the index has heard from no node"
    lines = [f"{'node':<24} {'alive':<6} {'heartbeat':>10}  {'indexed blocks':<32} models"]
    for n in nodes:
        blocks = ", ".join(f"{tier} {count}" for tier, count in sorted(n.indexed_blocks.items())) or "-"
        models = ", ".join(sorted({f"{lay.model} (block {lay.block_size})" for lay in n.info.layouts})) or "-"
        lines.append(f"{n.info.node:<24} {'yes' if n.alive else 'NO':<6} {n.heartbeat_age_s:>9.1f}s  {blocks:<32} {models}")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="the global index: serve it, score prompts, list nodes")
    commands = parser.add_subparsers(dest="index_command", required=True)

    serve = commands.add_parser("serve", help="run the index service (gRPC; token or mTLS required)")
    serve.add_argument("--config", help="TOML configuration file ([index] section)")
    serve.add_argument("--address", help="listen on host:port (default 127.0.0.1:7460)")
    serve.add_argument("--fast-address", help="the fast path for routers' Score and LookupBlocks on host:port "
                       "(default 127.0.0.1:7461; '' turns it off)")
    serve.add_argument("--store", help="memory (default) or a Redis URL shared by several replicas: redis://host:6379/0")
    serve.add_argument("--namespace", help="Redis key prefix (default kvtier)")
    serve.add_argument("--redis-password-file", help="Redis password file (or KVTIER_REDIS_PASSWORD, or the URL)")
    serve.add_argument("--ttl", type=float, help="seconds without a heartbeat before a node leaves the scores (default 15)")
    serve.add_argument("--token-file", help="bearer token file (or KVTIER_INDEX_AUTH_TOKEN)")
    serve.add_argument("--weights", help="tier weights of the score, e.g. gpu=1,host=0.9,disk=0.8,s3=0.5")
    serve.add_argument("--engine-events", action="append",
                       help="subscribe to a vLLM engine's KV events: node=tcp://host:5557[,replay=tcp://host:5558][,model=M]"
                            "[,tiers=gpu|all] (repeat for several)")
    serve.set_defaults(handler=_serve)

    for name, handler, help_text in (("score", _score, "each node's cached prefix of a prompt"),
                                     ("nodes", _nodes, "the nodes the index knows")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--index", help="index address host:port or unix:/path (default: the local daemon's socket)")
        sub.add_argument("--config", help="TOML configuration file (for the local daemon's socket)")
        sub.add_argument("--token-file", help="the index's bearer token (or KVTIER_INDEX_AUTH_TOKEN)")
        sub.add_argument("--tls-ca-file", help="CA bundle to verify a TLS index")
        sub.add_argument("--tls-cert-file", help="client certificate, for an index that requires mutual TLS")
        sub.add_argument("--tls-key-file", help="the client certificate's private key")
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the index")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(handler=handler)
        if name == "score":
            sub.add_argument("--model", required=True, help="model name as the engines serve it")
            sub.add_argument("--fast-address", help="score over the index's fast path at host:port (its index.fast_address)")
            sub.add_argument("--tokens-file", help="token ids: a JSON list or integers separated by spaces")
            sub.add_argument("--prompt-file", help="prompt text, tokenized with --tokenizer")
            sub.add_argument("--tokenizer", help="tokenizer folder (or Hugging Face name) for --prompt-file")
            sub.add_argument("--block-size", type=int, help="tokens per block (default: the one the index knows for the model)")
            sub.add_argument("--lora", help="LoRA adapter name the prompt is served with")
            sub.add_argument("--cache-salt", help="the request's cache salt")
            sub.add_argument("--candidates", help="comma-separated node names to consider (default: all)")
