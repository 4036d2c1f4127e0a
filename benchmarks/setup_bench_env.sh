#!/usr/bin/env bash
# The benchmark environment, apart from the project's .venv (trl must never go into .venv):
#   bash benchmarks/setup_bench_env.sh            # creates/updates .venv-bench (idempotent)
# torch first, from the CPU wheel (another spec may pull a multi-GB CUDA build), then the project
# (editable), then TRL (GKDTrainer, for bench_training.py) and py-spy (profiles in benchmarks/README.md).
# TRL 1.16 installs beside torch 2.13 CPU without touching transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=${VENV:-.venv-bench}
TRL=${TRL:-trl==1.16.0}

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e .
"$VENV/bin/pip" install -q "$TRL" py-spy
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
print(f"{__import__('sys').prefix}: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
