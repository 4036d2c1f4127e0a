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
