#!/usr/bin/env bash
# The main job end to end, offline, on built-in (synthetic) data:
# set up .venv, train a small CNN, and print its run record.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TLSERVE_HOME=${TLSERVE_HOME:-$PWD/demo}
mkdir -p "$TLSERVE_HOME"
tl=.venv/bin/tlserve
name=demo-cnn
$tl train --data synthetic --backbone cnn --epochs 4 --name "$name" --overwrite
$tl runs
echo "record: $TLSERVE_HOME/runs/$name/record.json"
