"""The Prefect task of the train stage: launch_training with the run's world size, logs to Prefect.

    metrics = train_task(cfg.train, config="R/run.yaml", scored_dir=..., init_checkpoint=...,
                         out_checkpoint=..., train_dir=..., iteration=3)
"""
from __future__ import annotations

from prefect import get_run_logger, task

from opd_tasks.config import TrainConfig
from opd_tasks.trainer.launch import launch_training


@task(name="train", retries=0, task_run_name="train-{iteration}")
def train_task(train: TrainConfig, *, config: str, scored_dir: str, init_checkpoint: str, out_checkpoint: str,
               train_dir: str, iteration: int, rdzv_endpoint: str | None = None, env: dict | None = None) -> dict:
    """Train one iteration (torchrun, train.nproc_per_node ranks x train.nnodes); returns metrics.json.

    No retries by default: a failed stage restarts from its init checkpoint and would fail the same
    way on bad input; add `.with_options(retries=...)` for flaky hardware.
    """
    logger = get_run_logger()
    return launch_training(config=config, scored_dir=scored_dir, init_checkpoint=init_checkpoint,
                           out_checkpoint=out_checkpoint, train_dir=train_dir, iteration=iteration,
                           nproc_per_node=train.nproc_per_node, nnodes=train.nnodes, rdzv_endpoint=rdzv_endpoint,
                           env=env, on_line=logger.info)
