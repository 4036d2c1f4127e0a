"""Generation and scoring backends behind one small interface (base.py): hf, vllm, remote.

    gen = make_generator("hf", "models/student", token_budget=16384)
    scorer = make_scorer(cfg.scoring.engine, teacher.path, dtype=teacher.dtype,
                         token_budget=cfg.scoring.token_budget, vllm=cfg.scoring.vllm,
                         url=teacher.url, max_concurrency=cfg.scoring.max_concurrency)

Callers may pass every config-level option (COMMON_OPTS) whatever the kind: each kind keeps
the ones it uses and drops the rest (hf ignores url/vllm, vllm expands its `vllm` dict into
vllm.LLM kwargs, ...). Any other keyword goes to the engine as is, so a typo still fails.
Backends are imported only when asked for: importing this package pulls in neither torch nor vllm.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from opd_tasks.errors import OpdError

KINDS = ("hf", "vllm", "remote")
_CLASSES = {
    ("hf", "generator"): ("opd_tasks.engines.hf", "HFGenerator"),
    ("hf", "scorer"): ("opd_tasks.engines.hf", "HFScorer"),
    ("vllm", "generator"): ("opd_tasks.engines.vllm", "VLLMGenerator"),
    ("vllm", "scorer"): ("opd_tasks.engines.vllm", "VLLMScorer"),
    ("remote", "generator"): ("opd_tasks.engines.remote", "RemoteGenerator"),
    ("remote", "scorer"): ("opd_tasks.engines.remote", "RemoteScorer"),
}


COMMON_OPTS = {"dtype", "device", "token_budget", "trust_remote_code", "progress", "seed", "vllm", "url",
               "max_concurrency", "rows_per_request"}
_USES = {"hf": {"dtype", "device", "token_budget", "trust_remote_code", "progress"},
         "vllm": {"dtype", "seed"},
         "remote": {"url", "max_concurrency", "rows_per_request"}}


class EngineInputError(OpdError):
    """Input an engine cannot run on: token ids outside the vocabulary, empty prompts, bad options."""


def hf_device(cfg) -> str:
    """The torch device of the hf engines of run config `cfg`: train.device, where 'auto' is cuda
    when torch sees a GPU, else cpu (vllm and remote engines place themselves)."""
    device = cfg.train.device
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise EngineInputError("train.device=cuda but torch sees no CUDA device (the hf engines run there "
                                   "too); set train.device: cpu or auto")
    return device


def make_generator(kind: str, model_path: str, **opts: Any):
    """A Generator of the given kind (hf / vllm / remote) for the model at model_path."""
    return _engine_class(kind, "generator")(model_path, **_opts_for(kind, opts))


def make_scorer(kind: str, model_path: str, **opts: Any):
    """A Scorer of the given kind (hf / vllm / remote) for the model at model_path."""
    return _engine_class(kind, "scorer")(model_path, **_opts_for(kind, opts))


def _engine_class(kind: str, role: str):
    if kind not in KINDS:
        raise EngineInputError(f"engine {kind!r} is not one of {KINDS}; fix rollout.engine / scoring.engine")
    module, name = _CLASSES[(kind, role)]
    try:
        return getattr(import_module(module), name)
    except ImportError as err:
        hint = " (vllm lives in its own virtualenv, .venv-vllm; see the Makefile)" if kind == "vllm" else ""
        raise EngineInputError(f"engine {kind!r} is not available here: {err}{hint}") from None
    except AttributeError:
        raise EngineInputError(f"engine {kind!r}: {module} has no {name}") from None


def _opts_for(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The options engine `kind` takes, out of config-level ones meant for any engine."""
    out = {k: v for k, v in opts.items() if k not in COMMON_OPTS or k in _USES.get(kind, ())}
    if kind == "vllm":
        out.update(opts.get("vllm") or {})  # tensor_parallel_size, max_model_len, ... -> vllm.LLM
        if opts.get("trust_remote_code"):
            out["trust_remote_code"] = True
    return out
