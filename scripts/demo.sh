#!/usr/bin/env bash
# The demo: decode a few prompts with the built-in tiny model (sets up .venv first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${FASTDLLM_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/fastdllm" generate --model tiny --gen-length 32 --block-length 8 "12+34=" "5071+923=" "sort:93181=" "sort:4455120="
