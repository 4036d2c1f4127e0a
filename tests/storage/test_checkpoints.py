"""Checkpoint paths and completeness: complete exactly when the manifest exists; latest = newest complete."""
import pytest

from storage.checkpoints import (checkpoint_dir, checkpoint_status, commit_checkpoint, complete_checkpoints, dcp_dir,
                                 hf_dir, is_complete, latest_checkpoint, read_checkpoint_manifest, rollout_student)
from storage.errors import ManifestError
from storage.fs import write_bytes_atomic


def _save(layout, n, dcp=True, hf=True):
    fs = layout.fs
    write_bytes_atomic(fs, f"{dcp_dir(layout, n)}/__0_0.distcp", b"x" * 1000)
    if dcp:
        write_bytes_atomic(fs, f"{dcp_dir(layout, n)}/.metadata", b"meta")
    if hf:
        write_bytes_atomic(fs, f"{hf_dir(layout, n)}/config.json", b"{}")
        write_bytes_atomic(fs, f"{hf_dir(layout, n)}/model.safetensors", b"w" * 500)


def test_paths(tmp_path):
    from storage.layout import RunLayout

    lay = RunLayout(str(tmp_path / "r"))
    d = checkpoint_dir(lay, 7)
    assert d == f"{tmp_path}/r/checkpoints/iter-000007"
    assert dcp_dir(lay, 7) == dcp_dir(d) == f"{d}/dcp"
    assert hf_dir(lay, 7) == hf_dir(d) == f"{d}/hf"


def test_latest_complete_checkpoint(layout):
    assert latest_checkpoint(layout) is None
    assert rollout_student(layout, 0, "init/model") == "init/model"
    with pytest.raises(ManifestError, match="checkpoint after training iteration 0 is missing"):
        rollout_student(layout, 1, "init/model")
    for n in (0, 1):
        _save(layout, n)
        commit_checkpoint(layout, n, config_hash="h", checksum_max_bytes=600)
    _save(layout, 2)  # saved but not committed (killed before the manifest)
    _save(layout, 3, dcp=False)
    assert [checkpoint_status(layout, n) for n in range(5)] == ["done", "done", "partial", "partial", "missing"]
    assert complete_checkpoints(layout) == [0, 1]
    assert latest_checkpoint(layout) == (1, checkpoint_dir(layout, 1))
    assert is_complete(layout, 1) and not is_complete(layout, 2)
    assert is_complete(layout.fs, checkpoint_dir(layout, 0))
    assert rollout_student(layout, 2, "init") == hf_dir(layout, 1)
    m = read_checkpoint_manifest(layout, 1, verify=True)
    sizes = {p.name: (p.bytes, p.sha256 is not None) for p in m.parts}
    assert sizes == {"dcp/.metadata": (4, True), "dcp/__0_0.distcp": (1000, False), "hf/config.json": (2, True),
                     "hf/model.safetensors": (500, True)}
    with pytest.raises(ManifestError, match=r"missing \['dcp/.metadata'\]"):
        commit_checkpoint(layout, 3)
    write_bytes_atomic(layout.fs, f"{hf_dir(layout, 1)}/model.safetensors", b"v" * 500)
    with pytest.raises(ManifestError, match="model.safetensors: sha256 does not match"):
        read_checkpoint_manifest(layout, 1, verify=True)
