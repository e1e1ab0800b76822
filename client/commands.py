"""The CLI's commands: each takes the parsed arguments (``Ctx``) and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from client.errors import (
    JobFailed,
)
from client.jobs import Job
from client.recipes import build_optimize_spec
from client.render import (
    JobProgressBar,
    dumps,
    metrics_text,
    plain_table,
    progress_line,
    report_out,
    transfer_progress,
    when_text,
)
from client.sdk import Client
from models.report_view import fmt_bytes

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3


class Ctx:
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


def _upload(ctx: Ctx, kind: str, path: str, fmt: str | None, name: str | None) -> Any:
    with transfer_progress(ctx.err) as bar:
        task = bar.add_task(f"upload {Path(path).name}", total=None)

        def on_progress(sent: int, total: int) -> None:
            bar.update(task, completed=sent, total=total)

        return ctx.client.upload(kind, path, fmt, name=name, on_progress=on_progress)


def _wait(ctx: Ctx, job: Job, timeout: float | None = None) -> Job:
    with JobProgressBar(ctx.err) as view:
        return job.wait(timeout=timeout, on_progress=view)


def _download(ctx: Ctx, job: Job, dest: str) -> list[Path]:
    with transfer_progress(ctx.err) as bar:
        task = bar.add_task("download", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return job.download(dest, on_progress=on_progress)


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(ctx: Ctx) -> int:
    from api.server import serve

    serve(host=ctx.args.host, port=ctx.args.port, with_worker=not ctx.args.no_worker)
    return EXIT_OK


def cmd_worker(ctx: Ctx) -> int:
    from worker.main import run_worker

    queues = [q.strip() for q in (ctx.args.queues or "").split(",") if q.strip()] or None
    run_worker(queues, concurrency=ctx.args.concurrency)
    return EXIT_OK


def cmd_migrate(ctx: Ctx) -> int:
    from migrations import upgrade

    upgrade(ctx.args.database_url)
    ctx.err.print("database migrated")
    return EXIT_OK


def cmd_upload(ctx: Ctx) -> int:
    record = _upload(ctx, ctx.args.kind, ctx.args.path, ctx.args.format, ctx.args.name)
    line = f"{record.id}  {record.name}  {record.format}  {fmt_bytes(record.size_bytes)}  sha256={record.sha256[:12]}"
    if record.deduplicated:
        line += f"\ndeduplicated: the server already holds these bytes as {record.id} ({record.name!r}); nothing uploaded"
    return ctx.emit(record, line)


def cmd_list_records(ctx: Ctx) -> int:
    rows: list[Any] = list(ctx.client.models() if ctx.args.kind == "models" else ctx.client.datasets())
    return ctx.emit(rows, plain_table(ctx.args.kind, ("id", "name", "format", "size", "sha256", "created"), (
        (r.id, r.name, r.format, fmt_bytes(r.size_bytes), r.sha256[:12], when_text(r.created_at)) for r in rows
    )))


def _load_spec(path: str) -> dict[str, Any]:
    import yaml

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job spec must be a mapping")
    return data


def _finish(ctx: Ctx, job: Job) -> int:
    """Print a finished job's summary; the report's before/after table when it has one."""
    return ctx.emit(job, f"job {job.id} {job.status}", *report_out(job))


def _show_failed_report(ctx: Ctx, exc: JobFailed) -> None:
    """A failed job that still has a report (an accuracy-budget miss): its warnings and before/after table."""
    if exc.job.report and not ctx.args.json:
        for shown in report_out(exc.job):
            ctx.out.print(shown)


def _wait_and_finish(ctx: Ctx, job: Job) -> int:
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


def cmd_submit(ctx: Ctx) -> int:
    job = ctx.client.submit(_load_spec(ctx.args.spec), idempotency_key=ctx.args.idempotency_key,
                            name=ctx.args.name, metadata=_meta_pairs(ctx.args.meta))
    if not ctx.args.wait:
        return ctx.emit(job, job.id)
    ctx.err.print(f"submitted {job.id}")
    return _wait_and_finish(ctx, job)


def cmd_jobs_list(ctx: Ctx) -> int:
    jobs = []
    for job in ctx.client.jobs(status=ctx.args.status, name=ctx.args.name, metadata=_meta_pairs(ctx.args.meta)):
        jobs.append(job)
        if ctx.args.limit and len(jobs) >= ctx.args.limit:
            break
    return ctx.emit([j.data for j in jobs], plain_table("jobs", ("id", "name", "status", "phase", "progress", "created"), (
        (j.id, j.data.name or "", j.status, j.data.phase, progress_line(j), when_text(j.data.timestamps.created_at))
        for j in jobs
    )))


def cmd_jobs_show(ctx: Ctx) -> int:
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
    ctx.out.print("progress: " + progress_line(job)
                  + (f"  {metrics_text(p.metrics)}" if p.metrics else ""))
    ctx.out.print("pipeline: " + " -> ".join(s.type for s in d.spec.steps))
    if d.error:
        ctx.out.print(f"[red]error[/red] {d.error.code}: {d.error.message}" + (f" (step {d.error.step})" if d.error.step else ""))
    if job.artifacts:
        ctx.out.print(plain_table("artifacts", ("id", "name", "kind", "size", "sha256"), (
            (a.id, a.name, a.kind, fmt_bytes(a.size_bytes), a.sha256[:12]) for a in job.artifacts
        )))
    for shown in report_out(job):
        ctx.out.print(shown)
    return EXIT_OK


def cmd_jobs_wait(ctx: Ctx) -> int:
    return _wait_and_finish(ctx, ctx.client.job(ctx.args.id))


def cmd_jobs_logs(ctx: Ctx) -> int:
    job = ctx.client.job(ctx.args.id)
    for ev in job.events(follow=ctx.args.follow):
        if ctx.args.json:
            sys.stdout.write(ev.model_dump_json() + "\n")
            sys.stdout.flush()
        else:
            extra = metrics_text(ev.data) if ev.kind == "log" and ev.data else ""
            ctx.out.print(f"{ev.ts:%H:%M:%S} {ev.kind:<8} {ev.message}" + (f"  {extra}" if extra else ""),
                          markup=False)
    return EXIT_OK


def cmd_jobs_cancel(ctx: Ctx) -> int:
    job = ctx.client.job(ctx.args.id).cancel()
    return ctx.emit(job, f"{job.id} {job.status}")


def cmd_download(ctx: Ctx) -> int:
    """Download a job's artifacts. A failed job with none: its error, exit 1, no folder made; one with some (a missed
    accuracy budget keeps its model): downloaded, then its error, exit 1. A job still running: exit 1, nothing made."""
    job = ctx.client.job(ctx.args.job_id)
    paths = _download(ctx, job, ctx.args.dir)
    if not paths:
        ctx.err.print(f"job {job.id} is {job.status} ({job.data.phase}): nothing to download yet; "
                      f"`modelpress jobs wait {job.id}` first", markup=False)
        return EXIT_JOB
    code = ctx.emit([str(p) for p in paths], *(str(p) for p in paths))
    job.raise_for_status()  # the files are there, but the job failed: say so (exit 1)
    return code


def _latency_flags(a: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("threads", a.threads), ("batch_size", a.batch_size), ("provider", a.provider))
            if v is not None}


def _optimize_auto(ctx: Ctx, model_ref: str, data: dict[str, str], model_meta: dict[str, Any] | None) -> int:
    from client.search_cli import build_search_spec, stream_trials

    a = ctx.args
    spec = Client.build_spec(build_search_spec(
        model_ref, data, task=a.task, objective=a.objective, max_accuracy_drop=a.max_accuracy_drop,
        max_perplexity_increase=a.max_perplexity_increase, min_fidelity=a.min_fidelity,
        max_trials=a.max_trials, parallelism=a.parallelism, queue=a.queue, latency=_latency_flags(a),
        model_meta=model_meta))
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


def cmd_optimize(ctx: Ctx) -> int:
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
        return _optimize_auto(ctx, model_ref, {k: v for k, v in refs.items() if v}, model_meta)
    notes: list[str] = []
    spec = build_optimize_spec(
        model_ref, refs["train"], refs["eval"], refs["calibration"], task=a.task, prune=a.prune,
        distill=a.distill, finetune=a.finetune, recover=not a.no_recover, quantize=a.quantize,
        epochs=a.epochs, max_accuracy_drop=a.max_accuracy_drop, max_perplexity_increase=a.max_perplexity_increase,
        queue=a.queue, model_meta=model_meta, notes=notes,
        latency=_latency_flags(a),
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
        for shown in report_out(job):
            ctx.out.print(shown)
    else:
        ctx.out.print(f"job {job.id} succeeded (no report)")
    return EXIT_OK


