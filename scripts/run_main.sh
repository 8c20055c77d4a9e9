#!/usr/bin/env bash
# Install (if needed) and run the main job end to end on the embedded default. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python train_scripts/main_job.py "$@"
