"""train.no_sync_accumulation at 2 ranks: FSDP2 reduces gradients once per mini-batch, and the
gradients equal those of a reduce-scatter per micro-batch (the default)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

MICRO_TOKENS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from train_helpers import scored_table

    from opd_tasks.losses import LossParams
    from opd_tasks.trainer.batching import rank_plan, rows_from_table
    from opd_tasks.trainer.distributed import close_distributed, init_distributed, shard_model
    from opd_tasks.trainer.loop import LoopConfig, train_iteration

    d = init_distributed("cpu")
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
        reduce, calls = pg.foreach_reduce, [0]

        def counting(*a, **k):  # one call = one reduce-scatter of a parameter group's gradients
            calls[0] += 1
            return reduce(*a, **k)

        pg.foreach_reduce = counting
        result = {}
        for no_sync in (False, True):
            rows = rows_from_table(scored_table(n_prompts=4, group=2, seed=8), "t")
            model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), d.mesh)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: compare the gradients
            loop = LoopConfig(mini_batches=1, micro_batch_tokens=MICRO_TOKENS, no_sync=no_sync)
            calls[0] = 0
            train_iteration(model, opt, rows, LossParams(kind="rkl"), loop, d.device)
            result[no_sync] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            result[f"reduces_{no_sync}"] = calls[0]
        result["micro_batches"] = len(rank_plan(torch.arange(len(rows)), rows.lengths, MICRO_TOKENS, rank, 2))
        if rank == 0:
            torch.save(result, out)
    finally:
        close_distributed(d)


@pytest.mark.slow
def test_no_sync_accumulation_gives_the_same_gradients_at_two_ranks(tmp_path, tiny_model_dir):
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_worker, args=(_free_port(), tiny_model_dir, out), nprocs=2, start_method="spawn")
    res = torch.load(out)
    n = res["micro_batches"]
    assert n >= 3  # several micro-batches per rank: the accumulation is exercised
    groups = 3  # the tiny Llama's 2 blocks + the root
    assert res["reduces_False"] == groups * n and res["reduces_True"] == groups  # one reduce per mini-batch
    for name, g in res[False].items():
        torch.testing.assert_close(res[True][name], g, rtol=0, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in res[False].values()) > 1e-3
