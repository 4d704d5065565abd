"""The weights fingerprint in a layout: the same files give the same one wherever they lie; other
weights under the same name give another; weights it cannot find are an error, never a guess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from connectors.vllm.weights import SAMPLE_BYTES, model_folder, weights_fingerprint
from kvtier.errors import LayoutError


def safetensors(path: Path, tensors: dict[str, bytes]) -> None:
    """A minimal safetensors file: uint8 tensors with the given bytes."""
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(tensors.values()))


def model(root: Path, name: str, seed: int = 0, size: int = 4 * 1024 * 1024) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    data = hashlib.shake_256(str(seed).encode()).digest(size)
    safetensors(folder / "model-00001-of-00002.safetensors", {"a": data[: size // 2]})
    safetensors(folder / "model-00002-of-00002.safetensors", {"b": data[size // 2 :]})
    return folder


def fingerprint(folder: Path) -> str:
    weights_fingerprint.cache_clear()  # files edited in place below: no per-process reuse
    return weights_fingerprint(str(folder))


def test_the_same_files_anywhere_give_the_same_fingerprint(tmp_path: Path) -> None:
    first = model(tmp_path, "node-a/llama")
    copy = tmp_path / "node-b" / "elsewhere"
    shutil.copytree(first, copy)
    assert fingerprint(first) == fingerprint(copy)
    assert fingerprint(first).startswith("w1:") and len(fingerprint(first)) == 19


def test_other_weights_under_the_same_name_give_another(tmp_path: Path) -> None:
    folder = model(tmp_path, "llama", seed=0)
    before = fingerprint(folder)
    shutil.rmtree(folder)
    assert fingerprint(model(tmp_path, "llama", seed=1)) != before  # a fine-tune copied over the folder


def test_a_change_in_a_sampled_chunk_or_the_header_is_seen(tmp_path: Path) -> None:
    folder = model(tmp_path, "llama")
    path = folder / "model-00002-of-00002.safetensors"
    before = fingerprint(folder)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last sample ends at the end of the file
    path.write_bytes(bytes(data))
    assert fingerprint(folder) != before
    payload = bytes(range(256)) * 8192
    safetensors(path, {"b": payload})
    named_b = fingerprint(folder)
    safetensors(path, {"c": payload})  # the same bytes under another tensor name
    assert fingerprint(folder) != named_b
    renamed = folder / "model-00002-of-00002.safetensors"
    renamed.rename(folder / "other.safetensors")
    assert fingerprint(folder) != before


def test_hub_cache_files_are_named_by_their_blobs_sha256_and_not_read(tmp_path: Path) -> None:
    """The Hugging Face cache: snapshots/<rev>/<file> links to blobs/<sha256 of the file>."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    content = b"\x00" * (3 * SAMPLE_BYTES)
    blob = blobs / hashlib.sha256(content).hexdigest()
    blob.write_bytes(content)
    snapshots = []
    for revision in ("rev1", "rev2"):
        snapshot = tmp_path / "hub" / "snapshots" / revision
        snapshot.mkdir(parents=True)
        (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
        snapshots.append(snapshot)
    assert fingerprint(snapshots[0]) == fingerprint(snapshots[1])  # two revisions, the same weights
    blob.write_bytes(b"\x01" * 8)  # not read: the name is the identity (the hub never edits a blob in place)
    assert fingerprint(snapshots[0]) == fingerprint(snapshots[1])
    other = blobs / ("f" * 64)
    other.write_bytes(b"other")
    (snapshots[1] / "model.safetensors").unlink()
    (snapshots[1] / "model.safetensors").symlink_to(os.path.relpath(other, snapshots[1]))
    assert fingerprint(snapshots[0]) != fingerprint(snapshots[1])


def test_weights_that_cannot_be_found_are_an_error_that_says_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(LayoutError, match="no weight files.*model_revision"):
        fingerprint(empty)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(LayoutError, match="cannot find the weights of 'some-org/not-downloaded'.*model_revision"):
        model_folder("some-org/not-downloaded")
