#!/usr/bin/env bash
# The test command: installs the project with its test extras, then runs the suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"      # CPU build; only the Hugging Face comparison tests use it
python -m pip install -q -e ".[dev,hf]"
export JAX_PLATFORMS=cpu
python -m pytest -n 2 --dist loadfile "$@"
