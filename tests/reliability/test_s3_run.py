"""A run that lives on S3 (moto on 127.0.0.1): run directory, student and teachers are s3:// URLs
from the first iteration to the last, through the `opd` CLI. Killed (SIGKILL) during iteration 1's
training and resumed; its final weights must equal a local-disk run of the same config bit for bit,
and the model cache must have copied every model once (nothing complete fetched again on resume,
no partial copy left behind).

World: the test-size toy world (3 iterations of 16 prompts x 2 samples), one torch thread.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import s3fs
import yaml

from storage.checkpoints import checkpoint_status
from storage.layout import RunLayout
from storage.manifest import stage_status

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]
ITERATIONS = 3


def _config(student: str, adder: str, reverser: str, data: str) -> dict:
    return {"name": "s3-toy", "seed": 0, "iterations": ITERATIONS,
            "student": {"path": student},
            "teachers": [{"name": "adder", "path": adder, "domain": "add"},
                         {"name": "reverser", "path": reverser, "domain": "rev"}],
            "combination": "route", "loss": {"kind": "rkl"},
            "rollout": {"prompts_per_iteration": 16, "group_size": 2, "max_new_tokens": 12, "rows_per_part": 16},
            "train": {"lr": 5e-4, "mini_batches": 1, "micro_batch_tokens": 4096},
            "eval": {"every": ITERATIONS, "max_new_tokens": 12, "max_prompts": 8},
            "data": {"train": f"{data}/train.parquet", "eval": f"{data}/eval.parquet"}}


def _cache_entries(cache: Path) -> dict[str, int]:
    """Complete cache entries -> inode of their config.json (a new download gives a new inode)."""
    return {p.name: (p / "config.json").stat().st_ino for p in cache.iterdir() if not p.name.startswith(".")}


def test_a_run_on_s3_killed_and_resumed_ends_with_the_local_runs_weights(tmp_path, toy_world, opd_cli, s3_env):
    bucket = f"opd-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    fs.mkdir(bucket)
    models = {"student": "student", "adder": "teachers/add", "reverser": "teachers/rev"}
    for rel in models.values():
        fs.put(f"{toy_world / rel}/", f"s3://{bucket}/models/{rel}/", recursive=True)
    data = str(toy_world / "data")
    local_cfg = tmp_path / "local.yaml"
    local_cfg.write_text(yaml.safe_dump(_config(*(str(toy_world / r) for r in models.values()), data)))
    s3_cfg = tmp_path / "s3.yaml"
    s3_cfg.write_text(yaml.safe_dump(_config(*(f"s3://{bucket}/models/{r}" for r in models.values()), data)))
    cache = tmp_path / "model-cache"
    env = {**s3_env, "OPD_MODEL_CACHE": str(cache)}

    local = opd_cli("run", str(local_cfg), "--run-dir", str(tmp_path / "local"), **env)
    assert local.returncode == 0, local.stdout[-4000:]
    assert not cache.exists()  # local models are read in place

    run = f"s3://{bucket}/run"
    killed = opd_cli("run", str(s3_cfg), "--run-dir", run, OPD_FAULT="train.step:2", **env)
    assert killed.returncode == -9, killed.stdout[-4000:]
    lay = RunLayout(run)
    assert [stage_status(lay.fs, lay.stage_dir(1, s)) for s in ("rollout", "scored", "train")] == \
        ["done", "done", "missing"]
    assert checkpoint_status(lay, 0) == "done" and checkpoint_status(lay, 1) == "missing"
    # student, 2 teachers and the export of iteration 0 (iteration 1's rollout student)
    before = _cache_entries(cache)
    assert len(before) == 4, sorted(os.listdir(cache))

    done = opd_cli("resume", run, **env)
    assert done.returncode == 0, done.stdout[-4000:]
    after = _cache_entries(cache)
    assert {k: after[k] for k in before} == before  # nothing complete was fetched again
    assert len(after) == 4 + 2  # + the exports of iterations 1 and 2 (rollout 2, final eval)
    assert not [p for p in os.listdir(cache) if p.endswith(".partial")]

    for n in range(ITERATIONS):
        ckpt = f"checkpoints/iter-{n:06d}/hf/model.safetensors"
        assert fs.cat_file(f"{bucket}/run/{ckpt}") == (tmp_path / "local" / ckpt).read_bytes(), ckpt
    rows = [json.loads(x) for x in fs.cat_file(f"{bucket}/run/metrics.jsonl").decode().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert [(r["loss"], r["accuracy"]) for r in rows] == [(r["loss"], r["accuracy"]) for r in want]
