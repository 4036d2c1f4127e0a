"""Model directories on S3 (moto): copied once per node into the model cache, keyed by the export's
manifest checksums; partial downloads never used and resumed file by file; one copy for concurrent
processes; bad input named by URL."""
from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import s3fs

from storage.checkpoints import commit_checkpoint, hf_dir
from storage.layout import RunLayout
from storage.model_cache import ModelCacheError, materialize


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def bucket(s3_env):
    name = f"opd-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    fs.mkdir(name)
    return name, fs


@pytest.fixture
def downloads(monkeypatch):
    """Every object fetched by s3fs.get_file (one list shared by all threads)."""
    seen, real = [], s3fs.S3FileSystem.get_file

    def get_file(self, rpath, lpath, **kw):
        seen.append(rpath)
        return real(self, rpath, lpath, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", get_file)
    return seen


def _upload(fs, local: str, url: str) -> str:
    fs.put(local.rstrip("/") + "/", url.rstrip("/") + "/", recursive=True)
    return url


def _export(fs, local: str, root: str) -> str:
    """An opd checkpoint on S3 (hf/ + a stand-in dcp/.metadata + _MANIFEST.json); its hf/ URL."""
    layout = RunLayout(root)
    ckpt = layout.url_of(layout.checkpoint_dir(0))
    _upload(fs, local, ckpt + "/hf")
    fs.pipe_file(ckpt + "/dcp/.metadata", b"stand-in")
    commit_checkpoint(layout, 0)
    return layout.url_of(hf_dir(layout, 0))


def _files(d) -> dict:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(d.iterdir())}


def test_a_model_on_s3_is_copied_once_and_loads_like_the_local_one(model_cache, bucket, downloads, tiny_world):
    import torch
    from opd_tasks.models import load_causal_lm, load_tokenizer
    name, fs = bucket
    url = _upload(fs, tiny_world["student"], f"s3://{name}/models/student")
    local = materialize(url)
    assert local.startswith(str(model_cache)) and len(downloads) == len(os.listdir(tiny_world["student"]))
    assert {k: v[1] for k, v in _files(model_cache / os.path.basename(local)).items()} == \
        {p: open(os.path.join(tiny_world["student"], p), "rb").read() for p in os.listdir(tiny_world["student"])}
    n = len(downloads)
    model = load_causal_lm(url, role="student")  # through the cache: nothing fetched again
    assert materialize(url) == local and len(downloads) == n
    want = load_causal_lm(tiny_world["student"]).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert load_tokenizer(url)("abc")["input_ids"] == load_tokenizer(tiny_world["student"])("abc")["input_ids"]
    assert [p for p in os.listdir(model_cache) if "partial" in p] == []


def test_an_export_is_keyed_by_its_manifest_and_a_half_uploaded_one_is_refused(model_cache, bucket, downloads, tiny_world):
    name, fs = bucket
    root = f"s3://{name}/run"
    url = _export(fs, tiny_world["student"], root)
    first = materialize(url)
    assert materialize(url) == first
    # the same export written again (identical bytes, new manifest): same key, no download
    n = len(downloads)
    _export(fs, tiny_world["student"], root)
    assert materialize(url) == first and len(downloads) == n
    # other weights in the export (another iteration's training): another key, another copy
    _export(fs, tiny_world["tx"], root)
    other = materialize(url)
    assert other != first and open(os.path.join(other, "model.safetensors"), "rb").read() == \
        open(os.path.join(tiny_world["tx"], "model.safetensors"), "rb").read()
    # upload killed before the manifest: refused by name, never half-loaded
    fs.rm_file(f"{name}/run/checkpoints/iter-000000/_MANIFEST.json")
    with pytest.raises(ModelCacheError, match=rf"s3://{name}/run/checkpoints/iter-000000/hf: half-uploaded export: "
                                              r".*iter-000000 has no _MANIFEST.json"):
        materialize(url)


def test_a_failed_download_is_never_used_and_the_retry_fetches_only_what_was_missing(model_cache, bucket, downloads,
                                                                                    tiny_world, monkeypatch):
    name, fs = bucket
    url = _export(fs, tiny_world["student"], f"s3://{name}/run")
    weights = f"{name}/run/checkpoints/iter-000000/hf/model.safetensors"
    saved = fs.cat_file(weights)
    fs.rm_file(weights)  # an object the manifest lists is gone
    with pytest.raises(ModelCacheError, match=rf"s3://{weights}: missing on the store but listed for {url}"):
        materialize(url)
    assert [p for p in os.listdir(model_cache) if not p.startswith(".")] == []  # no complete-looking copy
    complete = {os.path.basename(p) for p in downloads} - {"model.safetensors"}
    assert complete == {"config.json", "generation_config.json"}  # fetched before the missing one
    fs.pipe_file(weights, saved)
    downloads.clear()
    local = materialize(url)
    retry = {os.path.basename(p) for p in downloads}
    assert "model.safetensors" in retry and not retry & complete  # the complete files were kept
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == saved


def test_concurrent_loaders_share_one_download(model_cache, bucket, downloads, tiny_world, monkeypatch):
    name, fs = bucket
    url = _upload(fs, tiny_world["tx"], f"s3://{name}/models/tx")
    real = s3fs.S3FileSystem.get_file

    def slow(self, rpath, lpath, **kw):  # widen the window in which both would download
        time.sleep(0.05)
        return real(self, rpath, lpath, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", slow)
    out = []  # threads: each materialize opens the lock file itself, so flock excludes them as it does processes
    threads = [threading.Thread(target=lambda: out.append(materialize(url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and len(set(out)) == 1
    assert len(downloads) == len(os.listdir(tiny_world["tx"]))  # each file fetched once in all


def test_store_errors_name_the_url(model_cache, bucket, monkeypatch, s3_endpoint):
    import moto.settings
    name, fs = bucket
    with pytest.raises(ModelCacheError, match=rf"s3://{name}/models/none: no files under this URL"):
        materialize(f"s3://{name}/models/none")
    with pytest.raises(ModelCacheError, match=r"s3://opd-no-such-bucket/m: not found on the store"):
        materialize("s3://opd-no-such-bucket/m")
    with monkeypatch.context() as m:
        m.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks the (dummy) keys
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ModelCacheError, match=rf"s3://{name}/models/x: the store refused access .*credentials"):
            materialize(f"s3://{name}/models/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ModelCacheError, match=rf"s3://{name}/models/x: cannot read from the store .*endpoint"):
        materialize(f"s3://{name}/models/x")
