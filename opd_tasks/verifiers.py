"""Verifiers of task answers, by domain: `reward = get_verifier(domain)(response_text, answer)`.

A verifier returns 1.0 (correct) or 0.0 (wrong). The built-in ones strip surrounding whitespace and
end-of-sequence markers from the response first, so both `decode(ids)` and
`decode(ids, skip_special_tokens=True)` verify the same.

Built in: `exact` (string equality; the toy domains add and rev use it, and so do rows without a
domain) and `math` (the math-verify package: the last \\boxed{} or a plain expression of the response
against the answer, equal when mathematically equivalent: 1/2 = 0.5 = \\frac{1}{2}, x(x+2) = x^2+2x).
A domain verifies with the verifier of its own name, or the one `data.verifiers` names for it:

    data: {verifiers: {algebra: math, code: none}}    # none: this domain has no verifier

A domain without a verifier is an error wherever rewards are needed (loss.kind=kdrl, evaluation,
offline.filter.min_reward), never a silent exact match: `check_domains` raises NoVerifierError.

    register_verifier("sort", lambda response, answer: float(normalize(response) == answer.strip()))
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Mapping

from opd_tasks.config import ConfigError

Verifier = Callable[[str, str], float]
NONE = "none"  # data.verifiers value: the domain has no verifier

# Markers a decoded response may end with: the toy world's, Llama's, GPT-2's, Qwen's.
EOS_MARKERS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<pad>")


class NoVerifierError(ConfigError):
    """Rewards are needed for a domain that has no verifier."""


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


def math_equal(response: str, answer: str) -> float:
    """1.0 when the response's final answer (its last \\boxed{...}, else the last expression) is
    mathematically equivalent to `answer` (LaTeX or plain), by math-verify; 0.0 otherwise, also
    when nothing can be parsed. Parsing times out after 5 s in the main thread; in other threads
    (signals work only in the main one) it runs without a timeout."""
    from math_verify import parse, verify
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    answer = str(answer).strip()
    gold_text = answer if "\\boxed" in answer or "$" in answer else "\\boxed{" + answer + "}"
    gold = parse(gold_text, parsing_timeout=timeout)
    pred = parse(normalize(response), parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=timeout))


_REGISTRY: dict[str, Verifier] = {"exact": exact, "add": exact, "rev": exact, "math": math_equal}


def register_verifier(domain: str, fn: Verifier) -> None:
    """Use `fn(response_text, answer) -> float` for prompts of `domain` (replaces any earlier one)."""
    if not callable(fn):
        raise TypeError(f"register_verifier({domain!r}, ...): expected a callable(response, answer) -> float")
    _REGISTRY[domain] = fn


def find_verifier(domain: str | None, overrides: Mapping[str, str] | None = None) -> Verifier | None:
    """The verifier of `domain` (its data.verifiers entry, else its own name); None when it has none.
    Rows without a domain use `exact`."""
    name = (overrides or {}).get(domain, domain) if domain is not None else "exact"
    if name == NONE:
        return None
    return _REGISTRY.get(name)


def get_verifier(domain: str | None, overrides: Mapping[str, str] | None = None) -> Verifier:
    """The verifier of `domain`; NoVerifierError (naming data.verifiers) when it has none."""
    check_domains([domain], overrides, "this verification")
    return find_verifier(domain, overrides)  # type: ignore[return-value]


def check_domains(domains: Iterable[str | None], overrides: Mapping[str, str] | None, why: str) -> None:
    """NoVerifierError naming every domain without a verifier, `why` rewards are needed and the fix."""
    overrides = overrides or {}
    bad_names = sorted({f"{d}: {n}" for d, n in overrides.items() if n != NONE and n not in _REGISTRY})
    if bad_names:
        raise NoVerifierError(f"data.verifiers: unknown verifier(s) {bad_names}; use one of "
                              f"{sorted(_REGISTRY)} or {NONE!r} (or register_verifier(NAME, fn) first)")
    missing = sorted({str(d) for d in domains if find_verifier(d, overrides) is None})
    if missing:
        raise NoVerifierError(
            f"domain(s) {missing} have no verifier, and {why} needs their rewards; set data.verifiers "
            f"(e.g. {{{missing[0]}: math}}, one of {sorted(_REGISTRY)}), register one "
            f"(opd_tasks.verifiers.register_verifier), or drop those prompts")


def check_run_verifiers(cfg) -> None:
    """Before a run starts (cfg: a resolved RunConfig): every domain whose rewards the config needs
    has a verifier: data.train's for loss.kind=kdrl and offline.filter.min_reward (generate), the
    evaluated eval rows' (less the domains declared `none`) when eval.every > 0."""
    from storage.datasets import read_prompts
    needs = []
    if cfg.loss.kind == "kdrl":
        needs.append((cfg.data.train, "loss.kind=kdrl", None))
    if cfg.offline is not None and cfg.offline.source == "generate" and cfg.offline.filter.min_reward is not None:
        needs.append((cfg.data.train, "offline.filter.min_reward", None))
    if cfg.eval.every > 0:
        needs.append((cfg.data.eval or cfg.data.train, "evaluation", cfg.eval.max_prompts))
    for path, why, first in needs:
        domains = read_prompts(path).column("domain").to_pylist()
        if why == "evaluation":
            domains = [d for d in domains[:first] if d is None or cfg.data.verifiers.get(d) != NONE]
        check_domains(domains, cfg.data.verifiers, why)
