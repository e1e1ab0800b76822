"""What a person reads of a multi-task step: one row per task (its metric on its own eval rows before and after,
and for few-shot choice tasks zero-shot, in-context and fine-tuned accuracy side by side) and the shared model's
size against N separate models. Pure, shared by the HTML report and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.report_view import fmt_bytes, fmt_number, is_num


@dataclass(frozen=True)
class TaskRow:
    """One task of a multi-task step."""

    task: str
    metric: str
    before_text: str
    after_text: str
    change_text: str
    better: bool | None
    rows_text: str
    few_shot: bool
    zero_shot_text: str
    in_context_text: str
    fine_tuned_text: str
    single_task_text: str = ""  # a single-task fine-tune of the same budget (baselines), "" when none was asked
    vs_single_text: str = ""
    vs_single_better: bool | None = None
    # the job's output model on the task (after every step, through its own output) and the budget judged on it
    output_text: str = ""
    budget_text: str = ""
    budget_met: bool | None = None


def _multitask(report: dict[str, Any]) -> dict[str, Any] | None:
    for step in report.get("steps") or []:
        found = (step.get("metrics") or {}).get("multitask") if isinstance(step, dict) else None
        if isinstance(found, dict):
            return found
    return None


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f}%" if is_num(v) else "-"


def task_rows(report: dict[str, Any]) -> list[TaskRow]:
    """The per-task rows of the report's multi-task step (none when it has none)."""
    mt = _multitask(report)
    rows: list[TaskRow] = []
    for r in (mt or {}).get("tasks") or []:
        if not isinstance(r, dict):
            continue
        metric = str(r.get("metric") or "accuracy")
        acc = metric == "accuracy"
        before, after = r.get("before"), r.get("after")
        shown = _pct if acc else fmt_number
        change, better = "-", None
        if isinstance(before, int | float) and isinstance(after, int | float):
            delta = float(after) - float(before)
            change = f"{100 * delta:+.1f} points" if acc else f"{delta:+.4g}"
            better = (delta > 0) if acc else (delta < 0)
        counts = [f"{r.get('train_rows')} train"]
        if r.get("validation_rows"):
            counts.append(f"{r.get('validation_rows')} validation (carved from train)")
        if r.get("eval_rows"):
            counts.append(f"{r.get('eval_rows')} eval")
        single_text, vs_text, vs_better = _vs_single(r, acc, (mt or {}).get("baselines") is not None)
        output_text, budget_text, budget_met = _output_and_budget(report, str(r.get("task")))
        rows.append(TaskRow(
            output_text=output_text, budget_text=budget_text, budget_met=budget_met,
            single_task_text=single_text, vs_single_text=vs_text, vs_single_better=vs_better,
            task=str(r.get("task")), metric=metric, before_text=shown(before), after_text=shown(after),
            change_text=change, better=better, rows_text=", ".join(counts), few_shot=bool(r.get("few_shot")),
            zero_shot_text=_pct(r.get("zero_shot")), in_context_text=_pct(r.get("in_context")),
            fine_tuned_text=_pct(r.get("fine_tuned") if r.get("fine_tuned") is not None else
                                 (after if r.get("few_shot") and acc else None)),
        ))
    return rows


def _output_and_budget(report: dict[str, Any], task: str) -> tuple[str, str, bool | None]:
    """The output model's accuracy on ``task`` and its drop against the task's reference, judged by the budget
    ("" when the report measured no output per task)."""
    measured = {str(m.get("task")): m for m in (report.get("output") or {}).get("tasks") or [] if isinstance(m, dict)}
    if task not in measured:
        return "", "", None
    budget = report.get("budget") or {}
    judged = next((b for b in budget.get("tasks") or [] if isinstance(b, dict) and b.get("task") == task), {})
    drop, limit = judged.get("accuracy_drop"), budget.get("max_accuracy_drop")
    text = f"{0.0 - 100 * float(drop or 0):+.1f} points vs {judged.get('reference_from')}" if is_num(drop) else "-"
    if is_num(limit):
        text += f" ({'within' if judged.get('met') else 'over'} {100 * float(limit or 0):.1f})"
    return _pct(measured[task].get("accuracy")), text, judged.get("met") if is_num(limit) else None


def _vs_single(r: dict[str, Any], acc: bool, asked: bool) -> tuple[str, str, bool | None]:
    """A task's single-task baseline and the multi-task model's lead over it ("" when none was asked)."""
    if not asked:
        return "", "", None
    single, lead = r.get("single_task"), r.get("vs_single_task")
    if not is_num(single):
        return "failed" if r.get("single_task_error") else "-", "-", None
    text = (_pct if acc else fmt_number)(single) + (" (cached)" if r.get("single_task_cached") else "")
    if not isinstance(lead, int | float):
        return text, "-", None
    return text, (f"{100 * lead:+.1f} points" if acc else f"{lead:+.4g}"), (lead > 0 if acc else lead < 0)


def has_baselines(rows: list[TaskRow]) -> bool:
    """Whether the tasks' rows carry single-task baselines."""
    return any(t.single_task_text for t in rows)


def baselines_text(report: dict[str, Any]) -> str:
    """'3 single-task models measured: 273 MB; this one 91 MB, 0.33x of their size' (or "")."""
    section = (_multitask(report) or {}).get("baselines")
    if not isinstance(section, dict):
        return ""
    jobs = [j for j in section.get("jobs") or [] if isinstance(j, dict)]
    cached = sum(1 for j in jobs if j.get("cached"))
    text = f"single-task baselines: {len(jobs)} fine-tunes of the same budget" + (
        f" ({cached} from the cache)" if cached else "")
    if is_num(section.get("separate_bytes")) and is_num(section.get("shared_bytes")):
        text += (f"; their {len(jobs)} models {fmt_bytes(section['separate_bytes'])}, this one "
                 f"{fmt_bytes(section['shared_bytes'])}, {float(section['ratio']):.2f}x of their size")
    return text


def size_text(report: dict[str, Any]) -> str:
    """'one model of 14,510 parameters (61.1 KB) serves 3 tasks; 3 separate models: 42,606 (179 KB), 0.34x'."""
    mt = _multitask(report)
    size = (mt or {}).get("size")
    if not isinstance(size, dict):
        return ""
    shared, separate, n = size.get("shared_params"), size.get("separate_params"), size.get("tasks")
    if not (isinstance(shared, int | float) and isinstance(separate, int | float)):
        return ""
    text = f"one model of {int(shared):,} parameters"
    if is_num(size.get("shared_bytes")):
        text += f" ({fmt_bytes(size['shared_bytes'])})"
    text += f" serves {n} tasks; {n} separate models: {int(separate):,} parameters"
    if is_num(size.get("separate_bytes")):
        text += f" ({fmt_bytes(size['separate_bytes'])})"
    if is_num(size.get("ratio")):
        text += f", {float(size['ratio']):.2f}x of their size"
    sampling = (mt or {}).get("sampling")
    if sampling:
        text += f"; batches drawn {sampling}"
        if sampling == "temperature" and is_num((mt or {}).get("temperature")):
            text += f" (T={float((mt or {})['temperature']):g})"
    return text


@dataclass(frozen=True)
class MergeView:
    """The adapter merge of a multi-task step: one row per candidate (each task's adapter alone on its own task,
    then each merge method) with its validation metric per task (accuracy, or a causal LM's eval loss), the method
    chosen and why."""

    tasks: list[str]
    rows: list[tuple[str, list[str], str, bool]]  # (label, per-task texts, mean text, chosen)
    chosen: str
    why: str
    metric: str = "accuracy"  # the selection metric, as words ("eval loss")
    adapter_files: str | None = None  # what adapters.zip holds and how the switch check went


def adapter_files_text(section: Any) -> str | None:
    """One line on ``adapters.zip``: the base and each task's adapter file, one model load, the switch check."""
    if not isinstance(section, dict) or not isinstance(section.get("adapter_bytes"), dict):
        return None
    sizes = ", ".join(f"{t} {fmt_bytes(b)}" for t, b in section["adapter_bytes"].items())
    runs = [r for r in section.get("runs") or [] if isinstance(r, dict)]
    same = all(r.get("matches_torch") for r in runs) and bool(runs)
    return (f"adapters.zip: base {fmt_bytes(section.get('base_bytes'))} loaded once ({section.get('base_load_s')} s), "
            f"one adapter file per task ({sizes}); {len(runs)} runs switching adapters on that one model "
            + ("generated torch's tokens with each" if same else "did NOT all match torch"))


def merge_view(report: dict[str, Any]) -> MergeView | None:
    """The merge table of the report's multi-task step (None when its adapters were not merged)."""
    merge = (_multitask(report) or {}).get("merge")
    if not isinstance(merge, dict):
        return None
    individual = merge.get("individual") or {}
    tasks = [str(t) for t in individual] or [str(r.get("task")) for r in (_multitask(report) or {}).get("tasks", [])]
    shown = _pct if merge.get("metric", "accuracy") == "accuracy" else fmt_number
    own = [shown((individual.get(t) or {}).get("validation")) for t in tasks]
    rows: list[tuple[str, list[str], str, bool]] = []
    if any((individual.get(t) or {}).get("validation_before") is not None for t in tasks):
        rows.append(("input model", [shown((individual.get(t) or {}).get("validation_before")) for t in tasks], "-",
                     False))
    rows.append(("each task's adapter alone", own, "-", False))
    for m in merge.get("methods") or []:
        if not isinstance(m, dict):
            continue
        label = str(m.get("method")) + (f" (density {m['density']:g})" if is_num(m.get("density")) else "")
        if m.get("error"):
            rows.append((label, ["-"] * len(tasks), f"not possible: {str(m['error'])[:80]}", False))
            continue
        per = m.get("per_task") or {}
        rows.append((label, [shown(per.get(t)) for t in tasks], shown(m.get("mean")), m.get("method") == merge.get("chosen")))
    return MergeView(tasks=tasks, rows=rows, chosen=str(merge.get("chosen") or ""), why=str(merge.get("why") or ""),
                     metric=str(merge.get("metric") or "accuracy").replace("_", " "),
                     adapter_files=adapter_files_text(merge.get("adapter_files")))
