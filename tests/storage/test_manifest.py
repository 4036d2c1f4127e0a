"""Stage manifests: done exactly when the manifest exists; checksums; strays; bad manifests."""
import json

import pytest

from storage.errors import ManifestError
from storage.fs import write_bytes_atomic
from storage.layout import RunLayout
from storage.manifest import (MANIFEST_NAME, Manifest, PartInfo, commit_manifest, read_manifest, remove_tmp_files,
                              stage_status, stray_files, write_file_part, write_json_part)


@pytest.fixture
def stage(tmp_path):
    lay = RunLayout(str(tmp_path / "run"))
    return lay.fs, lay.stage_dir(0, "train")


def test_status_transitions_and_verify(stage):
    fs, d = stage
    assert stage_status(fs, d) == "missing" and read_manifest(fs, d) is None
    info = write_json_part(fs, d, "metrics.json", {"loss": 0.25})
    assert stage_status(fs, d) == "partial"
    m = Manifest(stage="train", config_hash="h", inputs={"scored": "iter-000000/scored"}, parts=[info])
    commit_manifest(fs, d, m)
    assert stage_status(fs, d) == "done"
    back = read_manifest(fs, d, verify=True)
    assert back.parts == [info] and back.inputs == {"scored": "iter-000000/scored"} and back.config_hash == "h"
    assert json.loads(fs.cat_file(f"{d}/metrics.json")) == {"loss": 0.25}


def test_commit_refuses_missing_or_wrong_size_parts(stage):
    fs, d = stage
    with pytest.raises(ManifestError, match="never written"):
        commit_manifest(fs, d, Manifest(stage="train", parts=[PartInfo(name="metrics.json", bytes=3)]))
    info = write_file_part(fs, d, "metrics.json", b"{}\n")
    with pytest.raises(ManifestError, match="3 bytes on storage but 4"):
        commit_manifest(fs, d, Manifest(stage="train", parts=[info.model_copy(update={"bytes": 4})]))
    with pytest.raises(ManifestError, match="twice"):
        commit_manifest(fs, d, Manifest(stage="train", parts=[info, info]))
    assert stage_status(fs, d) == "partial"


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", ""])
def test_part_names_stay_inside(bad):
    with pytest.raises(ValueError):
        PartInfo(name=bad, bytes=0)


def test_checksum_and_size_failures_name_the_file(stage):
    fs, d = stage
    info = write_file_part(fs, d, "metrics.json", b'{"loss": 1}\n')
    commit_manifest(fs, d, Manifest(stage="train", parts=[info]))
    write_bytes_atomic(fs, f"{d}/metrics.json", b'{"loss": 2}\n')  # same size, other bytes
    with pytest.raises(ManifestError, match=r"metrics.json: sha256 does not match"):
        read_manifest(fs, d, verify=True)
    write_bytes_atomic(fs, f"{d}/metrics.json", b'{"loss"')
    with pytest.raises(ManifestError, match=r"metrics.json: 7 bytes but the manifest says 12"):
        read_manifest(fs, d, verify=True)
    fs.rm_file(f"{d}/metrics.json")
    with pytest.raises(ManifestError, match=r"metrics.json: listed in _MANIFEST.json but missing"):
        read_manifest(fs, d, verify=True)
    assert read_manifest(fs, d) is not None  # without verify: only the manifest is read


def test_bad_manifests(stage):
    fs, d = stage
    write_bytes_atomic(fs, f"{d}/{MANIFEST_NAME}", b"{truncated")
    with pytest.raises(ManifestError, match="_MANIFEST.json: not valid JSON"):
        read_manifest(fs, d)
    write_bytes_atomic(fs, f"{d}/{MANIFEST_NAME}", json.dumps({"stage": "train", "parts": [{"name": "a"}]}).encode())
    with pytest.raises(ManifestError, match=r"not a valid stage manifest .*parts.0.bytes"):
        read_manifest(fs, d)
    write_bytes_atomic(fs, f"{d}/{MANIFEST_NAME}", json.dumps({"stage": "train", "schema_version": 99}).encode())
    with pytest.raises(ManifestError, match="schema_version 99 is newer"):
        read_manifest(fs, d)


def test_stray_files(stage):
    fs, d = stage
    info = write_file_part(fs, d, "metrics.json", b"{}")
    write_bytes_atomic(fs, f"{d}/metrics.json.abc.tmp", b"{half")
    assert stray_files(fs, d) == ["metrics.json.abc.tmp"]  # no manifest: only temporaries are stray
    commit_manifest(fs, d, Manifest(stage="train", parts=[info]))
    write_bytes_atomic(fs, f"{d}/sub/extra.txt", b"x")
    assert stray_files(fs, d) == ["metrics.json.abc.tmp", "sub/extra.txt"]
    assert remove_tmp_files(fs, d) == ["metrics.json.abc.tmp"]
    assert stray_files(fs, d) == ["sub/extra.txt"]
