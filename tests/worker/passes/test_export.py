"""ExportPass: ONNX outputs match torch on real inputs (CNN and BERT, other batch/sequence sizes too);
a broken parity fails the step with export_mismatch and the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.spec import ExportStep
from tests import factories_train as f
from worker import convert
from worker.core import StepFailed
from worker.formats import hf, text
from worker.passes.export import ExportPass


def test_cnn_export_matches_torch(tmp_path: Path) -> None:
    path, _ = f.cnn_onnx()
    _, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"eval": evald})
    model = convert.to_torch(f.onnx_model(path), ctx)
    result = ExportPass().run(model, ExportStep(type="export", opset=17, samples=32), ctx)
    assert result.model.form == "onnx" and result.metrics["samples"] == 32
    assert result.metrics["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(result.model.onnx_path), providers=["CPUExecutionProvider"])
    x = evald.inputs["input"][:100]  # another batch size than the export's
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        want = model.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_bert_export_has_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    model = hf.load(f.tiny_bert_archive(tmp_path), {}, tmp_path / "work")
    spec = f.spec("text-classification", text={"max_length": 16})
    data = text.load(f.write_jsonl(tmp_path / "e.jsonl", f.sentences(20)), {}, model, spec, tmp_path)
    ctx = f.MemoryContext(tmp_path, spec, data={"eval": data})
    result = ExportPass().run(model, ExportStep(type="export"), ctx)
    sess = ort.InferenceSession(str(result.model.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    feed = {k: v[:3, :10] for k, v in data.inputs.items()}  # batch 3, sequence 10 (export saw 16, 16)
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        want = model.module(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_broken_parity_fails_with_numbers(tmp_path: Path) -> None:
    path, _ = f.cnn_onnx()
    _, evald = f.digits()
    ctx = f.MemoryContext(tmp_path, f.spec(), data={"eval": evald})
    model = convert.to_torch(f.onnx_model(path), ctx)

    class Drift(torch.nn.Module):
        """Adds an offset only outside ONNX export (torch.onnx.is_in_onnx_export), so the graphs disagree."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            return out if torch.onnx.is_in_onnx_export() else out + 0.5

    model.module = Drift(model.module)
    with pytest.raises(StepFailed) as err:
        ExportPass().run(model, ExportStep(type="export", atol=1e-3), ctx)
    assert err.value.code == "export_mismatch"
    assert "max abs diff 0.5" in err.value.message


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_export_has_a_kv_cache_and_generates_like_torch(tmp_path: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.factories_lm import licence_paragraphs, tiny_lm_dir
    from worker.core import ArrayDataset, WorkingModel
    from worker.lm.layout import LMLayout
    from worker.lm.session import LMSession

    torch.set_num_threads(1)
    folder = tiny_lm_dir(tmp_path / kind, kind=kind)
    module = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = np.array([tok(p)["input_ids"][:24] for p in licence_paragraphs()[:2]], dtype=np.int64)
    data = ArrayDataset({"input_ids": ids, "attention_mask": np.ones_like(ids)}, ids.copy(), None, {"shape": "text"})
    ctx = f.MemoryContext(tmp_path / "work", f.spec("text-generation"), data={"eval": data})
    model = WorkingModel("torch", "hf", ["input_ids", "attention_mask"], ["logits"], module=module, hf_dir=folder,
                         meta={"hf_task": "text-generation"})
    result = ExportPass().run(model, ExportStep(type="export"), ctx)
    out = result.model
    assert out.form == "onnx" and out.onnx_path is not None and out.hf_dir == folder
    assert result.metrics["method"] == ("genai" if kind == "llama" else "torch")  # auto
    assert result.metrics["greedy_identical"] is True and result.metrics["max_abs_diff"] < 1e-4
    assert LMLayout.from_meta(out.meta["lm"]).layers == 4
    prompt = [int(t) for t in ids[0, :10]]
    want = module.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=tok.pad_token_id)[0, 10:].tolist()
    assert LMSession(out.onnx_path).generate(prompt, 16) == want
