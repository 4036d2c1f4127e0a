"""Test-wide isolation: Prefect home, caches and threads are set before anything imports Prefect."""
import os
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="opd-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_in_process():
    """Flows run in this process against a temporary Prefect server that stops at the end of the
    session, while pytest still captures output (the server Prefect starts on its own stops at
    interpreter exit and logs to the closed capture stream: "I/O operation on closed file")."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=None):  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Paths of a tiny random world (student, teachers tx/ty, prompts): see tests/tiny_world.py."""
    from tiny_world import build_tiny_world
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_world_cfg():
    """The test-size toy world, cached under <repo>/.cache/opd-test (gitignored) across sessions:
    the builder reuses a complete world with the same size, seed and builder version."""
    from opd_tasks.config import ToyWorldConfig
    return ToyWorldConfig(dir=str(ROOT / ".cache" / "opd-test" / "toy-test-seed0"), size="test", seed=0)


@pytest.fixture(scope="session")
def toy_world(toy_world_cfg):
    from opd_tasks.toy.world import build_world
    return build_world(toy_world_cfg.dir, size=toy_world_cfg.size, seed=toy_world_cfg.seed)


# ---- S3: moto's server on 127.0.0.1, reached through s3fs --------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_options(endpoint: str) -> dict:
    """s3fs options for moto: dummy keys, no region, no shared instances or listing caches."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint},
            "skip_instance_cache": True, "use_listings_cache": False}


@pytest.fixture
def s3_bucket(s3_endpoint):
    import uuid

    import s3fs

    opts = s3_options(s3_endpoint)
    bucket = f"opd-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    return bucket, opts


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """s3:// URLs without storage_options reach moto (endpoint and dummy keys from the environment,
    as a deployment configures them); s3fs instances made under another environment are dropped."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3fs.S3FileSystem.clear_instance_cache()
    yield {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    s3fs.S3FileSystem.clear_instance_cache()
