#!/usr/bin/env bash
# The main command: installs the project, then builds Shapes, trains every stage and evaluates into runs/demo/.
# Installs into the active Python, or into .venv/ where the system Python refuses installs.
set -euo pipefail
cd "$(dirname "$0")"
source .ci/python_env.sh
"$PY" -m pip install -q -e .
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
"$PY" -m eval.demo "$@"
