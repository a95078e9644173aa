#!/usr/bin/env bash
# The exactness-sensitive tests (pytest -m exact) under other CPU code paths than the full run's default one.
# BLAS and ATen pick kernels by CPU, instruction set, thread count and MKL mode, and sum in another order on
# each; what the code promises bit for bit must hold on every path (docs/reliability.md). Run from anywhere:
#   bash scripts/exactness.sh            # after scripts/setup.sh; .ci/run runs it after the full suite
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(
  "ATEN_CPU_CAPABILITY=default"                # ATen's scalar kernels (every x86 CPU)
  "MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1"      # MKL's most conservative code path, one thread
)
# AVX-512 kernels only where the CPU has them: forcing them elsewhere is an illegal instruction, not a test
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  paths+=("ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512")
fi
for path in "${paths[@]}"; do
  echo "== pytest -m exact under: $path"
  env $path .venv/bin/python -m pytest -q -m exact -p no:cacheprovider
done
