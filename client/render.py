"""What the CLI prints: JSON, before/after and generation tables, warnings, job and transfer progress bars."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from client.jobs import Job
from models.multitask_view import baselines_text, has_baselines, merge_view, size_text, task_rows
from models.report_view import (
    comparison_rows,
    fmt_number,
    generation_rows,
    progress_text,
    quality_rows,
    warning_lines,
)


def dumps(obj: Any) -> str:
    """JSON text of a pydantic model, Job, or plain data (for ``--json`` output)."""
    if isinstance(obj, Job):
        obj = obj.data
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2, by_alias=True)
    if isinstance(obj, list):
        return json.dumps([json.loads(dumps(o)) for o in obj], indent=2)
    return json.dumps(obj, indent=2, default=str)


def metrics_text(metrics: dict[str, Any]) -> str:
    """``k=v`` pairs of a step's scalar metrics."""
    return " ".join(f"{k}={fmt_number(v)}" for k, v in metrics.items() if not isinstance(v, dict | list))


def when_text(ts: datetime) -> str:
    """A timestamp as the tables show it."""
    return ts.strftime("%Y-%m-%d %H:%M:%S")


def plain_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    """A titled table of plain text (no rich markup read from the cells). An ``id`` column is never cut or wrapped
    (ids are there to be copied); the other cells fold onto more lines when the terminal is narrow, never '…'."""
    cells = [list(row) for row in rows]
    table = Table(title=title)
    for i, col in enumerate(columns):
        if col == "id":
            widest = max((len(row[i]) for row in cells), default=2)
            table.add_column(col, no_wrap=True, min_width=widest)
        else:
            table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    return table


def progress_line(job: Job) -> str:
    """A job's progress in words; a failed one says where in its error's own words (steps[0] prune)."""
    p = job.data.progress
    err = job.data.error
    return progress_text(job.status, p.step, p.steps, p.percent, p.epoch, p.epochs, err.step if err else None)


_CHANGE_STYLE = {True: "green", False: "red", None: ""}


def report_table(report: dict[str, Any]) -> Table:
    """A before/after table of a job report (``models.report_view``'s rows, as the HTML report shows them)."""
    table = Table(title="before / after")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for row in comparison_rows(report):
        change = Text(row.change_text, style=_CHANGE_STYLE[row.better])
        table.add_row(Text(row.label), Text(row.before_text), Text(row.after_text), change)
    quality = quality_rows(report)
    if quality:
        table.add_section()
    for q in quality:
        table.add_row(Text(q.label), Text(""), Text(q.value_text, style=_CHANGE_STYLE[q.better]), Text(""))
    return table


def generations_table(report: dict[str, Any]) -> Table | None:
    """A causal LM's greedy generations, input and output model side by side; None when there are none."""
    rows = generation_rows(report)
    if not rows:
        return None
    table = Table(title="generations (greedy)")
    for col in ("prompt", "before", "after"):
        table.add_column(col, overflow="fold")
    for g in rows:
        table.add_row(Text(g.prompt), Text(g.before), Text(g.after))
    return table


def warning_texts(job: Job) -> list[Text]:
    """A job's regression warnings ('3.2 times slower ...'), in red."""
    result = job.data.result
    lines = warning_lines({"warnings": result.warnings}) if result and result.warnings else warning_lines(job.report or {})
    return [Text(f"warning: {line}", style="bold red") for line in lines]


def tasks_table(report: dict[str, Any]) -> Table | None:
    """A multi-task step's per-task rows (before / after on each task's own eval rows); None without one."""
    rows = task_rows(report)
    if not rows:
        return None
    few, single, output = any(t.few_shot for t in rows), has_baselines(rows), any(t.output_text for t in rows)
    caption = "; ".join(x for x in (size_text(report), baselines_text(report)) if x)
    table = Table(title="tasks", caption=caption or None)
    for col in ("task", "metric", "before", "after", "change", *(("single-task", "vs single") if single else ()),
                *(("output", "budget") if output else ()), *(("zero-shot", "in-context", "fine-tuned") if few else ())):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for t in rows:
        extra = (t.zero_shot_text, t.in_context_text, t.fine_tuned_text) if few else ()
        vs = (Text(t.single_task_text), Text(t.vs_single_text, style=_CHANGE_STYLE[t.vs_single_better])) if single else ()
        out = (Text(t.output_text), Text(t.budget_text, style=_CHANGE_STYLE[t.budget_met])) if output else ()
        cells = [Text(t.task), Text(t.metric), Text(t.before_text), Text(t.after_text),
                 Text(t.change_text, style=_CHANGE_STYLE[t.better]), *vs, *out, *(Text(x) for x in extra)]
        table.add_row(*cells)
    return table


def merge_table(report: dict[str, Any]) -> Table | None:
    """A multi-task step's adapter merge: each adapter alone, each merge method per task, the chosen one and why."""
    view = merge_view(report)
    if view is None:
        return None
    caption = f"chosen: {view.why}" + (f"\n{view.adapter_files}" if view.adapter_files else "")
    table = Table(title=f"adapter merge (validation {view.metric})", caption=caption)
    for col in ("adapter", *view.tasks, "mean"):
        table.add_column(col, justify="left" if col == "adapter" else "right")
    for label, cells, mean, chosen in view.rows:
        table.add_row(Text(label + (" *" if chosen else ""), style="bold" if chosen else ""), *(Text(c) for c in cells),
                      Text(mean))
    return table


def report_out(job: Job) -> list[Any]:
    """What follows a finished job's status line: its warnings, where its calibration rows came from when they were
    carved from the eval set, its before/after table, a multi-task job's tasks, an LM's generations."""
    gens = generations_table(job.report) if job.report else None
    tasks = tasks_table(job.report) if job.report else None
    merge = merge_table(job.report) if job.report else None
    split = (job.report or {}).get("calibration_split") or {}
    notes = [Text(f"note: {split['message']}", style="yellow")] if split.get("message") else []
    return [*warning_texts(job), *notes, *([report_table(job.report)] if job.report else []),
            *([tasks] if tasks else []), *([merge] if merge else []), *([gens] if gens else [])]


class JobProgressBar:
    """A rich progress bar fed by ``Job.wait(on_progress=...)``: step i of n, phase, epoch, metrics."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
        )
        self.task = self.progress.add_task("queued", total=100.0, detail="")

    def __enter__(self) -> JobProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, job: Job) -> None:
        p = job.data.progress
        desc = f"{job.status}: {job.data.phase}"
        if job.status in ("failed", "cancelled"):
            desc = progress_line(job)  # where it failed in the error's own words (steps[0] prune)
        elif p.steps:
            desc = f"step {p.step}/{p.steps} {desc}"
        detail = []
        if p.epoch is not None:
            detail.append(f"epoch {p.epoch}/{p.epochs}" if p.epochs else f"epoch {p.epoch}")
        if p.metrics:
            detail.append(metrics_text(p.metrics))
        percent = 100.0 if job.status == "succeeded" else p.percent
        self.progress.update(self.task, completed=percent, description=desc, detail=" ".join(detail))


def transfer_progress(console: Console) -> Progress:
    """A bar for an upload or a download (bytes, speed), gone when done."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=console, transient=True,
    )


