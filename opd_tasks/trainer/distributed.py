"""Process group, device mesh and FSDP2 wrapping.

Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) the group comes from the environment; under a
plain `python -m` it is a 1-rank group on an in-memory store (no port, no torchrun needed).
CPU uses gloo, CUDA uses NCCL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from opd_tasks.trainer import TrainError


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool  # this process created the group and destroys it at the end


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but torch sees no CUDA device; set train.device: cpu (or auto)")
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> Dist:
    """Join (or create) the process group and build a 1-D device mesh over all ranks."""
    kind = resolve_device(device)
    backend = "nccl" if kind == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return Dist(rank, world, dev, init_device_mesh(kind, (world,), mesh_dim_names=("fsdp",)), owns)


def close_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def enable_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each transformer block's activations in backward (non-reentrant torch checkpoint,
    through transformers; before shard_model: FSDP2's hooks stay outside the recompute)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, mixed_precision: str = "none",
                force: bool = False) -> torch.nn.Module:
    """fully_shard each transformer block (the model's `_no_split_modules` classes), then the root.

    One rank in float32 (and not `force`): the model is only moved to the mesh's device. Sharding
    over one rank changes no number but costs per-step time (DTensor bookkeeping, hooks); the loop,
    the checkpoints (DCP reshards plain <-> sharded state) and the HF export take either.
    Gradients are reduced as a SUM over ranks (divide factor 1): each rank's loss is already
    divided by the global token count, so the sum is the mini-batch gradient.
    bf16: parameters are cast to bf16 for compute; gradients are reduced in float32 and the
    optimizer keeps float32 master weights (this goes through fully_shard at any world size).
    """
    if mesh.size() == 1 and mixed_precision == "none" and not force:
        # empty (meta) parameters stay empty: models.load_for_training fills them on the device
        return model if any(p.is_meta for p in model.parameters()) else model.to(mesh.device_type)
    mp = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise TrainError(f"{type(model).__name__}: no transformer blocks found to shard "
                         f"(_no_split_modules={sorted(block_names)}); opd shards HF causal LMs")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model
