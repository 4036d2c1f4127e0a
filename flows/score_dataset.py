"""Offline scoring as a Prefect flow: an existing dataset -> scored Parquet shards + manifest.

    opd score configs/toy.yaml --input responses.parquet --output scored/
    python -m flows.score_dataset configs/toy.yaml responses.parquet scored/

The config names the student (whose tokenizer tokenizes text inputs) and the teachers. An
interrupted run resumes at the first part without a file.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.iteration import IO_RETRIES
from opd_tasks.config import load_config
from opd_tasks.stages import StageResult


@task(name="score-offline", cache_policy=NO_CACHE, **IO_RETRIES)
def score_offline_task(config_path: str, input_path: str, output: str) -> StageResult:
    from opd_tasks.offline.score import score_offline
    from opd_tasks.toy.world import resolve_config
    cfg = load_config(config_path)
    if cfg.toy_world is not None:
        cfg = resolve_config(cfg)
    return score_offline(cfg, input_path, output)


@flow(name="opd-score-dataset", log_prints=True)
def score_dataset(config_path: str, input_path: str, output: str) -> StageResult:
    result = score_offline_task(config_path, input_path, output)
    print(f"scored {result.rows} rows into {output}" + (" (already done)" if result.skipped else
          f" in {result.seconds:.1f}s ({result.tokens_per_s:.0f} tok/s)"))
    return result


def score_dataset_from_cli(config: Path | str, input_path: str, output: str) -> StageResult:
    load_config(config)  # fail fast on a bad config, before Prefect starts
    return score_dataset(str(config), input_path, output)


if __name__ == "__main__":
    import sys
    score_dataset(*sys.argv[1:4])
