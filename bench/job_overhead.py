"""Job overhead: wall time of a dynamic quantization job through the service, minus the same work done
directly in one process.

The model is a randomly initialised ``transformers`` BertForSequenceClassification (by default hidden
384, 6 layers, 12 heads, intermediate 1536, vocab 30522: about 22.7M parameters, ~91 MB fp32),
exported with ``torch.onnx.export`` (inputs ``input_ids`` and ``attention_mask``, int64, dynamic batch
and sequence axes), plus an eval ``.npz`` (``--samples`` x ``--seq-len`` tokens and binary labels).
Both are cached under bench/out/.

Three timings of the same work, with the same MODELPRESS_* environment as the worker
(tests/e2e/harness.py ``service_env``: OMP_NUM_THREADS=1):

* ``direct``: in a fresh process (imports done before the clock), what the issue names as the
  baseline, in the pipeline's order: load the eval arrays, ``worker.evaluate.evaluate`` of the input,
  ``quant_pre_process`` + ``quantize_dynamic`` with the arguments worker/passes/quantize.py uses,
  ``evaluate`` of the output with the input's outputs as reference.
* ``pipeline``: ``worker.pipeline.run`` with a ``worker.context.LocalContext`` in that same process
  (no DB, no Celery): shows what the pipeline itself adds (model validation and copy, node naming,
  the after-step measurement, the report).
* ``service``: a live API + Celery worker (Redis + PostgreSQL, and the embedded SQLite broker and
  database): wall time from ``POST /v1/jobs`` to the first ``GET /v1/jobs/{id}`` that says
  ``succeeded`` (polled every 50 ms). Uploads happen before the clock starts; the clock starts only
  once the worker has logged that it is ready. The first job per service runs in a cold worker child
  (imports torch and onnxruntime); ``--repeats`` jobs are run and the median is the figure.

extra = service - direct (goal: <= 1 s on Redis); it is split into pipeline - direct (work the
pipeline does beyond the baseline) and service - pipeline (queueing, DB, artifacts, polling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    OUT,
    ROOT,
    Timer,
    bench_home,
    emit,
    goal_met,
    log,
    machine_info,
    median,
    new_run_id,
    service,
    submit_job,
    upload,
)
from models.tables import SUCCEEDED, TERMINAL

GOAL_EXTRA_S = 1.0
MODEL_ID, DATA_ID = "mdl_bench", "ds_bench"
# worker/passes/quantize.py tries quant_pre_process in this order and keeps the first that works.
PRE_PROCESS_ATTEMPTS: list[tuple[str, dict[str, Any]]] = [
    ("full", {}),
    ("no_symbolic_shape", {"skip_symbolic_shape": True}),
    ("shape_only", {"skip_symbolic_shape": True, "skip_optimization": True}),
]


# --- assets ----------------------------------------------------------------------------------------


def build_assets(a: argparse.Namespace) -> tuple[Path, Path]:
    """The BERT ONNX model and the eval npz for these sizes (built once, cached under bench/out/)."""
    import numpy as np

    tag = f"v2-h{a.hidden}-l{a.layers}-a{a.heads}-i{a.intermediate}-v{a.vocab}"
    model_path = OUT / f"bert-{tag}.onnx"
    data_path = OUT / f"bert-eval-n{a.samples}-s{a.seq_len}-v{a.vocab}.npz"
    OUT.mkdir(parents=True, exist_ok=True)
    if not model_path.exists():
        with Timer() as t:
            _export_bert(model_path, a)
        log(f"exported {model_path.name} ({model_path.stat().st_size / 1e6:.1f} MB) in {t.elapsed:.1f} s")
    if not data_path.exists():
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, a.vocab, size=(a.samples, a.seq_len), dtype=np.int64)
        ids[:, 0] = 101  # [CLS]
        mask = np.ones_like(ids)
        lengths = rng.integers(a.seq_len // 2, a.seq_len + 1, size=a.samples)
        for i, n in enumerate(lengths):
            mask[i, n:] = 0
            ids[i, n:] = 0
        labels = rng.integers(0, 2, size=a.samples, dtype=np.int64)
        tmp = data_path.with_suffix(".tmp.npz")
        np.savez(tmp, input_ids=ids, attention_mask=mask, labels=labels)
        tmp.replace(data_path)
    return model_path, data_path


def _export_bert(path: Path, a: argparse.Namespace) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    sizes: dict[str, Any] = {"vocab_size": a.vocab, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
                             "num_attention_heads": a.heads, "intermediate_size": a.intermediate,
                             "max_position_embeddings": 512, "num_labels": 2}
    config = BertConfig(**sizes)
    config._attn_implementation = "eager"
    model = BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Explicit position and token-type ids: slicing BERT's 512-long buffers exports as
            # Min(512, sequence), which ORT's symbolic shape inference cannot broadcast.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              token_type_ids=torch.zeros_like(input_ids)).logits

    ids = torch.randint(1000, a.vocab, (2, 16), dtype=torch.long)
    mask = torch.ones_like(ids)
    tmp = path.with_suffix(".tmp.onnx")
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model), (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"],
            output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "logits": {0: "batch"}},
        )
    import onnx

    proto = onnx.load(str(tmp))  # one self-contained file (no external data)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)


def job_spec(a: argparse.Namespace, model_id: str, data_id: str) -> dict[str, Any]:
    """The job: dynamic INT8 (per-channel, the QuantizeStep defaults) with the evaluate settings of the flags."""
    return {
        "model": model_id,
        "task": "text-classification",
        "data": {"eval": data_id},
        "steps": [{"type": "quantize", "mode": "dynamic", "per_channel": True, "weight_type": "int8"}],
        "evaluate": {"latency": {"runs": a.latency_runs, "warmup": a.latency_warmup, "threads": 1, "batch_size": 1},
                     "batch_size": a.eval_batch},
    }


# --- in-process baselines (run in a subprocess with the worker's environment) -----------------------


def _in_process(model_path: Path, data_path: Path, spec_json: str, repeats: int, workdir: Path,
                with_pipeline: bool, warmup: int) -> dict[str, Any]:
    import numpy as np
    import onnx  # noqa: F401  (imports before the clock, as in a warm worker)
    import onnxruntime  # noqa: F401
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    from api.inspection import inspect_npz, inspect_onnx
    from models.spec import JobSpec, QuantizeStep
    from worker.context import LocalContext
    from worker.core import ArrayDataset
    from worker.evaluate import evaluate
    from worker.pipeline import run

    spec = JobSpec.model_validate_json(spec_json)
    step = spec.steps[0]
    assert isinstance(step, QuantizeStep)

    def direct(wd: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        with np.load(data_path, allow_pickle=False) as z:
            data = ArrayDataset({k: z[k] for k in ("input_ids", "attention_mask")}, z["labels"].astype(np.int64))
        t1 = time.perf_counter()
        ev_in = evaluate(model_path, data, spec.evaluate, spec.task)
        t2 = time.perf_counter()
        pre, out = wd / "pre.onnx", wd / "quantized.onnx"
        how = "skipped"
        for label, kwargs in PRE_PROCESS_ATTEMPTS:  # the pass's own fallback chain
            try:
                quant_pre_process(str(model_path), str(pre), **kwargs)
                how = label
                break
            except Exception:
                continue
        if how == "skipped":
            pre = model_path
        quantize_dynamic(
            str(pre), str(out), op_types_to_quantize=sorted(IntegerOpsRegistry), per_channel=step.per_channel,
            weight_type=QuantType.QInt8 if step.weight_type == "int8" else QuantType.QUInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        t3 = time.perf_counter()
        ev_out = evaluate(out, data, spec.evaluate, spec.task, reference_outputs=ev_in.outputs)
        t4 = time.perf_counter()
        assert ev_out["size_bytes"] < ev_in["size_bytes"]
        return {"preprocess": how, "total_s": t4 - t0, "load_data_s": t1 - t0, "eval_input_s": t2 - t1, "quantize_s": t3 - t2,
                "eval_output_s": t4 - t3}

    def pipeline(wd: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        ctx = LocalContext(wd, spec, models={MODEL_ID: (model_path, "onnx", inspect_onnx(model_path))},
                           datasets={DATA_ID: (data_path, "npz", inspect_npz(data_path))})
        result = run(spec, ctx)
        t1 = time.perf_counter()
        rep = result.report
        return {"preprocess": rep["steps"][0]["metrics"].get("preprocess"), "total_s": t1 - t0,
                "eval_input_s": rep["input"]["wall_s"], "step_s": rep["steps"][0]["wall_s"],
                "eval_output_s": rep["output"]["wall_s"]}

    def in_scratch(fn: Callable[[Path], dict[str, Any]], name: str) -> dict[str, Any]:
        wd = workdir / name
        wd.mkdir(parents=True)
        try:
            return fn(wd)
        finally:
            shutil.rmtree(wd, ignore_errors=True)

    out: dict[str, list[dict[str, Any]]] = {"direct": [], "pipeline": [], "cold": []}
    for i in range(warmup):  # the first calls in a process pay one-off costs (lazy imports, ORT set-up)
        res = in_scratch(direct, f"warmup-{i}")
        print(f"  .. in-process warm-up {i + 1}/{warmup} (not counted): {res['total_s']:.2f} s", file=sys.stderr,
              flush=True)
        out["cold"].append(res)
    for i in range(repeats):
        for name, fn in (("direct", direct), ("pipeline", pipeline)):
            if name == "pipeline" and not with_pipeline:
                continue
            res = in_scratch(fn, f"{name}-{i}")
            print(f"  .. in-process {name} {i + 1}/{repeats}: {res['total_s']:.2f} s ("
                  + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
                              if k != "total_s") + ")", file=sys.stderr, flush=True)
            out[name].append(res)
    return out


def run_in_process(a: argparse.Namespace, model_path: Path, data_path: Path, run_id: str) -> dict[str, Any]:
    """Run the direct and pipeline baselines in a fresh interpreter with the worker's environment."""
    from tests.e2e.harness import service_env

    spec = json.dumps(job_spec(a, MODEL_ID, DATA_ID))
    with bench_home(run_id) as home:
        env = service_env(home, run_id)
        cmd = [sys.executable, "-m", "bench.job_overhead", "_in_process", "--model", str(model_path), "--data",
               str(data_path), "--spec", spec, "--repeats", str(a.repeats), "--workdir", str(home / "work"),
               "--warmup", str(a.warmup)]
        if a.skip_pipeline:
            cmd.append("--skip-pipeline")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # cwd: a scratch folder, because onnxruntime's symbolic shape inference drops debug files
        # (sym_shape_infer_temp.onnx + <uuid>.data) into the current directory when it fails.
        proc = subprocess.run(cmd, cwd=home, env=env, stdout=subprocess.PIPE, text=True, check=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- through the service ---------------------------------------------------------------------------


def _wait_worker_ready(svc: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in svc.logs("worker.log"):
            return
        if svc.worker is not None and svc.worker.poll() is not None:
            raise RuntimeError("worker exited:\n" + svc.logs("worker.log"))
        time.sleep(0.1)
    raise TimeoutError("worker not ready:\n" + svc.logs("worker.log"))


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def run_service(kind: str, a: argparse.Namespace, model_path: Path, data_path: Path, run_id: str) -> list[dict[str, Any]]:
    """Upload once, then time ``--repeats`` jobs from POST to the first GET that reports success."""
    import httpx

    runs: list[dict[str, Any]] = []
    with service(kind, run_id, worker=True) as svc, httpx.Client(base_url=svc.url, timeout=60) as client:
        model = upload(client, "models", model_path, "onnx")
        data = upload(client, "datasets", data_path, "npz")
        spec = job_spec(a, model["id"], data["id"])
        _wait_worker_ready(svc)
        for i in range(a.warmup + a.repeats):
            t0 = time.perf_counter()
            job_id = submit_job(client, spec)
            deadline = t0 + a.job_timeout
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in TERMINAL:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']}:\n{svc.logs('worker.log')}")
                time.sleep(a.poll)
            wall = time.perf_counter() - t0
            if job["status"] != SUCCEEDED:
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{svc.logs('worker.log')}")
            ts = {k: _ts(v) for k, v in job["timestamps"].items()}
            report = job["result"]["report"]
            res = {
                "total_s": wall,
                "queue_wait_s": (ts["started_at"] - ts["created_at"]).total_seconds()
                if ts["started_at"] and ts["created_at"] else None,
                "run_s": (ts["finished_at"] - ts["started_at"]).total_seconds()
                if ts["finished_at"] and ts["started_at"] else None,
                "eval_input_s": report["input"].get("wall_s"),
                "step_s": report["steps"][0].get("wall_s"),
                "eval_output_s": report["output"].get("wall_s"),
                "preprocess": report["steps"][0].get("metrics", {}).get("preprocess"),
            }
            res["warmup"] = i < a.warmup
            log(f"{kind} job {i + 1}/{a.warmup + a.repeats}{' (warm-up, not counted)' if res['warmup'] else ''}: "
                f"{wall:.2f} s (queue wait {res['queue_wait_s']}, run {res['run_s']})")
            runs.append(res)
    return runs


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.job_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--samples", type=int, default=64, help="eval samples (default 64)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per eval sample (default 128)")
    p.add_argument("--eval-batch", type=int, default=64, help="evaluate.batch_size in the spec (default 64)")
    p.add_argument("--latency-runs", type=int, default=10, help="evaluate.latency.runs (default 10)")
    p.add_argument("--latency-warmup", type=int, default=2, help="evaluate.latency.warmup (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="jobs per service and in-process runs (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured runs first, in-process and per service (cold start; default 1)")
    p.add_argument("--brokers", default="redis,embedded", help="comma list of redis, embedded (default both)")
    p.add_argument("--poll", type=float, default=0.05, help="GET /v1/jobs/{id} interval in seconds (default 0.05)")
    p.add_argument("--job-timeout", type=float, default=900.0, help="seconds before a job counts as stuck")
    p.add_argument("--skip-pipeline", action="store_true", help="skip the in-process pipeline.run timing")
    return p.parse_args(argv)


def _in_process_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.job_overhead _in_process")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    q = p.parse_args(argv)
    res = _in_process(q.model, q.data, q.spec, q.repeats, q.workdir, not q.skip_pipeline, q.warmup)
    print(json.dumps(res), flush=True)


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric field; other fields (e.g. the pre-processing path) as their distinct values."""
    out: dict[str, Any] = {}
    for k in runs[0] if runs else []:
        values = [r.get(k) for r in runs]
        if all(isinstance(v, int | float) for v in values):
            out[k] = median(values)  # type: ignore[arg-type]
        else:
            out[k] = sorted({str(v) for v in values})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_in_process"]:
        _in_process_main(argv[1:])
        return {}
    a = parse_args(argv)
    brokers = [b.strip() for b in a.brokers.split(",") if b.strip()]
    if unknown := set(brokers) - {"redis", "embedded"}:
        raise SystemExit(f"unknown broker(s): {', '.join(sorted(unknown))}")
    model_path, data_path = build_assets(a)
    run_id = new_run_id()
    fig: dict[str, Any] = {"model_bytes": model_path.stat().st_size, "samples": a.samples, "seq_len": a.seq_len}
    log(f"model {model_path.name} {fig['model_bytes'] / 1e6:.1f} MB; in-process baselines x{a.repeats}")
    base = run_in_process(a, model_path, data_path, run_id)
    fig["direct"] = _medians(base["direct"])
    fig["direct_runs"] = [r["total_s"] for r in base["direct"]]
    fig["direct_cold_first_s"] = base["cold"][0]["total_s"] if base["cold"] else None
    if base["pipeline"]:
        fig["pipeline"] = _medians(base["pipeline"])
        fig["pipeline_runs"] = [r["total_s"] for r in base["pipeline"]]
    direct_s = fig["direct"]["total_s"]
    pipeline_s = fig.get("pipeline", {}).get("total_s")
    parts = []
    for broker in brokers:
        kind = "distributed" if broker == "redis" else "embedded"
        try:
            all_runs = run_service(kind, a, model_path, data_path, f"{run_id}{broker[0]}")
        except Exception as e:  # report the other broker's figures anyway
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            message = f"{type(e).__name__}: {lines[0][:300] if lines else ''} ... {lines[-1][-300:] if lines else ''}"
            log(f"{broker}: FAILED: {message}")
            fig[broker] = {"error": message}
            parts.append(f"{broker}: FAILED ({type(e).__name__})")
            continue
        runs = [r for r in all_runs if not r["warmup"]]
        m = _medians([{k: v for k, v in r.items() if k != "warmup"} for r in runs])
        entry: dict[str, Any] = {
            "backend": "redis+postgresql" if broker == "redis" else "embedded sqlite broker+db",
            **m,
            "runs": [r["total_s"] for r in runs],
            "cold_first_job_s": all_runs[0]["total_s"] if a.warmup else None,
            "extra_s": m["total_s"] - direct_s,
        }
        if pipeline_s is not None:
            entry["pipeline_extra_s"] = pipeline_s - direct_s
            entry["service_extra_s"] = m["total_s"] - pipeline_s
        fig[broker] = entry
        parts.append(f"{broker}: service {m['total_s']:.2f} s vs direct {direct_s:.2f} s = {entry['extra_s']:+.2f} s"
                     + (f" (pipeline {entry['pipeline_extra_s']:+.2f} s, service {entry['service_extra_s']:+.2f} s)"
                        if pipeline_s is not None else ""))
    if "extra_s" in fig.get("redis", {}):
        fig["goal_extra_s"] = GOAL_EXTRA_S
        fig["goal_met"] = goal_met(fig["redis"]["extra_s"], GOAL_EXTRA_S, higher_is_better=False)
        verdict = f"; goal <= {GOAL_EXTRA_S:g} s extra on redis: {'met' if fig['goal_met'] else 'MISSED'}"
    else:
        verdict = ""
    fig["params"] = {k: v for k, v in vars(a).items() if k not in ("job_timeout",)}
    fig["machine"] = machine_info()
    summary = (f"dynamic INT8 of a {fig['model_bytes'] / 1e6:.0f} MB BERT, median of {a.repeats}: "
               + "; ".join(parts) + verdict)
    emit("job_overhead", summary, fig)
    failed = [b for b in brokers if "error" in fig.get(b, {})]
    if failed:
        raise RuntimeError(f"job_overhead: {', '.join(failed)} failed (figures for the rest were printed)")
    return fig


if __name__ == "__main__":
    main()
