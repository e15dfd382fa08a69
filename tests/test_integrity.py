"""Integrity under faults (issue 20): a half-rewritten input is a changed input, never a transient error; the
lease through a store outage (moto's S3 server behind a TCP proxy that is stopped and started); input/output
overlap; signals at every moment of a run; temporary files; --force beside the user's files; credentials in URIs;
bad manifests, job.json files and markers in one line."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastdllm.workers import Shard, ShardDataError
from fastdllm.workers import inputs


def _parquet(path, n: int, start: int = 0) -> None:
    pq.write_table(pa.table({"prompt": [f"{i}+1=" for i in range(start, start + n)],
                             "id": pa.array(range(start, start + n), pa.int64())}), path)


def _pinned_shard(path) -> Shard:
    pf = pq.ParquetFile(path)
    info = inputs.inspect_parquet(str(path), path.name, "id", None)
    return Shard(index=0, file=str(path), relpath=path.name, start=0, stop=pf.metadata.num_rows,
                 file_size=info.size, file_rows=info.rows, footer_sha256=info.digest)


def test_a_file_rewritten_while_it_is_read_is_a_changed_input_not_a_storage_error(tmp_path, monkeypatch):
    """The pin check passes, then a writer rewrites the file under the reader (what the flaky
    test_input_changed_mid_run_fails_its_shards_as_data_errors hit): arrow fails with an error that looks like a
    storage error; re-checking the pin classifies it as a changed input (a data error, never retried)."""
    path = tmp_path / "part-0.parquet"
    _parquet(path, 24)
    shard = _pinned_shard(path)
    real_check = inputs._check_pinned

    def writer_gets_in_after_the_check(s, f):
        real_check(s, f)
        _parquet(tmp_path / "new.parquet", 5, start=100)
        with open(path, "wb") as w:  # truncated and rewritten in place, under the open reader
            w.write((tmp_path / "new.parquet").read_bytes())

    monkeypatch.setattr(inputs, "_check_pinned", writer_gets_in_after_the_check)
    with pytest.raises(ShardDataError, match=r"changed since the job was planned \(\d+ -> \d+ bytes"):
        inputs.read_shard_rows(shard, ["prompt", "id"])  # the read itself "succeeds", with the new file's rows
    monkeypatch.setattr(inputs, "_check_pinned", real_check)
    _parquet(path, 24)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, *a, **k: _parquet(path, 3) or
                        (_ for _ in ()).throw(OSError("Column cannot have more than one dictionary.")))
    with pytest.raises(ShardDataError, match="changed since the job was planned"):  # the error of the flaky test
        inputs.read_shard_rows(shard, ["prompt", "id"])


def test_a_read_error_on_the_planned_file_stays_a_storage_error(tmp_path, monkeypatch):
    path = tmp_path / "part-0.parquet"
    _parquet(path, 24)
    shard = _pinned_shard(path)

    def flaky_store(*a, **k):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(inputs, "_read_shard_rows", flaky_store)
    with pytest.raises(OSError, match="connection reset"):  # the file still matches its pin: the driver retries
        inputs.read_shard_rows(shard, ["prompt", "id"])
    monkeypatch.undo()
    path.unlink()
    with pytest.raises(ShardDataError, match="it no longer exists"):
        inputs.read_shard_rows(shard, ["prompt", "id"])
