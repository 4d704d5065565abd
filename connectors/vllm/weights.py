"""A fingerprint of a model's weights, so that KV computed with other weights under the same model
name is never reused: a fine-tune copied over the same folder, a repository branch that moved.

It goes into the layout's ``model_revision`` (``docs/block-identity.md``), so the scheduler and
every worker of every node that loads the same files get the same layout id, and other files get
another one. Per weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``,
sorted by relative path) it takes:

- a file from the Hugging Face cache: its blob's name, which is the file's SHA-256 (the hub's
  LFS object id), so nothing is read;
- any other file: its size, its whole safetensors header (tensor names, dtypes, shapes, offsets)
  and :data:`SAMPLES` chunks of :data:`SAMPLE_BYTES` at evenly spaced offsets. A few megabytes
  per model, read once per process. Re-trained or fine-tuned weights differ in every sampled
  chunk; a change confined to bytes between the samples is not seen: name such weights apart
  with ``kv_connector_extra_config.model_revision``.

Where no weight file can be found (weights streamed from elsewhere, random ``dummy`` weights),
:func:`weights_fingerprint` raises :class:`~kvtier.errors.LayoutError` saying so: the connector is
then disabled rather than guessing that two engines computed the same KV.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from pathlib import Path

from kvtier.errors import LayoutError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")  # an LFS file's SHA-256, the name of its blob in the cache


@functools.lru_cache(maxsize=16)
def weights_fingerprint(model: str, revision: str | None = None) -> str:
    """``"w1:"`` and 16 hex digits for the weights of ``model`` (a folder, or a repository in the
    local Hugging Face cache at ``revision``)."""
    folder = model_folder(model, revision)
    files = sorted(path for path in folder.rglob("*") if path.name.endswith(WEIGHT_SUFFIXES) and path.is_file())
    if not files:
        raise LayoutError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {folder}, so kvtier cannot tell these weights "
                          "from others; set kv_connector_extra_config.model_revision to a name unique to these weights")
    digest = hashlib.sha256(b"kvtier weights v1\0")
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(_file_identity(path) + b"\0")
    return "w1:" + digest.hexdigest()[:16]


def model_folder(model: str, revision: str | None = None) -> Path:
    """The folder vLLM loaded ``model`` from: the path itself, or its snapshot in the local
    Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; the message says what is missing
        raise LayoutError(f"cannot find the weights of {model!r} (revision {revision or 'default'}) on this machine "
                          f"({type(exc).__name__}: {exc}); set kv_connector_extra_config.model_revision to a name unique to "
                          "these weights") from None


def _file_identity(path: Path) -> bytes:
    blob = path.resolve()
    if path.is_symlink() and blob.parent.name == "blobs" and _HUB_BLOB.fullmatch(blob.name):
        return b"sha256:" + blob.name.encode()
    size = path.stat().st_size
    digest = hashlib.sha256(struct.pack("<Q", size))
    with open(path, "rb") as file:
        if path.suffix == ".safetensors" and size >= 8:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            digest.update(file.read(min(header_bytes, _MAX_HEADER_BYTES)))
        for sample in range(SAMPLES):
            file.seek(max(0, (size - SAMPLE_BYTES) * sample // max(SAMPLES - 1, 1)))
            digest.update(file.read(SAMPLE_BYTES))
    return b"sampled:" + digest.hexdigest().encode()


__all__ = ["SAMPLES", "SAMPLE_BYTES", "WEIGHT_SUFFIXES", "model_folder", "weights_fingerprint"]
