"""Peer benchmarks: the same workloads as kvtier's benchmarks, run against other systems.

Each peer needs its own environment (conflicting pins), so these scripts are standalone: they do
not import ``kvtier`` or ``benchmarks.common`` and are run with the peer's own interpreter, e.g.
``.venv-lmcache/bin/python benchmarks/peers/lmcache_ttft.py`` (see ``scripts/setup_lmcache_env.sh``).
"""
