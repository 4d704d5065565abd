#!/usr/bin/env bash
# The README's first command: install kvtier and run the main job on its embedded default
# (host-memory arena + local disk tier, no GPU, Redis or S3 needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
exec kvtier demo "$@"
