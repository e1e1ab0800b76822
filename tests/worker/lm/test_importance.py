"""worker.lm.importance: block influence finds the layers a constructed model makes redundant; keep_layers
leaves a model that forwards, generates and round-trips through save_pretrained like one built with those layers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import factories_lmtrain as lt
from worker.lm import importance


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return lt.tiny_lm(tmp_path_factory.mktemp("llama") / "lm", layers=4)


def _data(tok: Any, n: int = 16) -> Any:
    return lt.token_dataset(tok, lt.licence_split(n, 0)[0], max_length=40)


def test_decoder_layers_of_llama_and_gpt2(llama: tuple[Path, Any], tmp_path: Path) -> None:
    module = lt.lm_model(llama[0]).module
    assert importance.decoder_layers(module) is module.model.layers
    gpt2 = lt.lm_model(lt.tiny_lm(tmp_path / "gpt2", kind="gpt2", layers=3)[0]).module
    assert importance.decoder_layers(gpt2) is gpt2.transformer.h


@pytest.mark.parametrize("identity", [1, 2])
def test_identity_layer_scores_lowest_and_is_dropped(llama: tuple[Path, Any], identity: int) -> None:
    path, tok = llama
    module = lt.lm_model(path).module
    lt.make_identity(module, [identity])
    scores = importance.layer_importance(module, _data(tok), batches=2, batch_size=8)
    print("scores", scores)
    assert len(scores) == 4
    assert scores[identity] == pytest.approx(0.0, abs=1e-9)
    assert min(s for i, s in enumerate(scores) if i != identity) > 1e-3  # the others do turn the stream
    assert importance.most_important(scores, 3) == [i for i in range(4) if i != identity]


def test_padding_is_not_scored(llama: tuple[Path, Any]) -> None:
    path, tok = llama
    module = lt.lm_model(path).module
    text = ["Everyone is permitted to copy."] * 4
    n = len(tok(text[0])["input_ids"])
    short = lt.token_dataset(tok, text, max_length=n)
    padded = lt.token_dataset(tok, text, max_length=n + 20)
    assert short.inputs["attention_mask"].all() and padded.inputs["attention_mask"].sum() == 4 * n
    a = importance.layer_importance(module, short, batches=1, batch_size=4)
    b = importance.layer_importance(module, padded, batches=1, batch_size=4)
    assert b == pytest.approx(a, rel=1e-5)


def _built_with(path: Path, keep: list[int]) -> torch.nn.Module:
    """The same weights loaded into a model configured with only ``keep``'s layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = len(keep)
    fresh = AutoModelForCausalLM.from_config(config).eval()
    source = lt.lm_model(path).module.state_dict()
    state = {}
    for name in fresh.state_dict():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(keep[int(parts[2])])
        state[name] = source[".".join(parts)]
    fresh.load_state_dict(state)
    return fresh


def test_keep_layers_matches_a_model_built_with_them(llama: tuple[Path, Any], tmp_path: Path) -> None:
    path, tok = llama
    keep = [0, 2, 3]
    pruned = importance.keep_layers(lt.lm_model(path).module, keep)
    reference = _built_with(path, keep)
    ids = torch.tensor(tok(["This License applies to any program"])["input_ids"])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(pruned.generate(ids, **gen), reference.generate(ids, **gen))  # the KV cache sees 3 layers

    pruned.save_pretrained(tmp_path / "saved")
    reloaded = lt.lm_model(tmp_path / "saved").module
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, want)


def test_keep_layers_gpt2_round_trip(tmp_path: Path) -> None:
    path, tok = lt.tiny_lm(tmp_path / "gpt2", kind="gpt2", layers=3)
    module = lt.lm_model(path).module
    original = copy.deepcopy(module)
    importance.keep_layers(module, [0, 2])
    assert module.config.n_layer == 2 and module.config.num_hidden_layers == 2
    assert [b.attn.layer_idx for b in module.transformer.h] == [0, 1]
    module.save_pretrained(tmp_path / "saved")
    reloaded = lt.lm_model(tmp_path / "saved").module
    ids = torch.tensor(tok(["Copyright notice"])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module(input_ids=ids).logits)
        assert not torch.allclose(module(input_ids=ids).logits, original(input_ids=ids).logits)


def test_keep_layers_subsets_layer_types() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    module = importance.keep_layers(Qwen2ForCausalLM(config), [1, 2])
    assert module.config.layer_types == ["sliding_attention", "full_attention"]
    assert module.config.num_hidden_layers == 2
    ids = torch.arange(10).unsqueeze(0)
    assert module(input_ids=ids).logits.shape == (1, 10, 64)


def test_keep_layers_refuses_out_of_range(llama: tuple[Path, Any]) -> None:
    with pytest.raises(ValueError, match=r"0\.\.3"):
        importance.keep_layers(lt.lm_model(llama[0]).module, [0, 4])
