#!/usr/bin/env bash
# GPU check of the page-copy path, in one command, on a machine with a CUDA GPU, PyTorch and nvcc:
#
#   bash scripts/gpu_check.sh [--quick]
#
# 1. builds csrc/kvtier_copy.cu (sm_80, sm_90 and this GPU's arch) into build/gpu_check/;
# 2. runs `pytest tests/copy -m gpu` (or tests/copy/test_copy_cuda.py as a script when pytest is
#    missing), then the CPU tests of tests/copy on this machine's PyTorch;
# 3. runs benchmarks/copy.py (--quick: about a minute; default: a few minutes), which writes
#    benchmarks/results/copy.json.
# Logs, the JUnit XML, copy.json and the library go to build/gpu_check/, and are copied to $OUT
# when it is set. Uses the repository this script lives in via PYTHONPATH (kvtier need not be
# installed) and nothing from the network. Exit status: 0 when every step passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WORK="$ROOT/build/gpu_check"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export KVTIER_COPY_LIB="$WORK/libkvtier_copy.so"
export PYTHONUNBUFFERED=1
BENCH_ARGS=()
[[ "${1:-}" == "--quick" ]] && BENCH_ARGS+=(--quick)

failed=()
# run NAME CMD...: run a step, log to $WORK/NAME.log, remember failures, never stop the script.
run() {
  local name=$1
  shift
  echo
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
  return "$rc"
}

collect() {
  cp -f benchmarks/results/copy.json "$WORK/copy.json" 2>/dev/null
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp -f "$WORK"/*.log "$WORK"/*.xml "$WORK"/copy.json "$WORK"/libkvtier_copy.so "$OUT"/ 2>/dev/null
    echo "outputs copied to $OUT"
  fi
}

run env bash -c "nvidia-smi; command -v nvcc && nvcc --version; \"$PY\" -c 'import sys, torch; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))'"

ARCH="$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(0); print(f"sm_{M}{m}")' 2>/dev/null)"
if [[ -z "$ARCH" ]]; then
  echo "no CUDA device visible to PyTorch: nothing to check on this machine"
  collect
  exit 1
fi

run build "$PY" -m kvtier.copy.build --arch sm_80 --arch sm_90 --arch "$ARCH" --out "$KVTIER_COPY_LIB" -v

if "$PY" -c 'import pytest' 2>/dev/null; then
  # --noconftest: tests/conftest.py serves other suites and imports packages this machine may lack.
  PYTEST=("$PY" -m pytest --noconftest -o addopts= -p no:cacheprovider -rs)
  run gpu-tests "${PYTEST[@]}" tests/copy -m gpu -v --junitxml="$WORK/pytest-gpu.xml"
  run cpu-tests "${PYTEST[@]}" tests/copy -m "not gpu" -q --junitxml="$WORK/pytest-cpu.xml"
else
  echo "pytest is not installed: running the GPU tests as a script"
  run gpu-tests "$PY" tests/copy/test_copy_cuda.py
fi

run bench "$PY" benchmarks/copy.py "${BENCH_ARGS[@]}"

collect
echo
if ((${#failed[@]})); then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
