#!/usr/bin/env bash
# What the container test tier (tests/test_container.py) needs, made where it is missing, and taken away
# again (docs/containers.md):
#   scripts/container-tier.sh up STATE    a Docker engine (Debian's docker.io, installed with apt-get if
#                                         missing, started with overlay2 under STATE if none answers), a base
#                                         image (python:3.11-slim, or one made once from Debian's packages and
#                                         cached where no registry answers), a tiny exported model and its CPU
#                                         image built by `tlserve build`; then STATE/ready (or STATE/failed)
#   scripts/container-tier.sh down STATE  stops the engine `up` started (or removes the image from an engine
#                                         that was running already) and removes STATE
# scripts/test.sh runs `up` in the background while the rest of the suite runs; the test waits for it.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
action=${1:?usage: container-tier.sh up|down STATE}
STATE=${2:?usage: container-tier.sh up|down STATE}
OFFICIAL_BASE=python:3.11-slim
LOCAL_BASE=tlserve-base:python3.11-bookworm
CACHE=${TLSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tlserve}
BASE_TAR=$CACHE/base-python3.11-bookworm.tar
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

install_missing() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ ${#need[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || { echo "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root"; return 1; }
  log "apt-get install ${need[*]}"
  apt-get update -qq
  # wait for another apt or dpkg (an unattended upgrade, say) rather than fail at once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
    "${need[@]}" >/dev/null
}

# An engine that answers already (DOCKER_HOST or the default socket) is used as it is; else one of our own:
# overlay2 (vfs copies every layer: > 12 min for this build), no iptables or bridge (builds and the test's
# container use the host's network), its own socket, data and exec roots under STATE.
start_engine() {
  if timeout 20 docker info >/dev/null 2>&1; then
    log "using the engine at ${DOCKER_HOST:-the default socket}"
    echo "DOCKER_HOST=${DOCKER_HOST:-}" >> "$STATE/env"
    return
  fi
  local sock=$STATE/docker.sock
  log "starting dockerd (overlay2, data root $STATE/data)"
  nice -n 5 dockerd --storage-driver=overlay2 --iptables=false --ip-masq=false --bridge=none \
    --data-root "$STATE/data" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
    -H "unix://$sock" > "$STATE/dockerd.log" 2>&1 &
  echo $! > "$STATE/engine.pid"
  export DOCKER_HOST=unix://$sock
  echo "DOCKER_HOST=$DOCKER_HOST" >> "$STATE/env"
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && { log "dockerd ready"; return; }
    kill -0 "$(cat "$STATE/engine.pid")" 2>/dev/null || { tail -5 "$STATE/dockerd.log"; return 1; }
    sleep 0.5
  done
  echo "dockerd did not answer in 60 s (log: $STATE/dockerd.log)"; return 1
}

# The rootfs of a python:3.11-slim look-alike from Debian's packages: the host's CA bundle (package downloads
# may pass a proxy only it trusts), uv told to use it (UV_NATIVE_TLS), pip allowed to install (BentoML's
# Dockerfile runs `pip install uv`). Cached as a tar: made once per machine (about 1.5 min).
make_base_tar() {
  local rootfs=$STATE/rootfs
  log "debootstrap bookworm -> $rootfs"
  nice -n 5 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$MIRROR" > "$STATE/debootstrap.log" 2>&1 \
    || { tail -5 "$STATE/debootstrap.log"; return 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
  ln -sf python3 "$rootfs/usr/bin/python"
  rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  mkdir -p "$CACHE"
  tar -C "$rootfs" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$rootfs"
}

ensure_base() {
  if docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 || timeout 60 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    echo "TLSERVE_BASE_IMAGE=$OFFICIAL_BASE" >> "$STATE/env"
    return
  fi
  log "$OFFICIAL_BASE cannot be pulled: using a base made from Debian's packages"
  if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    [ -f "$BASE_TAR" ] || make_base_tar
    log "docker import $BASE_TAR"
    docker import -c 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' -c 'ENV UV_NATIVE_TLS=1' \
      -c 'CMD ["python3"]' "$BASE_TAR" "$LOCAL_BASE" >/dev/null
  fi
  echo "TLSERVE_BASE_IMAGE=$LOCAL_BASE" >> "$STATE/env"
}

# A tiny model (2 epochs on generated data), exported and built into the CPU image by the product's own
# command; its output (tag, size, run command) is kept for the test to check.
build_image() {
  local tl=$ROOT/.venv/bin/tlserve
  export TLSERVE_HOME=$STATE/home BENTOML_HOME=$STATE/bentoml
  log "train + export a tiny model"
  nice -n 5 "$tl" train --data synthetic --backbone cnn --epochs 2 --name box --limit 400 > "$STATE/model.log" 2>&1
  nice -n 5 "$tl" export box >> "$STATE/model.log" 2>&1
  log "tlserve build --device cpu"
  # shellcheck disable=SC1091
  source "$STATE/env"
  nice -n 5 "$tl" build box --device cpu --base-image "$TLSERVE_BASE_IMAGE" --network host --engine docker \
    > "$STATE/build.out" 2> "$STATE/build.err" || { cat "$STATE/build.err"; return 1; }
  log "built: $(head -2 "$STATE/build.out" | tr '\n' ' ')"
  echo "TLSERVE_MODEL_DIR=$STATE/home/models/box" >> "$STATE/env"
}

up() {
  mkdir -p "$STATE"
  echo $$ > "$STATE/up.pid"
  : > "$STATE/env"
  trap 'echo "failed at line $LINENO (log: $STATE/up.log)" > "$STATE/failed"' ERR
  install_missing
  start_engine
  ensure_base
  build_image
  touch "$STATE/ready"
  log "ready"
}

down() {
  [ -d "$STATE" ] || return 0
  if [ -f "$STATE/engine.pid" ]; then
    # Our own engine goes whole, its images with it: they are all under STATE.
    local pid
    pid=$(cat "$STATE/engine.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    # what a killed engine left mounted under its roots
    grep -oP "^\S+ \K$STATE/\S+" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    log "engine stopped"
  elif [ -f "$STATE/env" ]; then
    # Someone else's engine keeps the base (the cache) and loses the image.
    # shellcheck disable=SC1091
    set -a; source "$STATE/env"; set +a
    [ -n "${DOCKER_HOST:-}" ] || unset DOCKER_HOST
    local tag
    tag=$(grep -oP '^built image \K\S+' "$STATE/build.out" 2>/dev/null || true)
    if [ -n "$tag" ]; then docker image rm -f "$tag" >/dev/null 2>&1 || true; fi
    log "removed image ${tag:-(none)}"
  fi
  rm -rf "$STATE"
  log "removed $STATE"
}

case $action in
  up) up ;;
  down) down ;;
  *) echo "usage: container-tier.sh up|down STATE"; exit 2 ;;
esac
