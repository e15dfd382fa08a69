#!/usr/bin/env bash
# The demo: make the demo prompts (if missing), run manifests/demo.yaml as a job on a local Ray with the built-in
# tiny model, then show where the outputs are and the per-shard throughput. Sets up .venv first.
# A second run resumes the same output and has nothing left to do; remove runs/demo to start over.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${FASTDLLM_VENV:-$root/.venv}"
cd "$root"
if ! ls data/demo/*.parquet >/dev/null 2>&1; then
  "$venv/bin/python" scripts/make_demo_data.py data/demo
fi
"$venv/bin/fastdllm" plan manifests/demo.yaml
"$venv/bin/fastdllm" run manifests/demo.yaml "$@"
echo
echo "outputs in $root/runs/demo: job.json, shards/NNNNN.parquet, stats/NNNNN.json, summary.json"
"$venv/bin/fastdllm" status runs/demo --shards
"$venv/bin/python" - <<'PY'
import pyarrow.parquet as pq
from fastdllm.tiny_kit import answer_for, score
rows = pq.read_table("runs/demo/shards/00000.parquet").to_pylist()
for r in rows[:6]:
    mark = "ok" if score([r["prompt"]], [r["completion"]])[0] else f"expected {answer_for(r['prompt'])!r}"
    print(f"  {r['id']}: {r['prompt']!r} -> {r['completion']!r} ({r['finish_reason']}, nfe {r['nfe']}) {mark}")
right = sum(score([r["prompt"] for r in rows], [r["completion"] for r in rows]))
print(f"  shard 00000: {right}/{len(rows)} completions are the right answer")
PY
