"""Fake-but-valid shards and runs for tests (storage, status/inspect, and other engineers' tests).

    import importlib.util, pathlib                      # from a test outside tests/storage/:
    spec = importlib.util.spec_from_file_location("storage_factories",
                                                  pathlib.Path(__file__).parent / "storage" / "factories.py")
    F = importlib.util.module_from_spec(spec); spec.loader.exec_module(F)
    # (inside tests/storage/: `import factories as F`)

    table, prov = F.make_scored_table(n_prompts=3, group_size=2, teachers=("math", "code"))
    manifest = F.write_stage(fs, stage_dir, table, prov, rows_per_part=4)
    layout = F.make_run("memory://run-x", iterations=2)    # run.yaml, stages, checkpoints, metrics

Log-probs are real: per token, random logits for the student and each teacher over a small
vocabulary; the response token is sampled from the student, behaviour_logp is its log-prob under
the student, teacher_logp.NAME under each teacher, teacher_logp the mixture logsumexp_k(log w_k + T^k).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import yaml

from storage.checkpoints import commit_checkpoint
from storage.layout import RunLayout, append_jsonl, write_bytes_atomic, write_text_atomic
from storage.manifest import Manifest, commit_manifest, write_json_part
from storage.shards import build_provenance, commit_parts, rollout_table, scored_table, write_part

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def make_scored_table(n_prompts: int = 3, group_size: int = 2, teachers: Sequence[str] = ("math", "code"),
                      weights: Sequence[float] | None = None, vocab_size: int = 32, iteration: int = 0,
                      with_ref: bool = False, seed: int = 0, max_prompt: int = 5, max_response: int = 6,
                      domains: Sequence[str] = ("math", "code"), tokenizer_path: str | None = None,
                      config_hash: str = "cfg-test", scored: bool = True, top_k: int = 0):
    """(table, provenance) of n_prompts * group_size samples; scored=False gives the rollout table;
    top_k > 0 adds each teacher's top-k columns (from the same teacher distributions)."""
    rng = np.random.default_rng(seed)
    weights = list(weights) if weights is not None else [1.0 / len(teachers)] * len(teachers)
    n = n_prompts * group_size
    prompts = [rng.integers(4, vocab_size, size=rng.integers(1, max_prompt + 1)) for _ in range(n_prompts)]
    resp, b, tk, ref = [], [], {t: [] for t in teachers}, []
    topk = {t: ([], []) for t in teachers}
    for i in range(n):
        length = int(rng.integers(1, max_response + 1))
        student = _log_softmax(rng.normal(size=(length, vocab_size)))
        ids = np.array([rng.choice(vocab_size, p=np.exp(row)) for row in student])
        resp.append(ids)
        b.append(student[np.arange(length), ids])
        for t in teachers:
            full = _log_softmax(2.0 * rng.normal(size=(length, vocab_size)))
            tk[t].append(full[np.arange(length), ids])
            order = np.argsort(-full, axis=1, kind="stable")[:, :top_k]
            topk[t][0].append(order.reshape(-1))
            topk[t][1].append(np.take_along_axis(full, order, 1).reshape(-1))
        ref.append(_log_softmax(rng.normal(size=(length, vocab_size)))[np.arange(length), ids])
    logw = np.log(np.asarray(weights, dtype=np.float64) / np.sum(weights))
    combined = []
    for i in range(n):
        stack = np.stack([tk[t][i] for t in teachers]) + logw[:, None]
        m = stack.max(0)
        combined.append(m + np.log(np.exp(stack - m).sum(0)))
    cols = {
        "sample_id": [f"{iteration}-p{i // group_size}-{i % group_size}" for i in range(n)],
        "prompt_id": [f"p{i // group_size}" for i in range(n)],
        "group_index": np.arange(n) % group_size,
        "domain": [domains[(i // group_size) % len(domains)] for i in range(n)],
        "prompt_ids": [prompts[i // group_size] for i in range(n)],
        "response_ids": resp,
        "behaviour_logp": b,
        "finish_reason": ["stop" if i % 3 else "length" for i in range(n)],
        "reward": rng.integers(0, 2, size=n).astype(np.float32),
        "iteration": iteration,
    }
    table = rollout_table(cols)
    tinfo = [{"name": t, "path": f"/models/{t}", "weight": float(w)} for t, w in zip(teachers, weights)]
    common = dict(iteration=iteration, config_hash=config_hash, tokenizer_path=tokenizer_path,
                  tokenizer_fingerprint="fp-test", student_checkpoint="/models/student")
    if not scored:
        return table, build_provenance("rollout", **common)
    table = scored_table(table, {t: tk[t] for t in teachers}, combined, ref if with_ref else None,
                         topk=topk if top_k else None)
    return table, build_provenance("scored", teachers=tinfo, combination="mixture", **common,
                                   **({"top_k": top_k} if top_k else {}))


def write_stage(fs, stage_dir: str, table, provenance: dict, rows_per_part: int = 4, commit: bool = True,
                stage: str | None = None, inputs: dict | None = None) -> Manifest | dict:
    """Write `table` as parts of rows_per_part rows; commit the manifest unless commit=False
    (then return the {index: PartInfo} written: a stage interrupted before its manifest)."""
    parts = {}
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_part)):
        parts[k] = write_part(fs, stage_dir, k, table.slice(start, rows_per_part), provenance)
    if not commit:
        return parts
    return commit_parts(fs, stage_dir, stage or provenance["kind"], parts, provenance.get("config_hash"),
                        inputs=inputs or {})


def make_tokenizer(path: str, vocab_size: int = 32) -> str:
    """A WordLevel tokenizer of one character per token (ids 0-3 special), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS[:vocab_size - len(SPECIALS)]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return str(path)


def make_run(root: str, iterations: int = 2, storage_options: dict | None = None, teachers=("math", "code"),
             tokenizer_path: str | None = None, partial_last: bool = True, seed: int = 0,
             n_prompts: int = 3, group_size: int = 2, fs=None) -> RunLayout:
    """A run directory: run.yaml, `iterations` finished iterations (rollout, scored, train, eval
    with manifests, a complete checkpoint each, a metrics.jsonl line each) and, if partial_last, one
    more iteration with a done rollout, a scored stage holding one part and no manifest, and a
    checkpoint directory without manifest."""
    layout = RunLayout(root, storage_options, fs=fs)
    fs = layout.fs
    write_text_atomic(fs, layout.run_yaml, yaml.safe_dump({"name": "fake", "iterations": iterations + 2}))
    for n in range(iterations + int(partial_last)):
        last = partial_last and n == iterations
        kw = dict(n_prompts=n_prompts, group_size=group_size, teachers=teachers, iteration=n,
                  seed=seed + n, tokenizer_path=tokenizer_path)
        rollout, rprov = make_scored_table(scored=False, **kw)
        write_stage(fs, layout.stage_dir(n, "rollout"), rollout, rprov)
        scored, sprov = make_scored_table(**kw)
        write_stage(fs, layout.stage_dir(n, "scored"), scored, sprov, commit=not last)
        if last:
            write_bytes_atomic(fs, layout.checkpoint_dir(n) + "/dcp/__0_0.distcp", b"half")
            break
        for stage, metrics in (("train", {"loss": 0.5 / (n + 1)}), ("eval", {"accuracy": {"math": 0.1 * n}})):
            d = layout.stage_dir(n, stage)
            commit_manifest(fs, d, Manifest(stage=stage, config_hash="cfg-test",
                                            parts=[write_json_part(fs, d, "metrics.json", metrics)]))
        ck = layout.checkpoint_dir(n)
        write_bytes_atomic(fs, ck + "/dcp/.metadata", b"meta")
        write_bytes_atomic(fs, ck + "/hf/config.json", b"{}")
        commit_checkpoint(layout, n, config_hash="cfg-test")
        append_jsonl(fs, layout.metrics_jsonl, {"iteration": n, "loss": 0.5 / (n + 1)})
    return layout
