"""KV-cache export: the ONNX file generates the same tokens as torch, for torch.onnx and the genai builder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.factories_lm import licence_paragraphs
from tests.worker.lm.builders import text_dataset, torch_greedy
from tests.worker.lm.conftest import load_lm
from worker.core import StepFailed
from worker.lm import export as lm_export
from worker.lm.export import check_parity, export_causal_lm
from worker.lm.layout import LMLayout
from worker.lm.session import LMSession


def _eval_text(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = text_dataset(tok, licence_paragraphs()[:3], max_length=40)
    data.inputs["attention_mask"][2, 25:] = 0  # one right-padded row
    return data.inputs["input_ids"], data.inputs["attention_mask"]


@pytest.mark.parametrize(("kind", "method"), [("llama", "torch"), ("gpt2", "torch"), ("llama", "genai"),
                                             ("gemma3", "genai")])
def test_export_generates_the_same_tokens_as_torch(
    kind: str, method: str, lm_dirs: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = lm_dirs(kind)
    module = load_lm(folder)
    ids, mask = _eval_text(folder)
    path = tmp_path / "model.onnx"
    layout = export_causal_lm(module, path, hf_dir=folder, method=method, check_ids=ids, check_mask=mask)  # type: ignore[arg-type]

    assert layout.method == method
    assert layout.opset == (17 if method == "torch" else LMLayout.from_onnx(path).opset)
    assert layout.layers == 4 and layout.head_dim == 16
    assert layout.kv_heads == (4 if kind == "gpt2" else 2)  # GQA: 4 query heads share 2 kv heads
    assert layout.parity["greedy_identical"] and layout.parity["max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob("*.data")), "a small model is one file"
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert {"input_ids", "attention_mask", "past_key_values.3.value"} <= {i.name for i in graph.input}
    ops = {n.op_type for n in graph.node}
    if method == "torch" and kind == "gpt2":  # onnxruntime's fusions matched, and the fused file passed parity
        assert layout.fusions.get("SkipLayerNormalization") == 8 and layout.fusions.get("FastGelu") == 4, layout
        assert {"SkipLayerNormalization", "FastGelu"} <= ops
        assert not list(tmp_path.glob(".*")), "no fused/plain temp copy left"
    if layout.fusions:
        assert set(layout.fusions) <= ops
        assert "com.microsoft" in {o.domain for o in onnx.load(str(path), load_external_data=False).opset_import}
        onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / "inferred.onnx"))  # a valid file

    # independently of the export's own check: greedy 32 tokens from the file == torch without a cache
    sess = LMSession(path)
    prompt = [int(t) for t in ids[0, :12]]
    assert sess.generate(prompt, 32) == torch_greedy(module, prompt, 32)
    import torch

    with torch.inference_mode():
        want = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = sess.logits(ids, mask)
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() < 1e-4


def test_auto_picks_genai_where_the_builder_supports_the_architecture(lm_dirs: Callable[[str], Path]) -> None:
    assert lm_export.choose_method(load_lm(lm_dirs("llama")), "auto") == "genai"
    assert lm_export.choose_method(load_lm(lm_dirs("gpt2")), "auto") == "torch"
    with pytest.raises(StepFailed) as err:
        lm_export.choose_method(load_lm(lm_dirs("gpt2")), "genai")
    assert err.value.code == "export_failed" and "GPT2LMHeadModel" in err.value.message


def test_gemma3_embedding_scale_is_exact_where_sqrt_hidden_is_not_round(tmp_path: Path) -> None:
    """hidden 96: sqrt 9.798, which the builder rounds to 9.8 (max logit diff 9.5e-5 measured); exact, 1e-6."""
    from tests.factories_lm import tiny_lm_dir

    folder = tiny_lm_dir(tmp_path / "hf", kind="gemma3", layers=2, hidden=96, heads=2, kv_heads=1)
    ids, mask = _eval_text(folder)
    layout = export_causal_lm(load_lm(folder), tmp_path / "model.onnx", hf_dir=folder, method="genai",
                              check_ids=ids, check_mask=mask, generate_tokens=4)
    assert layout.parity["max_abs_diff"] < 1e-5, layout.parity


def test_parity_check_fails_on_a_file_that_is_not_the_module(llama_onnx: tuple[Path, LMLayout], llama_dir: Path) -> None:
    import torch

    path, layout = llama_onnx
    other = load_lm(llama_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # a different model than the one in the file
    ids, mask = _eval_text(llama_dir)
    with pytest.raises(StepFailed) as err:
        check_parity(other, path, ids, mask, layout=layout)
    assert err.value.code == "export_mismatch" and "logits differ" in err.value.message


def test_layout_round_trips_through_meta_and_the_file(llama_onnx: tuple[Path, LMLayout]) -> None:
    import json

    path, layout = llama_onnx
    again = LMLayout.from_meta(json.loads(json.dumps(layout.to_meta())))
    assert again == layout
    read = LMLayout.from_onnx(path)
    assert (read.layers, read.kv_heads, read.head_dim, read.past_names, read.float_type) == (
        4, 2, 16, layout.past_names, "float32")
    assert read.past_names[1] == ("past_key_values.1.key", "past_key_values.1.value")


def test_a_file_without_a_cache_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 4])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                                                  "g", [x], [y])), str(tmp_path / "plain.onnx"))
    with pytest.raises(StepFailed) as err:
        LMLayout.from_onnx(tmp_path / "plain.onnx")
    assert err.value.code == "not_a_kv_model"


def test_big_models_are_written_with_external_data(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lm_export, "TWO_GB", 100_000)  # the tiny model's 0.8 MB of weights count as big
    path = tmp_path / "model.onnx"
    export_causal_lm(load_lm(llama_dir), path, method="torch", generate_tokens=4)
    assert (tmp_path / "model.onnx.data").stat().st_size > 500_000
    assert path.stat().st_size < 200_000
    assert len(LMSession(path).generate([5, 6, 7], 4)) == 4


def test_a_fused_graph_that_fails_parity_is_dropped_for_the_traced_one(
    lm_dirs: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fusions are pattern matching: should one change the numbers, the export keeps the plain trace."""
    folder = lm_dirs("gpt2")
    fuse = lm_export.fuse

    def wrong_fusion(src: Path, dst: Path, config: object) -> dict[str, int]:
        found = fuse(src, dst, config)
        proto = onnx.load(str(dst))
        ln = next(n for n in proto.graph.node if n.op_type == "SkipLayerNormalization")
        gamma = next(t for t in proto.graph.initializer if t.name == ln.input[2])
        gamma.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(gamma) * 3, gamma.name))
        onnx.save(proto, str(dst))
        return found

    monkeypatch.setattr(lm_export, "fuse", wrong_fusion)
    path = tmp_path / "model.onnx"
    layout = export_causal_lm(load_lm(folder), path, hf_dir=folder, method="torch")
    assert layout.fusions == {} and "export_mismatch" in layout.parity["fusion_failed"]
    assert layout.parity["greedy_identical"]
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_auto_falls_back_to_torch_when_the_builder_fails(llama_dir: Path, tmp_path: Path) -> None:
    # no tokenizer files beside the weights: the genai builder cannot run, auto exports with torch.onnx
    layout = export_causal_lm(load_lm(llama_dir), tmp_path / "model.onnx", hf_dir=None, generate_tokens=4)
    assert layout.method == "torch" and "genai_failed" in layout.parity
    assert "tokenizer" in layout.parity["genai_failed"]
    assert len(LMSession(tmp_path / "model.onnx").generate([5, 6], 4)) == 4


def test_the_external_data_decision_sums_weights_without_serialising(
    llama_onnx: tuple[Path, LMLayout], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ByteSize()`` raises over 2 GB: the decision reads the weights' dims, which match the stored bytes."""
    proto = onnx.load(str(llama_onnx[0]))
    stored = sum(len(t.raw_data) for t in proto.graph.initializer)
    assert stored > 500_000
    assert stored <= lm_export.weight_bytes(proto) <= stored + 4096  # + small Constant tensors
    assert not lm_export.needs_external_data(proto)
    monkeypatch.setattr(lm_export, "TWO_GB", stored + 4096)  # within a 32nd of the limit: external
    assert lm_export.needs_external_data(proto)
    monkeypatch.setattr(lm_export, "TWO_GB", 2 * stored)
    assert not lm_export.needs_external_data(proto)


def test_a_failed_write_is_a_step_failure_and_auto_falls_back(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What protobuf raised over 2 GB (EncodeError) is a named StepFailed; auto then tries torch.onnx."""
    from google.protobuf.message import EncodeError

    real_save = onnx.save_model
    calls: list[str] = []

    def save_fails_once(proto: object, path: str, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise EncodeError("Failed to serialize proto")
        real_save(proto, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx, "save_model", save_fails_once)
    with pytest.raises(StepFailed) as err:
        lm_export._save(onnx.ModelProto(), tmp_path / "x.onnx")
    assert err.value.code == "export_failed" and "EncodeError: Failed to serialize proto" in err.value.message
    calls.clear()
    layout = export_causal_lm(load_lm(llama_dir), tmp_path / "model.onnx", hf_dir=llama_dir, generate_tokens=4)
    assert layout.method == "torch" and "EncodeError" in layout.parity["genai_failed"]
    assert len(LMSession(tmp_path / "model.onnx").generate([5, 6], 4)) == 4
