#!/usr/bin/env bash
# Check every CUDA code path of vit-moe on a lent GPU (benchmarks/gpu_check.py); prints one markdown table and writes
# it to $OUT/gpu_check.md (else benchmarks/results/gpu_check.md).
#   bash benchmarks/gpu_check.sh [--budget SECONDS] [--only ITEM,ITEM] [--allow-cpu]
# The lent GPU machine reaches no package index: it runs with the python3 there (its image holds torch, timm,
# accelerate, onnxruntime, ...), this checkout on PYTHONPATH. Where .venv exists (README's set-up), that is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
