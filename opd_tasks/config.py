"""The one description of a run: pydantic models, loadable from YAML.

    cfg = load_config("configs/toy.yaml")          # validates; errors name the field
    cfg.config_hash()                              # what a run directory is pinned to

Every knob of docs/algorithms.md has one name here, the same name used in code, Parquet
columns and docs. Model paths are local directories, fsspec URLs, or `toy://NAME`
(a model or dataset of the toy world named by `toy_world`, built on first use).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from opd_tasks.config_sections import (  # noqa: F401 - re-exported: import every section from here
    NODE_LAUNCHER_FIELDS, ConfigError, DataConfig, Dtype, Engine, EvalConfig, LossConfig, ModelConfig, Name,
    OfflineConfig, OfflineFilterConfig, OfflineGenerateConfig, PlacementConfig, RolloutConfig, ScoringConfig,
    TeacherConfig, ToyWorldConfig, TrainConfig, _Model)

# Fields a resumed run may change without changing its identity (config hash).
# placement: where engines run changes no result (data-parallel replicas reproduce one engine's rows);
# scoring.streaming: when a scored part is made changes no byte of it; scoring.rows_per_request: how
# rows travel to a remote server (vLLM answers a list of prompts with each one's own log-probs).
MUTABLE_FIELDS = ("iterations", "run_dir", "eval.every", "placement", "scoring.streaming",
                  "scoring.rows_per_request")

ADDED_LATER = {  # dotted field -> default left out of the hash
    "offline": None, "train.old_logp": "auto", "train.adam_eps": 1e-8, "scoring.teachers": "auto",
    "teachers[].reference": None, "loss.w_kd_anneal_iterations": None,
    "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.lr_end": 0.0, "train.no_sync_accumulation": False,
    "train.logp_chunk_tokens": 1024, "train.activation_checkpointing": False, "train.rdzv_endpoint": None,
    "train.rdzv_timeout_s": 600.0, "train.node_launcher": None, "data.chat_template": False,
    "data.verifiers": {}, "student.params": None, "teachers[].params": None, "reference.params": None,
    "teachers[].reference.params": None, "scoring.top_k": 0, "loss.divergence": "fkl", "loss.beta": 0.5,
    "loss.tail": True, "loss.sampled_weight": 0.0,
    "scoring.streaming": "auto", "scoring.rows_per_request": 1}


class RunConfig(_Model):
    name: Name = "opd"
    run_dir: str | None = Field(None, description="run directory (any fsspec URL); default runs/NAME")
    seed: int = 0
    iterations: int = Field(10, ge=0)
    toy_world: ToyWorldConfig | None = None
    student: ModelConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    combination: Literal["mixture", "route", "product"] = "mixture"
    reference: ModelConfig | None = Field(None, description="G-OPD pi_ref; default: the student's initial checkpoint")
    loss: LossConfig = Field(default_factory=LossConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    data: DataConfig
    offline: OfflineConfig | None = Field(None, description="warm start before iteration 0 (absent: none)")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)

    @model_validator(mode="after")
    def _teachers(self) -> "RunConfig":
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teachers: names must be unique, repeated: {dup}")
        if self.combination in ("mixture", "product") and sum(t.weight for t in self.teachers) <= 0:
            raise ValueError(f"teachers: weights are all zero; give at least one teacher a weight > 0 "
                             f"(teachers: {names})")
        if self.combination == "route":
            missing = [t.name for t in self.teachers if not t.domain]
            if missing:
                raise ValueError(f"combination=route: teachers {missing} have no domain; set teachers[].domain")
            domains = [t.domain for t in self.teachers]
            if len(set(domains)) != len(domains):
                raise ValueError(f"combination=route: two teachers share a domain: {domains}")
        own_ref = [f"teachers[{i}].reference" for i, t in enumerate(self.teachers) if t.reference is not None]
        if own_ref and self.loss.kind != "gopd":
            raise ValueError(f"{own_ref[0]}: a teacher's own reference is read only by loss.kind=gopd (the "
                             f"reward log(teacher / reference)); with loss.kind={self.loss.kind} nothing reads it: "
                             f"remove it or set loss.kind: gopd")
        if own_ref and self.combination != "route":
            raise ValueError(f"{own_ref[0]}: per-teacher references need combination=route (each sample has "
                             f"one teacher, so one reference); a {self.combination} of teachers has no single "
                             f"base: set the run's reference: instead")
        if self.scoring.teachers == "routed" and self.combination != "route":
            raise ValueError(f"scoring.teachers=routed needs combination=route (got {self.combination}): a "
                             f"{self.combination} reads every teacher on every token; use scoring.teachers: all")
        if self.loss.kind == "topk" and self.scoring.top_k == 0:
            raise ValueError("loss.kind=topk trains on the teachers' stored top-k: set scoring.top_k: K (> 0, "
                             "e.g. 8)")
        if self.loss.kind == "topk" and self.combination == "product":
            raise ValueError("loss.kind=topk with combination=product: the product's normalizer needs every "
                             "token's teacher values, top-k stores K; use combination: mixture with "
                             "loss.divergence: rkl (exactly the reverse KL to the normalized product, "
                             "docs/algorithms.md) or combination: route")
        if self.scoring.engine == "remote":
            missing = [t.name for t in self.teachers if not t.url]
            if missing:
                raise ValueError(f"scoring.engine=remote: teachers {missing} have no url")
        if self.rollout.engine == "remote" and not self.rollout.url:
            raise ValueError("rollout.engine=remote needs rollout.url")
        unknown = sorted(set(self.placement.teachers) - set(names))
        if unknown:
            raise ValueError(f"placement.teachers: {unknown} are not teachers; use names of {names}")
        if self.offline is not None and self.offline.source == "generate":
            model = self.offline.generate.model
            if model == "route":
                missing = [t.name for t in self.teachers if not t.domain]
                if missing:
                    raise ValueError(f"offline.generate.model=route: teachers {missing} have no domain; set "
                                     f"teachers[].domain or name one teacher (one of {names})")
            elif model not in names:
                raise ValueError(f"offline.generate.model: {model!r} is not a teacher; use one of {names} or route")
        return self

    @property
    def routed_scoring(self) -> bool:
        """Each teacher scores only its own domain's samples (scoring.teachers, resolved)."""
        return self.scoring.teachers == "routed" or (self.scoring.teachers == "auto" and self.combination == "route")

    def teacher_reference(self, name: str, default: str) -> ModelConfig:
        """The reference that scores the samples routed to teacher `name`: its own, else the run's
        (`default` is the run reference's path: reference.path or the student's initial checkpoint)."""
        t = next(t for t in self.teachers if t.name == name)
        return t.reference or self.reference or ModelConfig(path=default, dtype=self.student.dtype,
                                                            trust_remote_code=self.student.trust_remote_code)

    @property
    def needs_reference(self) -> bool:
        """G-OPD with lambda != 1 reads R_t; with lambda = 1 it cancels (rkl)."""
        return self.loss.kind == "gopd" and self.loss.lam != 1.0

    def config_hash(self, ignore: tuple[str, ...] = MUTABLE_FIELDS) -> str:
        """Identity of a run: sha256 of the canonical JSON of every field but `ignore` (dotted)."""
        data = self._dump()
        for dotted in ignore:
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _dump(self) -> dict[str, Any]:
        """JSON-able fields; fields added after the first release are left out while they hold their
        default, so runs made before they existed keep their config hash."""
        data = self.model_dump(mode="json", by_alias=True)
        if data.get("placement") == PlacementConfig().model_dump(mode="json"):
            data.pop("placement")  # added later; a run made before it keeps its config hash
        for dotted, default in ADDED_LATER.items():
            *parents, leaf = dotted.split(".")
            nodes = [data]
            for p in parents:  # "teachers[]" walks every element of the list
                many = p.endswith("[]")
                nodes = [c for n in nodes for c in ((n.get(p[:-2]) or []) if many else [n.get(p)])
                         if isinstance(c, dict)]
            for node in nodes:
                if leaf in node and node[leaf] == default:
                    node.pop(leaf)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self._dump(), sort_keys=False)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error{'s' * (err.error_count() > 1)})"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `opd run --help` lists the config sections)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


# libyaml's scanner and parser with PyYAML's safe constructor: the same objects as yaml.safe_load,
# ~10x faster (the pure-Python parser was 80% of RunContext.load, which every stage task calls)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(text: str | bytes):
    """yaml.safe_load(text), with libyaml when PyYAML has it."""
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; raises ConfigError naming the file and each bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return parse_config(data, str(path))
