#!/usr/bin/env bash
# Check every CUDA code path of vit-moe on a lent GPU (benchmarks/gpu_check.py): install into .venv, then run the
# check, which prints one markdown table and writes it to $OUT/gpu_check.md (else benchmarks/results/gpu_check.md).
#   bash benchmarks/gpu_check.sh [--budget SECONDS] [--only ITEM,ITEM] [--allow-cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python benchmarks/gpu_check.py "$@"
