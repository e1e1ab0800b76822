"""PrunePass: structured channel pruning through residual/concat couplings of an ONNX-born CNN, unstructured
magnitude pruning, and head/MLP pruning of a tiny BERT that still runs and exports; on causal LMs, the
pass-through decoder layers or dead MLP channels go first and the pruned model reloads with the same outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.spec import PruneStep
from tests import factories_lmtrain as lt
from tests import factories_train as f
from worker import convert, torch_utils
from worker.core import StepFailed, WorkingModel
from worker.formats import hf
from worker.lm import importance
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


# --- causal LMs: decoder layers by block influence, gated-MLP width, magnitude ----------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return lt.tiny_lm(tmp_path_factory.mktemp("llama") / "lm", layers=4)


def _lm_ctx(tmp_path: Path, tok: Any) -> f.MemoryContext:
    train, evald = lt.licence_split(16, 8)
    return f.MemoryContext(tmp_path, f.spec("text-generation"),
                           data={"train": lt.token_dataset(tok, train, 40), "eval": lt.token_dataset(tok, evald, 40)})


def _logits(module: torch.nn.Module, data: Any) -> torch.Tensor:
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in data.inputs.items()}).logits


def _reloads(module: torch.nn.Module, folder: Path, data: Any) -> torch.nn.Module:
    module.save_pretrained(folder)
    reloaded = lt.lm_model(folder).module
    torch.testing.assert_close(_logits(reloaded, data), _logits(module, data))
    return reloaded


@pytest.mark.parametrize(("ratio", "identity"), [(0.25, [2]), (0.5, [1, 3])])
def test_lm_layer_prune_drops_the_redundant_layers(
    llama: tuple[Path, Any], tmp_path: Path, ratio: float, identity: list[int]
) -> None:
    path, tok = llama
    ctx = _lm_ctx(tmp_path, tok)
    model = lt.lm_model(path)
    lt.make_identity(model.module, identity)
    evald = ctx.data["eval"]
    original = _logits(model.module, evald)
    result = PrunePass().run(model, PruneStep(type="prune", ratio=ratio), ctx)  # target auto = layers on an LM
    m = result.metrics
    assert m["target"] == "layers" and m["dropped_layers"] == identity
    assert m["layers_before"] == 4 and m["layers_after"] == 4 - len(identity)
    assert all(m["layer_scores"][i] == pytest.approx(0.0, abs=1e-9) for i in identity)
    assert m["params_after"] < m["params_before"] and m["macs_after"] < m["macs_before"]
    torch.testing.assert_close(_logits(result.model.module, evald), original)  # only pass-through layers went
    assert m["eval_loss_after_prune"] == pytest.approx(m["eval_loss_before_prune"], rel=1e-5)
    reloaded = _reloads(result.model.module, tmp_path / "saved", evald)
    assert reloaded.config.num_hidden_layers == 4 - len(identity)
    progress = [(e["phase"], e["fraction"]) for e in ctx.events if e["kind"] == "progress"]
    assert ("pruning: scoring decoder layers", 0.0) in progress and progress[-1] == ("pruning", 1.0)


def test_lm_layer_prune_of_a_ratio_below_one_layer_fails_clearly(llama: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = llama
    with pytest.raises(StepFailed, match="rounds to no layer") as err:
        PrunePass().run(lt.lm_model(path), PruneStep(type="prune", ratio=0.1, target="layers"), _lm_ctx(tmp_path, tok))
    assert err.value.code == "nothing_to_prune"


def test_lm_width_prune_removes_the_dead_mlp_channels(llama: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = llama
    ctx = _lm_ctx(tmp_path, tok)
    model = lt.lm_model(path)
    dead = torch.arange(0, 128, 2)  # every other channel of each MLP contributes nothing
    with torch.no_grad():
        for block in importance.decoder_layers(model.module):
            block.mlp.gate_proj.weight[dead] = 0
            block.mlp.up_proj.weight[dead] = 0
            block.mlp.down_proj.weight[:, dead] = 0
    evald = ctx.data["eval"]
    original = _logits(model.module, evald)
    result = PrunePass().run(model, PruneStep(type="prune", ratio=0.5, target="width"), ctx)
    m = result.metrics
    assert (m["mlp_width_before"], m["mlp_width_after"]) == (128, 64)
    module = result.model.module
    assert module.config.intermediate_size == 64
    assert all(b.mlp.down_proj.in_features == 64 for b in importance.decoder_layers(module))
    assert m["params_before"] - m["params_after"] == 4 * 3 * 64 * 64  # 3 matrices of 64 x 64 channels per layer
    torch.testing.assert_close(_logits(module, evald), original)  # the l2-weakest channels were the dead ones
    _reloads(module, tmp_path / "saved", evald)


def test_lm_width_prune_taylor_reloads(llama: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = llama
    ctx = _lm_ctx(tmp_path, tok)
    step = PruneStep(type="prune", ratio=0.25, target="width", importance="taylor", round_to=8)
    result = PrunePass().run(lt.lm_model(path), step, ctx)
    assert result.metrics["mlp_width_after"] == 96
    assert all(p.grad is None for p in result.model.module.parameters())
    assert _reloads(result.model.module, tmp_path / "saved", ctx.data["eval"]).config.intermediate_size == 96


def test_lm_width_prune_of_gpt2_says_why_not(tmp_path: Path) -> None:
    path, tok = lt.tiny_lm(tmp_path / "gpt2", kind="gpt2", layers=2)
    with pytest.raises(StepFailed, match="Conv1D") as err:
        PrunePass().run(lt.lm_model(path), PruneStep(type="prune", target="width"), _lm_ctx(tmp_path, tok))
    assert err.value.code == "unsupported_model" and "target: layers" in err.value.message


def test_lm_unstructured_prune_keeps_working(llama: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = llama
    ctx = _lm_ctx(tmp_path, tok)
    result = PrunePass().run(lt.lm_model(path), PruneStep(type="prune", method="unstructured", ratio=0.5), ctx)
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(_logits(result.model.module, ctx.data["eval"])).all()
    assert result.metrics["eval_loss_after_prune"] > 0
    assert "eval_loss_before_prune" in result.metrics
