"""Prompt text -> token ids, the one way: rollout, offline generation, offline datasets and evaluation
all call `encode_prompts`, so a prompt has the same ids wherever it is used (scoring and training
read the ids stored in the rollout shards and never re-tokenize).

    ids = encode_prompts(tokenizer, rows, chat_template=cfg.data.chat_template, source=cfg.data.train)
    limit, why = prompt_limit(cfg, [(student, cfg.rollout)], cfg.rollout.max_new_tokens, "rollout.max_new_tokens")
    ids = encode_prompts(tokenizer, rows, chat, source, limit=limit, limit_why=why)

A row is {"prompt": text, "messages": [{"role", "content"}, ...] or None} (a dict, or a pyarrow
Table with those columns). Rows with messages go through the tokenizer's chat template with the
generation prompt (the assistant turn's opening) appended; plain-text rows do too when
`chat_template` is on (as one user message); otherwise the text is tokenized with the tokenizer's
special tokens (BOS), as before chat support. A chat template's text is tokenized without adding
special tokens: the template writes its own.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from opd_tasks.errors import DataError


def _rows(rows: Any) -> list[dict]:
    if hasattr(rows, "to_pylist"):
        cols = [c for c in ("prompt", "messages", "prompt_id") if c in rows.column_names]
        return rows.select(cols).to_pylist()
    return list(rows)


def chat_text(tokenizer, messages: list[dict], source: str) -> str:
    """The chat template's text of `messages`, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: prompts need a chat template (a messages column, or data.chat_template: true), "
                        f"but the student tokenizer {tokenizer.name_or_path!r} has none; set data.chat_template: "
                        f"false and use plain-text prompts, or use a tokenizer whose tokenizer_config.json has a "
                        f"chat_template")
    return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, rows: Any, chat_template: bool, source: str, limit: int | None = None,
                   limit_why: str = "") -> list[list[int]]:
    """Token ids of each row's prompt (see the module docstring). With `limit`, a prompt longer than
    `limit` tokens is a DataError naming it, its length and `limit_why` (what sets the limit)."""
    rows = _rows(rows)
    chat, plain = [], []
    for i, r in enumerate(rows):
        if r.get("messages") is not None:
            chat.append((i, chat_text(tokenizer, r["messages"], source)))
        elif r.get("prompt") is None:
            raise DataError(f"{source}: row {i} has neither a prompt nor messages")
        elif chat_template:
            chat.append((i, chat_text(tokenizer, [{"role": "user", "content": r["prompt"]}], source)))
        else:
            plain.append((i, r["prompt"]))
    out: list[list[int]] = [[] for _ in rows]
    for group, special in ((plain, True), (chat, False)):
        if group:
            ids = tokenizer([t for _, t in group], add_special_tokens=special)["input_ids"]
            for (i, _), x in zip(group, ids):
                out[i] = list(x)
    if limit is not None:
        if limit < 1:
            raise DataError(f"{source}: no room left for a prompt ({limit_why}); lower that max_new_tokens")
        for i, x in enumerate(out):
            if len(x) > limit:
                pid = rows[i].get("prompt_id", f"row {i}")
                raise DataError(f"{source}: prompt {pid!r} has {len(x)} tokens, but the model's context leaves "
                                f"{limit} for the prompt after max_new_tokens; shorten the prompt, lower that "
                                f"max_new_tokens, or drop it from the dataset (the limit: {limit_why})")
    return out


def engine_context(model_path: str, engine_cfg) -> tuple[int | None, str]:
    """(context length, where it comes from) of `model_path` on the engine of `engine_cfg` (a
    RolloutConfig or ScoringConfig): vLLM's max_model_len when its `vllm` options set one, else the
    model's max_position_embeddings; (None, "") when the model is not a local directory."""
    from opd_tasks.models import max_context
    section = "rollout" if hasattr(engine_cfg, "group_size") else "scoring"
    vllm_len = (engine_cfg.vllm or {}).get("max_model_len") if engine_cfg.engine == "vllm" else None
    if vllm_len:
        return int(vllm_len), f"{section}.vllm.max_model_len={int(vllm_len)}"
    if not os.path.isfile(os.path.join(str(model_path), "config.json")):
        return None, ""  # a remote model, or a missing one (its stage names it when it loads it)
    n = max_context(str(model_path))
    return n, f"max_position_embeddings={n} of {model_path}"


def prompt_limit(uses: Sequence[tuple[str, Any]], max_new_tokens: int, max_new_field: str) -> tuple[int | None, str]:
    """(most prompt tokens, why): the smallest context over `uses` [(model path, engine config)]
    minus `max_new_tokens` (the config field `max_new_field`); (None, "") when nothing is known."""
    known = [(n, what) for n, what in (engine_context(p, e) for p, e in uses) if n is not None]
    if not known:
        return None, ""
    n, what = min(known, key=lambda x: x[0])
    return n - max_new_tokens, f"{what} - {max_new_field}={max_new_tokens}"
