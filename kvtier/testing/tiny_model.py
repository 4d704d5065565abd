"""A small, deterministic, context-sensitive Llama model for vLLM end-to-end tests, made locally.

No download: the config is a :class:`transformers.LlamaConfig`, the weights are drawn from a seeded
generator and saved with ``save_pretrained`` (safetensors, float32), and the tokenizer is a
byte-level BPE trained on the spot with ``tokenizers`` over a generated corpus.

Why the weights are not the default initialisation: with ``initializer_range=0.02`` a random Llama
repeats one token whatever the context (attention is near uniform and the residual stream is
dominated by the mean of the values), so a test comparing outputs would pass even with garbage KV.
Here every matrix is drawn with a unit-scale variance (``std = gain / sqrt(fan_in)``), with a
larger gain on the query/key projections (sharp, position-dependent attention) and on the LM head
(peaked but not one-hot next-token distributions). The result, checked with transformers in
float32 on 500-token random prompts: 32-token greedy continuations have ~30 distinct tokens, the
chosen tokens' mean logprob is about -1.7, changing the token at position 5 changes the
first-token logprobs by several nats and most of the continuation, and float32 agrees with float64
(no greedy flip over 48 tokens, logprob error ~1e-5). Use float32 in the engine: bfloat16 diverges
from float32 within a few tokens, like any random model.

Use :func:`tiny_model_path` in tests (cached under ``~/.cache/kvtier/models/tiny-<hash>``, or
``$KVTIER_CACHE_DIR/models``), or :func:`make_tiny_model` to write a folder of your choice::

    python -m kvtier.testing.tiny_model OUT_DIR [--seed N] [--check]
    python -m kvtier.testing.tiny_model            # prints the cached folder, making it if needed

Needs ``torch``, ``transformers``, ``tokenizers`` and ``safetensors`` (all come with vLLM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bump when the generated files change for the same parameters (cache key).
GENERATOR_VERSION = 1
MARKER_FILE = "kvtier_tiny_model.json"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2, 3
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelParams:
    """Everything that determines the generated files (the cache key is a hash of this)."""

    seed: int = 0
    num_layers: int = 4
    hidden_size: int = 256
    intermediate_size: int = 512
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 2048
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    dtype: str = "float32"
    # Weight scales: std = gain / sqrt(fan_in) (embeddings: std = embed_std).
    embed_std: float = 1.0
    qk_gain: float = 2.0
    vo_gain: float = 1.0
    mlp_gain: float = 1.0
    lm_head_gain: float = 3.0

    def key(self) -> str:
        blob = json.dumps(
            {"generator": GENERATOR_VERSION, **asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Overrides for a model with real-model KV block sizes: 8 layers x 8 KV heads x head_dim 64 in
#: float32 is 32 KiB of KV per token, 1 MiB per 32-token block (Llama-3-8B in bfloat16: 128 KiB
#: per token). Prefill of 3,000 tokens takes about 0.7 s on 2 cores, so tests stay fast.
WIDE_MODEL: dict[str, Any] = {"num_layers": 8, "num_attention_heads": 8, "num_kv_heads": 8, "head_dim": 64,
                              "max_position_embeddings": 8192}


def default_cache_root() -> Path:
    base = os.environ.get("KVTIER_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "kvtier"
    return root / "models"


def _is_complete(path: Path, params: TinyModelParams) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("key") == params.key()


def make_tiny_model(
    path: Path | str, *, seed: int = 0, force: bool = False, **overrides: Any
) -> Path:
    """Write the tiny model folder at ``path`` (created; must be empty or hold this same model).

    ``overrides`` are :class:`TinyModelParams` fields. A folder that already holds the model for
    these parameters (its ``kvtier_tiny_model.json`` marker matches) is left as is unless ``force``.
    The write goes to a temporary sibling that is renamed into place, so readers never see a
    half-written model. Returns ``path``.
    """
    params = TinyModelParams(seed=seed, **overrides)
    path = Path(path)
    if not force and _is_complete(path, params):
        return path
    if path.exists() and any(path.iterdir()) and not (path / MARKER_FILE).exists():
        raise FileExistsError(
            f"{path} exists, is not empty and is not a kvtier tiny model"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_model(tmp, params)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process won the race with the same content.
            if not _is_complete(path, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_path(
    *, seed: int = 0, cache_root: Path | str | None = None, **overrides: Any
) -> Path:
    """The cached tiny model for these parameters, made on first use (a few seconds)."""
    params = TinyModelParams(seed=seed, **overrides)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return make_tiny_model(root / f"tiny-{params.key()}", seed=seed, **overrides)


# --------------------------------------------------------------------------------------------
# Generation


def _corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """Pseudo-English text: words made of syllables, with punctuation and digits."""
    rng = random.Random(f"kvtier-tiny-corpus-{seed}")
    onsets = [""] + [
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "br",
        "ch",
        "cl",
        "dr",
        "fl",
        "gr",
        "pl",
        "qu",
        "sh",
        "st",
        "th",
        "tr",
    ]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "oo", "ou", "y"]
    codas = ["", ""] + ["n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "x"]
    words = []
    for _ in range(3000):
        n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        words.append(
            "".join(
                rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas)
                for _ in range(n)
            )
        )
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like
    lines = []
    for _ in range(num_lines):
        toks = rng.choices(words, weights=weights, k=rng.randint(4, 24))
        if rng.random() < 0.3:
            toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 9999)))
        line = " ".join(toks)
        line = line[0].upper() + line[1:] + rng.choice(".....?!,;:")
        lines.append(line)
    return lines


def _train_tokenizer(params: TinyModelParams):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(params.seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    if tok.get_vocab_size() != params.vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size()} tokens, wanted {params.vocab_size}"
        )
    return tok


def _init_weights(model, params: TinyModelParams) -> None:
    import torch

    h = params.hidden_size
    inter = params.intermediate_size
    attn_out = params.num_attention_heads * params.head_dim
    std_for = {
        "embed_tokens": params.embed_std,
        "q_proj": params.qk_gain / math.sqrt(h),
        "k_proj": params.qk_gain / math.sqrt(h),
        "v_proj": params.vo_gain / math.sqrt(h),
        "o_proj": params.vo_gain / math.sqrt(attn_out),
        "gate_proj": params.mlp_gain / math.sqrt(h),
        "up_proj": params.mlp_gain / math.sqrt(h),
        "down_proj": params.mlp_gain / math.sqrt(inter),
        "lm_head": params.lm_head_gain / math.sqrt(h),
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
                continue
            kind = next(
                (k for k in std_for if f"{k}." in name or name.startswith(k)), None
            )
            if kind is None or not name.endswith("weight"):
                raise RuntimeError(f"tiny model: no init rule for parameter {name}")
            # One generator per tensor, seeded by (seed, name): independent of iteration order.
            digest = hashlib.sha256(f"{params.seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(
                int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
            )
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=torch.float32) * std_for[kind]
            )


def _write_model(out: Path, params: TinyModelParams) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    tok = _train_tokenizer(params)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=params.max_position_embeddings,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_kv_heads,
        head_dim=params.head_dim,
        max_position_embeddings=params.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=params.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS_TOKEN),
        eos_token_id=tok.token_to_id(EOS_TOKEN),
        pad_token_id=tok.token_to_id(PAD_TOKEN),
    )
    dtype = getattr(torch, params.dtype)
    torch.manual_seed(
        params.seed
    )  # the default init is overwritten; this only makes it quiet
    model = LlamaForCausalLM(config).eval()
    _init_weights(model, params)
    model = model.to(dtype)
    model.config.dtype = params.dtype
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / MARKER_FILE).write_text(
        json.dumps(
            {
                "key": params.key(),
                "generator": GENERATOR_VERSION,
                "params": asdict(params),
            },
            indent=2,
        )
        + "\n"
    )


# --------------------------------------------------------------------------------------------
# Evidence that outputs depend on the context (transformers, float32; a few seconds)


def _greedy(model, ids: list[int], n: int):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        toks, lps, first = [], [], None
        for _ in range(n):
            lp = torch.log_softmax(logits.float(), -1)
            if first is None:
                first = lp
            t = int(lp.argmax())
            toks.append(t)
            lps.append(float(lp[t]))
            out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
    return toks, lps, first


def context_sensitivity_report(
    path: Path | str,
    *,
    prompt_len: int = 500,
    new_tokens: int = 32,
    trials: int = 3,
    flip_position: int = 5,
) -> list[dict[str, Any]]:
    """Greedy continuations of random prompts, and what changing one early token does to them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    out = []
    for trial in range(trials):
        rng = random.Random(1000 + trial)
        prompt = [rng.randrange(NUM_SPECIAL_TOKENS, vocab) for _ in range(prompt_len)]
        flipped = list(prompt)
        flipped[flip_position] = NUM_SPECIAL_TOKENS + (
            prompt[flip_position] + 1 - NUM_SPECIAL_TOKENS
        ) % (vocab - NUM_SPECIAL_TOKENS)
        t1, l1, f1 = _greedy(model, prompt, new_tokens)
        t2, _, f2 = _greedy(model, flipped, new_tokens)
        out.append(
            {
                "distinct_tokens": len(set(t1)),
                "mean_logprob": sum(l1) / len(l1),
                "tokens_changed_by_flip": sum(a != b for a, b in zip(t1, t2)),
                "first_token_logprob_change": abs(l1[0] - float(f2[t1[0]])),
                "first_step_max_logprob_change": float((f1 - f2).abs().max()),
                "head": t1[:8],
                "head_flipped": t2[:8],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvtier.testing.tiny_model", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "out_dir", nargs="?", help="folder to write (default: the cache, path printed)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--force",
        action="store_true",
        help="rewrite even if the folder holds this model",
    )
    ap.add_argument(
        "--check", action="store_true", help="print the context-sensitivity evidence"
    )
    args = ap.parse_args(argv)
    if args.out_dir:
        path = make_tiny_model(Path(args.out_dir), seed=args.seed, force=args.force)
    else:
        path = tiny_model_path(seed=args.seed)
    print(path)
    if args.check:
        for row in context_sensitivity_report(path):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
