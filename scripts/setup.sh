#!/usr/bin/env bash
# Create .venv (if needed) and install tlserve with pinned dependencies. Offline-safe
# once the package index (or its mirror) is reachable; idempotent and quick when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tlserve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev,ann,labels,tflite,track]'
  touch "$stamp"
fi
