# Sourced by demo.sh, tests/run.sh and .ci/run: sets PY to the Python the project installs into.
#
# An active virtual environment, or a Python that allows installs, is used as it is. A
# Python that refuses system-wide installs (PEP 668's EXTERNALLY-MANAGED marker, as on
# Debian and Ubuntu) gets a project virtual environment in .venv/, created once and
# reused. PYTHON=... picks the base interpreter (default: python, else python3).

base=${PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$base" ]; then
  echo "error: no python or python3 on PATH (set PYTHON=/path/to/python3)" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "note: using the project virtual environment .venv/" >&2
  PY=.venv/bin/python
elif "$base" -c '
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if not in_venv and os.path.exists(marker) else 1)'; then
  echo "note: $base refuses system-wide installs (externally managed); creating a project virtual environment in .venv/" >&2
  if ! "$base" -m venv .venv; then
    rm -rf .venv
    echo "error: could not create .venv/ with $base -m venv (on Debian/Ubuntu: apt-get install python3-venv)," \
         "or activate a virtual environment of your own and run this again" >&2
    exit 1
  fi
  PY=.venv/bin/python
else
  PY=$base
fi
