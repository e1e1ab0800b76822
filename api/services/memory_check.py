"""Admission by memory: a job over an LLM that no worker could hold is refused at submit (422 ``job_too_large``)
with the estimate, the workers' memory and what would fit (``models.memory_fit``)."""

from __future__ import annotations

from api.errors import ProblemError
from models import memory_fit
from models.settings import Settings
from models.spec import JobSpec
from models.tables import Model


def check_memory(spec: JobSpec, model: Model, settings: Settings) -> None:
    """422 ``job_too_large`` when ``spec``'s steps over ``model`` would not fit the workers' memory."""
    if spec.search is not None or model.format != "hf":
        return
    memory = memory_fit.planned_memory(settings.worker_memory_bytes)
    meta = model.meta or {}
    why = memory_fit.refusal(meta, list(spec.steps), memory)
    if why is None:
        return
    est = memory_fit.estimate(meta, list(spec.steps), memory)
    assert est is not None
    raise ProblemError(422, "job_too_large", why, errors=[{
        "field": "steps", "message": why, "estimate_bytes": est.peak_bytes, "path": est.path,
        "worker_memory_bytes": memory, "planned_share": memory_fit.MEMORY_SHARE}])
