"""Builder mechanics on a tiny spec (seconds): determinism, cache reuse, rebuild, relocation, toy:// errors."""
import json
import shutil
import threading

import pyarrow.parquet as pq
import pytest

from opd_tasks.config import parse_config
from opd_tasks.toy import world as toy_world_mod
from opd_tasks.toy.tasks import TaskSpec
from opd_tasks.toy.world import ToyWorldError, WorldSpec, build_world, read_world, resolve, resolve_config

TINY = WorldSpec(hidden_size=64, num_heads=2, num_layers=1, intermediate_size=64,
                 tasks=TaskSpec(max_digits=2, min_letters=3, max_letters=4), n_train=16, n_eval=4, n_dev=4,
                 student_band=(0.0, 1.0), student_max_steps=4, teacher_target=1.1, teacher_max_steps=2,
                 chunk=2, batch_size=8)  # band met at once, teacher targets never: 2 + 2 + 2 steps


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(toy_world_mod.SIZES, "tiny", TINY)
    monkeypatch.setattr(toy_world_mod, "ISOLATED", False)  # mechanics: in this process (the pinned test builds isolated)
    return "tiny"


@pytest.fixture
def tiny_as_test(monkeypatch):
    """ToyWorldConfig.size admits only demo/test: run the tiny spec under the name "test" (tmp dirs only)."""
    monkeypatch.setitem(toy_world_mod.SIZES, "test", TINY)
    monkeypatch.setattr(toy_world_mod, "ISOLATED", False)
    return "test"


def test_same_seed_same_world_other_seed_other_world(tiny, tmp_path):
    a = read_world(build_world(tmp_path / "a", size=tiny, seed=5))
    b = read_world(build_world(tmp_path / "b", size=tiny, seed=5))
    c = read_world(build_world(tmp_path / "c", size=tiny, seed=6))
    assert a["sha256"] == b["sha256"] and a["accuracy"] == b["accuracy"]
    assert set(a["sha256"]) == {"student", "teachers/add", "teachers/rev", "data/train.parquet", "data/eval.parquet"}
    assert all(a["sha256"][k] != c["sha256"][k] for k in a["sha256"])
    assert pq.read_table(tmp_path / "a" / "data" / "train.parquet").equals(
        pq.read_table(tmp_path / "b" / "data" / "train.parquet"))
    assert a["student"]["path"] == str(tmp_path / "a" / "student")
    student = str(tmp_path / "a" / "student")  # the teachers' base: fine-tuned from the student
    assert a["teachers"] == {"adder": {"domain": "add", "path": str(tmp_path / "a" / "teachers" / "add"), "base": student},
                             "reverser": {"domain": "rev", "path": str(tmp_path / "a" / "teachers" / "rev"),
                                          "base": student}}
    for name in ("student", "adder", "reverser"):
        assert set(a["accuracy"][name]) == {"add", "rev"}
        assert all(0.0 <= v <= 1.0 for v in a["accuracy"][name].values())
    assert not list((tmp_path / "a").rglob("*.tmp-*"))  # no temporaries left
    assert a["steps"] == {"student": 2, "adder": 2, "reverser": 2}


def test_strong_to_weak_teachers_grow_from_their_own_larger_base(monkeypatch, tmp_path):
    import dataclasses
    from transformers import AutoConfig
    spec = dataclasses.replace(TINY, base_hidden_size=128, base_num_layers=2, base_band=(0.0, 1.0))
    monkeypatch.setitem(toy_world_mod.SIZES, "tiny-s2w", spec)
    w = read_world(build_world(tmp_path / "w", size="tiny-s2w", seed=0))
    base = str(tmp_path / "w" / "teachers" / "base")
    assert {t["base"] for t in w["teachers"].values()} == {base}
    assert set(w["accuracy"]) == {"student", "adder", "reverser", "teacher_base"}
    dims = {rel: (c.hidden_size, c.num_hidden_layers) for rel in ("student", "teachers/base", "teachers/add")
            for c in [AutoConfig.from_pretrained(tmp_path / "w" / rel)]}
    assert dims == {"student": (64, 1), "teachers/base": (128, 2), "teachers/add": (128, 2)}
    assert w["steps"]["base"] == 2  # steered like the student: band met at the first check
    from types import SimpleNamespace
    assert resolve("toy://teachers/base", SimpleNamespace(dir=str(tmp_path / "w"), size="tiny-s2w", seed=0)) == base


def test_cache_reuse_rebuild_on_change_and_force(tiny, tmp_path, monkeypatch):
    import dataclasses
    out = build_world(tmp_path / "w", size=tiny, seed=0)
    stamp = (out / "world.json").stat().st_mtime_ns
    assert build_world(out, size=tiny, seed=0) == out
    assert (out / "world.json").stat().st_mtime_ns == stamp            # reused
    build_world(out, size=tiny, seed=0, force=True)
    assert (out / "world.json").stat().st_mtime_ns != stamp            # forced
    build_world(out, size=tiny, seed=1)
    assert read_world(out)["seed"] == 1                                 # other seed: rebuilt in place
    monkeypatch.setitem(toy_world_mod.SIZES, tiny, dataclasses.replace(TINY, chunk=1))
    build_world(out, size=tiny, seed=1)
    assert read_world(out)["spec"]["chunk"] == 1                        # edited spec: rebuilt
    (out / "world.json").write_text("{not json")
    build_world(out, size=tiny, seed=1)
    assert read_world(out)["seed"] == 1                                 # unreadable marker: rebuilt


def test_a_moved_world_is_reused_with_its_new_paths(tiny, tmp_path):
    build_world(tmp_path / "w", size=tiny, seed=0)
    shutil.copytree(tmp_path / "w", tmp_path / "moved")
    stamp = read_world(tmp_path / "moved")["build_seconds"]
    moved = read_world(build_world(tmp_path / "moved", size=tiny, seed=0))
    assert moved["build_seconds"] == stamp                               # not rebuilt
    assert moved["dir"] == str(tmp_path / "moved")
    assert moved["teachers"]["adder"]["path"] == str(tmp_path / "moved" / "teachers" / "add")


def test_two_builders_at_once_build_once(tiny, tmp_path, monkeypatch):
    calls = []
    real = toy_world_mod._build
    monkeypatch.setattr(toy_world_mod, "_build", lambda *a: (calls.append(1), real(*a)))
    threads = [threading.Thread(target=build_world, args=(tmp_path / "w",), kwargs=dict(size=tiny))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and read_world(tmp_path / "w") is not None


def test_unknown_size_and_toy_paths_are_user_errors(tiny_as_test, tmp_path):
    tiny = tiny_as_test
    with pytest.raises(ToyWorldError, match="size 'huge'.*demo"):
        build_world(tmp_path / "w", size="huge")
    cfg = parse_config({"toy_world": {"dir": str(tmp_path / "w"), "size": tiny}, "student": {"path": "toy://student"},
                        "teachers": [{"name": "t", "path": "toy://teachers/adder"}], "data": {"train": "toy://nope"}})
    with pytest.raises(ToyWorldError, match="toy://nope.*data/train.parquet"):
        resolve_config(cfg)
    assert resolve("/local/model", cfg.toy_world) == "/local/model"
    assert resolve("toy://teachers/adder", cfg.toy_world) == str(tmp_path / "w" / "teachers" / "add")


def test_resolve_config_resolves_every_path_and_needs_toy_world(tiny_as_test, tmp_path):
    tiny = tiny_as_test
    data = {"toy_world": {"dir": str(tmp_path / "w"), "size": tiny, "seed": 0},
            "student": {"path": "toy://student"}, "reference": {"path": "toy://student"},
            "teachers": [{"name": "adder", "path": "toy://teachers/add"}, {"name": "other", "path": "/abs/other"}],
            "data": {"train": "toy://data/train.parquet", "eval": "toy://data/eval.parquet"}}
    cfg = parse_config(data)
    res = resolve_config(cfg)
    w = tmp_path / "w"
    assert (res.student.path, res.reference.path) == (str(w / "student"), str(w / "student"))
    assert [t.path for t in res.teachers] == [str(w / "teachers" / "add"), "/abs/other"]
    assert (res.data.train, res.data.eval) == (str(w / "data" / "train.parquet"), str(w / "data" / "eval.parquet"))
    assert cfg.student.path == "toy://student"                           # the input is untouched
    assert json.loads((w / "world.json").read_text())["size"] == tiny

    del data["toy_world"]
    with pytest.raises(ToyWorldError, match=r"student.path = 'toy://student'.*toy_world"):
        resolve_config(parse_config(data))
    data.update(student={"path": "/abs/student"}, data={"train": "/abs/train.parquet"},
                teachers=[{"name": "other", "path": "/abs/other"}])
    with pytest.raises(ToyWorldError, match=r"reference.path = 'toy://student'"):
        resolve_config(parse_config(data))


class FakeSFT:
    def __init__(self, *args, **kwargs):
        self.steps = 0

    def train(self, batches):
        for _ in batches:
            self.steps += 1


class RecordingSampler:
    def __init__(self):
        self.weights = []

    def batch(self, n, weights):
        self.weights.append(dict(weights))
        return []


def test_student_mix_follows_the_band_and_stops_inside_it(monkeypatch):
    import dataclasses
    monkeypatch.setattr("opd_tasks.toy.sft.SFT", FakeSFT)
    script = iter([{"add": 0.0, "rev": 0.1}, {"add": 0.1, "rev": 0.5}, {"add": 0.3, "rev": 0.9},
                   {"add": 0.5, "rev": 0.45}, {"add": 0.9, "rev": 0.9}])
    monkeypatch.setattr(toy_world_mod, "_dev_accuracy", lambda *a: next(script))
    spec = dataclasses.replace(TINY, student_band=(0.4, 0.6), student_max_steps=100, chunk=2, maintenance=0.3)
    sampler = RecordingSampler()
    curve = toy_world_mod._train_student(None, None, sampler, [], spec, 8)
    assert [c["step"] for c in curve] == [2, 4, 6, 8]          # stopped at the first check inside the band
    assert sampler.weights[0::2] == [{"add": 1.0, "rev": 1.0}, {"add": 1.0, "rev": 1.0},
                                     {"add": 1.0, "rev": 0.3}, {"add": 1.0, "rev": 0.0}]


def test_student_at_the_cap_keeps_the_checkpoint_closest_to_the_band(monkeypatch):
    import dataclasses
    import torch
    monkeypatch.setattr("opd_tasks.toy.sft.SFT", FakeSFT)
    model = torch.nn.Linear(1, 1, bias=False)
    accs = iter([0.0, 0.35, 0.9, 0.0])                          # the 2nd check is the closest (miss 0.1)

    def dev_accuracy(*a):
        model.weight.data.fill_(float(len(curve_steps) + 1))    # weights tell the checks apart
        curve_steps.append(1)
        return {"add": next(accs), "rev": 0.5}
    curve_steps = []
    monkeypatch.setattr(toy_world_mod, "_dev_accuracy", dev_accuracy)
    spec = dataclasses.replace(TINY, student_band=(0.45, 0.6), student_max_steps=8, chunk=2)
    curve = toy_world_mod._train_student(model, None, RecordingSampler(), [], spec, 8)
    assert [c["step"] for c in curve] == [2, 4] and model.weight.item() == 2.0


def test_teacher_stops_at_its_target_or_its_cap(monkeypatch):
    import dataclasses
    monkeypatch.setattr("opd_tasks.toy.sft.SFT", FakeSFT)
    script = iter([{"rev": 0.5}, {"rev": 0.96}, {"rev": 0.2}])
    monkeypatch.setattr(toy_world_mod, "_dev_accuracy", lambda *a: next(script))
    spec = dataclasses.replace(TINY, teacher_target=0.95, teacher_max_steps=100, chunk=5)
    sampler = RecordingSampler()
    curve = toy_world_mod._train_teacher(None, None, sampler, [], "rev", spec, 8)
    assert curve == [{"step": 5, "rev": 0.5}, {"step": 10, "rev": 0.96}]
    assert all(w == {"rev": 1.0} for w in sampler.weights)
    monkeypatch.setattr(toy_world_mod, "_dev_accuracy", lambda *a: {"rev": 0.0})
    capped = toy_world_mod._train_teacher(None, None, sampler, [], "rev", dataclasses.replace(spec, teacher_max_steps=12), 8)
    assert capped[-1]["step"] == 15                            # whole chunks: the cap is checked per chunk
