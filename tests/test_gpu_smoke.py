"""scripts/gpu_smoke.py in its CPU dry mode (a tiny model): the JSON the GPU run prints, every stage ran.
The cuda mode was not run here (no GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_dry_mode_on_cpu_prints_the_stage_json():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{\n"):])
    for stage in ("rollout", "scoring", "train"):
        assert report[stage]["tokens"] > 0 and report[stage]["tokens_per_s"] > 0, report[stage]
        assert report[stage]["peak_gpu_gib"] is None  # no GPU in the dry mode
    assert report["train"]["loss"] != 0.0  # the teacher differs from the student: a real gradient
    assert report["bf16_vs_fp32"]["scorer_dtype"] == "float32" and report["bf16_vs_fp32"]["max_abs_diff"] < 1e-4
