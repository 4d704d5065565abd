#!/usr/bin/env bash
# Regenerate the gRPC stubs in kvtier/v1/ from proto/kvtier/v1/*.proto (never edit them by hand).
# tests/test_proto_current.py fails when the committed stubs differ from a fresh generation.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/kvtier/v1/*.proto
