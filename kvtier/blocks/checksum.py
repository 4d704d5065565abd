"""Payload checksums: XXH3-64 of a block's bytes, stored with every copy below the host tier.

Checked whenever a block comes back from disk or S3; a mismatch makes the block a miss and it
is deleted. XXH3 runs at memory speed, so checking costs little next to the I/O it guards.
"""

from __future__ import annotations

import xxhash


def payload_checksum(data: bytes | bytearray | memoryview) -> int:
    """Return the XXH3-64 checksum of ``data`` as an unsigned 64-bit integer."""
    return xxhash.xxh3_64_intdigest(data)
