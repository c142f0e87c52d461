#!/usr/bin/env bash
# The test command: installs the project with its test extras, then runs the suite on the CPU.
# Installs into the active Python, or into .venv/ where the system Python refuses installs.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/python_env.sh
"$PY" -m pip install -q "torch==2.13.0"      # CPU build; only the Hugging Face comparison tests use it
"$PY" -m pip install -q -e ".[dev,hf]"
export JAX_PLATFORMS=cpu
# One persistent XLA compilation cache for the run, shared by both workers and every process the
# tests start: many files compile the same tiny programs, and the restart tests compile the same
# train step once per process. A fresh folder each run (JAX_COMPILATION_CACHE_DIR=... to keep one).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/chameleon-jax-xla-cache.XXXXXX")
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
# One file per worker at a time (module fixtures and compiled programs are shared within a
# file), in collection order: conftest.py puts the files with slow tests first. The 25 slowest
# tests are listed at the end.
"$PY" -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
