#!/usr/bin/env bash
# The main command: installs the project, then builds Shapes, trains every stage and evaluates into runs/demo/.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -e .
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
python -m eval.demo "$@"
