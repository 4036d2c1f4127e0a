"""Engine processes and their lifecycle, with the hf engine (no vllm needed): a replica answers as the
in-process engine does; a replica that dies is named; SIGTERM ends the engines; a SIGKILLed opd leaves
no engine behind (the replica dies with its parent, and clean_orphans kills what a pid file records)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from opd_tasks.engines.base import SamplingParams
from opd_tasks.engines.lifecycle import ENGINES, EngineRegistry, clean_orphans, register_process
from opd_tasks.engines.process import EngineProcess, EngineProcessError

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_ENGINE_STATE", str(tmp_path / "engines"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) counts as gone
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def _gone(pid: int, timeout: float = 20.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_replica_answers_like_the_in_process_engine_and_a_dead_replica_is_named(tiny_world):
    from opd_tasks.engines.hf import HFGenerator
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4]]
    sp = SamplingParams(temperature=1.0, max_new_tokens=5, seed=11)
    rep = EngineProcess("hf", tiny_world["student"], {"dtype": "float32"}, name="rollout replica 0/1")
    try:
        got = rep.generate(prompts, 2, sp)
        want = HFGenerator(tiny_world["student"]).generate(prompts, 2, sp)
        assert [[s.response_ids for s in g] for g in got] == [[s.response_ids for s in g] for g in want]
        np.testing.assert_allclose(np.concatenate([s.behaviour_logp for g in got for s in g]),
                                   np.concatenate([s.behaviour_logp for g in want for s in g]), atol=1e-6)
        os.kill(rep.pid, signal.SIGKILL)
        with pytest.raises(EngineProcessError, match=rf"rollout replica 0/1 \(pid {rep.pid}, .*\) was killed by "
                                                     r"signal 9 .*opd resume"):
            rep.generate(prompts, 2, sp)
    finally:
        rep.close()
    assert not os.listdir(os.environ["OPD_ENGINE_STATE"])  # its pid file is gone with it


def test_registry_releases_other_stages_engines_on_shared_gpus():
    class Fake:
        closed = 0

        def close(self):
            Fake.closed += 1

    reg = EngineRegistry()
    a = reg.get("rollout", ("r",), Fake, {0, 1})
    assert reg.get("rollout", ("r",), Fake, {0, 1}) is a  # kept while compatible
    reg.get("scoring", ("t1",), Fake, {2})                 # other GPUs: the rollout engine stays
    assert Fake.closed == 0
    reg.get("scoring", ("t2",), Fake, {1})                 # GPU 1: the rollout engine goes first
    assert Fake.closed == 1 and [s for s, _ in reg.live()] == ["scoring", "scoring"]
    reg.enter("train", {0, 1, 2})
    assert Fake.closed == 3 and reg.live() == []
    cpu = reg.get("rollout", ("hf",), Fake, set())         # host memory only: nothing to release for
    reg.enter("train", {0})
    assert reg.live() == [("rollout", ("hf",))] and cpu is not None
    many = reg.get_many("scoring", [(("a",), Fake, {0}), (("b",), Fake, {1}), (("a",), Fake, {0})])
    assert many[0] is many[2] and many[0] is not many[1] and len(reg.live()) == 3

    def broken():
        raise RuntimeError("no such model")
    with pytest.raises(RuntimeError, match="no such model"):  # the engines started with it are ended
        reg.get_many("eval", [(("c",), Fake, {5}), (("d",), broken, {6})])
    assert Fake.closed == 4 and ("eval", ("c",)) not in reg.live()


_PARENT = textwrap.dedent("""
    import sys, time
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.engines.process import EngineProcess
    rep = ENGINES.get("rollout", ("r",), lambda: EngineProcess("hf", sys.argv[1], {}, gpus=[0], name="rollout",
                                                                run_dir="RUN"), {0})
    print(rep.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_opd_process_that_is_terminated_or_killed_leaves_no_engine(tiny_world, sig):
    env = dict(os.environ, PYTHONPATH=ROOT)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, tiny_world["student"]], stdout=subprocess.PIPE,
                              text=True, env=env)
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.send_signal(sig)
    parent.wait(timeout=30)
    assert parent.returncode == (128 + sig if sig == signal.SIGTERM else -sig)  # SIGTERM: a clean exit
    assert _gone(pid), f"engine process {pid} outlived its opd parent ({sig.name})"
    assert clean_orphans("RUN") == []


def test_clean_orphans_kills_a_recorded_engine_whose_parent_is_gone(tmp_path):
    # an engine process that ignored its parent's death (e.g. a vLLM worker in its group)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "opd_tasks.engines.replica"],
                              start_new_session=True)
    dead_parent = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_parent.wait()
    rec = register_process(orphan.pid, "RUN", "teacher math replica 0/1")
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "parent": dead_parent.pid}))
    assert clean_orphans("OTHER-RUN") == []  # another run's engines are not touched
    lines = clean_orphans("RUN")
    orphan.wait(timeout=10)
    assert len(lines) == 1 and f"killed engine process {orphan.pid} (teacher math replica 0/1)" in lines[0]
    assert not rec.exists()
