"""Train state with torch.distributed.checkpoint, and the HF safetensors export.

A checkpoint directory (storage.checkpoints gives the names and commits the manifest):
    dcp/             DCP: model + optimizer state (sharded, one file per rank) and "train": a JSON
                     string of step, iteration, every rank's RNG state and the lr schedule
    hf/              config.json, model.safetensors, tokenizer files: from_pretrained and vLLM load it
    _MANIFEST.json   written last: only then does the checkpoint count

What DCP writes: dcp/__R_0.distcp per rank (tensors, read back with torch.load(weights_only=True);
non-tensor entries such as "train" with torch.load(weights_only=False)) and dcp/.metadata, a pickle
of torch's checkpoint Metadata (the state dict's keys, shapes, dtypes and where each shard's bytes
sit), written with pickle.dump and read with pickle.load (torch 2.13). Unpickling runs any code the
file names, so the trainer loads DCP state only from its own run's checkpoints
(worker.resolve_init); weights from anywhere else come in as safetensors (opd_tasks.models).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

# Files of an HF model directory that the export writes itself (everything else: tokenizer files,
# chat template, generation_config.json, is copied from the init model into the export).
_MODEL_FILES = ("config.json",)
# Optimizer param-group keys that pick an implementation (not state): a checkpoint written by a
# single-tensor AdamW must not turn a fused one back into single-tensor on resume.
_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rng_states() -> list[str]:
    """Every rank's torch RNG state (CPU, + CUDA when in use), base64 of torch.save, gathered to all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    mine = base64.b64encode(buf.getvalue()).decode()
    _, world = _rank_world()
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def set_rng_state(states: list[str]) -> None:
    """Restore this rank's RNG state from rng_states() (rank r takes entry r mod len)."""
    rank, _ = _rank_world()
    state = torch.load(io.BytesIO(base64.b64decode(states[rank % len(states)])), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dcp_dir: str, train: dict) -> None:
    """Collective: DCP save of {"model", "optim"} (sharded state dicts) and "train" (a JSON string of
    step, iteration, RNG states: identical on every rank) into dcp_dir (path or URL)."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, "train": json.dumps(train)}, checkpoint_id=dcp_dir)


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dcp_dir: str) -> dict:
    """Collective: load a save_state() directory into an (already sharded) model and its optimizer;
    returns the "train" dict. Works across world sizes (DCP reshards)."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd, "train": ""}
    dcp.load(state, checkpoint_id=dcp_dir)
    impl = [{k: g[k] for k in _IMPL_KEYS if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for g, keep in zip(optimizer.param_groups, impl):  # how to step is this optimizer's, not the saved one's
        g.update(keep)
    return json.loads(state["train"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state dict on CPU (rank 0 gets it; other ranks get {})."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def copy_model_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy every top-level file of an HF model dir but weights and config.json (tokenizer, chat
    template, generation config), so the export behaves like the model it was trained from."""
    copied = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or name in _MODEL_FILES or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, os.path.join(dst_dir, name))
        copied.append(name)
    return copied


def save_hf(state: dict[str, torch.Tensor], config, dst_dir: str, init_dir: str,
            dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> None:
    """Write a complete HF model dir: config + model.safetensors (from a full state dict) + the other
    files of init_dir (tokenizer, generation config).

    state: the full state dict (full_state_dict on rank 0); config: the transformers config of the
    model. The model is built on the meta device and takes the tensors as they are (no copy), so
    save_pretrained handles tied weights and sharding of large files. Local dst_dir only.
    """
    from opd_tasks.models import empty_causal_lm

    shell = empty_causal_lm(config, dtype, trust_remote_code)
    shell.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    shell.tie_weights()
    os.makedirs(dst_dir, exist_ok=True)
    shell.save_pretrained(dst_dir, safe_serialization=True)
    copy_model_files(init_dir, dst_dir)


def export_hf(model: torch.nn.Module, config, dst_dir: str, init_dir: str, dtype: torch.dtype,
              put=None, trust_remote_code: bool = False) -> None:
    """Collective: gather the full weights and, on rank 0, save_hf into dst_dir.

    put: None writes dst_dir on local disk; otherwise a callable(local_dir) that uploads a
    finished local export (used for fsspec URLs).
    """
    state = full_state_dict(model)
    rank, _ = _rank_world()
    if rank == 0:
        if put is None:
            save_hf(state, config, dst_dir, init_dir, dtype, trust_remote_code)
        else:
            with tempfile.TemporaryDirectory(prefix="opd-hf-") as tmp:
                save_hf(state, config, tmp, init_dir, dtype, trust_remote_code)
                put(tmp)
    if dist.is_initialized():
        dist.barrier()
