#!/usr/bin/env bash
# The test command: installs the project with its test extras, then runs the suite on the CPU.
# Installs into the active Python, or into .venv/ where the system Python refuses installs.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/python_env.sh
"$PY" -m pip install -q "torch==2.13.0"      # CPU build; only the Hugging Face comparison tests use it
"$PY" -m pip install -q -e ".[dev,hf]"
export JAX_PLATFORMS=cpu
# One file per worker at a time (module fixtures and compiled programs are shared within a
# file), in collection order: conftest.py puts the files with slow tests first. The 25 slowest
# tests are listed at the end.
"$PY" -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
