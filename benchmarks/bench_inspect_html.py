"""Cost of the per-iteration HTML view (`opd run` writes RUN/iter-N/inspect.html after each iteration):
write_iteration_view on one scored stage vs reading that stage (read_stage, the baseline every view
pays), best of --repeat after one warm-up (the warm-up pays the tokenizer import, which a run has
already paid). Synthetic stage: 2 teachers + reference, long-tailed response lengths, a 64-token
character tokenizer. Prints one JSON object.

    .venv/bin/python benchmarks/bench_inspect_html.py                     # 1024 rows, ~30 s
    .venv/bin/python benchmarks/bench_inspect_html.py --rows 8192 --repeat 3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, log, long_tailed, machine, quiet_env  # noqa: E402


def tokenizer(path: str, vocab: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 33 + vocab - 4)]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *chars])},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return path


def stage(layout, rows: int, vocab: int, tok: str, seed: int = 0):
    from storage.shards import build_provenance, commit_parts, rollout_table, scored_table, write_part

    rng = np.random.default_rng(seed)
    lens = long_tailed(rng, rows, median=24, sigma=0.8, lo=1, hi=256)
    lp = lambda: [-rng.exponential(1.5, n).astype(np.float32) for n in lens]  # noqa: E731
    base = rollout_table({"sample_id": [f"0-p{i // 8}-{i % 8}" for i in range(rows)],
                          "prompt_id": [f"p{i // 8}" for i in range(rows)], "group_index": np.arange(rows) % 8,
                          "domain": ["add" if (i // 8) % 2 else "rev" for i in range(rows)],
                          "prompt_ids": [rng.integers(4, vocab, 16) for _ in range(rows)],
                          "response_ids": [rng.integers(4, vocab, n) for n in lens], "behaviour_logp": lp(),
                          "finish_reason": "stop", "reward": rng.integers(0, 2, rows).astype(np.float32),
                          "iteration": 0})
    table = scored_table(base, {"adder": lp(), "reverser": lp()}, lp(), ref=lp())
    prov = build_provenance("scored", iteration=0, config_hash="bench", combination="mixture", tokenizer_path=tok,
                            teachers=[{"name": "adder", "weight": 0.5, "domain": "add"},
                                      {"name": "reverser", "weight": 0.5, "domain": "rev"}])
    d = layout.stage_dir(0, "scored")
    parts = {k: write_part(layout.fs, d, k, table.slice(s, 256), prov) for k, s in enumerate(range(0, rows, 256))}
    commit_parts(layout.fs, d, "scored", parts, "bench")
    return int(sum(lens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    quiet_env()
    from opd_tasks.inspect_html import write_iteration_view
    from storage.layout import RunLayout
    from storage.shards import read_stage

    with tempfile.TemporaryDirectory() as tmp:
        layout = RunLayout(os.path.join(tmp, "run"))
        tokens = stage(layout, args.rows, 64, tokenizer(os.path.join(tmp, "tok"), 64))
        write_iteration_view(layout, 0)  # warm-up: tokenizer import and load
        read_s, view_s = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            read_stage(layout.fs, layout.stage_dir(0, "scored"))
            read_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert write_iteration_view(layout, 0) is not None
            view_s.append(time.perf_counter() - t)
        size = os.path.getsize(layout.inspect_html(0))
    log(f"read {min(read_s):.3f} s, view {min(view_s):.3f} s")
    emit({"bench": "inspect_html", "rows": args.rows, "response_tokens": tokens, "repeat": args.repeat,
          "read_stage_s": round(min(read_s), 4), "write_iteration_view_s": round(min(view_s), 4),
          "view_over_read": round(min(view_s) / min(read_s), 2), "html_bytes": size, "machine": machine()})


if __name__ == "__main__":
    main()
