"""The CPU rehearsal's world: tiny random Qwen3 models (the 8-GPU config's family) and math/code prompts.

    paths = build_rehearsal_world(".cache/rehearsal")   # cached: rebuilt only when missing or outdated

A char-level tokenizer with Qwen's chat markers (<|im_start|>, <|im_end|>, <|endoftext|>) and a chat
template; student, teachers math/code (random Qwen3ForCausalLM from config: hidden 64, 2 heads of
head_dim 32 (vLLM needs >= 32), 1 KV head, 2 layers; different seeds); prompts with domains math
(answers checked in \\boxed{}) and code. Nothing is trained: the rehearsal runs the 8-GPU run's code
paths, it does not measure learning.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

VERSION = 1
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789+-=*/(){}[]\\ .,:;?!'\"_ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, padding_side="left", chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=SPECIALS[1:])
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, seed: int, tokenizer) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # peaked but not one-hot next-token distributions; some responses stop early
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 3.0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def _prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            rows.append({"prompt_id": f"m{i:04d}", "prompt": f"What is {a}+{b}? Put the answer in \\boxed{{}}.",
                         "answer": str(a + b), "domain": "math"})
        else:
            w = "".join(rng.choices("abcdef", k=rng.randint(3, 6)))
            rows.append({"prompt_id": f"c{i:04d}", "prompt": f"Write reverse('{w}').", "answer": w[::-1],
                         "domain": "code"})
    return rows


def build_rehearsal_world(root: str | Path) -> dict[str, str]:
    """Build (or reuse) the rehearsal's models and prompt files under root; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = Path(root)
    paths = {"student": root / "student", "math": root / "teacher-math", "code": root / "teacher-code",
             "train": root / "train.parquet", "eval": root / "eval.parquet"}
    stamp = root / "world.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION:
        return {k: str(v) for k, v in paths.items()}
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(root / "tokenizer")
    for name, seed in (("student", 0), ("math", 1), ("code", 2)):
        build_model(paths[name], seed, tok)
    pq.write_table(pa.Table.from_pylist(_prompts(64, 0)), paths["train"])
    pq.write_table(pa.Table.from_pylist(_prompts(16, 1)), paths["eval"])
    stamp.write_text(json.dumps({"version": VERSION}))
    return {k: str(v) for k, v in paths.items()}
