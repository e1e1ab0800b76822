"""A multi-task model measured per task (docs/architecture.md §13): each task of the job's last multi-task step
has its eval rows run through its own output (``logits_<task>``, labels as the model's ``modelpress.tasks``
metadata orders them), and the quality budget is judged per task: ``max_accuracy_drop`` holds on every task, the
worst one decides and is named.

A task's reference is the input model's accuracy on the task's eval rows where the input's own head scores the
task (``head_from_input`` in the step's row), else the multi-task step's exported model's (the first model that
has the task's output). Causal LMs trained on mixed rows leave one plain model: they have no per-task outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.passes.multitask import METADATA_KEY, task_eval_rows

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.core import PipelineContext, WorkingModel


def described_tasks(onnx_path: Path) -> list[dict[str, Any]]:
    """The ``modelpress.tasks`` metadata of an ONNX file (each task's name, output and labels); empty if none."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    found = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    return list(json.loads(found)) if found else []


def measure(model: WorkingModel, ctx: PipelineContext, spec: JobSpec) -> list[dict[str, Any]] | None:
    """Each task's accuracy through its own output on its eval rows (``max_samples`` of them); None when the job
    has no multi-task step or the model has no output per task."""
    from worker.evaluate import outputs_on

    tasks = spec.output_tasks()
    if not tasks or model.onnx_path is None:
        return None
    described = {str(d.get("name")): d for d in described_tasks(model.onnx_path)}
    if not described:
        return None
    rows: list[dict[str, Any]] = []
    data = {}
    for i, task in enumerate(tasks):
        d = described.get(task.name)
        if d is None:
            continue
        rows.append({"task": task.name, "output": str(d["output"]), "accuracy": None, "eval_rows": 0})
        ev = task_eval_rows(ctx, task, i, model, d.get("labels"))
        if ev is not None and ev.labels is not None:
            data[task.name] = ev.take(spec.evaluate.max_samples) if spec.evaluate.max_samples else ev
    outs = outputs_on(model.onnx_path, data, spec.evaluate, ctx.check_cancelled)
    for row in rows:
        ev = data.get(row["task"])
        if ev is not None:
            logits = outs[row["task"]][row["output"]]
            row["accuracy"] = float((np.asarray(logits).argmax(1) == ev.labels).mean())
            row["eval_rows"] = len(ev)
    return rows


def _step_rows(steps: list[dict[str, Any]]) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The last multi-task step's label (``steps.0 (finetune ...)``) and its rows by task."""
    for entry in reversed(steps):
        mt = (entry.get("metrics") or {}).get("multitask") or {}
        if mt.get("tasks"):
            where = f"steps.{entry.get('index')} ({entry.get('label')})"
            return where, {str(r.get("task")): r for r in mt["tasks"]}
    return None, {}


def budget(spec: JobSpec, base: dict[str, Any], measured: list[dict[str, Any]],
           steps: list[dict[str, Any]]) -> dict[str, Any]:
    """``base`` (the family's budget, on the headline output) judged per task: ``accuracy_drop`` the worst task's,
    ``task`` naming it, ``tasks`` each task's reference, accuracy and drop; ``met`` only when every task holds."""
    where, refs = _step_rows(steps)
    max_drop = spec.evaluate.max_accuracy_drop
    per: list[dict[str, Any]] = []
    missed: list[str] = []
    for m in measured:
        row = refs.get(m["task"], {})
        ref: float | None
        source: str | None
        if row.get("head_from_input") and row.get("before") is not None:
            ref, source = float(row["before"]), "input"
        elif row.get("after") is not None:
            ref, source = float(row["after"]), where
        else:
            ref, source = None, None
        acc = m.get("accuracy")
        drop = None if ref is None or acc is None else ref - float(acc)
        ok = max_drop is None or (drop is not None and drop <= max_drop + 1e-12)
        per.append({"task": m["task"], "reference": ref, "reference_from": source, "accuracy": acc,
                    "accuracy_drop": drop, "met": ok})
        if ok:
            continue
        if drop is None:
            missed.append(f"task {m['task']!r}: accuracy could not be measured (no eval rows)")
        else:
            assert max_drop is not None and ref is not None and acc is not None
            missed.append(f"task {m['task']!r}: accuracy fell {drop * 100:.2f} points ({ref:.4f} -> {acc:.4f}, "
                          f"reference: {source}; allowed {max_drop * 100:.2f})")
    judged = [p for p in per if p["accuracy_drop"] is not None]
    worst = max(judged, key=lambda p: p["accuracy_drop"], default=None)
    out = {**base, "metric": "accuracy", "tasks": per, "met": not missed,
           "accuracy_drop": worst["accuracy_drop"] if worst else None, "task": worst["task"] if worst else None}
    out.pop("reason", None)
    if missed:
        out["reason"] = "; ".join(missed)
        failing = [p for p in per if not p["met"]]
        out["task"] = max(failing, key=lambda p: float("inf") if p["accuracy_drop"] is None else p["accuracy_drop"])["task"]
    return out
