"""DESIGN section 2: api/ may import models, storage and worker.celery_app only, never the rest of worker/."""

from __future__ import annotations

import ast
from pathlib import Path

API = Path(__file__).resolve().parents[2] / "api"
ALLOWED_FROM_WORKER = frozenset({"worker.celery_app"})


def _worker_imports(path: Path) -> list[str]:
    """Every module under ``worker`` that the file at ``path`` imports (at any depth, lazily or not)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from worker import x`` imports worker.x when x is a module: count it as such.
            names = [node.module] if node.module != "worker" else [f"worker.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if n == "worker" or n.startswith("worker.")]
    return found


def test_api_imports_nothing_from_worker_but_the_celery_app() -> None:
    files = sorted(API.rglob("*.py"))
    assert len(files) > 20 and API / "inspection" / "__init__.py" in files
    offending = {
        str(path.relative_to(API.parent)): bad
        for path in files
        if (bad := [m for m in _worker_imports(path) if m not in ALLOWED_FROM_WORKER])
    }
    assert offending == {}


def test_the_check_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import worker.celery_app\n"
        "from worker import celery_app, jobs\n"
        "def f():\n    from worker.formats.onnx_model import safe_load\n    import worker\n"
    )
    assert _worker_imports(sample) == [
        "worker.celery_app", "worker.celery_app", "worker.jobs", "worker.formats.onnx_model", "worker"
    ]
