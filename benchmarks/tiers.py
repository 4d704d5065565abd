"""Put/get throughput of each tier next to the bound it could reach, measured in the same run.

    python -m benchmarks.tiers [--quick] [--only host,disk,s3,chain] [--disk-dir /tmp]

Cases (each ``value`` and ``baseline`` in GB/s = 10**9 bytes/s, ``ratio = value / baseline``):

- ``host.*``: HostTier ``put``/``put_many``, the zero-copy write (``reserve`` + write into
  ``slot_view`` + ``commit``), ``get``/``get_many``, ``read_into`` and ``view`` (+ a copy out) vs a
  plain memcpy (memoryview slice assignment) of the same blocks between two preallocated,
  pre-faulted shared-memory buffers (a ``SharedArena`` in the same ``/dev/shm``). Target 0.8.
- ``disk.*``: DiskTier ``put``/``put_many``, ``read_into`` (into a page-aligned buffer, as a
  promotion into the host arena does) and ``get``/``get_many`` vs one raw file per block in the
  same I/O mode the tier chose (O_DIRECT when the filesystem takes it): ``open`` + ``pwrite`` +
  ``close`` of the payload from an mmap-aligned buffer, ``open`` + ``preadv`` + ``close`` to read.
  The tier also writes a 4 KiB header page, renames a temporary file and checks an XXH3
  checksum on reads: that is the overhead measured. Target 0.8.
- ``s3.*``: S3Tier ``put``/``put_many`` and ``get``/``get_many`` against a local ``moto_server``
  vs plain boto3 ``put_object``/``get_object`` of the same bytes, with a client configured like
  the tier's and a ThreadPoolExecutor of the tier's ``max_concurrency`` (one thread for batch 1).
  Target 0.9.
- ``chain.*`` (informative): TierChain ``put`` with a disk tier below (write-back) vs a host-only
  chain (the step-side cost of queuing demotions), a host-only chain vs ``HostTier.put``
  (bookkeeping), and write-back drained to disk (``put`` + ``flush``) vs raw disk writes.

A batch of 1 calls the per-block verb in a loop; a batch of N calls the ``*_many`` verb on N
blocks at a time. Every case moves the same blocks as its bound, and the two are timed alternately
(:func:`benchmarks.common.compare`). Drop-caches is not available: with O_DIRECT neither side
touches the page cache; when the filesystem refuses O_DIRECT both sides use buffered I/O, reads
then come from the page cache, and the rows say ``io: buffered``.
"""

from __future__ import annotations

import itertools
import mmap
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    Row,
    Stat,
    command_line,
    compare,
    fmt_size,
    gbps,
    make_parser,
    print_table,
    repeats,
    summarize_targets,
    write_results,
)
from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.config import ChainConfig, DiskTierConfig, HostTierConfig, S3TierConfig
from kvtier.tiers.arena import SharedArena
from kvtier.tiers.base import PutRequest, Tier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier

KiB, MiB = 1 << 10, 1 << 20
LAYOUT_ID = "00000000be0c4a11"  # any 16 hex digits
TARGETS = {"host": 0.8, "disk": 0.8, "s3": 0.9}
#: Timed runs per side are ``--repeat`` (3 quick, 5 full) times this: cheap cases get more samples.
REPEAT_SCALE = {"host": 3, "disk": 2, "s3": 1, "chain": 1}
GBPS = "GB/s"
FAKE_AWS_ENV = {  # moto accepts anything; never let the benchmark reach real AWS
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/kvtier-bench/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kvtier-bench/aws-credentials",
}


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    batches: tuple[int, ...]  # host
    disk_batches: tuple[int, ...]
    s3_sizes: tuple[int, ...]
    s3_batches: tuple[int, ...]
    host_bytes: int  # bytes moved per timed run (at least max(batches) blocks)
    disk_bytes: int
    s3_bytes: int
    s3_concurrency: int
    chain_sizes: tuple[int, ...]

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(
                sizes=(64 * KiB, 4 * MiB),
                batches=(1, 64),
                disk_batches=(1, 16),
                s3_sizes=(64 * KiB, 4 * MiB),
                s3_batches=(1, 16),
                host_bytes=64 * MiB,
                disk_bytes=16 * MiB,
                s3_bytes=4 * MiB,
                s3_concurrency=16,
                chain_sizes=(256 * KiB,),
            )
        return Plan(
            sizes=(64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB),
            batches=(1, 8, 64),
            disk_batches=(1, 8, 64),
            s3_sizes=(64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB),
            s3_batches=(1, 8, 64),
            host_bytes=256 * MiB,
            disk_bytes=128 * MiB,
            s3_bytes=16 * MiB,
            s3_concurrency=16,
            chain_sizes=(64 * KiB, 1 * MiB),
        )


def nblocks_for(total: int, size: int, batches: Sequence[int]) -> int:
    """Blocks per timed run: ``total`` bytes worth, at least one full batch of the largest size."""
    biggest = max(batches)
    return max(biggest, -(-(total // size) // biggest) * biggest)


# ---- payloads ----------------------------------------------------------------------------------


class Payloads:
    """``n`` blocks of ``size`` random bytes in one page-aligned anonymous map (like arena slots)."""

    _keys = itertools.count()

    def __init__(self, size: int, n: int) -> None:
        self.size, self.n, self.nbytes = size, n, size * n
        self._map = mmap.mmap(-1, self.nbytes)
        pattern = os.urandom(min(self.nbytes, 4 * MiB))  # content does not matter, only that it is touched
        for offset in range(0, self.nbytes, len(pattern)):
            chunk = min(len(pattern), self.nbytes - offset)
            self._map[offset : offset + chunk] = pattern[:chunk]
        buf = memoryview(self._map)
        self.views = [buf[i * size : (i + 1) * size] for i in range(n)]
        self.checksums = [payload_checksum(v) for v in self.views]
        self.keys = self.new_keys()

    def new_keys(self) -> list[BlockKey]:
        return [BlockKey(LAYOUT_ID, next(self._keys).to_bytes(16, "big")) for _ in range(self.n)]

    def requests(self, keys: Sequence[BlockKey] | None = None) -> list[PutRequest]:
        return [PutRequest(k, v, c) for k, v, c in zip(keys or self.keys, self.views, self.checksums)]


def aligned_views(size: int, n: int) -> list[memoryview]:
    """``n`` writable page-aligned buffers of ``size`` bytes (one anonymous map), pre-faulted."""
    m = mmap.mmap(-1, size * n)
    m.write(bytes(len(m)))
    buf = memoryview(m)
    return [buf[i * size : (i + 1) * size] for i in range(n)]


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def copy_all(dst: Sequence[memoryview], src: Sequence[memoryview]) -> None:
    for d, s in zip(dst, src):
        d[:] = s


def loop_or_batch(batch: int, items: Sequence, one: Callable, many: Callable) -> Callable[[], None]:
    """A timed body: ``one(item)`` per item for batch 1, else ``many(chunk)`` per chunk of ``batch``."""
    if batch == 1:

        def loop() -> None:
            for item in items:
                one(item)

        return loop
    groups = chunks(items, batch)

    def batched() -> None:
        for group in groups:
            many(group)

    return batched


class Runner:
    """Times candidate/bound pairs and collects rows."""

    def __init__(self, repeat: int, stat: Stat) -> None:
        self.base_repeat = self.repeat = repeat
        self.stat = stat
        self.rows: list[Row] = []

    def group(self, name: str, title: str) -> None:
        self.repeat = self.base_repeat * REPEAT_SCALE.get(name, 1)
        print(f"{title} ({self.repeat} timed runs per side)", flush=True)

    def pair(
        self,
        case: str,
        metric: str,
        nbytes: int,
        candidate: Callable[[], object],
        bound: Callable[[], object],
        *,
        bound_name: str,
        target: float | None,
        setup_candidate: Callable[[], object] | None = None,
        setup_bound: Callable[[], object] | None = None,
        **extra: object,
    ) -> Row:
        t_cand, t_bound = compare(
            candidate,
            bound,
            repeat=self.repeat,
            stat=self.stat,
            setup_candidate=setup_candidate,
            setup_bound=setup_bound,
        )
        row = Row(
            case=case,
            metric=metric,
            value=gbps(nbytes, t_cand),
            baseline=gbps(nbytes, t_bound),
            unit=GBPS,
            target=target,
            bound=bound_name,
            extra={"bytes": nbytes, **extra},
        )
        self.rows.append(row)
        print(f"  {case:<34} {row.value:8.3f} vs {row.baseline:8.3f} {GBPS}  ratio {row.ratio:.3f}", flush=True)
        return row


# ---- host --------------------------------------------------------------------------------------


def host_settings(nbytes: int, shm_dir: Path, prefault: bool = True) -> HostTierConfig:
    """``prefault``: every arena page mapped at creation (steady state, as in the bound)."""
    slab = 16 * MiB
    # every block twice (a re-put reserves before it frees) plus slack for partly used slabs
    return HostTierConfig(capacity=2 * nbytes + 8 * slab, slab_size=slab, shm_dir=shm_dir,
                          name=f"kvtier-bench-{uuid.uuid4().hex}", prefault=prefault)


def bench_host(run: Runner, plan: Plan, shm_dir: Path) -> None:
    target = TARGETS["host"]
    for size in plan.sizes:
        n = nblocks_for(plan.host_bytes, size, plan.batches)
        src = Payloads(size, n)
        nbytes = src.nbytes
        common = {"tier": "host", "block_size": size, "blocks": n}
        with ExitStack() as stack:
            bound_arena = SharedArena.create(shm_dir / f"kvtier-bench-{uuid.uuid4().hex}", nbytes, populate=True)
            stack.callback(bound_arena.close)
            dst = [bound_arena.view(i * size, size) for i in range(n)]
            out = aligned_views(size, n)
            memcpy_in = lambda: copy_all(dst, src.views)  # noqa: E731
            memcpy_out = lambda: copy_all(out, dst)  # noqa: E731
            requests = src.requests()
            label = fmt_size(size)

            if size == max(plan.sizes):
                # A new arena's pages are mapped on first write, inside put: what the first
                # pass over a fresh daemon's arena costs (informative; later cases are warm).
                cold: list[HostTier] = []

                def new_tier() -> None:
                    while cold:
                        cold.pop().close()
                    cold.append(HostTier(host_settings(nbytes, shm_dir, prefault=False)))

                def cold_puts() -> None:
                    for r in requests:
                        cold[0].put(r.key, r.payload, r.checksum)

                run.pair(f"host.put cold-arena {label} x1", "put_throughput", nbytes, cold_puts, memcpy_in,
                         bound_name="memcpy (warm)", target=None, setup_candidate=new_tier, batch=1, **common)
                new_tier()
                cold.pop().close()

            tier = stack.enter_context(HostTier(host_settings(nbytes, shm_dir)))

            for batch in plan.batches:
                body = loop_or_batch(batch, requests, lambda r: tier.put(r.key, r.payload, r.checksum), tier.put_many)
                verb = "put" if batch == 1 else "put_many"
                run.pair(f"host.{verb} {label} x{batch}", "put_throughput", nbytes, body, memcpy_in,
                         bound_name="memcpy", target=target, batch=batch, **common)

            def zero_copy() -> None:
                for key, view in zip(src.keys, src.views):
                    slot = tier.reserve(key, size)
                    tier.slot_view(slot)[:] = view
                    tier.commit(slot)

            run.pair(f"host.reserve+commit {label} x1", "put_throughput", nbytes, zero_copy, memcpy_in,
                     bound_name="memcpy", target=target, batch=1, **common)

            # get returns a new bytes object. The x1 loop drops each before the next, so malloc
            # hands back the same (cache-warm) buffer: its bound copies every block into one
            # reused buffer. get_many keeps all results: its bound copies into n kept buffers.
            memcpy_out_reuse = lambda: copy_all(itertools.repeat(out[0]), dst)  # noqa: E731
            for batch in plan.batches:
                body = loop_or_batch(batch, src.keys, tier.get, tier.get_many)
                verb = "get" if batch == 1 else "get_many"
                run.pair(f"host.{verb} {label} x{batch}", "get_throughput", nbytes, body,
                         memcpy_out_reuse if batch == 1 else memcpy_out,
                         bound_name="memcpy, 1 reused buffer" if batch == 1 else "memcpy",
                         target=target, batch=batch, **common)

            pairs = list(zip(src.keys, out))
            run.pair(f"host.read_into {label} x1", "get_throughput", nbytes,
                     lambda: [tier.read_into(k, o) for k, o in pairs] and None, memcpy_out,
                     bound_name="memcpy", target=target, batch=1, **common)

            def view_copy() -> None:
                for key, o in pairs:
                    o[:] = tier.view(key)

            run.pair(f"host.view+copy {label} x1", "get_throughput", nbytes, view_copy, memcpy_out,
                     bound_name="memcpy", target=target, batch=1, **common)


# ---- disk --------------------------------------------------------------------------------------


class RawFiles:
    """The disk bound: one file per block, written and read whole with the tier's I/O mode.

    Every write round creates new files (:meth:`rotate` first deletes the last round's, untimed),
    as a put of a new key does: on ext4 creating an inode costs several times an in-place
    ``O_TRUNC`` rewrite, and the tier never rewrites in place (it renames a new file over).
    """

    def __init__(self, directory: Path, n: int, direct: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.n = directory, n
        self.direct = os.O_DIRECT if direct else 0
        self._round = itertools.count()
        self.paths = self._names()

    def _names(self) -> list[str]:
        r = next(self._round)
        return [str(self.directory / f"{r:04d}-{i:06d}.raw") for i in range(self.n)]

    def rotate(self) -> None:
        for path in self.paths:
            with suppress(FileNotFoundError):
                os.unlink(path)
        self.paths = self._names()

    def write(self, views: Sequence[memoryview]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | self.direct
        for path, view in zip(self.paths, views):
            fd = os.open(path, flags, 0o644)
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], done)
            finally:
                os.close(fd)

    def read(self, outs: Sequence[memoryview]) -> None:
        flags = os.O_RDONLY | os.O_CLOEXEC | self.direct
        for path, out in zip(self.paths, outs):
            fd = os.open(path, flags)
            try:
                if os.preadv(fd, [out], 0) != len(out):
                    raise RuntimeError(f"short read of {path}")
            finally:
                os.close(fd)


class FreshPuts:
    """Timed bodies that put the payloads under new keys each run (``setup`` deletes the last
    run's blocks from the tier, untimed), so every put creates a block as in service."""

    def __init__(self, tier: Tier, src: Payloads, batch: int) -> None:
        self.tier, self.src, self.batch = tier, src, batch
        self.keys: list[BlockKey] = []
        self._body: Callable[[], None] = lambda: None

    def setup(self) -> None:
        for key in self.keys:
            self.tier.delete(key)
        self.keys = self.src.new_keys()
        tier = self.tier
        self._body = loop_or_batch(
            self.batch, self.src.requests(self.keys), lambda r: tier.put(r.key, r.payload, r.checksum), tier.put_many
        )

    def __call__(self) -> None:
        self._body()


def bench_disk(run: Runner, plan: Plan, disk_dir: Path) -> None:
    target = TARGETS["disk"]
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=disk_dir))
    try:
        for size in plan.sizes:
            n = nblocks_for(plan.disk_bytes, size, plan.disk_batches)
            src = Payloads(size, n)
            nbytes = src.nbytes
            out = aligned_views(size, n)
            label = fmt_size(size)
            with DiskTier(DiskTierConfig(path=root / f"tier-{label}", capacity=64 << 30)) as tier:
                raw = RawFiles(root / f"raw-{label}", n, tier.o_direct)
                common = {"tier": "disk", "block_size": size, "blocks": n, "io": "o_direct" if tier.o_direct else "buffered"}
                puts = None
                for batch in plan.disk_batches:
                    if puts is not None:
                        puts.setup()  # the previous batch size's blocks go
                    puts = FreshPuts(tier, src, batch)
                    verb = "put" if batch == 1 else "put_many"
                    run.pair(f"disk.{verb} {label} x{batch}", "put_throughput", nbytes, puts,
                             lambda: raw.write(src.views), bound_name="raw write (new files)", target=target,
                             setup_candidate=puts.setup, setup_bound=raw.rotate, batch=batch, **common)
                keys = puts.keys  # what the last put run left on disk; raw.paths likewise
                pairs = list(zip(keys, out))

                def read_into() -> None:
                    for key, o in pairs:
                        if not tier.read_into(key, o):
                            raise RuntimeError(f"{key} missing from the disk tier")

                run.pair(f"disk.read_into {label} x1", "get_throughput", nbytes, read_into,
                         lambda: raw.read(out), bound_name="raw read", target=target, batch=1, **common)
                for batch in plan.disk_batches:
                    body = loop_or_batch(batch, keys, tier.get, tier.get_many)
                    verb = "get" if batch == 1 else "get_many"
                    run.pair(f"disk.{verb} {label} x{batch}", "get_throughput", nbytes, body,
                             lambda: raw.read(out), bound_name="raw read", target=target, batch=batch, **common)
            shutil.rmtree(root / f"tier-{label}", ignore_errors=True)
            shutil.rmtree(root / f"raw-{label}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- s3 ----------------------------------------------------------------------------------------


@contextmanager
def s3_endpoint() -> Iterator[str]:
    """A local moto_server (tests.servers starts it on a free port and stops it)."""
    from tests.servers import moto_server

    os.environ.update(FAKE_AWS_ENV)
    with moto_server() as url:
        yield url


def bench_s3(run: Runner, plan: Plan) -> None:
    import boto3

    from kvtier.tiers.s3 import S3Tier, client_config, object_key

    target = TARGETS["s3"]
    with ExitStack() as stack:
        url = stack.enter_context(s3_endpoint())
        bucket = f"kvtier-bench-{uuid.uuid4().hex[:8]}"
        settings = S3TierConfig(
            enabled=True, bucket=bucket, endpoint_url=url, region="us-east-1", max_concurrency=plan.s3_concurrency
        )
        # The bound's client is configured exactly like the tier's (same retries, pool, no extra CRC).
        client = boto3.session.Session().client("s3", endpoint_url=url, region_name="us-east-1", config=client_config(settings))
        stack.callback(client.close)
        client.create_bucket(Bucket=bucket)
        tier = stack.enter_context(S3Tier(settings))
        pool = stack.enter_context(ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="bench-boto3"))

        for size in plan.s3_sizes:
            n = nblocks_for(plan.s3_bytes, size, plan.s3_batches)
            src = Payloads(size, n)
            nbytes = src.nbytes
            label = fmt_size(size)
            bodies = [bytes(v) for v in src.views]  # the bound uploads the same bytes, ready as bytes
            raw_items = [(f"raw/{object_key('', k)}", b) for k, b in zip(src.keys, bodies)]
            raw_keys = [name for name, _ in raw_items]
            common = {"tier": "s3", "block_size": size, "blocks": n, "concurrency": settings.max_concurrency}

            def raw_put(item: tuple[str, bytes]) -> None:
                client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

            def raw_get(name: str) -> bytes:
                return client.get_object(Bucket=bucket, Key=name)["Body"].read()

            requests = src.requests()
            for batch in plan.s3_batches:
                body = loop_or_batch(batch, requests, lambda r: tier.put(r.key, r.payload, r.checksum), tier.put_many)
                bound = loop_or_batch(batch, raw_items, raw_put, lambda g: list(pool.map(raw_put, g)))
                verb = "put" if batch == 1 else "put_many"
                run.pair(f"s3.{verb} {label} x{batch}", "put_throughput", nbytes, body, bound,
                         bound_name="boto3 put_object", target=target, batch=batch, **common)
            for batch in plan.s3_batches:
                body = loop_or_batch(batch, src.keys, tier.get, tier.get_many)
                bound = loop_or_batch(batch, raw_keys, raw_get, lambda g: list(pool.map(raw_get, g)))
                verb = "get" if batch == 1 else "get_many"
                run.pair(f"s3.{verb} {label} x{batch}", "get_throughput", nbytes, body, bound,
                         bound_name="boto3 get_object", target=target, batch=batch, **common)


# ---- chain -------------------------------------------------------------------------------------


def bench_chain(run: Runner, plan: Plan, shm_dir: Path, disk_dir: Path) -> None:
    """Informative: what the chain adds on the engine's side of a put (no targets)."""
    from kvtier.chain.chain import TierChain

    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-chain-", dir=disk_dir))
    try:
        for size in plan.chain_sizes:
            n = nblocks_for(plan.disk_bytes, size, (1,))
            src = Payloads(size, n)
            nbytes = src.nbytes
            label = fmt_size(size)
            common = {"tier": "chain", "block_size": size, "blocks": n, "batch": 1}
            config = ChainConfig()  # write-back
            with ExitStack() as stack:
                host_only = stack.enter_context(TierChain([HostTier(host_settings(nbytes, shm_dir))], config))
                disk = DiskTier(DiskTierConfig(path=root / f"disk-{label}", capacity=4 * nbytes))
                with_disk = stack.enter_context(TierChain([HostTier(host_settings(nbytes, shm_dir)), disk], config))
                plain = stack.enter_context(HostTier(host_settings(nbytes, shm_dir)))
                raw = RawFiles(root / f"raw-{label}", n, disk.o_direct)
                # Fresh keys before every timed run (a chain put of a key already in host memory
                # returns at once); eviction makes room in steady state, as in service.
                keys = {"host": src.keys, "disk": src.keys}

                def fresh(which: str, chain: TierChain) -> Callable[[], None]:
                    def setup() -> None:
                        chain.flush()
                        keys[which] = src.new_keys()
                    return setup

                def put_all(chain: TierChain, which: str) -> Callable[[], None]:
                    def body() -> None:
                        for key, view, checksum in zip(keys[which], src.views, src.checksums):
                            chain.put(key, view, checksum)
                    return body

                def put_and_flush() -> None:
                    put_all(with_disk, "disk")()
                    with_disk.flush()

                run.pair(f"chain.put host-only {label}", "put_throughput", nbytes, put_all(host_only, "host"),
                         lambda: [plain.put(k, v, c) for k, v, c in zip(src.keys, src.views, src.checksums)] and None,
                         bound_name="HostTier.put", target=None, setup_candidate=fresh("host", host_only), **common)
                run.pair(f"chain.put host+disk {label}", "put_throughput", nbytes, put_all(with_disk, "disk"),
                         put_all(host_only, "host"), bound_name="chain.put host-only", target=None,
                         setup_candidate=fresh("disk", with_disk), setup_bound=fresh("host", host_only), **common)
                run.pair(f"chain.put+flush host+disk {label}", "put_throughput", nbytes, put_and_flush,
                         lambda: raw.write(src.views), bound_name="raw write (new files)", target=None,
                         setup_candidate=fresh("disk", with_disk), setup_bound=raw.rotate, **common)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default="host,disk,s3,chain", help="comma-separated groups to run")
    parser.add_argument("--disk-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder on the real disk for the disk cases (not a tmpfs)")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"), help="memory filesystem for host arenas")
    args = parser.parse_args(argv)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    plan = Plan.make(args.quick)
    run = Runner(repeats(args), args.stat)
    cmd = command_line()
    print(f"$ {cmd}\n{'quick' if args.quick else 'full'} plan, {args.stat} of timed runs, {os.cpu_count()} CPUs",
          flush=True)

    if "host" in groups:
        run.group("host", "host tier vs memcpy")
        bench_host(run, plan, args.shm_dir)
    if "disk" in groups:
        run.group("disk", f"disk tier vs raw files in {args.disk_dir}")
        bench_disk(run, plan, args.disk_dir)
    if "s3" in groups:
        run.group("s3", "s3 tier vs boto3 on a local moto_server")
        bench_s3(run, plan)
    if "chain" in groups:
        run.group("chain", "tier chain (informative)")
        bench_chain(run, plan, args.shm_dir, args.disk_dir)
    print()
    print_table(run.rows)
    print()
    summarize_targets(run.rows)
    if not args.no_write:
        path = write_results("tiers", run.rows)
        print(f"wrote {path}")
    print(f"command: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
