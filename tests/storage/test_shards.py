"""Parquet shards: builders, per-row validation, round trips (local, memory://, S3), readers, bad files."""
import json

import factories as F
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.errors import ManifestError, ShardError
from storage.fs import write_bytes_atomic
from storage.layout import RunLayout
from storage.manifest import MANIFEST_NAME, read_manifest
from storage.shards import (PROVENANCE_KEY, SCHEMA_VERSION, build_provenance, iter_token_batches,
                            list_array, load_hf_dataset, pack, read_provenance, read_stage, rollout_schema, rollout_table, scored_table,
                            scored_schema, validate_table, write_part)


# ---- builders --------------------------------------------------------------------------------------

def test_list_array_and_pack_match_python_lists():
    rows = [[5, 1], [], [7, 8, 9], None]
    flat, offsets = pack(rows, np.int32)
    assert flat.tolist() == [5, 1, 7, 8, 9] and offsets.tolist() == [0, 2, 2, 5, 5]
    arr = list_array(flat, offsets, "int32", mask=np.array([False, False, False, True]))
    assert arr.type == pa.list_(pa.int32())
    assert arr.to_pylist() == [[5, 1], [], [7, 8, 9], None]


@pytest.mark.parametrize("flat,offsets,msg", [
    (np.arange(3), np.array([1, 3]), "start at 0"),
    (np.arange(3), np.array([0, 2]), "end at len"),
    (np.arange(3), np.array([0, 2, 1, 3]), "never decrease"),
    (np.array([2**40]), np.array([0, 1]), "do not fit int32"),
])
def test_list_array_refuses_bad_offsets(flat, offsets, msg):
    with pytest.raises(ShardError, match=msg):
        list_array(flat, offsets, pa.int32())


def test_schemas():
    names = scored_schema(["math", "code"], with_ref=True).names
    assert names[:10] == rollout_schema().names
    assert names[10:] == ["teacher_logp.math", "teacher_logp.code", "teacher_logp", "ref_logp"]
    assert rollout_schema().field("prompt_ids").type == pa.list_(pa.int32())
    assert rollout_schema().field("behaviour_logp").type == pa.list_(pa.float32())
    with pytest.raises(ShardError, match="teacher name 'a.b'"):
        scored_schema(["a.b"])


# ---- validation ------------------------------------------------------------------------------------

@pytest.fixture
def scored():
    return F.make_scored_table(n_prompts=2, group_size=2, teachers=("math", "code"), vocab_size=32)


def _replace(table, name, values):
    return table.set_column(table.schema.get_field_index(name), pa.field(name, values.type), values)


def test_valid_table_passes(scored):
    table, prov = scored
    validate_table(table, "scored", ["math", "code"], vocab_size=32)
    validate_table(F.make_scored_table(scored=False)[0], "rollout", vocab_size=32)


def test_length_mismatch_names_column_and_sample(scored):
    table, _ = scored
    col = table.column("teacher_logp.code").to_pylist()
    col[1] = col[1] + [-1.0]
    bad = _replace(table, "teacher_logp.code", pa.array(col, pa.list_(pa.float32())))
    sid = table.column("sample_id")[1].as_py()
    with pytest.raises(ShardError, match=rf"'teacher_logp.code' has {len(col[1])} values for sample_id '{sid}' \(row 1\) "
                                         rf"but response_ids has {len(col[1]) - 1} tokens"):
        validate_table(bad, "scored")


@pytest.mark.parametrize("value,column", [(float("nan"), "behaviour_logp"), (float("inf"), "teacher_logp"),
                                          (0.7, "teacher_logp.math")])
def test_values_must_be_finite_logprobs(scored, value, column):
    table, _ = scored
    col = table.column(column).to_pylist()
    col[2][-1] = value
    bad = _replace(table, column, pa.array(col, pa.list_(pa.float32())))
    sid = table.column("sample_id")[2].as_py()
    with pytest.raises(ShardError, match=rf"'{column}' has value .* at response token {len(col[2]) - 1} of "
                                         rf"sample_id '{sid}'"):
        validate_table(bad, "scored")


def test_token_ids_in_vocab(scored):
    table, _ = scored
    col = table.column("response_ids").to_pylist()
    col[3][0] = 40
    bad = _replace(table, "response_ids", pa.array(col, pa.list_(pa.int32())))
    with pytest.raises(ShardError, match=r"'response_ids' has token id 40 in sample_id .*\[0, 32\)"):
        validate_table(bad, "scored", vocab_size=32)
    validate_table(bad, "scored")  # without a vocabulary size only negatives are refused


def test_schema_errors(scored):
    table, _ = scored
    with pytest.raises(ShardError, match="column 'reward' .* is missing"):
        validate_table(table.drop_columns(["reward"]), "scored")
    with pytest.raises(ShardError, match="column 'group_index' has type int64, expected int32"):
        validate_table(_replace(table, "group_index", pa.array(np.arange(4), pa.int64())), "scored")
    with pytest.raises(ShardError, match=r"teacher columns \['math', 'code'\] do not match .*\['math'\]"):
        validate_table(table, "scored", teacher_names=["math"])
    with pytest.raises(ShardError, match="rollout shard has teacher columns"):
        validate_table(table, "rollout")


def test_row_errors(scored):
    table, _ = scored
    sid = table.column("sample_id").to_pylist()
    with pytest.raises(ShardError, match=rf"sample_id repeated: \['{sid[0]}'\]"):
        validate_table(_replace(table, "sample_id", pa.array([sid[0]] + sid[:-1])), "scored")
    with pytest.raises(ShardError, match=rf"'finish_reason' is null for sample_id '{sid[1]}' \(row 1\)"):
        validate_table(_replace(table, "finish_reason", pa.array(["stop", None, "stop", "stop"])), "scored")
    with pytest.raises(ShardError, match=rf"'reward' is nan for sample_id '{sid[2]}'.*use null"):
        validate_table(_replace(table, "reward", pa.array([1, None, np.nan, 0], pa.float32())), "scored")


def test_null_behaviour_is_allowed(scored):
    table, _ = scored
    col = table.column("behaviour_logp").to_pylist()
    col[0] = None
    validate_table(_replace(table, "behaviour_logp", pa.array(col, pa.list_(pa.float32()))), "scored")


# ---- round trips on every backend --------------------------------------------------------------------

def test_round_trip(layout):
    fs = layout.fs
    d = layout.stage_dir(3, "scored")
    table, prov = F.make_scored_table(n_prompts=3, group_size=3, with_ref=True, iteration=3)
    m = F.write_stage(fs, d, table, prov, rows_per_part=4, inputs={"rollout": "iter-000003/rollout"})
    assert [p.name for p in m.parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [p.rows for p in m.parts] == [4, 4, 1]
    back = read_stage(fs, d)
    assert back.schema.remove_metadata() == table.schema.remove_metadata()
    assert back.to_pylist() == table.to_pylist()
    got = read_provenance(fs, d)
    assert got == {**prov, "schema_version": SCHEMA_VERSION}
    assert got["teachers"][1] == {"name": "code", "path": "/models/code", "weight": 0.5}
    assert json.loads(back.schema.metadata[PROVENANCE_KEY]) == got
    assert read_stage(fs, d, columns=["sample_id", "reward"]).column_names == ["sample_id", "reward"]
    batches = list(iter_token_batches(fs, d, token_budget=20))
    assert pa.concat_tables(batches).to_pylist() == table.to_pylist()
    ds = load_hf_dataset(layout.url_of(d), storage_options=layout.storage_options)
    assert ds.num_rows == 9 and ds.features["prompt_ids"].feature.dtype == "int32"
    assert ds[0]["teacher_logp.math"] == pytest.approx(table.column("teacher_logp.math")[0].as_py())


def test_plain_parquet_readers_open_a_part(tmp_path):
    """Self-describing: plain pyarrow / pandas read a part without opd, provenance included."""
    lay = RunLayout(str(tmp_path / "r"))
    d = lay.stage_dir(0, "scored")
    table, prov = F.make_scored_table()
    F.write_stage(lay.fs, d, table, prov, rows_per_part=100)
    path = f"{d}/part-00000.parquet"
    t = pq.read_table(path)
    assert t.column_names == table.column_names and t.num_rows == table.num_rows
    assert json.loads(pq.read_schema(path).metadata[b"opd"])["combination"] == "mixture"
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    df = t.to_pandas()
    assert list(df["response_ids"][0]) == table.column("response_ids")[0].as_py()


def test_row_groups_sized_by_bytes(tmp_path):
    lay = RunLayout(str(tmp_path / "r"))
    table, prov = F.make_scored_table(n_prompts=10, group_size=4)
    info = write_part(lay.fs, lay.stage_dir(0, "scored"), 0, table, prov, row_group_bytes=table.nbytes // 4)
    meta = pq.ParquetFile(f"{lay.stage_dir(0, 'scored')}/{info.name}").metadata
    assert 4 <= meta.num_row_groups <= 6 and meta.num_rows == 40


def test_provenance_must_match_columns(tmp_path):
    lay = RunLayout(str(tmp_path / "r"))
    table, prov = F.make_scored_table(teachers=("math", "code"))
    bad = {**prov, "teachers": [{"name": "math"}]}
    with pytest.raises(ShardError, match=r"part-00000.parquet: teacher columns .* do not match"):
        write_part(lay.fs, lay.stage_dir(0, "scored"), 0, table, bad)
    with pytest.raises(ShardError, match="kind in"):
        write_part(lay.fs, lay.stage_dir(0, "scored"), 0, table, {"teachers": []})
    with pytest.raises(ShardError, match="provenance is not JSON"):
        write_part(lay.fs, lay.stage_dir(0, "scored"), 0, table, {**prov, "x": float("nan")})
    assert not lay.fs.exists(f"{lay.stage_dir(0, 'scored')}/part-00000.parquet")


# ---- token batches ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 9)), min_size=1, max_size=12),
       budget=st.integers(1, 30), padded=st.booleans(), per_part=st.integers(1, 5))
def test_token_batches_cover_rows_in_order_within_budget(lengths, budget, padded, per_part):
    n = len(lengths)
    table = rollout_table({
        "sample_id": [f"s{i}" for i in range(n)], "prompt_id": "p", "group_index": 0, "iteration": 0,
        "prompt_ids": [np.ones(p, np.int32) for p, _ in lengths],
        "response_ids": [np.ones(r, np.int32) for _, r in lengths],
        "behaviour_logp": [np.zeros(r, np.float32) for _, r in lengths], "finish_reason": "stop"})
    lay = RunLayout(f"memory://opd-test-batches-{abs(hash((tuple(lengths), budget, padded, per_part)))}")
    d = lay.stage_dir(0, "rollout")
    F.write_stage(lay.fs, d, table, build_provenance("rollout", iteration=0, config_hash="h"), rows_per_part=per_part)
    batches = list(iter_token_batches(lay.fs, d, budget, padded=padded))
    assert pa.concat_tables(batches).column("sample_id").to_pylist() == [f"s{i}" for i in range(n)]
    for b in batches:
        tok = [p + r for p, r in zip(*(map(len, b.column(c).to_pylist()) for c in ("prompt_ids", "response_ids")))]
        cost = len(tok) * max(tok) if padded else sum(tok)
        assert cost <= budget or len(tok) == 1
    # greedy: a batch is closed only when the next row would not fit
    for b, nxt in zip(batches, batches[1:]):
        tok = [len(x) + len(y) for x, y in zip(b.column("prompt_ids").to_pylist(), b.column("response_ids").to_pylist())]
        t0 = len(nxt.column("prompt_ids")[0].as_py()) + len(nxt.column("response_ids")[0].as_py())
        cost = (len(tok) + 1) * max(tok + [t0]) if padded else sum(tok) + t0
        assert cost > budget
    lay.fs.rm(lay.root, recursive=True)


# ---- bad files on read -----------------------------------------------------------------------------

@pytest.fixture
def done_stage(tmp_path):
    lay = RunLayout(str(tmp_path / "r"))
    d = lay.stage_dir(0, "scored")
    table, prov = F.make_scored_table(n_prompts=4)
    F.write_stage(lay.fs, d, table, prov, rows_per_part=4)
    return lay.fs, d, table, prov


def _rewrite_part(fs, d, name, data):
    """Replace a part and make the manifest agree with it (so only the content can be blamed)."""
    write_bytes_atomic(fs, f"{d}/{name}", data)
    m = read_manifest(fs, d)
    from storage.fs import sha256_hex
    parts = [p.model_copy(update={"bytes": len(data), "sha256": sha256_hex(data)}) if p.name == name else p
             for p in m.parts]
    write_bytes_atomic(fs, f"{d}/{MANIFEST_NAME}", m.model_copy(update={"parts": parts}).model_dump_json().encode())


def test_checksum_failure_is_never_a_partial_read(done_stage):
    fs, d, _, _ = done_stage
    data = bytearray(fs.cat_file(f"{d}/part-00001.parquet"))
    data[len(data) // 2] ^= 0xFF
    write_bytes_atomic(fs, f"{d}/part-00001.parquet", bytes(data))
    for read in (lambda: read_stage(fs, d), lambda: list(iter_token_batches(fs, d, 100)),
                 lambda: load_hf_dataset(d)):
        with pytest.raises(ManifestError, match="part-00001.parquet: sha256 does not match"):
            read()


def test_truncated_part(done_stage):
    fs, d, _, _ = done_stage
    data = fs.cat_file(f"{d}/part-00000.parquet")
    _rewrite_part(fs, d, "part-00000.parquet", data[: len(data) // 2])
    with pytest.raises(ShardError, match="part-00000.parquet: not a readable Parquet file"):
        read_stage(fs, d)


def test_wrong_schema_version_or_columns(done_stage):
    fs, d, table, prov = done_stage
    for meta, msg in (({**prov, "schema_version": 99}, "shard schema_version 99, this opd reads 1"),
                      ({**prov, "kind": "banana"}, "provenance kind 'banana' is not one of"),
                      (None, "no opd provenance")):
        t = table.slice(0, 4).replace_schema_metadata({PROVENANCE_KEY: json.dumps(meta).encode()} if meta else None)
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        _rewrite_part(fs, d, "part-00001.parquet", sink.getvalue().to_pybytes())
        with pytest.raises(ShardError, match=f"part-00001.parquet: {msg}"):
            read_stage(fs, d)
    t = table.slice(0, 4).drop_columns(["teacher_logp.code"]).replace_schema_metadata(
        {PROVENANCE_KEY: json.dumps({**prov, "schema_version": 1}).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    _rewrite_part(fs, d, "part-00001.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(ShardError, match=r"part-00001.parquet: teacher columns \['math'\] do not match"):
        read_stage(fs, d)
    with pytest.raises(ShardError, match=r"part-00001.parquet: teacher columns"):
        list(iter_token_batches(fs, d, 100, verify=False))


def test_unfinished_stage_is_not_read(done_stage):
    fs, d, _, _ = done_stage
    with pytest.raises(ShardError, match=r"part-00000.parquet: no column\(s\) \['nope'\]"):
        read_stage(fs, d, columns=["nope"])
    fs.rm_file(f"{d}/{MANIFEST_NAME}")
    for read in (lambda: read_stage(fs, d), lambda: list(iter_token_batches(fs, d, 100))):
        with pytest.raises(ManifestError, match="stage is partial, not done"):
            read()


def test_scored_from_a_read_rollout_part_carries_the_scored_provenance(tmp_path):
    """The scoring stage's path: read a rollout part, add teacher columns, write a scored part."""
    from storage.shards import read_part

    lay = RunLayout(str(tmp_path / "r"))
    rollout, rprov = F.make_scored_table(scored=False)
    full, sprov = F.make_scored_table()
    m = F.write_stage(lay.fs, lay.stage_dir(0, "rollout"), rollout, rprov, rows_per_part=100)
    back = read_part(lay.fs, lay.stage_dir(0, "rollout"), m.parts[0])
    assert json.loads(back.schema.metadata[PROVENANCE_KEY])["kind"] == "rollout"
    teachers = {n: full.column(f"teacher_logp.{n}") for n in ("math", "code")}
    info = write_part(lay.fs, lay.stage_dir(0, "scored"), 0, scored_table(back, teachers, full.column("teacher_logp")),
                      sprov)
    got = read_provenance(lay.fs, f"{lay.stage_dir(0, 'scored')}/{info.name}")
    assert got["kind"] == "scored" and got["teachers"] == sprov["teachers"]
    assert pq.read_table(f"{lay.stage_dir(0, 'scored')}/{info.name}").to_pylist() == full.to_pylist()


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_corrupt_bytes_with_a_matching_manifest_still_fail(done_stage, where):
    """Even when the manifest agrees with a damaged file, pages or footer fail loudly, never silently."""
    fs, d, table, _ = done_stage
    data = bytearray(fs.cat_file(f"{d}/part-00000.parquet"))
    data[int(len(data) * where)] ^= 0x55
    _rewrite_part(fs, d, "part-00000.parquet", bytes(data))
    try:
        back = read_stage(fs, d)
    except ShardError as err:
        assert "part-00000.parquet" in str(err)
    else:  # a flipped bit in page-header padding or metadata can be harmless; then the data is intact
        assert back.to_pylist() == table.to_pylist()


# ---- top-k columns (scoring.top_k) ----------------------------------------------------------------

def test_topk_columns_round_trip_and_bad_values_are_named(tmp_path):
    import fsspec
    fs = fsspec.filesystem("file")
    table, prov = F.make_scored_table(teachers=("math", "code"), top_k=4, vocab_size=32)
    assert prov["top_k"] == 4
    F.write_stage(fs, str(tmp_path / "s"), table, prov)
    back = read_stage(fs, str(tmp_path / "s"))
    assert back.column("teacher_topk_ids.math").type == pa.list_(pa.int32())
    assert back.column("teacher_topk_logp.code").to_pylist() == table.column("teacher_topk_logp.code").to_pylist()

    def broken(col, fn):
        rows = table.column(col).to_pylist()
        rows[1] = fn(list(rows[1]))
        i = table.column_names.index(col)
        return table.set_column(i, table.schema.field(i), pa.array(rows, table.schema.field(i).type))
    cases = [("teacher_topk_logp.math", lambda r: r[::-1], "not sorted largest first"),
             ("teacher_topk_logp.math", lambda r: [float("nan")] + r[1:], "not finite"),
             ("teacher_topk_logp.code", lambda r: r[:-1], "expected top_k x response tokens"),
             ("teacher_topk_ids.math", lambda r: [40] + r[1:], "outside the vocabulary"),
             ("teacher_topk_ids.math", lambda r: [r[1]] + r[1:], "a token id twice"),
             ("teacher_topk_logp.math", lambda r: [-1e-4] * len(r), "summing above 1")]
    for col, fn, msg in cases:
        with pytest.raises(ShardError, match=f"{msg}.*scoring.top_k|{msg}"):
            write_part(fs, str(tmp_path / "bad"), 0, broken(col, fn), prov, vocab_size=32)
    with pytest.raises(ShardError, match="no top_k in the provenance"):
        write_part(fs, str(tmp_path / "bad"), 0, table, {**prov, "top_k": 0})
    plain = table.drop_columns([c for c in table.column_names if "topk" in c])
    with pytest.raises(ShardError, match="provenance top_k=4 but top-k columns"):
        write_part(fs, str(tmp_path / "bad"), 0, plain, prov)
    with pytest.raises(ShardError, match="teacher_topk_logp.code"):  # a pair is whole
        write_part(fs, str(tmp_path / "bad"), 0, table.drop_columns(["teacher_topk_logp.code"]), prov)


def test_topk_columns_are_null_exactly_where_the_teacher_did_not_score(tmp_path):
    import fsspec
    fs = fsspec.filesystem("file")
    table, prov = F.make_scored_table(teachers=("math", "code"), top_k=3, vocab_size=32)

    def null_row(t, col, r):
        rows = t.column(col).to_pylist()
        rows[r] = None
        i = t.column_names.index(col)
        return t.set_column(i, t.schema.field(i), pa.array(rows, t.schema.field(i).type))
    routed = table
    for col in ("teacher_logp.code", "teacher_topk_ids.code", "teacher_topk_logp.code"):
        routed = null_row(routed, col, 0)
    write_part(fs, str(tmp_path / "ok"), 0, routed, prov, vocab_size=32)  # routed scoring: fine
    with pytest.raises(ShardError, match="null where teacher_logp.math is"):
        write_part(fs, str(tmp_path / "bad"), 0, null_row(table, "teacher_topk_ids.math", 0), prov, vocab_size=32)
