"""GPTQ on the streamed path (worker.lm.calibrate + worker.passes.quantizers.gptq_layers): the Hessians
collected one decoder layer at a time equal the float graph's, and the streamed GPTQ file equals the in-memory
GPTQ's weights and perplexity, holding at most a block of weights in float while writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.spec import QuantizeStep
from tests.factories_lm import text_rows
from tests.worker.lm.conftest import load_lm
from worker.lm import stream
from worker.lm.export import genai_export
from worker.lm.session import LMSession
from worker.passes.quantizers import gptq
from worker.passes.quantizers import weight_only as q
from worker.passes.quantizers.gptq_layers import StreamedGPTQ


class _Ctx:
    def check_cancelled(self) -> None:
        pass

    def progress(self, phase: str, **progress: object) -> None:
        pass


def _rows(tokenizer: Any, n: int, length: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` licence paragraphs, right-padded to ``length`` tokens (some rows shorter: padding present)."""
    texts = [r["text"] for r in text_rows(first + n)][first:]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _batches(ids: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ids[i:i + 4], mask[i:i + 4]) for i in range(0, len(ids), 4)]


def _feeds(m: onnx.ModelProto, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    feeds = []
    for ids, mask in batches:
        feed = {"input_ids": ids, "attention_mask": mask}
        for vi in m.graph.input:
            if vi.name.startswith("past_key_values"):
                dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
                feed[vi.name] = np.zeros((len(ids), dims[1], 0, dims[3]), dtype=np.float32)
        feeds.append(feed)
    return feeds


@pytest.fixture(scope="module")
def float_graph(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """The tiny Llama on the genai builder's graph (packed QKV), as the in-memory path exports it."""
    path = tmp_path_factory.mktemp("gptq-float") / "model.onnx"
    genai_export(load_lm(llama_dir), path, llama_dir)
    return onnx.load(str(path))


def _projections(m: onnx.ModelProto) -> list[str]:
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and "lm_head" not in n.name]


def test_layer_by_layer_hessians_equal_the_float_graphs(llama_dir: Path, tokenizer: Any,
                                                        float_graph: onnx.ModelProto) -> None:
    ids, mask = _rows(tokenizer, 12, 64)
    assert 0 < mask.sum() < mask.size  # padded positions present: both sides leave them out
    batches = _batches(ids, mask)
    names = _projections(float_graph)
    want = gptq.hessians(float_graph, names, _feeds(float_graph, batches), _Ctx(), 1)  # type: ignore[arg-type]
    inputs = {n.name: n.input[0] for n in float_graph.graph.node if n.name in set(names)}
    q = StreamedGPTQ(llama_dir, batches)
    for layer in range(4):
        q.begin_layer(layer)
        for key, node in (("qkv", "attn/qkv_proj"), ("o", "attn/o_proj"), ("gate_up", "mlp/gate_proj"),
                          ("down", "mlp/down_proj")):
            a, b = q.hessians[key], want[inputs[f"/model/layers.{layer}/{node}/MatMul"]]
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (layer, key)
    assert q.rows == int(mask.sum())
    with pytest.raises(ValueError, match="in order"):
        q.begin_layer(0)


def _nbits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each 4-bit MatMulNBits' packed codes by projection name (``/model/layers.0/attn/qkv_proj``)."""
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        bits = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("bits")
        if n.op_type == "MatMulNBits" and bits == 4:
            out[n.name.split("/MatMul")[0]] = numpy_helper.to_array(inits[n.input[1]])
    return out


def _perplexity(path: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    logits = LMSession(path).logits(ids, mask).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    target, keep = ids[:, 1:], mask[:, 1:] != 0
    nll = -np.take_along_axis(logp[:, :-1], target[..., None], -1)[..., 0]
    return float(np.exp(nll[keep].mean()))


def test_streamed_gptq_equals_the_in_memory_gptq(llama_dir: Path, tokenizer: Any, float_graph: onnx.ModelProto,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, mask = _rows(tokenizer, 16, 64)
    batches = _batches(ids, mask)
    # in memory: the float graph's Hessians, GPTQ of its projections, the head at 8 bits (RTN)
    m = onnx.ModelProto()
    m.CopyFrom(float_graph)
    names = _projections(m)
    hess = gptq.hessians(m, names, _feeds(m, batches), _Ctx(), 1)  # type: ignore[arg-type]
    gptq.apply(m, names, hess, 4, 64, False, 4, _Ctx())  # type: ignore[arg-type]
    s = q.WeightOnlySettings.resolve(QuantizeStep(type="quantize", mode="int4", algorithm="rtn"))
    m = q.nbits(m, [n.name for n in m.graph.node if n.op_type == "MatMul"], q._matmul_config(s, 8))
    onnx.save(m, str(tmp_path / "in-memory.onnx"))

    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 200)  # 3 output columns at a time: GPTQ by blocks of columns
    settings = stream.StreamSettings(bits=4, block_size=64, head_bits=8)
    written = stream.write_model(llama_dir, tmp_path / "gptq" / "model.onnx", settings,
                                 quantizer=StreamedGPTQ(llama_dir, batches))
    assert written.max_float_elements <= 3 * 128
    rtn = stream.write_model(llama_dir, tmp_path / "rtn" / "model.onnx", settings)

    want = _nbits(m)
    got = _nbits(onnx.load(str(written.path)))
    plain = _nbits(onnx.load(str(rtn.path)))
    assert want.keys() == got.keys() and len(got) == 4 * 5
    same = sum(int((want[k] == got[k]).sum()) for k in want) / sum(v.size for v in want.values())
    differs = sum(int((plain[k] != got[k]).sum()) for k in got) / sum(v.size for v in got.values())
    assert same > 0.999, same  # Hessians equal to ~1e-7 (torch vs ORT): the same codes, a rare tie aside
    assert differs > 0.2, differs  # and GPTQ's codes, not round-to-nearest's

    eval_ids, eval_mask = _rows(tokenizer, 8, 64, first=16)  # held-out paragraphs
    ppl_memory = _perplexity(tmp_path / "in-memory.onnx", eval_ids, eval_mask)
    ppl_stream = _perplexity(written.path, eval_ids, eval_mask)
    assert ppl_stream == pytest.approx(ppl_memory, rel=0.005)
