#!/usr/bin/env bash
# The prepared GPU check: SD v1.5-sized training (samples/s, MFU, peak memory per option set)
# and step-1 detection of 500 prompts x 4 (seconds, ratio to its floor) in one JSON.
#   bash scripts/gpu_check.sh [OUT.json] [more flags of `python -m scripts.gpu_check`]
# Needs chexmem installed with its GPU extras (pip install -e ".[gpu]") and one CUDA GPU.
set -euo pipefail
out="${1:-gpu_check.json}"
shift || true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python -m scripts.gpu_check --out "$out" "$@"
