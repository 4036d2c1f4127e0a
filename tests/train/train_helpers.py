"""Helpers of the trainer tests: a tiny random Llama with its own tokenizer, scored stages, configs."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

VOCAB = 40


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Autouse in every module that imports it: one torch thread per test (2 shared cores), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_tiny_model(path, seed: int = 0, tie: bool = False) -> str:
    """A random Llama (hidden 64, 2 heads, 2 layers, vocab 40) + a WordLevel tokenizer, saved at `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + [chr(97 + i) for i in range(VOCAB - 4)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return str(path)


def _list_col(arrs, dtype):
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrs])]).astype(np.int32)
    flat = np.concatenate(arrs).astype(dtype) if arrs else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def scored_table(n_prompts: int = 4, group: int = 2, seed: int = 0, teachers=("math", "code"),
                 ref: bool = False, iteration: int = 0, max_prompt: int = 6, max_response: int = 9) -> pa.Table:
    """A scored-shard table with random ids and log-probs (response-token indexing), rewards in {0, 1}."""
    rng = np.random.default_rng(seed)
    n = n_prompts * group
    prompts, responses = [], []
    for p in range(n_prompts):
        prompt = rng.integers(4, VOCAB, rng.integers(2, max_prompt + 1))
        for _ in range(group):
            prompts.append(prompt)
            responses.append(rng.integers(3, VOCAB, rng.integers(1, max_response + 1)))
    logp = lambda: [(-rng.uniform(0.5, 4.0, len(r))).astype(np.float32) for r in responses]  # noqa: E731
    cols = {
        "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "prompt_id": pa.array([f"p{i // group}" for i in range(n)]),
        "group_index": pa.array([i % group for i in range(n)], pa.int32()),
        "domain": pa.array(["math"] * n),
        "prompt_ids": _list_col(prompts, np.int32),
        "response_ids": _list_col(responses, np.int32),
        "behaviour_logp": _list_col(logp(), np.float32),
        "finish_reason": pa.array(["stop"] * n),
        "reward": pa.array(rng.integers(0, 2, n).astype(np.float32)),
        "iteration": pa.array([iteration] * n, pa.int32()),
    }
    for t in teachers:
        cols[f"teacher_logp.{t}"] = _list_col(logp(), np.float32)
    cols["teacher_logp"] = _list_col(logp(), np.float32)
    if ref:
        cols["ref_logp"] = _list_col(logp(), np.float32)
    return pa.table(cols)


TEACHERS = ("math", "code")


def write_scored(stage_dir, table: pa.Table, iteration: int = 0, config_hash: str | None = None,
                 student_checkpoint: str | None = None) -> str:
    """Commit `table` as a scored stage (one part + manifest) with storage's writer."""
    from storage.fs import filesystem
    from storage.shards import build_provenance, commit_parts, write_part
    fs, path = filesystem(str(stage_dir))
    teachers = [{"name": c.split(".", 1)[1], "path": "x", "weight": 1.0}
                for c in table.column_names if c.startswith("teacher_logp.")]
    prov = build_provenance("scored", iteration=iteration, config_hash=config_hash, teachers=teachers,
                            combination="mixture", student_checkpoint=student_checkpoint)
    commit_parts(fs, path, "scored", [write_part(fs, path, 0, table, prov, vocab_size=VOCAB)],
                 config_hash=config_hash)
    return str(stage_dir)


def write_config(path, **train) -> str:
    """A run config YAML for the trainer (only train/loss/seed/iterations matter to it)."""
    import yaml
    cfg = {"name": "t", "seed": 0, "iterations": 4, "student": {"path": "unused"},
           "teachers": [{"name": t, "path": "unused"} for t in TEACHERS], "data": {"train": "unused"},
           "loss": {"kind": "rkl"},
           "train": {"lr": 1e-3, "epochs": 1, "mini_batches": 2, "micro_batch_tokens": 64, "device": "cpu",
                     **train}}
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def plain_iteration(model, optimizer, rows, params, cfg) -> list[float]:
    """The reference: no FSDP, no micro-batches. old_t from one no-grad forward over all rows, then
    per mini-batch ONE forward of all its rows, compute_loss over them, clip, AdamW step.
    Returns the loss of each step."""
    from opd_tasks.logprobs import gather_response, token_logp
    from opd_tasks.losses import compute_loss
    from opd_tasks.trainer.batching import collate, mini_batches
    from opd_tasks.trainer.loop import set_advantages

    def logp(mb):
        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        return gather_response(token_logp(out, mb["input_ids"]), mb["start"], mb["response_len"])[0]

    with torch.no_grad():
        everything = list(range(len(rows)))
        old = logp(collate(rows, everything, token_names=()))
    rows.token["old_logp"] = [old[i, : int(rows.response_len[i])].clone() for i in everything]
    set_advantages(rows, params)
    losses = []
    for epoch in range(cfg.epochs):
        for mini in mini_batches(len(rows), cfg.mini_batches, cfg.seed, cfg.iteration, epoch):
            mb = collate(rows, mini.tolist())
            batch = {k: v for k, v in mb.items() if k not in ("input_ids", "attention_mask", "start", "response_len")}
            if params.kind != "kdrl":
                batch.pop("rewards")
                batch.pop("advantages", None)
            optimizer.zero_grad()
            loss, _ = compute_loss(params, {**batch, "logp": logp(mb)})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


def make_run(root, tiny_model_dir, **train):
    """Two iterations of scored shards + a config under `root`; returns (config path, args per iteration)."""
    from opd_tasks.trainer.worker import TrainArgs
    cfg = write_config(root / "run.yaml", **train)
    args = []
    for n in range(2):
        write_scored(root / f"iter-{n:06d}" / "scored", scored_table(6, 2, seed=10 + n, iteration=n), iteration=n)
        args.append(TrainArgs(config=cfg, scored_dir=str(root / f"iter-{n:06d}" / "scored"),
                              init_checkpoint=tiny_model_dir if n == 0 else str(root / "checkpoints" / "iter-000000"),
                              out_checkpoint=str(root / "checkpoints" / f"iter-{n:06d}"),
                              train_dir=str(root / f"iter-{n:06d}" / "train"), iteration=n))
    return cfg, args
