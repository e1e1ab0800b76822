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
    gptq = memory_fit.estimate(LLAMA_8B, _steps({"type": "quantize", "mode": "int4", "algorithm": "gptq"}), WORKER)
    assert gptq is not None and gptq.path == "streamed"  # GPTQ streams too: its Hessians one layer at a time


@pytest.mark.parametrize(("step", "words"), [
    ({"type": "quantize", "mode": "dynamic"}, ["145 GB", "18 bytes per parameter", "What fits: a single step"]),
    ({"type": "quantize", "mode": "int4", "algorithm": "hqq"}, ["in memory", "What fits"]),
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


B = 1_000_000_000
GIB = 1024**3


@pytest.mark.parametrize(("params", "mode", "gpu", "want"), [
    # (params, mode, GPU memory) -> (dtype, 4-bit base): the first plan that fits 60 % of the GPU
    (int(8 * B), "lora", 80 * GIB, ("bfloat16", False)),  # 8 B on an H100: bf16 base, 22 GB
    (int(8 * B), "lora", 24 * GIB, ("bfloat16", True)),  # 8 B on a 24 GB card: QLoRA, 8 GB
    (int(1.2 * B), "lora", 24 * GIB, ("bfloat16", False)),
    (int(0.5 * B), "lora", 24 * GIB, ("float32", False)),  # under 1 B: fp32 as before
    (int(1.2 * B), "full", 80 * GIB, ("float32", False)),  # trained weights stay fp32
    (int(1.2 * B), "last_n", 24 * GIB, ("float32", False)),
])
def test_training_plan_on_cuda(params: int, mode: str, gpu: int, want: tuple[str, bool]) -> None:
    plan = memory_fit.training_plan(params, mode, cuda=True, gpu_memory=gpu)
    assert isinstance(plan, memory_fit.TrainingPlan), plan
    assert (plan.dtype, plan.base_4bit) == want and plan.device == "cuda" and plan.checkpointing
    assert plan.peak_bytes <= memory_fit.MEMORY_SHARE * gpu


def test_training_plan_refuses_what_fits_no_gpu_and_says_what_would() -> None:
    full = memory_fit.training_plan(int(8 * B), "full", cuda=True, gpu_memory=80 * GIB)
    assert isinstance(full, str) and "needs about 146 GB of GPU memory" in full and "LoRA (mode lora" in full
    lora = memory_fit.training_plan(int(70 * B), "lora", cuda=True, gpu_memory=24 * GIB)
    assert isinstance(lora, str) and "needs about 55 GB" in lora and "LoRA (mode" not in lora  # the QLoRA figure


def test_a_cpu_trains_under_the_limit_and_refuses_from_it_naming_both() -> None:
    small = memory_fit.training_plan(int(0.5 * B), "lora", cuda=False)
    assert isinstance(small, memory_fit.TrainingPlan) and (small.device, small.dtype) == ("cpu", "float32")
    assert small.peak_bytes == int(0.5 * B) * memory_fit.TRAIN_PARTIAL_BYTES_PER_PARAM and not small.checkpointing
    big = memory_fit.training_plan(int(1.24 * B), "lora", cuda=False)
    assert big == ("a CPU worker does not train a model this large: 1.24 B parameters, the limit is 1.00 B "
                   "(training at this size runs on a GPU worker)")
    assert isinstance(memory_fit.training_plan(5000, "full", cuda=False, cpu_max_params=5000), str)
