"""Tokenizer identity: teachers, reference and student must share one vocabulary
(docs/algorithms.md, "Alignment rules").

    fp = tokenizer_fingerprint("models/student")           # sha256 hex, stable across reloads
    check_same_tokenizer("models/student", "models/math", "math")   # TokenizerMismatchError if not

The fingerprint covers what token ids mean: every (id, token) pair of the vocabulary including
added tokens, the special tokens (bos/eos/pad/unk/... and extras) and the added tokens with their
"special" flag. Normalizer and pre-tokenizer rules are left out on purpose: scoring works on
token ids, so two tokenizers that map every id to the same token agree for opd.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from opd_tasks.errors import TokenizerMismatchError
from opd_tasks.models import load_tokenizer

_FIX = ("use teachers (and a reference) that share the student's tokenizer, e.g. models of the same "
        "family and vocabulary; cross-tokenizer distillation is not supported")


def tokenizer_identity(path_or_tokenizer: Any) -> dict:
    """What the fingerprint hashes: {"vocab": [[id, token], ...] sorted by id, "special":
    {name: token}, "added": [[id, content, special], ...]}. Accepts a path or a loaded HF
    tokenizer (anything with get_vocab())."""
    tok = path_or_tokenizer
    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    vocab = sorted((int(i), str(t)) for t, i in tok.get_vocab().items())
    special = {str(k): _plain(v) for k, v in sorted(getattr(tok, "special_tokens_map", {}).items())}
    decoder = getattr(tok, "added_tokens_decoder", None)
    if decoder is None and hasattr(tok, "get_added_tokens_decoder"):  # a raw tokenizers.Tokenizer
        decoder = tok.get_added_tokens_decoder()
    added = sorted((int(i), str(t.content), bool(getattr(t, "special", False))) for i, t in (decoder or {}).items())
    return {"vocab": [list(p) for p in vocab], "special": special, "added": [list(a) for a in added]}


def tokenizer_fingerprint(path_or_tokenizer: Any) -> str:
    """sha256 (hex) of tokenizer_identity(): equal iff ids, special and added tokens all agree."""
    return _hash(tokenizer_identity(path_or_tokenizer))


def check_same_tokenizer(student_path: Any, other_path: Any, other_name: str,
                         student_name: str = "student") -> str:
    """Raise TokenizerMismatchError naming both models and the first difference unless the two
    tokenizers are the same; returns the common fingerprint."""
    a, b = tokenizer_identity(student_path), tokenizer_identity(other_path)
    if a == b:
        return _hash(a)
    what = _first_difference(a, b, student_name, other_name)
    raise TokenizerMismatchError(
        f"{other_name} ({_label(other_path)}) does not share the tokenizer of {student_name} "
        f"({_label(student_path)}): {what}. Fix: {_FIX}")


def _hash(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _first_difference(a: dict, b: dict, a_name: str, b_name: str) -> str:
    diffs = []
    va, vb = a["vocab"], b["vocab"]
    if len(va) != len(vb):
        diffs.append(f"vocabulary size {len(va)} ({a_name}) vs {len(vb)} ({b_name})")
    for (ia, ta), (ib, tb) in zip(va, vb):
        if (ia, ta) != (ib, tb):
            if ia == ib:
                diffs.append(f"first differing token id {ia}: {ta!r} ({a_name}) vs {tb!r} ({b_name})")
            else:
                diffs.append(f"first differing vocabulary entry: id {ia} = {ta!r} ({a_name}) vs "
                             f"id {ib} = {tb!r} ({b_name})")
            break
    sa, sb = a["special"], b["special"]
    for name in sorted(set(sa) | set(sb)):
        if sa.get(name) != sb.get(name):
            diffs.append(f"special token {name}: {sa.get(name)!r} ({a_name}) vs {sb.get(name)!r} ({b_name})")
    if a["added"] != b["added"] and len(diffs) == 0:
        only_a = [x for x in a["added"] if x not in b["added"]][:3]
        only_b = [x for x in b["added"] if x not in a["added"]][:3]
        diffs.append(f"added tokens [id, content, special] differ: {only_a} ({a_name}) vs {only_b} ({b_name})")
    return "; ".join(diffs) or "tokenizers differ"


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(getattr(v, "content", v))


def _label(x: Any) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__
