#!/usr/bin/env bash
# GPU smoke check on one NVIDIA GPU, at most 8 minutes: hf engine rollout + scoring and the trainer (bf16,
# NCCL at world size 1) on a random ~0.5B Qwen3; prints JSON (tokens/s and peak GPU memory per stage,
# bf16 scorer vs float32 forward). Needs CUDA torch, transformers, pyarrow; no Prefect, no vllm, no registry:
# what else it needs comes from a wheels folder made by scripts/gpu_wheels.sh (OPD_WHEELS, default ./wheels).
#   scripts/gpu_smoke.sh                  # on the GPU machine
#   scripts/gpu_smoke.sh --device cpu     # dry mode with a tiny model (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${OPD_WHEELS:-wheels}
if ! "$PY" -c "import pydantic, yaml, fsspec" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "error: pydantic/pyyaml/fsspec are not importable and there is no wheels folder $WHEELS; run" \
         "scripts/gpu_wheels.sh on a machine with a registry and copy the folder here (or set OPD_WHEELS)" >&2
    exit 2
  fi
  TARGET=$(mktemp -d)
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$TARGET" "$WHEELS"/*.whl
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec timeout 480 "$PY" scripts/gpu_smoke.py "$@"
