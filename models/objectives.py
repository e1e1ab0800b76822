"""The search-objective table: what a search can minimize, one row per objective.

The search (its trial outcomes, its skips, its finalize), the report page's trials chart and the CLI read it.
A new objective is its name in ``models.spec.Objective`` and a row here (``tests/models/test_objectives.py``
checks the two agree). Pure: no torch, no DB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from models.report import Evaluation, Trial
from models.spec import Objective


@dataclass(frozen=True)
class ObjectiveKind:
    """One objective. ``measure``: its value on one side of a report (smaller is better); ``estimate``: the
    candidate's estimated ratio to the input it is judged by before running (a ``Candidate`` attribute), and
    ``floor`` the optimistic bound of that ratio (also a ``Candidate`` attribute);
    ``finalist``: the value finalize ranks the finalists by; ``axis``: the trials chart's x label;
    ``chart``: a trial's x value on that chart."""

    name: str
    measure: Callable[[Evaluation], float | None]
    estimate: str
    floor: str
    finalist: Callable[[Trial], float]
    axis: str
    chart: Callable[[Trial], float | None]

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
                  lambda t: t.latency_ms_remeasured or 0.0, "latency (ms)", lambda t: t.latency),
    ObjectiveKind("size", lambda e: None if e.size_bytes is None else float(e.size_bytes), "size_ratio", "size_floor",
                  lambda t: float(t.size_bytes or 0), "size (MB)", lambda t: _mb(t.size_bytes)),
)
OBJECTIVES: dict[str, ObjectiveKind] = {k.name: k for k in _KINDS}
# The objectives a spec accepts, in the order the CLI offers them.
OBJECTIVE_NAMES: tuple[str, ...] = get_args(Objective)
