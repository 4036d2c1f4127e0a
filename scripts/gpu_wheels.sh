#!/usr/bin/env bash
# Gather the wheels scripts/gpu_smoke.sh needs beyond CUDA torch, transformers, pyarrow and pytest, for a
# GPU machine without a package registry: pydantic (and pydantic-core, built per platform and Python),
# annotated-types, typing-inspection, typing-extensions, fsspec, pyyaml. One folder, a few MiB (< 64 MiB).
#   scripts/gpu_wheels.sh [OUT_DIR] [PYTHON_VERSION] [PLATFORM]
#   e.g. scripts/gpu_wheels.sh wheels 3.11 manylinux2014_x86_64      then copy wheels/ next to the repo
set -euo pipefail
OUT=${1:-wheels}
PYV=${2:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLAT=${3:-manylinux2014_x86_64}
PIP=${PIP:-python3 -m pip}
mkdir -p "$OUT"
# versions within pyproject.toml's ranges; --no-deps: exactly this list, nothing that is already there
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --platform "$PLAT" -d "$OUT" \
  "pydantic>=2.7,<3" pydantic-core annotated-types typing-inspection "typing-extensions>=4.14" \
  "fsspec>=2024.6" "pyyaml>=6"
# pydantic pins one pydantic-core version: fetch that one if the unpinned download picked another
CORE=$(unzip -p "$OUT"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p' | head -1)
if [ -n "$CORE" ] && ! ls "$OUT"/pydantic_core-"$CORE"-*.whl >/dev/null 2>&1; then
  rm -f "$OUT"/pydantic_core-*.whl
  $PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --platform "$PLAT" -d "$OUT" \
    "pydantic-core==$CORE"
fi
du -sh "$OUT"
ls "$OUT"
