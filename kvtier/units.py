"""Human-readable byte sizes, parsed once at the edge (config, CLI flags)."""

from __future__ import annotations

import re

from kvtier.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Return a byte count for ``value``: an int, or a string such as ``"64GiB"``, ``"10G"``, ``"512k"``.

    Decimal suffixes (k, M, G, T, with or without B) are powers of 1000; binary ones (KiB, MiB,
    GiB, TiB) are powers of 1024. Raises :class:`ConfigError` for anything else or a negative size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"size must be a number of bytes or a string like '64GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"size must not be negative, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read size {value!r}: use a byte count or a number with one of the suffixes "
            "k, M, G, T (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: float) -> str:
    """Format a byte count with a binary suffix, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
