#!/usr/bin/env bash
# The main job end to end, offline, on built-in (synthetic) data:
# set up .venv; train a small CNN; export it (SavedModel + ONNX, checked against Keras);
# serve it with BentoML on 127.0.0.1; classify one image over HTTP with curl; stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TLSERVE_HOME=${TLSERVE_HOME:-$PWD/demo}
export BENTOML_HOME=${BENTOML_HOME:-$TLSERVE_HOME/bentoml}
mkdir -p "$TLSERVE_HOME"
tl=.venv/bin/tlserve
name=demo-cnn
port=${TLSERVE_DEMO_PORT:-3777}

$tl train --data synthetic --backbone cnn --epochs 8 --name "$name" --overwrite
$tl runs
$tl export "$name" --int8 --overwrite

# One image of each class from the test split (never trained on); send the circle.
$tl data sample --data synthetic --per-class 1 --out "$TLSERVE_HOME/examples" --overwrite
image="$TLSERVE_HOME/examples/circle/0.png"

$tl serve "$name" --host 127.0.0.1 --port "$port" > "$TLSERVE_HOME/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$TLSERVE_HOME/serve.log"; exit 1; }
  sleep 0.5
done
echo "POST http://127.0.0.1:$port/predict"
curl -sf -F "image=@$image" "http://127.0.0.1:$port/predict"
echo
