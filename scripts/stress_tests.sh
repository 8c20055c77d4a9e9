#!/usr/bin/env bash
# Before stopping: every multi-process, signal, kill and resume test and a 2-process DDP / FSDP2 training run, 20 times
# each while a CPU-bound process competes for the cores; prints pass counts per test (scripts/stress_tests.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python scripts/stress_tests.py "$@"
