#!/usr/bin/env bash
# The README's first command: install kvtier and vLLM (CPU build), then run the main job on the
# embedded default: a local kvtier daemon, a vLLM engine on a small generated model, a
# shared-prefix workload with and without kvtier, and `kvtier stats`. No GPU, Redis or S3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_vllm.sh
python3 -m pip install -q -e .
exec kvtier demo "$@"
