"""The output layout on its own (no Ray): atomic commits on a full disk, tolerant markers, verification of
committed shards, the lease, and a worker's data errors (changed input, undecodable values)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from fastdllm.workers import JobOutput, JobSummary, Lease, LeaseHeld, RunStats, Shard, ShardDataError, ShardRecord, ShardStats
from fastdllm.workers.output import LEASE, DataFile, MissingShard
from fastdllm.workers.shard import WorkerSettings
from fastdllm.workers.inputs import read_shard_rows
from fastdllm.workers.shard import decode_text
from fastdllm.workers.storage import parquet_footer


class _FullFile(LocalFileOpener):
    def write(self, data):
        left = type(self.fs).space_left
        if left is not None:
            if len(data) > left:
                self.f.write(data[:left])  # a real disk fills up part-way through a write
                type(self.fs).space_left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
            type(self.fs).space_left = left - len(data)
        return self.f.write(data)


class FullDiskFS(LocalFileSystem):
    """A local filesystem (protocol fulldisk://) whose disk fills up after `space_left` more bytes."""

    protocol = "fulldisk"
    space_left: int | None = None

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("fulldisk://") :] if path.startswith("fulldisk://") else path)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return _FullFile(self._strip_protocol(path), mode, fs=self, **kwargs)


fsspec.register_implementation("fulldisk", FullDiskFS, clobber=True)


def parquet_bytes(n: int, first: int = 0) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(first, first + n))}), buf)
    return buf.getvalue()


def commit(out: JobOutput, shard: int, rows: int = 3) -> ShardRecord:
    return out.commit(shard, parquet_bytes(rows, 10 * shard), rows,
                      lambda f: ShardRecord(shard=shard, stats=ShardStats(shards=1, rows=rows), file=f))


def files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_full_disk_never_leaves_a_partial_file(tmp_path, caplog):
    out = JobOutput(f"fulldisk://{tmp_path}/out")
    commit(out, 0)
    out.write_summary(JobSummary(shards=2, committed=1, missing=[MissingShard(1, "not_run", "not run")],
                                 totals=ShardStats(), run=RunStats()))
    before = {p: (tmp_path / "out" / p).read_bytes() for p in files(tmp_path / "out")}
    data = parquet_bytes(3, 10)
    try:
        FullDiskFS.space_left = len(data) // 2  # the data file does not fit
        with pytest.raises(OSError) as e:
            commit(out, 1)
        assert e.value.errno == errno.ENOSPC
        FullDiskFS.space_left = len(data) + 10  # the data file fits, its marker does not
        with pytest.raises(OSError):
            commit(out, 1)
        FullDiskFS.space_left = 5
        with pytest.raises(OSError):
            out.write_summary(JobSummary(shards=2, committed=2, missing=[], totals=ShardStats(), run=RunStats()))
    finally:
        FullDiskFS.space_left = None
    after = files(tmp_path / "out")
    assert after == sorted([*before, "shards/00001.parquet"])  # no temporary, no marker, no partial file
    assert all((tmp_path / "out" / p).read_bytes() == b for p, b in before.items())  # old summary intact
    assert set(out.scan({0: 3, 1: 3}).committed) == {0}
    assert out.read_summary().committed == 1
    commit(out, 1)  # space again: the shard commits
    assert set(out.scan({0: 3, 1: 3}).committed) == {0, 1}


def test_unparseable_markers_and_summary_mean_not_committed(tmp_path, caplog):
    out = JobOutput(str(tmp_path / "out"))
    for k in range(3):
        commit(out, k)
    (tmp_path / "out" / "stats" / "00001.json").write_bytes(b"")  # what a full disk left before atomic writes
    (tmp_path / "out" / "stats" / "00002.json").write_text('{"shard": 2, "rows": 3}')  # no data file record
    (tmp_path / "out" / "summary.json").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        scan = out.scan({0: 3, 1: 3, 2: 3})
        assert out.read_summary() is None
    assert set(scan.committed) == {0} and set(scan.damaged) == {1, 2}
    assert "stats/00001.json: not valid JSON (0 bytes" in scan.damaged[1]
    assert "records no data file" in scan.damaged[2]
    assert "stats/00001.json" in caplog.text and "summary.json" in caplog.text


def test_scan_verifies_data_files_and_ignores_shards_outside_the_plan(tmp_path, caplog):
    out = JobOutput(str(tmp_path / "out"))
    for k in range(5):
        commit(out, k)
    shards = tmp_path / "out" / "shards"
    data = (shards / "00000.parquet").read_bytes()
    (shards / "00000.parquet").write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray((shards / "00001.parquet").read_bytes())
    flipped[len(flipped) // 3] ^= 0x01
    (shards / "00001.parquet").write_bytes(bytes(flipped))  # one bit flipped, same size
    (shards / "00002.parquet").unlink()  # deleted
    planned = {0: 3, 1: 3, 2: 3, 3: 3, 4: 5}  # shard 4's marker records 3 rows: not what the plan says
    with caplog.at_level(logging.WARNING):
        quick = out.scan(planned, verify=False)
        full = out.scan(planned)
        out.scan({k: 3 for k in range(4)})
    assert set(quick.committed) == {1, 3}  # sizes only: the flipped bit goes unseen
    assert set(full.committed) == {3}
    assert full.damaged[0] == f"shards/00000.parquet is {len(data) // 2} bytes, its marker records {len(data)}"
    assert "checksum" in full.damaged[1] and "is missing" in full.damaged[2] and "plan has 5" in full.damaged[4]
    assert "ignoring" in caplog.text and "stats/00004.json: not a shard of this job's plan (4 shards)" in caplog.text
    flipped = bytearray((shards / "00003.parquet").read_bytes())
    flipped[10] ^= 0x01
    (shards / "00003.parquet").write_bytes(bytes(flipped))
    assert set(out.scan(planned, known=full.committed).committed) == {3}  # verified before: checked by size
    assert set(out.scan(planned).committed) == set()


def lease_file(out: JobOutput, holder: str, expires: datetime) -> None:
    out.write_json(LEASE, {"holder": holder, "run_id": "f" * 32, "expires_at": expires.isoformat()})


def test_lease_one_writer_expiry_and_takeover(tmp_path, caplog):
    uri = str(tmp_path / "out")
    a, b = Lease(JobOutput(uri), ttl_s=0.4), Lease(JobOutput(uri), ttl_s=30)
    a.acquire()
    try:
        with pytest.raises(LeaseHeld) as e:
            b.acquire()
        assert f"lease held by {a.me.holder} (run {a.me.run_id[:8]}) until 20" in str(e.value)
        first = JobOutput(uri).read_lease().expires_at
        time.sleep(0.6)  # past the first expiry: the holder renewed it
        assert JobOutput(uri).read_lease().expires_at > first and a.lost is None
    finally:
        a.release()
    assert not (tmp_path / "out" / LEASE).exists()

    out = JobOutput(uri)
    lease_file(out, "some-other-host:4242", datetime.now(timezone.utc) + timedelta(minutes=5))
    with pytest.raises(LeaseHeld, match="some-other-host:4242"):
        b.acquire()  # a live holder elsewhere: refused, never taken
    lease_file(out, "some-other-host:4242", datetime.now(timezone.utc) - timedelta(seconds=1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with caplog.at_level(logging.WARNING):
        b.acquire()  # expired
        b.release()
        lease_file(out, f"{a.me.holder.rsplit(':', 1)[0]}:{dead.stdout.strip()}", datetime.now(timezone.utc)
                   + timedelta(minutes=5))
        b.acquire()  # its holder's process is gone
    try:
        assert "from some-other-host:4242" in caplog.text and "(expired)" in caplog.text
        assert "(its process is gone)" in caplog.text
        lease_file(out, "thief:1", datetime.now(timezone.utc) + timedelta(minutes=5))
    finally:
        b.release()
    assert JobOutput(uri).read_lease().holder == "thief:1"  # not ours any more: release leaves it


def test_lost_lease_is_noticed_by_the_holder(tmp_path):
    uri = str(tmp_path / "out")
    a = Lease(JobOutput(uri), ttl_s=0.2)
    a.acquire()
    try:
        lease_file(JobOutput(uri), "thief:1", datetime.now(timezone.utc) + timedelta(minutes=5))
        deadline = time.time() + 5
        while a.lost is None and time.time() < deadline:
            time.sleep(0.02)
        assert a.lost and "taken over by thief:1" in a.lost
    finally:
        a.release()


def write_prompts(path, prompts, ids=None) -> Shard:
    cols = {"prompt": prompts} if ids is None else {"prompt": prompts, "id": ids}
    pq.write_table(pa.table(cols), path)
    with open(path, "rb") as f:  # pinned as the planner pins it
        footer = hashlib.sha256(parquet_footer(f, path.stat().st_size)).hexdigest()
    n = pq.ParquetFile(path).metadata.num_rows
    return Shard(index=0, file=str(path), relpath=path.name, start=0, stop=n, file_size=path.stat().st_size,
                 file_rows=n, footer_sha256=footer)


def test_a_changed_input_file_is_a_data_error(tmp_path):
    path = tmp_path / "p.parquet"
    shard = write_prompts(path, [f"{i}+1=" for i in range(10)])
    assert read_shard_rows(shard, ["prompt"]).num_rows == 10
    pq.write_table(pa.table({"prompt": [f"{i}+1=" for i in range(4)]}), path)  # rewritten with fewer rows
    with pytest.raises(ShardDataError, match=r"changed since the job was planned \(\d+ -> \d+ bytes, 10 -> 4 rows\)"
                                             r".*fix the input"):
        read_shard_rows(shard, ["prompt"])
    pq.write_table(pa.table({"prompt": [f"{i}+2=" for i in range(10)]}), path)  # same size and rows, new values
    assert path.stat().st_size == shard.file_size
    with pytest.raises(ShardDataError, match="footer differs"):
        read_shard_rows(shard, ["prompt"])


def invalid_utf8(values: list[bytes]) -> pa.Array:
    b = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(b), b.buffers())  # a string column arrow never validated


def test_undecodable_values_are_row_errors_or_data_errors(tmp_path):
    values, bad = decode_text(pa.chunked_array([invalid_utf8([b"ok", b"\xff\xfe", None, "é".encode()])]))
    assert values == ["ok", None, None, "é"] and bad == {1: "not valid UTF-8 (byte 0xff at offset 0)"}
    values, bad = decode_text(pa.chunked_array([pa.array([b"bin", b"\xc3"], pa.binary())]))
    assert values == ["bin", None] and list(bad) == [1]
    assert decode_text(pa.chunked_array([pa.array([1, 2])])) == ([1, 2], {})


def test_worker_names_an_undecodable_row_and_fails_a_changed_file(tmp_path, worker, monkeypatch):
    monkeypatch.setattr(worker, "out", JobOutput(str(tmp_path / "out")))
    shard = write_prompts(tmp_path / "u.parquet", invalid_utf8([b"1+1=", b"2+\xff=", b"3+3="]))
    rec = worker.run_shard(shard)
    rows = pq.read_table(f"{worker.out.root}/shards/00000.parquet").to_pylist()
    assert [r["finish_reason"] != "error" for r in rows] == [True, False, True]
    assert rows[1]["error"] == "prompt is not valid UTF-8 (byte 0xff at offset 2) (u.parquet row 1)"
    assert rec.stats.rows == 3 and rec.stats.error_rows == 1

    shard = write_prompts(tmp_path / "v.parquet", ["1+1=", "2+2="], ids=invalid_utf8([b"a", b"\x80"]))
    spec = worker.s
    monkeypatch.setattr(worker, "s", WorkerSettings(spec, id_column="id"))
    with pytest.raises(ShardDataError, match=r"v.parquet row 1: id column 'id' is not valid UTF-8"):
        worker.run_shard(dataclasses.replace(shard, index=1))
    monkeypatch.setattr(worker, "s", spec)
    shard = write_prompts(tmp_path / "w.parquet", ["1+1=", "2+2="])
    pq.write_table(pa.table({"prompt": ["1+1="]}), tmp_path / "w.parquet")
    with pytest.raises(ShardDataError, match="changed since the job was planned"):
        worker.run_shard(dataclasses.replace(shard, index=2))
    assert set(worker.out.scan({0: 3, 1: 2, 2: 2}).committed) == {0}


def test_records_round_trip():
    rec = ShardRecord(shard=3, stats=ShardStats(shards=1, rows=4, generated_tokens=9, wall_seconds=1.0),
                      file=DataFile("shards/00003.parquet", 10, 4, "0000abcd"), worker="h:1", attempt=1)
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["shard"] == 3 and d["rows"] == 4 and d["tokens_per_second"] == 9.0 and d["file"]["crc32"] == "0000abcd"
    assert ShardRecord.from_dict(d) == rec
    s = JobSummary(shards=2, committed=1, missing=[MissingShard(1, "data", "x")], totals=rec.stats,
                   run=RunStats(1, 9, 3.0))
    assert JobSummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s and not s.complete
