"""The search-objective table: what a search can minimize, one row per objective.

The search (its trial outcomes, its skips, how finalize judges a finalist against the input and ranks the
finalists), the report page's trials chart and the CLI read it. A new objective is its name in
``models.spec.Objective`` and a row here with its judge (``tests/models/test_objectives.py`` checks the two
agree); ``worker/search.py`` has no branch per objective. Pure: no torch, no DB.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from models.report import Evaluation, Trial
from models.spec import Objective

# The least margin a latency winner must beat the input by, in every interleaved round.
MIN_NOISE = 0.02
# Without an interleaved re-measure of the input, a latency winner must beat the input's latency its own
# trial measured by this margin (two processes, two moments: noisier than one interleaved harness).
UNPAIRED_MARGIN = 0.05
# A size winner within this fraction of the smallest trial's size loses to a faster one among them.
SIZE_TIE = 0.05

Row = dict[str, Any]  # a trial-table row (worker/search.py)
Timing = Mapping[str, Any]  # one model's interleaved re-measure: median, round_medians


@dataclass(frozen=True)
class Verdict:
    """How finalize judges one finalist: its objective ``value`` against the input's ``ref`` (same unit),
    the ``margin`` (a fraction) it must beat it by, and the worst paired round's ratio where measured."""

    value: float | None
    ref: float | None
    margin: float
    worst_round: float | None = None


def paired_ratio(rounds: Sequence[float], input_rounds: Sequence[float]) -> tuple[float, float]:
    """A model's latency over the input's from the same interleaved rounds: ``(median, worst)`` of the
    per-round ratios. Each round times both back to back, so a load spike on a shared machine hits both and
    cancels in the ratio (unpaired medians do not)."""
    ratios = sorted(w / i for w, i in zip(rounds, input_rounds, strict=False) if i > 0)
    if not ratios:
        return float("inf"), float("inf")
    return ratios[len(ratios) // 2], ratios[-1]


def _judge_latency(t: Row, mine: Timing, inp: Timing | None) -> Verdict:
    """Paired rounds (the input re-measured beside it): faster in every round, and by ``MIN_NOISE`` at the
    median; without the input, the trial's own input/output latencies with ``UNPAIRED_MARGIN``."""
    if inp is None:
        return Verdict(t.get("latency_ms"), t.get("input_latency_ms"), UNPAIRED_MARGIN)
    mid, worst = paired_ratio(mine["round_medians"], inp["round_medians"])
    return Verdict(mid, 1.0, max(MIN_NOISE, worst - mid), worst)


def _judge_size(t: Row, mine: Timing, inp: Timing | None) -> Verdict:
    """Bytes are exact: no margin."""
    return Verdict(t.get("size_bytes"), t.get("input_size_bytes"), 0.0)


def _order_latency(met: list[Row], timed: Mapping[str, Timing]) -> list[Row]:
    """Fastest re-measured first, then the higher metric."""
    return sorted(met, key=lambda t: (timed[t["job_id"]]["median"], -(t.get("metric") or 0.0)))


def _order_size(met: list[Row], timed: Mapping[str, Timing]) -> list[Row]:
    """Smallest first, except that among those within ``SIZE_TIE`` of the smallest the fastest comes first."""
    smallest = min((t.get("size_bytes") or 0 for t in met), default=0)

    def key(t: Row) -> tuple[bool, float]:
        size = t.get("size_bytes") or 0
        tied = size <= smallest * (1 + SIZE_TIE)
        return not tied, float(timed[t["job_id"]]["median"] if tied else size)

    return sorted(met, key=key)


@dataclass(frozen=True)
class ObjectiveKind:
    """One objective. ``measure``: its value on one side of a report (smaller is better); ``estimate``: the
    candidate's estimated ratio to the input it is judged by before running (a ``Candidate`` attribute), and
    ``floor`` the optimistic bound of that ratio (also a ``Candidate`` attribute);
    ``finalist``: the value finalize ranks the finalists by; ``axis``: the trials chart's x label;
    ``chart``: a trial's x value on that chart; ``judge``: a re-measured finalist against the input
    (a trial row, its re-measure, the input's or None); ``order``: the finalists meeting the constraints,
    best first (the rows and every re-measure by job id)."""

    name: str
    measure: Callable[[Evaluation], float | None]
    estimate: str
    floor: str
    finalist: Callable[[Trial], float]
    axis: str
    chart: Callable[[Trial], float | None]
    judge: Callable[[Row, Timing, Timing | None], Verdict]
    order: Callable[[list[Row], Mapping[str, Timing]], list[Row]]

    def ratio(self, before: Evaluation, after: Evaluation) -> float | None:
        """The output's value as a fraction of the input's (None when either was not measured)."""
        b, a = self.measure(before), self.measure(after)
        return a / b if a and b else None

    def rank(self, trial: dict[str, Any]) -> tuple[float, float]:
        """Sort key of a finalist (a trial-table row): the objective, then the higher metric."""
        return self.finalist(Trial.model_validate(trial)), -(trial.get("metric") or 0.0)


def _mb(n: float | None) -> float | None:
    return None if n is None else float(n) / 1e6


_KINDS = (
    ObjectiveKind("latency", lambda e: e.latency_median, "latency_ratio", "latency_floor",
                  lambda t: t.latency_ms_remeasured or 0.0, "latency (ms)", lambda t: t.latency,
                  _judge_latency, _order_latency),
    ObjectiveKind("size", lambda e: None if e.size_bytes is None else float(e.size_bytes), "size_ratio", "size_floor",
                  lambda t: float(t.size_bytes or 0), "size (MB)", lambda t: _mb(t.size_bytes),
                  _judge_size, _order_size),
)
OBJECTIVES: dict[str, ObjectiveKind] = {k.name: k for k in _KINDS}
# The objectives a spec accepts, in the order the CLI offers them.
OBJECTIVE_NAMES: tuple[str, ...] = get_args(Objective)
