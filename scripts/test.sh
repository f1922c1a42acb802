#!/usr/bin/env bash
# Set up .venv and run the whole test suite (extra pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, a test file each at a time: the suite waits on servers and subprocesses about half the
# time (one process used 56% of a core), so on 2 cores it ran in 14.3 min against 23.1 min in one
# process (TLSERVE_TEST_WORKERS=0: one process).
exec .venv/bin/python -m pytest -n "${TLSERVE_TEST_WORKERS:-2}" --dist loadfile "$@"
