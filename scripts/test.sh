#!/usr/bin/env bash
# Quick start 2: install (into .venv) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m pytest "$@"
