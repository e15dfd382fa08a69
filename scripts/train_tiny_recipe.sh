#!/usr/bin/env bash
# The exact commands that made the shipped tiny model (fastdllm/tiny), as three stages of scripts/train_tiny.py.
# Each stage is a fixed function of its seed and of the stage before it, on one CPU thread (about 5 hours in all on
# the project's shared 2-core machine: 83 + 127 + 90 minutes). A stage whose model exists is skipped, and a stage
# that was stopped resumes from its state. Sets up .venv first.
#   scripts/train_tiny_recipe.sh [RUN_DIR (default runs/tiny_recipe)] [OUT (default: RUN_DIR/model)]
# Pass OUT=fastdllm/tiny to replace the shipped model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${FASTDLLM_VENV:-$root/.venv}"
cd "$root"
run="${1:-runs/tiny_recipe}"
out="${2:-$run/model}"
train() {  # train STAGE ARGS...: run (or resume) one stage into $run/STAGE
  local stage="$1"; shift
  if [ -f "$run/$stage/model/model.safetensors" ]; then echo "$stage: done"; return; fi
  local args=("$@")
  if [ -f "$run/$stage/state.pt" ]; then  # resume: the state restores the weights (drop --init-from) and settings
    args=()
    while [ $# -gt 0 ]; do
      if [ "$1" = --init-from ]; then shift 2; else args+=("$1"); shift; fi
    done
    args+=(--resume "$run/$stage/state.pt")
  fi
  "$venv/bin/python" scripts/train_tiny.py "${args[@]}" --threads 1 --state-dir "$run/$stage" --out "$run/$stage/model"
}
# 1. from scratch: mostly 4-digit operands (30% of additions draw a uniform digit count)
train s1 --steps 11600 --decay-steps 1500 --batch-size 64 --lr 2e-3 --warmup 200 --min-lr-ratio 0.1 --eval-every 500
# 2. longer, with half the additions drawing a uniform digit count
train s2 --init-from "$run/s1/model" --steps 14000 --decay-steps 3000 --batch-size 64 --lr 1e-3 --warmup 200 \
  --short-frac 0.5 --eval-every 1000
# 3. every addition draws a uniform digit count (short operands), fewer sorting examples
train s3 --init-from "$run/s2/model" --steps 12000 --decay-steps 3000 --batch-size 64 --lr 1e-3 --warmup 200 \
  --short-frac 1.0 --sort-frac 0.25 --eval-every 500 --eval-n 200
if [ "$out" != "$run/s3/model" ]; then mkdir -p "$out" && cp "$run"/s3/model/* "$out"/; fi
echo "tiny model written to $out"
