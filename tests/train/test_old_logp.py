"""old_t from the rollout's behaviour_logp instead of a recompute forward: when it is allowed, how
close it is (measured on the hf engine's own samples), and that the worker records its choice."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from train_helpers import TEACHERS, _list_col, scored_table, write_config, write_scored
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.losses import LossParams
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.batching import rows_from_table
from opd_tasks.trainer.loop import LoopConfig, choose_old_logp, recompute_old_logp, train_iteration
from opd_tasks.trainer.worker import TrainArgs, read_config, run


def _cfg(tmp_path, **over):
    """A RunConfig with `over` applied as dotted fields, e.g. {"rollout.temperature": 0.7}."""
    import yaml
    data = yaml.safe_load(open(write_config(tmp_path / "run.yaml")))
    for dotted, v in over.items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    return read_config(str(tmp_path / "run.yaml"))


def test_auto_takes_behaviour_only_when_it_is_the_start_weights_logp(tmp_path):
    cfg = _cfg(tmp_path)
    prov = {"config_hash": cfg.config_hash(), "student_checkpoint": "/m/student/", "iteration": 3}
    assert choose_old_logp("auto", cfg, prov, "/m/student", True, 3)[0] == "behaviour"
    assert choose_old_logp("behaviour", cfg, prov, "/m/student", True, 3)[0] == "behaviour"
    assert choose_old_logp("recompute", cfg, prov, "/m/student", True, 3)[0] == "recompute"
    for mode in ("auto", "recompute", "behaviour"):  # sft has no ratio: no old_t, whatever the mode
        src, why = choose_old_logp(mode, cfg, {}, "/m/other", False, -1, loss_kind="sft")
        assert src == "none" and "sft" in why
    cases = [  # (config change, provenance change, behaviour present, words of the reason)
        ({"rollout.temperature": 0.7}, {}, True, "temperature=0.7"),
        ({"rollout.top_p": 0.9}, {}, True, "top_p=0.9"),
        ({"rollout.top_k": 20}, {}, True, "top_k=20"),
        ({"rollout.engine": "vllm"}, {}, True, "rollout.engine=vllm"),
        ({"student.dtype": "bfloat16"}, {}, True, "student.dtype=bfloat16"),
        ({"train.mixed_precision": "bf16"}, {}, True, "mixed_precision=bf16"),
        ({}, {"config_hash": None}, True, "another run config"),
        ({}, {"student_checkpoint": "/m/other"}, True, "not the trainer's start"),
        ({}, {}, False, "offline data"),
        ({}, {"iteration": 2}, True, "scored iteration 2, training iteration 3"),
        ({}, {"iteration": -1}, True, "scored iteration -1"),  # the offline phase's teacher samples
    ]
    for k, (over, pchange, have, words) in enumerate(cases):
        c = _cfg(tmp_path / str(k), **over)
        p = {"config_hash": c.config_hash(), "student_checkpoint": "/m/student", "iteration": 3, **pchange}
        src, why = choose_old_logp("auto", c, p, "/m/student", have, 3)
        assert src == "recompute" and words in why, (over, pchange, why)
        with pytest.raises(TrainError, match="old_logp=behaviour.*" + words.replace("(", r"\(")):
            choose_old_logp("behaviour", c, p, "/m/student", have, 3)
    with pytest.raises(TrainError, match="not one of"):
        choose_old_logp("sometimes", cfg, prov, "/m/student", True, 3)


def _sampled_table(model_dir, n_prompts=6, group=3, seed=0):
    """A scored table whose responses and behaviour_logp come from HFGenerator (temperature 1)."""
    from opd_tasks.engines.base import SamplingParams
    from opd_tasks.engines.hf import HFGenerator
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, 40, rng.integers(2, 7)).tolist() for _ in range(n_prompts)]
    out = HFGenerator(model_dir, progress=False).generate(prompts, group, SamplingParams(max_new_tokens=10, seed=seed))
    samples = [(p, s) for p, ss in zip(prompts, out) for s in ss]
    table = scored_table(n_prompts, group, seed=seed)  # shape and other columns; ids/log-probs replaced
    responses = [np.asarray(s.response_ids, np.int32) for _, s in samples]
    teach = [(-rng.uniform(0.5, 4.0, len(r))).astype(np.float32) for r in responses]
    cols = {"prompt_ids": _list_col([np.asarray(p, np.int32) for p, _ in samples], np.int32),
            "response_ids": _list_col(responses, np.int32),
            "behaviour_logp": _list_col([s.behaviour_logp for _, s in samples], np.float32),
            "teacher_logp": _list_col(teach, np.float32),
            **{f"teacher_logp.{t}": _list_col(teach, np.float32) for t in TEACHERS}}
    for name, col in cols.items():
        table = table.set_column(table.column_names.index(name), name, col)
    return table


def test_behaviour_logp_of_hf_samples_equals_the_recompute(tiny_model_dir):
    """Measured: the hf engine's behaviour log-probs vs the trainer's no-grad recompute on the same
    weights, and one iteration trained with each."""
    from transformers import AutoModelForCausalLM
    table = _sampled_table(tiny_model_dir)
    rows = rows_from_table(table, "t")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    recompute_old_logp(model, rows, 64, torch.device("cpu"))
    diff = max(float((a - b).abs().max()) for a, b in zip(rows.token["old_logp"], rows.token["behaviour_logp"]))
    print(f"max |behaviour_logp - recomputed old_t| = {diff:.2e} over {int(rows.response_len.sum())} tokens")
    assert diff < 1e-5
    assert float(rows.response_len.sum()) > 30  # the check covered real samples

    def train(mode):
        # SGD: the weights move linearly in the gradient. (Adam's first steps are ~lr * sign(g), so
        # parameters with |g| ~ eps flip on a 1e-7 change of the gradient: not a test of old_t.)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        cfg = LoopConfig(epochs=2, mini_batches=2, micro_batch_tokens=64, old_logp=mode)
        out = train_iteration(m, opt, rows_from_table(table, "t"), LossParams(kind="rkl"), cfg, torch.device("cpu"))
        return out, m.state_dict()
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    a, sd_a = train("recompute")
    b, sd_b = train("behaviour")
    assert (a["old_logp_source"], b["old_logp_source"]) == ("recompute", "behaviour")
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a["steps"], b["steps"])) < 1e-5
    moved = 0.0
    for k, v in sd_a.items():
        torch.testing.assert_close(sd_b[k], v, rtol=0, atol=1e-5, msg=k)
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # it did train


def test_behaviour_mode_without_the_column_is_an_error(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    table = scored_table(2, 2)
    table = table.set_column(table.column_names.index("behaviour_logp"), "behaviour_logp",
                             pa.nulls(table.num_rows, pa.list_(pa.float32())))
    rows = rows_from_table(table, "t", need_behaviour=False)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(TrainError, match="no behaviour_logp"):
        train_iteration(m, torch.optim.AdamW(m.parameters()), rows, LossParams(kind="rkl"),
                        LoopConfig(old_logp="behaviour"), torch.device("cpu"))


def test_worker_uses_behaviour_for_its_own_rollout_and_records_why(tmp_path, tiny_model_dir):
    cfg_path = write_config(tmp_path / "run.yaml", mini_batches=1)
    h = read_config(cfg_path).config_hash()
    table = _sampled_table(tiny_model_dir, n_prompts=3, group=2)
    chosen = {}
    for name, (ch, student) in {"own": (h, tiny_model_dir), "foreign": (None, tiny_model_dir),
                                "other-weights": (h, str(tmp_path))}.items():
        scored = write_scored(tmp_path / name / "scored", table, config_hash=ch, student_checkpoint=student)
        m = run(TrainArgs(cfg_path, scored, tiny_model_dir, str(tmp_path / name / "ckpt"),
                          str(tmp_path / name / "train"), 0))
        saved = json.loads((tmp_path / name / "train" / "metrics.json").read_text())
        assert saved["old_logp_source"] == m["old_logp_source"] and saved["old_logp_reason"]
        chosen[name] = (m["old_logp_source"], m["old_logp_reason"])
    assert chosen["own"][0] == "behaviour"
    assert chosen["foreign"] == ("recompute", "the scored stage was written under another run config")
    offline = choose_old_logp("auto", read_config(cfg_path), {"config_hash": h, "student_checkpoint": tiny_model_dir,
                                                              "iteration": -1}, tiny_model_dir, True, -1)
    assert offline[0] == "recompute" and "offline data is never" in offline[1]
    assert chosen["other-weights"][0] == "recompute" and "not the trainer's start" in chosen["other-weights"][1]
