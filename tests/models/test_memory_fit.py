"""models.memory_fit: the planned peak of LLM jobs on a 24 GB worker, for the sizes people bring."""

from __future__ import annotations

import pytest

from models import memory_fit
from models.spec import JobSpec

GB = 1e9
WORKER = 24 * 1024**3
LLAMA_8B = {"task": "text-generation", "architecture": "LlamaForCausalLM", "parameters": 8_030_261_248}


def _steps(*steps: dict[str, object]) -> list[object]:
    spec = JobSpec.model_validate({"model": "m", "task": "text-generation", "data": {"train": "d"},
                                   "steps": list(steps)})
    return list(spec.steps)


def test_an_8b_llama_int4_is_streamed_within_a_24_gb_worker() -> None:
    est = memory_fit.estimate(LLAMA_8B, _steps({"type": "quantize", "mode": "int4"}), WORKER)
    assert est is not None and est.path == "streamed"
    assert 12 * GB < est.peak_bytes <= memory_fit.MEMORY_SHARE * WORKER  # measured phases project to ~12.5 GB
    assert memory_fit.refusal(LLAMA_8B, _steps({"type": "quantize", "mode": "int4"}), WORKER) is None


@pytest.mark.parametrize(("step", "words"), [
    ({"type": "quantize", "mode": "dynamic"}, ["145 GB", "18 bytes per parameter", "What fits: a single step"]),
    ({"type": "quantize", "mode": "int4", "algorithm": "gptq"}, ["in memory", "What fits"]),
    ({"type": "finetune", "mode": "full"}, ["161 GB", "a CPU worker cannot train a model this large"]),
    ({"type": "finetune", "mode": "lora"}, ["48 GB", "partial/LoRA", "cannot train"]),
])
def test_what_cannot_fit_says_why_and_what_would(step: dict[str, object], words: list[str]) -> None:
    why = memory_fit.refusal(LLAMA_8B, _steps(step), WORKER)
    assert why is not None and "workers have 26 GB" in why
    assert all(w in why for w in words), why


def test_small_models_and_other_uploads_are_not_estimated() -> None:
    small = {**LLAMA_8B, "parameters": 100_000_000}
    assert memory_fit.refusal(small, _steps({"type": "finetune", "mode": "full"}), WORKER) is None
    assert memory_fit.estimate({"task": "text-classification", "parameters": 10**10}, [], WORKER) is None
    assert memory_fit.in_memory_fits(300_000_000, WORKER) and not memory_fit.in_memory_fits(1_200_000_000, WORKER)
