"""`opd recombine`: a new scored stage from a stored one's per-teacher columns, without re-scoring.

    opd recombine runs/demo --iteration 7 --weights adder=0.3,reverser=0.7 --mode mixture --output OUT
    recombine_stage("runs/demo", "OUT", iteration=7, weights={"adder": 0.3, "reverser": 0.7})

Every column is copied except teacher_logp, which is recomputed from the teacher_logp.NAME columns
with the new weights / mode (opd_tasks/combine.py: mixture, product, route by the teachers' stored
domains). Part k of OUT comes from part k of the source, written atomically; the manifest comes
last, so an interrupted recombination resumes at the first missing part. OUT is a scored stage
directory like `opd score`'s output: `opd inspect OUT`, DuckDB and `datasets` read it.
"""
from __future__ import annotations

import hashlib
import json
import math

from opd_tasks.combine import MODES
from opd_tasks.errors import OpdError
from opd_tasks.inspect import _find_scored
from opd_tasks.scoring import recombine
from opd_tasks.stages import Parts, write_stage
from storage.fs import filesystem, is_local
from storage.manifest import read_manifest
from storage.shards import part_index, read_part, read_provenance


def parse_weights(text: str) -> dict[str, float]:
    """"a=0.3,b=0.7" -> {"a": 0.3, "b": 0.7}; a one-line error naming the bad item."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        name, sep, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if not sep or not name.strip() or not math.isfinite(w) or w < 0:
            raise OpdError(f"--weights: {item!r} is not NAME=WEIGHT with a finite weight >= 0 "
                           f"(e.g. --weights math=0.3,code=0.7)")
        if name.strip() in out:
            raise OpdError(f"--weights: teacher {name.strip()!r} is given twice")
        out[name.strip()] = w
    return out


def _new_teachers(old: list[dict], weights: dict[str, float] | None) -> list[dict]:
    names = [t["name"] for t in old]
    if weights is None:
        return [dict(t) for t in old]
    if sorted(weights) != sorted(names):
        raise OpdError(f"--weights names {sorted(weights)} but the stage's teachers are {names}: give one "
                       f"NAME=WEIGHT per teacher (0 leaves a teacher out)")
    return [{**t, "weight": float(weights[t["name"]])} for t in old]


def recombine_stage(run_dir: str, output: str, iteration: int | None = None, weights: dict[str, float] | None = None,
                    mode: str | None = None, offline: bool = False, storage_options: dict | None = None) -> dict:
    """Write OUT from the scored stage of `iteration` (default: the latest done one; or the offline
    phase's; or run_dir itself when it is a stage directory). mode defaults to the stage's own
    combination, weights to its own weights. Returns {"output", "rows", "parts", "combination",
    "teachers", "source", "skipped"}."""
    fs, src, it = _find_scored(run_dir, iteration, offline, storage_options)
    source = read_manifest(fs, src)
    if source is None:
        raise OpdError(f"{src}: the scored stage is not done; finish it first (`opd resume`)")
    prov = read_provenance(fs, src)
    src_url = src if is_local(fs) else fs.unstrip_protocol(src)
    mode = mode or prov.get("combination")
    if mode not in MODES:
        raise OpdError(f"--mode {mode!r} is not one of {MODES}")
    teachers = _new_teachers(prov.get("teachers") or [], weights)
    key = json.dumps({"source": source.config_hash, "sha": [p.sha256 for p in source.parts], "mode": mode,
                      "teachers": [[t["name"], t.get("weight"), t.get("domain")] for t in teachers]}, sort_keys=True)
    config_hash = "recombine-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    out_fs, out = filesystem(output, storage_options)
    if out.rstrip("/") == src.rstrip("/"):
        raise OpdError(f"--output {output} is the source stage itself; write the recombination elsewhere")
    done_manifest = read_manifest(out_fs, out)
    summary = {"output": output, "source": src_url, "iteration": it, "combination": mode, "teachers": teachers}
    if done_manifest is not None:
        if done_manifest.config_hash != config_hash:
            raise OpdError(f"{output}: holds another finished stage ({done_manifest.stage}, "
                           f"{done_manifest.config_hash}); choose a new --output or delete it")
        return {**summary, "rows": done_manifest.rows, "parts": len(done_manifest.parts), "skipped": True}
    new_prov = {**prov, "teachers": teachers, "combination": mode, "config_hash": config_hash,
                "recombined_from": {"stage": src_url, "config_hash": source.config_hash,
                                    "combination": prov.get("combination"), "teachers": prov.get("teachers")}}
    parts = {part_index(p.name): p for p in source.parts}

    def plan() -> Parts:
        return Parts(keys=list(parts), make=lambda k: (recombine(read_part(fs, src, parts[k]), mode, teachers), new_prov),
                     inputs={"scored": src_url}, extra={"recombined": {"combination": mode, "teachers": teachers}},
                     label="recombine")

    res = write_stage(out_fs, out, name="recombined", kind="scored", iteration=it, config_hash=config_hash, plan=plan)
    return {**summary, "rows": res.rows, "parts": len(parts), "skipped": False}
