"""`python -m opd_tasks.train` under torchrun: 2 CPU ranks match a plain step; kill + resume; errors surface."""
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from train_helpers import make_run, plain_iteration

from opd_tasks.trainer import TrainError
from opd_tasks.trainer.batching import mini_batches, rank_plan
from opd_tasks.trainer.launch import launch_training, run_streaming, torchrun_command, trainer_args
from opd_tasks.trainer.loop import LoopConfig
from opd_tasks.trainer.worker import load_rows, loss_params, make_optimizer, read_config

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# What is exact here: 2 ranks compute the plain step's gradients up to float32 summation order (the
# all-reduce and the micro-batches add in another order). Adam at its default eps = 1e-8 divides by
# sqrt(v): for a gradient element near zero that rounding becomes a visible fraction of lr (1.4e-5
# was seen on one machine, nothing on another). With eps = 1 the update is lr * m / (sqrt(v) + 1),
# within lr * |dg| of the plain one, so STEPS * LR * 1e-4 (|dg| <= 1e-4: float32 rounding of
# gradients of size <= 1, generously) bounds the weights on any machine; the optimizer's own code
# (fused AdamW, its state across the kill) is the same on both sides: make_optimizer.
LR, STEPS = 1e-3, 4
WEIGHT_ATOL = STEPS * LR * 1e-4


def _plain_reference(tiny_model_dir, args):
    """Plain (non-sharded, one forward per mini-batch) iterations 0 and 1 in memory."""
    cfg = read_config(args[0].config)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    t = cfg.train
    opt = make_optimizer(model, cfg)
    losses, states = [], []
    for a in args:
        loop = LoopConfig(epochs=t.epochs, mini_batches=t.mini_batches, micro_batch_tokens=t.micro_batch_tokens,
                          grad_clip=t.grad_clip, seed=cfg.seed, iteration=a.iteration)
        losses += plain_iteration(model, opt, load_rows(a.scored_dir, cfg), loss_params(cfg, a.iteration), loop)
        states.append(copy.deepcopy(model.state_dict()))
    return losses, states


def _launch(a, nproc):
    return launch_training(config=a.config, scored_dir=a.scored_dir, init_checkpoint=a.init_checkpoint,
                           out_checkpoint=a.out_checkpoint, train_dir=a.train_dir, iteration=a.iteration,
                           nproc_per_node=nproc, env=ENV, on_line=print)


@pytest.mark.slow
def test_two_ranks_match_plain_steps_then_kill_and_resume(tmp_path, tiny_model_dir):
    _, args = make_run(tmp_path, tiny_model_dir, micro_batch_tokens=40, lr=LR, adam_eps=1.0)
    want_losses, want_states = _plain_reference(tiny_model_dir, args)
    rows = load_rows(args[0].scored_dir, read_config(args[0].config))
    plans = [rank_plan(mini, rows.lengths, 40, r, 2) for mini in mini_batches(len(rows), 2, 0, 0, 0) for r in (0, 1)]
    assert any(None in p for p in plans)  # a rank runs a dummy micro-batch: its collectives must still match

    # iteration 0 on 2 ranks (gloo): same losses and weights as the plain steps
    m0 = _launch(args[0], nproc=2)
    assert m0["world_size"] == 2 and [s["step"] for s in m0["steps"]] == [1, 2]
    assert max(abs(s["loss"] - w) for s, w in zip(m0["steps"], want_losses[:2])) < 1e-5
    hf0 = AutoModelForCausalLM.from_pretrained(os.path.join(args[0].out_checkpoint, "hf")).state_dict()
    for k, v in want_states[0].items():
        torch.testing.assert_close(hf0[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert max(float((hf0[k] - v).abs().max()) for k, v in start.items()) > 100 * WEIGHT_ATOL  # it trained

    # iteration 1 in one plain process, killed at its first step (before the checkpoint commits)
    cmd = [sys.executable, "-m", "opd_tasks.train", *trainer_args(**args[1].__dict__)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1"})
    killed_at = None
    for line in proc.stdout:
        if line.startswith("opd-train step"):
            killed_at = line
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(args[1].train_dir, "_MANIFEST.json"))

    # the stage restarts from iteration 0's checkpoint (written by 2 ranks, read by 1 plain process)
    run_streaming(cmd, env=ENV, on_line=print)
    m1 = json.loads(open(os.path.join(args[1].train_dir, "metrics.json")).read())
    assert [s["step"] for s in m1["steps"]] == [3, 4]
    assert max(abs(s["loss"] - w) for s, w in zip(m1["steps"], want_losses[2:])) < 1e-5
    assert f'"loss": {round(m1["steps"][0]["loss"], 6)}' in killed_at  # the killed run's step 3, same loss
    hf1 = AutoModelForCausalLM.from_pretrained(os.path.join(args[1].out_checkpoint, "hf")).state_dict()
    for k, v in want_states[1].items():
        torch.testing.assert_close(hf1[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.slow
def test_launcher_fails_with_the_workers_error_text(tmp_path, tiny_model_dir):
    _, args = make_run(tmp_path, tiny_model_dir)
    a = args[0]
    missing = str(tmp_path / "iter-000000" / "nothing-here")
    lines = []
    with pytest.raises(TrainError) as err:
        launch_training(config=a.config, scored_dir=missing, init_checkpoint=a.init_checkpoint,
                        out_checkpoint=a.out_checkpoint, train_dir=a.train_dir, iteration=0, nproc_per_node=1,
                        env=ENV, on_line=lines.append)
    msg = str(err.value)
    assert "training iteration 0 failed (exit code" in msg
    assert "opd-train error (rank 0)" in msg and "nothing-here" in msg
    assert any("opd-train error" in line for line in lines)  # streamed as it came


def test_multi_node_needs_a_rendezvous_endpoint():
    with pytest.raises(TrainError, match="rendezvous endpoint"):
        torchrun_command([], nproc_per_node=8, nnodes=2)
    cmd = torchrun_command(["--iteration", "0"], nproc_per_node=8, nnodes=2, rdzv_endpoint="head:29400")
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "head:29400" and "--standalone" not in cmd
    assert "--standalone" in torchrun_command([], nproc_per_node=2)
