"""The Prefect artifacts of a run, read back from the Prefect API: one table artifact per iteration
(the metrics.jsonl row's numbers and the link to the iteration's HTML view) and the run's progress
artifact at 100%. One tiny iteration through `opd_run` in this process."""
import json
from pathlib import Path

import pytest

from tiny_world import tiny_config, write_config


@pytest.mark.slow
def test_iteration_table_and_progress_artifacts(tmp_path, tiny_world, prefect_in_process):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.run import opd_run

    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tiny_world, name="artifacts-test", iterations=1))
    run = tmp_path / "run"
    state = opd_run(cfg, run_dir=str(run), return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"artifacts-test-progress", "artifacts-test-iteration-0000"}
    progress = by_key["artifacts-test-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for n, row in enumerate(lines):
        art = by_key[f"artifacts-test-iteration-{n:04d}"]
        assert art.type == "table" and art.description.startswith(f"{run} iteration {n}")
        table = {r["metric"]: r["value"] for r in (json.loads(art.data) if isinstance(art.data, str) else art.data)}
        assert table["loss"] == pytest.approx(row["loss"]) and table["reward_mean"] == pytest.approx(row["reward_mean"])
        assert {k: table[f"kl(student||{k})"] for k in ("tx", "ty")} == pytest.approx(row["kl"])
        assert table["accuracy/x"] == pytest.approx(row["accuracy"]["x"])
        view = Path(table["inspect_html"])
        assert view == run / f"iter-{n:06d}" / "inspect.html" and str(view) in art.description
        page = view.read_text()
        assert f"{n}-q" in page and "teacher_kl_on_domain" in page  # this iteration's samples and summary
