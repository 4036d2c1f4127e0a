"""Run layout paths, path validation, and atomic small-file helpers on local, memory:// and S3."""
import os

import pytest

from storage.errors import LayoutError, OpdError
from storage.fs import write_bytes_atomic
from storage.layout import (STAGES, RunLayout, append_jsonl, read_json, read_jsonl, validate_run_name,
                            write_json_atomic, write_text_atomic)


def test_paths(tmp_path):
    lay = RunLayout(str(tmp_path / "r"))
    root = str(tmp_path / "r")
    assert STAGES == ("rollout", "scored", "train", "eval")
    assert lay.root == root
    assert lay.run_yaml == f"{root}/run.yaml"
    assert lay.metrics_jsonl == f"{root}/metrics.jsonl"
    assert lay.iteration_dir(3) == f"{root}/iter-000003"
    assert lay.stage_dir(12, "scored") == f"{root}/iter-000012/scored"
    assert lay.offline_dir("train") == f"{root}/offline/train"
    assert lay.checkpoint_dir(4) == f"{root}/checkpoints/iter-000004"
    assert lay.join("a", "b/c") == f"{root}/a/b/c"


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "/etc", "a//b", "./a", "s3://b/k", "a\\b", ""])
def test_join_refuses_escapes(tmp_path, part):
    with pytest.raises(LayoutError, match="not allowed"):
        RunLayout(str(tmp_path)).join(part)


@pytest.mark.parametrize("bad", [lambda l: l.stage_dir(0, "train2"), lambda l: l.offline_dir("eval"),
                                 lambda l: l.iteration_dir(-1), lambda l: l.iteration_dir(1_000_000),
                                 lambda l: l.checkpoint_dir("3")])
def test_bad_stage_or_iteration(tmp_path, bad):
    with pytest.raises(LayoutError):
        bad(RunLayout(str(tmp_path)))


def test_root_must_not_be_filesystem_root():
    with pytest.raises(LayoutError, match="filesystem root"):
        RunLayout("/")


@pytest.mark.parametrize("name", ["demo", "toy-rkl_01", "a.b"])
def test_run_names_ok(name):
    assert validate_run_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a/b", "-x", ".hidden", "a..b", "x" * 129, "a b", None])
def test_run_names_refused(name):
    with pytest.raises(LayoutError, match="run name"):
        validate_run_name(name)


def test_iterations_and_small_files(layout):
    fs = layout.fs
    assert layout.iterations() == [] and not layout.exists()
    for n in (2, 0, 11):
        write_json_atomic(fs, layout.stage_dir(n, "train") + "/x.json", {"n": n})
    write_text_atomic(fs, layout.join("iter-junk", "x"), "not an iteration")
    write_text_atomic(fs, layout.run_yaml, "name: a\n")
    assert layout.iterations() == [0, 2, 11]
    assert read_json(fs, layout.stage_dir(11, "train") + "/x.json") == {"n": 11}
    assert fs.cat_file(layout.run_yaml) == b"name: a\n"
    for i in range(3):
        append_jsonl(fs, layout.metrics_jsonl, {"iteration": i, "loss": 1.0 / (i + 1)})
    assert [r["iteration"] for r in read_jsonl(fs, layout.metrics_jsonl)] == [0, 1, 2]
    assert layout.exists()


def test_json_errors_name_the_file(tmp_path):
    lay = RunLayout(str(tmp_path))
    p = lay.join("bad.json")
    write_text_atomic(lay.fs, p, "{not json")
    with pytest.raises(OpdError, match="bad.json: not valid JSON"):
        read_json(lay.fs, p)
    with pytest.raises(OpdError, match="x.json: cannot write as JSON"):
        write_json_atomic(lay.fs, lay.join("x.json"), {"loss": float("nan")})
    with pytest.raises(FileNotFoundError):
        read_json(lay.fs, lay.join("missing.json"))


def test_local_write_interrupted_keeps_old_file(tmp_path, monkeypatch):
    """A crash between writing the temporary file and the rename leaves the old content, no tmp."""
    lay = RunLayout(str(tmp_path))
    p = lay.join("metrics.jsonl")
    append_jsonl(lay.fs, p, {"iteration": 0})

    def boom(*a):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        append_jsonl(lay.fs, p, {"iteration": 1})
    monkeypatch.undo()
    assert read_jsonl(lay.fs, p) == [{"iteration": 0}]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_object_store_write_is_one_put(monkeypatch):
    """On memory:// (and S3) nothing is visible until the whole object is written in one call."""
    lay = RunLayout("memory://opd-test-oneput/r")
    calls = []
    monkeypatch.setattr(lay.fs, "pipe_file", lambda path, data, **kw: calls.append((path, len(data))))
    monkeypatch.setattr(lay.fs, "open", lambda *a, **k: pytest.fail("streamed write on an object store"))
    write_bytes_atomic(lay.fs, lay.join("a.bin"), b"x" * 100)
    assert calls == [(lay.join("a.bin"), 100)]
