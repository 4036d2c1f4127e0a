"""A reduced `opd demo`: the shipped configs/toy.yaml on the test-size toy world (its offline warm
start on 64 prompts, then 3 iterations),
through Prefect in this process. The pipeline must run end to end, write the report files, and the
student must move towards its teachers. No accuracy threshold: that is the experiment's job
(experiments/toy_experiments.py); README says what the full demo reaches."""
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_the_student_moves_towards_its_teachers(tmp_path, toy_world,
                                                                                 toy_world_cfg, prefect_in_process):
    from flows.demo import run_demo

    cfg = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    cfg["toy_world"] = toy_world_cfg.model_dump()
    cfg["rollout"]["prompts_per_iteration"] = 128  # the demo's lr and step shape, fewer samples
    cfg["eval"]["max_prompts"] = 64
    cfg["offline"]["generate"]["prompts"] = 64  # the demo's offline phase, a fraction of its samples
    cfg["offline"]["mini_batches"] = 2
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "demo"

    summary = run_demo(run_dir=str(run_dir), iterations=3, config=cfg_path)

    world = json.loads((toy_world / "world.json").read_text())
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert {n: t["domain"] for n, t in on_disk["teachers"].items()} == {"adder": "add", "reverser": "rev"}
    domains = set(world["accuracy"]["student"])
    off = on_disk["offline"]  # the warm start: teacher samples, verifier-filtered, then sft
    assert off["source"] == "generate" and 0 < off["kept"] <= off["rows"] == 64 * cfg["offline"]["generate"]["group_size"]
    assert off["accuracy_before"] == on_disk["accuracy"]["student_initial"]
    assert off["accuracy_after"] == on_disk["accuracy"]["student_warm_start"]
    for key in ("student_initial", "student_warm_start", "student_final", "adder", "reverser"):
        assert set(on_disk["accuracy"][key]) == domains
        assert all(0.0 <= v <= 1.0 for v in on_disk["accuracy"][key].values())

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(r["loss"] is not None and r["kl"]["adder"] > 0 and r["kl"]["reverser"] > 0 for r in rows)
    # On-policy KL to each domain's teacher, measured on each iteration's own rollout: down after
    # two updates (sum over teachers: each alone is noisier), and the training loss with it.
    first, last = rows[0], rows[-1]
    assert sum(last["kl"].values()) < 0.9 * sum(first["kl"].values()), [r["kl"] for r in rows]
    assert last["loss"] < first["loss"], [r["loss"] for r in rows]
