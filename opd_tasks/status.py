"""`opd status`: how far did a run get?

    status_report("runs/demo")       # per iteration: stage done/partial/missing, rows, stray files, checkpoints
"""
from __future__ import annotations

from typing import Any

import yaml

from opd_tasks.config import read_yaml
from opd_tasks.errors import LayoutError, OpdError
from storage.checkpoints import checkpoint_status, latest_checkpoint, offline_checkpoint_status
from storage.fs import exists, read_bytes
from storage.layout import STAGES, OFFLINE_STAGES, RunLayout
from storage.manifest import read_manifest, stage_status, stray_files


def status_report(run_dir: str, storage_options: dict | None = None) -> dict:
    """{"run_dir", "name", "iterations_planned", "iterations": [{"iteration": N, "stages": {stage:
    "done"|"partial"|"missing"}, "rows": {...}, "stray": {...}, "checkpoint": status}],
    "latest_checkpoint": {"iteration", "path"} | None, "offline": {stage: status, "checkpoint": status} | None}."""
    layout = RunLayout(run_dir, storage_options)
    fs = layout.fs
    if not layout.exists():
        raise LayoutError(f"{run_dir}: no run here (missing or empty directory); start one with `opd run`")
    cfg = {}
    if exists(fs, layout.run_yaml):
        try:
            cfg = read_yaml(read_bytes(fs, layout.run_yaml)) or {}
        except yaml.YAMLError as err:
            raise OpdError(f"{layout.url_of(layout.run_yaml)}: not valid YAML ({err})") from None
    iterations = []
    for n in sorted(set(layout.iterations()) | set(layout.checkpoint_iterations())):
        entry: dict[str, Any] = {"iteration": n, "stages": {}, "rows": {}, "stray": {}}
        for stage in STAGES:
            d = layout.stage_dir(n, stage)
            entry["stages"][stage] = stage_status(fs, d)
            if entry["stages"][stage] == "done" and stage in ("rollout", "scored"):
                entry["rows"][stage] = read_manifest(fs, d).rows
            stray = stray_files(fs, d) if entry["stages"][stage] != "missing" else []
            if stray:
                entry["stray"][stage] = stray
        entry["checkpoint"] = checkpoint_status(layout, n)
        iterations.append(entry)
    latest = latest_checkpoint(layout)
    offline = {s: stage_status(fs, layout.offline_dir(s)) for s in OFFLINE_STAGES}
    offline["checkpoint"] = offline_checkpoint_status(layout)
    return {
        "run_dir": layout.url,
        "name": cfg.get("name") if isinstance(cfg, dict) else None,
        "iterations_planned": cfg.get("iterations") if isinstance(cfg, dict) else None,
        "iterations": iterations,
        "latest_checkpoint": {"iteration": latest[0], "path": layout.url_of(latest[1])} if latest else None,
        "offline": offline if any(v != "missing" for v in offline.values()) else None,
    }
