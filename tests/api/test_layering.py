"""docs/architecture.md §2: api/ may import models, storage and worker.celery_app only, never the rest of worker/;
storage/ (shared by both) imports neither of them, nor torch or onnxruntime."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_FROM_WORKER = frozenset({"worker.celery_app"})


def _imports(path: Path, tops: frozenset[str]) -> list[str]:
    """Every module under one of the top-level packages ``tops`` that the file imports (lazily or not)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from worker import x`` imports worker.x when x is a module: count it as such.
            names = [node.module] if node.module not in tops else [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in tops]
    return found


def _offending(package: str, tops: frozenset[str], allowed: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    return {
        str(path.relative_to(ROOT)): bad
        for path in files
        if (bad := [m for m in _imports(path, tops) if m not in allowed])
    }


def test_api_imports_nothing_from_worker_but_the_celery_app() -> None:
    assert (ROOT / "api" / "inspection" / "__init__.py").is_file()
    assert _offending("api", frozenset({"worker"}), ALLOWED_FROM_WORKER) == {}


def test_storage_imports_neither_api_nor_worker_nor_heavy_runtimes() -> None:
    assert _offending("storage", frozenset({"api", "worker", "torch", "onnxruntime", "transformers"})) == {}


def test_the_check_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import worker.celery_app\n"
        "from worker import celery_app, jobs\n"
        "def f():\n    from worker.formats.onnx_model import safe_load\n    import worker\n    import workers\n"
    )
    assert _imports(sample, frozenset({"worker"})) == [
        "worker.celery_app", "worker.celery_app", "worker.jobs", "worker.formats.onnx_model", "worker"
    ]
