"""kvtier benchmarks: each compares kvtier against a bound measured in the same run (a ratio).

Run one with ``python -m benchmarks.<name> [--quick]`` from the repository root; results go to
``benchmarks/results/<name>.json``. Shared helpers live in :mod:`benchmarks.common`.
"""
