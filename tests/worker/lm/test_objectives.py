"""worker.lm.objectives: the LM loss takes only labelled tokens, the eval loss is token-weighted, the token KD
term vanishes on identical logits and ignores padding, and token labels are derived or checked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests import factories_lmtrain as lt
from tests.factories_lm import prompt_rows
from worker.core import ArrayDataset, StepFailed
from worker.lm import objectives


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path, tok = lt.tiny_lm(tmp_path_factory.mktemp("llama") / "lm", layers=2)
    return lt.lm_model(path).module, tok


def _batch(data: ArrayDataset) -> dict[str, torch.Tensor]:
    assert data.labels is not None
    return {**{k: torch.from_numpy(v) for k, v in data.inputs.items()}, "labels": torch.from_numpy(data.labels)}


def test_lm_loss_covers_completion_tokens_only(llama: tuple[Any, Any]) -> None:
    module, tok = llama
    data = lt.prompt_dataset(tok, prompt_rows(6), max_length=40)
    batch = _batch(data)
    with torch.no_grad():
        loss = objectives.lm_loss_fn(module)(batch)
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = objectives.token_nll(logits, batch["labels"])
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert float(loss) == pytest.approx(float(total / count), rel=1e-5)
    everything = objectives.with_labels(ArrayDataset(data.inputs))  # loss on prompt tokens as well
    all_total, all_count = objectives.token_nll(logits, torch.from_numpy(everything.labels))  # type: ignore[arg-type]
    assert int(all_count) > int(count) and float(all_total / all_count) != pytest.approx(float(loss), rel=1e-4)


def test_eval_loss_is_token_weighted_and_batch_independent(llama: tuple[Any, Any]) -> None:
    module, tok = llama
    data = lt.token_dataset(tok, lt.licence_split(10, 0)[0], max_length=32)
    a = objectives.eval_loss(module, data, "cpu", batch_size=3)
    b = objectives.eval_loss(module, data, "cpu", batch_size=10)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
    assert a["perplexity"] == pytest.approx(math.exp(a["eval_loss"]))
    assert 0.5 * math.log(len(tok)) < a["eval_loss"] < 2 * math.log(len(tok))  # an untrained model is ~uniform
    assert not module.training


def test_token_kd_zero_on_identical_logits_and_ignores_padding() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 5, 11)
    s = torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(objectives.token_kd(t, t, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    kd = objectives.token_kd(s, t, mask, 2.0)
    assert float(kd) > 0
    s2 = s.clone()
    s2[0, 3:] = 100.0  # junk on padding positions changes nothing
    assert float(objectives.token_kd(s2, t, mask, 2.0)) == pytest.approx(float(kd), rel=1e-6)


def test_with_labels_masks_padding_and_refuses_class_labels(tmp_path: Path) -> None:
    ids = np.array([[5, 6, 7, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0]], dtype=np.int64)
    derived = objectives.with_labels(ArrayDataset({"input_ids": ids, "attention_mask": mask}))
    assert derived.labels is not None and derived.labels.tolist() == [[5, 6, 7, -100]]
    with pytest.raises(StepFailed, match=r"shaped like input_ids \[1, 4\]") as err:
        objectives.with_labels(ArrayDataset({"input_ids": ids, "attention_mask": mask}, np.array([1])))
    assert err.value.code == "dataset_mismatch"
