"""KV layouts: everything that makes two KV pages interchangeable, hashed into a ``layout_id``.

A block stored under one ``layout_id`` is only ever loaded into an engine whose layout has the
same ``layout_id``; any difference (model, dtype, heads of this rank, tokens per block, parallel
rank, the engine's page order...) is a miss, never a wrong load.

``layout_id`` is the first 8 bytes (16 hex digits) of SHA-256 over the canonical JSON encoding
of the descriptor (sorted keys, no spaces, UTF-8, with ``"v": 1``); see ``docs/block-identity.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, fields

from kvtier.errors import LayoutError

#: Bytes per element of the KV dtypes vLLM uses. Keys are torch dtype names without ``torch.``.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

#: vLLM's physical KV cache orders (``vllm/v1/kv_cache_layout.py``), plus the legacy ``NHD``/``HND``.
PAGE_LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC", "NHD", "HND")

#: How K and V share a page: concatenated in the last dim (vLLM >= 0.32), split into two pages, or MLA latent.
KV_FORMATS = ("kv_concat", "kv_split", "mla")

LAYOUT_ID_HEX_DIGITS = 16


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape and identity of one engine rank's KV blocks.

    Invariant: ``block_nbytes == num_layers * page_nbytes`` and a block's bytes are its layer
    pages back to back in layer order (the arena slot format, see ``docs/copy.md``).
    """

    model: str  # model name as the engine knows it
    dtype: str  # KV cache dtype, a key of DTYPE_SIZES
    num_layers: int  # attention layers held by this rank (after pipeline split)
    num_kv_heads: int  # KV heads held by this rank (after tensor split); 1 for MLA
    head_size: int  # K head size (MLA: kv_lora_rank + rope dim)
    block_size: int  # tokens per block
    head_size_v: int | None = None  # V head size; None means equal to head_size; 0 for MLA
    model_revision: str = ""  # weights revision / checksum; different weights never share KV
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    page_layout: str = "LBHNC"  # the engine's physical order, one of PAGE_LAYOUTS
    kv_format: str = "kv_concat"  # one of KV_FORMATS
    extra: tuple[tuple[str, str], ...] = field(default=())  # anything else that changes the bytes
    _layout_id: str = field(init=False, repr=False, compare=False)  # computed once, in __post_init__

    def __post_init__(self) -> None:
        if not self.model:
            raise LayoutError("layout needs a model name")
        if self.dtype not in DTYPE_SIZES:
            raise LayoutError(f"unknown KV dtype {self.dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size", "tp_size", "pp_size"):
            if getattr(self, name) <= 0:
                raise LayoutError(f"layout field {name} must be positive, got {getattr(self, name)}")
        if self.head_size_v is not None and self.head_size_v < 0:
            raise LayoutError(f"head_size_v must be >= 0, got {self.head_size_v}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"tp_rank {self.tp_rank} is outside 0..{self.tp_size - 1}")
        if not 0 <= self.pp_rank < self.pp_size:
            raise LayoutError(f"pp_rank {self.pp_rank} is outside 0..{self.pp_size - 1}")
        if self.page_layout not in PAGE_LAYOUTS:
            raise LayoutError(f"unknown page layout {self.page_layout!r}; expected one of {PAGE_LAYOUTS}")
        if self.kv_format not in KV_FORMATS:
            raise LayoutError(f"unknown kv_format {self.kv_format!r}; expected one of {KV_FORMATS}")
        object.__setattr__(self, "_layout_id", hashlib.sha256(self.canonical_json()).hexdigest()[:LAYOUT_ID_HEX_DIGITS])

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def page_nbytes(self) -> int:
        """Bytes of one (block, layer) page: K and V of ``block_size`` tokens for this rank's heads."""
        head_v = self.head_size if self.head_size_v is None else self.head_size_v
        return self.num_kv_heads * self.block_size * (self.head_size + head_v) * self.element_size

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across all of this rank's layers."""
        return self.page_nbytes * self.num_layers

    def canonical_json(self) -> bytes:
        """The exact bytes ``layout_id`` hashes (sorted keys, compact separators, ``v`` = 1)."""
        described = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        described["extra"] = [list(pair) for pair in sorted(self.extra)]
        described["v"] = 1
        return json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def layout_id(self) -> str:
        """16 hex digits of SHA-256 over :meth:`canonical_json` (docs/block-identity.md)."""
        return self._layout_id


_HEX_DIGITS = frozenset("0123456789abcdef")


@functools.lru_cache(maxsize=1024)
def check_layout_id(text: str) -> str:
    """Return ``text`` if it is a well-formed layout id (16 lowercase hex digits), else raise.

    Cached: every BlockKey checks its layout id, and a node sees only a few layouts."""
    if len(text) != LAYOUT_ID_HEX_DIGITS or not _HEX_DIGITS.issuperset(text):
        raise LayoutError(f"layout id must be {LAYOUT_ID_HEX_DIGITS} lowercase hex digits, got {text!r}")
    return text
