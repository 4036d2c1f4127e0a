"""Fixtures of the storage tests: one run root per test on local disk, memory:// and a real S3 API
(moto's server on 127.0.0.1, reached through s3fs: tests/conftest.py)."""
from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import factories` from these tests

from storage.layout import RunLayout  # noqa: E402


@pytest.fixture(params=["local", "memory", "s3"])
def run_root(request, tmp_path):
    """(root URL, storage_options) of an empty run directory on each backend."""
    if request.param == "local":
        yield str(tmp_path / "run"), None
    elif request.param == "memory":
        import fsspec

        root = f"memory://opd-test-{uuid.uuid4().hex[:10]}/run"
        yield root, None
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        bucket, opts = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/run", opts


@pytest.fixture
def layout(run_root) -> RunLayout:
    root, opts = run_root
    return RunLayout(root, opts)
