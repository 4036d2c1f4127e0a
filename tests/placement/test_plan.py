"""`opd plan`: the shipped 8-GPU config fits on 8 x 80 GiB; a teacher that cannot fit is refused
naming the config fields; model sizes from config.json, declared params or the known-size table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd_tasks.config import load_config, parse_config
from opd_tasks.model_size import KNOWN, count_params, known_size, model_arch
from opd_tasks.placement import PlanError, make_plan, render_plan

ROOT = Path(__file__).resolve().parents[2]
QWEN = ROOT / "configs" / "qwen3-8gpu.yaml"


def _qwen(**edits) -> dict:
    data = yaml.safe_load(QWEN.read_text())
    for dotted, value in edits.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[leaf] = value
    return data


def test_known_sizes_match_the_published_parameter_counts():
    # published totals: Qwen3-0.6B 0.6B, Qwen3-8B 8.2B, Llama-3-70B 70.6B, Qwen2.5-72B 72.7B
    assert count_params(KNOWN["qwen3-0.6b"]) == pytest.approx(0.596e9, rel=2e-3)
    assert count_params(KNOWN["qwen3-8b"]) == pytest.approx(8.19e9, rel=2e-3)
    assert count_params(KNOWN["llama-3-70b"]) == pytest.approx(70.55e9, rel=2e-3)
    assert count_params(KNOWN["qwen2.5-72b"]) == pytest.approx(72.7e9, rel=2e-3)
    assert known_size("/models/Qwen3-8B-math-rl")[0] == "qwen3-8b"
    assert known_size("/m/Qwen3-14B")[0] == "qwen3-14b"
    assert known_size("/m/my-model") is None


def test_size_comes_from_config_json_when_the_directory_exists(tmp_path):
    """A real transformers model's parameter count equals the config.json formula."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    model.config.save_pretrained(tmp_path)
    arch = model_arch(type("M", (), {"path": str(tmp_path), "params": None})(), "student")
    assert arch.source == "config.json"
    assert arch.params == sum(p.numel() for p in model.parameters())
    declared = model_arch(type("M", (), {"path": "/nowhere/x", "params": 3e9})(), "teachers[1]")
    assert (declared.params, declared.source) == (3e9, "declared (teachers[1].params)")


def test_shipped_qwen3_8gpu_config_fits_on_8_x_80_gib():
    plan = make_plan(load_config(QWEN), gpus=8, gpu_memory_gib=80)
    assert plan.errors == []
    rollout = plan.find("rollout", "rollout")
    assert (rollout.engine, rollout.dp, rollout.tp, rollout.gpus) == ("vllm", 8, 1, list(range(8)))
    scoring = {p.role: p.gpus for p in plan.stages["scoring"]}
    assert scoring == {"teacher math": [0, 1], "teacher code": [2, 3], "reference": [4, 5]}
    assert plan.find("train", "trainer").gpus == list(range(8))
    math = plan.find("scoring", "teacher math")
    assert math.detail["weights_gib"] == pytest.approx(8.19e9 * 2 / 2 / 2**30, rel=1e-2)  # bf16, tp 2
    assert "fits" in render_plan(plan)


def test_a_70b_teacher_on_one_gpu_is_refused_naming_the_teacher_and_the_fields():
    data = _qwen(**{"teachers.0.path": "/models/Llama-3-70B-math", "placement.teachers": {"math": [0], "code": [1]},
                    "scoring.vllm.tensor_parallel_size": 1})
    plan = make_plan(parse_config(data), gpus=8, gpu_memory_gib=80)
    assert len(plan.errors) == 1, plan.errors
    err = plan.errors[0]
    assert "teacher math (teachers[0]: 70.6B params, bfloat16)" in err
    assert "scoring.vllm.tensor_parallel_size" in err and "placement.teachers.math" in err
    with pytest.raises(PlanError, match=r"teachers\[0\]"):
        plan.raise_if_unfit()


def test_placement_errors_name_the_field():
    two = make_plan(parse_config(_qwen(**{"placement.teachers": {"math": [0, 1], "code": [1, 2]}})))
    assert any("placement.teachers.code: GPU 1 is also given to teacher math" in e for e in two.errors)
    small = make_plan(parse_config(_qwen()), gpus=4)
    assert any(e.startswith("placement.rollout: GPU") or "the node has 4" in e for e in small.errors)
    odd = make_plan(parse_config(_qwen(**{"placement.teachers": {"math": 3, "code": [3, 4]}})))
    assert any("placement.teachers.math: 3 GPUs is not a multiple of tensor_parallel_size=2" in e for e in odd.errors)
    big_batch = make_plan(parse_config(_qwen(**{"train.micro_batch_tokens": 65536})))
    assert any(e.startswith("train: the trainer needs") and "train.micro_batch_tokens" in e for e in big_batch.errors)


def test_opd_plan_cli_exits_0_when_it_fits_and_1_naming_the_field(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "plan", str(QWEN)], capture_output=True, text=True,
                        env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "teacher math" in ok.stdout and "fits" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_qwen(**{"teachers.0.path": "/models/Llama-3-70B-math",
                                           "scoring.vllm.tensor_parallel_size": 1,
                                           "placement.teachers": {"math": [0], "code": [1]}})))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "plan", str(bad), "--gpus", "8", "--gpu-memory", "80",
                          "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert not report["fits"] and "teachers[0]" in report["errors"][0]


def test_each_teachers_own_reference_is_one_more_scoring_engine():
    """teachers[].reference (G-OPD reward correction): each distinct base is planned as its own
    engine, on GPUs of its own; the run's reference is not loaded when no teacher uses it."""
    data = _qwen(**{"teachers.0.reference": {"path": "/models/Qwen3-8B-Base-math"},
                    "teachers.1.reference": {"path": "/models/Qwen3-8B-Base-code"}})
    data["placement"].pop("reference")
    plan = make_plan(parse_config(data), gpus=8, gpu_memory_gib=80)
    assert plan.errors == []
    scoring = {p.role: (p.model_field, p.gpus) for p in plan.stages["scoring"]}
    assert scoring == {"teacher math": ("teachers[0]", [0, 1]), "teacher code": ("teachers[1]", [2, 3]),
                       "reference of math": ("teachers[0].reference", [4, 5]),
                       "reference of code": ("teachers[1].reference", [6, 7])}
    # one teacher keeps the run's reference: both the run's and the other's own are planned
    data["teachers"][1].pop("reference")
    roles = [p.role for p in make_plan(parse_config(data), gpus=8, gpu_memory_gib=80).stages["scoring"]]
    assert roles == ["teacher math", "teacher code", "reference", "reference of math"]
    # two own references at tp 2 and two teachers at tp 2 do not fit on 6 GPUs: named
    data["teachers"][1]["reference"] = {"path": "/models/Qwen3-8B-Base-code"}
    plan = make_plan(parse_config(data), gpus=6, gpu_memory_gib=80)
    assert any("scoring: needs 8 GPUs at once" in e and "reference of code" in e for e in plan.errors), plan.errors
