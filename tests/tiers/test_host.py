"""Host tier specifics: the shared arena (mapped by a second process), slots and capacity."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvtier.blocks.keys import BlockKey
from kvtier.config import HostTierConfig
from kvtier.errors import ConfigError, InvalidRequestError, TierFullError
from kvtier.tiers.arena import SLOT_ALIGN, SlabAllocator, huge_mapped_bytes
from kvtier.tiers.host import HostTier, auto_host_capacity


def key(n: int) -> BlockKey:
    return BlockKey("0123456789abcdef", n.to_bytes(16, "big"))


@pytest.fixture
def host() -> HostTier:
    tier = HostTier(HostTierConfig(capacity="4MiB", slab_size="1MiB"))
    yield tier
    tier.close()


def test_arena_file_is_private_and_removed_on_close() -> None:
    tier = HostTier(HostTierConfig(capacity="1MiB", slab_size="1MiB"))
    mode = stat.S_IMODE(os.stat(tier.arena.path).st_mode)
    assert mode == 0o600
    path = tier.arena.path
    tier.close()
    assert not path.exists()


def test_second_process_reads_and_writes_the_arena(host: HostTier) -> None:
    blocks = {n: os.urandom(20000 + n) for n in range(8)}
    for n, data in blocks.items():
        host.put(key(n), data, 0)
    # A slot the child fills in place, committed by this process afterwards (the worker's save path).
    reserved = host.reserve(key(100), 50000)
    locations = [(host.location(key(n)).offset, len(data), data.hex()) for n, data in blocks.items()]
    child = textwrap.dedent(
        """
        import json, sys
        from kvtier.tiers.arena import SharedArena
        spec = json.loads(sys.stdin.read())
        arena = SharedArena.attach(spec["path"])
        for offset, size, hexdata in spec["blocks"]:
            assert bytes(arena.view(offset, size)) == bytes.fromhex(hexdata), offset
        arena.view(spec["write_offset"], spec["write_size"])[:] = b"W" * spec["write_size"]
        arena.close()
        print("ok")
        """
    )
    spec = {"path": str(host.arena.path), "blocks": locations, "write_offset": reserved.offset, "write_size": 50000}
    result = subprocess.run([sys.executable, "-c", child], input=json.dumps(spec), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    host.commit(reserved)
    assert host.get(key(100)) == b"W" * 50000


def test_reserved_slot_is_invisible_until_commit(host: HostTier) -> None:
    slot = host.reserve(key(1), 1000)
    assert not host.contains(key(1))
    host.slot_view(slot)[:] = b"q" * 1000
    host.commit(slot)
    assert host.get(key(1)) == b"q" * 1000
    with pytest.raises(InvalidRequestError):
        host.commit(slot)  # double commit


def test_abort_frees_the_slot(host: HostTier) -> None:
    slot = host.reserve(key(1), 1000)
    used = host.used_bytes
    host.abort(slot)
    assert host.used_bytes == used - SLOT_ALIGN
    assert not host.contains(key(1))
    with pytest.raises(InvalidRequestError):
        host.abort(slot)


def test_capacity_is_hard(host: HostTier) -> None:
    block = 256 * 1024
    for n in range(16):  # 4 MiB / 256 KiB
        host.put(key(n), b"x" * block, 0)
    with pytest.raises(TierFullError):
        host.put(key(99), b"x" * block, 0)
    assert host.used_bytes == host.capacity_bytes
    host.delete(key(0))
    host.put(key(99), b"y" * block, 0)
    assert host.get(key(99)) == b"y" * block


def test_slab_pages_return_when_empty_and_serve_other_sizes() -> None:
    allocator = SlabAllocator(4 << 20, 1 << 20)
    small = [allocator.allocate(4096) for _ in range(4 * 256)]  # fills all 4 pages
    with pytest.raises(TierFullError):
        allocator.allocate(300_000)
    for offset in small[:256]:
        allocator.free(offset, 4096)
    big = allocator.allocate(300_000)  # a freed page now serves the bigger class
    assert big % SLOT_ALIGN == 0
    assert allocator.used_bytes == 3 * 256 * 4096 + SlabAllocator.slot_nbytes_for(300_000)


def test_blocks_larger_than_a_slab_use_page_runs() -> None:
    allocator = SlabAllocator(8 << 20, 1 << 20)
    offsets = [allocator.allocate(3 << 20) for _ in range(2)]
    assert len(set(offsets)) == 2
    with pytest.raises(TierFullError):
        allocator.allocate(3 << 20)
    allocator.free(offsets[0], 3 << 20)
    assert allocator.allocate(3 << 20) == offsets[0]


def test_slots_are_aligned_and_disjoint() -> None:
    allocator = SlabAllocator(16 << 20, 1 << 20)
    spans = []
    for size in [1, 5000, 65536, 70000, 1 << 20, 3000, 2 << 20]:
        offset = allocator.allocate(size)
        assert offset % SLOT_ALIGN == 0
        spans.append((offset, offset + size))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_bad_settings_are_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match="smaller than one slab"):
        HostTier(HostTierConfig(capacity="1MiB", slab_size="2MiB"))
    with pytest.raises(ConfigError, match="multiple of 4096"):
        HostTier(HostTierConfig(capacity="1MiB", slab_size=5000))
    first = HostTier(HostTierConfig(capacity="1MiB", slab_size="1MiB", shm_dir=tmp_path, name="dup"))
    try:
        with pytest.raises(ConfigError, match="belongs to a running kvtier process"):
            HostTier(HostTierConfig(capacity="1MiB", slab_size="1MiB", shm_dir=tmp_path, name="dup"))
    finally:
        first.close()


ARENA_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kvtier.config import HostTierConfig
    from kvtier.tiers.host import HostTier
    tier = HostTier(HostTierConfig(capacity="1MiB", slab_size="1MiB", shm_dir=Path(sys.argv[1]), name=sys.argv[2]))
    print(tier.arena.path, flush=True)
    time.sleep(600)
    """
)


def hold_arena(directory: Path, name: str = "") -> tuple[subprocess.Popen, Path]:
    holder = subprocess.Popen([sys.executable, "-c", ARENA_HOLDER, str(directory), name], stdout=subprocess.PIPE, text=True)
    return holder, Path(holder.stdout.readline().strip())


def kill_holder(holder: subprocess.Popen, path: Path) -> None:
    """SIGKILL ``holder`` and wait until the kernel has let go of its arena's owner lock: the
    lock goes with the process's last reference to the file, which another task reading the
    dead process's memory map (``/proc``) can hold a moment past the reap."""
    holder.kill()
    holder.wait()
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"a killed process's lock on {path} was never released"
                time.sleep(0.01)
    finally:
        os.close(fd)


def test_arenas_of_killed_processes_are_removed_at_start_and_live_ones_kept(tmp_path) -> None:
    (dead, dead_path), (alive, alive_path) = hold_arena(tmp_path), hold_arena(tmp_path)
    dead_named, dead_named_path = hold_arena(tmp_path, "kvtier-fixed-arena")
    unrelated = tmp_path / "kvtier-notes.txt"
    unrelated.write_text("not an arena")
    try:
        kill_holder(dead, dead_path)
        kill_holder(dead_named, dead_named_path)
        assert dead_path.exists() and dead_named_path.exists()  # nothing else would remove them
        tier = HostTier(HostTierConfig(capacity="1MiB", slab_size="1MiB", shm_dir=tmp_path))
        try:
            assert not dead_path.exists() and not dead_named_path.exists()
            assert alive_path.exists() and unrelated.exists()
            # A live owner's arena cannot be taken over by name.
            with pytest.raises(ConfigError, match="belongs to a running kvtier process"):
                HostTier(HostTierConfig(capacity="1MiB", slab_size="1MiB", shm_dir=tmp_path, name=alive_path.name))
        finally:
            tier.close()
    finally:
        alive.kill()
        alive.wait()


def test_a_stale_arena_of_the_configured_name_is_replaced(tmp_path) -> None:
    holder, path = hold_arena(tmp_path, "my-arena")  # a name outside kvtier's pattern: only create replaces it
    kill_holder(holder, path)
    tier = HostTier(HostTierConfig(capacity="2MiB", slab_size="1MiB", shm_dir=tmp_path, name="my-arena"))
    try:
        assert tier.arena.path == path and path.stat().st_size == 2 << 20
    finally:
        tier.close()
    assert not path.exists()


def test_auto_capacity_fits_the_memory_filesystem(tmp_path) -> None:
    import shutil

    capacity = auto_host_capacity(Path("/dev/shm"), 16 << 20)
    assert 0 < capacity <= 64 * 1024**3
    assert capacity % (16 << 20) == 0
    assert capacity <= shutil.disk_usage("/dev/shm").free


def test_huge_page_bytes_counts_only_the_arenas_mappings(tmp_path) -> None:
    arena = Path("/dev/shm/kvtier-abc-arena")
    smaps = tmp_path / "smaps"
    smaps.write_text(textwrap.dedent(
        f"""\
        7f0000000000-7f0040000000 rw-s 00000000 00:1a 123 {arena}
        Size:            1048576 kB
        KernelPageSize:        4 kB
        ShmemPmdMapped:   524288 kB
        FilePmdMapped:         0 kB
        Shared_Hugetlb:        0 kB
        VmFlags: rd wr sh mr mw me ms sd
        7f0040000000-7f0040200000 rw-s 00000000 00:1b 124 /dev/hugepages/kvtier-abc-arena
        Size:               2048 kB
        Shared_Hugetlb:     2048 kB
        ff0000000000-ff0000200000 rw-s 00000000 00:1a 125 {arena}
        Shared_Hugetlb:     2048 kB
        """
    ))
    assert huge_mapped_bytes(arena, smaps=str(smaps)) == (524288 + 2048) * 1024
    assert huge_mapped_bytes(arena, smaps=str(tmp_path / "missing")) == 0
