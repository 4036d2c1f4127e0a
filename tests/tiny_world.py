"""A tiny random world for plumbing tests (seconds to build): a student and two teachers (random
Llamas sharing one WordLevel tokenizer over a-z), a prompt set with domains x/y, and a config.
Learning is tested on the real toy world (opd_tasks.toy); this one tests the pipes."""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml


def build_tiny_world(root: Path) -> dict:
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from train_helpers import build_tiny_model
    paths = {n: build_tiny_model(root / n, seed=s) for n, s in (("student", 0), ("tx", 1), ("ty", 2))}
    rng = random.Random(0)
    rows = [{"prompt_id": f"q{i:03d}", "prompt": "".join(rng.choices("abcdefgh", k=rng.randint(2, 6))),
             "answer": "ab", "domain": "xy"[i % 2]} for i in range(48)]
    pq.write_table(pa.Table.from_pylist(rows), root / "prompts.parquet")
    return {**paths, "prompts": str(root / "prompts.parquet"), "root": str(root)}


def tiny_config(world: dict, **over) -> dict:
    cfg = {"name": "tiny", "seed": 0, "iterations": 1,
           "student": {"path": world["student"]},
           "teachers": [{"name": "tx", "path": world["tx"], "domain": "x", "weight": 0.7},
                        {"name": "ty", "path": world["ty"], "domain": "y", "weight": 0.3}],
           "combination": "mixture", "loss": {"kind": "gopd", "lambda": 1.25},
           "rollout": {"prompts_per_iteration": 6, "group_size": 2, "max_new_tokens": 6, "rows_per_part": 4},
           "train": {"mini_batches": 2, "lr": 1e-3, "micro_batch_tokens": 256},
           "eval": {"every": 1, "max_new_tokens": 4, "max_prompts": 8},
           "data": {"train": world["prompts"], "eval": world["prompts"], "verifiers": {"x": "exact", "y": "exact"}}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
