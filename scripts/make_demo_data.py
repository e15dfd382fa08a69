"""Write the demo prompts: Parquet files of the tiny model's tasks ("{a}+{b}=" and "sort:{digits}="), with an
`id` column; or with --chat, JSON Lines rows of a conversation (`messages`), the reference `answer` and the `task`
(for manifests/synthetic.yaml). Deterministic (fixed seed), so every clone makes the same files.

    python scripts/make_demo_data.py [OUT_DIR] [--rows N] [--files K] [--chat]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fastdllm.tiny_kit import answer_for, problems


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    """Alternating addition and sorting prompts, drawn as the tiny model's evaluation draws them."""
    adds, sorts = problems("addition", (n + 1) // 2, seed), problems("sorting", n // 2, seed)
    return [p.prompt for pair in zip(adds, sorts + [None]) for p in pair if p is not None][:n]


def _parts(out_dir, rows: int, files: int, seed: int, ext: str):
    """(path, ids, prompts) of each of `files` parts of the demo prompts, in order; creates out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts(rows, seed)
    per = -(-rows // files)
    for k in range(files):
        chunk = prompts[k * per : (k + 1) * per]
        yield out / f"part-{k:03d}.{ext}", list(range(k * per, k * per + len(chunk))), chunk


def write_demo_data(out_dir, rows: int = 96, files: int = 2, seed: int = 0) -> list[Path]:
    paths = []
    for path, ids, chunk in _parts(out_dir, rows, files, seed, "parquet"):
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": chunk}), path)
        paths.append(path)
    return paths


def write_chat_data(out_dir, rows: int = 96, files: int = 2, seed: int = 0) -> list[Path]:
    """The demo prompts as chat rows (JSONL): id, messages (one user turn), answer, task."""
    paths = []
    for path, ids, chunk in _parts(out_dir, rows, files, seed, "jsonl"):
        with open(path, "w") as f:
            for i, p in zip(ids, chunk):
                row = {"id": i, "messages": [{"role": "user", "content": p}], "answer": answer_for(p),
                       "task": "sorting" if p.startswith("sort:") else "addition"}
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="data/demo")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--chat", action="store_true", help="JSONL chat rows (messages, answer, task) instead")
    args = ap.parse_args()
    write = write_chat_data if args.chat else write_demo_data
    for p in write(args.out_dir, args.rows, args.files):
        print(p)
