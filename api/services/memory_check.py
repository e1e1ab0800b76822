"""Admission by memory and routing by the workers' advertisements (``models.workers``): a job over an LLM
that no live worker could hold is refused at submit (422 ``job_too_large``) with the estimate, the workers'
memory and what would fit (``models.memory_fit``); training of a model too large for a CPU worker goes to the
CUDA queue when a live worker has a GPU that fits it, else is refused (422 ``needs_gpu_worker``)."""

from __future__ import annotations

from typing import Any

from api.errors import ProblemError
from models import memory_fit
from models.settings import Settings
from models.spec import JobSpec
from models.tables import Model
from models.workers import Advert, Fleet, live_fleet


def planned_memory(settings: Settings, fleet: Fleet) -> tuple[int, str]:
    """The memory jobs are planned against and where it comes from: the setting, else the largest live
    worker's advertisement, else this machine's."""
    if settings.worker_memory_bytes:
        return settings.worker_memory_bytes, "setting worker_memory_bytes"
    largest = fleet.largest_memory
    if largest is not None:
        return largest.memory_total, f"largest live worker {largest.id}"
    return memory_fit.machine_memory_bytes(), "the API's machine (no live worker advertised)"


def _training_mode(steps: list[Any]) -> str | None:
    """The most demanding training mode among ``steps`` (None: nothing trains)."""
    modes = ["distill" if s.type == "distill" else s.mode for s in steps if s.type in ("finetune", "distill")]
    for mode in ("distill", "full", "last_n", "head", "lora"):
        if mode in modes:
            return mode
    return None


def _gpu_refusal(params: int, mode: str, gpu: Advert) -> str | None:
    """Why GPU worker ``gpu`` cannot train ``params`` parameters in ``mode`` (None: it can)."""
    plan = memory_fit.training_plan(params, mode, cuda=True, gpu_memory=gpu.gpu_memory)
    host = params * memory_fit.IN_MEMORY_BYTES_PER_PARAM  # the trained model is exported and evaluated in memory
    if not isinstance(plan, str) and host <= memory_fit.MEMORY_SHARE * gpu.memory_total:
        return None
    msg = plan if isinstance(plan, str) else (
        f"after training, the model is exported and evaluated in the worker's RAM: about {host / 1e9:.0f} GB "
        f"({memory_fit.IN_MEMORY_BYTES_PER_PARAM} bytes per parameter); the GPU worker has "
        f"{gpu.memory_total / 1e9:.0f} GB, of which a job may plan {memory_fit.MEMORY_SHARE:.0%}")
    return f"{msg} (GPU worker: {gpu.gpu_name} on {gpu.id})"


def _route_training(spec: JobSpec, meta: dict[str, Any], settings: Settings, fleet: Fleet) -> str | None:
    """The CUDA queue for training a model too large for a CPU worker; 422 when no live GPU fits it."""
    params = int(meta.get("parameters") or 0)
    mode = _training_mode(list(spec.steps))
    if mode is None or params < settings.cpu_train_max_params:
        return None
    memory, basis = planned_memory(settings, fleet)
    gpus = fleet.gpu_workers(settings.cuda_queue)
    if not gpus or spec.queue == "cpu":
        why = memory_fit.training_plan(params, mode, cuda=False, cpu_max_params=settings.cpu_train_max_params)
        where = "the job asks for queue cpu" if spec.queue == "cpu" else "no live worker has a GPU"
        msg = f"{why}; {where}. What fits: {memory_fit.without_training(meta, memory)}"
        raise ProblemError(422, "needs_gpu_worker", msg, errors=[{
            "field": "steps", "message": msg, "parameters": params, "cpu_train_max_params":
            settings.cpu_train_max_params, "gpu_workers": len(gpus), "worker_memory_bytes": memory,
            "memory_basis": basis}])
    refusals = [no for w in gpus if (no := _gpu_refusal(params, mode, w))]
    if len(refusals) == len(gpus):  # none fits: the largest GPU's reason
        raise ProblemError(422, "job_too_large", refusals[0], errors=[{
            "field": "steps", "message": refusals[0], "gpu_memory_bytes": gpus[0].gpu_memory,
            "gpu_name": gpus[0].gpu_name, "worker_memory_bytes": gpus[0].memory_total}])
    return settings.cuda_queue


def check_memory(spec: JobSpec, model: Model, settings: Settings) -> str | None:
    """422 when ``spec``'s steps over ``model`` would fit no live worker; the queue the job must go to
    (the CUDA queue for training a model this large), or None for the usual routing."""
    if spec.search is not None or model.format != "hf":
        return None
    fleet = live_fleet(settings.worker_live_s) if settings.worker_heartbeat_s > 0 else Fleet()
    meta = model.meta or {}
    if meta.get("task") == "text-generation" and (queue := _route_training(spec, meta, settings, fleet)):
        return queue
    memory, basis = planned_memory(settings, fleet)
    why = memory_fit.refusal(meta, list(spec.steps), memory)
    if why is None:
        return None
    est = memory_fit.estimate(meta, list(spec.steps), memory)
    assert est is not None
    raise ProblemError(422, "job_too_large", why, errors=[{
        "field": "steps", "message": why, "estimate_bytes": est.peak_bytes, "path": est.path,
        "worker_memory_bytes": memory, "memory_basis": basis, "planned_share": memory_fit.MEMORY_SHARE}])
