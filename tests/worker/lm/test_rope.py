"""worker.lm.rope: genai exports compute their RoPE caches with a few nodes instead of storing them, and run
as the stored caches did."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.spec import QuantizeStep
from tests.worker.lm.conftest import load_lm
from worker.lm import export as lm_export
from worker.lm import rope
from worker.lm.export import _check_text, export_causal_lm
from worker.lm.session import LMSession


def _builder_inv_freq(theta: float, dim: int) -> Any:
    import torch

    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _builder_caches(theta: float, positions: int, dim: int, mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin caches as onnxruntime-genai's builder computes them (torch, float32), halved."""
    import torch

    inv_freq = _builder_inv_freq(theta, dim)
    freqs = torch.outer(torch.arange(positions, dtype=torch.int64).type_as(inv_freq), inv_freq)
    return (freqs.cos() * mscale).numpy(), (freqs.sin() * mscale).numpy()


@pytest.mark.parametrize(("theta", "mscale"), [(10_000.0, 1.0), (1_000_000.0, 1.0), (10_000.0, 1.2)])
def test_gemma_sized_caches_are_reproduced_by_the_nodes(theta: float, mscale: float) -> None:
    cos, sin = _builder_caches(theta, 32768, 256, mscale)  # Gemma-3-270M: 32768 positions, head_dim 256
    nodes, inits, report = rope.replacement([("cos_cache", "sin_cache", cos, sin)], 21)
    assert {n.op_type for n in nodes} == {"Range", "Cast", "Unsqueeze", "Mul", "Cos", "Sin"}
    assert report["replaced"] == ["cos_cache", "sin_cache"] and report["max_abs_diff"] <= np.spacing(np.float32(mscale)), report  # an ulp
    recovered = rope.recover(cos, sin)
    assert recovered is not None and recovered[1] == np.float32(mscale)
    assert np.array_equal(recovered[0], _builder_inv_freq(theta, 256).numpy())  # bitwise the builder's
    assert report["bytes_saved"] == 2 * cos.nbytes
    assert sum(t.ByteSize() for t in inits) < 2048  # inv_freq and a few scalars instead of 64 MB


def test_a_cache_that_is_not_cos_of_positions_stays_stored() -> None:
    cos, sin = _builder_caches(10_000.0, 64, 16)
    cos[40] = 1.0  # e.g. long/short caches concatenated: no single inv_freq
    assert rope.recover(cos, sin) is None
    nodes, inits, report = rope.replacement([("c", "s", cos, sin)], 21)
    assert not nodes and not inits and report["kept"] == ["c", "s"]


def _cache_inits(path: Path) -> list[str]:
    return [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
            if t.name.startswith(("cos_cache", "sin_cache"))]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_the_genai_export_computes_its_caches_and_its_logits_are_the_stored_ones(
    kind: str, lm_dirs: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = lm_dirs(kind)
    module = load_lm(folder)
    path = tmp_path / "model.onnx"
    layout = export_causal_lm(module, path, hf_dir=folder, method="genai", generate_tokens=8)
    stored = tmp_path / "stored" / "model.onnx"
    with monkeypatch.context() as m:  # the export as it was: caches kept as initializers
        m.setattr(lm_export, "compact_rope_caches", lambda proto: {"replaced": [], "bytes_saved": 0,
                                                                   "max_abs_diff": 0.0})
        export_causal_lm(module, stored, hf_dir=folder, method="genai", generate_tokens=8)

    names = ["cos_cache", "sin_cache"] if kind == "llama" else [
        f"{f}_cache_{b}" for b in ("local", "global") for f in ("cos", "sin")]
    assert sorted(layout.rope_caches["computed"]) == sorted(names) and layout.rope_caches["max_abs_diff"] <= 6e-8
    assert _cache_inits(path) == [] and sorted(_cache_inits(stored)) == sorted(names)
    assert path.stat().st_size < stored.stat().st_size - layout.rope_caches["bytes_saved"] + 4096
    assert layout.parity["greedy_identical"]

    # ONNX Runtime folds the nodes at load (default optimizations): no rope node left in the optimized graph
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert not [n for n in optimized.graph.node if n.name.startswith(rope.PREFIX)]
    assert sorted(_cache_inits(tmp_path / "optimized.onnx")) == sorted(names)

    ids, mask = _check_text(int(module.config.vocab_size))
    got, want = LMSession(path).logits(ids, mask), LMSession(stored).logits(ids, mask)
    assert np.abs(got - want)[mask.astype(bool)].max() < 1e-5
    prompt = [int(t) for t in ids[0, :12]]
    assert LMSession(path).generate(prompt, 16) == LMSession(stored).generate(prompt, 16)


def test_fp16_keeps_the_computed_caches_in_float32(lm_dirs: Callable[[str], Path], tmp_path: Path) -> None:
    from worker.passes.quantizers.ort import to_fp16

    folder = lm_dirs("llama")
    path = tmp_path / "model.onnx"
    export_causal_lm(load_lm(folder), path, hf_dir=folder, method="genai", generate_tokens=4)
    out = to_fp16(path, tmp_path / "fp16.onnx", QuantizeStep(type="quantize", mode="fp16"))
    m = onnx.load(str(out))
    inits: dict[str, Any] = {t.name: t for t in m.graph.initializer}
    assert inits[f"{rope.PREFIX}/0/inv_freq"].data_type == onnx.TensorProto.FLOAT
    positions = next(n for n in m.graph.node if n.name == f"{rope.PREFIX}/positions_256/Cast")
    assert onnx.helper.get_attribute_value(positions.attribute[0]) == onnx.TensorProto.FLOAT
    cos = next(n for n in m.graph.node if n.name == f"{rope.PREFIX}/0/Cos")
    assert not {i for i in cos.input} & {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    ids, mask = _check_text(int(load_lm(folder).config.vocab_size))
    half, full = LMSession(out).logits(ids, mask), LMSession(path).logits(ids, mask)
    assert np.abs(half - full)[mask.astype(bool)].max() < 0.05
