"""The trainer end to end: checkpoint -> resume continues exactly, HF export reloads, bad input errors."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from train_helpers import make_run, scored_table
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.trainer import TrainError
from opd_tasks.trainer.batching import rows_from_table
from opd_tasks.trainer.checkpoint import full_state_dict
from opd_tasks.trainer.distributed import close_distributed, init_distributed
from opd_tasks.trainer.loop import LoopConfig, train_iteration
from opd_tasks.trainer.worker import TrainArgs, build_model, make_optimizer, read_config, resolve_init, run


def uninterrupted(tiny_model_dir, args):
    """Both iterations in one process, model and optimizer kept in memory (no checkpoint in between)."""
    cfg = read_config(args[0].config)
    from opd_tasks.trainer.worker import load_rows, loss_params
    d = init_distributed("cpu")
    try:
        model = build_model(tiny_model_dir, cfg, d.mesh)
        opt = make_optimizer(model, cfg)
        steps, step = [], 0
        for a in args:
            loop = LoopConfig(epochs=cfg.train.epochs, mini_batches=cfg.train.mini_batches,
                              micro_batch_tokens=cfg.train.micro_batch_tokens, grad_clip=cfg.train.grad_clip,
                              seed=cfg.seed, iteration=a.iteration)
            out = train_iteration(model, opt, load_rows(a.scored_dir, cfg), loss_params(cfg, a.iteration), loop,
                                  d.device, step=step)
            steps += out["steps"]
            step = out["step"]
        return steps, full_state_dict(model)
    finally:
        close_distributed(d)


def test_resume_from_checkpoint_continues_bitwise_and_hf_export_matches(tmp_path, tiny_model_dir):
    _, args = make_run(tmp_path, tiny_model_dir)
    want_steps, want_sd = uninterrupted(tiny_model_dir, args)
    run(args[0])                  # iteration 0: 2 steps, checkpoint, then a fresh model + optimizer
    got = run(args[1])["steps"]   # iteration 1 from the DCP state: steps 3 and 4
    assert [s["step"] for s in got] == [3, 4]
    for g, w in zip(got, want_steps[2:]):
        assert g["loss"] == w["loss"] and g["grad_norm"] == w["grad_norm"], (g, w)
    # the HF export is a complete model dir holding exactly the trained weights
    hf = tmp_path / "checkpoints" / "iter-000001" / "hf"
    reloaded = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    assert set(reloaded) == set(want_sd)
    for k, v in want_sd.items():
        assert torch.equal(reloaded[k], v), k
    assert AutoTokenizer.from_pretrained(hf)("abc")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_model_dir)("abc")["input_ids"]
    from transformers import AutoConfig, GenerationConfig
    assert AutoConfig.from_pretrained(hf).to_diff_dict() == AutoConfig.from_pretrained(tiny_model_dir).to_diff_dict()
    assert GenerationConfig.from_pretrained(hf) == GenerationConfig.from_pretrained(tiny_model_dir)
    metrics = json.loads((tmp_path / "iter-000001" / "train" / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["tokens_per_s"] > 0
    for d in ("checkpoints/iter-000001", "iter-000001/train"):
        assert (tmp_path / d / "_MANIFEST.json").exists()


def test_tied_embeddings_export_reloads(tmp_path):
    from train_helpers import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "tied", seed=1, tie=True)
    _, args = make_run(tmp_path / "run", model_dir, mini_batches=1)
    run(args[0])
    hf = tmp_path / "run" / "checkpoints" / "iter-000000" / "hf"
    m = AutoModelForCausalLM.from_pretrained(hf)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    before = AutoModelForCausalLM.from_pretrained(model_dir).model.embed_tokens.weight
    assert not torch.equal(m.model.embed_tokens.weight, before)  # the trained weights, not the init's


def test_init_checkpoint_must_be_complete(tmp_path, tiny_model_dir):
    part = tmp_path / "ckpt"
    (part / "dcp").mkdir(parents=True)
    with pytest.raises(TrainError, match=r"ckpt: checkpoint has no _MANIFEST.json.*did not finish"):
        resolve_init(str(part))
    with pytest.raises(TrainError, match=r"neither an opd checkpoint .* nor an HF model"):
        resolve_init(str(tmp_path))
    assert resolve_init(tiny_model_dir) == (tiny_model_dir, None)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, tiny_model_dir):
    _, args = make_run(tmp_path, tiny_model_dir)
    bad = scored_table(2, 2, seed=0)
    import pyarrow as pa
    ids = [[min(t + 100, 2000) for t in r.as_py()] for r in bad.column("response_ids")]
    bad = bad.set_column(bad.column_names.index("response_ids"), "response_ids", pa.array(ids, pa.list_(pa.int32())))
    from storage.fs import filesystem
    from storage.shards import build_provenance, commit_parts, write_part
    fs, path = filesystem(str(tmp_path / "bad"))
    prov = build_provenance("scored", iteration=0, config_hash=None,
                            teachers=[{"name": "math"}, {"name": "code"}], combination="mixture")
    commit_parts(fs, path, "scored", [write_part(fs, path, 0, bad, prov)], config_hash=None)
    a = TrainArgs(**{**args[0].__dict__, "scored_dir": path})
    with pytest.raises(TrainError, match=r"bad: token id \d+ .* outside the student's vocabulary \(40\)"):
        run(a)
    assert not os.path.exists(a.out_checkpoint)


def test_run_stage_paths_and_skip_when_done(tmp_path, tiny_model_dir):
    import yaml
    from opd_tasks.context import RunContext
    from opd_tasks.trainer.stage import run_training, train_paths
    from storage.manifest import Manifest, commit_manifest
    from train_helpers import write_config
    cfg = yaml.safe_load(open(write_config(tmp_path / "run.yaml")))
    cfg["student"]["path"] = tiny_model_dir
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    ctx = RunContext.load(str(tmp_path))
    p0 = train_paths(ctx, 0)
    assert p0["init_checkpoint"] == tiny_model_dir
    assert p0["scored_dir"] == str(tmp_path / "iter-000000" / "scored")
    assert p0["out_checkpoint"] == str(tmp_path / "checkpoints" / "iter-000000")
    assert p0["train_dir"] == str(tmp_path / "iter-000000" / "train")
    with pytest.raises(TrainError, match=r"checkpoints/iter-000000: the checkpoint after iteration 0 is not"):
        train_paths(ctx, 1)
    with pytest.raises(TrainError, match=r"iter-000001/scored: the scored stage is not complete"):
        run_training(ctx, 1)
    commit_manifest(ctx.layout.fs, ctx.stage_dir(1, "train"), Manifest(stage="train", extra={"step": 4}))
    res = run_training(ctx, 1)
    assert res.skipped and res.metrics == {"step": 4}


def test_every_path_may_be_an_fsspec_url(tmp_path, tiny_model_dir):
    """memory:// stands in for s3:// (one process): shards in, DCP + HF export + metrics out, resume."""
    import fsspec
    from train_helpers import write_config, write_scored
    fs, root = fsspec.filesystem("memory"), f"memory://opd-train-{tmp_path.name}"
    try:
        fs.put(write_config(tmp_path / "run.yaml"), f"{root}/run.yaml")
        args = []
        for n in range(2):
            write_scored(f"{root}/iter-{n:06d}/scored", scored_table(4, 2, seed=n, iteration=n), iteration=n)
            args.append(TrainArgs(f"{root}/run.yaml", f"{root}/iter-{n:06d}/scored",
                                  tiny_model_dir if n == 0 else f"{root}/checkpoints/iter-000000",
                                  f"{root}/checkpoints/iter-{n:06d}", f"{root}/iter-{n:06d}/train", n))
        run(args[0])
        assert run(args[1])["step"] == 4
        files = fs.find(f"{root}/checkpoints/iter-000001")
        for name in ("_MANIFEST.json", "dcp/.metadata", "hf/model.safetensors", "hf/tokenizer.json"):
            assert any(f.endswith(f"iter-000001/{name}") for f in files), name
        assert fs.exists(f"{root}/iter-000001/train/_MANIFEST.json")
    finally:
        fs.rm(root, recursive=True)
