#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, slow integration tests included.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the quick set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
set +e
if [ "$#" -eq 0 ]; then
  .venv/bin/python -m pytest -m "slow or not slow"
else
  .venv/bin/python -m pytest "$@"
fi
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi
exit "$rc"
