"""How big a model is, for `opd plan`: parameters and the shape facts memory estimates need.

    arch = model_arch(cfg.teachers[0], field="teachers[0]")
    arch.params, arch.source   # 8.19e9, "config.json" | "declared (teachers[0].params)" | "known sizes (qwen3-8b)"
    arch.kv_bytes_per_token("bfloat16")

Sources, first that applies: the model directory's config.json (when the path is a readable local
directory), the config's declared `params` (no shape facts then: the KV cache is not estimated), a
small table of published sizes matched on the path's last component (Qwen3 0.6B-32B, Llama-3 8B/70B,
Qwen2.5-72B). Decoder-only dense transformers (Llama/Qwen2/Qwen3 layout); pure Python, no torch.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from opd_tasks.errors import OpdError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

_Q3 = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8)
KNOWN: dict[str, dict] = {  # published configs (config.json of the hub repos)
    "qwen3-0.6b": dict(_Q3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_Q3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-4b": dict(_Q3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-8b": dict(_Q3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     intermediate_size=12288, tie_word_embeddings=False),
    "qwen3-14b": dict(_Q3, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      intermediate_size=17408, tie_word_embeddings=False),
    "qwen3-32b": dict(_Q3, hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                      intermediate_size=25600, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False),
    "qwen2.5-72b": dict(vocab_size=152064, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, tie_word_embeddings=False,
                        model_type="qwen2"),
}


class ModelSizeError(OpdError):
    """The plan cannot tell how big a model is."""


@dataclass(frozen=True)
class Arch:
    params: float
    source: str
    hidden: int | None = None
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None
    vocab: int | None = None

    @property
    def shaped(self) -> bool:
        return self.layers is not None

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of every layer for one token (0 when the shape is unknown)."""
        if not self.shaped:
            return 0
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]


def count_params(c: dict) -> int:
    """Parameters of a dense decoder from its config.json fields (embeddings, attention with
    grouped KV heads, gated MLP, norms; Qwen2's qkv biases and Qwen3's q/k norms)."""
    h, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    inter = c["intermediate_size"]
    mtype = c.get("model_type", "")
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if mtype == "qwen2" or c.get("attention_bias"):
        attn += heads * hd + 2 * kv * hd
    if mtype == "qwen3":
        attn += 2 * hd
    per_layer = attn + 3 * h * inter + 2 * h
    emb = V * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return emb + L * per_layer + h


def _arch(c: dict, params: float, source: str) -> Arch:
    heads = c["num_attention_heads"]
    return Arch(params=params, source=source, hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                intermediate=c["intermediate_size"], vocab=c["vocab_size"])


def known_size(path: str) -> tuple[str, dict] | None:
    """The longest KNOWN key that names the path's last component (qwen3-8b matches Qwen3-8B-math-rl)."""
    name = os.path.basename(os.path.normpath(str(path))).lower()
    hits = [k for k in KNOWN if re.search(r"(^|[^0-9a-z.])" + re.escape(k) + r"($|[^0-9.])", name)]
    if not hits:
        return None
    key = max(hits, key=len)
    return key, KNOWN[key]


def model_arch(model, field: str) -> Arch:
    """Arch of a ModelConfig-like (path, params) named `field` in the config (e.g. teachers[0])."""
    path = str(model.path)
    cfg_file = os.path.join(path, "config.json")
    if "://" not in path and os.path.isfile(cfg_file):
        try:
            c = json.loads(open(cfg_file).read())
            c = c.get("text_config", c)
            return _arch(c, float(count_params(c)), "config.json")
        except (OSError, ValueError, KeyError) as err:
            raise ModelSizeError(f"{field}: cannot read the size of {cfg_file} ({err}); set {field}.params "
                                 f"(the parameter count, e.g. 8.2e9)") from None
    if getattr(model, "params", None):
        return Arch(params=float(model.params), source=f"declared ({field}.params)")
    hit = known_size(path)
    if hit:
        key, c = hit
        return _arch(c, float(count_params(c)), f"known sizes ({key})")
    raise ModelSizeError(f"{field}: {path!r} is not readable here and is not a known size; set {field}.params "
                         f"(the parameter count, e.g. 8.2e9) to plan without its config.json")
