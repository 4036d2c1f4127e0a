"""Rollout stage: the current student samples G responses per prompt, with behaviour log-probs.

    run_rollout(ctx, iteration)     # writes RUN/iter-N/rollout/part-*.parquet + _MANIFEST.json

The iteration's prompts and every part's sampling seed are functions of (run seed, iteration,
part), so a resumed stage regenerates exactly the parts it is missing and keeps the rest.
Rewards come from the domain verifiers (opd_tasks.verifiers).
"""
from __future__ import annotations

import logging
import time
import numpy as np
import pyarrow as pa

from opd_tasks.context import RunContext
from opd_tasks.engines.base import Generator, SamplingParams
from opd_tasks.errors import DataError
from opd_tasks.models import load_tokenizer, max_context
from opd_tasks.stages import StageResult
from opd_tasks.verifiers import get_verifier
from storage.datasets import read_prompts
from storage.faults import fault_point
from storage.manifest import read_manifest, remove_tmp_files
from storage.shards import build_provenance, commit_parts, finished_parts, rollout_table, write_part

log = logging.getLogger("opd.rollout")


def iteration_prompts(prompts: pa.Table, iteration: int, seed: int, n: int) -> pa.Table:
    """n prompts for this iteration: a fresh permutation per pass over the data, so every prompt
    is used once before any repeats; deterministic in (seed, iteration)."""
    total = prompts.num_rows
    per_pass = max(1, total // n)              # iterations per pass over the data
    pass_index, slot = divmod(iteration, per_pass)
    order = np.random.default_rng([seed, pass_index]).permutation(total)
    take = order[(slot * n) % total:][:n]
    if len(take) < n:                          # n > total: wrap around
        take = np.resize(order, n)
    return prompts.take(pa.array(take))


def part_seed(seed: int, iteration: int, part: int) -> int:
    return int(np.random.default_rng([seed, iteration, part, 7]).integers(0, 2**31 - 1))


def sampling_params(ctx: RunContext, seed: int, max_new_tokens: int | None = None, greedy: bool = False) -> SamplingParams:
    r = ctx.cfg.rollout
    return SamplingParams(temperature=1e-5 if greedy else r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=max_new_tokens or r.max_new_tokens, seed=seed)


def tokenize_prompts(tokenizer, texts: list[str], limit: int, source: str, ids: list[str]) -> list[list[int]]:
    """Token ids of each prompt, once; a prompt that leaves no room for the response is an error."""
    out = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for pid, toks in zip(ids, out):
        if len(toks) > limit:
            raise DataError(f"{source}: prompt {pid!r} has {len(toks)} tokens, but the model's context leaves "
                            f"{limit} for the prompt after max_new_tokens; shorten the prompt, lower "
                            f"rollout.max_new_tokens, or drop it from the dataset")
    return out


def sample_part(gen: Generator, tokenizer, rows: pa.Table, prompt_ids: list[list[int]], iteration: int,
                sampling: SamplingParams, group_size: int, id_prefix: str | None = None) -> pa.Table:
    """Generate G responses for each prompt of one part and score them with the verifiers.
    Sample ids are PREFIX-PROMPT_ID-gG (PREFIX default: iNNNNNN, the iteration)."""
    groups = gen.generate(prompt_ids, group_size, sampling)
    prefix = id_prefix or f"i{iteration:06d}"
    pids, domains, answers = (rows.column(c).to_pylist() for c in ("prompt_id", "domain", "answer"))
    cols: dict[str, list] = {k: [] for k in ("sample_id", "prompt_id", "group_index", "domain", "prompt_ids",
                                             "response_ids", "behaviour_logp", "finish_reason", "reward")}
    for i, samples in enumerate(groups):
        verify = get_verifier(domains[i]) if answers[i] is not None else None
        for g, s in enumerate(samples):
            cols["sample_id"].append(f"{prefix}-{pids[i]}-g{g}")
            cols["prompt_id"].append(pids[i])
            cols["group_index"].append(g)
            cols["domain"].append(domains[i])
            cols["prompt_ids"].append(np.asarray(prompt_ids[i], np.int32))
            cols["response_ids"].append(np.asarray(s.response_ids, np.int32))
            cols["behaviour_logp"].append(np.asarray(s.behaviour_logp, np.float32))
            cols["finish_reason"].append(s.finish_reason)
            text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
            cols["reward"].append(None if verify is None else float(verify(text, answers[i])))
    return rollout_table({**cols, "iteration": iteration})


def run_rollout(ctx: RunContext, iteration: int, generator: Generator | None = None) -> StageResult:
    """Write the rollout stage of `iteration` (parts already committed are kept)."""
    fs, stage = ctx.layout.fs, ctx.stage_dir(iteration, "rollout")
    t0 = time.perf_counter()
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="rollout", iteration=iteration, rows=m.rows, skipped=True)
    cfg = ctx.cfg
    student = ctx.student_path(iteration)
    need = ("domain",) if cfg.combination == "route" else ()
    need += ("answer",) if cfg.loss.kind == "kdrl" else ()
    prompts = iteration_prompts(read_prompts(cfg.data.train, need=need), iteration, cfg.seed,
                                cfg.rollout.prompts_per_iteration)
    tokenizer = load_tokenizer(student, cfg.student.trust_remote_code, role="student")
    limit = max_context(student) - cfg.rollout.max_new_tokens
    # all of the iteration's prompts before any part: a part committed before a bad prompt stopped
    # the stage would be kept on resume, even after a fix of the dataset that reshuffles the prompts
    ids = tokenize_prompts(tokenizer, prompts.column("prompt").to_pylist(), limit, cfg.data.train,
                           prompts.column("prompt_id").to_pylist())
    G = cfg.rollout.group_size
    per_part = max(1, cfg.rollout.rows_per_part // G)
    n_parts = -(-prompts.num_rows // per_part)
    prov = build_provenance("rollout", iteration=iteration, config_hash=ctx.config_hash,
                            tokenizer_path=student, student_checkpoint=student,
                            sampling=sampling_params(ctx, 0).to_dict() | {"seed": "per part"},
                            engine=cfg.rollout.engine, group_size=G)
    done = finished_parts(fs, stage, expect={"config_hash": ctx.config_hash})
    remove_tmp_files(fs, stage)  # left by a write that a crash interrupted
    gen = None
    tokens = 0
    for k in range(n_parts):
        if k in done:
            continue
        if gen is None:
            gen = generator or get_generator(ctx, student)
        rows = prompts.slice(k * per_part, per_part)
        table = sample_part(gen, tokenizer, rows, ids[k * per_part:(k + 1) * per_part], iteration,
                            sampling_params(ctx, part_seed(cfg.seed, iteration, k)), G)
        tokens += sum(len(r) for r in table.column("response_ids").to_pylist())
        done[k] = write_part(fs, stage, k, table, prov, vocab_size=len(tokenizer))
        fault_point("rollout.part")
        log.info("rollout iter %d part %d/%d: %d samples", iteration, k + 1, n_parts, table.num_rows)
    m = commit_parts(fs, stage, "rollout", done, ctx.config_hash,
                     inputs={"student": student, "prompts": cfg.data.train})
    return StageResult(stage="rollout", iteration=iteration, rows=m.rows, seconds=time.perf_counter() - t0,
                       tokens=tokens)


def get_generator(ctx: RunContext, model_path: str, stage: str = "rollout") -> Generator:
    """The run's rollout engine (engines/lifecycle.ENGINES), on the GPUs of placement.rollout; kept
    while no other stage needs its GPUs, weights reloaded in place for a new checkpoint."""
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.engines.pool import build_engine
    from opd_tasks.placement import runtime_plan
    r = ctx.cfg.rollout
    placed = runtime_plan(ctx.cfg).find("rollout", "rollout")
    opts = {"dtype": ctx.cfg.student.dtype, "token_budget": r.token_budget, "vllm": r.vllm,
            "url": r.url, "max_concurrency": r.max_concurrency,
            "trust_remote_code": ctx.cfg.student.trust_remote_code}
    sleep = ctx.cfg.placement.sleep_mode == "auto"
    gen = ENGINES.get(stage, ("rollout", r.engine, ctx.run_dir),
                      lambda: build_engine(r.engine, model_path, opts, placed, "rollout", ctx.run_dir, sleep=sleep),
                      set(placed.gpus if placed else ()), sleep=sleep)
    if getattr(gen, "_opd_path", model_path) != model_path:
        gen.load_weights(model_path)
    gen._opd_path = model_path
    return gen


# ---- teacher generation: the offline phase's data (and `opd generate`) -------------------------------

OFFLINE_ITERATION = -1  # the iteration column of offline rows


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
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.engines.pool import build_engine
    from opd_tasks.scoring import check_tokenizers

    t0 = time.perf_counter()
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="offline-rollout", iteration=OFFLINE_ITERATION, rows=m.rows, skipped=True)
    r = cfg.rollout
    max_new = max_new_tokens or r.max_new_tokens
    need = ("domain",) if model == "route" else ()
    need += ("answer",) if cfg.offline is not None and cfg.offline.filter.min_reward is not None else ()
    table = offline_prompts(read_prompts(cfg.data.train, need=need), cfg.seed, prompts)
    plan = teacher_plan(cfg.teachers, model, table, cfg.data.train)
    student = cfg.student.path
    fingerprint = check_tokenizers(cfg, student, False, student)  # teachers sample ids the student reads
    tokenizer = load_tokenizer(student, cfg.student.trust_remote_code, role="student")
    per_part = max(1, r.rows_per_part // group_size)
    parts = []  # (teacher, rows, ids) per part, in a fixed order
    for teacher, rows in plan:
        limit = max_context(teacher.path) - max_new
        ids = tokenize_prompts(tokenizer, rows.column("prompt").to_pylist(), limit, cfg.data.train,
                               rows.column("prompt_id").to_pylist())
        for a in range(0, rows.num_rows, per_part):
            parts.append((teacher, rows.slice(a, per_part), ids[a:a + per_part]))
    done = finished_parts(fs, stage, expect={"config_hash": config_hash})
    remove_tmp_files(fs, stage)  # left by a write that a crash interrupted
    gen, gen_of, tokens = None, None, 0
    for k, (teacher, rows, ids) in enumerate(parts):
        if k in done:
            continue
        if gen_of is not teacher:  # one teacher's engine at a time
            getattr(gen, "close", lambda: None)()  # end the previous teacher's engine (process) first
            gen, placed = None, _teacher_placement(cfg, teacher)
            ENGINES.enter("offline-generate", set(placed.gpus if placed else ()))  # other engines on its GPUs go
            gen = (generator_factory(teacher) if generator_factory else
                   build_engine(r.engine, teacher.path, dict(dtype=teacher.dtype, token_budget=r.token_budget,
                                vllm=r.vllm, url=teacher.url, max_concurrency=r.max_concurrency,
                                trust_remote_code=teacher.trust_remote_code),
                                placed, f"teacher {teacher.name}"))
            gen_of = teacher
        sampling = SamplingParams(temperature=temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=max_new,
                                  seed=part_seed(cfg.seed, 1 << 20, k))
        part = sample_part(gen, tokenizer, rows, ids, OFFLINE_ITERATION, sampling, group_size,
                           id_prefix=f"off-{teacher.name}")
        prov = build_provenance("rollout", iteration=OFFLINE_ITERATION, config_hash=config_hash,
                                tokenizer_path=student, tokenizer_fingerprint=fingerprint, student_checkpoint=None,
                                generator={"teacher": teacher.name, "path": teacher.path},
                                sampling=sampling.to_dict(), engine=r.engine, group_size=group_size)
        tokens += sum(len(x) for x in part.column("response_ids").to_pylist())
        done[k] = write_part(fs, stage, k, part, prov, vocab_size=len(tokenizer))
        fault_point("rollout.part")
        log.info("offline generation part %d/%d (%s): %d samples", k + 1, len(parts), teacher.name, part.num_rows)
    getattr(gen, "close", lambda: None)()
    m = commit_parts(fs, stage, "rollout", done, config_hash,
                     inputs={"prompts": cfg.data.train, "model": model,
                             "teachers": {t.name: t.path for t, _ in plan}},
                     extra={"source": "generate", "prompts": prompts, "group_size": group_size,
                            "temperature": temperature, "max_new_tokens": max_new})
    return StageResult(stage="offline-rollout", iteration=OFFLINE_ITERATION, rows=m.rows,
                       seconds=time.perf_counter() - t0, tokens=tokens)


def _teacher_placement(cfg, teacher):
    """A teacher sampling (offline phase) runs on its scoring GPUs (placement.teachers.NAME)."""
    from opd_tasks.placement import runtime_plan
    return runtime_plan(cfg).find("scoring", f"teacher {teacher.name}")


def run_offline_generation(ctx: RunContext, generator_factory=None) -> StageResult:
    """The offline phase's teacher generation (config offline.generate) into RUN/offline/rollout."""
    g = ctx.cfg.offline.generate
    return generate_offline(ctx.cfg, ctx.layout.fs, ctx.offline_dir("rollout"), model=g.model, prompts=g.prompts,
                            group_size=g.group_size, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                            config_hash=ctx.config_hash, generator_factory=generator_factory)
