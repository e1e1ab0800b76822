"""Where a causal LM trains: a CPU worker refuses a model from the limit (fine-tune and distillation alike,
naming the size and the limit); the plan's dtype is applied; a 4-bit base without bitsandbytes says what is
missing. The CUDA runs themselves are in bench/gpu_check.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import memory_fit
from models.settings import get_settings
from models.spec import DistillStep, FinetuneStep
from tests import factories_lmtrain as lt
from tests import factories_train as f
from tests.factories_lm import licence_paragraphs
from worker.core import StepFailed, WorkingModel
from worker.passes.distill import DistillPass
from worker.passes.finetune import FinetunePass
from worker.passes.lm_device import place
from worker.torch_utils import count_params


@pytest.fixture
def limit_1000(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MODELPRESS_CPU_TRAIN_MAX_PARAMS", "1000")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _lm(tmp_path: Path) -> tuple[f.MemoryContext, WorkingModel]:
    path, tok = lt.tiny_lm(tmp_path / "lm", layers=1)
    data = lt.token_dataset(tok, licence_paragraphs(("GPL-3",))[:8], 32)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"), data={"train": data},
                          models={"input": lambda: lt.lm_model(path)})
    return ctx, lt.lm_model(path)


def test_a_cpu_worker_refuses_training_a_model_from_the_limit(tmp_path: Path, limit_1000: None) -> None:
    ctx, model = _lm(tmp_path)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    params = count_params(model.module)
    for step, run in ((FinetuneStep(type="finetune", mode="lora", epochs=1), FinetunePass().run),
                      (DistillStep(type="distill", teacher="input", epochs=1), DistillPass().run)):
        with pytest.raises(StepFailed) as err:
            run(model, step, ctx)  # type: ignore[operator]
        assert err.value.code == "model_too_large"
        assert f"{params / 1e9:.2f} B parameters, the limit is 0.00 B" in err.value.message
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())  # nothing trained


def test_under_the_limit_a_cpu_trains_in_fp32(tmp_path: Path) -> None:
    ctx, model = _lm(tmp_path)
    result = FinetunePass().run(model, FinetuneStep(type="finetune", mode="lora", epochs=1, batch_size=4), ctx)
    m = result.metrics
    assert (m["device"], m["dtype"], m["base_4bit"]) == ("cpu", "float32", False)
    assert m["planned_peak_bytes"] == m["total_params"] * memory_fit.TRAIN_PARTIAL_BYTES_PER_PARAM
    assert {p.dtype for p in result.model.module.parameters()} == {torch.float32}


def test_a_bf16_plan_trains_a_twin_and_merges_the_updates_into_the_fp32_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA LoRA flow with its bf16 plan, run on the CPU (bf16 is the plan's business, not the device's)."""
    import worker.passes.finetune as finetune

    ctx, model = _lm(tmp_path)
    ctx.data["eval"] = ctx.data["train"]
    original = model.module
    before = {k: v.clone() for k, v in original.state_dict().items()}
    bf16 = memory_fit.TrainingPlan("cuda", "bfloat16", True, False, 1, "test")
    monkeypatch.setattr(finetune, "plan_for", lambda *_: bf16)
    step = FinetuneStep(type="finetune", mode="lora", epochs=3, batch_size=4, lr=5e-2)
    result = FinetunePass().run(model, step, ctx)
    m = result.metrics
    assert result.model.module is original and m["dtype"] == "bfloat16"
    assert {p.dtype for p in original.parameters()} == {torch.float32}
    assert m["eval_loss_after"] < m["eval_loss_before"]
    targets = set(m["lora_targets"])
    assert targets and all(t.endswith(("q_proj", "v_proj")) for t in targets)
    for key, value in original.state_dict().items():
        if key.rsplit(".", 1)[0] in targets and key.endswith(".weight"):
            delta = (value - before[key]).double()
            sv = torch.linalg.svdvals(delta)
            assert sv[0] > 1e-4 and sv[step.lora.r] < 1e-4 * sv[0], key  # a rank-r update added in fp32
        else:
            assert torch.equal(value, before[key]), key  # exactly as it was: no bf16 rounding came back


def test_place_keeps_the_original_and_names_a_missing_bitsandbytes(tmp_path: Path) -> None:
    _, model = _lm(tmp_path)
    bf16 = memory_fit.TrainingPlan("cuda", "bfloat16", True, False, 1, "test")
    twin = place(model.module, bf16, "cpu")
    assert twin is not model.module and {p.dtype for p in twin.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        ref, got = model.module(input_ids=ids).logits, twin(input_ids=ids).logits.float()
    assert torch.allclose(got, ref, atol=0.05 * float(ref.abs().max())), float((got - ref).abs().max())
    def tied(m: torch.nn.Module) -> bool:
        return m.get_output_embeddings().weight is m.get_input_embeddings().weight  # type: ignore[operator]

    assert tied(twin) == tied(model.module)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        four = memory_fit.TrainingPlan("cuda", "bfloat16", True, True, 1, "test")
        with pytest.raises(StepFailed, match="needs bitsandbytes on the worker") as err:
            place(model.module, four, "cpu")
        assert err.value.code == "model_too_large"
