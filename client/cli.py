"""The ``modelpress`` command line, on top of the SDK.

Exit codes: 0 success; 1 the job failed or was cancelled (or a download did not verify, or a wait
timed out); 2 usage or validation errors (bad arguments, a 4xx answer: its detail and field are
printed); 3 the server could not be reached or answered 5xx.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
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

from client import gc_cli, keys_cli
from client.errors import (
    APIError,
    APIServerError,
    APIUnavailable,
    ChecksumMismatch,
    ConnectionFailed,
    JobFailed,
    JobWasCancelled,
    ModelpressError,
    WaitTimeout,
)
from client.jobs import Job
from client.sdk import Client
from models.multitask_view import size_text, task_rows
from models.report_view import (
    comparison_rows,
    fmt_bytes,
    fmt_number,
    generation_rows,
    progress_text,
    quality_rows,
    warning_lines,
)

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
QUANTIZE_MODES = {
    "int8": {"type": "quantize", "mode": "dynamic"},
    "int8-dynamic": {"type": "quantize", "mode": "dynamic"},
    "int8-static": {"type": "quantize", "mode": "static"},
    "fp16": {"type": "quantize", "mode": "fp16"},
    # weight-only, to MatMulNBits (causal LMs above all; the pass's measured defaults)
    "int4": {"type": "quantize", "mode": "int4"},
    "int8-weight": {"type": "quantize", "mode": "int8_weight"},
}
TASKS = ("image-classification", "text-classification", "feature-extraction", "text-generation", "generic")


class _Ctx:
    """What every command gets: parsed args, the two consoles, and a lazily made client."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False)
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(base_url=self.args.url, api_key=self.args.api_key)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def print_json(self, obj: Any) -> None:
        sys.stdout.write(dumps(obj) + "\n")
        sys.stdout.flush()

    def emit(self, data: Any, *shown: Any) -> int:
        """A command's result: ``data`` as JSON with ``--json``, else each of ``shown`` printed; exit 0."""
        if self.args.json:
            self.print_json(data)
        else:
            for item in shown:
                self.out.print(item)
        return EXIT_OK


def dumps(obj: Any) -> str:
    """JSON text of a pydantic model, Job, or plain data (for ``--json`` output)."""
    if isinstance(obj, Job):
        obj = obj.data
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2, by_alias=True)
    if isinstance(obj, list):
        return json.dumps([json.loads(dumps(o)) for o in obj], indent=2)
    return json.dumps(obj, indent=2, default=str)


# -- formatting helpers -------------------------------------------------------------------------


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt_number(v)}" for k, v in metrics.items() if not isinstance(v, dict | list))


def _when(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S")


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    """A titled table of plain text (no rich markup read from the cells)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


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


def tasks_table(report: dict[str, Any]) -> Table | None:
    """A multi-task step's per-task rows (before / after on each task's own eval rows); None without one."""
    rows = task_rows(report)
    if not rows:
        return None
    few = any(t.few_shot for t in rows)
    table = Table(title="tasks", caption=size_text(report) or None)
    for col in ("task", "metric", "before", "after", "change", *(("zero-shot", "in-context", "fine-tuned") if few else ())):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for t in rows:
        extra = (t.zero_shot_text, t.in_context_text, t.fine_tuned_text) if few else ()
        cells = [Text(t.task), Text(t.metric), Text(t.before_text), Text(t.after_text),
                 Text(t.change_text, style=_CHANGE_STYLE[t.better]), *(Text(x) for x in extra)]
        table.add_row(*cells)
    return table


def warning_texts(job: Job) -> list[Text]:
    """A job's regression warnings ('3.2 times slower ...'), in red."""
    result = job.data.result
    lines = warning_lines({"warnings": result.warnings}) if result and result.warnings else warning_lines(job.report or {})
    return [Text(f"warning: {line}", style="bold red") for line in lines]


def _report_out(job: Job) -> list[Any]:
    """What follows a finished job's status line: its warnings, its before/after table, an LM's generations."""
    gens = generations_table(job.report) if job.report else None
    tasks = tasks_table(job.report) if job.report else None
    return [*warning_texts(job), *([report_table(job.report)] if job.report else []), *([tasks] if tasks else []),
            *([gens] if gens else [])]


class _JobProgress:
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

    def __enter__(self) -> _JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, job: Job) -> None:
        p = job.data.progress
        desc = f"{job.status}: {job.data.phase}"
        if p.steps:
            where = f"step {p.step}/{p.steps}"
            desc = f"{job.status} at {where}: {job.data.phase}" if job.status in ("failed", "cancelled") else f"{where} {desc}"
        detail = []
        if p.epoch is not None:
            detail.append(f"epoch {p.epoch}/{p.epochs}" if p.epochs else f"epoch {p.epoch}")
        if p.metrics:
            detail.append(_metrics(p.metrics))
        percent = 100.0 if job.status == "succeeded" else p.percent
        self.progress.update(self.task, completed=percent, description=desc, detail=" ".join(detail))


def _transfer_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=console, transient=True,
    )


def _upload(ctx: _Ctx, kind: str, path: str, fmt: str | None, name: str | None) -> Any:
    with _transfer_progress(ctx.err) as bar:
        task = bar.add_task(f"upload {Path(path).name}", total=None)

        def on_progress(sent: int, total: int) -> None:
            bar.update(task, completed=sent, total=total)

        return ctx.client.upload(kind, path, fmt, name=name, on_progress=on_progress)


def _wait(ctx: _Ctx, job: Job, timeout: float | None = None) -> Job:
    with _JobProgress(ctx.err) as view:
        return job.wait(timeout=timeout, on_progress=view)


def _download(ctx: _Ctx, job: Job, dest: str) -> list[Path]:
    with _transfer_progress(ctx.err) as bar:
        task = bar.add_task("download", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return job.download(dest, on_progress=on_progress)


# -- commands -----------------------------------------------------------------------------------


def cmd_serve(ctx: _Ctx) -> int:
    from api.server import serve

    serve(host=ctx.args.host, port=ctx.args.port, with_worker=not ctx.args.no_worker)
    return EXIT_OK


def cmd_worker(ctx: _Ctx) -> int:
    from worker.main import run_worker

    queues = [q.strip() for q in (ctx.args.queues or "").split(",") if q.strip()] or None
    run_worker(queues, concurrency=ctx.args.concurrency)
    return EXIT_OK


def cmd_migrate(ctx: _Ctx) -> int:
    from migrations import upgrade

    upgrade(ctx.args.database_url)
    ctx.err.print("database migrated")
    return EXIT_OK


def cmd_upload(ctx: _Ctx) -> int:
    record = _upload(ctx, ctx.args.kind, ctx.args.path, ctx.args.format, ctx.args.name)
    line = f"{record.id}  {record.name}  {record.format}  {fmt_bytes(record.size_bytes)}  sha256={record.sha256[:12]}"
    if record.deduplicated:
        line += f"\ndeduplicated: the server already holds these bytes as {record.id} ({record.name!r}); nothing uploaded"
    return ctx.emit(record, line)


def cmd_list_records(ctx: _Ctx) -> int:
    rows: list[Any] = list(ctx.client.models() if ctx.args.kind == "models" else ctx.client.datasets())
    return ctx.emit(rows, _table(ctx.args.kind, ("id", "name", "format", "size", "sha256", "created"), (
        (r.id, r.name, r.format, fmt_bytes(r.size_bytes), r.sha256[:12], _when(r.created_at)) for r in rows
    )))


def _load_spec(path: str) -> dict[str, Any]:
    import yaml

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job spec must be a mapping")
    return data


def _finish(ctx: _Ctx, job: Job) -> int:
    """Print a finished job's summary; the report's before/after table when it has one."""
    return ctx.emit(job, f"job {job.id} {job.status}", *_report_out(job))


def _show_failed_report(ctx: _Ctx, exc: JobFailed) -> None:
    """A failed job that still has a report (an accuracy-budget miss): its warnings and before/after table."""
    if exc.job.report and not ctx.args.json:
        for shown in _report_out(exc.job):
            ctx.out.print(shown)


def _wait_and_finish(ctx: _Ctx, job: Job) -> int:
    """Wait for a job and print its summary; a failed one with a report (a missed budget) prints the table too."""
    try:
        done = _wait(ctx, job, ctx.args.timeout)
    except JobFailed as exc:
        _show_failed_report(ctx, exc)
        raise
    return _finish(ctx, done)


def _meta_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``--meta k=v`` options as a dict; ValueError (a usage error) for one without ``=``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--meta {pair!r}: expected key=value")
        out[key] = value
    return out


def cmd_submit(ctx: _Ctx) -> int:
    job = ctx.client.submit(_load_spec(ctx.args.spec), idempotency_key=ctx.args.idempotency_key,
                            name=ctx.args.name, metadata=_meta_pairs(ctx.args.meta))
    if not ctx.args.wait:
        return ctx.emit(job, job.id)
    ctx.err.print(f"submitted {job.id}")
    return _wait_and_finish(ctx, job)


def _progress(job: Job) -> str:
    p = job.data.progress
    return progress_text(job.status, p.step, p.steps, p.percent, p.epoch, p.epochs)


def cmd_jobs_list(ctx: _Ctx) -> int:
    jobs = []
    for job in ctx.client.jobs(status=ctx.args.status, name=ctx.args.name, metadata=_meta_pairs(ctx.args.meta)):
        jobs.append(job)
        if ctx.args.limit and len(jobs) >= ctx.args.limit:
            break
    return ctx.emit([j.data for j in jobs], _table("jobs", ("id", "name", "status", "phase", "progress", "created"), (
        (j.id, j.data.name or "", j.status, j.data.phase, _progress(j), _when(j.data.timestamps.created_at))
        for j in jobs
    )))


def cmd_jobs_show(ctx: _Ctx) -> int:
    job = ctx.client.job(ctx.args.id)
    if ctx.args.json:
        ctx.print_json(job)
        return EXIT_OK
    d = job.data
    ctx.out.print(f"[bold]{d.id}[/bold]  status={d.status}  phase={d.phase}  attempt={d.attempt}  queue={d.queue}")
    if d.name or d.metadata:
        ctx.out.print(f"name: {d.name or '-'}" + "".join(f"  {k}={v}" for k, v in sorted(d.metadata.items())),
                      markup=False)
    p = d.progress
    ctx.out.print("progress: " + _progress(job)
                  + (f"  {_metrics(p.metrics)}" if p.metrics else ""))
    ctx.out.print("pipeline: " + " -> ".join(s.type for s in d.spec.steps))
    if d.error:
        ctx.out.print(f"[red]error[/red] {d.error.code}: {d.error.message}" + (f" (step {d.error.step})" if d.error.step else ""))
    if job.artifacts:
        ctx.out.print(_table("artifacts", ("id", "name", "kind", "size", "sha256"), (
            (a.id, a.name, a.kind, fmt_bytes(a.size_bytes), a.sha256[:12]) for a in job.artifacts
        )))
    for shown in _report_out(job):
        ctx.out.print(shown)
    return EXIT_OK


def cmd_jobs_wait(ctx: _Ctx) -> int:
    return _wait_and_finish(ctx, ctx.client.job(ctx.args.id))


def cmd_jobs_logs(ctx: _Ctx) -> int:
    job = ctx.client.job(ctx.args.id)
    for ev in job.events(follow=ctx.args.follow):
        if ctx.args.json:
            sys.stdout.write(ev.model_dump_json() + "\n")
            sys.stdout.flush()
        else:
            extra = _metrics(ev.data) if ev.kind == "log" and ev.data else ""
            ctx.out.print(f"{ev.ts:%H:%M:%S} {ev.kind:<8} {ev.message}" + (f"  {extra}" if extra else ""),
                          markup=False)
    return EXIT_OK


def cmd_jobs_cancel(ctx: _Ctx) -> int:
    job = ctx.client.job(ctx.args.id).cancel()
    return ctx.emit(job, f"{job.id} {job.status}")


def cmd_download(ctx: _Ctx) -> int:
    paths = _download(ctx, ctx.client.job(ctx.args.job_id), ctx.args.dir)
    return ctx.emit([str(p) for p in paths], *(str(p) for p in paths))


CONV_OPS, MATMUL_OPS = ("Conv", "ConvTranspose"), ("MatMul", "Gemm")


def int8_step(model_meta: dict[str, Any] | None, calibrated: bool) -> tuple[dict[str, Any], str]:
    """The INT8 quantize step that suits the graph, and why: static QDQ for a convolution model with calibration data
    (dynamic INT8 runs convolutions through ConvInteger, slow on CPU), dynamic for a MatMul-heavy one."""
    ops = (model_meta or {}).get("op_types")
    if not isinstance(ops, dict) or not ops:
        return dict(QUANTIZE_MODES["int8-dynamic"]), "dynamic INT8: the model record lists no op types"
    conv = sum(int(ops.get(op, 0)) for op in CONV_OPS)
    matmul = sum(int(ops.get(op, 0)) for op in MATMUL_OPS)
    counts = f"{conv} Conv and {matmul} MatMul/Gemm nodes"
    if conv and conv >= matmul:
        if calibrated:
            return dict(QUANTIZE_MODES["int8-static"]), (
                f"static INT8 (QDQ): the graph has {conv} Conv nodes and calibration data was given")
        return dict(QUANTIZE_MODES["int8-dynamic"]), (
            f"dynamic INT8: the graph has {conv} Conv nodes but no calibration data was given "
            "(give --calibration or --data for static INT8, faster for convolutions)")
    return dict(QUANTIZE_MODES["int8-dynamic"]), f"dynamic INT8: the graph is MatMul-heavy ({counts})"


def build_optimize_spec(
    model: str,
    train: str | None,
    eval_: str | None,
    calibration: str | None,
    *,
    task: str | None = None,
    prune: float | None = None,
    distill: bool = False,
    finetune: bool = False,
    recover: bool = True,
    quantize: str | None = None,
    epochs: int | None = None,
    max_accuracy_drop: float | None = None,
    max_perplexity_increase: float | None = None,
    queue: str | None = None,
    model_meta: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    latency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job spec ``optimize`` submits: prune -> finetune -> distill -> quantize (each optional).

    ``--quantize int8`` becomes static or dynamic from ``model_meta``'s op counts; the reason goes to ``notes``.
    """
    steps: list[dict[str, Any]] = []
    training = {"epochs": epochs} if epochs else {}
    # A causal LM (the upload's inspection says text-generation): LoRA is the fine-tune people mean.
    lm = (task or (model_meta or {}).get("task")) == "text-generation"
    if lm and not task:
        task = "text-generation"
    if prune is not None:
        steps.append({"type": "prune", "method": "structured", "ratio": prune})
        if recover and not distill and not finetune:
            distill = True  # pruning without recovery training loses most of the accuracy
    if finetune:
        steps.append({"type": "finetune", **({"mode": "lora"} if lm else {}), **training})
    if distill:
        steps.append({"type": "distill", "teacher": "input", **training})
    if quantize == "int8":
        step, why = int8_step(model_meta, bool(train or eval_ or calibration))
        steps.append(step)
        if notes is not None:
            notes.append(why)
    elif quantize:
        steps.append(dict(QUANTIZE_MODES[quantize]))
    if not steps:
        raise ValueError("nothing to do: give at least one of --prune, --distill, --finetune, --quantize")
    data = {k: v for k, v in (("train", train), ("eval", eval_), ("calibration", calibration)) if v}
    spec: dict[str, Any] = {"model": model, "data": data, "steps": steps}
    if task:
        spec["task"] = task
    if max_accuracy_drop is not None:
        spec["evaluate"] = {"max_accuracy_drop": max_accuracy_drop}
    if max_perplexity_increase is not None:
        spec.setdefault("evaluate", {})["max_perplexity_increase"] = max_perplexity_increase
    if latency:
        spec.setdefault("evaluate", {})["latency"] = dict(latency)
    if queue:
        spec["queue"] = queue
    return spec


def _optimize_auto(ctx: _Ctx, model_ref: str, data: dict[str, str]) -> int:
    from client.search_cli import build_search_spec, stream_trials

    a = ctx.args
    spec = Client.build_spec(build_search_spec(
        model_ref, data, task=a.task, objective=a.objective, max_accuracy_drop=a.max_accuracy_drop,
        max_trials=a.max_trials, parallelism=a.parallelism, queue=a.queue))
    if a.dry_run:
        ctx.print_json(spec.model_dump(mode="json", exclude_none=True))
        return EXIT_OK
    job = ctx.client.submit(spec)
    ctx.err.print(f"submitted search {job.id}")
    job = stream_trials(job, lambda line: ctx.out.print(line, markup=False)).raise_for_status()
    for p in _download(ctx, job, a.out):
        ctx.err.print(f"downloaded {p}")
    if a.json:
        ctx.print_json(job)
    return EXIT_OK


def cmd_optimize(ctx: _Ctx) -> int:
    a = ctx.args
    train, _, eval_from_data = (a.data or "").partition(",")
    eval_path = a.eval or eval_from_data or None
    if eval_path is None and train:
        ctx.err.print("note: no --eval dataset; evaluating on the training data")
        eval_path = train
    files = {"train": train or None, "eval": eval_path, "calibration": a.calibration}
    if a.dry_run:
        refs = {k: f"<upload:{v}>" if v else None for k, v in files.items()}
        model_ref, model_meta = f"<upload:{a.model}>", None
    else:
        model_record = _upload(ctx, "models", a.model, a.model_format, None)
        model_ref, model_meta = model_record.id, dict(model_record.meta or {})
        uploaded: dict[str, str] = {}
        refs = {}
        for key, path in files.items():
            if path and path not in uploaded:
                uploaded[path] = _upload(ctx, "datasets", path, a.data_format, None).id
            refs[key] = uploaded[path] if path else None
    if a.auto:  # a search over the service's own recipes (client/search_cli.py)
        return _optimize_auto(ctx, model_ref, {k: v for k, v in refs.items() if v})
    notes: list[str] = []
    spec = build_optimize_spec(
        model_ref, refs["train"], refs["eval"], refs["calibration"], task=a.task, prune=a.prune,
        distill=a.distill, finetune=a.finetune, recover=not a.no_recover, quantize=a.quantize,
        epochs=a.epochs, max_accuracy_drop=a.max_accuracy_drop, max_perplexity_increase=a.max_perplexity_increase,
        queue=a.queue, model_meta=model_meta, notes=notes,
        latency={k: v for k, v in (("threads", a.threads), ("batch_size", a.batch_size), ("provider", a.provider))
                 if v is not None},
    )
    for note in notes:
        ctx.err.print(f"quantize int8 -> {note}", markup=False)
    validated = Client.build_spec(spec)
    if a.dry_run:
        ctx.print_json(validated.model_dump(mode="json", exclude_none=True))
        return EXIT_OK
    job = ctx.client.submit(validated)
    ctx.err.print(f"submitted {job.id}")
    try:
        job = _wait(ctx, job, a.timeout)
    except JobFailed as exc:
        # An accuracy-budget miss still has a downloadable model: fetch it, show the table, exit 1.
        if exc.job.artifacts:
            for p in _download(ctx, exc.job, a.out):
                ctx.err.print(f"downloaded {p}")
            _show_failed_report(ctx, exc)
        raise
    for p in _download(ctx, job, a.out):
        ctx.err.print(f"downloaded {p}")
    if a.json:
        ctx.print_json(job)
    elif job.report:
        for shown in _report_out(job):
            ctx.out.print(shown)
    else:
        ctx.out.print(f"job {job.id} succeeded (no report)")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command."""
    p = argparse.ArgumentParser(prog="modelpress", description="Make trained neural networks smaller and faster.")
    p.add_argument("--url", default=None, help="API base URL (default: $MODELPRESS_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: $MODELPRESS_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print raw JSON")

    def add(parent: Any, name: str, func: Callable[[_Ctx], int], help_: str, parents: Sequence[Any] = ()) -> Any:
        cmd = parent.add_parser(name, help=help_, description=help_, parents=list(parents))
        cmd.set_defaults(func=func)
        return cmd

    s = add(sub, "serve", cmd_serve, "run the API (and, by default, a worker)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")

    s = add(sub, "worker", cmd_worker, "run a Celery worker")
    s.add_argument("--queues", default=None, help="comma-separated queues (default: cpu,gpu from settings)")
    s.add_argument("--concurrency", type=int, default=1)

    s = add(sub, "migrate", cmd_migrate, "migrate the database to the latest schema")
    s.add_argument("--database-url", default=None, help="default: $MODELPRESS_DATABASE_URL")
    gc_cli.register(sub, [as_json])

    for kind in ("models", "datasets"):
        grp = sub.add_parser(kind, help=f"upload or list {kind}").add_subparsers(dest="action", required=True)
        s = add(grp, "upload", cmd_upload, f"upload a {kind[:-1]} file (skipped when the server has the bytes)", [as_json])
        s.add_argument("path")
        s.add_argument("--format", default=None)
        s.add_argument("--name", default=None)
        s.set_defaults(kind=kind)
        s = add(grp, "list", cmd_list_records, f"list {kind}", [as_json])
        s.set_defaults(kind=kind)

    jobs = sub.add_parser("jobs", help="submit, list, inspect, wait for, and cancel jobs")
    grp = jobs.add_subparsers(dest="action", required=True)
    s = add(grp, "submit", cmd_submit, "submit a job spec (.json or .yaml; - for stdin)", [as_json])
    s.add_argument("spec")
    s.add_argument("--wait", action="store_true", help="wait with a progress bar")
    s.add_argument("--timeout", type=float, default=None)
    s.add_argument("--idempotency-key", default=None)
    s.add_argument("--name", default=None, help="a name for the job (overrides the spec file's name)")
    s.add_argument("--meta", action="append", metavar="KEY=VALUE", help="a metadata key/value (repeatable)")
    s = add(grp, "list", cmd_jobs_list, "list jobs", [as_json])
    s.add_argument("--status", default=None)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--name", default=None, help="only jobs with this name")
    s.add_argument("--meta", action="append", metavar="KEY=VALUE", help="only jobs with this metadata (repeatable)")
    s = add(grp, "show", cmd_jobs_show, "show one job", [as_json])
    s.add_argument("id")
    s = add(grp, "wait", cmd_jobs_wait, "wait for a job with a live progress bar", [as_json])
    s.add_argument("id")
    s.add_argument("--timeout", type=float, default=None)
    s = add(grp, "logs", cmd_jobs_logs, "print a job's events", [as_json])
    s.add_argument("id")
    s.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    s = add(grp, "cancel", cmd_jobs_cancel, "cancel a job", [as_json])
    s.add_argument("id")

    keys_cli.add_commands(sub, add, [as_json])

    s = add(sub, "download", cmd_download, "download a job's artifacts (sha256 verified)", [as_json])
    s.add_argument("job_id")
    s.add_argument("dir")

    s = add(sub, "optimize", cmd_optimize, "upload, optimize, wait, download, and compare: one command", [as_json])
    s.add_argument("model")
    s.add_argument("--data", default=None, help="TRAIN[,EVAL] dataset files")
    s.add_argument("--eval", default=None, help="eval dataset file")
    s.add_argument("--calibration", default=None, help="calibration dataset file (static quantization)")
    s.add_argument("--task", choices=TASKS, default=None)
    s.add_argument("--prune", type=float, default=None, metavar="RATIO", help="structured pruning ratio")
    s.add_argument("--distill", action="store_true", help="distill from the input model")
    s.add_argument("--finetune", action="store_true", help="fine-tune")
    s.add_argument("--no-recover", action="store_true", help="no recovery distillation after --prune")
    s.add_argument("--quantize", choices=sorted(QUANTIZE_MODES), default=None)
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--max-accuracy-drop", type=float, default=None)
    s.add_argument("--max-perplexity-increase", type=float, default=None,
                   help="causal LMs: the largest relative perplexity increase allowed (0.05 = 5%%)")
    s.add_argument("--queue", choices=("cpu", "gpu"), default=None)
    s.add_argument("--threads", type=int, default=None, help="latency: ONNX Runtime intra-op threads (default 1)")
    s.add_argument("--batch-size", type=int, default=None, help="latency: samples per timed run (default 1)")
    s.add_argument("--provider", default=None, help="latency: execution provider (default CPUExecutionProvider)")
    s.add_argument("--model-format", default=None)
    s.add_argument("--data-format", default=None)
    s.add_argument("--timeout", type=float, default=None)
    s.add_argument("--out", required=True, help="where to download the results")
    s.add_argument("--dry-run", action="store_true", help="print the spec; upload and submit nothing")
    s.add_argument("--auto", action="store_true", help="search: try the recipes the model and data allow, keep the best")
    s.add_argument("--objective", choices=("latency", "size"), default="latency", help="what --auto minimizes")
    s.add_argument("--max-trials", type=int, default=None, help="--auto: at most this many trials")
    s.add_argument("--parallelism", type=int, default=None, help="--auto: trials running at once")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, and map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    ctx = _Ctx(args)
    try:
        return int(args.func(ctx))
    except JobFailed as exc:
        step = f" (step {exc.step})" if exc.step else ""
        ctx.err.print(f"[red]job {exc.job.id} failed{step}[/red]: {exc.code}: {exc.message}", markup=True)
        return EXIT_JOB
    except JobWasCancelled as exc:
        ctx.err.print(f"job {exc.job.id} was cancelled")
        return EXIT_JOB
    except (WaitTimeout, ChecksumMismatch) as exc:
        ctx.err.print(f"error: {exc}", markup=False)
        return EXIT_JOB
    except (ConnectionFailed, APIUnavailable, APIServerError) as exc:
        ctx.err.print(f"error: {exc}", markup=False)
        return EXIT_CONNECTION
    except APIError as exc:
        ctx.err.print(f"error: {exc.status} {exc.code or exc.title}: {exc.detail}", markup=False)
        for err in exc.errors:
            ctx.err.print(f"  field {err.get('field') or 'body'}: {err.get('message') or ''}", markup=False)
        return EXIT_USAGE
    except (ModelpressError, ValueError, FileNotFoundError) as exc:
        ctx.err.print(f"error: {exc}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``modelpress``)."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
