"""Rollout stage: the current student samples G responses per prompt, with behaviour log-probs.

    run_rollout(ctx, iteration)     # writes RUN/iter-N/rollout/part-*.parquet + _MANIFEST.json
    rollout_parts(parts, ...)       # the one rollout loop's parts (stages.write_stage); also the
                                    # teachers' offline generation (opd_tasks/offline/generate.py)

The iteration's prompts and every part's sampling seed are functions of (run seed, iteration,
part), so a resumed stage regenerates exactly the parts it is missing and keeps the rest.
Rewards come from the domain verifiers (opd_tasks.verifiers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from opd_tasks.context import RunContext
from opd_tasks.engines.base import Generator, SamplingParams
from opd_tasks.models import load_tokenizer
from opd_tasks.prompts import encode_prompts, prompt_limit
from opd_tasks.stages import Parts, StageResult, write_stage
from opd_tasks.verifiers import check_domains, find_verifier
from storage.datasets import read_prompts
from storage.shards import build_provenance, rollout_table

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


def prompts_per_part(cfg) -> int:
    """Prompts in each rollout part (rollout.rows_per_part // G, at least 1)."""
    return max(1, cfg.rollout.rows_per_part // cfg.rollout.group_size)


def rollout_part_count(cfg) -> int:
    """The parts of every iteration's rollout stage (iteration_prompts gives exactly
    prompts_per_iteration prompts): what a streaming scoring stage waits for before the manifest."""
    return -(-cfg.rollout.prompts_per_iteration // prompts_per_part(cfg))


def part_seed(seed: int, iteration: int, part: int) -> int:
    return int(np.random.default_rng([seed, iteration, part, 7]).integers(0, 2**31 - 1))


def sampling_params(ctx: RunContext, seed: int, max_new_tokens: int | None = None, greedy: bool = False) -> SamplingParams:
    r = ctx.cfg.rollout
    return SamplingParams(temperature=0.0 if greedy else r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=max_new_tokens or r.max_new_tokens, seed=seed)


def tokenize_limit(cfg, generators: Sequence[tuple[str, object]], max_new_tokens: int, max_new_field: str,
                   scorers: bool = True) -> tuple[int | None, str]:
    """(most prompt tokens, why): the response must fit on the generating engine(s) [(model path,
    engine config)] and, with `scorers`, on the scoring engine of every teacher (and of the
    reference when the loss reads it)."""
    uses = list(generators)
    if scorers:
        uses += [(t.path, cfg.scoring) for t in cfg.teachers]
        if cfg.needs_reference:
            uses.append(((cfg.reference or cfg.student).path, cfg.scoring))
            uses += [(t.reference.path, cfg.scoring) for t in cfg.teachers if t.reference is not None]
    return prompt_limit(uses, max_new_tokens, max_new_field)


def tokenize_prompts(cfg, tokenizer, rows: pa.Table, source: str, generators: Sequence[tuple[str, object]],
                     max_new_tokens: int, max_new_field: str = "rollout.max_new_tokens") -> list[list[int]]:
    """Token ids of each prompt (opd_tasks.prompts.encode_prompts, data.chat_template), once; a
    prompt that leaves no room for the response (tokenize_limit) is an error."""
    limit, why = tokenize_limit(cfg, generators, max_new_tokens, max_new_field)
    return encode_prompts(tokenizer, rows, cfg.data.chat_template, source, limit=limit, limit_why=why)


def sample_part(gen: Generator, tokenizer, rows: pa.Table, prompt_ids: list[list[int]], iteration: int,
                sampling: SamplingParams, group_size: int, id_prefix: str | None = None,
                verifiers: dict | None = None) -> pa.Table:
    """Generate G responses for each prompt of one part and score them with the verifiers
    (reward null without an answer or a verifier; data.verifiers maps domains to verifiers).
    Sample ids are PREFIX-PROMPT_ID-gG (PREFIX default: iNNNNNN, the iteration)."""
    groups = gen.generate(prompt_ids, group_size, sampling)
    prefix = id_prefix or f"i{iteration:06d}"
    pids, domains, answers = (rows.column(c).to_pylist() for c in ("prompt_id", "domain", "answer"))
    cols: dict[str, list] = {k: [] for k in ("sample_id", "prompt_id", "group_index", "domain", "prompt_ids",
                                             "response_ids", "behaviour_logp", "finish_reason", "reward")}
    for i, samples in enumerate(groups):
        verify = find_verifier(domains[i], verifiers) if answers[i] is not None else None
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


@dataclass(frozen=True)
class RolloutPart:
    """One part to sample: its prompt rows (prompt_id, domain, answer) and their token ids, the
    sampling params, the generating model (consecutive parts of one model share its engine), the
    parts' provenance and the sample-id prefix (sample_part)."""
    rows: pa.Table
    prompt_ids: list[list[int]]
    sampling: SamplingParams
    model: str
    provenance: dict
    id_prefix: str | None = None


def rollout_parts(parts: list[RolloutPart], tokenizer, engine: Callable[[str], Generator], iteration: int,
                  group_size: int, *, inputs: dict, extra: dict | None = None, label: str,
                  verifiers: dict | None = None) -> Parts:
    """The one rollout loop, for stages.write_stage: part k = sample_part of parts[k] on
    engine(parts[k].model), built at the first missing part of each model (the previous model's
    engine is released first). verifiers: data.verifiers (rewards)."""
    current: dict = {}

    def make(k: int) -> tuple[pa.Table, dict]:
        p = parts[k]
        if current.get("model") != p.model:
            current.clear()  # release the previous model's engine before loading the next
            current.update(model=p.model, gen=engine(p.model))
        return (sample_part(current["gen"], tokenizer, p.rows, p.prompt_ids, iteration, p.sampling, group_size,
                            id_prefix=p.id_prefix, verifiers=verifiers), p.provenance)

    return Parts(keys=list(range(len(parts))), make=make, inputs=inputs, extra=extra, vocab_size=len(tokenizer),
                 fault="rollout.part", label=label)


def run_rollout(ctx: RunContext, iteration: int, generator: Generator | None = None) -> StageResult:
    """Write the rollout stage of `iteration` (parts already committed are kept)."""
    cfg = ctx.cfg
    student = ctx.student_path(iteration)

    def plan() -> Parts:
        need = ("domain",) if cfg.combination == "route" else ()
        need += ("answer",) if cfg.loss.kind == "kdrl" else ()
        prompts = iteration_prompts(read_prompts(cfg.data.train, need=need), iteration, cfg.seed,
                                    cfg.rollout.prompts_per_iteration)
        if cfg.loss.kind == "kdrl":
            check_domains(prompts.column("domain").to_pylist(), cfg.data.verifiers, "loss.kind=kdrl")
        tokenizer = load_tokenizer(student, cfg.student.trust_remote_code, role="student")
        # all of the iteration's prompts before any part: a part committed before a bad prompt stopped
        # the stage would be kept on resume, even after a fix of the dataset that reshuffles the prompts
        ids = tokenize_prompts(cfg, tokenizer, prompts, cfg.data.train, [(student, cfg.rollout)],
                               cfg.rollout.max_new_tokens)
        G = cfg.rollout.group_size
        per_part = prompts_per_part(cfg)
        prov = build_provenance("rollout", iteration=iteration, config_hash=ctx.config_hash,
                                tokenizer_path=student, student_checkpoint=student,
                                sampling=sampling_params(ctx, 0).to_dict() | {"seed": "per part"},
                                engine=cfg.rollout.engine, group_size=G)
        parts = [RolloutPart(prompts.slice(a, per_part), ids[a:a + per_part],
                             sampling_params(ctx, part_seed(cfg.seed, iteration, k)), student, prov)
                 for k, a in enumerate(range(0, prompts.num_rows, per_part))]
        return rollout_parts(parts, tokenizer, lambda path: generator or get_generator(ctx, path), iteration, G,
                             inputs={"student": student, "prompts": cfg.data.train}, label=f"rollout iter {iteration}",
                             verifiers=cfg.data.verifiers)

    return write_stage(ctx.layout.fs, ctx.stage_dir(iteration, "rollout"), name="rollout", kind="rollout",
                       iteration=iteration, config_hash=ctx.config_hash, plan=plan)


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
    if r.engine == "hf":
        from opd_tasks.engines import hf_device
        opts["device"] = hf_device(ctx.cfg)
    sleep = ctx.cfg.placement.sleep_mode == "auto"
    gen = ENGINES.get(stage, ("rollout", r.engine, ctx.run_dir),
                      lambda: build_engine(r.engine, model_path, opts, placed, "rollout", ctx.run_dir, sleep=sleep),
                      set(placed.gpus if placed else ()), sleep=sleep)
    if getattr(gen, "_opd_path", model_path) != model_path:
        gen.load_weights(model_path)
    gen._opd_path = model_path
    return gen


def teacher_generator(cfg, teacher, token_budget: int | None = None, stage: str = "offline-generate") -> Generator:
    """A fresh generator of `teacher` on the rollout engine, on the teacher's GPUs
    (placement.teachers.NAME; other stages' engines there are released first), for offline
    generation and eval baselines. The caller closes it when done: one teacher's engine at a time."""
    from opd_tasks.engines import hf_device
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.engines.pool import build_engine
    from opd_tasks.placement import runtime_plan
    r = cfg.rollout
    placed = runtime_plan(cfg).find("scoring", f"teacher {teacher.name}")
    ENGINES.enter(stage, set(placed.gpus if placed else ()))
    opts = dict(dtype=teacher.dtype, token_budget=token_budget or r.token_budget, vllm=r.vllm, url=teacher.url,
                max_concurrency=r.max_concurrency, trust_remote_code=teacher.trust_remote_code)
    if r.engine == "hf":
        opts["device"] = hf_device(cfg)
    return build_engine(r.engine, teacher.path, opts, placed, f"teacher {teacher.name}")
