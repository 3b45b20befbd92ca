#!/usr/bin/env bash
# Installs everything the tests need into .venv (scripts/install.sh --test), then runs them.
# Extra arguments go to pytest, e.g. scripts/test.sh -k chat, or scripts/test.sh -m "not e2e".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest "$@"
