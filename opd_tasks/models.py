"""Loading models and tokenizers from files we did not write: safetensors only, no remote code
unless the config turns it on (and then it is logged), and a clear error for a bad path."""
from __future__ import annotations

import logging
import os
from functools import lru_cache

from opd_tasks.errors import ModelPathError

log = logging.getLogger("opd.models")


def check_model_dir(path: str, role: str = "model", need_config: bool = True) -> str:
    """A local HF model directory (with a config.json unless need_config is False), or
    ModelPathError naming the role and the fix."""
    path = os.fspath(path)
    if "://" in path:
        raise ModelPathError(f"{role} path {path!r} is a URL; models load from a local directory "
                             f"(copy it locally or mount it)")
    if not os.path.isdir(path):
        raise ModelPathError(f"{role} path {path!r} does not exist; check the config's model paths "
                             f"(student.path, teachers[].path, reference.path)")
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelPathError(f"{role} path {path!r} has no config.json: not a Hugging Face model directory")
    return path


def _remote_code(trust_remote_code: bool, path: str) -> bool:
    if trust_remote_code:
        log.warning("trust_remote_code=True for %s: code shipped with this model will run", path)
    return trust_remote_code


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, role: str = "tokenizer"):
    """AutoTokenizer of a local directory with tokenizer files (config.json optional: a tokenizer
    alone is fine); ModelPathError naming the role, the path and the fix otherwise."""
    from transformers import AutoTokenizer
    path = check_model_dir(path, role, need_config=False)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=_remote_code(trust_remote_code, path))
    except (OSError, ValueError, TypeError) as err:
        raise ModelPathError(f"{role} path {path!r}: cannot load a tokenizer ({err}); the directory needs "
                             f"tokenizer files (tokenizer.json / tokenizer_config.json), e.g. from "
                             f"tokenizer.save_pretrained(DIR)") from None


@lru_cache(maxsize=32)
def max_context(path: str) -> int:
    """The model's context length (max_position_embeddings), from its config only."""
    from transformers import AutoConfig
    check_model_dir(path)
    cfg = AutoConfig.from_pretrained(path)
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_seq_len", 1 << 20))


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False, role: str = "model"):
    """from_pretrained with safetensors only (no pickle), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    check_model_dir(path, role)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=_remote_code(trust_remote_code, path))
    return model.to(device).eval()
