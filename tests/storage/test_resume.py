"""A stage killed half-way: no manifest, finished parts kept, stray files ignored, resumable.
Runs on local disk, memory:// and a real S3 API (moto server)."""
import factories as F
import pytest

from storage import shards
from storage.errors import ManifestError
from storage.fs import write_bytes_atomic
from storage.manifest import MANIFEST_NAME, remove_tmp_files, stage_status, stray_files
from storage.shards import commit_parts, finished_parts, read_stage, write_part

ROWS = 3


class Killed(Exception):
    pass


def _run_stage(fs, d, table, prov, kill_at=None):
    """The shape of a stage task: skip committed parts, write the others, commit the manifest last."""
    done = finished_parts(fs, d, expect={"config_hash": prov["config_hash"]})
    written = []
    for k, start in enumerate(range(0, table.num_rows, ROWS)):
        if k in done:
            continue
        if k == kill_at:
            raise Killed(f"killed while writing part {k}")
        done[k] = write_part(fs, d, k, table.slice(start, ROWS), prov)
        written.append(k)
    commit_parts(fs, d, "scored", done, prov["config_hash"], inputs={"rollout": "x"})
    return written


def test_killed_stage_resumes(layout, monkeypatch):
    fs = layout.fs
    d = layout.stage_dir(0, "scored")
    table, prov = F.make_scored_table(n_prompts=6, group_size=2)  # 12 rows -> 4 parts

    # killed between parts: two parts committed, no manifest
    with pytest.raises(Killed):
        _run_stage(fs, d, table, prov, kill_at=2)
    assert stage_status(fs, d) == "partial"
    assert not fs.exists(f"{d}/{MANIFEST_NAME}")
    with pytest.raises(ManifestError, match="not done"):
        read_stage(fs, d)
    assert sorted(finished_parts(fs, d)) == [0, 1]

    # killed inside the writer of part 2 (while its bytes are being committed): a leftover
    # temporary and a torn file under the final name (as a non-atomic writer would leave)
    def dying_write(*a, **k):
        raise Killed("killed inside the writer")

    monkeypatch.setattr(shards, "write_file_part", dying_write)
    with pytest.raises(Killed):
        _run_stage(fs, d, table, prov)
    monkeypatch.undo()
    good = fs.cat_file(f"{d}/part-00000.parquet")
    write_bytes_atomic(fs, f"{d}/.part-00002.parquet.1234.tmp", good[:100])
    write_bytes_atomic(fs, f"{d}/part-00003.parquet", good[: len(good) // 2])
    assert stray_files(fs, d) == [".part-00002.parquet.1234.tmp"]
    assert sorted(finished_parts(fs, d)) == [0, 1]  # the torn part is not trusted

    # a part written for another config is not reused either
    other = {**prov, "config_hash": "other"}
    write_part(fs, d, 2, table.slice(6, ROWS), other)
    assert sorted(finished_parts(fs, d, expect={"config_hash": prov["config_hash"]})) == [0, 1]

    # resume: only the missing parts are written, then the manifest
    assert _run_stage(fs, d, table, prov) == [2, 3]
    assert stage_status(fs, d) == "done"
    assert read_stage(fs, d).to_pylist() == table.to_pylist()
    assert stray_files(fs, d) == [".part-00002.parquet.1234.tmp"]  # reported, never read
    assert remove_tmp_files(fs, d) == [".part-00002.parquet.1234.tmp"]
    assert stray_files(fs, d) == []
    assert _run_stage(fs, d, table, prov) == []  # a done stage has nothing left to do
