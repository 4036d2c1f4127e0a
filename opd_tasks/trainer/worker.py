"""What one trainer process does for one iteration (called by `python -m opd_tasks.train`).

read config + scored shards -> build and shard the student (HF init or previous DCP state) ->
train_iteration -> DCP train state + HF export + checkpoint manifest -> metrics + train manifest.

Iteration -1 (OFFLINE_ITERATION) is the offline phase: the rows the offline filter kept (its
decisions sit beside the scored dir, in ../filter), the `sft` loss, offline.epochs x
offline.mini_batches steps at offline.lr (default train.lr). Everything else is the same code.
"""
from __future__ import annotations

import hashlib
import math
import os
import posixpath
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import yaml

from opd_tasks.config import ConfigError, RunConfig, parse_config, read_yaml
from opd_tasks.logprobs import DTYPES
from opd_tasks.losses import LossParams, annealed_w_kd
from opd_tasks.models import load_for_training, local_model_dir
from opd_tasks.trainer import TrainError
from opd_tasks.trainer import checkpoint as ckpt
from opd_tasks.trainer.batching import rows_from_table
from opd_tasks.trainer.distributed import (close_distributed, enable_activation_checkpointing, init_distributed,
                                           shard_model)
from opd_tasks.trainer.loop import LoopConfig, choose_old_logp, print_step, train_iteration
from opd_tasks.trainer.schedule import Schedule
from storage.checkpoints import commit_checkpoint
from storage.errors import StorageError
from storage.fs import exists, filesystem, is_local, read_bytes, retried, storage_failure
from storage.layout import OFFLINE_ITERATION
from storage.manifest import MANIFEST_NAME, Manifest, commit_manifest, remove_tmp_files, write_json_part



@dataclass(frozen=True)
class TrainArgs:
    """The trainer's inputs; every path is a local path or an fsspec URL."""
    config: str           # resolved run config (YAML)
    scored_dir: str       # the iteration's scored stage (manifest-verified)
    init_checkpoint: str  # an opd checkpoint dir (dcp/ + hf/ + _MANIFEST.json) or an HF model dir
    out_checkpoint: str   # where this iteration's checkpoint goes (replaced when incomplete)
    train_dir: str        # the train stage dir: metrics.json, then _MANIFEST.json
    iteration: int


def read_config(url: str) -> RunConfig:
    fs, path = filesystem(url)
    if not exists(fs, path):
        raise ConfigError(f"{url}: config file not found")
    try:
        data = read_yaml(read_bytes(fs, path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{url}: not valid YAML: {err}") from None
    return parse_config(data if isinstance(data, dict) else {}, url)


def loss_params(cfg: RunConfig, iteration: int) -> LossParams:
    if iteration == OFFLINE_ITERATION:
        if cfg.offline is None:
            raise TrainError("iteration -1 is the offline phase, but the config has no offline block")
        return LossParams(kind=cfg.offline.loss, aggregation=cfg.offline.aggregation, tis_cap=None)
    lc = cfg.loss
    return LossParams(kind=lc.kind, lam=lc.lam, discount=lc.discount, clip_eps_low=lc.clip_eps_low,
                      clip_eps_high=lc.clip_eps_high, tis_cap=lc.tis_cap, aggregation=lc.aggregation,
                      w_rl=lc.w_rl, w_kd=annealed_w_kd(lc.w_kd, lc.w_kd_end, iteration, lc.w_kd_anneal_iterations or 1),
                      kd_estimator=lc.kd_estimator, kd_only_incorrect=lc.kd_only_incorrect,
                      divergence=lc.divergence, beta=lc.beta, tail=lc.tail, sampled_weight=lc.sampled_weight)


def offline_phase(loop: LoopConfig, optimizer: torch.optim.Optimizer, cfg: RunConfig) -> LoopConfig:
    """The offline phase's epochs, optimizer steps per epoch and learning rate (offline.lr, default
    train.lr; constant: train.lr_schedule is the on-policy iterations')."""
    lr = cfg.offline.lr if cfg.offline.lr is not None else cfg.train.lr
    for g in optimizer.param_groups:
        g["lr"] = lr
    return replace(loop, epochs=cfg.offline.epochs, mini_batches=cfg.offline.mini_batches,
                   schedule=Schedule(kind="constant", lr=lr))


def rank_seed(seed: int, iteration: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"opd-rng/{seed}/{iteration}/{rank}".encode()).digest()[:8], "little") >> 1


def resolve_init(url: str, out_checkpoint: str | None = None) -> tuple[str, str | None]:
    """(HF dir URL, DCP dir URL or None) of an init checkpoint (dcp/ + hf/) or an HF model dir.

    DCP train state is read only from the run's own checkpoints (the directory that holds
    out_checkpoint, when given): DCP's dcp/.metadata is a pickle (torch's checkpoint Metadata
    object, read with pickle.load), and unpickling a file runs whatever code it names. Weights
    from anywhere else come in through their HF directory (safetensors)."""
    fs, path = filesystem(url)
    if exists(fs, posixpath.join(path, MANIFEST_NAME)):
        if out_checkpoint is not None and _parent(url) != _parent(out_checkpoint):
            raise TrainError(f"{url}: DCP train state is loaded only from this run's own checkpoints "
                             f"({_parent(out_checkpoint)[1]}): its dcp/.metadata is a pickle, and unpickling "
                             f"runs code; start from the checkpoint's HF export instead ({url}/hf)")
        return _url(fs, posixpath.join(path, "hf")), _url(fs, posixpath.join(path, "dcp"))
    if exists(fs, posixpath.join(path, "dcp")):
        raise TrainError(f"{url}: checkpoint has no {MANIFEST_NAME}: the train stage that wrote it did not "
                         f"finish; re-run that iteration's train stage first")
    if not exists(fs, posixpath.join(path, "config.json")):
        raise TrainError(f"{url}: neither an opd checkpoint (dcp/ + hf/ + {MANIFEST_NAME}) nor an HF model "
                         f"directory (config.json); pass --init-checkpoint the student's HF directory or "
                         f"the previous iteration's checkpoint")
    return url, None


def _url(fs, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _parent(url: str) -> tuple[str, str]:
    """(protocol, URL of the directory that holds `url`); local paths resolved (symlinks, ..)."""
    fs, path = filesystem(url)
    if is_local(fs):
        return "file", os.path.dirname(os.path.realpath(path))
    return str(fs.protocol), _url(fs, posixpath.dirname(path.rstrip("/")))


def load_rows(scored_dir: str, cfg: RunConfig, iteration: int = 0):
    from storage.shards import read_stage  # noqa: PLC0415 - storage.shards pulls pyarrow.dataset
    fs, path = filesystem(scored_dir)
    table = read_stage(fs, path)
    if iteration == OFFLINE_ITERATION:  # the kept rows; a teacher's behaviour_logp is not the student's old_t
        from opd_tasks.offline.filter import kept_rows  # noqa: PLC0415
        return rows_from_table(kept_rows(fs, path, table).drop_columns(["behaviour_logp"]), scored_dir,
                               need_behaviour=False)
    topk = None
    if cfg.loss.kind == "topk":  # which teacher's top-k counts in which row (route / mixture)
        from opd_tasks.combine import topk_row_weights  # noqa: PLC0415
        topk = topk_row_weights(cfg.combination, {t.name: t.weight for t in cfg.teachers},
                                {t.domain: t.name for t in cfg.teachers if t.domain}, table.column("domain").to_pylist())
    source = f"{scored_dir} (iteration {iteration})" if topk is not None else scored_dir
    return rows_from_table(table, source, need_ref=cfg.needs_reference, need_reward=cfg.loss.kind == "kdrl",
                           need_behaviour=cfg.loss.tis_cap is not None, topk_weights=topk)


def build_model(hf_url: str, cfg: RunConfig, mesh):
    """The student, float32, sharded over `mesh`, loaded lean: each rank materializes only its own
    shard from the safetensors files (a URL: from the node's cached copy). Activation checkpointing
    (train.activation_checkpointing) is set before fully_shard."""
    def prepare(model):
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        return shard_model(model, mesh, cfg.train.mixed_precision)
    return load_for_training(hf_url, "float32", prepare=prepare, device=mesh.device_type,
                             trust_remote_code=cfg.student.trust_remote_code, role="student")


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    # fused: one kernel for all parameters (CPU and CUDA); the single-tensor default cost 15% of a step
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                             weight_decay=t.weight_decay, fused=True)


def _apply_hparams(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> None:
    """The config's lr/betas/weight decay win over the ones stored with the optimizer state."""
    for g in optimizer.param_groups:
        g.update(lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps,
                 weight_decay=cfg.train.weight_decay)


@contextmanager
def storage_errors(url: str, what: str):
    """DCP and save_pretrained do their own I/O: an OSError of theirs (DCP wraps it in a
    CheckpointException, a BaseException) becomes one line naming the path (StorageFullError for a
    full or read-only disk, else StorageError)."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except (OSError, CheckpointException) as err:
        causes = [err] if isinstance(err, OSError) else [e for e, _ in err.failures.values()]
        cause = next((e for e in causes if isinstance(e, OSError)), None)
        if cause is None:
            raise
        where = getattr(cause, "filename", None) or url
        raise (storage_failure(cause, str(where), what, local="://" not in str(where)) or StorageError(
            f"{where}: {what} failed ({type(cause).__name__}: {cause}); check the storage, then `opd resume` the "
            f"run (the train stage is redone from its inputs)")) from err


def _rm_manifest(url: str) -> None:
    fs, path = filesystem(url)
    man = posixpath.join(path, MANIFEST_NAME)
    if exists(fs, man):
        fs.rm_file(man)


def _clear(url: str) -> None:
    """Remove an old or partial checkpoint: manifest first, so it never looks complete half-deleted."""
    _rm_manifest(url)
    fs, path = filesystem(url)
    if exists(fs, path):
        fs.rm(path, recursive=True)


def run(args: TrainArgs) -> dict:
    """Train one iteration on this rank; rank 0 returns (and writes) the metrics."""
    cfg = read_config(args.config)
    params = loss_params(cfg, args.iteration)
    hf_url, dcp_url = resolve_init(args.init_checkpoint, args.out_checkpoint)
    rows = load_rows(args.scored_dir, cfg, args.iteration)
    d = init_distributed(cfg.train.device)
    if d.world > 1:  # one line per rank: a multi-node log shows which host holds which rank
        print(f"opd-train rank {d.rank}/{d.world} on {socket.gethostname()} ({d.device})", flush=True)
    try:
        if d.rank == 0:  # a re-run stage is not done until its new manifest is written
            _rm_manifest(args.train_dir)
            remove_tmp_files(*filesystem(args.train_dir))  # left by a write that a crash interrupted
        torch.manual_seed(rank_seed(cfg.seed, args.iteration, d.rank))
        model = build_model(hf_url, cfg, d.mesh)
        vocab = model.config.get_text_config().vocab_size
        top = max(int(x.max()) for x in rows.input_ids)
        if top >= vocab:
            raise TrainError(f"{args.scored_dir}: token id {top} in prompt_ids/response_ids is outside the "
                             f"student's vocabulary ({vocab}); the rollout used another tokenizer")
        optimizer = make_optimizer(model, cfg)
        step, schedule = 0, Schedule.from_config(cfg)
        if dcp_url is not None:
            with storage_errors(dcp_url, "loading the train state"):
                state = ckpt.load_state(model, optimizer, dcp_url)
            _apply_hparams(optimizer, cfg)
            ckpt.set_rng_state(state["rng"])
            step = int(state["step"])
            if "schedule" in state:  # the run's schedule as it began (a resume may have raised `iterations`)
                schedule = Schedule.from_state(state["schedule"])
        old_src, old_why = choose_old_logp(cfg.train.old_logp, cfg, rows.provenance, hf_url,
                                           "behaviour_logp" in rows.token, args.iteration, loss_kind=params.kind)
        loop = LoopConfig(epochs=cfg.train.epochs, mini_batches=cfg.train.mini_batches,
                          micro_batch_tokens=cfg.train.micro_batch_tokens, grad_clip=cfg.train.grad_clip,
                          seed=cfg.seed, iteration=args.iteration, old_logp=old_src, schedule=schedule,
                          logp_chunk_tokens=cfg.train.logp_chunk_tokens, no_sync=cfg.train.no_sync_accumulation)
        if args.iteration == OFFLINE_ITERATION:  # the offline phase: its own epochs, steps and lr
            loop = offline_phase(loop, optimizer, cfg)
        result = train_iteration(model, optimizer, rows, params, loop, d.device, step=step, on_step=print_step)
        with storage_errors(args.out_checkpoint, "saving the checkpoint"):
            save_checkpoint(model, optimizer, args, cfg, hf_url, result["step"], schedule)
        metrics = {"iteration": args.iteration, "w_kd": params.w_kd, "loss_kind": params.kind,
                   "checkpoint": args.out_checkpoint, "old_logp_reason": old_why, **result}
        if d.rank == 0:
            write_metrics(args, cfg, metrics)
        if dist.is_initialized():
            dist.barrier()
        return metrics
    finally:
        close_distributed(d)


class _Dir:
    """storage.checkpoints takes a RunLayout and an iteration; this points it at an explicit directory."""

    def __init__(self, url: str):
        self.fs, self.path = filesystem(url)

    def checkpoint_dir(self, n: int) -> str:
        return self.path


def save_checkpoint(model, optimizer, args: TrainArgs, cfg: RunConfig, hf_url: str, step: int,
                    schedule: Schedule) -> None:
    """Collective: DCP state (+ step, RNG, lr schedule) and HF export, then (rank 0) the checkpoint manifest."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = _Dir(args.out_checkpoint)
    if rank == 0:
        _clear(args.out_checkpoint)
    if dist.is_initialized():
        dist.barrier()
    rng = ckpt.rng_states()
    train = {"step": step, "iteration": args.iteration, "world_size": len(rng), "rng": rng}
    if args.iteration != OFFLINE_ITERATION:  # the offline phase's optimizer state is never resumed
        train["schedule"] = schedule.to_state()
    ckpt.save_state(model, optimizer, _url(out.fs, posixpath.join(out.path, "dcp")), train)
    hf = posixpath.join(out.path, "hf")
    put = None if is_local(out.fs) else \
        (lambda tmp: retried(out.fs, hf, "uploading the HF export", lambda: out.fs.put(tmp + "/", hf + "/", recursive=True)))
    ckpt.export_hf(model, model.config, hf, local_model_dir(hf_url, "student"), DTYPES[cfg.student.dtype], put=put,
                   trust_remote_code=cfg.student.trust_remote_code)
    if rank == 0:
        commit_checkpoint(out, args.iteration, config_hash=cfg.config_hash(),
                          inputs={"scored": args.scored_dir, "init": args.init_checkpoint}, extra={"step": step})
    if dist.is_initialized():
        dist.barrier()


def write_metrics(args: TrainArgs, cfg: RunConfig, metrics: dict) -> None:
    """train/metrics.json, then the train stage's manifest (last)."""
    fs, stage = filesystem(args.train_dir)
    info = write_json_part(fs, stage, "metrics.json", _finite(metrics))
    commit_manifest(fs, stage, Manifest(stage="train", config_hash=cfg.config_hash(), parts=[info],
                                        inputs={k: v for k, v in asdict(args).items() if k != "train_dir"},
                                        extra={"step": metrics["step"]}))


def _finite(obj):
    """JSON-safe metrics: a nan/inf float (a diverged KL estimate) becomes None instead of failing the stage."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
