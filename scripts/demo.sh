#!/usr/bin/env bash
# Quick start 1: install (into .venv) and run the whole pipeline on the bundled sample in ./workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
if [ ! -d workspace ]; then
  cogalign init workspace --sample
fi
time cogalign run --workspace workspace
echo "report: $(pwd)/workspace/data/evaluate/report.html"
