#!/usr/bin/env bash
# Run the test suite (sets up .venv first). Slow tests run too with FASTDLLM_SLOW=1. Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${FASTDLLM_VENV:-$root/.venv}"
cd "$root"
marker=(-m "not slow")
[ "${FASTDLLM_SLOW:-0}" = "1" ] && marker=()
exec "$venv/bin/python" -m pytest "${marker[@]}" "$@"
