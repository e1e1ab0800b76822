"""The LM harness: perplexity, agreement/KL, choice accuracy and generations match torch computed independently."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from models.spec import EvaluateConfig
from tests.factories_lm import licence_paragraphs
from tests.factories_onnx import looping_lm
from tests.worker.conftest import CancelFlag
from tests.worker.lm.builders import choice_dataset, text_dataset, torch_greedy
from tests.worker.lm.conftest import load_lm
from worker.core import ArrayDataset, JobCancelled, StepFailed, WorkingModel
from worker.lm import evaluate as lm_eval
from worker.lm.evaluate import evaluate_lm, torch_perplexity
from worker.lm.export import export_causal_lm
from worker.lm.layout import LMLayout

CFG = EvaluateConfig.model_validate({"latency": {"runs": 3, "warmup": 1},
                                     "generation": {"samples": 2, "max_new_tokens": 8, "prompt_tokens": 32}})


@pytest.fixture(scope="module")
def eval_data(tokenizer: Any) -> Any:
    return text_dataset(tokenizer, licence_paragraphs()[:6], max_length=40)


def _hf_loss(module: Any, data: Any) -> float:
    import torch

    with torch.inference_mode():
        out = module(input_ids=torch.from_numpy(data.inputs["input_ids"]),
                     attention_mask=torch.from_numpy(data.inputs["attention_mask"]),
                     labels=torch.from_numpy(data.labels))
    return float(out.loss)


def test_input_evaluation_matches_torch(llama_onnx: tuple[Path, LMLayout], llama_dir: Path, eval_data: Any,
                                        tokenizer: Any) -> None:
    path, layout = llama_onnx
    module = load_lm(llama_dir)
    ev = evaluate_lm(path, eval_data, CFG, hf_dir=llama_dir, layout=layout)

    valid = int((eval_data.labels[:, 1:] != -100).sum())
    assert ev["tokens"] == valid and ev["num_samples"] == 6
    assert ev["perplexity"] == pytest.approx(math.exp(_hf_loss(module, eval_data)), rel=1e-4)
    assert ev["metric"] == {"name": "perplexity", "value": ev["perplexity"], "higher_is_better": False}
    assert "agreement" not in ev  # the input is its own reference
    assert ev.outputs is not None and ev.outputs["argmax"].shape == (valid,)
    assert ev.outputs["logprobs"].shape == (valid, 384) and ev.outputs["logprobs"].dtype == np.float16

    assert ev["latency_ms"]["median"] > 0 and ev["latency_setup"]["prompt_tokens"] == 32
    assert ev["decode"]["tokens_per_s"] == pytest.approx(1000 / ev["decode"]["ms_per_token"])
    assert ev["peak_memory_bytes"] > 0 and ev["size_bytes"] > 700_000 and ev["params"] > 150_000

    prompts = eval_data.meta["prompts"][:2]
    assert [g["prompt"] for g in ev["generations"]] == prompts
    for g in ev["generations"]:
        ids = tokenizer(g["prompt"])["input_ids"]
        new = torch_greedy(module, ids, 8)
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        assert g["text"] == tokenizer.decode(new, skip_special_tokens=True)

    # the torch-side measurement after a training step agrees with the ONNX harness
    wm = WorkingModel("torch", "hf", ["input_ids", "attention_mask"], ["logits"], module=module, hf_dir=llama_dir)
    assert torch_perplexity(wm, eval_data)["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-4)


def test_agreement_and_kl_against_the_input(llama_onnx: tuple[Path, LMLayout], llama_dir: Path, eval_data: Any,
                                            tmp_path: Path) -> None:
    import torch

    path, layout = llama_onnx
    base = evaluate_lm(path, eval_data, CFG, hf_dir=llama_dir, layout=layout, latency=False)
    same = evaluate_lm(path, eval_data, CFG, base.outputs, hf_dir=llama_dir, layout=layout, latency=False)
    assert same["agreement"]["top1"] == 1.0 and same["agreement"]["mean_kl"] == pytest.approx(0.0, abs=1e-3)

    noisy = load_lm(llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.model.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = export_causal_lm(noisy, tmp_path / "noisy.onnx", method="torch", generate_tokens=4)
    ev = evaluate_lm(tmp_path / "noisy.onnx", eval_data, CFG, base.outputs, hf_dir=llama_dir, layout=other,
                     latency=False)

    ids, mask = (torch.from_numpy(eval_data.inputs[k]) for k in ("input_ids", "attention_mask"))
    keep = torch.from_numpy(eval_data.labels[:, 1:] != -100)
    with torch.inference_mode():
        ref = torch.log_softmax(load_lm(llama_dir)(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)[keep]
        out = torch.log_softmax(noisy(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)[keep]
    top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    kl = float((ref.exp() * (ref - out)).sum(-1).mean())
    assert ev["agreement"]["top1"] == pytest.approx(top1) and top1 < 1.0
    assert ev["agreement"]["mean_kl"] == pytest.approx(kl, rel=2e-2) and kl > 0.01


def test_reference_log_probs_are_bounded(llama_onnx: tuple[Path, LMLayout], llama_dir: Path, eval_data: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, layout = llama_onnx
    monkeypatch.setattr(lm_eval, "REFERENCE_ELEMENTS", 384 * 50)  # 50 positions of a 384-token vocab
    base = evaluate_lm(path, eval_data, CFG, hf_dir=llama_dir, layout=layout, latency=False)
    assert base.outputs is not None and base.outputs["logprobs"].shape == (50, 384)
    ev = evaluate_lm(path, eval_data, CFG, base.outputs, hf_dir=llama_dir, layout=layout, latency=False)
    assert ev["agreement"]["kl_tokens"] == 50 and ev["agreement"]["tokens"] == base["tokens"] > 50


def test_choice_accuracy_scores_each_choice_by_its_log_likelihood(
    llama_onnx: tuple[Path, LMLayout], llama_dir: Path, tokenizer: Any
) -> None:
    import torch

    path, layout = llama_onnx
    choices = ["software", "licence", "copyright"]
    paras = licence_paragraphs()
    rows = [{"text": " ".join(p.split()[:7]), "label": choices[i % 3]} for i, p in enumerate(paras[:9])]
    train = choice_dataset(tokenizer, [{"text": "The program is", "label": "software"}])
    cfg = CFG.model_copy(update={"choices": choices, "few_shot": 1})
    ev = evaluate_lm(path, choice_dataset(tokenizer, rows), cfg, hf_dir=llama_dir, train=train, layout=layout,
                     latency=False)

    module = load_lm(llama_dir)
    right = 0
    for row in rows:
        ctx = tokenizer("The program is software\n\n" + row["text"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in choices:
            cont = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                lp = torch.log_softmax(module(input_ids=torch.tensor([ctx + cont])).logits[0], -1)
            scores.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        right += int(choices[int(np.argmax(scores))] == row["label"])
    assert ev["choice"]["scored"] == 9
    assert ev["accuracy"] == pytest.approx(right / 9)
    assert ev["metric"] == {"name": "accuracy", "value": ev["accuracy"], "higher_is_better": True}


def test_evaluation_is_cancellable(llama_onnx: tuple[Path, LMLayout], llama_dir: Path, eval_data: Any) -> None:
    path, layout = llama_onnx
    calls = []

    def cancel_on_third() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        evaluate_lm(path, eval_data, CFG, hf_dir=llama_dir, layout=layout, check_cancelled=cancel_on_third)
    assert len(calls) == 3


def test_eval_batches_shrink_to_keep_the_logits_bounded(
    llama_onnx: tuple[Path, LMLayout], llama_dir: Path, eval_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, layout = llama_onnx
    whole = evaluate_lm(path, eval_data, CFG, hf_dir=llama_dir, layout=layout, latency=False)
    assert lm_eval.eval_batch_size(64, 40, 384) == lm_eval.MAX_EVAL_BATCH
    monkeypatch.setattr(lm_eval, "BATCH_LOGIT_ELEMENTS", 1 * 40 * 384)
    assert lm_eval.eval_batch_size(64, 40, 384) == 1
    assert lm_eval.eval_batch_size(64, 4096, 128_000) == 1  # never below one row
    rowwise = evaluate_lm(path, eval_data, CFG, whole.outputs, hf_dir=llama_dir, layout=layout, latency=False)
    assert rowwise["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    assert rowwise["agreement"]["top1"] == 1.0


def test_peak_memory_is_the_sessions_own_even_after_an_earlier_evaluation(
    llama_onnx: tuple[Path, LMLayout], llama_dir: Path, eval_data: Any
) -> None:
    """In-process RSS growth read ~8 KB for the second model (the first left the arenas mapped); each is now measured
    in a fresh process: the same file twice reads about the same, and at least its weights."""
    path, layout = llama_onnx
    first = evaluate_lm(path, eval_data, CFG, hf_dir=llama_dir, layout=layout, latency=False)
    second = evaluate_lm(path, eval_data, CFG, first.outputs, hf_dir=llama_dir, layout=layout, latency=False)
    a, b = first["peak_memory_bytes"], second["peak_memory_bytes"]
    assert a >= 0.5 * first["size_bytes"] and b >= 0.5 * second["size_bytes"], (a, b)
    assert 0.5 < b / a < 2.0, (a, b)


def _looping(tmp_path: Path) -> tuple[Path, ArrayDataset]:
    path = tmp_path / "loop.onnx"
    onnx.save(looping_lm(), path)
    ids = np.ones((4, 6), np.int64)
    return path, ArrayDataset({"input_ids": ids, "attention_mask": np.ones_like(ids)}, np.ones_like(ids))


@pytest.mark.usefixtures("fast_cancel_poll")
def test_a_looping_lm_evaluation_ends_at_a_cancel_within_seconds(tmp_path: Path) -> None:
    path, data = _looping(tmp_path)
    cancel = CancelFlag().set_after_first_check(1.0)
    with pytest.raises(JobCancelled):
        evaluate_lm(path, data, CFG, check_cancelled=cancel)
    assert cancel.at is not None and time.monotonic() - cancel.at <= 10 and cancel.seen_by[0] == "ort-watchdog"


def test_a_looping_lm_evaluation_fails_with_run_time_limit_past_the_cap(tmp_path: Path, run_cap_1s: float) -> None:
    path, data = _looping(tmp_path)
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        evaluate_lm(path, data, CFG)
    assert failed.value.code == "run_time_limit" and "MODELPRESS_RUN_MAX_S=1 s" in failed.value.message
    assert time.monotonic() - started < 5


def test_few_shot_prefix_takes_the_classes_in_turn() -> None:
    # a train file sorted by label: the first k rows are all of one class, the prefix still shows each choice
    rows = [{"text": f"a{i}", "label": "a"} for i in range(5)] + [{"text": f"b{i}", "label": "b"} for i in range(5)]
    assert lm_eval.few_shot_prefix(rows, ["a", "b"], 4) == "a0 a\n\nb0 b\n\na1 a\n\nb1 b\n\n"
    assert lm_eval.few_shot_prefix(rows[:6], ["a", "b"], 4) == "a0 a\n\nb0 b\n\na1 a\n\na2 a\n\n"
    assert lm_eval.few_shot_prefix(rows, ["a", "b"], 0) == ""
