"""worker.lm.stream: the layer-by-layer writer matches torch in float and the in-memory quantize path byte for
byte at 4/8 bits, holding at most one block of weights in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.spec import QuantizeStep
from tests.factories_lm import tiny_lm_dir
from tests.worker.lm.conftest import load_lm
from worker.lm import stream
from worker.lm.export import _check_text, check_parity, genai_export
from worker.lm.layout import LMLayout
from worker.lm.session import LMSession
from worker.passes.quantizers import weight_only as q


def _bf16_sharded(folder: Path, src: Path) -> Path:
    """``src``'s model saved again in bf16, in shards (with an index), with its tokenizer."""
    import shutil

    import torch

    model = load_lm(src).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, folder / f.name)
    return folder


def test_float_stream_matches_torch_on_bf16_shards(llama_dir: Path, tmp_path: Path) -> None:
    folder = _bf16_sharded(tmp_path / "bf16", llama_dir)
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    written = stream.write_model(folder, tmp_path / "out" / "model.onnx", stream.StreamSettings(bits=None))
    module = load_lm(folder).float()  # bf16 widened exactly, as the writer does
    ids, mask = _check_text(module.config.vocab_size)
    parity = check_parity(module, written.path, ids, mask, generate_tokens=8)
    assert parity["max_abs_diff"] < 1e-4 and parity["greedy_identical"]
    proto = onnx.load(str(written.path), load_external_data=False)
    table = next(t for t in proto.graph.initializer if t.name == "model.embed_tokens.weight")
    assert table.data_type == onnx.TensorProto.BFLOAT16  # the stored dtype, then a Cast
    assert not {"cos_cache", "sin_cache"} & {t.name for t in proto.graph.initializer}  # computed (worker.lm.rope)
    assert {"cos_cache", "sin_cache"} <= {o for n in proto.graph.node for o in n.output}
    assert written.params == sum(p.numel() for p in module.parameters())
    layout = LMLayout.from_onnx(written.path)
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (4, 2, 16)


def test_a_qwen2_with_qkv_biases_matches_torch(tmp_path: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    module = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in module.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # random-init biases are zero: make them count
    module.save_pretrained(tmp_path / "qwen", safe_serialization=True)
    written = stream.write_model(tmp_path / "qwen", tmp_path / "out" / "model.onnx", stream.StreamSettings(bits=None))
    assert any(n.op_type == "Add" and "qkv" in n.name for n in onnx.load(str(written.path)).graph.node)
    data = written.path.with_name("model.onnx.data").stat().st_size
    assert data == stream.projected_bytes(config, stream.StreamSettings(bits=None), table_itemsize=4)
    ids, mask = _check_text(256)
    assert check_parity(module, written.path, ids, mask, generate_tokens=8)["greedy_identical"]


def _nbits_of(path: Path) -> dict[str, list[np.ndarray]]:
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.name.split("/MatMul")[0]: [inits[i].reshape(-1) for i in n.input[1:] if i]
            for n in proto.graph.node if n.op_type == "MatMulNBits"}


def _table_of(path: Path) -> list[np.ndarray]:
    """The token table's arrays: a GatherBlockQuantized's codes, scales, zero points, or a Gather's table."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type.startswith("Gather") and n.input[0] in inits)
    if node.op_type == "Gather":
        t = inits[node.input[0]]
        return [np.frombuffer(t.raw_data, dtype=np.uint8)] if t.raw_data else [numpy_helper.to_array(t)]
    return [numpy_helper.to_array(inits[i]).reshape(-1) for i in (node.input[0], *node.input[2:])]


@pytest.mark.parametrize("mode", ["int4", "int8_weight"])
def test_streamed_weights_equal_the_in_memory_quantizer_byte_for_byte(
    mode: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same RTN kernels on the same fp32 values, block by block: the same bytes, even in chunks of 200 weights."""
    from worker import stream_job

    genai_export(load_lm(llama_dir), tmp_path / "float" / "model.onnx", llama_dir)
    m = onnx.load(str(tmp_path / "float" / "model.onnx"))
    p = QuantizeStep(type="quantize", mode=mode)
    s = q.WeightOnlySettings.resolve(p)
    q.prepare_for_nbits(m)
    plan = q.plan_weight_only(m, p, s)
    if plan.four:
        m = q.nbits(m, plan.four, q._matmul_config(s, 4))
    m = q.nbits(m, plan.eight, q._matmul_config(s, 8))
    table = [n.name for n in m.graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight"]
    if mode == "int4":  # the token table at 8 bits, as the quantize pass's default for an untied table
        assert q.gather_to_8bit(m, table, s.block_size) == []
    onnx.save(m, str(tmp_path / "in-memory.onnx"))

    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 200)  # 3 rows of 64 at a time
    written = stream.write_model(llama_dir, tmp_path / "out" / "model.onnx", stream_job.settings_for(p))
    assert written.max_float_elements <= 3 * 128  # one block of rows (K <= 128), transposed as it is widened
    want, got = _nbits_of(tmp_path / "in-memory.onnx"), _nbits_of(written.path)
    assert want.keys() == got.keys() and len(got) == 4 * 5 + 1  # qkv, o, gate, up, down per layer + head
    for name in want:
        assert all(np.array_equal(a, b) for a, b in zip(want[name], got[name], strict=True)), name
    bits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in onnx.load(str(written.path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("/lm_head/MatMulNBits") == 8 and set(bits.values()) == {4 if mode == "int4" else 8}
    tables = [_table_of(tmp_path / "in-memory.onnx"), _table_of(written.path)]
    assert all(np.array_equal(a, b) for a, b in zip(*tables, strict=True)) and len(tables[1]) == (
        3 if mode == "int4" else 1)  # codes, scales, zero points at 4 bits; the stored bf16 at 8
    assert written.embedding_bits == (8 if mode == "int4" else None)
    assert len(LMSession(written.path).generate([5, 6, 7], 6)) == 6


def test_unsupported_models_are_named(tmp_path: Path) -> None:
    folder = tiny_lm_dir(tmp_path / "gpt2", kind="gpt2", layers=1, tokenizer=False)
    with pytest.raises(stream.StepFailed) as err:
        stream.write_model(folder, tmp_path / "out.onnx", stream.StreamSettings())
    assert err.value.code == "unsupported_model" and "GPT2LMHeadModel" in err.value.message




@pytest.mark.parametrize("settings", [stream.StreamSettings(), stream.StreamSettings(embedding_bits=8),
                                      stream.StreamSettings(bits=8, block_size=32, embedding_bits=8),
                                      stream.StreamSettings(bits=4, block_size=16, symmetric=True, head_bits=None)])
def test_the_projected_size_is_the_written_size(settings: stream.StreamSettings, llama_dir: Path,
                                                tmp_path: Path) -> None:
    """``projected_bytes`` (what README's 8 B figure comes from) counts every byte of the data file."""
    from transformers import AutoConfig

    written = stream.write_model(llama_dir, tmp_path / "model.onnx", settings)
    data = (tmp_path / "model.onnx.data").stat().st_size
    assert data == stream.projected_bytes(AutoConfig.from_pretrained(llama_dir), settings, table_itemsize=4)
    assert written.embedding_bits == settings.embedding_bits
