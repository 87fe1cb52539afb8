#!/usr/bin/env bash
# Install (if needed) and run the main job on the embedded default (synthetic data, local).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/raydpo demo "$@"
