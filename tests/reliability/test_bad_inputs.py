"""Bad inputs, met where a user meets them (the stage functions a run calls, or the `opd` CLI): each
raises an OpdError naming what is wrong, where (file, column, teacher, field) and the fix, commits
nothing it should not, and leaves the run resumable once the input is fixed.

    .venv/bin/python -m pytest -q tests/reliability/test_bad_inputs.py

Inputs already covered elsewhere are not repeated here (the report of issue 9 has the table):
teacher tokenizer mismatch (tests/test_stages.py, tests/test_tokenizers.py), teacher weights
negative / NaN / all zero (tests/test_config.py, tests/test_combine.py; the CLI test below shows
what `opd run` prints), a prompt set without the column routing needs (tests/test_stages.py),
corrupt/truncated parts and checksums at the storage level (tests/storage/), changed config on
resume (tests/flows/test_run.py; the CLI test below).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from opd_tasks import scoring
from opd_tasks.config import parse_config
from opd_tasks.context import RunContext, prepare_run
from opd_tasks.engines.base import Sample
from opd_tasks.errors import DataError, ManifestError, ModelPathError, OpdError, ShardError
from opd_tasks.status import status_report
from opd_tasks.offline.score import score_offline
from opd_tasks.rollout import iteration_prompts, run_rollout
from opd_tasks.scoring import run_scoring
from opd_tasks.trainer.stage import run_training
from opd_tasks.trainer import TrainError
from storage.manifest import MANIFEST_NAME, stage_status
from storage.shards import read_stage
from tiny_world import tiny_config, write_config
from train.train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test


def _ctx(tmp_path, cfg: dict) -> RunContext:
    return prepare_run(parse_config(cfg), str(tmp_path / "run"))


def _status(ctx: RunContext, stage: str, iteration: int = 0) -> str:
    return stage_status(ctx.layout.fs, ctx.stage_dir(iteration, stage))


def _stage(ctx: RunContext, stage: str, iteration: int = 0):
    return read_stage(ctx.layout.fs, ctx.stage_dir(iteration, stage))


# ---- model paths ---------------------------------------------------------------------------------

def test_missing_student_path_names_the_student_and_resumes_once_there(tmp_path, tiny_world):
    cfg = tiny_config(tiny_world)
    cfg["student"]["path"] = str(tmp_path / "models" / "student")
    ctx = _ctx(tmp_path, cfg)
    with pytest.raises(ModelPathError, match=r"student path '.*/models/student' does not exist; check the "
                                             r"config's model paths \(student\.path"):
        run_rollout(ctx, 0)
    assert _status(ctx, "rollout") == "missing"
    shutil.copytree(tiny_world["student"], tmp_path / "models" / "student")  # the fix: the model is there
    assert run_rollout(ctx, 0).rows == 12


def test_missing_teacher_path_names_the_teacher_and_resumes_once_there(tmp_path, tiny_world):
    cfg = tiny_config(tiny_world)
    cfg["teachers"][1]["path"] = str(tmp_path / "models" / "ty")
    ctx = _ctx(tmp_path, cfg)
    run_rollout(ctx, 0)
    with pytest.raises(ModelPathError, match=r"teacher 'ty' path '.*/models/ty' does not exist; check the "
                                             r"config's model paths \(.*teachers\[\]\.path"):
        run_scoring(ctx, 0)
    assert _status(ctx, "scored") == "missing"
    shutil.copytree(tiny_world["ty"], tmp_path / "models" / "ty")
    assert run_scoring(ctx, 0).rows == 12


# ---- prompt datasets -----------------------------------------------------------------------------

@pytest.mark.parametrize("table, match", [
    (pa.table({"question": ["abc"]}), r"missing required column 'prompt' \(found: \['question'\]\)"),
    (pa.table({"prompt": pa.array([], pa.string())}), r"the prompt set is empty; .*data\.train"),
], ids=["no-prompt-column", "empty"])
def test_bad_prompt_set_is_named_and_the_run_resumes_once_fixed(tmp_path, tiny_world, table, match):
    data = tmp_path / "prompts.parquet"
    pq.write_table(table, data)
    ctx = _ctx(tmp_path, tiny_config(tiny_world, data={"train": str(data), "eval": str(data)}))
    with pytest.raises(DataError, match=rf"{data}: {match}"):
        run_rollout(ctx, 0)
    assert _status(ctx, "rollout") == "missing"
    shutil.copy(tiny_world["prompts"], data)  # fixed in place: same path, same config, same run
    assert run_rollout(ctx, 0).rows == 12


def test_prompt_longer_than_the_context_fails_before_any_part_is_written(tmp_path, tiny_world):
    """The long prompt sits in the iteration's LAST part: no earlier part may be committed, or the
    run, resumed after the prompt is dropped (which reshuffles the data), would mix two prompt sets."""
    prompts = pq.read_table(tiny_world["prompts"])
    chosen = iteration_prompts(prompts, 0, seed=0, n=6).column("prompt_id").to_pylist()
    long_id = chosen[-1]
    rows = [dict(r, prompt="ab" * 100) if r["prompt_id"] == long_id else r for r in prompts.to_pylist()]
    data = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    ctx = _ctx(tmp_path, tiny_config(tiny_world, data={"train": str(data), "eval": str(data)}))
    with pytest.raises(DataError, match=rf"{data}: prompt '{long_id}' has 200 tokens, but the model's context "
                                        r"leaves 122 for the prompt after max_new_tokens; shorten the prompt"):
        run_rollout(ctx, 0)
    assert _status(ctx, "rollout") == "missing"  # nothing committed
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["prompt_id"] != long_id]), data)  # dropped
    assert run_rollout(ctx, 0).rows == 12
    ids = _stage(ctx, "rollout").column("sample_id").to_pylist()
    assert len(set(ids)) == 12 and not any(long_id in i for i in ids)


# ---- damaged shards and manifests ----------------------------------------------------------------

def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("damage, match", [
    (_flip, r"part-00001\.parquet: sha256 does not match the manifest"),
    (_truncate, r"part-00001\.parquet: \d+ bytes but the manifest says \d+ \(truncated or overwritten\)"),
], ids=["checksum-mismatch", "truncated"])
def test_damaged_part_is_refused_and_redone_after_the_fix_the_error_names(tmp_path, tiny_world, damage, match):
    ctx = _ctx(tmp_path, tiny_config(tiny_world))
    run_rollout(ctx, 0)
    stage = tmp_path / "run" / "iter-000000" / "rollout"
    before = _stage(ctx, "rollout")
    damage(stage / "part-00001.parquet")
    with pytest.raises(ManifestError, match=match + r".*delete the stage's _MANIFEST\.json to redo it"):
        run_scoring(ctx, 0)
    assert _status(ctx, "scored") != "done"  # (its part 0, made from the intact rollout part 0, may stay)
    kept = {p: (stage / p).stat().st_mtime_ns for p in ("part-00000.parquet", "part-00002.parquet")}
    (stage / MANIFEST_NAME).unlink()  # what the message says
    run_rollout(ctx, 0)  # the damaged part no longer reads back whole: only it is sampled again
    assert {p: (stage / p).stat().st_mtime_ns for p in kept} == kept
    assert _stage(ctx, "rollout").equals(before)  # per-part seeds: the very same rows
    assert run_scoring(ctx, 0).rows == 12


# ---- teacher log-probs ---------------------------------------------------------------------------

def test_teacher_with_nan_weights_is_named_and_the_run_resumes_once_fixed(tmp_path, tiny_world, monkeypatch):
    from opd_tasks.engines.lifecycle import ENGINES
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "tx"
    shutil.copytree(tiny_world["tx"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")  # every position's logits turn NaN
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config(tiny_world)
    cfg["teachers"][0]["path"] = str(bad)
    ctx = _ctx(tmp_path, cfg)
    run_rollout(ctx, 0)
    ENGINES.close_all()
    with pytest.raises(ShardError, match=r"iter-000000/rollout part part-00000\.parquet: teacher 'tx' returned "
                                         r"non-finite log-probs for sample 'i000000-q\d+-g0' \(row 0\); "
                                         r"check that model's weights and dtype"):
        run_scoring(ctx, 0)
    assert _status(ctx, "scored") == "missing"  # the first part failed: nothing committed
    shutil.copy(os.path.join(tiny_world["tx"], "model.safetensors"), bad / "model.safetensors")
    ENGINES.close_all()  # `opd resume` is a new process: teachers load afresh
    assert run_scoring(ctx, 0).rows == 12


class _ConstScorer:
    """-1 per response token; with `bad`, that value at the last token of sample 1."""

    def __init__(self, bad: float | None = None):
        self.bad = bad

    def score(self, prompts, responses):
        out = [np.full(len(r), -1.0, np.float32) for r in responses]
        if self.bad is not None:
            out[1][-1] = self.bad
        return out


@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_non_finite_teacher_logprob_is_refused_naming_teacher_and_sample(tmp_path, tiny_world, monkeypatch, bad):
    ctx = _ctx(tmp_path, tiny_config(tiny_world, loss={"kind": "rkl", "lambda": 1.0}))
    run_rollout(ctx, 0)
    sample = _stage(ctx, "rollout").column("sample_id")[1].as_py()
    monkeypatch.setattr(scoring, "get_scorers", lambda *a: {"tx": _ConstScorer(), "ty": _ConstScorer(bad)})
    with pytest.raises(ShardError, match=rf"rollout part part-00000\.parquet: teacher 'ty' returned non-finite "
                                         rf"log-probs for sample '{sample}' \(row 1\)"):
        run_scoring(ctx, 0)
    assert _status(ctx, "scored") == "missing"


# ---- empty responses -----------------------------------------------------------------------------

class _Generator:
    """Responses of `length` tokens ('a' then EOS), or empty where empty(i, g) says so."""

    def __init__(self, empty):
        self.empty = empty

    def generate(self, prompts, n, sampling):
        return [[Sample(response_ids=[] if self.empty(i, g) else [4, 2], behaviour_logp=[] if self.empty(i, g)
                        else [-1.0, -1.0], finish_reason="stop") for g in range(n)] for i in range(len(prompts))]


def test_empty_responses_train_nothing_and_an_all_empty_iteration_is_refused(tmp_path, tiny_world):
    some = _ctx(tmp_path / "some", tiny_config(tiny_world))
    run_rollout(some, 0, generator=_Generator(lambda i, g: g == 1))  # every prompt's 2nd sample empty
    run_scoring(some, 0)
    t = _stage(some, "scored")
    assert [len(x) for x in t.column("teacher_logp.tx").to_pylist()] == [2, 0] * 6
    assert run_training(some, 0).metrics["step"] == 2  # the empty rows are legal and carry no tokens

    none = _ctx(tmp_path / "none", tiny_config(tiny_world))
    run_rollout(none, 0, generator=_Generator(lambda i, g: True))
    run_scoring(none, 0)
    with pytest.raises(TrainError, match=r"iter-000000/scored: all 12 responses are empty \(0 response tokens\); "
                                         r"nothing to train on"):
        run_training(none, 0)
    assert _status(none, "train") == "missing" and not os.path.exists(tmp_path / "none" / "run" / "checkpoints")


def test_offline_dataset_with_an_empty_response_is_refused_naming_the_row(tmp_path, tiny_world):
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt_ids": [[1, 5, 6], [1, 7]], "response_ids": [[5, 2], []]}), data)
    with pytest.raises(DataError, match=rf"{data}: 1 row\(s\) have an empty response \(first: row 1 \(sample_id "
                                        r"'s000000001' as assigned\)\); drop them"):
        score_offline(parse_config(tiny_config(tiny_world)), str(data), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / MANIFEST_NAME)


# ---- run directories from a newer opd ------------------------------------------------------------

def _newer_manifest(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 2, "stage": path.parent.name, "parts": [], "layout": "v2"}))


@pytest.mark.parametrize("stage, call", [
    ("rollout", lambda ctx: run_rollout(ctx, 0)),
    ("rollout", lambda ctx: run_scoring(ctx, 0)),
    ("scored", lambda ctx: run_training(ctx, 0)),
    ("rollout", lambda ctx: status_report(ctx.run_dir)),
], ids=["rollout", "scoring", "training", "status"])
def test_a_stage_from_a_newer_opd_asks_for_an_upgrade(tmp_path, tiny_world, stage, call):
    ctx = _ctx(tmp_path, tiny_config(tiny_world))
    _newer_manifest(tmp_path / "run" / "iter-000000" / stage / MANIFEST_NAME)
    with pytest.raises(ManifestError, match=rf"iter-000000/{stage}/_MANIFEST\.json: schema_version 2 is newer than "
                                            r"this opd reads \(1\); upgrade opd"):
        call(ctx)


def test_a_run_yaml_from_a_newer_opd_asks_for_an_upgrade(tmp_path, tiny_world):
    ctx = _ctx(tmp_path, tiny_config(tiny_world))
    stored = yaml.safe_load(open(ctx.layout.run_yaml))
    stored["rollout"]["speculative_tokens"] = 4  # a field this opd does not know
    open(ctx.layout.run_yaml, "w").write(yaml.safe_dump(stored))
    for call in (lambda: RunContext.load(ctx.run_dir), lambda: _ctx(tmp_path, tiny_config(tiny_world))):
        with pytest.raises(OpdError, match=r"(?s)run\.yaml: invalid config .*rollout\.speculative_tokens: unknown "
                                           r"field.*written by a newer opd, upgrade opd"):
            call()


# ---- the CLI -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.prefect_server
def test_cli_reports_config_and_run_dir_errors_with_exit_code_2(tmp_path, tiny_world, opd_cli):
    """`opd run` with negative teacher weight; `opd run` of a changed config on an existing run;
    `opd resume` of a run from a newer opd: exit code 2, `error: ...` naming the field or file, and
    the run directory untouched."""
    bad = tiny_config(tiny_world)
    bad["teachers"][0]["weight"] = -0.7
    res = opd_cli("run", write_config(tmp_path / "bad.yaml", bad), "--run-dir", str(tmp_path / "new"))
    assert res.returncode == 2, res.stdout[-3000:]
    assert "error: " in res.stdout and "teachers.0: teacher 'tx': weight must be finite and >= 0, got -0.7" in res.stdout
    assert not (tmp_path / "new").exists()

    run = tmp_path / "run"
    ctx = prepare_run(parse_config(tiny_config(tiny_world)), str(run))
    stored = (run / "run.yaml").read_bytes()
    changed = write_config(tmp_path / "changed.yaml", tiny_config(tiny_world, loss={"kind": "gopd", "lambda": 1.5}))
    res = opd_cli("run", changed, "--run-dir", str(run))
    assert res.returncode == 2, res.stdout[-3000:]
    assert "the config differs from the run's run.yaml" in res.stdout and "loss.lambda: 1.25 -> 1.5" in res.stdout
    assert (run / "run.yaml").read_bytes() == stored

    _newer_manifest(run / "iter-000000" / "rollout" / MANIFEST_NAME)
    res = opd_cli("resume", ctx.run_dir)
    assert res.returncode == 2, res.stdout[-3000:]
    assert "schema_version 2 is newer than this opd reads (1); upgrade opd" in res.stdout
