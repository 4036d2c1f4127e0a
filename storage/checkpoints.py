"""Where the train state and HF export of each iteration live, and which checkpoint is complete.
Paths and completeness only: the trainer writes the files (torch DCP, save_pretrained).

    RUN/checkpoints/iter-000003/     the student AFTER training iteration 3 (rollout of iteration 4)
      dcp/                           torch.distributed.checkpoint train state: model, optimizer, step, RNG
                                     (has dcp/.metadata)
      hf/                            HF export: config.json, *.safetensors, tokenizer files
      _MANIFEST.json                 written last by commit_checkpoint

A checkpoint is complete exactly when its _MANIFEST.json exists. commit_checkpoint writes it only
when dcp/.metadata and hf/config.json are there (DCP writes .metadata last), and lists every file
with its size (and sha256 for files up to `checksum_max_bytes`). Iteration 0's rollout uses the
initial student (the config's student.path), or, when the run has an offline phase, the HF export
of RUN/checkpoints/offline/ (same files, written by the offline train stage).

    trainer:  save DCP to dcp_dir(layout, n), export HF to hf_dir(layout, n), then
              commit_checkpoint(layout, n, config_hash=h)
    by path:  hf_dir(path), dcp_dir(path), is_complete(fs, path) for a checkpoint directory path
    rollout:  rollout_student(layout, n, initial=cfg.student.path, warm_start=cfg.offline is not None)
"""
from __future__ import annotations

import posixpath
from typing import Sequence

import fsspec

from storage.errors import ManifestError
from storage.fs import TMP_SUFFIX, exists, size
from storage.layout import RunLayout
from storage.manifest import (MANIFEST_NAME, Manifest, Status, commit_manifest, describe_file, read_manifest,
                              stage_files, stage_status)

REQUIRED_FILES = ("dcp/.metadata", "hf/config.json")
CHECKSUM_MAX_BYTES = 64 << 20


def checkpoint_dir(layout: RunLayout, n: int) -> str:
    return layout.checkpoint_dir(n)


def _dir(where: RunLayout | str, n: int | None) -> str:
    if isinstance(where, RunLayout):
        if n is None:
            raise TypeError("give the iteration n with a RunLayout")
        return where.checkpoint_dir(n)
    return str(where).rstrip("/")


def dcp_dir(where: RunLayout | str, n: int | None = None) -> str:
    """dcp/ of checkpoint n of a layout, or of a checkpoint directory path: dcp_dir(layout, 3) / dcp_dir(path)."""
    return posixpath.join(_dir(where, n), "dcp")


def hf_dir(where: RunLayout | str, n: int | None = None) -> str:
    """hf/ of checkpoint n of a layout, or of a checkpoint directory path: hf_dir(layout, 3) / hf_dir(path)."""
    return posixpath.join(_dir(where, n), "hf")


def is_complete(where: RunLayout | fsspec.AbstractFileSystem, n_or_path: int | str) -> bool:
    """is_complete(layout, n) or is_complete(fs, checkpoint_dir): its _MANIFEST.json exists."""
    if isinstance(where, RunLayout):
        return exists(where.fs, posixpath.join(where.checkpoint_dir(int(n_or_path)), MANIFEST_NAME))
    return exists(where, posixpath.join(str(n_or_path).rstrip("/"), MANIFEST_NAME))


def commit_checkpoint(layout: RunLayout, n: int, config_hash: str | None = None, inputs: dict | None = None,
                      extra: dict | None = None, required: Sequence[str] = REQUIRED_FILES,
                      checksum_max_bytes: int = CHECKSUM_MAX_BYTES) -> Manifest:
    """Mark checkpoint n complete: list its files in _MANIFEST.json (written last). ManifestError
    when a required file is missing (the save did not finish)."""
    d = layout.checkpoint_dir(n)
    files = [f for f in stage_files(layout.fs, d) if f != MANIFEST_NAME and not f.endswith(TMP_SUFFIX)]
    missing = [r for r in required if r not in files]
    if missing:
        raise ManifestError(f"{d}: checkpoint is missing {missing}; the DCP save / HF export did not finish, "
                            f"save again before committing")
    parts = []
    for f in files:
        n = size(layout.fs, posixpath.join(d, f))
        parts.append(describe_file(layout.fs, d, f, checksum=n <= checksum_max_bytes))
    m = Manifest(stage="checkpoint", config_hash=config_hash, inputs=inputs or {}, parts=parts,
                 extra={"iteration": n, **(extra or {})})
    commit_manifest(layout.fs, d, m)
    return m


def checkpoint_status(layout: RunLayout, n: int) -> Status:
    return stage_status(layout.fs, layout.checkpoint_dir(n))


def complete_checkpoints(layout: RunLayout) -> list[int]:
    """Iterations whose checkpoint is complete, ascending."""
    return [n for n in layout.checkpoint_iterations() if is_complete(layout, n)]


def latest_checkpoint(layout: RunLayout) -> tuple[int, str] | None:
    """(n, checkpoint directory) of the newest complete checkpoint, or None."""
    done = complete_checkpoints(layout)
    return (done[-1], layout.checkpoint_dir(done[-1])) if done else None


def read_checkpoint_manifest(layout: RunLayout, n: int, verify: bool = False) -> Manifest | None:
    return read_manifest(layout.fs, layout.checkpoint_dir(n), verify=verify)


def offline_checkpoint_status(layout: RunLayout) -> Status:
    """done / partial / missing of RUN/checkpoints/offline (the student after the offline phase)."""
    return stage_status(layout.fs, layout.offline_checkpoint_dir())


def warm_start_dir(layout: RunLayout) -> str:
    """hf/ of the offline phase's checkpoint; ManifestError when it is not complete."""
    d = layout.offline_checkpoint_dir()
    status = offline_checkpoint_status(layout)
    if status != "done":
        raise ManifestError(f"{d}: the checkpoint after the offline phase is {status}; iteration 0 starts from it, "
                            f"so finish the offline phase first (opd resume)")
    return hf_dir(d)


def rollout_student(layout: RunLayout, iteration: int, initial: str, warm_start: bool = False) -> str:
    """The HF weights the rollout of `iteration` samples from: for iteration 0 `initial`, or with
    warm_start the HF export of the offline phase's checkpoint; else the HF export of checkpoint
    iteration-1 (ManifestError when the checkpoint it needs is not complete)."""
    if iteration == 0:
        return warm_start_dir(layout) if warm_start else initial
    prev = iteration - 1
    if checkpoint_status(layout, prev) != "done":
        raise ManifestError(f"{layout.checkpoint_dir(prev)}: checkpoint after training iteration {prev} is "
                            f"{checkpoint_status(layout, prev)}; iteration {iteration}'s rollout needs it, so "
                            f"resume training iteration {prev} first")
    return hf_dir(layout, prev)
