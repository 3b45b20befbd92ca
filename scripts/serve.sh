#!/usr/bin/env bash
# Installs vLLama into .venv (scripts/install.sh), then runs `vllama serve`:
# a private Redis, the API on 127.0.0.1:11434 and a worker serving smollm2:135m.
# Extra arguments go to `vllama serve`, e.g. scripts/serve.sh --port 11500.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/vllama serve "$@"
