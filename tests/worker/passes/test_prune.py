"""PrunePass: structured channel pruning through residual/concat couplings of an ONNX-born CNN, unstructured
magnitude pruning, and head/MLP pruning of a tiny BERT that still runs and exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.spec import PruneStep
from tests import factories_train as f
from worker import convert, torch_utils
from worker.formats import hf
from worker.passes.base import WorkingModel
from worker.passes.prune import PrunePass


def _cnn(tmp_path: Path) -> tuple[f.MemoryContext, WorkingModel]:
    path, _ = f.cnn_onnx()
    train, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"train": train, "eval": evald})
    return ctx, convert.to_torch(f.onnx_model(path), ctx)


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_structured_half_channels_on_onnx_residual_cnn(tmp_path: Path, importance: str) -> None:
    ctx, model = _cnn(tmp_path)
    _, evald = f.digits()
    step = PruneStep(type="prune", method="structured", ratio=0.5, importance=importance)
    result = PrunePass().run(model, step, ctx)
    m = result.metrics
    assert m["params_after"] <= 0.6 * m["params_before"], m  # channels halve -> params fall ~quadratically
    assert m["macs_after"] < 0.6 * m["macs_before"]
    out = torch_utils.predict(torch_utils.interface(result.model), evald.take(8), ["input"], "cpu")
    assert out.shape == (8, 10)
    assert "accuracy_after_prune" in m
    # the pruned model still exports with a dynamic batch and matches torch
    onnx_model = convert.to_onnx(result.model, ctx, 17, name="pruned")
    assert onnx_model.meta["parity"]["max_abs_diff"] < 1e-3


def test_skip_layers_are_left_alone(tmp_path: Path) -> None:
    ctx, model = _cnn(tmp_path)
    convs = [n for n, mod in model.module.named_modules() if type(mod).__name__ == "Conv2d"]
    skip = convs[-1]
    before = model.module.get_submodule(skip).out_channels
    step = PruneStep(type="prune", ratio=0.5, skip_layers=[skip])
    result = PrunePass().run(model, step, ctx)
    assert result.model.module.get_submodule(skip).out_channels == before


@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_unstructured_reaches_sparsity(tmp_path: Path, scope: str) -> None:
    ctx, model = _cnn(tmp_path)
    step = PruneStep(type="prune", method="unstructured", ratio=0.7, scope=scope)
    result = PrunePass().run(model, step, ctx)
    assert result.metrics["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert result.metrics["params_after"] == result.metrics["params_before"]
    assert "no speed" in result.metrics["note"]
    weights = [mod.weight for mod in result.model.module.modules() if hasattr(mod, "weight_orig")]
    assert weights == []  # prune.remove made it permanent


def test_bert_heads_and_mlp_pruned_still_runs_and_exports(tmp_path: Path) -> None:
    archive = f.tiny_bert_archive(tmp_path)
    model = hf.load(archive, {}, tmp_path / "work")
    rows = f.sentences(24)
    from worker.formats import text

    jsonl = f.write_jsonl(tmp_path / "t.jsonl", rows)
    spec = f.spec("text-classification", text={"max_length": 16})
    data = text.load(jsonl, {}, model, spec, tmp_path)
    ctx = f.MemoryContext(tmp_path, spec, data={"eval": data, "train": data})
    before = torch_utils.predict(torch_utils.interface(model), data, model.input_names, "cpu").shape
    result = PrunePass().run(model, PruneStep(type="prune", ratio=0.5), ctx)
    m = result.metrics
    assert m["heads_per_layer"] == [2, 2, 2, 2]
    assert m["mlp_width_per_layer"] == [32, 32, 32, 32]
    config = result.model.module.config
    assert config.num_attention_heads == 2 and config.intermediate_size == 32 and config.hidden_size == 32
    assert m["params_after"] < m["params_before"]
    after = torch_utils.predict(torch_utils.interface(result.model), data, model.input_names, "cpu")
    assert after.shape == before and np.isfinite(after).all()
    exported = convert.to_onnx(result.model, ctx, 17, name="bert-pruned")
    assert exported.meta["parity"]["max_abs_diff"] < 1e-3
