"""LMSession: logits, greedy generation with the cache, explicit position_ids, quantized files, timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.factories_onnx import looping_lm
from tests.worker.lm.builders import torch_greedy
from tests.worker.lm.conftest import load_lm
from worker.core import StepFailed
from worker.lm.export import torch_export
from worker.lm.layout import LMLayout
from worker.lm.session import LMSession
from worker.ort_guard import RunGuard


def test_unfed_cache_inputs_get_an_empty_past(llama_onnx: tuple[Path, LMLayout]) -> None:
    path, _ = llama_onnx
    sess = LMSession(path)  # layout read from the file
    past = sess.empty_past(3)
    assert sorted(past) == sorted(n for pair in sess.layout.past_names for n in pair)
    assert {a.shape for a in past.values()} == {(3, 2, 0, 16)}
    logits, nxt = sess.run(np.array([[5, 6, 7]]), np.ones((1, 3), dtype=np.int64))
    assert logits.shape == (1, 3, 384)
    assert nxt["past_key_values.0.key"].shape == (1, 2, 3, 16)  # present becomes the next step's past
    # one token with that past == the last position of the whole sequence at once
    step, _ = sess.run(np.array([[8]]), np.ones((1, 4), dtype=np.int64), nxt)
    whole = sess.logits(np.array([[5, 6, 7, 8]]), np.ones((1, 4), dtype=np.int64))
    assert np.abs(step[0, -1] - whole[0, -1]).max() < 1e-4


def test_explicit_position_ids_follow_the_mask_on_left_padded_rows(
    lm_dirs: Callable[[str], Path], tmp_path: Path
) -> None:
    import torch

    module = load_lm(lm_dirs("gpt2"))
    layout = torch_export(module, tmp_path / "model.onnx", position_ids=True)
    assert layout.has_position_ids and LMLayout.from_onnx(tmp_path / "model.onnx").has_position_ids
    sess = LMSession(tmp_path / "model.onnx")
    ids = np.array([[0, 0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27]], dtype=np.int64)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7], dtype=np.int64)
    got = sess.logits(ids, mask)
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.inference_mode():
        want = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos)).logits.numpy()
    assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4
    # the left-padded row scores like the same tokens without padding
    alone = sess.logits(ids[:1, 3:], mask[:1, 3:])
    assert np.abs(got[0, 3:] - alone[0]).max() < 1e-4
    assert sess.generate([11, 12, 13], 10) == torch_greedy(module, [11, 12, 13], 10)


def test_a_quantized_file_still_generates(llama_onnx: tuple[Path, LMLayout], tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path, _ = llama_onnx
    # The traced export carries onnxruntime's fused (com.microsoft) ops, whose types ONNX's shape inference
    # does not know: the quantizer is told the float type, as its own error message suggests.
    quantize_dynamic(str(path), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    sess = LMSession(tmp_path / "q.onnx")
    out = sess.generate([5, 6, 7], 12)
    assert len(out) == 12 and all(0 <= t < 384 for t in out)
    ref = LMSession(path).logits(np.array([[5, 6, 7, 8, 9]]), np.ones((1, 5), dtype=np.int64))
    got = sess.logits(np.array([[5, 6, 7, 8, 9]]), np.ones((1, 5), dtype=np.int64))
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.6  # int8 weights: close, not equal
    assert 0 < np.abs(got - ref).max() < 1.0


def test_generation_stops_at_eos_and_timing_is_measured(llama_onnx: tuple[Path, LMLayout]) -> None:
    path, _ = llama_onnx
    sess = LMSession(path)
    free = sess.generate([5, 6, 7], 8)
    assert sess.generate([5, 6, 7], 8, eos_token_id=free[2]) == free[: free.index(free[2]) + 1]
    pre = sess.time_prefill(32, runs=3, warmup=1)
    assert 0 < pre["min"] <= pre["median"] <= pre["p90"]
    dec = sess.time_decode(32, 8, runs=2)
    assert dec["runs"] == 2 and dec["new_tokens"] == 8
    assert dec["tokens_per_s"] == pytest.approx(1000 / dec["ms_per_token"])
    with pytest.raises(ValueError):
        sess.generate([], 4)


def test_a_guarded_session_stops_a_looping_lm(tmp_path: Path) -> None:
    short, looping = tmp_path / "short.onnx", tmp_path / "loop.onnx"
    onnx.save(looping_lm(3), short)
    onnx.save(looping_lm(2**40), looping)
    with RunGuard(run_max_s=1, phase_max_s=60) as guard:
        LMSession(short, guard=guard).logits(np.ones((2, 5), np.int64), np.ones((2, 5), np.int64))
        assert guard.per_sample_s is not None  # the runs go through the guard
        sess = LMSession(looping, guard=guard)
        started = time.monotonic()
        with pytest.raises(StepFailed) as failed:
            sess.generate([1, 2, 3], 4)
    assert failed.value.code == "run_time_limit" and time.monotonic() - started < 5
