"""What a person reads of a job report, as plain rows: one pure function shared by the HTML report and the CLI.

Nothing here escapes HTML or knows about a terminal: templates autoescape, the CLI prints text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

from models.spec import step_label


def is_num(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def fmt_number(v: Any, digits: int = 4) -> str:
    """A number for people (thousands separators, significant digits); '-' when missing."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 10 ** max(digits, 1):  # 10,246 tokens/s, never '1.02e+04'
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_bytes(n: Any) -> str:
    """Bytes as B/KB/MB/GB; '-' when missing."""
    if not is_num(n):
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GB"


def latency_median(side: dict[str, Any]) -> Any:
    """The median latency (ms) of one side of a report (older reports store a bare number)."""
    lat = side.get("latency_ms")
    return lat.get("median") if isinstance(lat, dict) else lat


TIMES = "\u00d7"  # the multiplication sign of '3.20x'


def fmt_ratio(before: Any, after: Any) -> str:
    """before / after as '3.20' and the multiplication sign; '-' when either is missing or after is zero."""
    if is_num(before) and is_num(after) and float(after) != 0:
        return f"{float(before) / float(after):.2f}{TIMES}"
    return "-"


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the before/after table: raw values, their text, and the change (ratio or delta)."""

    key: str
    label: str
    before: Any
    after: Any
    before_text: str
    after_text: str
    change_text: str
    # True when the change is an improvement, False when it is a regression, None when unknown.
    better: bool | None = None


SAME_WITHIN = 0.005  # a ratio within 0.5 % of 1 reads "same"


def change_words(before: Any, after: Any, less: str, more: str) -> tuple[str, bool | None]:
    """A quantity where less is better, changed from ``before`` to ``after``, as a person reads it:
    ('7.83x smaller', True), ('1.50x slower', False), ('same', None); ('-', None) when not both numbers."""
    if not (is_num(before) and is_num(after)):
        return "-", None
    if float(after) <= 0 or float(before) <= 0:
        return fmt_ratio(before, after), float(after) <= float(before)
    ratio = float(before) / float(after)
    if abs(ratio - 1) <= SAME_WITHIN:
        return "same", None
    text, better = ratio_words(ratio, less)
    return f"{text} {less if better else more}", better


# Each ratio row's words for less and for more of its quantity (all of them: less is better).
_RATIO_WORDS = {"size_bytes": ("smaller", "larger"), "latency_ms": ("faster", "slower"),
                "latency_p90": ("faster", "slower"), "latency_mean": ("faster", "slower"),
                "params": ("fewer", "more"), "macs": ("fewer", "more"), "peak_memory_bytes": ("less", "more")}


def _ratio_row(key: str, label: str, before: Any, after: Any, text: Any = fmt_number) -> ComparisonRow:
    less, more = _RATIO_WORDS[key]
    change, better = change_words(before, after, less, more)
    return ComparisonRow(key, label, before, after, text(before), text(after), change, better)


def _relative_row(key: str, label: str, before: Any, after: Any) -> ComparisonRow:
    """A quality measure where lower is better (perplexity): its change in percent, '+4.51 %'."""
    change, better = "-", None
    if is_num(before) and is_num(after) and float(before) > 0:
        rel = float(after) / float(before) - 1
        change, better = f"{100 * rel:+.2f} %", (None if abs(rel) <= SAME_WITHIN / 10 else rel < 0)
    return ComparisonRow(key, label, before, after, fmt_number(before), fmt_number(after), change, better)


def _throughput_row(key: str, label: str, before: Any, after: Any) -> ComparisonRow:
    """A rate (higher is better), its change in words: '2.79x faster' or '1.50x slower'."""
    better, change = None, "-"
    if is_num(before) and is_num(after) and float(before) > 0 and float(after) > 0:
        better = float(after) >= float(before)
        change = f"{float(after) / float(before):.2f}{TIMES} faster" if better else \
            f"{float(before) / float(after):.2f}{TIMES} slower"
    return ComparisonRow(key, label, before, after, fmt_number(before), fmt_number(after), change, better)


def is_lm_report(report: dict[str, Any]) -> bool:
    """A causal-LM report (task text-generation, or sides measured with perplexity)."""
    sides = [report.get("input") or {}, report.get("output") or {}]
    return report.get("task") == "text-generation" or any("perplexity" in s for s in sides if isinstance(s, dict))


def _lm_rows(b: dict[str, Any], a: dict[str, Any]) -> list[ComparisonRow]:
    """Perplexity, decode tokens/s and session peak memory of a causal-LM report."""
    rows = [_relative_row("perplexity", "perplexity (eval text)", b.get("perplexity"), a.get("perplexity"))]
    db, da = b.get("decode") or {}, a.get("decode") or {}
    if db or da:
        rows.append(_throughput_row("decode_tokens_per_s", "decode tokens/s (KV cache, batch 1)",
                                    db.get("tokens_per_s"), da.get("tokens_per_s")))
    if b.get("peak_memory_bytes") is not None or a.get("peak_memory_bytes") is not None:
        rows.append(_ratio_row("peak_memory_bytes", "session peak memory", b.get("peak_memory_bytes"),
                               a.get("peak_memory_bytes"), fmt_bytes))
    return rows


def _latency_label(b: dict[str, Any], a: dict[str, Any], lm: bool) -> str:
    if not lm:
        return "latency"
    setup = b.get("latency_setup") or a.get("latency_setup") or {}
    tokens = setup.get("prompt_tokens") if isinstance(setup, dict) else None
    return f"prefill {tokens} tokens" if tokens else "prefill"


def latency_title(report: dict[str, Any]) -> str:
    """What a report's latency measures, for a chart title: 'latency', or a causal LM's 'prefill 32 tokens'."""
    return _latency_label(report.get("input") or {}, report.get("output") or {}, is_lm_report(report))


def comparison_rows(report: dict[str, Any]) -> list[ComparisonRow]:
    """The before/after rows of a report: size, latency (median, p90, mean), parameters, MACs, accuracy;
    for causal LMs also perplexity, decode tokens/s and peak memory (latency is the prompt's prefill)."""
    b = report.get("input") or {}
    a = report.get("output") or {}
    lm = is_lm_report(report)
    lat = _latency_label(b, a, lm)
    rows = [
        _ratio_row("size_bytes", "size", b.get("size_bytes"), a.get("size_bytes"), fmt_bytes),
        *(_lm_rows(b, a) if lm else []),
        _ratio_row("latency_ms", f"{lat} median (ms)", latency_median(b), latency_median(a)),
    ]
    lb, la = b.get("latency_ms"), a.get("latency_ms")
    if isinstance(lb, dict) or isinstance(la, dict):
        lb, la = lb if isinstance(lb, dict) else {}, la if isinstance(la, dict) else {}
        for key in ("p90", "mean"):
            if key in lb or key in la:
                rows.append(_ratio_row(f"latency_{key}", f"{lat} {key} (ms)", lb.get(key), la.get(key)))
    rows.append(_ratio_row("params", "parameters", b.get("params"), a.get("params")))
    if b.get("macs") is not None or a.get("macs") is not None:
        rows.append(_ratio_row("macs", "MACs", b.get("macs"), a.get("macs")))
    acc_b, acc_a = b.get("accuracy"), a.get("accuracy")
    if acc_b is not None or acc_a is not None:
        change, better = "-", None
        if is_num(acc_b) and is_num(acc_a):
            delta = float(cast(float, acc_a)) - float(cast(float, acc_b))
            change, better = f"{delta:+.4f}", delta >= 0
        label = "choice accuracy" if lm else f"accuracy ({report.get('task') or 'task'})"
        rows.append(ComparisonRow("accuracy", label, acc_b, acc_a, fmt_number(acc_b), fmt_number(acc_a), change, better))
    return rows


@dataclass(frozen=True)
class QualityRow:
    """A single-valued line: the accuracy budget or one fidelity measure."""

    label: str
    value_text: str
    better: bool | None = None


FIDELITY_LABELS = (("max_abs_err", "max abs error"), ("cosine", "cosine similarity"), ("top1_agreement", "top-1 agreement"))


def quality_rows(report: dict[str, Any]) -> list[QualityRow]:
    """The accuracy budget (met or missed) and the fidelity measures of a report."""
    rows = []
    budget = report.get("budget") or {}
    lm = is_lm_report(report)
    if isinstance(budget, dict) and budget:
        met = budget.get("met")
        text = "met" if met else ("missed" if met is not None else "-")
        if lm:
            bounds = []
            if is_num(budget.get("max_perplexity_increase")):
                bounds.append(f"perplexity +{float(budget['max_perplexity_increase']) * 100:.2f}%")
            if is_num(budget.get("max_accuracy_drop")):
                bounds.append(f"accuracy drop {fmt_number(budget.get('max_accuracy_drop'))}")
            label = f"budget (max {', '.join(bounds)})" if bounds else "budget (none set)"
        else:
            label = f"accuracy budget (max drop {fmt_number(budget.get('max_accuracy_drop'))})"
        rows.append(QualityRow(label, text, None if met is None else bool(met)))
        if lm and is_num(budget.get("perplexity_increase")):
            rows.append(QualityRow("perplexity change", f"{float(budget['perplexity_increase']) * 100:+.2f}%"))
    agreement = (report.get("output") or {}).get("agreement") if lm else None
    if isinstance(agreement, dict):
        for key, label, digits in (("top1", "next-token top-1 agreement", 4), ("mean_kl", "mean KL (nats)", 4)):
            if key in agreement:
                rows.append(QualityRow(f"vs input: {label}", fmt_number(agreement.get(key), digits)))
        return rows
    fidelity = report.get("fidelity") or {}
    if isinstance(fidelity, dict):
        for key, label in FIDELITY_LABELS:
            if key in fidelity:
                rows.append(QualityRow(f"fidelity: {label}", fmt_number(fidelity.get(key), 6)))
    return rows


def pipeline_labels(report: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The steps a job ran, as the report names them (else as the spec describes them)."""
    labels = report.get("pipeline")
    if isinstance(labels, list) and labels:
        return [str(label) for label in labels]
    return [step_label(s) for s in spec.get("steps") or [] if isinstance(s, dict)]


@dataclass(frozen=True)
class Gain:
    """One headline gain: a ratio and its word ('smaller'), or the accuracy delta."""

    value_text: str
    word: str
    better: bool | None = None


GAIN_WORDS = (("size_ratio", "smaller"), ("latency_ratio", "faster"), ("params_ratio", "fewer parameters"),
              ("decode_speedup", "faster decoding"))


WORSE_WORDS = {"smaller": "larger", "faster": "slower", "fewer parameters": "more parameters",
               "faster decoding": "slower decoding"}


def ratio_words(ratio: float, word: str, digits: int = 2) -> tuple[str, bool]:
    """A before/after ratio as a person reads it: 1.8 -> ('1.80 times', better); 0.31 -> ('3.23 times', worse).

    Returns the multiplier text and whether it is an improvement; the caller appends ``word`` or its opposite.
    """
    if ratio >= 1 or ratio <= 0:
        return f"{ratio:.{digits}f}{TIMES}", True
    return f"{1 / ratio:.{digits}f}{TIMES}", False


def _lm_gains(report: dict[str, Any], found: dict[str, Any]) -> list[Gain]:
    """A causal LM's headline, in the order people ask: perplexity change, decode speed, size, prefill; a ratio
    within 0.5 % of 1 is left out ('1.00x smaller' after LoRA says nothing)."""
    out = []
    b: Any = (report.get("input") or {}).get("perplexity")
    a: Any = (report.get("output") or {}).get("perplexity")
    if is_num(b) and is_num(a) and float(b) > 0:
        rel = float(a) / float(b) - 1
        text = f"{100 * rel:+.1f} %".replace("-", "\u2212")
        out.append(Gain(text, "perplexity", None if abs(rel) < 0.0005 else rel < 0))
    for key, word in (("decode_speedup", "faster decoding"), ("size_ratio", "smaller"), ("latency_ratio", "faster prefill")):
        value: Any = found.get(key)
        if not is_num(value) or abs(float(value) - 1) <= SAME_WITHIN:
            continue
        text, better = ratio_words(float(value), word)
        worse = {"faster prefill": "slower prefill"}.get(word) or WORSE_WORDS[word]
        out.append(Gain(text, word if better else worse, None if better else False))
    return out


def gains(report: dict[str, Any]) -> list[Gain]:
    """The report's headline gains (size, latency, parameter ratios; accuracy delta); a loss reads '3.20 times slower'.
    A causal LM's lead with what such a job is for: perplexity change, decode speed, size."""
    found = report.get("gains") or {}
    if not isinstance(found, dict):
        return []
    if is_lm_report(report):
        return _lm_gains(report, found)
    out = []
    for key, word in GAIN_WORDS:
        if key == "params_ratio" and is_num(found.get(key)) and abs(float(found[key]) - 1) <= SAME_WITHIN:
            continue  # quantization keeps every parameter: "1.00x fewer parameters" says nothing
        if is_num(found.get(key)):
            text, better = ratio_words(float(found[key]), word)
            out.append(Gain(text, word if better else WORSE_WORDS[word], None if better else False))
    if is_num(found.get("accuracy_delta")):
        delta = float(found["accuracy_delta"])
        out.append(Gain(f"{delta:+.4f}", "accuracy", delta >= 0))
    return out


@dataclass(frozen=True)
class GenerationRow:
    """One eval prompt with the input model's and the output model's greedy continuation."""

    prompt: str
    before: str
    after: str


def generation_rows(report: dict[str, Any]) -> list[GenerationRow]:
    """The causal-LM report's greedy generations side by side, paired by prompt (input order)."""
    def by_prompt(side: Any) -> dict[str, str]:
        found = side.get("generations") if isinstance(side, dict) else None
        return {str(g.get("prompt")): str(g.get("text", "")) for g in found or [] if isinstance(g, dict)}

    before, after = by_prompt(report.get("input")), by_prompt(report.get("output"))
    prompts = list(before) + [p for p in after if p not in before]
    return [GenerationRow(p, before.get(p, "-"), after.get(p, "-")) for p in prompts]


CURVE_SERIES = ("loss", "eval_metric", "lr")


def task_series(points: list[dict[str, Any]]) -> list[str]:
    """A multi-task curve's per-task series (``loss[parity]``, ``accuracy[parity]``, ...), in first-seen order."""
    keys: dict[str, None] = {}
    for c in points:
        keys.update((k, None) for k in c if k.endswith("]") and "[" in k)
    return list(keys)


@dataclass(frozen=True)
class StepRow:
    """One executed step: its label, wall time, scalar metrics, and its training curve (epoch, value) per series."""

    index: Any
    label: str
    wall_s: Any
    index_text: str
    wall_text: str
    metrics_text: str
    curves: dict[str, list[tuple[Any, Any]]]


def auto_exclude_text(metrics: Any) -> str:
    """A quantize step's ``auto_exclude`` in words: the nodes kept in float, whether the target held, their cost."""
    ae = metrics.get("auto_exclude") if isinstance(metrics, dict) else None
    if not isinstance(ae, dict):
        return ""
    nodes = ",".join(str(n) for n in ae.get("kept_float") or []) or "none"
    cost = ae.get("cost")
    cost = cost if isinstance(cost, dict) else {}
    return (
        f"kept_float={nodes} target_met={fmt_number(ae.get('met'))} "
        f"float_cost={fmt_bytes(cost.get('size_bytes'))},{fmt_number(cost.get('latency_ms'), 3)}ms"
    )


def weight_only_text(metrics: Any) -> str:
    """A weight-only quantize step's settings in words: 'rtn block=64 asym 4-bit=16 8-bit=1 embeddings=2'."""
    wo = metrics.get("weight_only") if isinstance(metrics, dict) else None
    if not isinstance(wo, dict):
        return ""
    found = wo.get("matmul_bits")
    bits: dict[Any, Any] = found if isinstance(found, dict) else {}
    parts = [str(wo.get("algorithm") or ""), f"block={fmt_number(wo.get('block_size'))}",
             "sym" if wo.get("symmetric") else "asym",
             *(f"{b}-bit={fmt_number(n)}" for b, n in sorted(bits.items())),
             f"embeddings={fmt_number(wo.get('embeddings'))}"]
    return " ".join(p for p in parts if p)


def eval_series_name(points: list[dict[str, Any]]) -> str:
    """What a curve's ``eval_metric`` series is, named after the metric whose values it holds: ``eval_loss`` for a
    causal LM (its eval loss, lower is better), ``eval_accuracy`` for a classifier; ``eval_metric`` when unknown."""
    measured = [c for c in points if is_num(c.get("eval_metric"))]
    if not measured:
        return "eval_metric"
    for key in measured[0]:
        if key in ("epoch", "loss", "lr", "eval_metric") or not is_num(measured[0][key]):
            continue
        if all(c.get(key) == c.get("eval_metric") for c in measured):
            return key if key.startswith("eval_") else f"eval_{key}"
    return "eval_metric"


def step_rows(report: dict[str, Any]) -> list[StepRow]:
    """The report's steps in order, with the series (loss, eval_metric, lr) their curves hold."""
    rows = []
    for step in report.get("steps") or []:
        if not isinstance(step, dict):
            continue
        label = str(step.get("label") or step.get("type") or f"step {step.get('index')}")
        metrics = step.get("metrics") or {}
        shown = " ".join(
            f"{k}={fmt_number(v)}" for k, v in metrics.items() if not isinstance(v, dict | list)
        ) if isinstance(metrics, dict) else ""
        shown = " ".join(t for t in (shown, auto_exclude_text(metrics), weight_only_text(metrics)) if t)
        points = [c for c in step.get("curve") or [] if isinstance(c, dict)]
        curves = {
            (eval_series_name(points) if key == "eval_metric" else key): [(c.get("epoch"), c.get(key)) for c in points]
            for key in (*CURVE_SERIES, *task_series(points)) if any(is_num(c.get(key)) for c in points)
        }
        rows.append(StepRow(step.get("index"), label, step.get("wall_s"), fmt_number(step.get("index")),
                            fmt_number(step.get("wall_s"), 3), shown, curves))
    return rows


# The output may be this much slower than the input before a job warns: latency medians jitter by a few percent.
LATENCY_NOISE = 0.05


def _rate(v: float) -> str:
    """A rate for people: whole numbers from 100 up ('10,246'), three significant digits below."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _timing(side: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(median, p90, re-timed) of one side's latency: the interleaved recheck when the worker made one."""
    recheck = side.get("latency_recheck")
    if isinstance(recheck, dict) and is_num(recheck.get("median")):
        return recheck.get("median"), recheck.get("p90"), True
    lat = side.get("latency_ms")
    return (lat.get("median"), lat.get("p90"), False) if isinstance(lat, dict) else (lat, None, False)


def _slower(lb: Any, pb: Any, la: Any, pa: Any) -> bool:
    """Whether the output (median ``la``, p90 ``pa``) is slower than the input (``lb``, ``pb``) beyond the noise:
    its median more than LATENCY_NOISE above the input's and above the input's p90 (beyond its spread), and its
    p90 above the input's p90 too (a median 1.5x slower with a p90 2.3x faster is noise, not a regression)."""
    if not (is_num(lb) and is_num(la)) or float(lb) <= 0 or float(la) <= float(lb) * (1 + LATENCY_NOISE):
        return False
    if is_num(pb) and float(la) <= float(pb):
        return False
    return not (is_num(pa) and is_num(pb) and float(pa) <= float(pb) * (1 + LATENCY_NOISE))


def _decode_rates(side: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(median tokens/s, lowest, highest) of one side's decode speed; the interleaved recheck when there is one."""
    recheck = side.get("decode_recheck")
    if isinstance(recheck, dict) and is_num(recheck.get("tokens_per_s")):
        return recheck.get("tokens_per_s"), recheck.get("min"), recheck.get("max")
    rate = (side.get("decode") or {}).get("tokens_per_s")
    return rate, None, None


def regressions(baseline: dict[str, Any], output: dict[str, Any]) -> list[dict[str, Any]]:
    """Warnings for an output that is slower (beyond LATENCY_NOISE and the measured spread) or larger than its
    input; for causal LMs also one whose decode tokens/s fell (``slower_decoding``).

    Timings come from the interleaved recheck (``latency_recheck``, ``decode_recheck``: worker.recheck) when the
    worker made one. Each warning is ``{"code", "message", "ratio"}``, ratio = after / before (3.2 means 3.2 times
    slower or larger; for decoding, before / after tokens/s).
    """
    out: list[dict[str, Any]] = []
    (lb, pb, again), (la, pa, _) = _timing(baseline), _timing(output)
    if _slower(lb, pb, la, pa):
        ratio = float(la) / float(lb)
        what = "prefill " if (output.get("latency_setup") or {}).get("what") == "prefill" else ""
        spread = (f", {fmt_number(float(pb), 3)} \u2192 {fmt_number(float(pa), 3)} ms p90"
                  if is_num(pb) and is_num(pa) else "")
        out.append({"code": "slower_than_input", "ratio": round(ratio, 3),
                    "message": f"{what}{ratio:.1f}{TIMES} slower than the input model "
                               f"({fmt_number(float(lb), 3)} \u2192 {fmt_number(float(la), 3)} ms median{spread}"
                               f"{', timed again interleaved' if again else ''})"})
    (db, db_lo, _), (da, _, da_hi) = _decode_rates(baseline), _decode_rates(output)
    beyond_spread = not (is_num(db_lo) and is_num(da_hi)) or float(da_hi) < float(db_lo)
    if is_num(db) and is_num(da) and 0 < float(da) * (1 + LATENCY_NOISE) < float(db) and beyond_spread:
        ratio = float(db) / float(da)
        out.append({"code": "slower_decoding", "ratio": round(ratio, 3),
                    "message": f"decodes {ratio:.1f}{TIMES} slower than the input model "
                               f"({_rate(float(db))} \u2192 {_rate(float(da))} tokens/s"
                               f"{', timed again interleaved' if is_num(db_lo) else ''})"})
    sb, sa = baseline.get("size_bytes") or 0, output.get("size_bytes") or 0
    if is_num(sb) and is_num(sa) and float(sb) > 0 and float(sa) > float(sb):
        ratio = float(sa) / float(sb)
        out.append({"code": "larger_than_input", "ratio": round(ratio, 3),
                    "message": f"{ratio:.2f}{TIMES} larger than the input model ({fmt_bytes(sb)} \u2192 {fmt_bytes(sa)})"})
    return out


def warning_lines(report: dict[str, Any]) -> list[str]:
    """The lines a person reads for a report's (or a job result's) warnings; computed from its sides when absent."""
    found = report.get("warnings")
    if found is None:
        inner = report.get("report")
        if isinstance(inner, dict):
            return warning_lines(inner)
        b, a = report.get("input"), report.get("output")
        found = regressions(b, a) if isinstance(b, dict) and isinstance(a, dict) else []
    return [str(w.get("message") or w.get("code")) for w in found if isinstance(w, dict)]


def progress_text(status: str, step: Any, steps: Any, percent: Any, epoch: Any = None, epochs: Any = None,
                  failed_in: str | None = None) -> str:
    """A job's progress in words: '40% · step 2/5 · epoch 1/3' while it runs; once it failed, where, in the words
    of its error's ``step`` ('failed in steps[0] prune', one numbering with the error), else 'failed at step 5/5'."""
    where = f"step {fmt_number(step)}/{fmt_number(steps)}" if steps else ""
    if status in ("failed", "cancelled"):
        if failed_in:
            return f"{status} in {failed_in}"
        return f"{status} at {where}" if where else status
    if status == "succeeded":
        return "100%" + (f" · {fmt_number(steps)} steps" if steps else "")
    parts = [f"{float(percent or 0):.0f}%"] + ([where] if where else [])
    if epoch is not None:
        parts.append(f"epoch {fmt_number(epoch)}/{fmt_number(epochs)}" if epochs else f"epoch {fmt_number(epoch)}")
    return " · ".join(parts)


def accuracy_drop_text(drop: Any, allowed: Any = None, num_samples: Any = None) -> str:
    """An accuracy change for people: '-1.01 points, 4 of 397 samples (allowed 1.00)' from a 0.0101 drop."""
    if not is_num(drop):
        return "the metric could not be measured"
    points = -float(drop) * 100
    text = f"{points:+.2f} points".replace("-", "\u2212")
    if is_num(num_samples) and int(num_samples) > 0:
        text += f", {round(abs(float(drop)) * int(num_samples))} of {int(num_samples)} samples"
    if is_num(allowed):
        text += f" (allowed \u2212{float(allowed) * 100:.2f})"
    return text
