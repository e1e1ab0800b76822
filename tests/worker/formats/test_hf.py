"""hf model archives: built from config + safetensors only; task from architectures (causal LMs as
AutoModelForCausalLM); interface names."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from tests import factories_lm as lm
from tests import factories_train as f
from worker.core import StepFailed
from worker.formats import hf


def test_loads_sequence_classifier_with_same_weights(tmp_path: Path) -> None:
    src = f.tiny_bert_dir(tmp_path / "src")
    archive = f.zip_dir(src, tmp_path / "m.zip", prefix="model/")
    model = hf.load(archive, {}, tmp_path / "work")
    assert model.form == "torch" and model.origin == "hf"
    assert model.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert model.output_names == ["logits"]
    assert model.hf_dir is not None and (model.hf_dir / "tokenizer.json").is_file()
    assert model.meta["hf_task"] == "text-classification" and model.meta["model_type"] == "bert"
    from transformers import BertForSequenceClassification

    ref = BertForSequenceClassification.from_pretrained(src)
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(model.module(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)


def test_feature_extraction_and_meta_overrides(tmp_path: Path) -> None:
    archive = f.zip_dir(f.tiny_bert_dir(tmp_path / "src", task="feature-extraction"), tmp_path / "m.zip")
    model = hf.load(archive, {"input_names": ["input_ids", "attention_mask"]}, tmp_path / "work")
    assert model.output_names == ["last_hidden_state"]
    assert model.input_names == ["input_ids", "attention_mask"]
    assert type(model.module).__name__ == "BertModel"


def test_refuses_pickled_weights(tmp_path: Path) -> None:
    src = f.tiny_bert_dir(tmp_path / "src")
    for p in src.glob("*.safetensors"):
        p.rename(p.with_name("pytorch_model.bin"))
    with pytest.raises(StepFailed, match="safetensors"):
        hf.load(f.zip_dir(src, tmp_path / "m.zip"), {}, tmp_path / "work")


def test_refuses_unsafe_archive(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../config.json", "{}")
    with pytest.raises(StepFailed) as err:
        hf.load(bad, {}, tmp_path / "work")
    assert err.value.code == "invalid_model"


def test_refuses_unknown_model_type_and_auto_map(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("config.json", '{"model_type": "evil_remote"}')
        zf.writestr("model.safetensors", b"")
    with pytest.raises(StepFailed, match="not a supported transformers config"):
        hf.load(bad, {}, tmp_path / "work")
    remote = tmp_path / "remote.zip"
    with zipfile.ZipFile(remote, "w") as zf:
        zf.writestr("config.json", '{"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}}')
        zf.writestr("model.safetensors", b"")
    with pytest.raises(StepFailed) as err:
        hf.load(remote, {}, tmp_path / "work2")
    assert err.value.code == "invalid_model" and "'auto_map' (custom model code), which is never run" in str(err.value)


@pytest.mark.parametrize(("kind", "shard"), [("llama", "100KB"), ("gpt2", None)])
def test_a_causal_lm_loads_as_auto_model_for_causal_lm_per_the_contract(
    tmp_path: Path, kind: str, shard: str | None
) -> None:
    from transformers import AutoModelForCausalLM

    src = lm.tiny_lm_dir(tmp_path / "src", kind=kind, layers=2, max_shard_size=shard)
    assert (src / "model.safetensors.index.json").is_file() == (shard is not None)
    model = hf.load(f.zip_dir(src, tmp_path / "m.zip", prefix="lm/"), {}, tmp_path / "work")
    assert model.form == "torch" and model.origin == "hf" and model.meta["hf_task"] == "text-generation"
    assert model.input_names == ["input_ids", "attention_mask"] and model.output_names == ["logits"]
    assert model.hf_dir is not None and (model.hf_dir / "tokenizer.json").is_file()
    assert not model.module.training
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    assert type(model.module) is type(ref) and type(ref).__name__ == {"llama": "LlamaForCausalLM",
                                                                        "gpt2": "GPT2LMHeadModel"}[kind]
    ids = torch.tensor([[5, 40, 77, 120, 9]])
    with torch.no_grad():
        got = model.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert got.shape == (1, 5, 384) and torch.equal(got, ref(input_ids=ids).logits)
