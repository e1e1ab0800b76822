"""A realistic finished job (prune -> distill -> quantize) with its report, inserted as DB rows."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from typing import Any

from models.ids import new_id
from models.tables import Artifact, Job, Model, utcnow


def sample_report() -> dict[str, Any]:
    """The report dict a prune + distill + quantize job stores in ``job.result.report``."""
    return {
        "task": "image-classification",
        "pipeline": ["prune structured 0.5", "distill 4 ep", "quantize dynamic"],
        "input": {"size_bytes": 46_137_344, "params": 11_689_512, "macs": 1_814_083_944,
                  "latency_ms": {"median": 23.4, "p90": 25.1, "mean": 23.9}, "accuracy": 0.9312},
        "output": {"size_bytes": 5_890_113, "params": 5_871_236, "macs": 911_331_112,
                   "latency_ms": {"median": 7.8, "p90": 8.6, "mean": 8.0}, "accuracy": 0.9247},
        "steps": [
            {"index": 0, "type": "prune", "label": "prune structured 0.5", "wall_s": 3.2,
             "metrics": {"params_removed": 5_818_276}},
            {"index": 1, "type": "distill", "label": "distill 4 ep", "wall_s": 61.7,
             "metrics": {"eval_accuracy": 0.9247},
             "curve": [
                 {"epoch": 1, "loss": 1.92, "eval_metric": 0.801, "lr": 0.001},
                 {"epoch": 2, "loss": 1.11, "eval_metric": 0.884, "lr": 0.0008},
                 {"epoch": 3, "loss": 0.74, "eval_metric": 0.913, "lr": 0.0004},
                 {"epoch": 4, "loss": 0.61, "eval_metric": 0.9247, "lr": 0.0001},
             ]},
            {"index": 2, "type": "quantize", "label": "quantize dynamic", "wall_s": 1.4, "metrics": {}},
        ],
        "fidelity": {"max_abs_err": 0.0312, "cosine": 0.99871, "top1_agreement": 0.9861},
        "gains": {"size_ratio": 7.833, "latency_ratio": 3.0, "params_ratio": 1.991, "accuracy_delta": -0.0065},
        "budget": {"max_accuracy_drop": 0.01, "met": True},
    }


def insert_job(
    status: str = "succeeded",
    report: dict[str, Any] | None = None,
    phase: str = "done",
    error: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    owner: str = "local",
) -> tuple[str, list[str]]:
    """Insert a model, a job and two artifacts; return (job id, artifact ids)."""
    from models.db import session_scope

    now = utcnow()
    model_id, job_id = new_id("mdl"), new_id("job")
    model_sha = hashlib.sha256(model_id.encode()).hexdigest()
    art_ids = [new_id("art"), new_id("art")]
    spec = {
        "model": model_id, "task": "image-classification",
        "data": {"train": "ds_train", "eval": "ds_eval"},
        "steps": [{"type": "prune", "method": "structured", "ratio": 0.5},
                  {"type": "distill", "teacher": "input", "epochs": 4},
                  {"type": "quantize", "mode": "dynamic"}],
    }
    result = {"report": report if report is not None else sample_report(), "artifacts": []}
    with session_scope() as s:
        s.add(Model(id=model_id, owner=owner, name="resnet18.onnx", format="onnx", sha256=model_sha,
                    size_bytes=46_137_344, storage_key=model_sha, meta={}, created_at=now))
        s.flush()
        s.add(Job(id=job_id, owner=owner, status=status, phase=phase,
                  progress=progress or {"step": 3, "steps": 3, "percent": 100.0},
                  spec=spec, model_id=model_id, queue="gpu", attempt=1, error=error,
                  result=result if status in ("succeeded", "failed") else None,
                  created_at=now - timedelta(minutes=2), started_at=now - timedelta(minutes=1),
                  finished_at=now if status in ("succeeded", "failed", "cancelled") else None))
        s.flush()
        if status == "succeeded":
            s.add(Artifact(id=art_ids[0], owner=owner, job_id=job_id, name="model.onnx", kind="model",
                           media_type="application/octet-stream", sha256="b" * 64, size_bytes=5_890_113,
                           storage_key="b" * 64, meta={}))
            s.add(Artifact(id=art_ids[1], owner=owner, job_id=job_id, name="report.json", kind="report",
                           media_type="application/json", sha256="c" * 64, size_bytes=2_345,
                           storage_key="c" * 64, meta={}))
    return job_id, art_ids if status == "succeeded" else []


_SHAPE = re.compile(r'<g id="(chart-[\w-]+-(?:bar-\d+|line))">\s*<path d="([^"]+)"')


def chart_shapes(page: str) -> dict[str, list[tuple[float, float]]]:
    """Each chart bar's and line's id and the points of its SVG path (as matplotlib drew them)."""
    shapes = {}
    for ident, path in _SHAPE.findall(page):
        nums = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", path)]
        shapes[ident] = list(zip(nums[::2], nums[1::2], strict=True))
    return shapes


def bar_widths(page: str, chart: str = "chart-") -> list[float]:
    """The drawn widths of the bars whose ids start with ``chart`` (in page order)."""
    return [max(x for x, _ in pts) - min(x for x, _ in pts)
            for ident, pts in chart_shapes(page).items() if ident.startswith(chart) and "-bar-" in ident]


def lm_report() -> dict[str, Any]:
    """The report a text-generation job (export -> quantize int4) stores: LM metrics and generations."""
    gens_in = [{"prompt": "This License applies to", "text": " any program or other work"},
               {"prompt": "TERMS AND CONDITIONS", "text": " FOR USE, REPRODUCTION"},
               {"prompt": "You may convey <b>verbatim</b>", "text": " copies of the Program's <i>source</i>"}]
    gens_out = [{"prompt": "This License applies to", "text": " any work or program"},
                {"prompt": "TERMS AND CONDITIONS", "text": " FOR USE, REPRODUCTION"},
                {"prompt": "You may convey <b>verbatim</b>", "text": " copies of the source code"}]
    side = {"num_samples": 64, "tokens": 8123, "latency_setup": {"what": "prefill", "prompt_tokens": 128}}
    return {
        "task": "text-generation",
        "pipeline": ["export (opset 17)", "quantize (int4)"],
        "input": {**side, "size_bytes": 3_221_225_472, "params": 805_306_368, "perplexity": 12.41, "nll": 2.5185,
                  "latency_ms": {"median": 412.0, "p90": 430.2, "mean": 415.5},
                  "decode": {"tokens_per_s": 9.8, "ms_per_token": 102.0, "new_tokens": 32},
                  "peak_memory_bytes": 3_500_000_000, "accuracy": None,
                  "metric": {"name": "perplexity", "value": 12.41, "higher_is_better": False},
                  "generations": gens_in},
        "output": {**side, "size_bytes": 905_969_664, "params": 805_306_368, "perplexity": 12.97, "nll": 2.5626,
                   "latency_ms": {"median": 201.0, "p90": 214.9, "mean": 203.3},
                   "decode": {"tokens_per_s": 27.3, "ms_per_token": 36.6, "new_tokens": 32},
                   "peak_memory_bytes": 1_200_000_000, "accuracy": None,
                   "metric": {"name": "perplexity", "value": 12.97, "higher_is_better": False},
                   "agreement": {"top1": 0.9137, "mean_kl": 0.0412, "tokens": 8123, "kl_tokens": 2048},
                   "generations": gens_out},
        "steps": [{"index": 0, "type": "export", "label": "export (opset 17)", "wall_s": 40.2,
                   "metrics": {"max_abs_diff": 2.1e-5, "greedy_identical": True}},
                  {"index": 1, "type": "quantize", "label": "quantize (int4)", "wall_s": 55.0, "metrics": {}}],
        "fidelity": {"top1": 0.9137, "mean_kl": 0.0412},
        "gains": {"size_ratio": 3.556, "latency_ratio": 2.05, "params_ratio": 1.0, "decode_speedup": 2.786,
                  "perplexity_ratio": 1.0451},
        "budget": {"max_perplexity_increase": 0.05, "max_accuracy_drop": None, "metric": "perplexity",
                   "perplexity_increase": 0.0451, "accuracy_drop": None, "met": True},
    }


def search_report() -> dict[str, Any]:
    """A finished search: two trials on the front (the first wins), one skipped, one missing the budget."""
    trials = [
        {"index": 0, "label": "quantize dynamic", "state": "succeeded", "job_id": "job_a", "met": True,
         "metric": 0.95, "metric_name": "accuracy", "size_bytes": 30_000, "latency_ms": 0.2,
         "latency_ms_remeasured": 0.1, "pareto": True},
        {"index": 1, "label": "quantize fp16", "state": "succeeded", "job_id": "job_b", "met": True,
         "metric": 0.96, "size_bytes": 60_000, "latency_ms": 0.3, "latency_ms_remeasured": 0.15, "pareto": True},
        {"index": 2, "label": "quantize <fp16>", "state": "skipped", "job_id": None,
         "reason": "cannot beat the best: estimated size ratio 0.50 vs 0.27 measured"},
        {"index": 3, "label": "prune 0.95", "state": "failed", "job_id": "job_d", "met": False, "metric": 0.2,
         "size_bytes": 5_000, "latency_ms": 0.05, "misses": ["quality: accuracy drop 0.76 > 0.02"]},
    ]
    section = {"objective": "latency", "constraints": {"max_accuracy_drop": 0.02}, "trials": trials,
               "best": {"trial": 0, "job_id": "job_a", "label": "quantize dynamic"}, "done": 3, "skipped": 1,
               "total": 4}
    report = sample_report()
    report["input"]["metric"] = {"name": "accuracy", "value": report["input"]["accuracy"]}
    return {**report, "search": section}
