#!/usr/bin/env bash
# Set up everything the tests need and run them: the one test command of the README.
#
#   bash tests/run.sh            # all tests (GUI tests under a virtual X server)
#   bash tests/run.sh -k io      # extra arguments go to pytest
#
# What it does, idempotently:
#   1. installs the system packages napari's Qt canvas needs headless (Xvfb & co.) with apt-get,
#   2. creates a virtual environment (.venv, or $CDPDNET_VENV),
#   3. installs PyTorch if the environment has none (see choose_torch below),
#   4. builds the napari-cdpdnet wheel and installs it with its [all,testing] extras,
#   5. runs pytest on that installed wheel (not the source tree) with the network disabled.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
log() { printf '\033[1m[tests/run.sh]\033[0m %s\n' "$*"; }
CDPDNET_EXTRAS="all,testing"
# shellcheck source=../scripts/setup.sh
source "$here/scripts/setup.sh"

# ---------------------------------------------------------------- 5. pytest
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CDPDNET_EXPECT_WHEEL=1
export PYTHONDONTWRITEBYTECODE=1
runner=()
if [ -z "${DISPLAY:-}" ] || [ "${CI:-}" = "true" ]; then
  runner=(xvfb-run -a -s "-screen 0 1600x1200x24")
fi
log "running pytest on the installed wheel${runner:+ (under xvfb-run)}"
set +e
"${runner[@]}" "$venv/bin/pytest" -p no:cacheprovider -ra "$here/tests" "$@" </dev/null
status=$?
set -e
if [ "$status" -eq 5 ]; then
  log "pytest collected no tests: that is a failure here (check the arguments or the test folder)"
  exit 1
fi
exit "$status"
