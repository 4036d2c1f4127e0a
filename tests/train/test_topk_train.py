"""loss.kind=topk in the trainer: the stored top-k columns reach the loss, the student's log-probs
at the teacher's ids come from its full log-softmax, training lowers the exact divergence, and a
shard without top-k columns is refused naming the iteration and the config field."""
import numpy as np
import pyarrow as pa
import pytest
import torch
from train_helpers import _list_col, scored_table, write_config, write_scored
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.combine import CombinationError, topk_row_weights
from opd_tasks.losses import LossParams
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.batching import collate, rows_from_table
from opd_tasks.trainer.loop import LoopConfig, response_logp, train_iteration
from opd_tasks.trainer.worker import load_rows, read_config

K = 6


def _teacher_full(teacher, table):
    """The teacher's full log-softmax at every response position of every row (a direct forward)."""
    out = []
    with torch.no_grad():
        for p, r in zip(table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()):
            lg = teacher(torch.tensor([p + r])).logits[0].double().log_softmax(-1)
            out.append(lg[len(p) - 1: len(p) - 1 + len(r)])
    return out


def _with_topk(table, full, names=("math", "code")):
    top = [torch.sort(f, dim=-1, descending=True, stable=True) for f in full]
    for n in names:
        table = table.append_column(f"teacher_topk_ids.{n}", _list_col([t.indices[:, :K].reshape(-1).numpy()
                                                                        for t in top], np.int32))
        table = table.append_column(f"teacher_topk_logp.{n}", _list_col([t.values[:, :K].reshape(-1).numpy()
                                                                         for t in top], np.float32))
    return table.replace_schema_metadata({b"opd": b'{"top_k": %d}' % K})


def test_topk_training_uses_the_stored_top_k_and_lowers_the_exact_divergence(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # a teacher different from the student, peakier
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        teacher.lm_head.weight.mul_(6.0)
    table = scored_table(4, 2, seed=3)
    full = _teacher_full(teacher, table)
    table = _with_topk(table, full)
    weights = topk_row_weights("mixture", {"math": 1.0, "code": 0.0}, {}, table.column("domain").to_pylist())
    rows = rows_from_table(table, "t", topk_weights=weights)
    assert rows.top_k == K and list(rows.topk_ids) == ["math"]  # weight 0: not read
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    mb = collate(rows, [0, 3])
    got = {}
    with torch.no_grad():
        response_logp(student, mb, torch.device("cpu"), topk=got)
        for b, i in enumerate([0, 3]):  # the student's log-probs at the stored ids, by a direct forward
            ids = rows.input_ids[i]
            lsm = student(ids[None]).logits[0].log_softmax(-1)[int(rows.start[i]) - 1: len(ids) - 1]
            r = int(rows.response_len[i])
            torch.testing.assert_close(got["topk_logp.math"][b, :r], lsm.gather(-1, rows.topk_ids["math"][i]),
                                       rtol=0, atol=1e-5)

    def exact_fkl():
        with torch.no_grad():
            tot = n = 0.0
            for i, t in enumerate(full):
                ids = rows.input_ids[i]
                s = student(ids[None]).logits[0].double().log_softmax(-1)[int(rows.start[i]) - 1: len(ids) - 1]
                tot, n = tot + float((t.exp() * (t - s)).sum()), n + len(t)
            return tot / n
    before = exact_fkl()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    out = train_iteration(student, opt, rows, LossParams(kind="topk", tis_cap=None, sampled_weight=0.1),
                          LoopConfig(epochs=4, mini_batches=2, micro_batch_tokens=48), torch.device("cpu"))
    steps = out["steps"]
    assert exact_fkl() < 0.8 * before
    assert steps[-1]["topk_div"] < steps[0]["topk_div"] and 0 < steps[0]["teacher_topk_mass/math"] <= 1
    assert all(s["loss"] == pytest.approx(s["loss_topk"] + s["loss_sampled"], rel=1e-6) for s in steps)


def test_a_shard_without_top_k_is_refused_naming_the_iteration_and_the_field(tmp_path):
    cfg_path = write_config(tmp_path / "run.yaml")
    import yaml
    data = yaml.safe_load(open(cfg_path))
    data["teachers"] = [{"name": "math", "path": "unused", "domain": "math"},
                        {"name": "code", "path": "unused", "domain": "code"}]
    data.update(combination="route", loss={"kind": "topk", "tis_cap": None}, scoring={"top_k": 4})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    cfg = read_config(str(tmp_path / "run.yaml"))
    stage = write_scored(tmp_path / "iter-000003" / "scored", scored_table(2, 2, iteration=3), iteration=3)
    with pytest.raises(TrainError, match=r"iteration 3.*loss.kind=topk.*no top_k.*scoring.top_k"):
        load_rows(stage, cfg, iteration=3)


def test_route_weights_pick_the_domains_teacher_and_product_is_refused():
    w = topk_row_weights("route", {"a": 1.0, "b": 1.0}, {"x": "a", "y": "b"}, ["y", "x", "y"])
    assert w["a"].tolist() == [0, 1, 0] and w["b"].tolist() == [1, 0, 1]
    m = topk_row_weights("mixture", {"a": 1.0, "b": 3.0}, {}, ["x", "y"])
    assert m["a"].tolist() == [0.25, 0.25] and m["b"].tolist() == [0.75, 0.75]
    with pytest.raises(CombinationError, match="product.*mixture with loss.divergence: rkl"):
        topk_row_weights("product", {"a": 1.0}, {}, ["x"])
    with pytest.raises(CombinationError, match="no teacher serves it"):
        topk_row_weights("route", {"a": 1.0}, {"x": "a"}, ["z"])
