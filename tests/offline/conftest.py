"""The shared `prefect server` of the reliability tests (tests/reliability/conftest.py), reused here
for the CLI runs of the offline phase: loaded by path under its own module name."""
import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "reliability" / "conftest.py"
_spec = importlib.util.spec_from_file_location("opd_tests_reliability_support", _path)
_support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_support)

opd_cli = _support.opd_cli
