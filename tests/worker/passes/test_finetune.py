"""FinetunePass: full fine-tuning recovers a pruned CNN; head mode with a new label set; last-N; LoRA trains
only adapters (and the head) and merges into a plain module that exports; on causal LMs full and LoRA
fine-tuning lower the eval loss (LoRA adapting to a new domain with low-rank updates of its targets only)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.spec import FinetuneStep, PruneStep
from tests import factories_lmtrain as lt
from tests import factories_train as f
from tests.factories_lm import licence_paragraphs, prompt_rows
from worker import convert, metrics, torch_utils, training
from worker.core import JobCancelled, StepFailed, WorkingModel
from worker.formats import hf, text
from worker.lm.objectives import eval_loss
from worker.passes.finetune import FinetunePass, classification_loss, head_name, lora_wrap
from worker.passes.prune import PrunePass


def _pruned_cnn(tmp_path: Path) -> tuple[f.MemoryContext, WorkingModel, float]:
    path, _ = f.cnn_onnx()
    train, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"train": train, "eval": evald})
    model = convert.to_torch(f.onnx_model(path), ctx)
    pruned = PrunePass().run(model, PruneStep(type="prune", ratio=0.5), ctx)
    return ctx, pruned.model, pruned.metrics["accuracy_after_prune"]


def test_full_finetune_recovers_pruned_cnn(tmp_path: Path) -> None:
    ctx, model, after_prune = _pruned_cnn(tmp_path)
    _, input_acc = f.cnn_onnx()
    step = FinetuneStep(type="finetune", epochs=5, batch_size=32, lr=3e-3)
    result = FinetunePass().run(model, step, ctx)
    acc = metrics.torch_metric(result.model, f.digits()[1], ctx.spec)["accuracy"]
    print(f"input {input_acc:.3f} pruned {after_prune:.3f} finetuned {acc:.3f}")
    assert acc >= 0.88 and acc > after_prune + 0.3
    assert acc == pytest.approx(result.metrics["best_accuracy"])
    assert len(result.curve) == 5 and result.metrics["trainable_params"] == result.metrics["total_params"]
    onnx_model = convert.to_onnx(result.model, ctx, 17, name="ft")
    assert onnx_model.meta["parity"]["top1_agreement"] == 1.0


def test_head_mode_with_new_label_set(tmp_path: Path) -> None:
    path, _ = f.cnn_onnx()
    train, evald = f.digits()
    parity = lambda d: f.ArrayDataset(d.inputs, d.labels % 2, ["even", "odd"])  # noqa: E731
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"train": parity(train), "eval": parity(evald)})
    model = convert.to_torch(f.onnx_model(path), ctx)
    head = head_name(model, torch_utils.example_inputs(model, train, "cpu"))
    frozen = {k: v.clone() for k, v in model.module.state_dict().items() if not k.startswith(head)}
    step = FinetuneStep(type="finetune", mode="head", num_labels=2, epochs=3, lr=1e-2)
    result = FinetunePass().run(model, step, ctx)
    out = torch_utils.predict(torch_utils.interface(result.model), evald.take(5), ["input"], "cpu")
    assert out.shape == (5, 2)
    assert result.metrics["new_head"] == {"from": 10, "to": 2}
    assert result.metrics["trainable_params"] == 2 * result.model.module.get_submodule(head).in_features + 2
    state = result.model.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert result.metrics["best_accuracy"] > 0.8  # odd/even from frozen digit features


def _bert(tmp_path: Path) -> tuple[f.MemoryContext, WorkingModel]:
    model = hf.load(f.tiny_bert_archive(tmp_path), {}, tmp_path / "work")
    spec = f.spec("text-classification", text={"max_length": 16})
    train = text.load(
        f.write_jsonl(tmp_path / "train.jsonl", f.sentences(240, seed=1)), {}, model, spec, tmp_path
    )
    evald = text.load(
        f.write_jsonl(tmp_path / "eval.jsonl", f.sentences(60, seed=2)), {}, model, spec, tmp_path
    )
    return f.MemoryContext(tmp_path, spec, data={"train": train, "eval": evald}), model


def test_full_finetune_trains_tiny_bert(tmp_path: Path) -> None:
    ctx, model = _bert(tmp_path)
    step = FinetuneStep(type="finetune", epochs=4, batch_size=16, lr=2e-3)
    result = FinetunePass().run(model, step, ctx)
    assert result.metrics["best_accuracy"] >= 0.9


def test_last_n_unfreezes_only_last_layers(tmp_path: Path) -> None:
    ctx, model = _bert(tmp_path)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    step = FinetuneStep(type="finetune", mode="last_n", last_n=1, epochs=1, batch_size=32)
    result = FinetunePass().run(model, step, ctx)
    after = result.model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("bert.encoder.layer.3.") for k in changed)
    assert "classifier.weight" in changed
    assert not any(k.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for k in changed)


def test_lora_changes_only_adapters_then_merges_and_exports(tmp_path: Path) -> None:
    ctx, model = _bert(tmp_path)
    base = {k: v.clone() for k, v in model.module.state_dict().items()}
    step = FinetuneStep(type="finetune", mode="lora", epochs=2, batch_size=16, lr=5e-3)
    peft_model = lora_wrap(model, step, "classifier")
    wm = replace(model, module=peft_model)
    wrapper = torch_utils.interface(wm)
    training.train(
        wrapper, step, ctx, ctx.data["train"], wm.input_names, classification_loss(wrapper, wm.input_names)
    )
    changed, unchanged = set(), set()
    for key, value in peft_model.state_dict().items():
        original = key.replace("base_model.model.", "").replace(".base_layer", "")
        original = original.replace(".modules_to_save.default", "").replace(".original_module", "")
        if original in base and torch.equal(base[original], value):
            unchanged.add(key)
        else:
            changed.add(key)
    assert changed and all("lora_" in k or "modules_to_save" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)
    assert any("query.base_layer.weight" in k for k in unchanged)
    merged = peft_model.merge_and_unload()
    assert not any("lora" in k for k in merged.state_dict())
    merged_state = merged.state_dict()
    assert not torch.equal(
        merged_state["bert.encoder.layer.0.attention.self.query.weight"],
        base["bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert torch.equal(
        merged_state["bert.encoder.layer.0.attention.self.key.weight"],
        base["bert.encoder.layer.0.attention.self.key.weight"],
    )
    exported = convert.to_onnx(replace(model, module=merged), ctx, 17, name="lora")
    assert exported.meta["parity"]["max_abs_diff"] < 1e-3


def test_lora_pass_returns_plain_merged_module(tmp_path: Path) -> None:
    ctx, model = _bert(tmp_path)
    step = FinetuneStep(type="finetune", mode="lora", epochs=1, batch_size=32)
    result = FinetunePass().run(model, step, ctx)
    assert type(result.model.module).__name__ == "BertForSequenceClassification"
    assert result.metrics["trainable_params"] < 0.2 * result.metrics["total_params"]
    out = torch_utils.predict(torch_utils.interface(result.model), ctx.data["eval"], result.model.input_names, "cpu")
    assert out.shape == (60, 3) and np.isfinite(out).all()


# --- causal LMs (task text-generation): the model's own LM loss on labelled tokens ---------------------------

@dataclass(frozen=True)
class _Pretrained:
    """A tiny Llama fully fine-tuned on GPL-3 text: the result, the model before, and the tokenizer."""

    result: Any
    before: dict[str, torch.Tensor]
    eval_before: float
    tok: Any
    path: Path


@pytest.fixture(scope="module")
def gpl_llama(tmp_path_factory: pytest.TempPathFactory) -> _Pretrained:
    tmp = tmp_path_factory.mktemp("gpl")
    path, tok = lt.tiny_lm(tmp / "lm", layers=4)
    gpl = licence_paragraphs(("GPL-3",))
    evald = lt.token_dataset(tok, gpl[80:], 48)
    ctx = f.MemoryContext(tmp, f.spec("text-generation"), data={"train": lt.token_dataset(tok, gpl[:64], 48),
                                                              "eval": evald})
    model = lt.lm_model(path)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    eval_before = eval_loss(model.module, evald, "cpu")["eval_loss"]
    step = FinetuneStep(type="finetune", mode="full", epochs=4, batch_size=8, lr=1e-2)
    return _Pretrained(FinetunePass().run(model, step, ctx), before, eval_before, tok, path)


def test_full_finetune_lowers_lm_eval_loss(gpl_llama: _Pretrained) -> None:
    result = gpl_llama.result
    m = result.metrics
    print(f"full fine-tune eval loss {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}")
    assert m["eval_loss_before"] == pytest.approx(gpl_llama.eval_before)
    assert m["eval_loss_after"] < 0.93 * m["eval_loss_before"]
    assert m["trainable_params"] == m["total_params"] == torch_utils.count_params(result.model.module)
    assert [c["epoch"] for c in result.curve] == [1, 2, 3, 4]
    assert all({"loss", "eval_metric", "eval_loss", "perplexity", "lr"} <= set(c) for c in result.curve)
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]
    assert m["eval_loss_after"] == pytest.approx(min(c["eval_loss"] for c in result.curve))  # best kept
    assert m["gradient_checkpointing"] is False  # CPU


def test_lora_adapts_to_a_new_domain_and_trains_only_adapters(gpl_llama: _Pretrained, tmp_path: Path) -> None:
    base = copy.deepcopy(gpl_llama.result.model)
    base_state = {k: v.clone() for k, v in base.module.state_dict().items()}
    upper = [p.upper() for p in licence_paragraphs(("Apache-2.0",))]  # a domain the base has not seen
    evald = lt.token_dataset(gpl_llama.tok, upper[18:], 48)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"),
                          data={"train": lt.token_dataset(gpl_llama.tok, upper[:18], 48), "eval": evald})
    step = FinetuneStep(type="finetune", mode="lora", epochs=3, batch_size=4, lr=2e-2)
    result = FinetunePass().run(base, step, ctx)
    before = eval_loss(lt.lm_model(gpl_llama.path).module, evald, "cpu")
    after = eval_loss(result.model.module, evald, "cpu")
    print(f"LoRA on the new domain: perplexity {math.exp(result.metrics['eval_loss_before']):.1f} -> "
          f"{after['perplexity']:.1f} (untrained {before['perplexity']:.1f})")
    assert after["eval_loss"] == pytest.approx(result.metrics["eval_loss_after"], rel=1e-6)
    assert after["perplexity"] < 0.5 * math.exp(result.metrics["eval_loss_before"])

    assert type(result.model.module).__name__ == "LlamaForCausalLM"
    state = result.model.module.state_dict()
    assert set(state) == set(base_state)  # merged: no adapter tensors left
    targets = result.metrics["lora_targets"]
    assert sorted(t.rsplit(".", 1)[-1] for t in targets) == sorted(["q_proj", "v_proj"] * 4)  # Llama default
    r = step.lora.r
    for key, value in state.items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in targets and key.endswith(".weight"):
            delta = (value - base_state[key]).double()
            sv = torch.linalg.svdvals(delta)
            assert sv[0] > 1e-3 and sv[r] < 1e-4 * sv[0], (key, sv[: r + 2])  # a rank-r update, merged in fp32
        else:
            assert torch.equal(value, base_state[key]), key  # frozen
    per_layer = r * (64 + 64) + r * (64 + 32)  # q_proj 64->64, v_proj 64->32 (2 kv heads of 16)
    assert result.metrics["trainable_params"] == 4 * per_layer


def test_lm_finetune_is_cancellable(gpl_llama: _Pretrained, tmp_path: Path) -> None:
    data = lt.token_dataset(gpl_llama.tok, licence_paragraphs(("GPL-3",))[:64], 32)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"), data={"train": data}, cancel_after=2)
    with pytest.raises(JobCancelled):
        FinetunePass().run(lt.lm_model(gpl_llama.path), FinetuneStep(type="finetune", epochs=3, batch_size=4), ctx)
    assert ctx.cancel_checks == 3  # inside the first epoch, every few batches


def test_lm_finetune_refuses_num_labels(gpl_llama: _Pretrained, tmp_path: Path) -> None:
    data = lt.token_dataset(gpl_llama.tok, ["Everyone is permitted to copy."], 16)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"), data={"train": data})
    with pytest.raises(StepFailed, match="num_labels") as err:
        FinetunePass().run(lt.lm_model(gpl_llama.path), FinetuneStep(type="finetune", num_labels=3), ctx)
    assert err.value.code == "invalid_step"


def test_lora_on_gpt2_adapts_its_conv1d_attention_and_merges(tmp_path: Path) -> None:
    path, tok = lt.tiny_lm(tmp_path / "gpt2", kind="gpt2", layers=2)
    data = lt.prompt_dataset(tok, prompt_rows(12), 32)  # loss on the completions only
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"), data={"train": data, "eval": data})
    base = lt.lm_model(path)
    before = {k: v.clone() for k, v in base.module.state_dict().items()}
    step = FinetuneStep(type="finetune", mode="lora", epochs=2, batch_size=4, lr=2e-2)
    result = FinetunePass().run(base, step, ctx)
    assert type(result.model.module).__name__ == "GPT2LMHeadModel"
    assert result.metrics["lora_targets"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    state = result.model.module.state_dict()
    changed = sorted(k for k in before if not torch.equal(state[k], before[k]))
    assert changed == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]


def test_lm_finetune_without_eval_data_trains_the_last_layer(gpl_llama: _Pretrained, tmp_path: Path) -> None:
    data = lt.token_dataset(gpl_llama.tok, licence_paragraphs(("GPL-3",))[:16], 32)
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"), data={"train": data})
    model = lt.lm_model(gpl_llama.path)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    step = FinetuneStep(type="finetune", mode="last_n", last_n=1, epochs=2, batch_size=8, lr=1e-2)
    result = FinetunePass().run(model, step, ctx)
    assert "eval_loss_after" not in result.metrics and result.metrics["best_eval_loss"] is None
    assert [c["eval_metric"] for c in result.curve] == [None, None] and result.curve[1]["loss"] < result.curve[0]["loss"]
    changed = {k.split(".")[2] if k.startswith("model.layers.") else k for k, v in
               result.model.module.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"3", "model.norm.weight", "lm_head.weight"}  # the last decoder layer, final norm, head


@dataclass
class _RolesContext(f.MemoryContext):
    """A MemoryContext that records which data roles a pass asks for."""

    roles: list[str] = field(default_factory=list)

    def dataset(self, role: str, model: WorkingModel) -> Any:
        self.roles.append(role)
        return super().dataset(role, model)


def _pruned_cnn_with_input(tmp_path: Path) -> tuple[_RolesContext, WorkingModel, float]:
    """A pruned CNN whose context serves the unpruned input and an eval set with scrambled labels (a
    stopping rule that read it would never see the budget hold)."""
    path, _ = f.cnn_onnx()
    train, evald = f.digits()
    scrambled = f.ArrayDataset(evald.inputs, np.roll(evald.labels, 1), evald.classes)
    ctx = _RolesContext(
        tmp_path, f.spec(), data={"train": train, "eval": scrambled}, models={"input": lambda: f.onnx_model(path)}
    )
    pruned = PrunePass().run(convert.to_torch(f.onnx_model(path), ctx), PruneStep(type="prune", ratio=0.5), ctx)
    ctx.roles.clear()
    return ctx, pruned.model, pruned.metrics["accuracy_after_prune"]


def test_until_recovers_to_the_budget_and_stops_early_without_the_eval_set(tmp_path: Path) -> None:
    ctx, model, after_prune = _pruned_cnn_with_input(tmp_path)
    _, input_acc = f.cnn_onnx()
    step = FinetuneStep(
        type="finetune", batch_size=32, lr=3e-3, until={"max_accuracy_drop": 0.05}, max_epochs=12
    )
    result = FinetunePass().run(model, step, ctx)
    m = result.metrics
    print(f"input {input_acc:.3f} pruned {after_prune:.3f} -> {m['budget']} in {m['epochs_run']} epochs")
    assert "eval" not in ctx.roles and "train" in ctx.roles
    assert m["budget_held"] is True and m["stopped_early"] and m["epochs_run"] < 12
    assert len(result.curve) == m["epochs_run"]
    budget = m["budget"]
    assert budget["validation_samples"] == 120 and budget["split"] == "data.train"
    assert budget["reference_accuracy"] >= 0.9
    assert budget["best_validation_accuracy"] >= budget["reference_accuracy"] - 0.05
    acc = metrics.torch_metric(result.model, f.digits()[1], ctx.spec)["accuracy"]
    # The unseen eval set agrees within the budget plus the sampling error of a 120-sample validation split
    # (two standard errors at 90 % accuracy: 0.055): the budget is held on validation, not promised on eval.
    assert acc > after_prune + 0.3 and acc >= input_acc - 0.05 - 0.055


def test_until_reports_a_budget_that_did_not_hold(tmp_path: Path) -> None:
    ctx, model, _ = _pruned_cnn_with_input(tmp_path)
    step = FinetuneStep(
        type="finetune", batch_size=64, lr=1e-6, until={"max_accuracy_drop": 0.0}, max_epochs=1
    )
    result = FinetunePass().run(model, step, ctx)
    assert result.metrics["budget_held"] is False and result.metrics["epochs_run"] == 1
    assert "eval" not in ctx.roles


def test_until_is_refused_for_a_causal_lm(tmp_path: Path) -> None:
    step = FinetuneStep(type="finetune", until={"max_accuracy_drop": 0.01})
    ctx = f.MemoryContext(tmp_path, f.spec("text-generation"))
    model = WorkingModel(form="torch", origin="hf", input_names=["input_ids"], output_names=["logits"])
    from worker.passes.finetune import finetune_lm

    with pytest.raises(StepFailed) as err:
        finetune_lm(model, step, ctx)
    assert err.value.code == "invalid_step" and "until" in err.value.message
