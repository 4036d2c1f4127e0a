"""The FSDP2 trainer's pieces; `python -m opd_tasks.train` is the entry point.

    batching.py    scored rows -> shuffled mini-batches -> token-budget micro-batches per rank
    distributed.py process group, device mesh, fully_shard wrapping
    checkpoint.py  train state (torch.distributed.checkpoint) + HF safetensors export
    loop.py        old_t recompute, epochs x mini-batches, gradient accumulation, metrics
    schedule.py    the lr of each optimizer step (constant | linear | cosine, warmup), kept in the train state
    worker.py      one rank's iteration: config + shards in, checkpoint + metrics + manifests out
    launch.py      launch_training(): torchrun in a subprocess (one agent per node), logs streamed, errors surfaced
    stage.py       run_training(ctx, iteration): a run's train stage (paths from the layout, skip if done)
"""
from storage.errors import OpdError

ERROR_MARKER = "opd-train error"  # a failing worker's last line starts with it; launch.py surfaces those lines


class TrainError(OpdError):
    """A training stage that cannot run (bad scored shards, checkpoint, config) or whose worker failed."""
