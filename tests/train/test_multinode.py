"""train.nnodes > 1: one torchrun agent per node started by train.node_launcher, a c10d rendezvous;
2 nodes x 1 process (both on this machine) train exactly like 1 node x 2 processes. A node whose
launcher fails, or a rendezvous that never completes, is named in the error."""
import dataclasses
import os
import shlex
import socket

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_run

from opd_tasks.config import TrainConfig
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.launch import launch_training, node_commands

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _launch(a, lines=None, **kw):
    return launch_training(config=a.config, scored_dir=a.scored_dir, init_checkpoint=a.init_checkpoint,
                           out_checkpoint=a.out_checkpoint, train_dir=a.train_dir, iteration=a.iteration, env=ENV,
                           on_line=(lines.append if lines is not None else print), **kw)


def test_node_commands_fill_the_template_and_carry_the_env():
    cmds = node_commands(["python", "-m", "torch.distributed.run", "--nnodes", "2"], 2,
                         'ssh node{node_rank} "cd {cwd} && {command}"', "head:29400", env={"A": "1 2"})
    assert cmds[1].startswith('ssh node1 "cd ') and "env 'A=1 2' python -m torch.distributed.run" in cmds[1]
    ssh, host, remote = shlex.split(cmds[0])  # what the local shell passes to ssh
    assert (ssh, host) == ("ssh", "node0") and "A=1 2" in shlex.split(remote)  # and the remote shell gets back
    for bad, why in [({"nnodes": 2}, "rdzv_endpoint"), ({"node_launcher": "ssh {host}"}, "must contain {command}")]:
        with pytest.raises(ValueError, match=why):
            TrainConfig(**bad)


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path, tiny_model_dir):
    _, args = make_run(tmp_path, tiny_model_dir, micro_batch_tokens=40)
    one = args[0]
    two = dataclasses.replace(one, out_checkpoint=str(tmp_path / "nodes2" / "ckpt"), train_dir=str(tmp_path / "nodes2" / "train"))
    lines = []
    m2 = _launch(two, lines, nproc_per_node=1, nnodes=2, rdzv_endpoint=_endpoint(), node_launcher="{command}",
                 rdzv_timeout_s=120)
    m1 = _launch(one, nproc_per_node=2)
    assert m2["world_size"] == m1["world_size"] == 2
    assert any(x.startswith("[node 1] ") for x in lines) and any("opd-train step" in x for x in lines)
    a = load_file(os.path.join(one.out_checkpoint, "hf", "model.safetensors"))
    b = load_file(os.path.join(two.out_checkpoint, "hf", "model.safetensors"))
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6, msg=k)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4  # the step did change the weights


@pytest.mark.slow
def test_a_failing_node_and_a_rendezvous_timeout_name_the_node(tmp_path, tiny_model_dir):
    _, args = make_run(tmp_path, tiny_model_dir)
    a = args[0]
    fail = "if [ {node_rank} = 1 ]; then echo no route to node1; exit 3; fi; {command}"
    with pytest.raises(TrainError, match=r"failed on node 1 \(exit code 3") as err:
        _launch(a, nproc_per_node=1, nnodes=2, rdzv_endpoint=_endpoint(), node_launcher=fail, rdzv_timeout_s=60)
    assert "no route to node1" in str(err.value)
    hang = "if [ {node_rank} = 1 ]; then sleep 120; fi; {command}"  # node 1's agent never starts
    with pytest.raises(TrainError, match=r"did not complete within 3 s \(train.rdzv_timeout_s\): node\(s\) \[1\] "
                                         r"never joined") as err:
        _launch(a, nproc_per_node=1, nnodes=2, rdzv_endpoint=_endpoint(), node_launcher=hang, rdzv_timeout_s=3)
    assert "sleep 120" in str(err.value)
