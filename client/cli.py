"""The ``modelpress`` command line, on top of the SDK.

Exit codes: 0 success; 1 the job failed or was cancelled (or a download did not verify, or a wait
timed out); 2 usage or validation errors (bad arguments, a 4xx answer: its detail and field are
printed); 3 the server could not be reached or answered 5xx.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from client import gc_cli, keys_cli
from client.commands import (
    EXIT_CONNECTION,
    EXIT_JOB,
    EXIT_USAGE,
    Ctx,
    cmd_download,
    cmd_jobs_cancel,
    cmd_jobs_list,
    cmd_jobs_logs,
    cmd_jobs_show,
    cmd_jobs_wait,
    cmd_list_records,
    cmd_migrate,
    cmd_optimize,
    cmd_serve,
    cmd_submit,
    cmd_upload,
    cmd_worker,
)
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
from client.recipes import QUANTIZE_MODES
from models.objectives import OBJECTIVE_NAMES
from models.spec import TASKS


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command."""
    p = argparse.ArgumentParser(prog="modelpress", description="Make trained neural networks smaller and faster.")
    p.add_argument("--url", default=None, help="API base URL (default: $MODELPRESS_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: $MODELPRESS_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print raw JSON")

    def add(parent: Any, name: str, func: Callable[[Ctx], int], help_: str, parents: Sequence[Any] = ()) -> Any:
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
    s.add_argument("--objective", choices=OBJECTIVE_NAMES, default="latency", help="what --auto minimizes")
    s.add_argument("--min-fidelity", type=float, default=None,
                   help="--auto: the worst sample's agreement with the input model (cosine, top-1 for classifiers)")
    s.add_argument("--max-trials", type=int, default=None, help="--auto: at most this many trials")
    s.add_argument("--parallelism", type=int, default=None, help="--auto: trials running at once")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, and map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    ctx = Ctx(args)
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
