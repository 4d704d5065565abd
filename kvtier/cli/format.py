"""Human-readable tables of tier statistics (shared by ``kvtier demo`` and ``kvtier stats``)."""

from __future__ import annotations

from kvtier.chain.stats import ChainStats
from kvtier.units import format_size


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).rjust(width) if i else str(cell).ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in [headers, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def render_chain_stats(stats: ChainStats) -> str:
    headers = ["tier", "used", "capacity", "blocks", "hits", "misses", "hit rate", "in", "out",
               "evicted", "dropped", "demoted", "promoted", "corrupt", "errors"]
    rows = []
    for tier in stats.tiers:
        c = tier.counters
        rows.append([
            tier.name,
            format_size(tier.used_bytes),
            format_size(tier.capacity_bytes) if tier.capacity_bytes else "unbounded",
            str(tier.blocks),
            str(c.hits),
            str(c.misses),
            f"{tier.hit_rate:.0%}",
            format_size(c.bytes_in),
            format_size(c.bytes_out),
            str(c.evictions),
            str(c.dropped),
            str(c.demotions),
            str(c.promotions),
            str(c.corrupt),
            str(c.errors),
        ])
    footer = (f"pending demotions: {stats.pending_demotions}   active leases: {stats.active_leases}   "
              f"pinned blocks: {stats.pinned_blocks}")
    return render_table(headers, rows) + "\n" + footer
