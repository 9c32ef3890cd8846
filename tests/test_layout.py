"""The module boundaries the architecture promises: the engine runs without Ray or MLflow, and
the three jobs stand on it without importing each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "pixfleet"
JOBS = ("generation", "serving", "training")


def imported_packages(folder: str) -> dict[str, set[str]]:
    """file -> the pixfleet subpackages it imports (top level and inside functions)."""
    found = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names |= {m.split(".")[1] for m in modules if m.startswith("pixfleet.") and m.count(".") >= 1}
        found[str(path.relative_to(PACKAGE))] = names
    return found


def test_the_jobs_never_import_each_other_and_the_engine_and_evaluation_import_none():
    for job in JOBS:
        for path, packages in imported_packages(job).items():
            assert not packages & (set(JOBS) - {job}), f"{path} imports {packages & set(JOBS)}"
    for folder in ("engine", "evaluation"):  # what the jobs stand on stands on no job
        for path, packages in imported_packages(folder).items():
            assert not packages & set(JOBS), f"{path} imports {packages & set(JOBS)}"


def test_annotation_stands_on_generation_and_no_job_imports_it():
    """`pixfleet annotate` reuses the generation plan's sources and detect stage; the other way
    round nothing depends on it."""
    assert any("generation" in packages for packages in imported_packages("annotation").values())
    for folder in (*JOBS, "engine", "models", "config", "data", "evaluation", "comparison"):
        for path, packages in imported_packages(folder).items():
            assert "annotation" not in packages, f"{path} imports annotation"


def test_comparison_stands_on_generation_and_evaluation_and_nothing_imports_it():
    """`pixfleet eval` runs generation jobs and compares their scores; nothing depends on it."""
    used = set().union(*imported_packages("comparison").values())
    assert {"generation", "evaluation"} <= used
    for folder in (*JOBS, "engine", "models", "config", "data", "evaluation", "annotation"):
        for path, packages in imported_packages(folder).items():
            assert "comparison" not in packages, f"{path} imports comparison"


def test_the_engine_imports_neither_ray_nor_mlflow():
    modules = [f"pixfleet.engine.{p.stem}" for p in (PACKAGE / "engine").glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
