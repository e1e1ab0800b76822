"""The one evaluation harness for input and output models: size, params, MACs, ORT CPU latency, metrics.

``evaluate`` returns an :class:`Evaluation`: a JSON-safe dict (the report) that also carries the raw
outputs on the eval samples in ``.outputs`` (not serialised), the reference for the output model.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import ACCURACY_TASKS
from worker.ort_guard import RunGuard

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

    from models.spec import EvaluateConfig
    from worker.core import ArrayDataset

# Sizes used for dynamic non-batch dims when there is no data to copy a shape from.
_SYNTHETIC_DIM = 16
# Ops whose output for one sample depends on the other samples of its batch: ONNX Runtime's dynamic quantization
# takes each activation's scale over the whole tensor, batch included. A model holding one is evaluated one
# deployment-sized batch (the latency batch, 1 by default) at a time, so its metrics are what a request sees.
BATCH_COUPLED_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul"})


class Evaluation(dict[str, Any]):
    """The JSON report of one evaluation; ``outputs`` holds the raw outputs (name -> array), not serialised."""

    outputs: dict[str, np.ndarray] | None

    def __init__(self, report: dict[str, Any], outputs: dict[str, np.ndarray] | None) -> None:
        super().__init__(report)
        self.outputs = outputs


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _never() -> None:
    """The default cancel check: never cancelled."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def check_provider(provider: str) -> None:
    """StepFailed (``provider_unavailable``) when this worker's onnxruntime lacks ``provider``."""
    import onnxruntime as ort

    from worker.core import StepFailed

    available = ort.get_available_providers()
    if provider not in available:
        raise StepFailed(
            "provider_unavailable",
            f"evaluate.latency.provider {provider!r} is not available on this worker "
            f"(onnxruntime {ort.__version__} has {', '.join(available)})",
        )


def make_session(onnx_path: Path, threads: int, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """An ORT session on ``provider`` (CPU for the nodes it lacks) with the harness's fixed settings
    (threads, sequential, all graph optimizations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    check_provider(provider)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)


class _Runner:
    """Feeds a session in the batch sizes its batch dimension allows (fixed batch: chunks of exactly that size)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.inputs = session.get_inputs()
        self.output_names = [o.name for o in session.get_outputs()]
        self.dtypes = {i.name: _ORT_TO_NUMPY.get(i.type) for i in self.inputs}
        fixed = {i.shape[0] for i in self.inputs if i.shape and isinstance(i.shape[0], int)}
        self.fixed_batch: int | None = min(fixed) if fixed else None

    def feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for i in self.inputs:
            a = inputs[i.name]
            dt = self.dtypes.get(i.name)
            out[i.name] = np.ascontiguousarray(a if dt is None or a.dtype == dt else a.astype(dt))
        return out

    def chunk(self, batch_size: int) -> int:
        return self.fixed_batch or batch_size

    def run_all(
        self, inputs: dict[str, np.ndarray], batch_size: int, check_cancelled: Callable[[], None] = _never,
        guard: RunGuard | None = None,
    ) -> dict[str, np.ndarray]:
        """Outputs for every sample, concatenated along the batch axis (``check_cancelled`` before each batch;
        ``guard``: each run bounded and cancellable, worker/ort_guard.py)."""
        n = len(next(iter(inputs.values())))
        step = self.chunk(batch_size)
        parts: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for start in range(0, n, step):
            check_cancelled()
            batch = {k: v[start : start + step] for k, v in inputs.items()}
            real = len(next(iter(batch.values())))
            if real < step and self.fixed_batch:
                batch = {k: _pad(v, step) for k, v in batch.items()}
            feed = self.feed(batch)
            outs = guard.run(self.session, self.output_names, feed) if guard else self.session.run(self.output_names, feed)
            for j, o in enumerate(outs):
                parts[j].append(np.asarray(o)[:real] if self.fixed_batch else np.asarray(o))
        return {name: np.concatenate(p, axis=0) for name, p in zip(self.output_names, parts, strict=True)}


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    reps = n - len(a)
    return np.concatenate([a, np.repeat(a[-1:], reps, axis=0)], axis=0)


def _latency_batch(runner: _Runner, data: ArrayDataset | None, batch_size: int) -> dict[str, np.ndarray]:
    """``batch_size`` real eval samples (repeated when the set is smaller), or synthetic ones without data."""
    if data is not None and len(data):
        idx = np.arange(batch_size) % len(data)
        return {k: v[idx] for k, v in data.inputs.items()}
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for i in runner.inputs:
        shape = [
            batch_size if ax == 0 else (d if isinstance(d, int) else _SYNTHETIC_DIM)
            for ax, d in enumerate(i.shape)
        ]
        dt = runner.dtypes.get(i.name) or np.float32
        if np.issubdtype(dt, np.floating):
            out[i.name] = rng.standard_normal(shape).astype(dt)
        else:
            out[i.name] = np.zeros(shape, dtype=dt)
    return out


def latency_batch(session: ort.InferenceSession, data: ArrayDataset | None, batch_size: int) -> dict[str, np.ndarray]:
    """The latency harness's batch: ``batch_size`` eval samples, or synthetic ones without data."""
    return _latency_batch(_Runner(session), data, batch_size)


def measure_latency(
    session: ort.InferenceSession,
    batch: dict[str, np.ndarray],
    warmup: int,
    runs: int,
    check_cancelled: Callable[[], None] = _never,
    guard: RunGuard | None = None,
) -> dict[str, Any]:
    """``{"ms": {median, p90, mean, min}, "setup": {...}}``: milliseconds per batch over ``runs`` timed runs
    after ``warmup`` runs (fixed-batch models: one call per chunk of the batch); ``check_cancelled``
    runs between runs (outside the timing); ``guard`` bounds each run and makes it cancellable."""
    runner = _Runner(session)
    n = len(next(iter(batch.values())))
    step = runner.chunk(n)
    feeds = [runner.feed({k: v[s : s + step] for k, v in batch.items()}) for s in range(0, n, step)]
    feeds = [
        f if len(next(iter(f.values()))) == step else runner.feed({k: _pad(v, step) for k, v in f.items()})
        for f in feeds
    ]
    names = runner.output_names
    run = guard.run if guard is not None else (lambda s, n, f: s.run(n, f))
    for _ in range(warmup):
        check_cancelled()
        for f in feeds:
            run(session, names, f)
    times = []
    for _ in range(runs):
        check_cancelled()
        t0 = time.perf_counter()
        for f in feeds:
            run(session, names, f)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {
        "ms": {
            "median": statistics.median(times),
            "p90": float(np.percentile(times, 90)),
            "mean": statistics.fmean(times),
            "min": times[0],
        },
        "setup": {
            "batch_size": n,
            "runs": runs,
            "warmup": warmup,
            "per_sample_calls": runner.fixed_batch is not None and runner.fixed_batch < n,
        },
    }


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def embeddings(output: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Per-sample embedding vectors: mean-pooled over the sequence axis when the output is 3-D."""
    out = _as_float(output)
    if out.ndim == 3:
        if attention_mask is not None and attention_mask.shape == out.shape[:2]:
            m = attention_mask.astype(np.float64)[..., None]
            return (out * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return out.mean(axis=1)
    return out.reshape(len(out), -1)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = dot / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def fidelity(output: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How closely ``output`` matches ``reference``: max/mean abs error, per-sample cosine, top-1 agreement."""
    out, ref = _as_float(output), _as_float(reference)
    if out.shape != ref.shape:
        return {"comparable": False, "shape": list(out.shape), "reference_shape": list(ref.shape)}
    diff = np.abs(out - ref)
    a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    cos = _cosine_rows(a, b)
    result: dict[str, Any] = {
        "max_abs_err": float(diff.max()) if diff.size else 0.0,
        "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
        "cosine": float(cos.mean()) if cos.size else 1.0,
        "min_cosine": float(cos.min()) if cos.size else 1.0,
    }
    if out.ndim == 2 and out.shape[1] > 1:
        result["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
    return result


def _is_logits(output: np.ndarray, n: int) -> bool:
    return output.ndim == 2 and output.shape[0] == n and output.shape[1] > 1


def compute_metrics(
    outputs: dict[str, np.ndarray],
    data: ArrayDataset,
    task: str,
    reference_outputs: dict[str, np.ndarray] | None,
    *,
    with_fidelity: bool = True,
) -> dict[str, Any]:
    """accuracy / fidelity / the task's metric from raw outputs (shared with torch-side measurements)."""
    name = next(iter(outputs))
    primary = outputs[name]
    report: dict[str, Any] = {"accuracy": None}
    if task in ACCURACY_TASKS and data.labels is not None and _is_logits(primary, len(data)):
        report["accuracy"] = float((primary.argmax(axis=1) == data.labels).mean())
    ref = None
    if reference_outputs is not None:
        ref = reference_outputs.get(name, next(iter(reference_outputs.values()), None))
    if ref is not None and with_fidelity:
        report["fidelity"] = {"output": name, **fidelity(primary, ref)}
    if task == "feature-extraction":
        mask = data.inputs.get("attention_mask")
        value: float | None
        if ref is None:
            value = 1.0  # the reference itself
        else:
            ea, eb = embeddings(primary, mask), embeddings(ref, mask)
            value = float(_cosine_rows(ea, eb).mean()) if ea.shape == eb.shape else None
        report["metric"] = {"name": "embedding_cosine", "value": value}
    elif report["accuracy"] is not None:
        report["metric"] = {"name": "accuracy", "value": report["accuracy"]}
    else:
        value = 1.0 if ref is None else report.get("fidelity", {}).get("cosine")
        report["metric"] = {"name": "output_cosine", "value": value}
    return report


def eval_batch_size(proto: onnx.ModelProto, batch_size: int, deploy_batch: int) -> int:
    """The batch to run eval rows in: ``batch_size``, or ``deploy_batch`` when the graph's outputs for a row
    depend on the rows batched with it (:data:`BATCH_COUPLED_OPS`)."""
    coupled = any(n.op_type in BATCH_COUPLED_OPS for n in proto.graph.node)
    return min(batch_size, deploy_batch) if coupled else batch_size


def _sample_shapes(data: ArrayDataset | None) -> dict[str, list[int]]:
    if data is None:
        return {}
    return {k: [1, *v.shape[1:]] for k, v in data.inputs.items()}


def evaluate(
    onnx_path: Path,
    data: ArrayDataset | None,
    cfg: EvaluateConfig,
    task: str,
    reference_outputs: dict[str, np.ndarray] | None = None,
    *,
    latency: bool | None = None,
    check_cancelled: Callable[[], None] = _never,
) -> Evaluation:
    """Evaluate the ONNX model at ``onnx_path`` on ``data`` with the spec's settings (see module docstring).

    ``latency`` overrides whether latency is measured (default: when "latency" is in ``cfg.metrics``).
    ``check_cancelled`` (the pipeline context's) is called between latency runs and eval batches, and by a
    watchdog during each run, which also bounds its time (worker/ort_guard.py: a graph that loops fails with
    ``run_time_limit``). Latency threads are clamped to the cores this worker may use.
    """
    import onnx

    from worker.formats.onnx_model import count_macs, count_params, model_size_bytes

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    report: dict[str, Any] = {
        "size_bytes": model_size_bytes(onnx_path, proto),
        "params": count_params(proto),
        "eval_batch_size": eval_batch_size(proto, cfg.batch_size, cfg.latency.batch_size),
    }
    del proto
    if data is not None and cfg.max_samples is not None:
        data = data.take(cfg.max_samples)
    report["macs"] = count_macs(onnx_path, _sample_shapes(data))
    threads = max(1, min(cfg.latency.threads, available_cores()))
    session = make_session(onnx_path, threads, cfg.latency.provider)
    runner = _Runner(session)
    report["fixed_batch"] = runner.fixed_batch
    with RunGuard(check_cancelled, what=f"the model {onnx_path.name}") as guard:
        return _run_evaluation(session, runner, report, data, cfg, task, reference_outputs, threads,
                               latency, check_cancelled, guard)


def outputs_on(onnx_path: Path, datasets: dict[str, ArrayDataset], cfg: EvaluateConfig,
               check_cancelled: Callable[[], None] = _never) -> dict[str, dict[str, np.ndarray]]:
    """Every output of the ONNX model on each of ``datasets``' rows (by key), batched as :func:`evaluate` batches
    eval rows, in one session with the harness's settings (each run bounded and cancellable)."""
    import onnx

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    batch = eval_batch_size(proto, cfg.batch_size, cfg.latency.batch_size)
    del proto
    session = make_session(onnx_path, max(1, min(cfg.latency.threads, available_cores())), cfg.latency.provider)
    runner = _Runner(session)
    with RunGuard(check_cancelled, what=f"the model {onnx_path.name}") as guard:
        return {k: runner.run_all(d.inputs, batch, check_cancelled, guard) for k, d in datasets.items()}


def _run_evaluation(
    session: ort.InferenceSession, runner: _Runner, report: dict[str, Any], data: ArrayDataset | None,
    cfg: EvaluateConfig, task: str, reference_outputs: dict[str, np.ndarray] | None, threads: int,
    latency: bool | None, check_cancelled: Callable[[], None], guard: RunGuard,
) -> Evaluation:
    if latency if latency is not None else "latency" in cfg.metrics:
        batch = _latency_batch(runner, data, cfg.latency.batch_size)
        measured = measure_latency(session, batch, cfg.latency.warmup, cfg.latency.runs, check_cancelled, guard)
        report["latency_ms"] = measured["ms"]
        report["latency_setup"] = {
            **measured["setup"],
            "threads": threads,
            "threads_requested": cfg.latency.threads,
            "provider": session.get_providers()[0],
            "synthetic_inputs": data is None or len(data) == 0,
        }
    outputs: dict[str, np.ndarray] | None = None
    if data is not None and len(data):
        outputs = runner.run_all(data.inputs, report["eval_batch_size"], check_cancelled, guard)
        report["num_samples"] = len(data)
        report.update(compute_metrics(outputs, data, task, reference_outputs))
    else:
        report["num_samples"] = 0
        report["accuracy"] = None
        report["metric"] = None
    return Evaluation(report, outputs)
