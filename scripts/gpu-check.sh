#!/usr/bin/env bash
# The GPU path end to end, in one go (issue 30 item 3): under 8 minutes on one GPU (H200 class).
#
#   scripts/gpu-check.sh               on a machine with an NVIDIA GPU (after scripts/setup.sh)
#   scripts/gpu-check.sh --cpu-smoke   anywhere: the same steps at toy sizes on the CPU, to check the script
#   scripts/gpu-check.sh --image TAG   also start the GPU container image TAG (docker run --gpus all) and call
#                                      its /predict (TLSERVE_GPU_IMAGE=TAG does the same)
#
# 1. trains MobileNetV2 @224 (ImageNet weights from shared/weights) frozen, then fine-tuned, on a CIFAR-10
#    subset (shared/datasets/cifar10-jpg) with mixed precision and XLA; prints seconds per epoch;
# 2. exports it (SavedModel, ONNX fp32 + fp16);
# 3. times TensorFlow (keras) against onnxruntime (fp32, fp16) in-process at batch 1 and 32: on a GPU
#    onnxruntime must run on its CUDA provider, or the script fails;
# 4. serves it (`tlserve serve`, TLSERVE_DEVICE=cuda) and calls /predict with a real image;
# 5. with an image tag and a docker that sees the GPU: the same /predict from the container; else says
#    why it skipped that step.
# Everything lands in a temporary TLSERVE_HOME, removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
TL=$ROOT/.venv/bin/tlserve
MODE=gpu
IMAGE=${TLSERVE_GPU_IMAGE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu-smoke ;;
    --image) IMAGE=${2:?--image takes a tag}; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option '$1' (--cpu-smoke, --image TAG)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$TL" ] || { echo "gpu-check: no .venv here; run scripts/setup.sh first" >&2; exit 2; }

SHARED=""
for candidate in /work/shared ../shared "$ROOT/../shared"; do
  [ -d "$candidate/datasets/cifar10-jpg" ] && { SHARED=$(cd "$candidate" && pwd); break; }
done
[ -n "$SHARED" ] || { echo "gpu-check: no shared/datasets/cifar10-jpg beside the repository" >&2; exit 2; }
WEIGHTS=$SHARED/weights/mobilenetv2_1.0_imagenet_no_top.h5
[ -f "$WEIGHTS" ] || { echo "gpu-check: no $WEIGHTS" >&2; exit 2; }

if [ "$MODE" = gpu ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || {
    echo "gpu-check: no NVIDIA GPU answers nvidia-smi here; --cpu-smoke runs the same steps on the CPU" >&2; exit 2; }
  # 5,000 images per split, 3 frozen + 2 fine-tuning epochs at 224: a few minutes on one H200.
  SIZE=224 LIMIT=5000 EPOCHS=3 FT_EPOCHS=2 BATCH=128 PRECISION=mixed_float16 DURATION=3 DEVICE=cuda
  export TLSERVE_DEVICE=cuda
else
  # Toy sizes: every step and every branch of this script, in about two minutes on a CPU.
  SIZE=32 LIMIT=60 EPOCHS=1 FT_EPOCHS=1 BATCH=32 PRECISION=float32 DURATION=0.5 DEVICE=cpu
  export TLSERVE_DEVICE=cpu
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tlserve-gpu-check.XXXXXX")
export TLSERVE_HOME=$WORK
SERVER=""
CONTAINER=""
cleanup() {
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
  [ -n "$CONTAINER" ] && docker stop -t 10 "$CONTAINER" >/dev/null 2>&1 || true
  [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
START=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - START )) s)"; }

step "machine"
[ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
from serving.base.machine import cpu_model, package_versions
print("cpu:", cpu_model()); print("versions:", package_versions())
EOF

step "train MobileNetV2 @$SIZE frozen + fine-tune, $LIMIT images per split, $PRECISION, XLA requested"
"$TL" train --data "folder:$SHARED/datasets/cifar10-jpg" -b mobilenetv2 -s finetune --weights "$WEIGHTS" \
  --input-size "$SIZE" --limit "$LIMIT" --epochs "$EPOCHS" --finetune-epochs "$FT_EPOCHS" --batch-size "$BATCH" \
  --precision "$PRECISION" --jit --data-check off --name gpu-check > "$WORK/train.log" 2>&1 \
  || { tail -30 "$WORK/train.log"; exit 1; }
"$PY" - "$WORK/runs/gpu-check/record.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
by_phase = {}
for row in r["history"]:
    by_phase.setdefault(row["phase"], []).append(row["seconds"])
for phase, secs in by_phase.items():
    later = secs[1:] or secs  # the first epoch carries tracing / XLA compilation
    print(f"train {phase}: {len(secs)} epochs, first {secs[0]:.1f} s, then {sum(later) / len(later):.1f} s/epoch")
e = r["environment"]
print(f"test accuracy {r['test']['accuracy']:.4f}; devices {e['devices']}, precision {e['precision']}, XLA {e['jit']}")
EOF

step "export (SavedModel, ONNX fp32 + fp16)"
"$TL" export gpu-check --fp16 --no-register > "$WORK/export.log" 2>&1 || { tail -30 "$WORK/export.log"; exit 1; }
grep -E "model\.(fp16\.)?onnx:|saved_model:" "$WORK/export.log" || true

step "latency in-process: TensorFlow against onnxruntime"
"$TL" bench gpu-check --runtimes keras,onnx,onnx-fp16 --batch-sizes 1,32 --duration "$DURATION" --json \
  > "$WORK/bench.json" 2> "$WORK/bench.log" || { tail -30 "$WORK/bench.log"; exit 1; }
"$PY" - "$WORK/bench.json" "$MODE" <<'EOF'
import json, sys
report, mode = json.load(open(sys.argv[1])), sys.argv[2]
print("| runtime | provider | batch | p50 ms | images/s |")
print("|---|---|---:|---:|---:|")
for r in report["results"]:
    print(f"| {r['runtime']} | {r['provider']} | {r['batch']} | {r['p50_ms']:.2f} | {r['images_per_sec']:.0f} |")
onnx = {r["provider"] for r in report["results"] if r["runtime"].startswith("onnx")}
if mode == "gpu" and onnx != {"CUDAExecutionProvider"}:
    sys.exit(f"onnxruntime ran on {sorted(onnx)}, not CUDAExecutionProvider: install onnxruntime-gpu with its CUDA wheels")
EOF

SAMPLE=$(find "$SHARED/datasets/cifar10-jpg/test" -name '*.jpg' | sort | head -1)
wait_ready() {  # url, seconds
  for _ in $(seq 1 "$2"); do
    curl -sf "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

step "serve (TLSERVE_DEVICE=$DEVICE) and POST /predict $(basename "$SAMPLE")"
"$TL" serve gpu-check --port "$PORT" > "$WORK/serve.log" 2>&1 &
SERVER=$!
wait_ready "http://127.0.0.1:$PORT" 180 || { tail -30 "$WORK/serve.log"; exit 1; }
curl -sf "http://127.0.0.1:$PORT/metadata" | "$PY" -c 'import json, sys; m = json.load(sys.stdin); print("serving", m["name"], m["variant"], "on", m["provider"])'
curl -sf -F "image=@$SAMPLE" "http://127.0.0.1:$PORT/predict"; echo
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
SERVER=""

step "the GPU container image"
if [ -z "$IMAGE" ]; then
  echo "skipped: no image given (--image TAG or TLSERVE_GPU_IMAGE; \`tlserve build\` makes one)"
elif ! command -v docker >/dev/null; then
  echo "skipped: no docker command on this machine"
elif ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "skipped: docker has no image $IMAGE"
else
  GPUS=(--gpus all)
  [ "$MODE" = gpu ] || GPUS=()
  CPORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if CONTAINER=$(docker run -d --rm "${GPUS[@]}" -e "TLSERVE_DEVICE=$DEVICE" -p "127.0.0.1:$CPORT:3000" "$IMAGE"); then
    if wait_ready "http://127.0.0.1:$CPORT" 120; then
      curl -sf "http://127.0.0.1:$CPORT/metadata" | "$PY" -c 'import json, sys; m = json.load(sys.stdin); print("container serves", m["name"], "on", m["provider"])'
      curl -sf -F "image=@$SAMPLE" "http://127.0.0.1:$CPORT/predict"; echo
    else
      echo "the container did not answer /readyz within 120 s:"; docker logs "$CONTAINER" 2>&1 | tail -20
    fi
  else
    echo "skipped: docker run failed (no GPU runtime for docker? try: docker run --rm --gpus all $IMAGE nvidia-smi)"
    CONTAINER=""
  fi
fi

step "done in $(( $(date +%s) - START )) s ($MODE)"
