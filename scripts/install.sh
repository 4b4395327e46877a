#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned lock plus this project, with plain pip.
# (uv ignores this machine's local torch builds and would download several GB.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e ".[dev]"
