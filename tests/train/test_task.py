"""train_task hands the run's world size and paths to launch_training (no Prefect server needed)."""
import opd_tasks.trainer.task as task_mod
from opd_tasks.config import TrainConfig


def test_train_task_passes_world_size_and_paths(monkeypatch):
    seen = {}
    monkeypatch.setattr(task_mod, "launch_training", lambda **kw: seen.update(kw) or {"step": 7})
    monkeypatch.setattr(task_mod, "get_run_logger", lambda: type("L", (), {"info": print})())
    out = task_mod.train_task.fn(TrainConfig(nproc_per_node=2, nnodes=1), config="c.yaml", scored_dir="s",
                                 init_checkpoint="i", out_checkpoint="o", train_dir="t", iteration=3)
    assert out == {"step": 7}
    assert seen["nproc_per_node"] == 2 and seen["nnodes"] == 1 and seen["iteration"] == 3
    assert (seen["config"], seen["scored_dir"], seen["init_checkpoint"], seen["out_checkpoint"],
            seen["train_dir"]) == ("c.yaml", "s", "i", "o", "t")
