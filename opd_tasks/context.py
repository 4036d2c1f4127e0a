"""A run as the stage tasks see it: the config written in run.yaml, resolved, plus its layout.

Tasks receive (run_dir, iteration) and rebuild this; nothing big crosses task boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import yaml

from opd_tasks.config import RunConfig, parse_config
from opd_tasks.errors import OpdError
from storage.checkpoints import hf_dir, is_complete
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
        raw = parse_config(yaml.safe_load(read_bytes(layout.fs, layout.run_yaml)), layout.url_of(layout.run_yaml))
        return cls.from_config(raw, layout)

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

    def student_path(self, iteration: int) -> str:
        """The student that samples iteration `iteration`: the initial model, or the HF export of
        the checkpoint written after training iteration - 1."""
        if iteration == 0:
            return self.cfg.student.path
        if not is_complete(self.layout, iteration - 1):
            raise OpdError(f"{self.run_dir}: iteration {iteration} needs the checkpoint of iteration "
                           f"{iteration - 1}, which is not complete; resume the run to finish training it")
        return self.layout.url_of(hf_dir(self.layout, iteration - 1))

    @property
    def reference_path(self) -> str:
        """G-OPD pi_ref: configured, or the student's initial checkpoint."""
        return self.cfg.reference.path if self.cfg.reference else self.cfg.student.path

    def stage_dir(self, iteration: int, stage: str) -> str:
        return self.layout.stage_dir(iteration, stage)
