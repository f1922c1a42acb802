#!/usr/bin/env bash
# Set up .venv and run the whole test suite (extra pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The container tier's engine, base image and CPU image are made in the background while the rest of the
# suite runs (tests/test_container.py, scheduled last, waits for them); TLSERVE_CONTAINER_TESTS=0 skips
# making them (then deselect the tier: -m "not container").
if [ "${TLSERVE_CONTAINER_TESTS:-1}" != 0 ] && [ -z "${TLSERVE_CONTAINER_STATE:-}" ]; then
  state=$(mktemp -d /tmp/tlserve-container.XXXXXX)
  setsid bash scripts/container-tier.sh up "$state" > "$state/up.log" 2>&1 &
  prep=$!
  export TLSERVE_CONTAINER_STATE=$state
  trap 'kill -- -$prep 2>/dev/null; wait $prep 2>/dev/null; bash scripts/container-tier.sh down "$state"' EXIT
fi
# Two workers, a test file each at a time: the suite waits on servers and subprocesses about half the
# time (one process used 56% of a core), so on 2 cores it ran in 14.3 min against 23.1 min in one
# process (TLSERVE_TEST_WORKERS=0: one process).
.venv/bin/python -m pytest -n "${TLSERVE_TEST_WORKERS:-2}" --dist loadfile "$@"
