"""Before a job says its output is slower than its input, time both again, interleaved.

One measurement of each model, minutes apart on a shared machine, differs by more than a real regression: a
LoRA job whose architecture did not change read "decodes 1.7x slower". When the first measurement says slower
(``models.report_view.regressions``), both models are timed again in alternating rounds in one process, so drift
hits them alike, and each side of the report gets ``latency_recheck`` (``{median, p90, rounds}`` ms; prefill
for a causal LM) and, for a causal LM, ``decode_recheck`` (``{tokens_per_s, min, max, rounds}``). The warning
then reads those, and fires only when the difference is beyond the measured spread (the report_view rules).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from models.report_view import regressions
from worker.ort_guard import RunGuard

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.core import PipelineContext, WorkingModel

ROUNDS = 5
_TIMING_CODES = frozenset({"slower_than_input", "slower_decoding"})


def confirm_regressions(spec: JobSpec, before: WorkingModel, after: WorkingModel, baseline: dict[str, Any],
                        output: dict[str, Any], ctx: PipelineContext, lm: bool) -> None:
    """Re-time both models interleaved when the first figures say the output is slower; writes the rechecks
    into ``baseline`` / ``output`` (the report's two sides) in place. No-op when nothing looks slower."""
    if not any(w["code"] in _TIMING_CODES for w in regressions(baseline, output)):
        return
    if before.onnx_path is None or after.onnx_path is None:
        return
    ctx.log("the output measured slower than the input: timing both again, interleaved, before warning")
    # every run bounded and cancellable, the recheck one phase (worker/ort_guard.py)
    with RunGuard(ctx.check_cancelled, what="the input and output models (latency recheck)") as guard:
        if lm:
            _recheck_lm(spec, before, after, baseline, output, ctx, guard)
        else:
            _recheck(spec, before, after, baseline, output, ctx, guard)


def _summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The rounds' figures as one: the median of their medians and the median of their p90s (ms)."""
    return {"median": statistics.median(r["median"] for r in rounds),
            "p90": statistics.median(r["p90"] for r in rounds), "rounds": float(len(rounds))}


def _recheck(spec: JobSpec, before: WorkingModel, after: WorkingModel, baseline: dict[str, Any],
             output: dict[str, Any], ctx: PipelineContext, guard: RunGuard) -> None:
    from worker.evaluate import available_cores, latency_batch, make_session, measure_latency

    lat = spec.evaluate.latency
    threads = max(1, min(lat.threads, available_cores()))
    sides = {"input": before, "output": after}
    sessions = {k: make_session(m.onnx_path, threads, lat.provider) for k, m in sides.items()}  # type: ignore[arg-type]
    batches = {k: latency_batch(s, ctx.dataset("eval", sides[k]), lat.batch_size) for k, s in sessions.items()}
    for k, s in sessions.items():
        measure_latency(s, batches[k], lat.warmup, 1, ctx.check_cancelled, guard)
    per_round = max(3, lat.runs // ROUNDS)
    times: dict[str, list[dict[str, float]]] = {k: [] for k in sessions}
    for r in range(ROUNDS):
        for k in (("input", "output") if r % 2 == 0 else ("output", "input")):
            times[k].append(measure_latency(sessions[k], batches[k], 0, per_round, ctx.check_cancelled, guard)["ms"])
    baseline["latency_recheck"], output["latency_recheck"] = _summary(times["input"]), _summary(times["output"])


def _recheck_lm(spec: JobSpec, before: WorkingModel, after: WorkingModel, baseline: dict[str, Any],
                output: dict[str, Any], ctx: PipelineContext, guard: RunGuard) -> None:
    from worker.lm.layout import LMLayout
    from worker.lm.session import LMSession

    setup = output.get("latency_setup") or baseline.get("latency_setup") or {}
    threads = int(setup.get("threads") or 1)
    prompt = int(setup.get("prompt_tokens") or spec.evaluate.generation.prompt_tokens)
    new_tokens = spec.evaluate.generation.max_new_tokens
    sessions = {}
    for k, m in (("input", before), ("output", after)):
        layout = LMLayout.from_meta(m.meta["lm"]) if "lm" in m.meta else None
        sessions[k] = LMSession(m.onnx_path, threads=threads, layout=layout, guard=guard)  # type: ignore[arg-type]
    prefill: dict[str, list[dict[str, float]]] = {k: [] for k in sessions}
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    runs = max(3, spec.evaluate.latency.runs // ROUNDS)
    for r in range(ROUNDS):
        for k in (("input", "output") if r % 2 == 0 else ("output", "input")):
            prefill[k].append(sessions[k].time_prefill(prompt, runs, 1 if r == 0 else 0, ctx.check_cancelled))
            rates[k].append(sessions[k].time_decode(prompt, new_tokens, 1, ctx.check_cancelled)["tokens_per_s"])
    for side, k in ((baseline, "input"), (output, "output")):
        side["latency_recheck"] = _summary(prefill[k])
        side["decode_recheck"] = {"tokens_per_s": statistics.median(rates[k]), "min": min(rates[k]),
                                  "max": max(rates[k]), "rounds": float(ROUNDS)}
