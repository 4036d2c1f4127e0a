"""Guards on the project itself: what CI runs and what the package ships."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_vllm_marked_test_file_is_run_by_make_test_vllm():
    """The vllm venv collects only the files listed in the Makefile: a new vllm test elsewhere
    would silently never run."""
    listed = set(re.search(r"^VLLM_TESTS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split())
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.vllm", p.read_text())}
    assert marked == listed


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for cmd in ("demo", "run", "resume", "status", "score", "inspect", "toy"):
        assert re.search(rf"\b{cmd}\b", out), cmd


def test_layers_import_one_way():
    """flows -> opd_tasks -> storage; storage never imports torch or opd_tasks; losses only torch;
    Prefect only in flows/."""
    for p in (ROOT / "storage").glob("*.py"):
        src = p.read_text()
        assert not re.search(r"^\s*(from|import) (opd_tasks|flows|torch|prefect)\b", src, re.M), p
    for p in (ROOT / "opd_tasks").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) (flows|prefect)\b", p.read_text(), re.M), p
    pure = {"__future__", "math", "dataclasses", "typing", "torch"}
    for name, allowed in (("losses.py", pure | {"opd_tasks.losses_topk"}), ("losses_topk.py", pure | {"opd_tasks.losses"})):
        src = (ROOT / "opd_tasks" / name).read_text()  # the loss math: torch and each other only
        imported = set(re.findall(r"^\s*(?:from|import) ([\w.]+)", src, re.M))
        assert imported <= allowed, (name, imported)


def test_every_repository_path_named_in_code_and_docs_exists():
    """A path into the repository (configs/..., docs/..., opd_tasks/..., ...) named in a Python file
    (docstrings, comments, messages) or a Markdown file must exist: no pointer to a missing document."""
    tops = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
    named = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*[\w-])" % "|".join(map(re.escape, tops)))
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.md"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = [(f, m) for f in files if (ROOT / f).is_file()
               for m in named.findall((ROOT / f).read_text()) if not (ROOT / m).exists()]
    assert not missing, missing
