"""Teacher generation: the offline phase's data (offline.source: generate) and `opd generate`.

    run_offline_generation(ctx)              # config offline.generate -> RUN/offline/rollout
    generate_offline(cfg, fs, stage, model="route", prompts=256, group_size=1, temperature=1.0, ...)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from opd_tasks.context import RunContext
from opd_tasks.engines.base import SamplingParams
from opd_tasks.errors import DataError
from opd_tasks.models import load_tokenizer
from opd_tasks.rollout import RolloutPart, part_seed, rollout_parts, tokenize_prompts
from opd_tasks.stages import Parts, StageResult, write_stage
from storage.datasets import read_prompts
from storage.layout import OFFLINE_ITERATION
from opd_tasks.verifiers import check_domains
from storage.shards import build_provenance


def offline_prompts(prompts: pa.Table, seed: int, n: int) -> pa.Table:
    """n prompts for teacher generation: a permutation of the set by the run seed (its own stream,
    not iteration 0's). More than the set is refused: a prompt twice would give two samples the
    same sample id (off-TEACHER-PROMPT-gG); more samples per prompt is group_size's job."""
    if n > prompts.num_rows:
        raise DataError(f"offline.generate.prompts={n} exceeds the {prompts.num_rows} prompts of data.train; "
                        f"use at most {prompts.num_rows} and raise offline.generate.group_size for more samples")
    order = np.random.default_rng([seed, 1 << 20]).permutation(prompts.num_rows)
    return prompts.take(pa.array(order[:n]))


def teacher_plan(teachers: list, model: str, prompts: pa.Table, source: str) -> list[tuple[object, pa.Table]]:
    """[(teacher config, its prompts)]: every prompt to the teacher named `model`, or with "route"
    each prompt to the teacher of its domain (DataError for a domain no teacher covers)."""
    if model != "route":
        named = [t for t in teachers if t.name == model]
        if not named:
            raise DataError(f"generate: {model!r} is not a teacher of this config; use one of "
                            f"{[t.name for t in teachers]} or route")
        return [(named[0], prompts)]
    by_domain = {t.domain: t for t in teachers if t.domain}
    domains = prompts.column("domain").to_pylist()
    orphans = sorted({str(d) for d in domains if d not in by_domain})
    if orphans:
        raise DataError(f"{source}: generate with model=route, but no teacher has domain(s) {orphans}; set "
                        f"teachers[].domain for them or name one teacher (offline.generate.model / --model)")
    plan = []
    for t in teachers:
        idx = [i for i, d in enumerate(domains) if d == t.domain]
        if idx:
            plan.append((t, prompts.take(pa.array(idx, pa.int64()))))
    return plan


def generate_offline(cfg, fs, stage: str, *, model: str, prompts: int, group_size: int, temperature: float,
                     max_new_tokens: int | None, config_hash: str, generator_factory=None) -> StageResult:
    """Teachers sample `group_size` responses to each of `prompts` prompts of data.train into
    rollout parts at `stage` (fs path): behaviour_logp is the generating teacher's (at `temperature`),
    reward the domain verifier's (null without an answer), iteration -1, sample ids
    off-TEACHER-PROMPT_ID-gG. Part k holds one teacher's prompts; its seed is a function of (run
    seed, k), so a resumed stage writes exactly the missing parts. cfg: a resolved RunConfig.
    generator_factory(teacher) -> Generator replaces the engine (tests)."""
    from opd_tasks.rollout import teacher_generator
    from opd_tasks.scoring import check_tokenizers
    r = cfg.rollout
    max_new = max_new_tokens or r.max_new_tokens
    teachers: dict = {}  # name -> teacher config, of the teachers that generate
    opened: dict = {}  # name -> the one teacher engine open now

    def plan() -> Parts:
        need = ("domain",) if model == "route" else ()
        need += ("answer",) if cfg.offline is not None and cfg.offline.filter.min_reward is not None else ()
        table = offline_prompts(read_prompts(cfg.data.train, need=need), cfg.seed, prompts)
        by_teacher = teacher_plan(cfg.teachers, model, table, cfg.data.train)
        if cfg.offline is not None and cfg.offline.filter.min_reward is not None:
            check_domains(table.column("domain").to_pylist(), cfg.data.verifiers, "offline.filter.min_reward")
        student = cfg.student.path
        fingerprint = check_tokenizers(cfg, student, False, student)  # teachers sample ids the student reads
        tokenizer = load_tokenizer(student, cfg.student.trust_remote_code, role="student")
        per_part = max(1, r.rows_per_part // group_size)
        parts = []  # one teacher's prompts per part, in a fixed order
        for teacher, rows in by_teacher:
            teachers[teacher.name] = teacher
            ids = tokenize_prompts(cfg, tokenizer, rows, cfg.data.train, [(teacher.path, r)], max_new,
                                   "offline.generate.max_new_tokens" if max_new_tokens else "rollout.max_new_tokens")
            for a in range(0, rows.num_rows, per_part):
                sampling = SamplingParams(temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                                          max_new_tokens=max_new, seed=part_seed(cfg.seed, 1 << 20, len(parts)))
                prov = build_provenance("rollout", iteration=OFFLINE_ITERATION, config_hash=config_hash,
                                        tokenizer_path=student, tokenizer_fingerprint=fingerprint,
                                        student_checkpoint=None, generator={"teacher": teacher.name,
                                                                            "path": teacher.path},
                                        sampling=sampling.to_dict(), engine=r.engine, group_size=group_size)
                parts.append(RolloutPart(rows.slice(a, per_part), ids[a:a + per_part], sampling, teacher.name,
                                         prov, id_prefix=f"off-{teacher.name}"))

        def engine(name: str):
            _close(opened)  # the previous teacher's engine (its process) ends before the next one starts
            t = teachers[name]
            opened[name] = generator_factory(t) if generator_factory else teacher_generator(cfg, t)
            return opened[name]

        return rollout_parts(parts, tokenizer, engine, OFFLINE_ITERATION, group_size,
                             inputs={"prompts": cfg.data.train, "model": model,
                                     "teachers": {t.name: t.path for t, _ in by_teacher}},
                             extra={"source": "generate", "prompts": prompts, "group_size": group_size,
                                    "temperature": temperature, "max_new_tokens": max_new},
                             label="offline generation", verifiers=cfg.data.verifiers)

    try:
        return write_stage(fs, stage, name="offline-rollout", kind="rollout", iteration=OFFLINE_ITERATION,
                           config_hash=config_hash, plan=plan)
    finally:
        _close(opened)


def _close(opened: dict) -> None:
    for gen in opened.values():
        getattr(gen, "close", lambda: None)()
    opened.clear()


def run_offline_generation(ctx: RunContext, generator_factory=None) -> StageResult:
    """The offline phase's teacher generation (config offline.generate) into RUN/offline/rollout."""
    g = ctx.cfg.offline.generate
    return generate_offline(ctx.cfg, ctx.layout.fs, ctx.offline_dir("rollout"), model=g.model, prompts=g.prompts,
                            group_size=g.group_size, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                            config_hash=ctx.config_hash, generator_factory=generator_factory)
