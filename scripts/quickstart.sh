#!/usr/bin/env bash
# Install (if needed) and run the main job on the embedded default: local Ray, the tiny model,
# synthetic data, SFT, candidates, a 4-strategy Tune search, the Pareto table and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/raydpo quickstart "$@"
