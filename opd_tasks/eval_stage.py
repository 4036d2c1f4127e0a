"""The evaluation stage of a run: greedy per-domain accuracy of each iteration's new student.

    run_evaluation(ctx, iteration)   # -> RUN/iter-N/eval/metrics.json + _MANIFEST.json
    read_baseline(ctx)               # initial student and teachers, once per run: RUN/baseline.json

Evaluated every `eval.every` iterations and always at the last one; an unscheduled iteration
still gets a manifest (metrics say scheduled: false), so "eval done" means the iteration is done.

Decoding runs on the run's rollout engine (rollout.engine: hf on the hf engines' device, vllm,
remote): the student through the rollout stage's own long-lived generator (new weights loaded in
place), each teacher of the baseline through a fresh generator, dropped before the next one.
"""
from __future__ import annotations

from typing import Callable

from opd_tasks.errors import OpdError
from opd_tasks.evaluate import evaluate
from storage.faults import fault_point

def eval_prompts(ctx):
    """The eval split (data.eval, else data.train), first eval.max_prompts rows: the same rows for
    every model and iteration, so accuracies are comparable."""
    from storage.datasets import read_prompts
    cfg = ctx.cfg
    table = read_prompts(cfg.data.eval or cfg.data.train, need=("answer",))
    return table.slice(0, cfg.eval.max_prompts) if cfg.eval.max_prompts else table


def is_scheduled(ctx, iteration: int) -> bool:
    every, last = ctx.cfg.eval.every, ctx.cfg.iterations - 1
    return every > 0 and ((iteration + 1) % every == 0 or iteration == last)


def _accuracy(ctx, model_path: str, rows, gen) -> dict[str, float]:
    """Greedy accuracy of `gen` (a generator of the model at model_path) on `rows`."""
    from opd_tasks.models import load_tokenizer
    from opd_tasks.rollout import tokenize_limit
    e, cfg = ctx.cfg.eval, ctx.cfg
    tokenizer = load_tokenizer(cfg.student.path, cfg.student.trust_remote_code, role="student")
    limit, why = tokenize_limit(cfg, [(model_path, cfg.rollout)], e.max_new_tokens, "eval.max_new_tokens",
                                scorers=False)
    budget = getattr(gen, "token_budget", None)
    if budget is not None:  # the hf engine batches eval by eval.token_budget
        gen.token_budget = e.token_budget
    try:
        return evaluate(gen, tokenizer, rows, e.max_new_tokens, chat_template=cfg.data.chat_template,
                        verifiers=cfg.data.verifiers, limit=limit, limit_why=why,
                        source=cfg.data.eval or cfg.data.train)
    finally:
        if budget is not None:
            gen.token_budget = budget


def student_accuracy(ctx, model_path: str, rows) -> dict[str, float]:
    """Greedy accuracy of the student checkpoint at model_path, on the rollout stage's generator."""
    from opd_tasks.rollout import get_generator
    return _accuracy(ctx, model_path, rows, get_generator(ctx, model_path))


def teacher_accuracy(ctx, teacher, rows) -> dict[str, float]:
    from opd_tasks.rollout import teacher_generator
    gen = teacher_generator(ctx.cfg, teacher, token_budget=ctx.cfg.eval.token_budget, stage="eval")
    try:
        return _accuracy(ctx, teacher.path, rows, gen)
    finally:
        getattr(gen, "close", lambda: None)()  # release this teacher's engine before the next one loads


def read_baseline(ctx) -> dict:
    """Accuracy of the initial student and of every teacher on the eval split, computed once per
    run and kept in RUN/baseline.json."""
    from storage.fs import exists, read_json, write_json_atomic
    fs, path = ctx.layout.fs, ctx.layout.join("baseline.json")
    if exists(fs, path):
        return read_json(fs, path)
    rows = eval_prompts(ctx)
    base = {"student": student_accuracy(ctx, ctx.cfg.student.path, rows),
            "teachers": {t.name: teacher_accuracy(ctx, t, rows) for t in ctx.cfg.teachers},
            "eval_prompts": rows.num_rows, "engine": ctx.cfg.rollout.engine}
    write_json_atomic(fs, path, base)
    return base


def evaluate_stage(ctx, stage: str, *, name: str, iteration: int, scheduled: bool, model: Callable[[], str],
                   fault: str | None = None):
    """The one evaluation stage: when `scheduled`, greedy per-domain accuracy of the HF model at
    model() on the eval split (the baseline computed first, once per run); stage/metrics.json, then
    the manifest. Skipped when the manifest exists; an unscheduled stage still gets one."""
    import time
    from opd_tasks.stages import StageResult
    from storage.manifest import Manifest, commit_manifest, read_manifest, remove_tmp_files, write_json_part
    fs = ctx.layout.fs
    if read_manifest(fs, stage) is not None:
        return StageResult(stage=name, iteration=iteration, skipped=True)
    remove_tmp_files(fs, stage)  # left by a write that a crash interrupted
    t0 = time.perf_counter()
    metrics: dict = {"iteration": iteration, "scheduled": scheduled}
    if scheduled:
        from opd_tasks.engines.lifecycle import release_for_stage
        release_for_stage(ctx.cfg, "eval")
        path = model()
        read_baseline(ctx)  # once per run, before the first evaluation
        rows = eval_prompts(ctx)
        metrics.update(accuracy=student_accuracy(ctx, path, rows), checkpoint=path, eval_prompts=rows.num_rows,
                       engine=ctx.cfg.rollout.engine)
    metrics["seconds"] = time.perf_counter() - t0
    if fault:
        fault_point(fault)
    part = write_json_part(fs, stage, "metrics.json", metrics)
    commit_manifest(fs, stage, Manifest(stage=name, config_hash=ctx.config_hash, parts=[part],
                                        inputs={"checkpoint": metrics.get("checkpoint")}))
    return StageResult(stage=name, iteration=iteration, rows=metrics.get("eval_prompts", 0),
                       seconds=metrics["seconds"], metrics=metrics)


def run_evaluation(ctx, iteration: int):
    """Greedy per-domain accuracy of the checkpoint after training `iteration` (when scheduled by
    eval.every; the last iteration is always evaluated), written to iter-N/eval/metrics.json."""
    from storage.checkpoints import hf_dir, is_complete

    def model() -> str:
        if not is_complete(ctx.layout, iteration):
            raise OpdError(f"{ctx.run_dir}: checkpoint of iteration {iteration} is not complete; "
                           f"train it first (opd resume)")
        return ctx.layout.url_of(hf_dir(ctx.layout, iteration))

    return evaluate_stage(ctx, ctx.stage_dir(iteration, "eval"), name="eval", iteration=iteration,
                          scheduled=is_scheduled(ctx, iteration), model=model, fault="eval")
