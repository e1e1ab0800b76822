"""The worker's rooms (docs/architecture.md, "The worker's rooms"): every module is in one room, imports only
from its own room or a lower one, and no set of worker modules imports itself round in a circle.

Every import counts: at the top, inside a function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A module may import modules of its own room and of the rooms before it, never after.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    # the types every room uses, the job record (claim, heartbeat, events, artifacts, finish), the queue app
    ("foundation", ("worker", "worker.core", "worker.records", "worker.celery_app", "worker.torch_utils",
                    "worker.onnx2torch_ops", "worker.ort_guard", "worker.checked_io", "worker.memory",
                    "worker.advertise")),
    ("formats", ("worker.formats", "worker.formats.*")),  # loaders of uploaded models and datasets
    # measuring and converting a model: evaluation, metrics, the training loop, ONNX <-> torch, causal LMs
    ("measure", ("worker.evaluate", "worker.metrics", "worker.training", "worker.convert", "worker.families",
                 "worker.recheck", "worker.onnx_reshape", "worker.onnx_fold",
                 "worker.lm", "worker.lm.*")),
    ("passes", ("worker.passes", "worker.passes.*")),  # one module per step type
    # one job's run: its context, the step loop, the stage cache, deliverables, the streamed LLM run
    ("run", ("worker.context", "worker.pipeline", "worker.stage_cache", "worker.stage_cache.*",
             "worker.deliverables", "worker.stages", "worker.stream_job", "worker.task_eval")),
    ("jobs", ("worker.jobs", "worker.children", "worker.baselines", "worker.adapter_jobs", "worker.search", "worker.gc",
              "worker.reconcile")),  # jobs, searches, their child jobs (baselines, task adapters), upkeep
    ("shell", ("worker.tasks", "worker.main")),  # the Celery tasks and the worker's entry point
]

# Circles that work in progress elsewhere breaks; each must still be there (else drop it from here).
KNOWN_CIRCLES: set[frozenset[str]] = set()


def modules(root: Path, package: str = "worker") -> dict[str, Path]:
    """``{dotted name: file}`` of every module of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that the file imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def graph(root: Path, package: str = "worker") -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``."""
    known = modules(root, package)
    return {name: imports(path, known) - {name} for name, path in known.items()}


def circles(g: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(g[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.add(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(frozenset(members))
    return found


def room_of(module: str) -> int | None:
    """The index of the room ``module`` is in (None: in none)."""
    return next((i for i, (_, patterns) in enumerate(ROOMS) if any(fnmatchcase(module, p) for p in patterns)), None)


def upward(g: dict[str, set[str]]) -> list[str]:
    """Every import that runs from a room up to a later one, as ``a (room) -> b (room)``."""
    out = []
    for module, targets in sorted(g.items()):
        mine = room_of(module)
        for target in sorted(targets):
            theirs = room_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{module} ({ROOMS[mine][0]}) -> {target} ({ROOMS[theirs][0]})")
    return out


def test_every_worker_module_is_in_one_room() -> None:
    names = modules(ROOT)
    assert len(names) > 40
    assert {n for n in names if room_of(n) is None} == set()


def test_no_import_runs_up_a_room() -> None:
    assert upward(graph(ROOT)) == []


def test_no_import_circle_in_the_worker() -> None:
    found = set(circles(graph(ROOT)))
    assert found - KNOWN_CIRCLES == set()
    assert KNOWN_CIRCLES - found == set(), "a known circle is gone: drop it from KNOWN_CIRCLES"


def test_the_checks_see_circles_and_upward_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "worker"
    (pkg / "passes").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "core.py": "from worker.passes import base\n",  # up: foundation -> passes
        "jobs.py": "def f():\n    from worker import search\n",
        "search.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import worker.jobs\n",
        "passes/__init__.py": "",
        "passes/base.py": "from worker.core import X\n",
    }.items():
        (pkg / name).write_text(text)
    g = graph(tmp_path)
    assert g["worker.core"] == {"worker.passes.base"} and g["worker.passes"] == set()
    assert sorted(map(sorted, circles(g))) == [["worker.core", "worker.passes.base"], ["worker.jobs", "worker.search"]]
    assert upward(g) == ["worker.core (foundation) -> worker.passes.base (passes)"]
