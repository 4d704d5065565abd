"""Disk-tier behaviour beyond the shared conformance suite: file format, O_DIRECT, crashes, full disks."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.config import DiskTierConfig
from kvtier.errors import ConfigError, CorruptBlockError, DiskFullError, TierError
from kvtier.tiers import _aligned_io
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.registry import create_tier

pytestmark = pytest.mark.timeout(60)

LAYOUT = "0123456789abcdef"
PAGE = 4096
SIZES = [1, 4096, 64 * 1024 + 1, 4 << 20]
REPO = Path(__file__).resolve().parents[2]


def key(i: int, layout: str = LAYOUT) -> BlockKey:
    return BlockKey(layout, i.to_bytes(16, "big"))


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ per seed (251 is prime, so pages differ too)."""
    pattern = bytes((seed * 31 + i * 7) & 0xFF for i in range(251))
    return (pattern * (n // 251 + 1))[:n]


def aligned_view(data: bytes) -> memoryview:
    """An mmap-backed (page-aligned) view holding ``data``, like a host-arena slot."""
    view = memoryview(mmap.mmap(-1, max(len(data), 1)))[: len(data)]
    view[:] = data
    return view


def unaligned_view(data: bytes) -> memoryview:
    view = memoryview(bytearray(len(data) + 1))[1:]
    view[:] = data
    assert not _aligned_io.is_aligned(view) or not data
    return view


def open_tier(path: Path, **settings: object) -> DiskTier:
    return DiskTier(DiskTierConfig(path=path, **settings))


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def o_direct_works(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return _aligned_io.probe_o_direct(str(path)) is None


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[DiskTier]:
    with open_tier(tmp_path / "disk") as t:
        yield t


def _mount(kind: str, target: Path, options: list[str]) -> Iterator[Path]:
    target.mkdir()
    result = subprocess.run(["mount", "-t", kind, *options, kind, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {kind} here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    yield from _mount("tmpfs", tmp_path / "small", ["-o", "size=1M"])


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    yield from _mount("ramfs", tmp_path / "ramfs", [])


# ---- round trips and the file format ------------------------------------------------------------

MODES = ["auto", "off"]


@pytest.mark.parametrize("mode", MODES + ["on"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", SIZES)
def test_round_trip(tmp_path: Path, mode: str, aligned: bool, n: int) -> None:
    if mode == "on" and not o_direct_works(tmp_path / "disk"):
        pytest.skip("this filesystem refuses O_DIRECT (covered by test_o_direct_on_refused)")
    data = payload(n, seed=n)
    view = aligned_view(data) if aligned else unaligned_view(data)
    with open_tier(tmp_path / "disk", o_direct=mode) as t:
        t.put(key(n), view, payload_checksum(view))
        assert t.get(key(n)) == data
        for out in (aligned_view(bytes(n)), unaligned_view(bytes(n))):
            assert t.read_into(key(n), out) is True
            assert bytes(out) == data
        path = tmp_path / "disk" / LAYOUT / key(n).hash_hex[:2] / f"{key(n).hash_hex}.kvb"
        assert path.stat().st_size == t.stored_nbytes(n) == PAGE + -(-n // PAGE) * PAGE
        raw = path.read_bytes()
        assert raw[64:PAGE] == bytes(PAGE - 64) and raw[PAGE : PAGE + n] == data
        assert raw[PAGE + n :] == bytes(len(raw) - PAGE - n)


def test_empty_payload_and_bytes_input(tier: DiskTier) -> None:
    tier.put(key(1), b"", payload_checksum(b""))
    assert tier.get(key(1)) == b""
    assert tier.read_into(key(1), memoryview(bytearray())) is True
    tier.put(key(2), b"abc", payload_checksum(b"abc"))
    assert tier.get(key(2)) == b"abc"


@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "readonly"])
def test_aligned_payload_is_written_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readonly: bool
) -> None:
    with open_tier(tmp_path / "disk") as t:
        if not t.o_direct:
            pytest.skip("O_DIRECT unavailable here; buffered I/O never copies")

        def no_bounce(self: object, nbytes: int) -> memoryview:
            raise AssertionError("aligned I/O must not go through the bounce buffer")

        monkeypatch.setattr(_aligned_io.Scratch, "bounce", no_bounce)
        data = payload(1 << 20, seed=3)
        view = aligned_view(data)
        t.put(key(1), view.toreadonly() if readonly else view, payload_checksum(data))
        out = aligned_view(bytes(len(data)))
        assert t.read_into(key(1), out) and bytes(out) == data


def test_missing_block(tier: DiskTier) -> None:
    assert tier.get(key(9)) is None
    assert tier.read_into(key(9), memoryview(bytearray(10))) is False
    assert tier.contains(key(9)) is False
    assert tier.delete(key(9)) is False


def test_replace_delete_and_used_bytes(tier: DiskTier) -> None:
    tier.put(key(1), payload(10), payload_checksum(payload(10)))
    tier.put(key(1), payload(5000, 1), payload_checksum(payload(5000, 1)))
    assert tier.get(key(1)) == payload(5000, 1)
    assert tier.used_bytes() == tier.stored_nbytes(5000)
    assert tier.contains(key(1)) and tier.delete(key(1)) and not tier.contains(key(1))
    assert tier.used_bytes() == 0


def test_read_into_wrong_size_is_corrupt(tier: DiskTier) -> None:
    tier.put(key(1), payload(100), payload_checksum(payload(100)))
    with pytest.raises(CorruptBlockError, match="stored payload is 100 bytes, expected 99"):
        tier.read_into(key(1), memoryview(bytearray(99)))


def test_registry_builds_disk_tier(tmp_path: Path) -> None:
    t = create_tier("disk", DiskTierConfig(path=tmp_path / "d", capacity="1GiB"))
    try:
        assert isinstance(t, DiskTier) and t.capacity_bytes == 1 << 30 and t.kind == "disk"
    finally:
        t.close()


def test_fsync_mode_round_trip(tmp_path: Path) -> None:
    with open_tier(tmp_path / "disk", fsync=True) as t:
        t.put(key(1), payload(5000), payload_checksum(payload(5000)))
        assert t.get(key(1)) == payload(5000)


def test_closed_tier_refuses_and_releases_folder(tmp_path: Path) -> None:
    t = open_tier(tmp_path / "disk")
    with pytest.raises(ConfigError, match="in use"):
        open_tier(tmp_path / "disk")
    t.close()
    with pytest.raises(TierError, match="closed"):
        t.get(key(1))
    open_tier(tmp_path / "disk").close()


def test_concurrent_threads(tier: DiskTier) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(40):
                n = 1000 + 4096 * (i % 3) + worker
                data = payload(n, seed=worker + i)
                view = aligned_view(data) if i % 2 else data
                tier.put(key(10_000 + worker * 1000 + i), view, payload_checksum(data))
                tier.put(key(i % 5), data, payload_checksum(data))  # shared keys: last writer wins
                assert tier.get(key(10_000 + worker * 1000 + i)) == data
                out = unaligned_view(bytes(n))
                assert tier.read_into(key(10_000 + worker * 1000 + i), out) and bytes(out) == data
                shared = tier.get(key(i % 5))
                assert shared is not None
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert tier.used_bytes() == sum(p.stat().st_size for p in Path(tier.root).rglob("*.kvb"))


# ---- O_DIRECT selection -------------------------------------------------------------------------


def test_o_direct_off_never_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtier.tiers.disk.probe_o_direct", lambda path: pytest.fail("probed"))
    with open_tier(tmp_path / "disk", o_direct="off") as t:
        assert t.o_direct is False


def test_o_direct_on_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtier.tiers.disk.probe_o_direct", lambda path: "refused for the test")
    with pytest.raises(ConfigError, match="o_direct=on.*refused for the test"):
        open_tier(tmp_path / "disk", o_direct="on")
    with open_tier(tmp_path / "disk", o_direct="auto") as t:  # the lock was released by the failed open
        assert t.o_direct is False
        t.put(key(1), payload(5), payload_checksum(payload(5)))
        assert t.get(key(1)) == payload(5)


def test_o_direct_on_ramfs(ramfs: Path) -> None:
    """ramfs refuses O_DIRECT opens (EINVAL): ``on`` is a ConfigError, ``auto`` falls back to buffered."""
    with pytest.raises(ConfigError, match="O_DIRECT"):
        open_tier(ramfs / "disk", o_direct="on")
    with open_tier(ramfs / "disk", o_direct="auto") as t:
        assert t.o_direct is False
        t.put(key(1), aligned_view(payload(8192)), payload_checksum(payload(8192)))
        assert t.get(key(1)) == payload(8192)
    assert not tmp_files(ramfs)


def test_o_direct_on_dev_shm() -> None:
    """tmpfs refused O_DIRECT before Linux 6.6 and accepts it since; ``on`` follows the probe."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="kvtier-test-", dir="/dev/shm"))
    try:
        supported = o_direct_works(path)
        if supported:
            with open_tier(path, o_direct="on") as t:
                assert t.o_direct is True
                t.put(key(1), unaligned_view(payload(5000)), payload_checksum(payload(5000)))
                assert t.get(key(1)) == payload(5000)
        else:
            with pytest.raises(ConfigError):
                open_tier(path, o_direct="on")
        with open_tier(path, o_direct="auto") as t:
            assert t.o_direct is supported
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- restart, leftovers and crashes -------------------------------------------------------------


def test_restart_scans_and_serves(tmp_path: Path) -> None:
    sizes = {i: SIZES[i % len(SIZES)] // (1 if i < 4 else 16) + i for i in range(12)}
    with open_tier(tmp_path / "disk") as t:
        for i, n in sizes.items():
            t.put(key(i, LAYOUT if i % 2 else "fedcba9876543210"), payload(n, i), payload_checksum(payload(n, i)))
        used = t.used_bytes()
    with open_tier(tmp_path / "disk") as t:
        assert t.used_bytes() == used
        found = {block.key: block for block in t.scan()}
        assert len(found) == len(sizes)
        for i, n in sizes.items():
            k = key(i, LAYOUT if i % 2 else "fedcba9876543210")
            assert found[k].nbytes == n and found[k].checksum == payload_checksum(payload(n, i))
            assert t.get(k) == payload(n, i)
        padded = {block.key: block.nbytes for block in t.scan(read_headers=False)}
        assert all(padded[k] == t.stored_nbytes(b.nbytes) - PAGE for k, b in found.items())


def test_open_removes_leftover_tmp_and_ignores_strangers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "disk"
    with open_tier(root) as t:
        t.put(key(1), b"x", payload_checksum(b"x"))
    shard = root / LAYOUT / key(1).hash_hex[:2]
    (shard / f".{key(2).hash_hex}.abcd.tmp").write_bytes(b"half a block")
    (root / ".odirect-probe.1234.tmp").write_bytes(b"")
    (shard / "notes.txt").write_text("hello")
    (root / LAYOUT / "ff").mkdir()
    (root / LAYOUT / "ff" / f"{key(3).hash_hex}.kvb").write_bytes(b"wrong shard")  # hash starts with 00
    (root / "not-a-layout").mkdir()
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.disk"), open_tier(root) as t:
        assert not tmp_files(root)
        assert [b.key for b in t.scan()] == [key(1)]
        assert t.used_bytes() == t.stored_nbytes(1)
    assert "notes.txt" in caplog.text and "not-a-layout" in caplog.text and "wrong" not in caplog.text
    assert f"ff/{key(3).hash_hex}.kvb" in caplog.text


def test_scan_reports_damaged_header_without_checksum(tier: DiskTier) -> None:
    tier.put(key(1), payload(5000), payload_checksum(payload(5000)))
    _flip(Path(tier.path_of(key(1))), 20)
    [block] = list(tier.scan())
    assert block.key == key(1) and block.checksum is None and block.nbytes == 8192


CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from kvtier.blocks.checksum import payload_checksum
    from kvtier.blocks.keys import BlockKey
    from kvtier.config import DiskTierConfig
    from kvtier.tiers.disk import DiskTier

    tier = DiskTier(DiskTierConfig(path=sys.argv[1], o_direct=sys.argv[2]))
    if sys.argv[3] == "hang-before-rename":
        os.rename = lambda *a: (print("tmp written", flush=True), __import__("time").sleep(600))
    base = bytearray(os.urandom(3 << 20))
    i = 0
    while True:
        n = (1 << 20) + (i * 4099) % (2 << 20)
        base[i % len(base)] ^= 0xFF
        data = memoryview(base)[:n]
        tier.put(BlockKey("0123456789abcdef", (i % 40).to_bytes(16, "big")), data, payload_checksum(data))
        i += 1
        if i == 3:
            print("ready", flush=True)
    """
)


def _run_child_and_kill(root: Path, mode: str, behaviour: str, delay_s: float) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(repo=str(REPO)), str(root), mode, behaviour],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() in ("ready", "tmp written"), f"child failed to start: {line!r}"
        if delay_s:
            threading.Event().wait(delay_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


def _check_after_crash(root: Path) -> int:
    with open_tier(root) as t:
        assert not tmp_files(root)
        blocks = list(t.scan())
        for block in blocks:
            data = t.get(block.key)  # raises CorruptBlockError on any damage
            assert data is not None and len(data) == block.nbytes
            assert payload_checksum(data) == block.checksum
        return len(blocks)


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_mid_write_leaves_no_partial_block(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "disk"
    for delay_s in (0.05, 0.13, 0.21):
        _run_child_and_kill(root, mode, "loop", delay_s)
        assert _check_after_crash(root) >= 3


def test_sigkill_between_write_and_rename(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    _run_child_and_kill(root, "auto", "hang-before-rename", 0)
    assert len(tmp_files(root)) == 1  # the finished temp file of the block being written
    assert _check_after_crash(root) == 0  # never became visible, and open removed it


# ---- corruption ---------------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


DAMAGE = {
    "payload byte": lambda p: _flip(p, PAGE + 1234),
    "header byte": lambda p: _flip(p, 40),
    "header magic": lambda p: _flip(p, 0),
    "truncated to header": lambda p: os.truncate(p, PAGE),
    "truncated mid-payload": lambda p: os.truncate(p, PAGE + 1000),
    "truncated header": lambda p: os.truncate(p, 10),
    "empty file": lambda p: os.truncate(p, 0),
    "extended": lambda p: os.truncate(p, p.stat().st_size + PAGE),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_block_is_corrupt_and_kept(tmp_path: Path, mode: str, damage: str) -> None:
    with open_tier(tmp_path / "disk", o_direct=mode) as t:
        data = payload(5000)
        t.put(key(1), data, payload_checksum(data))
        path = Path(t.path_of(key(1)))
        DAMAGE[damage](path)
        with pytest.raises(CorruptBlockError, match=str(path)):
            t.get(key(1))
        for out in (aligned_view(bytes(5000)), unaligned_view(bytes(5000))):
            with pytest.raises(CorruptBlockError):
                t.read_into(key(1), out)
        assert path.exists() and t.contains(key(1))


def test_block_of_another_key_is_corrupt(tier: DiskTier) -> None:
    tier.put(key(1), payload(100), payload_checksum(payload(100)))
    Path(tier.path_of(key(2))).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tier.path_of(key(1)), tier.path_of(key(2)))
    with pytest.raises(CorruptBlockError, match="expected"):
        tier.get(key(2))


# ---- errors and full disks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error", "text"),
    [
        (errno.ENOSPC, DiskFullError, "is full .*host tier keeps working"),
        (errno.EDQUOT, DiskFullError, "over its disk quota .*host tier keeps working"),
        (errno.EIO, TierError, "could not write"),
    ],
)
def test_write_errors_are_translated_and_leave_nothing(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch, code: int, error: type[Exception], text: str
) -> None:
    def fail(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_aligned_io.os, "pwritev", fail)
    with pytest.raises(error, match=text) as info:
        tier.put(key(1), payload(10), payload_checksum(payload(10)))
    assert type(info.value) is error and tier.root in str(info.value)
    assert not tmp_files(Path(tier.root)) and not tier.contains(key(1)) and tier.used_bytes() == 0


def test_failed_rename_leaves_no_temp_file(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("kvtier.tiers.disk.os.rename", fail)
    with pytest.raises(TierError, match="Permission denied"):
        tier.put(key(1), b"abc", payload_checksum(b"abc"))
    assert not tmp_files(Path(tier.root)) and not tier.contains(key(1))


@pytest.mark.parametrize("mode", MODES)
def test_full_filesystem(small_tmpfs: Path, mode: str) -> None:
    with open_tier(small_tmpfs / "disk", o_direct=mode) as t:
        written: list[int] = []
        with pytest.raises(DiskFullError) as info:
            for i in range(64):  # 64 x 68 KiB > 1 MiB
                data = payload(64 * 1024 + 1, i)
                t.put(key(i), data, payload_checksum(data))
                written.append(i)
        message = str(info.value)
        assert str(small_tmpfs / "disk") in message and "full" in message and "host tier keeps working" in message
        assert info.value.tier == "disk"
        assert written and not tmp_files(small_tmpfs)
        for i in written:
            assert t.get(key(i)) == payload(64 * 1024 + 1, i)
        t.delete(key(written[0]))  # room again: writing works
        t.put(key(1000), b"ok", payload_checksum(b"ok"))
        assert t.get(key(1000)) == b"ok"
