"""The offline phase of a run as a Prefect flow: a warm start before the on-policy iterations.

    opd run CONFIG --run-dir runs/x     # a CONFIG with an `offline:` block: opd_run runs this phase first
    opd generate configs/toy.yaml --model adder --output data/gen --prompts 256   # teacher samples only

rollout (teachers generate, or the offline dataset is imported) -> score (every teacher) -> filter
(kept / dropped, and why) -> train (sft on the kept rows, into checkpoints/offline) -> evaluation
(greedy accuracy of the warm-started student). Each step is a stage under RUN/offline/ with its own
manifest and is skipped when that exists; iteration 0 then starts from checkpoints/offline/hf.
A kill during training redoes the train stage from the initial student (deterministic seeds: the
same weights as an uninterrupted run).
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.iteration import IO_RETRIES
from opd_tasks.config import load_config
from opd_tasks.context import RunContext
from opd_tasks.stages import StageResult


@task(name="offline-rollout", cache_policy=NO_CACHE)
def offline_rollout(run_dir: str) -> StageResult:
    ctx = RunContext.load(run_dir)
    if ctx.cfg.offline.source == "dataset":
        from opd_tasks.offline.dataset import import_dataset
        return import_dataset(ctx)
    from opd_tasks.offline.generate import run_offline_generation
    return run_offline_generation(ctx)


@task(name="offline-score", cache_policy=NO_CACHE, **IO_RETRIES)
def offline_score(run_dir: str) -> StageResult:
    from opd_tasks.offline.scoring import run_offline_scoring
    return run_offline_scoring(RunContext.load(run_dir))


@task(name="offline-filter", cache_policy=NO_CACHE)
def offline_filter(run_dir: str) -> StageResult:
    from opd_tasks.offline.filter import run_offline_filter
    return run_offline_filter(RunContext.load(run_dir))


@task(name="offline-train", cache_policy=NO_CACHE)
def offline_train(run_dir: str) -> StageResult:
    from opd_tasks.trainer.stage import run_offline_training
    return run_offline_training(RunContext.load(run_dir), on_line=get_run_logger().info)


@task(name="offline-evaluate", cache_policy=NO_CACHE, **IO_RETRIES)
def offline_evaluate(run_dir: str) -> StageResult:
    from opd_tasks.offline.evaluate import run_offline_evaluation
    return run_offline_evaluation(RunContext.load(run_dir))


@flow(name="opd-offline", log_prints=True)
def opd_offline(run_dir: str) -> dict[str, StageResult]:
    """The offline phase of the run in run_dir (its run.yaml has an `offline:` block)."""
    stages = {"rollout": offline_rollout(run_dir)}
    stages["scored"] = offline_score(run_dir)
    stages["filter"] = offline_filter(run_dir)
    stages["train"] = offline_train(run_dir)
    stages["evaluation"] = offline_evaluate(run_dir)
    for name, s in stages.items():
        print(f"offline {name}: " + ("done before, skipped" if s.skipped
              else f"{s.rows} rows in {s.seconds:.1f}s ({s.tokens_per_s:.0f} tok/s)"))
    f, e = stages["filter"].metrics, stages["evaluation"].metrics
    if f:
        print(f"offline filter: kept {f.get('kept')} of {f.get('rows')} rows; dropped by reason {f.get('reasons')}")
    if e.get("accuracy"):
        print(f"offline warm start accuracy: {e['accuracy']}")
    return stages


# ---- `opd generate`: teacher samples into rollout shards, outside a run --------------------------------

@task(name="generate", cache_policy=NO_CACHE)
def generate_task(config_path: str, output: str, model: str, prompts: int, group_size: int, temperature: float,
                  max_new_tokens: int | None) -> StageResult:
    from opd_tasks.offline.generate import generate_offline
    from opd_tasks.toy.world import resolve_config
    from storage.fs import filesystem
    raw = load_config(config_path)
    cfg = resolve_config(raw) if raw.toy_world is not None else raw
    fs, path = filesystem(output)
    return generate_offline(cfg, fs, path.rstrip("/"), model=model, prompts=prompts, group_size=group_size,
                            temperature=temperature, max_new_tokens=max_new_tokens, config_hash=raw.config_hash())


@flow(name="opd-generate", log_prints=True)
def generate_dataset(config_path: str, output: str, model: str, prompts: int = 256, group_size: int = 1,
                     temperature: float = 1.0, max_new_tokens: int | None = None) -> StageResult:
    result = generate_task(config_path, output, model, prompts, group_size, temperature, max_new_tokens)
    print(f"generated {result.rows} rows into {output}" + (" (already done)" if result.skipped else
          f" in {result.seconds:.1f}s ({result.rows / max(result.seconds, 1e-9):.1f} rows/s, "
          f"{result.tokens_per_s:.0f} tok/s)"))
    return result


def generate_from_cli(config: Path | str, output: str, model: str, prompts: int = 256, group_size: int = 1,
                      temperature: float = 1.0, max_new_tokens: int | None = None) -> StageResult:
    cfg = load_config(config)  # fail fast on a bad config, before Prefect starts
    names = [t.name for t in cfg.teachers]
    from opd_tasks.config import ConfigError
    if model != "route" and model not in names:
        raise ConfigError(f"--model {model!r} is not a teacher of {config}; use one of {names} or route")
    bad = [f"--{k} {v}" for k, v in (("prompts", prompts), ("group-size", group_size), ("temperature", temperature),
                                     ("max-new-tokens", max_new_tokens)) if v is not None and not v > 0]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be > 0")
    return generate_dataset(str(config), output, model, prompts, group_size, temperature, max_new_tokens)


if __name__ == "__main__":
    import sys
    opd_offline(sys.argv[1])
