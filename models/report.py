"""The job report and the search's trial, typed: what ``worker.stages.build_report`` writes and the search,
the pages and the CLI read.

Stored JSON stays as it was: every model keeps the keys it does not name (``extra="allow"``) and
:meth:`Report.dump` writes back only the keys that were given, so ``Report.read(stored).dump() == stored``
for every report written before these models existed (``tests/models/test_report.py`` reads two).
Pure pydantic: no torch, no DB.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.spec import LM_TASKS


class _Open(BaseModel):
    """A stored JSON object: the named keys typed, every other key kept as it came."""

    model_config = ConfigDict(extra="allow")

    def dump(self) -> dict[str, Any]:
        """The JSON dict of the keys that were given or set (the shape it was read from)."""
        return self.model_dump(mode="json", exclude_unset=True)


class LatencyStats(_Open):
    """Milliseconds per batch over the timed runs."""

    median: float | None = None
    p90: float | None = None
    mean: float | None = None
    min: float | None = None


class MetricValue(_Open):
    """The task's headline metric: its name, value and direction."""

    name: str | None = None
    value: float | None = None
    higher_is_better: bool = True


class Decode(_Open):
    """A causal LM's decode speed (batch 1, with the KV cache)."""

    tokens_per_s: float | None = None
    ms_per_token: float | None = None
    new_tokens: int | None = None
    prompt_tokens: int | None = None


class Evaluation(_Open):
    """One side of the report (the input or the output model) as the evaluation harness measured it."""

    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    latency_ms: LatencyStats | float | None = None  # older reports store a bare median
    latency_setup: dict[str, Any] | None = None
    num_samples: int | None = None
    accuracy: float | None = None
    metric: MetricValue | None = None
    fidelity: dict[str, Any] | None = None
    # causal LMs
    perplexity: float | None = None
    agreement: dict[str, Any] | None = None
    decode: Decode | None = None
    generations: list[dict[str, Any]] | None = None
    peak_memory_bytes: int | None = None
    # a multi-task model: each task's accuracy through its own output (task, output, accuracy, eval_rows)
    tasks: list[dict[str, Any]] | None = None

    @property
    def latency_median(self) -> float | None:
        """The median latency in ms, None when not measured."""
        return self.latency_ms.median if isinstance(self.latency_ms, LatencyStats) else self.latency_ms

    @property
    def metric_value(self) -> float | None:
        """The headline metric's value, None when not measured."""
        return self.metric.value if self.metric is not None else None


class StepEntry(_Open):
    """One step's entry: what it measured, its wall time, its own evaluation, where it came from."""

    index: int = 0
    type: str = ""
    label: str = ""
    wall_s: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] | None = None
    curve: list[dict[str, Any]] = Field(default_factory=list)
    cached: bool | None = None
    cached_from: str | None = None


class Gains(_Open):
    """Output against input: ratios above 1 are gains (smaller, faster); deltas are output minus input."""

    size_ratio: float | None = None
    latency_ratio: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    accuracy_delta: float | None = None
    metric_delta: float | None = None
    # causal LMs
    decode_speedup: float | None = None
    perplexity_ratio: float | None = None
    memory_ratio: float | None = None


class Budget(_Open):
    """The quality budget and whether the output met it (``reason`` says why not)."""

    met: bool = True
    metric: str | None = None
    max_accuracy_drop: float | None = None
    accuracy_drop: float | None = None
    max_perplexity_increase: float | None = None
    perplexity_increase: float | None = None
    reason: str | None = None
    # a multi-task model: the task that decides (the worst, or the first to miss) and each task's row
    # (task, reference, reference_from, accuracy, accuracy_drop, met); accuracy_drop is then the worst task's
    task: str | None = None
    tasks: list[dict[str, Any]] | None = None

    @property
    def is_lm(self) -> bool:
        """Whether it is a causal LM's budget (perplexity and choice accuracy), whose ``reason`` says what missed."""
        return "perplexity_increase" in self.model_fields_set


class Trial(_Open):
    """One row of a search's trial table: the plan (steps, estimate), its state, and what it measured."""

    index: int = 0
    label: str = ""
    steps: list[dict[str, Any]] = Field(default_factory=list)
    state: str = ""
    job_id: str | None = None
    estimate: dict[str, float] | None = None
    reason: str | None = None
    worker: str | None = None
    error: dict[str, Any] | None = None
    met: bool | None = None
    misses: list[str] = Field(default_factory=list)
    objective_ratio: float | None = None
    metric: float | None = None
    metric_name: str | None = None
    size_bytes: int | None = None
    input_size_bytes: int | None = None
    latency_ms: float | None = None
    input_latency_ms: float | None = None
    accuracy_drop: float | None = None
    # multi-task trials: the task whose drop decided, and each task's accuracy and drop (the budget's rows)
    worst_task: str | None = None
    tasks: list[dict[str, Any]] | None = None
    pareto: bool = False
    latency_ms_remeasured: float | None = None

    @property
    def latency(self) -> float | None:
        """The latency the search judged it by: re-measured when it was a finalist, else its own job's."""
        return self.latency_ms_remeasured if self.latency_ms_remeasured is not None else self.latency_ms


class SearchSection(_Open):
    """A search's part of its report: the objective and constraints, every trial, the winner."""

    objective: str = "latency"
    constraints: dict[str, Any] = Field(default_factory=dict)
    trials: list[Trial] = Field(default_factory=list)
    pareto: list[str] = Field(default_factory=list)
    best: dict[str, Any] | None = None
    # No trial beat the input: the one that came closest (trial, job_id, label, objective_ratio, margin).
    closest: dict[str, Any] | None = None
    input_latency_ms_remeasured: float | None = None
    input_noise: float | None = None
    # The plan's fp16 probe on the CPU provider: ratio and worst_round (fp16 over the input), or not_measured.
    fp16_probe: dict[str, Any] | None = None
    latency_harness: dict[str, Any] | None = None
    total: int | None = None
    done: int = 0
    skipped: int = 0
    running: int = 0
    pending: int = 0


class Report(_Open):
    """A job's report: input and output evaluations, per-step entries, gains, the budget, warnings."""

    task: str | None = None
    pipeline: list[str] = Field(default_factory=list)
    input: Evaluation | None = None
    output: Evaluation | None = None
    steps: list[StepEntry] = Field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    gains: Gains | None = None
    budget: Budget | None = None
    warnings: list[dict[str, Any]] = Field(default_factory=list)
    environment: dict[str, Any] | None = None
    search: SearchSection | None = None
    cached_from: str | None = None
    # Calibration rows carved from data.eval (worker.context): counts, seed and the sentence saying so.
    calibration_split: dict[str, Any] | None = None

    @classmethod
    def read(cls, data: Any) -> Report:
        """A stored report (a job's ``result.report``); an empty one when ``data`` is none or not a report."""
        if not isinstance(data, dict):
            return cls()
        try:
            return cls.model_validate(data)
        except ValidationError:
            # A report some older version wrote in another shape: the keys that do not read are left out.
            return cls.model_validate({k: v for k, v in data.items() if _reads(cls, k, v)})

    @property
    def is_lm(self) -> bool:
        """Whether a causal LM's job wrote it (task text-generation, or sides measured with perplexity)."""
        sides = (self.input, self.output)
        return self.task in LM_TASKS or any(s is not None and s.perplexity is not None for s in sides)


def _reads(model: type[BaseModel], key: str, value: Any) -> bool:
    try:
        model.model_validate({key: value})
    except ValidationError:
        return False
    return True
