"""train.lr_schedule (constant | linear | cosine, warmup) per optimizer step, kept in the train state
so that a resume which raises `iterations` continues the same curve; w_kd anneals over its own field."""
import json
import math

import pytest
import yaml
from train_helpers import make_run
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.config import ConfigError
from opd_tasks.trainer.schedule import Schedule
from opd_tasks.trainer.worker import loss_params, read_config, run


def test_schedule_values_by_hand():
    lrs = lambda s, n: [round(s.lr_at(k), 6) for k in range(n)]  # noqa: E731
    assert lrs(Schedule("constant", lr=1.0, warmup_steps=2, total_steps=5), 4) == [0.5, 1.0, 1.0, 1.0]
    # linear: warmup 1 step, then 1 -> 0.2 over the 4 remaining steps of 5, lr_end after
    assert lrs(Schedule("linear", lr=1.0, warmup_steps=1, total_steps=5, lr_end=0.2), 7) == \
        [1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2]
    c = 0.5 * (1 + math.cos(math.pi / 4))
    assert lrs(Schedule("cosine", lr=2.0, total_steps=4), 5) == [2.0, round(2 * c, 6), 1.0, round(2 * (1 - c), 6), 0.0]
    with pytest.raises(ValueError, match="lr_schedule"):
        Schedule("step", lr=1.0)


def _set_iterations(cfg_path, n):
    data = yaml.safe_load(open(cfg_path))
    data["iterations"] = n
    yaml.safe_dump(data, open(cfg_path, "w"))


def test_resume_with_more_iterations_keeps_the_runs_schedule(tmp_path, tiny_model_dir):
    cfg_path, args = make_run(tmp_path, tiny_model_dir, lr_schedule="cosine", warmup_steps=1, lr_end=1e-5)
    want = Schedule.from_config(read_config(cfg_path))  # 4 iterations x 1 epoch x 2 mini-batches = 8 steps
    assert want.total_steps == 8
    m0 = run(args[0])
    _set_iterations(cfg_path, 10)  # `opd resume --iterations 10`: a mutable field
    assert Schedule.from_config(read_config(cfg_path)).total_steps == 20
    m1 = run(args[1])
    lrs = [s["lr"] for s in m0["steps"] + m1["steps"]]
    assert [s["step"] for s in m0["steps"] + m1["steps"]] == [1, 2, 3, 4]
    assert lrs == pytest.approx([want.lr_at(k) for k in range(4)], rel=1e-12)
    assert lrs[0] == pytest.approx(1e-3 / 1) and lrs[3] < lrs[2] < lrs[1]  # warmup of 1, then the cosine
    saved = json.loads(open(tmp_path / "iter-000001" / "train" / "metrics.json").read())
    assert saved["steps"][-1]["lr"] == pytest.approx(want.lr_at(3))


def test_w_kd_anneals_over_its_own_field_not_iterations(tmp_path):
    base = {"name": "t", "student": {"path": "s"}, "teachers": [{"name": "a", "path": "a"}], "data": {"train": "d"}}
    from opd_tasks.config import parse_config
    loss = {"kind": "kdrl", "w_kd": 1.0, "w_kd_end": 0.0, "w_kd_anneal_iterations": 5}
    a = parse_config({**base, "iterations": 5, "loss": loss})
    b = parse_config({**base, "iterations": 50, "loss": loss})
    assert [loss_params(a, n).w_kd for n in range(7)] == [loss_params(b, n).w_kd for n in range(7)] == \
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert a.config_hash() == b.config_hash()  # iterations stays out of the run's identity
    with pytest.raises(ConfigError, match="w_kd_anneal_iterations"):
        parse_config({**base, "loss": {"kind": "kdrl", "w_kd_end": 0.0}})
    # fields at their defaults stay out of the hash: runs made before they existed keep theirs
    assert "lr_schedule" not in parse_config(base).to_yaml() and "w_kd_anneal" not in parse_config(base).to_yaml()
