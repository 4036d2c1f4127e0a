"""Exact verifiers of task answers, by domain: `reward = get_verifier(domain)(response_text, answer)`.

A verifier returns 1.0 (correct) or 0.0 (wrong). The built-in ones strip surrounding whitespace and
end-of-sequence markers from the response first, so both `decode(ids)` and
`decode(ids, skip_special_tokens=True)` verify the same. Unknown domains (and None) use `exact`.

    register_verifier("sort", lambda response, answer: float(normalize(response) == answer.strip()))
"""
from __future__ import annotations

from typing import Callable

Verifier = Callable[[str, str], float]

# Markers a decoded response may end with: the toy world's, Llama's, GPT-2's, Qwen's.
EOS_MARKERS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<pad>")


def normalize(response: str) -> str:
    """Response text without surrounding whitespace and without trailing EOS/pad markers."""
    text = response.strip()
    changed = True
    while changed:
        changed = False
        for marker in EOS_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def exact(response: str, answer: str) -> float:
    """1.0 when the normalized response equals the answer (whitespace-stripped)."""
    return float(normalize(response) == str(answer).strip())


_REGISTRY: dict[str, Verifier] = {"exact": exact, "add": exact, "rev": exact}


def register_verifier(domain: str, fn: Verifier) -> None:
    """Use `fn(response_text, answer) -> float` for prompts of `domain` (replaces any earlier one)."""
    if not callable(fn):
        raise TypeError(f"register_verifier({domain!r}, ...): expected a callable(response, answer) -> float")
    _REGISTRY[domain] = fn


def get_verifier(domain: str | None) -> Verifier:
    """The verifier of `domain`; `exact` for None or domains nobody registered."""
    return _REGISTRY.get(domain or "exact", exact)
