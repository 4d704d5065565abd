"""A vLLM engine in a subprocess, driven one command at a time (for benchmarks and the demo).

The child process builds ``vllm.LLM`` once, then answers JSON commands read from stdin on a
dedicated pipe (vLLM logs to stdout/stderr, which go to a log file). Each ``generate`` returns
token ids, log-probabilities, ``num_cached_tokens`` and the wall time of the call; with
``max_tokens=1`` and one prompt per call, that time is the request's time to first token.
Between commands the caller may restart daemons, flip configuration, or measure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in the child itself: one import, faster start
    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2))),
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

DEFAULT_LLM_KWARGS: dict[str, Any] = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 4096,
    "block_size": 32,
    "kv_cache_memory_bytes": 256 * 1024 * 1024,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 4096,
    "seed": 0,
}

_CHILD = textwrap.dedent(
    '''
    import json, os, sys, time

    def main():
        spec = json.loads(sys.argv[1])
        out = os.fdopen(int(os.environ["KVTIER_ENGINE_RESULT_FD"]), "w")
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig
        kwargs = dict(spec["llm_kwargs"])
        if spec.get("kv_transfer_config"):
            kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
        if isinstance(kwargs.get("kv_events_config"), dict):  # vLLM's own KV events (ZMQ)
            from vllm.config import KVEventsConfig
            kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
        llm = LLM(model=spec["model"], **kwargs)
        out.write(json.dumps({"ready": True}) + "\\n"); out.flush()
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "quit":
                break
            params = SamplingParams(temperature=0.0, max_tokens=command["max_tokens"], logprobs=command.get("logprobs"),
                                    ignore_eos=True, detokenize=False)
            results = []
            for group in command["groups"]:
                start = time.perf_counter()
                outputs = llm.generate([{"prompt_token_ids": p} for p in group], params, use_tqdm=False)
                seconds = time.perf_counter() - start
                for o in outputs:
                    c = o.outputs[0]
                    logprobs = [float(pos[t].logprob) for t, pos in zip(c.token_ids, c.logprobs or [])]
                    results.append({"token_ids": list(c.token_ids), "logprobs": logprobs,
                                    "num_cached_tokens": o.num_cached_tokens, "seconds": seconds,
                                    "prompt_tokens": len(o.prompt_token_ids or [])})
            out.write(json.dumps({"results": results}) + "\\n"); out.flush()
        del llm

    if __name__ == "__main__":
        main()
    '''
)


class EngineSession:
    """One engine subprocess. Use as a context manager; ``generate`` blocks until done."""

    def __init__(
        self,
        model: Path | str,
        *,
        log_path: Path,
        kv_transfer_config: dict[str, Any] | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        env: dict[str, str | None] | None = None,  # over ENGINE_ENV; a None value removes a variable
    ) -> None:
        spec = {
            "model": str(model),
            "llm_kwargs": {**DEFAULT_LLM_KWARGS, **(llm_kwargs or {})},
            "kv_transfer_config": kv_transfer_config,
        }
        read_fd, write_fd = os.pipe()
        repo_root = str(Path(__file__).resolve().parents[2])
        full_env = {**os.environ, **ENGINE_ENV, "KVTIER_ENGINE_RESULT_FD": str(write_fd)}
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, full_env.get("PYTHONPATH")) if p)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
            pass_fds=(write_fd,), text=True,
        )
        os.close(write_fd)
        self._results = os.fdopen(read_fd)
        self._expect("ready")

    def _expect(self, key: str) -> Any:
        line = self._results.readline()
        if not line:
            self._process.wait(timeout=30)
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"the vLLM engine exited (code {self._process.returncode}); log tail:\n{tail}")
        return json.loads(line)[key]

    def generate(self, groups: list[list[list[int]]], max_tokens: int = 1, logprobs: int | None = None) -> list[dict[str, Any]]:
        """Run each group of token-id prompts as one ``LLM.generate`` call; results in order."""
        self._process.stdin.write(json.dumps({"op": "generate", "groups": groups, "max_tokens": max_tokens, "logprobs": logprobs}) + "\n")
        self._process.stdin.flush()
        return self._expect("results")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._process.stdin.flush()
                self._process.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._results.close()
        self._log.close()

    def __enter__(self) -> EngineSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
