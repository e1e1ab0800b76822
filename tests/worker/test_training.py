"""worker.training: warm-up + cosine schedule, AdamW groups, early stopping restoring the best weights,
cancellation within a few batches, seeded reproducibility, per-epoch progress and curve."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.spec import TrainingParams
from tests import factories_train as f
from worker import training
from worker.core import ArrayDataset, JobCancelled, StepFailed


def test_schedule_warms_up_then_decays_to_zero() -> None:
    lrs = [training.cosine_with_warmup(s, 10, 100) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-9)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert training.cosine_with_warmup(0, 0, 10) == 1.0


def test_no_weight_decay_on_bias_and_norm() -> None:
    module = f.residual_cnn()
    groups = training.param_groups(module, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert id(module.fc.weight) in decayed and id(module.fc.bias) not in decayed
    assert id(module.stem[1].weight) not in decayed  # BatchNorm weight


def _linear_setup(
    tmp_path: Path, cancel_after: int | None = None
) -> tuple[Any, f.MemoryContext, ArrayDataset]:
    import torch

    torch.manual_seed(0)
    train, _ = f.digits()
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    ctx = f.MemoryContext(tmp_path, f.spec(), cancel_after=cancel_after)
    return module, ctx, train


def _ce(module: Any) -> training.LossFn:
    import torch.nn.functional as F

    return lambda b: F.cross_entropy(module(b["input"]), b["labels"])


def test_early_stopping_restores_best(tmp_path: Path) -> None:
    import torch

    module, ctx, train = _linear_setup(tmp_path)
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95])
    snapshots: list[torch.Tensor] = []

    def eval_fn() -> dict[str, float]:
        snapshots.append(module[1].weight.detach().clone())
        return {"accuracy": next(scores)}

    params = TrainingParams(epochs=5, batch_size=64, lr=1e-2, early_stopping_patience=2)
    out = training.train(module, params, ctx, train, ["input"], _ce(module), eval_fn)
    assert out.stopped_early and out.epochs_run == 4
    assert out.best_epoch == 2 and out.best_metric == 0.9
    assert torch.equal(module[1].weight, snapshots[1])
    assert [c["epoch"] for c in out.curve] == [1, 2, 3, 4]
    assert {"loss", "eval_metric", "lr"} <= set(out.curve[0])
    phases = [e["phase"] for e in ctx.events if e["kind"] == "progress"]
    assert phases == [f"training epoch {i}/5" for i in range(1, 5)]


def test_early_stopping_on_a_loss_keeps_the_lowest(tmp_path: Path) -> None:
    import torch

    module, ctx, train = _linear_setup(tmp_path)
    losses = iter([2.0, 1.2, 1.5, 1.4, 0.5])
    snapshots: list[torch.Tensor] = []

    def eval_fn() -> dict[str, float]:
        snapshots.append(module[1].weight.detach().clone())
        return {"eval_loss": next(losses)}

    params = TrainingParams(epochs=5, batch_size=64, lr=1e-2, early_stopping_patience=2)
    out = training.train(
        module, params, ctx, train, ["input"], _ce(module), eval_fn, metric="eval_loss", higher_is_better=False
    )
    assert out.stopped_early and out.epochs_run == 4
    assert out.best_epoch == 2 and out.best_metric == 1.2
    assert torch.equal(module[1].weight, snapshots[1])
    assert [c["eval_metric"] for c in out.curve] == [2.0, 1.2, 1.5, 1.4]


def test_checkpointing_only_on_cuda(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.factories_lm import tiny_lm_dir

    module = AutoModelForCausalLM.from_pretrained(tiny_lm_dir(tmp_path / "lm", layers=1, tokenizer=False))
    with training.checkpointing(module, "cpu") as enabled:
        assert not enabled and not module.is_gradient_checkpointing
    if not __import__("torch").cuda.is_available():
        return
    with training.checkpointing(module.cuda(), "cuda") as enabled:
        assert enabled and module.is_gradient_checkpointing
    assert not module.is_gradient_checkpointing


def test_training_lowers_loss_and_is_seeded(tmp_path: Path) -> None:
    import torch

    params = TrainingParams(epochs=3, batch_size=32, lr=1e-2, grad_accum=2, warmup_ratio=0.2)
    weights = []
    for _ in range(2):
        module, ctx, train = _linear_setup(tmp_path)
        out = training.train(module, params, ctx, train, ["input"], _ce(module))
        weights.append(module[1].weight.detach().clone())
        assert out.curve[-1]["loss"] < out.curve[0]["loss"]
        assert out.steps == 3 * math.ceil(math.ceil(1200 / 32) / 2)
        assert out.curve[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(weights[0], weights[1])


def test_max_steps_caps_optimizer_steps(tmp_path: Path) -> None:
    module, ctx, train = _linear_setup(tmp_path)
    params = TrainingParams(epochs=5, batch_size=64, max_steps=7)
    out = training.train(module, params, ctx, train, ["input"], _ce(module))
    assert out.steps == 7 and out.epochs_run == 1


def test_cancellation_within_a_few_batches(tmp_path: Path) -> None:
    module, ctx, train = _linear_setup(tmp_path, cancel_after=2)
    batches = 0
    ce = _ce(module)

    def counting(batch: dict[str, Any]) -> Any:
        nonlocal batches
        batches += 1
        return ce(batch)

    params = TrainingParams(epochs=3, batch_size=8)
    with pytest.raises(JobCancelled):
        training.train(module, params, ctx, train, ["input"], counting)
    assert batches <= 2 * training.CANCEL_EVERY


def test_carve_validation_is_seeded_disjoint_and_sized() -> None:
    train, _ = f.digits()
    rest, val = training.carve_validation(train, seed=3)
    assert len(val) == 120 and len(rest) == 1080
    again_val = training.carve_validation(train, seed=3)[1]
    assert np.array_equal(val.inputs["input"], again_val.inputs["input"])
    rows = {r.tobytes() for r in train.inputs["input"]}
    assert {r.tobytes() for r in val.inputs["input"]} <= rows
    assert val.labels is not None and rest.labels is not None and val.classes == train.classes
    other = training.carve_validation(train, seed=4)[1]
    assert not np.array_equal(val.inputs["input"], other.inputs["input"])
    small = train.take(50)
    assert len(training.carve_validation(train.take(400), seed=0)[1]) == 40
    with pytest.raises(StepFailed) as err:
        training.carve_validation(small, seed=0)  # 32 to validate would leave 18 to train on
    assert err.value.code == "too_little_data"


def test_budget_stops_at_the_first_epoch_it_holds(tmp_path: Path) -> None:
    module, ctx, train = _linear_setup(tmp_path)
    scores = iter([0.5, 0.8, 0.91, 0.99, 0.99])
    params = TrainingParams(epochs=2, batch_size=64, lr=1e-2, until={"max_accuracy_drop": 0.05}, max_epochs=5)
    budget = training.Budget(reference=0.95, max_drop=0.05)
    out = training.train(
        module, params, ctx, train, ["input"], _ce(module), lambda: {"accuracy": next(scores)}, budget=budget
    )
    assert out.budget_held is True and out.stopped_early and out.epochs_run == 3
    assert out.best_epoch == 3 and out.best_metric == 0.91
    phases = [e["phase"] for e in ctx.events if e["kind"] == "progress"]
    assert phases == [f"training epoch {i}/5" for i in range(1, 4)]  # max_epochs, not epochs


def test_budget_that_never_holds_runs_max_epochs_and_restores_best(tmp_path: Path) -> None:
    import torch

    module, ctx, train = _linear_setup(tmp_path)
    scores = iter([0.5, 0.8, 0.6])
    snapshots: list[torch.Tensor] = []

    def eval_fn() -> dict[str, float]:
        snapshots.append(module[1].weight.detach().clone())
        return {"accuracy": next(scores)}

    params = TrainingParams(batch_size=64, lr=1e-2, until={"max_accuracy_drop": 0.01}, max_epochs=3)
    budget = training.Budget(reference=0.95, max_drop=0.01)
    out = training.train(module, params, ctx, train, ["input"], _ce(module), eval_fn, budget=budget)
    assert out.budget_held is False and not out.stopped_early and out.epochs_run == 3
    assert out.best_epoch == 2 and torch.equal(module[1].weight, snapshots[1])
    assert any(e.get("message") == "training: budget did not hold" for e in ctx.events)


def test_until_spec_validation() -> None:
    assert TrainingParams(until={"max_accuracy_drop": 0.02}, max_epochs=7).planned_epochs() == 7
    assert TrainingParams(epochs=4, until={"max_accuracy_drop": 0.02}).planned_epochs() == 4
    assert TrainingParams(epochs=4).planned_epochs() == 4
    with pytest.raises(ValueError, match="max_epochs applies with until only"):
        TrainingParams(max_epochs=3)
    with pytest.raises(ValueError):
        TrainingParams(until={})


def test_until_s_baseline_run_of_a_looping_graph_fails_with_run_time_limit(tmp_path: Path, run_cap_1s: float) -> None:
    from tests.factories_onnx import INPUT
    from tests.worker.conftest import looping_context

    ctx = looping_context(tmp_path / "work")
    data = ArrayDataset({INPUT: np.ones((8, 4), np.float32)}, np.zeros(8, np.int64))
    with pytest.raises(StepFailed) as failed:
        training.input_accuracy(ctx, data)
    assert failed.value.code == "run_time_limit" and "(until's baseline accuracy)" in failed.value.message
