"""The ``modelpress`` command line, on top of the SDK.

Exit codes: 0 success; 1 the job failed or was cancelled (or a download did not verify, or a wait
timed out); 2 usage or validation errors (bad arguments, a 4xx answer: its detail and field are
printed); 3 the server could not be reached or answered 5xx.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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

from client.errors import (
    ApiError,
    ConnectionFailed,
    IntegrityError,
    JobCancelled,
    JobFailed,
    ModelpressError,
    ServerError,
    ServiceUnavailable,
)
from client.sdk import Client, Job, WaitTimeout, dumps

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
QUANTIZE_MODES = {
    "int8": {"type": "quantize", "mode": "dynamic"},
    "int8-dynamic": {"type": "quantize", "mode": "dynamic"},
    "int8-static": {"type": "quantize", "mode": "static"},
    "fp16": {"type": "quantize", "mode": "fp16"},
}
TASKS = ("image-classification", "text-classification", "feature-extraction", "generic")


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


# -- formatting helpers -------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GB"


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={_num(v)}" for k, v in metrics.items() if not isinstance(v, dict | list))


def _ratio(before: Any, after: Any) -> str:
    if isinstance(before, int | float) and isinstance(after, int | float) and after:
        return f"{before / after:.2f}x"
    return "-"


def report_table(report: dict[str, Any]) -> Table:
    """A before/after table of a job report (size, latency, params, MACs, accuracy, ratios)."""
    before = report.get("input") or {}
    after = report.get("output") or {}
    table = Table(title="before / after")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("before/after", justify="right")

    def lat(side: dict[str, Any]) -> Any:
        lat_ms = side.get("latency_ms")
        return lat_ms.get("median") if isinstance(lat_ms, dict) else lat_ms

    table.add_row("size", _bytes(before.get("size_bytes")), _bytes(after.get("size_bytes")),
                  _ratio(before.get("size_bytes"), after.get("size_bytes")))
    table.add_row("latency (median ms)", _num(lat(before)), _num(lat(after)), _ratio(lat(before), lat(after)))
    table.add_row("params", _num(before.get("params")), _num(after.get("params")),
                  _ratio(before.get("params"), after.get("params")))
    if before.get("macs") is not None or after.get("macs") is not None:
        table.add_row("MACs", _num(before.get("macs")), _num(after.get("macs")),
                      _ratio(before.get("macs"), after.get("macs")))
    acc_b, acc_a = before.get("accuracy"), after.get("accuracy")
    if acc_b is not None or acc_a is not None:
        delta = acc_a - acc_b if isinstance(acc_a, int | float) and isinstance(acc_b, int | float) else None
        table.add_row("accuracy", _num(acc_b), _num(acc_a), f"{delta:+.4f}" if delta is not None else "-")
    fidelity = report.get("fidelity") or {}
    if fidelity:
        table.add_section()
        for key in ("max_abs_err", "cosine", "top1_agreement"):
            if key in fidelity:
                table.add_row(f"fidelity {key}", "", _num(fidelity[key]), "")
    budget = report.get("budget") or {}
    if budget:
        met = budget.get("met")
        table.add_row("accuracy budget", _num(budget.get("max_accuracy_drop")),
                      "met" if met else ("missed" if met is not None else "-"), "")
    return table


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
            desc = f"step {p.step}/{p.steps} {desc}"
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

        upload = ctx.client.upload_model if kind == "models" else ctx.client.upload_dataset
        return upload(path, format=fmt, name=name, on_progress=on_progress)


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


def _records_table(kind: str, rows: list[Any]) -> Table:
    table = Table(title=kind)
    for col in ("id", "name", "format", "size", "sha256", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.id, r.name, r.format, _bytes(r.size_bytes), r.sha256[:12], r.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    return table


def cmd_upload(ctx: _Ctx) -> int:
    record = _upload(ctx, ctx.args.kind, ctx.args.path, ctx.args.format, ctx.args.name)
    if ctx.args.json:
        ctx.print_json(record)
    else:
        ctx.out.print(f"{record.id}  {record.name}  {record.format}  {_bytes(record.size_bytes)}  sha256={record.sha256[:12]}")
    return EXIT_OK


def cmd_list_records(ctx: _Ctx) -> int:
    rows = list(ctx.client.models() if ctx.args.kind == "models" else ctx.client.datasets())
    if ctx.args.json:
        ctx.print_json(rows)
    else:
        ctx.out.print(_records_table(ctx.args.kind, rows))
    return EXIT_OK


def _load_spec(path: str) -> dict[str, Any]:
    import yaml

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job spec must be a mapping")
    return data


def _finish(ctx: _Ctx, job: Job) -> int:
    """Print a finished job's summary; the report's before/after table when it has one."""
    if ctx.args.json:
        ctx.print_json(job)
        return EXIT_OK
    ctx.out.print(f"job {job.id} {job.status}")
    if job.report:
        ctx.out.print(report_table(job.report))
    return EXIT_OK


def cmd_submit(ctx: _Ctx) -> int:
    job = ctx.client.submit(_load_spec(ctx.args.spec), idempotency_key=ctx.args.idempotency_key)
    if not ctx.args.wait:
        if ctx.args.json:
            ctx.print_json(job)
        else:
            ctx.out.print(job.id)
        return EXIT_OK
    ctx.err.print(f"submitted {job.id}")
    return _finish(ctx, _wait(ctx, job, ctx.args.timeout))


def cmd_jobs_list(ctx: _Ctx) -> int:
    jobs = []
    for job in ctx.client.jobs(status=ctx.args.status):
        jobs.append(job)
        if ctx.args.limit and len(jobs) >= ctx.args.limit:
            break
    if ctx.args.json:
        ctx.print_json([j.data for j in jobs])
        return EXIT_OK
    table = Table(title="jobs")
    for col in ("id", "status", "phase", "progress", "created"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j.id, j.status, j.data.phase, f"{j.data.progress.percent:.0f}%",
                      j.data.timestamps.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    ctx.out.print(table)
    return EXIT_OK


def cmd_jobs_show(ctx: _Ctx) -> int:
    job = ctx.client.job(ctx.args.id)
    if ctx.args.json:
        ctx.print_json(job)
        return EXIT_OK
    d = job.data
    ctx.out.print(f"[bold]{d.id}[/bold]  status={d.status}  phase={d.phase}  attempt={d.attempt}  queue={d.queue}")
    p = d.progress
    ctx.out.print(f"progress: step {p.step}/{p.steps}  {p.percent:.0f}%"
                  + (f"  epoch {p.epoch}/{p.epochs}" if p.epoch is not None else "")
                  + (f"  {_metrics(p.metrics)}" if p.metrics else ""))
    ctx.out.print("pipeline: " + " -> ".join(s.type for s in d.spec.steps))
    if d.error:
        ctx.out.print(f"[red]error[/red] {d.error.code}: {d.error.message}" + (f" (step {d.error.step})" if d.error.step else ""))
    if job.artifacts:
        table = Table(title="artifacts")
        for col in ("id", "name", "kind", "size", "sha256"):
            table.add_column(col)
        for a in job.artifacts:
            table.add_row(a.id, a.name, a.kind, _bytes(a.size_bytes), a.sha256[:12])
        ctx.out.print(table)
    if job.report:
        ctx.out.print(report_table(job.report))
    return EXIT_OK


def cmd_jobs_wait(ctx: _Ctx) -> int:
    return _finish(ctx, _wait(ctx, ctx.client.job(ctx.args.id), ctx.args.timeout))


def cmd_jobs_logs(ctx: _Ctx) -> int:
    job = ctx.client.job(ctx.args.id)
    for ev in job.events(follow=ctx.args.follow):
        if ctx.args.json:
            sys.stdout.write(ev.model_dump_json() + "\n")
            sys.stdout.flush()
        else:
            ctx.out.print(f"{ev.ts:%H:%M:%S} {ev.kind:<8} {ev.message}", markup=False)
    return EXIT_OK


def cmd_jobs_cancel(ctx: _Ctx) -> int:
    job = ctx.client.job(ctx.args.id).cancel()
    if ctx.args.json:
        ctx.print_json(job)
    else:
        ctx.out.print(f"{job.id} {job.status}")
    return EXIT_OK


def cmd_download(ctx: _Ctx) -> int:
    paths = _download(ctx, ctx.client.job(ctx.args.job_id), ctx.args.dir)
    if ctx.args.json:
        ctx.print_json([str(p) for p in paths])
    else:
        for p in paths:
            ctx.out.print(str(p))
    return EXIT_OK


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
    queue: str | None = None,
) -> dict[str, Any]:
    """The job spec ``optimize`` submits: prune -> finetune -> distill -> quantize (each optional)."""
    steps: list[dict[str, Any]] = []
    training = {"epochs": epochs} if epochs else {}
    if prune is not None:
        steps.append({"type": "prune", "method": "structured", "ratio": prune})
        if recover and not distill and not finetune:
            distill = True  # pruning without recovery training loses most of the accuracy
    if finetune:
        steps.append({"type": "finetune", **training})
    if distill:
        steps.append({"type": "distill", "teacher": "input", **training})
    if quantize:
        steps.append(dict(QUANTIZE_MODES[quantize]))
    if not steps:
        raise ValueError("nothing to do: give at least one of --prune, --distill, --finetune, --quantize")
    data = {k: v for k, v in (("train", train), ("eval", eval_), ("calibration", calibration)) if v}
    spec: dict[str, Any] = {"model": model, "data": data, "steps": steps}
    if task:
        spec["task"] = task
    if max_accuracy_drop is not None:
        spec["evaluate"] = {"max_accuracy_drop": max_accuracy_drop}
    if queue:
        spec["queue"] = queue
    return spec


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
        model_ref = f"<upload:{a.model}>"
    else:
        model_ref = _upload(ctx, "models", a.model, a.model_format, None).id
        uploaded: dict[str, str] = {}
        refs = {}
        for key, path in files.items():
            if path and path not in uploaded:
                uploaded[path] = _upload(ctx, "datasets", path, a.data_format, None).id
            refs[key] = uploaded[path] if path else None
    spec = build_optimize_spec(
        model_ref, refs["train"], refs["eval"], refs["calibration"], task=a.task, prune=a.prune,
        distill=a.distill, finetune=a.finetune, recover=not a.no_recover, quantize=a.quantize,
        epochs=a.epochs, max_accuracy_drop=a.max_accuracy_drop, queue=a.queue,
    )
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
            if exc.job.report:
                ctx.out.print(report_table(exc.job.report))
        raise
    for p in _download(ctx, job, a.out):
        ctx.err.print(f"downloaded {p}")
    if a.json:
        ctx.print_json(job)
    elif job.report:
        ctx.out.print(report_table(job.report))
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
    s = add(grp, "list", cmd_jobs_list, "list jobs", [as_json])
    s.add_argument("--status", default=None)
    s.add_argument("--limit", type=int, default=None)
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
    s.add_argument("--queue", choices=("cpu", "gpu"), default=None)
    s.add_argument("--model-format", default=None)
    s.add_argument("--data-format", default=None)
    s.add_argument("--timeout", type=float, default=None)
    s.add_argument("--out", required=True, help="where to download the results")
    s.add_argument("--dry-run", action="store_true", help="print the spec; upload and submit nothing")
    return p


def _field_of(err: dict[str, Any]) -> str:
    """The dotted field path of one validation error (``steps.0`` from a model-level message)."""
    loc = err.get("loc") or err.get("field") or err.get("path")
    parts = [str(x) for x in loc] if isinstance(loc, list | tuple) else ([str(loc)] if loc else [])
    if parts and parts[0] == "body":
        parts = parts[1:]
    if not parts:
        found = re.search(r"\b(steps\.\d+)\b", str(err.get("msg") or ""))
        return found.group(1) if found else "spec"
    return ".".join(parts)


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
    except JobCancelled as exc:
        ctx.err.print(f"job {exc.job.id} was cancelled")
        return EXIT_JOB
    except (WaitTimeout, IntegrityError) as exc:
        ctx.err.print(f"error: {exc}", markup=False)
        return EXIT_JOB
    except (ConnectionFailed, ServiceUnavailable, ServerError) as exc:
        ctx.err.print(f"error: {exc}", markup=False)
        return EXIT_CONNECTION
    except ApiError as exc:
        ctx.err.print(f"error: {exc.status} {exc.code or exc.title}: {exc.detail}", markup=False)
        for err in exc.errors:
            ctx.err.print(f"  field {_field_of(err)}: {err.get('msg') or err.get('message') or ''}", markup=False)
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
