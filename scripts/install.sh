#!/usr/bin/env bash
# Create .venv (if needed) and install vit-moe with its test extras. Re-running is a no-op unless
# setup.cfg / pyproject.toml changed. TORCH_SPEC overrides the torch pin (default: the versions this
# project is tested with; on this project's machines pip serves them from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.vit-moe-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing into .venv (about 2 minutes on a fresh machine)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q $TORCH_SPEC
    .venv/bin/python -m pip install -q -e '.[all,test,tensorboard]'
    echo "$want" > "$stamp"
fi
