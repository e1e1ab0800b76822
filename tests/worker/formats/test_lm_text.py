"""Causal-LM datasets at token level: exactly which positions carry a loss for each row shape, padding, packing,
truncation, the generation prompts, and what fails the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import factories_lm as lm
from tests.factories_train import spec as make_spec
from worker.core import StepFailed, WorkingModel
from worker.formats import lm_text, text

IGNORE = -100


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> WorkingModel:
    """A tiny Llama's folder as an LM working model (the module is not needed to build data)."""
    folder = lm.tiny_lm_dir(tmp_path_factory.mktemp("lm") / "llama", layers=1)
    return WorkingModel(form="torch", origin="hf", input_names=["input_ids", "attention_mask"],
                        output_names=["logits"], hf_dir=folder, meta={"hf_task": "text-generation"})


@pytest.fixture(scope="module")
def tok(model: WorkingModel) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.hf_dir)


def _load(tmp_path: Path, model: WorkingModel, rows: list[dict[str, Any]], task: str = "text-generation",
          **text_cfg: Any) -> Any:
    path = lm.write_jsonl(tmp_path / "d.jsonl", rows)
    return text.load(path, {}, model, make_spec(task, text=text_cfg), tmp_path)


def _ids(tok: Any, s: str, special: bool = True) -> list[int]:
    return list(tok(s, add_special_tokens=special)["input_ids"])


def test_text_rows_are_packed_into_blocks_with_eos_between_rows(tmp_path: Path, model: WorkingModel, tok: Any) -> None:
    rows = lm.text_rows(6)
    data = _load(tmp_path, model, rows, max_length=32)
    stream = [t for r in rows for t in [*_ids(tok, r["text"]), tok.eos_token_id]]
    blocks = -(-len(stream) // 32)
    ids, mask, labels = data.inputs["input_ids"], data.inputs["attention_mask"], data.labels
    assert ids.shape == mask.shape == labels.shape == (blocks, 32) and ids.dtype == labels.dtype == np.int64
    assert ids[mask == 1].tolist() == stream  # every token once, in order, blocks filled left to right
    assert mask[:-1].all() and mask[-1].sum() == len(stream) - 32 * (blocks - 1)
    assert (labels == np.where(mask == 1, ids, IGNORE)).all()  # loss on every real token, none on padding
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert data.meta["shape"] == "text" and len(data.meta["prompts"]) == 6
    assert data.meta["prompts"][0] == tok.decode(_ids(tok, rows[0]["text"])[:16], skip_special_tokens=True)


def test_text_rows_without_packing_are_one_sequence_each_truncated(
    tmp_path: Path, model: WorkingModel, tok: Any
) -> None:
    rows = [{"text": "This License"}, *lm.text_rows(2)]
    data = _load(tmp_path, model, rows, max_length=24, packing=False)
    assert data.inputs["input_ids"].shape == (3, 24)
    short = [*_ids(tok, "This License"), tok.eos_token_id]
    assert data.inputs["input_ids"][0, :len(short)].tolist() == short
    assert data.inputs["attention_mask"][0].tolist() == [1] * len(short) + [0] * (24 - len(short))
    assert data.labels[0].tolist() == short + [IGNORE] * (24 - len(short))
    assert data.inputs["input_ids"][1].tolist() == _ids(tok, rows[1]["text"])[:24]  # cut, no eos
    assert data.labels[1].tolist() == data.inputs["input_ids"][1].tolist()


def test_prompt_completion_takes_loss_on_the_completion_and_eos_only(
    tmp_path: Path, model: WorkingModel, tok: Any
) -> None:
    rows = lm.prompt_rows(4)
    data = _load(tmp_path, model, rows, max_length=160)
    for i, row in enumerate(rows):
        p = _ids(tok, row["prompt"])
        c = [*_ids(tok, row["completion"], special=False), tok.eos_token_id]
        n = len(p) + len(c)
        assert n <= 160
        assert data.inputs["input_ids"][i, :n].tolist() == p + c
        assert data.labels[i].tolist() == [IGNORE] * len(p) + c + [IGNORE] * (160 - n)
        assert data.inputs["attention_mask"][i].sum() == n
    assert data.meta == {"shape": "prompt_completion", "prompts": [r["prompt"] for r in rows]}


def test_a_long_prompt_is_cut_from_the_left_to_keep_the_completion(
    tmp_path: Path, model: WorkingModel, tok: Any
) -> None:
    row = {"prompt": lm.licence_paragraphs()[0], "completion": " the end"}
    data = _load(tmp_path, model, [row], max_length=16)
    p = _ids(tok, row["prompt"])
    c = [*_ids(tok, " the end", special=False), tok.eos_token_id]
    assert len(p) + len(c) > 16
    assert data.inputs["input_ids"][0].tolist() == p[-(16 - len(c)):] + c
    assert data.labels[0].tolist() == [IGNORE] * (16 - len(c)) + c


def _labelled_text(tok: Any, data: Any, i: int) -> str:
    return str(tok.decode([t for t in data.labels[i].tolist() if t != IGNORE]))


def test_messages_take_loss_on_assistant_turns_only(tmp_path: Path, model: WorkingModel, tok: Any) -> None:
    rows = lm.chat_rows(3)
    data = _load(tmp_path, model, rows, max_length=96)
    for i, row in enumerate(rows):
        messages = row["messages"]
        full = tok.apply_chat_template(messages, tokenize=False)
        before = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        ids, n_before = _ids(tok, full, special=False), len(_ids(tok, before, special=False))
        assert data.inputs["input_ids"][i, :len(ids)].tolist() == ids
        assert data.labels[i, :n_before].tolist() == [IGNORE] * n_before  # system + user + "<|assistant|>"
        assert data.labels[i, n_before:len(ids)].tolist() == ids[n_before:]
        assert (data.labels[i, len(ids):] == IGNORE).all()
        assert _labelled_text(tok, data, i) == messages[2]["content"] + "<|end|>"
    assert data.meta["shape"] == "messages"
    assert data.meta["prompts"][0] == tok.apply_chat_template(rows[0]["messages"][:2], tokenize=False,
                                                              add_generation_prompt=True)
    assert data.meta["prompts"][0].endswith("<|assistant|>")


def test_every_assistant_turn_of_a_multi_turn_chat_is_learnt_and_no_user_turn(
    tmp_path: Path, model: WorkingModel, tok: Any
) -> None:
    chat = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]
    data = _load(tmp_path, model, [{"messages": chat}], max_length=64)
    assert _labelled_text(tok, data, 0) == "first answer<|end|>second answer<|end|>"
    assert data.meta["prompts"] == ["<|user|>one<|end|><|assistant|>first answer<|end|><|user|>two<|end|><|assistant|>"]


def test_a_template_whose_prefixes_do_not_nest_still_finds_the_assistant_content(tok: Any) -> None:
    class Odd:  # renders a trailer that changes with the conversation's length, so prefixes do not nest
        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                                add_generation_prompt: bool) -> str:
            body = "".join(f"[{m['role']}]{m['content']}" for m in messages)
            return body + f"#{len(messages)}" + ("[assistant]" if add_generation_prompt else "")

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    full, spans = lm_text.assistant_spans(Odd(), chat, 1)
    assert full == "[user]hi[assistant]hello#2" and [full[a:b] for a, b in spans] == ["hello"]
    padded = [chat[0], {"role": "assistant", "content": "  hello \n"}]

    class Trimming(Odd):
        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                                add_generation_prompt: bool) -> str:
            trimmed = [{**m, "content": m["content"].strip()} for m in messages]
            return super().apply_chat_template(trimmed, tokenize, add_generation_prompt)

    full, spans = lm_text.assistant_spans(Trimming(), padded, 1)
    assert [full[a:b] for a, b in spans] == ["hello"]


def test_a_chat_template_that_refuses_a_conversation_fails_the_step_naming_the_row() -> None:
    class Strict:
        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool,
                                add_generation_prompt: bool) -> str:
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    with pytest.raises(StepFailed) as err:
        lm_text.assistant_spans(Strict(), [{"role": "assistant", "content": "x"}], 7)
    assert err.value.code == "invalid_dataset"
    assert str(err.value).startswith("row 7: the model's chat template refused this conversation: Conversation roles")


def test_choice_rows_keep_their_rows_for_scoring(tmp_path: Path, model: WorkingModel, tok: Any) -> None:
    rows = [{"text": "This License is free.", "label": "yes"}, {"text": "Warranty", "label": 0}]
    data = _load(tmp_path, model, rows, max_length=16)
    assert data.meta["shape"] == "choice"
    assert data.meta["rows"] == [{"text": "This License is free.", "label": "yes"}, {"text": "Warranty", "label": "0"}]
    first = _ids(tok, rows[0]["text"])
    assert data.labels[0].tolist() == first + [IGNORE] * (16 - len(first))


def test_a_generic_job_on_a_causal_lm_gets_the_lm_dataset(tmp_path: Path, model: WorkingModel) -> None:
    data = _load(tmp_path, model, lm.prompt_rows(2), task="generic", max_length=48)
    assert data.meta["shape"] == "prompt_completion" and data.labels.shape == (2, 48)


def test_messages_without_a_chat_template_fail_the_step(tmp_path: Path) -> None:
    folder = lm.tiny_lm_dir(tmp_path / "plain", layers=1)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    bare = WorkingModel(form="torch", origin="hf", input_names=["input_ids", "attention_mask"],
                        output_names=["logits"], hf_dir=folder, meta={"hf_task": "text-generation"})
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(folder).chat_template:
        pytest.skip("this transformers keeps the template in tokenizer_config.json")
    with pytest.raises(StepFailed) as err:
        _load(tmp_path, bare, lm.chat_rows(1))
    assert err.value.code == "dataset_mismatch" and "chat template" in str(err.value)


def test_rows_with_no_loss_left_or_of_mixed_shapes_fail_the_step(tmp_path: Path, model: WorkingModel) -> None:
    with pytest.raises(StepFailed) as err:
        _load(tmp_path, model, [{"text": "a"}, {"prompt": "b", "completion": "c"}])
    assert err.value.code == "invalid_dataset" and "row 2: a 'prompt_completion' row in a 'text' dataset" in str(
        err.value)
    long_system = [{"role": "system", "content": lm.licence_paragraphs()[0]}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}]
    with pytest.raises(StepFailed) as err:  # the assistant turn starts past max_length
        _load(tmp_path, model, [{"messages": long_system}], max_length=16)
    assert err.value.code == "invalid_dataset"
    assert "no token of this 'messages' dataset carries a loss within text.max_length=16" in str(err.value)
