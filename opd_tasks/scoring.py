"""Scoring stage: every teacher (and the reference for G-OPD) scores every sampled token.

    run_scoring(ctx, iteration)   # rollout/part-k.parquet -> scored/part-k.parquet (+ manifest)
    streams(cfg)                  # does scoring run beside the rollout (scoring.streaming)?
    run_scoring(ctx, iteration, rollout_writing=alive)  # streaming: part k once rollout commits it
    scoring_parts(cfg, keys, table_of, ...)  # the one scoring loop's parts (for stages.write_stage): also
                                  # the offline phase's scoring and `opd score` (opd_tasks/offline/)
    score_table(table, scorers, ...)  # the same on any rollout-shaped table (offline `opd score`)
    recombine(table, mode, teachers)  # new combined teacher_logp from stored per-teacher columns

Scored part k is made from rollout part k, so an interrupted stage resumes at the first missing
part. Streaming (flows/iteration.py runs the rollout task beside this one) only changes when part k
is read: once the rollout commits it (stages.StreamedInput); the scored stage is the same.
Teachers are kept across iterations while no other stage needs their GPUs (engines/lifecycle.py).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.combine import CombinationError, check_domains, combine
from opd_tasks.config import ModelConfig, RunConfig
from opd_tasks.context import RunContext
from opd_tasks.engines.base import Scorer
from opd_tasks.errors import OpdError, ShardError
from opd_tasks.models import local_model_dir
from opd_tasks.stages import Parts, StageResult, StreamedInput, write_stage
from opd_tasks.tokenizers import check_same_tokenizer
from storage.manifest import read_manifest
from storage.shards import TEACHER_PREFIX, build_provenance, flat_logp, part_index, read_part, scored_table

log = logging.getLogger("opd.scoring")
REF = "__ref__"


def _lists(table: pa.Table, column: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-row numpy views of a list column plus its flat values."""
    col = table.column(column).combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    offs = col.offsets.to_numpy()
    return [flat[offs[i]:offs[i + 1]] for i in range(len(col))], flat


def routed_rows(cfg: RunConfig, domains: list[str | None]) -> dict[str, list[np.ndarray]]:
    """Per teacher, the row indices it scores, as the list of calls to its scorer. Under route the
    first call is the teacher's own domain's rows (every row has to be served by a teacher); with
    scoring.teachers: all a second call scores the rest, so the routed rows see the same batches
    (and get the same bits) whether the other rows are scored or not. Otherwise: every row, once."""
    everything = np.arange(len(domains))
    if cfg.combination != "route":
        return {t.name: [everything] for t in cfg.teachers}
    dom = np.asarray(domains, dtype=object)
    check_domains(dom, {t.domain: t.name for t in cfg.teachers})  # before any compute is spent
    calls = {t.name: [np.flatnonzero(dom == t.domain)] for t in cfg.teachers}
    if not cfg.routed_scoring:
        for t in cfg.teachers:
            calls[t.name].append(np.flatnonzero(dom != t.domain))
    return calls


def references(cfg: RunConfig, ref_path: str) -> dict[str, tuple[str, ModelConfig]]:
    """Per teacher, (scorer key, model) of the reference that scores its routed samples: REF for the
    run's reference (`ref_path`), REF + path for a teacher's own other one (teachers[].reference).
    A teacher's reference at the run reference's path is the run reference (one scorer, one call)."""
    out = {}
    for t in cfg.teachers:
        m = cfg.teacher_reference(t.name, ref_path)
        out[t.name] = (REF if m.path == ref_path else REF + m.path, m)
    return out


def _reference_calls(cfg: RunConfig, domains: list[str | None], ref_path: str) -> dict[str, list[np.ndarray]]:
    """Scorer key -> [rows]: every row by the run's reference, unless teachers name their own
    (route only): then each reference scores the rows routed to the teachers that name it."""
    refs = references(cfg, ref_path)
    if cfg.combination != "route" or {k for k, _ in refs.values()} == {REF}:
        return {REF: [np.arange(len(domains))]}
    dom = np.asarray(domains, dtype=object)
    rows: dict[str, list[int]] = {}
    for t in cfg.teachers:
        rows.setdefault(refs[t.name][0], []).extend(np.flatnonzero(dom == t.domain).tolist())
    return {key: [np.array(sorted(r), np.int64)] for key, r in rows.items()}


def _ask_all(names: list[str], scorers: Mapping[str, Scorer], ask: Callable[[str], list]) -> dict[str, list]:
    """{name: ask(name)} in `names` order. Scorers that only wait on a server (RemoteEngine: its
    `concurrent` is true) are asked at once, each in its own thread: K remote teachers then cost the
    longest one's latency, not the sum, and each server computes while the others' answers are parsed.
    In-process engines share this process's cores and are asked one after the other. The first
    failing scorer in `names` order raises, as when they run one by one."""
    apart = [n for n in names if getattr(scorers[n], "concurrent", False)]
    if len(apart) < 2:
        return {n: ask(n) for n in names}
    with ThreadPoolExecutor(len(apart), thread_name_prefix="opd-score") as pool:
        futures = {n: pool.submit(ask, n) for n in apart}
        done = {n: ask(n) for n in names if n not in futures}
        return {n: done[n] if n in done else futures[n].result() for n in names}


def score_table(table: pa.Table, scorers: Mapping[str, Scorer], cfg: RunConfig, with_ref: bool,
                ref_path: str | None = None, where: str = "", first_row: int = 0) -> pa.Table:
    """Rollout-shaped table -> scored table: teacher_logp.NAME for each teacher (null on the rows it
    does not score when scoring is routed: routed_rows), the combination, and ref_logp when
    `with_ref`: the run's reference (scorers[REF], at `ref_path`) on every row, or under route each
    row by its teacher's reference (scorers[REF + path], see references); with scoring.top_k = K each
    teacher's teacher_topk_ids/logp.NAME (K per response token, from the same forward; null where
    its teacher_logp.NAME is). `where` (the input and its part) and `first_row` (the table's first
    row in that input) name a bad row in errors."""
    prompts, _ = _lists(table, "prompt_ids")
    responses, _ = _lists(table, "response_ids")
    domains = table.column("domain").to_pylist()
    calls = routed_rows(cfg, domains)
    ref_calls = _reference_calls(cfg, domains, ref_path) if with_ref else {}
    calls.update(ref_calls)
    per_teacher: dict[str, list[np.ndarray | None]] = {}
    k, teacher_names = cfg.scoring.top_k, {t.name for t in cfg.teachers}
    topk: dict[str, list[tuple[np.ndarray, np.ndarray] | None]] = {}

    def ask(name: str) -> list:  # the scorer's answers for its rows, in calls[name]'s order
        scorer, want_k = scorers[name], k if name in teacher_names else 0
        return [sc for rows in calls[name] if len(rows) for sc in
                (scorer.score_topk([prompts[i] for i in rows], [responses[i] for i in rows], want_k) if want_k
                 else scorer.score([prompts[i] for i in rows], [responses[i] for i in rows]))]
    answers = _ask_all([n for n in scorers if n in calls], scorers, ask)
    for name in answers:
        idx = np.concatenate(calls[name])
        if k and name in teacher_names:
            scored = answers[name]
            out = [sc.logp for sc in scored]
            topk[name] = [None] * table.num_rows
            for i, sc in zip(idx, scored):
                topk[name][i] = (sc.ids.reshape(-1), sc.topk_logp.reshape(-1))
        else:
            out = answers[name]
        for i, lp in zip(idx, out):
            if len(lp) != len(responses[i]) or not np.isfinite(lp).all():
                who = f"reference {name[len(REF):] or ''}".strip() if name.startswith(REF) else f"teacher {name!r}"
                raise ShardError(f"{where + ': ' if where else ''}{who} returned "
                                 f"{'non-finite' if len(lp) == len(responses[i]) else 'misaligned'} log-probs for "
                                 f"sample {table.column('sample_id')[int(i)].as_py()!r} (row {first_row + int(i)}); "
                                 f"check that "
                                 f"model's weights and dtype (NaN/inf usually means overflow in float16)")
        full: list[np.ndarray | None] = [None] * table.num_rows
        for i, lp in zip(idx, out):
            full[i] = lp
        per_teacher[name] = full
    names = [t.name for t in cfg.teachers]
    lengths = np.array([len(r) for r in responses], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # NaN where a teacher did not score: route reads each teacher at its own rows only
    flat = {n: np.concatenate([np.full(len(r), np.nan, np.float32) if lp is None else lp
                               for lp, r in zip(per_teacher[n], responses)]) if responses else np.zeros(0, np.float32)
            for n in names}
    combined = combine(cfg.combination, flat, {t.name: t.weight for t in cfg.teachers},
                       domain_to_teacher={t.domain: t.name for t in cfg.teachers if t.domain},
                       sample_domain=domains, offsets=offsets)
    ref = None
    if with_ref:  # each row from the one reference that scored it
        rows_ref = [next(per_teacher[k][i] for k in ref_calls if per_teacher[k][i] is not None)
                    for i in range(table.num_rows)]
        ref = (np.concatenate(rows_ref) if rows_ref else np.zeros(0, np.float32), offsets)
    base = table.drop_columns([c for c in table.column_names if c.startswith((TEACHER_PREFIX, "teacher_topk_"))
                               or c in ("teacher_logp", "ref_logp")])
    cols = {n: per_teacher[n] if any(lp is None for lp in per_teacher[n]) else (flat[n], offsets) for n in names}
    topk_cols = {n: ([None if x is None else x[0] for x in topk[n]], [None if x is None else x[1] for x in topk[n]])
                 for n in names} if k else None
    return scored_table(base, cols, (combined, offsets), ref, topk=topk_cols)


def recombine(table: pa.Table, combination: str, teachers: list[dict]) -> pa.Table:
    """Rewrite the combined teacher_logp from the stored teacher_logp.NAME columns, without any
    model: `teachers` as in the provenance ([{"name", "weight", "domain"}], see teacher_provenance)."""
    names = [t["name"] for t in teachers]
    missing = [TEACHER_PREFIX + n for n in names if TEACHER_PREFIX + n not in table.column_names]
    if missing:
        raise ShardError(f"cannot recombine: the shard has no column(s) {missing}; teachers that were not "
                         f"scored must be scored first (`opd score`)")
    lengths = pc.list_value_length(table.column("response_ids")).to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = {n: flat_logp(table.column(TEACHER_PREFIX + n), lengths) for n in names}
    unscored = [n for n in names if table.column(TEACHER_PREFIX + n).null_count]
    if unscored and combination != "route":
        raise CombinationError(f"cannot recombine into {combination}: teachers {unscored} scored only the "
                               f"samples routed to them (scoring.teachers: routed); re-score with "
                               f"scoring.teachers: all")
    combined = combine(combination, flat, {t["name"]: t.get("weight", 1.0) for t in teachers},
                       domain_to_teacher={t["domain"]: t["name"] for t in teachers if t.get("domain")},
                       sample_domain=table.column("domain").to_pylist(), offsets=offsets)
    i = table.column_names.index("teacher_logp")
    return table.set_column(i, table.schema.field(i), pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                                               pa.array(combined, pa.float32())))


def teacher_references(cfg: RunConfig, ref_path: str) -> dict[str, str] | None:
    """Which reference scored each teacher's routed rows (provenance), when any teacher has its own."""
    refs = references(cfg, ref_path)
    if cfg.combination != "route" or {k for k, _ in refs.values()} == {REF}:
        return None
    return {name: m.path for name, (_, m) in refs.items()}


def teacher_provenance(cfg: RunConfig) -> list[dict]:
    return [{"name": t.name, "path": t.path, "weight": t.weight, "domain": t.domain} for t in cfg.teachers]


def _present(path: str, role: str) -> str:
    local_model_dir(path, role, need_config=False)  # a URL: copied into the node's model cache
    return path


def check_tokenizers(cfg: RunConfig, student: str, with_ref: bool, ref_path: str) -> str:
    fp = None
    for t in cfg.teachers:
        fp = check_same_tokenizer(student, _present(t.path, f"teacher {t.name!r}"), f"teacher {t.name!r}")
    if with_ref:
        for t in cfg.teachers if cfg.combination == "route" else []:
            if t.reference is not None and t.reference.path != ref_path:
                role = f"teacher {t.name!r}'s reference (teachers[].reference.path)"
                fp = check_same_tokenizer(student, _present(t.reference.path, role), role)
        fp = check_same_tokenizer(student, _present(ref_path, "reference"), "reference")
    return fp


def scoring_engine(cfg: RunConfig, url: str | None) -> str:
    """A teacher with a url is served by that running server (engine remote), unless scoring is hf."""
    return "remote" if url and cfg.scoring.engine != "hf" else cfg.scoring.engine


def get_scorers(cfg: RunConfig, with_ref: bool, ref_path: str, run_dir: str | None = None) -> dict[str, Scorer]:
    """Teachers (and the references, each distinct model once) on their placement.teachers /
    placement.reference GPUs, kept in engines/lifecycle.ENGINES while no other stage needs those GPUs;
    scoring.engine picks the backend."""
    from opd_tasks.engines import hf_device
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.engines.pool import build_engine
    from opd_tasks.placement import reference_role, runtime_plan
    s, sleep = cfg.scoring, cfg.placement.sleep_mode == "auto"
    plan = runtime_plan(cfg)
    wanted = [(t.name, f"teacher {t.name}", t.path, t.dtype, t.trust_remote_code, t.url) for t in cfg.teachers]
    if with_ref:
        r = cfg.reference or cfg.student
        own = dict(references(cfg, ref_path).values()) if cfg.combination == "route" else {REF: r}
        if REF in own:  # not when every teacher names its own other reference
            wanted.append((REF, "reference", ref_path, r.dtype, r.trust_remote_code, None))
        for key, m in own.items():
            if key != REF:  # a teacher's own reference: its own engine in the plan ("reference of NAME")
                wanted.append((key, reference_role(cfg, m.path), m.path, m.dtype, m.trust_remote_code, None))
    specs = []
    # vLLM refuses more prompt log-probs than its max_logprobs (default 20): raise it for scoring.top_k
    vllm_kw = {"max_logprobs": s.top_k, **s.vllm} if s.top_k > 20 else s.vllm
    for name, role, path, dtype, trc, url in wanted:
        engine = scoring_engine(cfg, url)
        placed = plan.find("scoring", role)
        opts = dict(dtype=dtype, token_budget=s.token_budget, vllm=vllm_kw if engine == "vllm" else s.vllm, url=url,
                    max_concurrency=s.max_concurrency, rows_per_request=s.rows_per_request,
                    trust_remote_code=trc)
        if engine == "hf":
            opts["device"] = hf_device(cfg)
        build = (lambda e=engine, p=path, o=opts, pl=placed, r=role:
                 build_engine(e, p, o, pl, r, run_dir, scorer=True, sleep=sleep))
        specs.append((("scoring", engine, path, dtype, url, opts["vllm"].get("max_logprobs")), build, set(placed.gpus if placed else ())))
    engines = ENGINES.get_many("scoring", specs, sleep=sleep)  # started side by side
    return {w[0]: e for w, e in zip(wanted, engines)}


def _apart(a, b) -> bool:
    """Two placed engines that cannot slow each other down: one is a server elsewhere (remote), or both
    are vllm engine processes on GPUs and share none (hf engines run in this process, on one device)."""
    if "remote" in (a.engine, b.engine):
        return True
    return a.engine == b.engine == "vllm" and bool(a.gpus) and bool(b.gpus) and not set(a.gpus) & set(b.gpus)


def streams(cfg: RunConfig) -> bool:
    """Whether an iteration scores rollout part p while the rollout makes part p+1: scoring.streaming
    on/off, or under auto when every scoring engine (teachers and the reference) runs apart from the
    rollout engine (_apart, from the placement plan)."""
    if cfg.scoring.streaming != "auto":
        return cfg.scoring.streaming == "on"
    from opd_tasks.placement import runtime_plan
    plan = runtime_plan(cfg)
    rollout, scorers = plan.find("rollout", "rollout"), plan.stages.get("scoring", [])
    return rollout is not None and bool(scorers) and all(_apart(rollout, p) for p in scorers)


def stage_parts(layout, src: str, what: str) -> tuple[list[int], Callable[[int], pa.Table], Callable[[int], dict]]:
    """(part indices, k -> table of part k, k -> where part k is for errors: {where, first_row}) of
    the committed stage at `src`, or OpdError naming it."""
    m = read_manifest(layout.fs, src)
    if m is None:
        raise OpdError(f"{layout.url_of(src)}: the {what} stage is not complete; run it first (opd resume)")
    parts = {part_index(p.name): p for p in m.parts}
    first = {part_index(p.name): sum(q.rows or 0 for q in m.parts[:i]) for i, p in enumerate(m.parts)}
    return (list(parts), lambda k: read_part(layout.fs, src, parts[k]),
            lambda k: {"where": f"{layout.url_of(src)} part {parts[k].name}", "first_row": first[k]})


def scoring_parts(cfg: RunConfig, keys: list[int], table_of: Callable[[int], pa.Table], *, student: str,
                  with_ref: bool, ref_path: str, provenance: dict, inputs: dict, label: str,
                  vocab_size: int | None = None, fault: str | None = None, metrics: dict | None = None,
                  where_of: Callable[[int], dict] | None = None, run_dir: str | None = None,
                  scorers: Mapping[str, Scorer] | None = None, ready: Callable[[], None] | None = None) -> Parts:
    """The scoring of a stage, for write_stage: part k = score_table(table_of(k)), every teacher (and
    the references when with_ref). Tokenizers are checked and scorers loaded at the first missing
    part only. provenance: the parts' build_provenance fields besides teachers/tokenizer; where_of(k):
    score_table's where/first_row for part k (a bad row names its input, part and row); scorers:
    {teacher name (and REF): Scorer} instead of the configured engines (scripts/gpu_smoke.py); ready:
    called before the manifest (streaming: StreamedInput.check)."""
    setup: dict = {}

    def make(k: int) -> tuple[pa.Table, dict]:
        if not setup:
            fingerprint = check_tokenizers(cfg, student, with_ref, ref_path)
            setup["scorers"] = scorers or get_scorers(cfg, with_ref, ref_path, run_dir)
            setup["prov"] = build_provenance("scored", teachers=teacher_provenance(cfg), combination=cfg.combination,
                                             tokenizer_path=student, tokenizer_fingerprint=fingerprint,
                                             top_k=cfg.scoring.top_k or None, **provenance)
        return (score_table(table_of(k), setup["scorers"], cfg, with_ref, ref_path, **(where_of(k) if where_of else {})),
                setup["prov"])

    return Parts(keys=keys, make=make, inputs=inputs, vocab_size=vocab_size, fault=fault, label=label,
                 metrics=metrics or {}, ready=ready)


def run_scoring(ctx: RunContext, iteration: int, scorers: Mapping[str, Scorer] | None = None,
                rollout_writing: Callable[[], bool] | None = None) -> StageResult:
    """Write the scored stage of `iteration` from its rollout stage (finished parts are kept).
    scorers: {teacher name (and REF): Scorer} instead of the configured engines (scripts/gpu_smoke.py).
    rollout_writing: streaming, while it returns True another thread writes the rollout stage: part k
    is scored once committed, and the manifest waits for the rollout's (stages.StreamedInput)."""
    src, stage = ctx.stage_dir(iteration, "rollout"), ctx.stage_dir(iteration, "scored")
    cfg, with_ref = ctx.cfg, ctx.cfg.needs_reference
    student = ctx.student_path(iteration)
    reference = ctx.reference_path if with_ref else None

    def plan() -> Parts:
        ready = None
        if rollout_writing is not None and read_manifest(ctx.layout.fs, src) is None:
            from opd_tasks.rollout import rollout_part_count
            inp = StreamedInput(ctx.layout, src, "rollout", range(rollout_part_count(cfg)),
                                {"config_hash": ctx.config_hash, "iteration": iteration}, rollout_writing)
            keys, table_of, where_of, ready = inp.keys, inp.table, inp.where, inp.check
        else:
            keys, table_of, where_of = stage_parts(ctx.layout, src, "rollout")
        return scoring_parts(cfg, keys, table_of, student=student, with_ref=with_ref, ref_path=ctx.reference_path,
                             where_of=where_of, run_dir=ctx.run_dir, scorers=scorers, ready=ready,
                             provenance=dict(iteration=iteration, config_hash=ctx.config_hash,
                                             student_checkpoint=student, reference=reference,
                                             engine=cfg.scoring.engine,
                                             scoring_teachers="routed" if cfg.routed_scoring else "all",
                                             teacher_references=teacher_references(cfg, ctx.reference_path)
                                             if with_ref else None),
                             inputs={"rollout": ctx.layout.url_of(src), "teachers": teacher_provenance(cfg),
                                     "reference": reference},
                             label=f"scored iter {iteration} ({len(cfg.teachers) + with_ref} models)",
                             fault="scored.part")

    return write_stage(ctx.layout.fs, stage, name="scored", kind="scored", iteration=iteration,
                       config_hash=ctx.config_hash, plan=plan)
