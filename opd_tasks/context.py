"""A run as the stage tasks see it: the config written in run.yaml, resolved, plus its layout.

Tasks receive (run_dir, iteration) and rebuild this; nothing big crosses task boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


from opd_tasks.config import ConfigError, RunConfig, parse_config, read_yaml
from opd_tasks.errors import OpdError
from storage.checkpoints import rollout_student
from storage.fs import exists, read_bytes
from storage.layout import RunLayout


@dataclass
class RunContext:
    cfg: RunConfig      # resolved: toy:// paths are local paths
    raw: RunConfig      # exactly as in run.yaml
    layout: RunLayout

    @classmethod
    def load(cls, run_dir: str) -> "RunContext":
        layout = RunLayout(run_dir)
        if not exists(layout.fs, layout.run_yaml):
            raise OpdError(f"{run_dir}: no run.yaml here; start a run with `opd run CONFIG --run-dir {run_dir}`")
        return cls.from_config(stored_config(layout), layout)

    @classmethod
    def from_config(cls, raw: RunConfig, layout: RunLayout) -> "RunContext":
        cfg = raw
        if raw.toy_world is not None:
            from opd_tasks.toy.world import resolve_config
            cfg = resolve_config(raw)
        return cls(cfg=cfg, raw=raw, layout=layout)

    @cached_property
    def config_hash(self) -> str:
        return self.raw.config_hash()

    @property
    def run_dir(self) -> str:
        return self.layout.url

    @property
    def warm_start(self) -> bool:
        """The run has an offline phase: iteration 0 starts from its checkpoint, not student.path."""
        return self.cfg.offline is not None

    def student_path(self, iteration: int) -> str:
        """The student that samples iteration `iteration`: the initial model (or, with an offline
        phase, its checkpoint's HF export) for iteration 0, else the HF export of the checkpoint
        written after training iteration - 1."""
        path = rollout_student(self.layout, iteration, initial=self.cfg.student.path, warm_start=self.warm_start)
        return path if iteration == 0 and not self.warm_start else self.layout.url_of(path)

    @property
    def reference_path(self) -> str:
        """G-OPD pi_ref: configured, or the student's iteration-0 weights (the initial checkpoint, or
        the offline phase's checkpoint when the run has one)."""
        if self.cfg.reference:
            return self.cfg.reference.path
        return self.student_path(0) if self.warm_start else self.cfg.student.path

    def offline_dir(self, stage: str) -> str:
        return self.layout.offline_dir(stage)

    def stage_dir(self, iteration: int, stage: str) -> str:
        return self.layout.stage_dir(iteration, stage)


def stored_config(layout: RunLayout) -> RunConfig:
    """The run's run.yaml. One that does not validate was most likely written by a newer opd."""
    try:
        return parse_config(read_yaml(read_bytes(layout.fs, layout.run_yaml)), layout.url_of(layout.run_yaml))
    except ConfigError as err:
        raise OpdError(f"{err}\nThis run's stored config does not validate with this opd: if the run was written "
                       f"by a newer opd, upgrade opd; otherwise restore run.yaml (`opd run` writes it once)") from None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def prepare_run(cfg: RunConfig, run_dir: str) -> RunContext:
    """Write run.yaml once; on an existing run, refuse a config whose hash changed (only
    config.MUTABLE_FIELDS such as `iterations` may change) and keep the stored config otherwise."""
    from opd_tasks.config import MUTABLE_FIELDS
    from storage.fs import write_text_atomic
    layout = RunLayout(run_dir)
    if exists(layout.fs, layout.run_yaml):
        old = stored_config(layout)
        if old.config_hash() != cfg.config_hash():
            changes = _diff(old.model_dump(mode="json", by_alias=True), cfg.model_dump(mode="json", by_alias=True))
            changes = [c for c in changes if c.split(":")[0] not in MUTABLE_FIELDS]
            raise OpdError(f"{run_dir}: the config differs from the run's run.yaml ({old.config_hash()} -> "
                           f"{cfg.config_hash()}): " + "; ".join(changes[:8]) + ". Only "
                           f"{', '.join(MUTABLE_FIELDS)} may change on resume; start a new run directory "
                           f"for a different config")
        if old.model_dump() == cfg.model_dump():
            return RunContext.from_config(old, layout)
    write_text_atomic(layout.fs, layout.run_yaml, cfg.to_yaml())
    return RunContext.from_config(cfg, layout)
