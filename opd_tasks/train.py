"""Train the student for one iteration on its scored shards: FSDP2, one torchrun worker per rank.

Reads the resolved run config and the iteration's scored stage, initializes the student from the
previous checkpoint (model + optimizer + step + RNG, via torch.distributed.checkpoint) or from an
HF model directory, recomputes old_t once, runs train.epochs x train.mini_batches optimizer steps
of token-budget micro-batches, and writes:
    OUT/dcp/ (model, optimizer, step, RNG), OUT/hf/ (safetensors + tokenizer), OUT/_MANIFEST.json (last)
    TRAIN_DIR/metrics.json, TRAIN_DIR/_MANIFEST.json (last of all)
Rank 0 prints one `opd-train step {json}` line per optimizer step; a failing rank prints
`opd-train error (rank R): ...` before exiting non-zero.

    # one process (no torchrun needed: a 1-rank gloo group on an in-memory store)
    python -m opd_tasks.train --config R/run.yaml --scored-dir R/iter-000003/scored \\
        --init-checkpoint R/checkpoints/iter-000002 --out-checkpoint R/checkpoints/iter-000003 \\
        --train-dir R/iter-000003/train --iteration 3
    # two CPU ranks (gloo); on GPUs the same with --nproc-per-node = GPUs per node (NCCL)
    torchrun --standalone --nproc-per-node 2 -m opd_tasks.train --config R/run.yaml ... (as above)

--init-checkpoint takes the previous iteration's checkpoint dir, or the student's HF model
directory for iteration 0. Every path may be an fsspec URL (s3://...). From Python:
    opd_tasks.trainer.stage.run_training(ctx, iteration)   # a run's train stage: paths from the layout, skip if done
    opd_tasks.trainer.launch.launch_training(...)   # the torchrun launcher, explicit paths
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from torch.distributed.elastic.multiprocessing.errors import record

from opd_tasks.trainer import ERROR_MARKER


def parse_args(argv: list[str] | None = None):
    from opd_tasks.trainer.worker import TrainArgs

    p = argparse.ArgumentParser(prog="python -m opd_tasks.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's resolved config (YAML)")
    p.add_argument("--scored-dir", required=True, help="the iteration's scored stage directory")
    p.add_argument("--init-checkpoint", required=True, help="previous checkpoint dir or the student's HF dir")
    p.add_argument("--out-checkpoint", required=True, help="this iteration's checkpoint dir")
    p.add_argument("--train-dir", required=True, help="the iteration's train stage dir (metrics.json)")
    p.add_argument("--iteration", required=True, type=int)
    a = p.parse_args(argv)
    return TrainArgs(config=a.config, scored_dir=a.scored_dir, init_checkpoint=a.init_checkpoint,
                     out_checkpoint=a.out_checkpoint, train_dir=a.train_dir, iteration=a.iteration)


@record
def main(argv: list[str] | None = None) -> int:
    from opd_tasks.config import ConfigError
    from opd_tasks.trainer.worker import run
    from storage.errors import OpdError

    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        run(args)
    except (OpdError, ConfigError) as err:
        print(f"{ERROR_MARKER} (rank {rank}): {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # noqa: BLE001 - report, then let torchrun record the traceback
        traceback.print_exc()
        print(f"{ERROR_MARKER} (rank {rank}): {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
