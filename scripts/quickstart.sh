#!/usr/bin/env bash
# One command from a fresh clone: set up ./.venv, then run the main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dylora-moe train --config configs/cpu-demo.yaml --overwrite-output-dir
