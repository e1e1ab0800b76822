"""ORT quantization on the digits MLP (smaller files, close outputs, accuracy kept, exclusions honoured) and
weight-only INT4/INT8 on a tiny trained causal LM (MatMulNBits, per-node bits, embeddings, logits vs fp32)."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.spec import JobSpec, QuantizeStep
from tests.factories import digits_split
from tests.factories_lm import licence_paragraphs, tiny_lm_dir
from tests.worker.conftest import DigitsFiles, looping_context
from worker.context import LocalContext
from worker.core import ArrayDataset, JobCancelled, StepFailed, WorkingModel
from worker.formats.onnx_model import count_params
from worker.passes import REGISTRY
from worker.passes.quantize import QuantizePass


def _ctx(tmp_path: Path, files: DigitsFiles, cls: type[LocalContext] = LocalContext) -> LocalContext:
    spec = JobSpec.model_validate({"model": "mdl_mlp", "data": {"train": "ds_train", "eval": "ds_eval"}})
    return files.context(tmp_path / "work", spec, cls)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"pixels": x})[0], dtype=np.float32)


def _accuracy(path: Path) -> float:
    _, (x, y) = digits_split()
    return float((_run(path, x).argmax(1) == y).mean())


def _quantize(
    tmp_path: Path, files: DigitsFiles, **params: Any
) -> tuple[WorkingModel, dict[str, Any], LocalContext]:
    ctx = _ctx(tmp_path, files)
    model = ctx.load_model("input")
    result = QuantizePass().run(model, QuantizeStep(type="quantize", **params), ctx)
    assert result.model.onnx_path is not None and result.model.onnx_path.parent == ctx.workdir
    assert result.model.input_names == ["pixels"] and result.model.output_names == ["logits"]
    return result.model, result.metrics, ctx


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_registered_with_form_and_paper() -> None:
    assert REGISTRY["quantize"] is QuantizePass and QuantizePass.takes == "onnx"
    assert "Jacob et al. 2018" in (QuantizePass.__doc__ or "")


def test_dynamic_int8_is_smaller_and_keeps_accuracy(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    model, metrics, ctx = _quantize(tmp_path, digits_mlp, mode="dynamic")
    assert model.onnx_path is not None
    ratio = digits_mlp.model.stat().st_size / model.onnx_path.stat().st_size
    assert ratio >= 2.5 and metrics["size_ratio"] == pytest.approx(ratio)
    assert metrics["quantized_ops"].get("MatMulInteger", 0) == 3
    assert count_params(onnx.load(str(model.onnx_path))) == 85002  # same weights, 8-bit
    _, (x, _) = digits_split()
    ref, out = _run(digits_mlp.model, x), _run(model.onnx_path, x)
    assert np.abs(ref - out).max() < 0.05 * np.abs(ref).max()
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.97
    assert _accuracy(model.onnx_path) >= _accuracy(digits_mlp.model) - 0.02
    assert any(e["kind"] == "progress" for e in ctx.events)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_qdq_with_each_calibration_method(
    tmp_path: Path, digits_mlp: DigitsFiles, method: str
) -> None:
    model, metrics, ctx = _quantize(
        tmp_path, digits_mlp, mode="static", calibration={"method": method, "samples": 100}
    )
    assert model.onnx_path is not None
    ops = _ops(model.onnx_path)
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    assert metrics["calibration"]["samples"] == 100 and metrics["calibration"]["method"] == method
    assert _accuracy(model.onnx_path) >= _accuracy(digits_mlp.model) - 0.03
    calibrating = [e for e in ctx.events if e["kind"] == "progress" and e["phase"] == "calibrating"]
    assert len(calibrating) >= 4  # 100 samples in batches of 32 (25 for histograms), reported per batch


def test_fp16_has_half_weights_and_close_outputs(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    model, metrics, _ = _quantize(tmp_path, digits_mlp, mode="fp16")
    assert model.onnx_path is not None
    proto = onnx.load(str(model.onnx_path))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    onnx.checker.check_model(proto)
    _, (x, _) = digits_split()
    np.testing.assert_allclose(_run(model.onnx_path, x), _run(digits_mlp.model, x), atol=1e-2)
    assert metrics["size_ratio"] > 1.9


def _gemm_weights_are_float(path: Path) -> list[bool]:
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type in ("Gemm", "MatMul") and n.input[1] in inits:
            out.append(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)
        elif n.op_type in ("Gemm", "MatMul"):
            out.append(False)  # fed by DequantizeLinear
    return out


def test_excluded_op_types_stay_float(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    static, _, _ = _quantize(tmp_path / "s", digits_mlp, mode="static", op_types_to_exclude=["Gemm"])
    assert static.onnx_path is not None
    assert all(_gemm_weights_are_float(static.onnx_path))
    dynamic, _, _ = _quantize(tmp_path / "d", digits_mlp, mode="dynamic", op_types_to_exclude=["Gemm"])
    assert dynamic.onnx_path is not None
    assert "MatMulInteger" not in _ops(dynamic.onnx_path) and all(_gemm_weights_are_float(dynamic.onnx_path))


def test_excluded_node_stays_float(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    last = next(n.name for n in reversed(onnx.load(str(digits_mlp.model)).graph.node) if n.op_type == "Gemm")
    model, _, _ = _quantize(tmp_path, digits_mlp, mode="static", nodes_to_exclude=[last])
    assert model.onnx_path is not None
    assert _gemm_weights_are_float(model.onnx_path) == [False, False, True]


def test_cancellation_during_calibration(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    class CancelWhileCalibrating(LocalContext):
        def progress(self, phase: str, **kw: Any) -> None:
            super().progress(phase, **kw)
            if phase == "calibrating":
                self.cancelled = True

    ctx = _ctx(tmp_path, digits_mlp, CancelWhileCalibrating)
    model = ctx.load_model("input")
    with pytest.raises(JobCancelled):
        QuantizePass().run(model, QuantizeStep(type="quantize", mode="static"), ctx)
    assert not list(ctx.workdir.glob("quantized-static*.onnx"))


@pytest.mark.usefixtures("fast_cancel_poll")
def test_calibrating_a_looping_graph_ends_at_a_cancel_within_seconds(tmp_path: Path) -> None:
    ctx = looping_context(tmp_path / "work", cancel_after_s=1.5)
    with pytest.raises(JobCancelled):
        QuantizePass().run(ctx.load_model("input"), QuantizeStep(type="quantize", mode="static"), ctx)
    assert ctx.cancel_at is not None and time.monotonic() - ctx.cancel_at <= 10  # the bound
    assert ctx.seen_by[0] == "ort-watchdog"  # the cancel stopped the calibration run itself


def test_calibrating_a_looping_graph_fails_with_run_time_limit_past_the_cap(tmp_path: Path, run_cap_1s: float) -> None:
    ctx = looping_context(tmp_path / "work")
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        QuantizePass().run(ctx.load_model("input"), QuantizeStep(type="quantize", mode="static"), ctx)
    assert failed.value.code == "run_time_limit" and "(calibration)" in failed.value.message
    assert "MODELPRESS_RUN_MAX_S=1 s" in failed.value.message and time.monotonic() - started < 8


def test_reduce_range_follows_the_cpu_unless_the_spec_says() -> None:
    from worker.passes.quantizers.ort import lacks_vnni, reduce_range

    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
    vnni = "processor : 0\nflags : fpu sse2 avx avx2 avx512f avx512_vnni\n"
    assert lacks_vnni("x86_64", avx2) is True
    assert lacks_vnni("x86_64", vnni) is False
    assert lacks_vnni("x86_64", avx2.replace("fma", "avx_vnni")) is False
    assert lacks_vnni("aarch64", avx2) is False  # Arm int8 kernels (sdot) do not saturate
    assert lacks_vnni("x86_64", None) is True
    assert reduce_range(QuantizeStep(type="quantize", reduce_range=False)) is False
    assert reduce_range(QuantizeStep(type="quantize", reduce_range=True)) is True


def test_dynamic_reduce_range_is_reported_and_stays_close(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    model, metrics, _ = _quantize(tmp_path, digits_mlp, mode="dynamic", reduce_range=True)
    assert metrics["reduce_range"] is True
    assert model.onnx_path is not None
    _, (x, _) = digits_split()
    ref, out = _run(digits_mlp.model, x), _run(model.onnx_path, x)
    assert np.abs(ref - out).max() < 0.05 * np.abs(ref).max()


# -- weight-only INT4 / INT8 on a causal LM ---------------------------------------------------------------

LM_T = 48


@dataclass(frozen=True)
class LMFiles:
    """A tiny Llama briefly trained on licence text, exported to ONNX (logits, no cache), and token rows."""

    onnx: Path
    data: ArrayDataset
    gpt2_onnx: Path
    hf_dir: Path


class _LMContext(LocalContext):
    def __init__(self, workdir: Path, data: ArrayDataset | None, roles: dict[str, str] | None = None) -> None:
        spec = JobSpec.model_validate({"model": "mdl_lm", "task": "text-generation", "data": roles or {}})
        super().__init__(workdir, spec, models={}, device="cpu")
        self.data = data

    def dataset(self, role: Any, model: WorkingModel) -> ArrayDataset | None:
        return self.data


def _export_logits(module: Any, path: Path, ids: Any) -> Path:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    axes = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "logits")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LMFiles:
    """Trained for 80 AdamW steps so its logits are peaked (a random-init LM's near-uniform logits make
    top-1 agreement a coin toss under any quantization)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lm")
    folder = tiny_lm_dir(root / "llama", hidden=128, heads=4, kv_heads=2, layers=2)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [t for p in licence_paragraphs() for t in tok(p)["input_ids"]]
    rows = torch.tensor(ids[: len(ids) // LM_T * LM_T]).view(-1, LM_T)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times slower on two contended threads
    try:
        for _ in range(80):
            batch = rows[torch.randint(0, len(rows), (16,))]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 4.0, f"the tiny LM trained to a loss of only {loss.item():.2f}"
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)  # the trained weights, for the KV-cache export
    held = rows[-24:].numpy().astype(np.int64)
    data = ArrayDataset(
        inputs={"input_ids": held, "attention_mask": np.ones_like(held)}, labels=held.copy(), meta={"shape": "text"}
    )
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_lm_dir(root / "gpt2", kind="gpt2", hidden=64, layers=2)).eval()
    return LMFiles(
        onnx=_export_logits(model, root / "llama.onnx", rows[:2]),
        data=data,
        gpt2_onnx=_export_logits(gpt2, root / "gpt2.onnx", rows[:2]),
        hf_dir=folder,
    )


def _logits(path: Path, data: ArrayDataset) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], dict(data.inputs))[0], dtype=np.float64)


def _track(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || got) in nats) over every token."""
    def logp(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return np.asarray(x - np.log(np.exp(x).sum(-1, keepdims=True)))

    lr, lg = logp(ref), logp(got)
    kl = float((np.exp(lr) * (lr - lg)).sum(-1).mean())
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), kl


def _quantize_lm(tmp_path: Path, src: Path, data: ArrayDataset | None, roles: dict[str, str] | None = None,
                 **params: Any) -> tuple[Path, dict[str, Any]]:
    ctx = _LMContext(tmp_path / "work", data, roles)
    model = WorkingModel(form="onnx", origin="hf", input_names=["input_ids", "attention_mask"],
                         output_names=["logits"], onnx_path=src, meta={"hf_task": "text-generation"})
    result = QuantizePass().run(model, QuantizeStep(type="quantize", **params), ctx)
    assert result.model.onnx_path is not None and result.model.meta["quantized"] == params["mode"]
    return result.model.onnx_path, result.metrics


def _nbits(path: Path) -> dict[str, int]:
    """MatMulNBits node name -> its ``bits`` attribute."""
    return {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"}


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq"])
def test_int4_loads_in_ort_is_smaller_and_its_logits_track_fp32(
    tmp_path: Path, lm: LMFiles, algorithm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", algorithm=algorithm, block_size=32)
    # ORT's per-node INFO lines and GPTQ's stdout progress bar stay out of the worker's output
    assert "Progress" not in capsys.readouterr().out
    assert logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").getEffectiveLevel() >= logging.WARNING
    bits = _nbits(out)
    # 2 layers x (q, k, v, o, gate, up, down) at 4 bits; the head (last MatMul) at the default 8 bits
    assert sorted(bits.values()) == [4] * 14 + [8] and bits["/m/lm_head/MatMul_Q8"] == 8
    proto = onnx.load(str(out))
    weights = {t.name for t in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert metrics["weight_only"]["algorithm"] == algorithm and metrics["weight_only"]["block_size"] == 32
    assert metrics["weight_only"]["matmul_bits"] == {"4": 14, "8": 1}
    assert metrics["quantized_ops"]["MatMulNBits"] == 15
    assert metrics["size_ratio"] > 2.0 and metrics["size_bytes_after"] == out.stat().st_size
    top1, kl = _track(_logits(lm.onnx, lm.data), _logits(out, lm.data))
    assert top1 >= 0.85 and kl < 0.1, (top1, kl)
    if algorithm == "gptq":
        assert metrics["weight_only"]["calibration"]["samples"] == len(lm.data)


def test_int4_matches_ort_quantizer_called_by_hand(tmp_path: Path, lm: LMFiles) -> None:
    """rtn with the head at 4 bits and no accuracy level is exactly ORT's quantizer with the same settings."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out, _ = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", algorithm="rtn", block_size=64, symmetric=True,
                          accuracy_level=0, bits={}, quantize_embeddings=False)
    q = MatMulNBitsQuantizer(onnx.load(str(lm.onnx)), block_size=64, is_symmetric=True, accuracy_level=0)
    q.process()
    onnx.save(q.model.model, str(tmp_path / "by-hand.onnx"))
    np.testing.assert_allclose(_logits(out, lm.data), _logits(tmp_path / "by-hand.onnx", lm.data), atol=1e-5)


def test_bits_override_keeps_the_matching_matmuls_at_8_bits(tmp_path: Path, lm: LMFiles) -> None:
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", algorithm="hqq",
                                bits={"*mlp/down_proj*": 8})
    bits = _nbits(out)
    eight = sorted(name for name, b in bits.items() if b == 8)
    assert eight == ["/m/model/layers.0/mlp/down_proj/MatMul_Q8", "/m/model/layers.1/mlp/down_proj/MatMul_Q8"]
    assert bits["/m/lm_head/MatMul_Q4"] == 4  # an explicit ``bits`` replaces the default head override
    assert metrics["weight_only"]["bits_overrides"] == {
        "/m/model/layers.0/mlp/down_proj/MatMul": 8, "/m/model/layers.1/mlp/down_proj/MatMul": 8}
    top1, kl = _track(_logits(lm.onnx, lm.data), _logits(out, lm.data))
    assert top1 >= 0.8 and kl < 0.15, (top1, kl)


def test_op_type_pattern_override_and_int8_weight(tmp_path: Path, lm: LMFiles) -> None:
    out, _ = _quantize_lm(tmp_path / "a", lm.onnx, lm.data, mode="int4", bits={"MatMul": 8})
    assert set(_nbits(out).values()) == {8}
    out8, metrics8 = _quantize_lm(tmp_path / "b", lm.onnx, lm.data, mode="int8_weight")
    assert set(_nbits(out8).values()) == {8} and metrics8["weight_only"]["algorithm"] == "rtn"
    top1, kl = _track(_logits(lm.onnx, lm.data), _logits(out8, lm.data))
    assert top1 >= 0.97 and kl < 0.005, (top1, kl)


def test_quantize_embeddings_writes_gather_block_quantized(tmp_path: Path, lm: LMFiles) -> None:
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", quantize_embeddings=True)
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and metrics["weight_only"]["embeddings"] == 1
    assert next(o.version for o in proto.opset_import if o.domain == "") == 21
    embed = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits[embed.input[0]].data_type == onnx.TensorProto.UINT4
    top1, kl = _track(_logits(lm.onnx, lm.data), _logits(out, lm.data))
    assert top1 >= 0.85 and kl < 0.1, (top1, kl)


def test_embeddings_at_8_bits_write_an_8_bit_gather_block_quantized(tmp_path: Path, lm: LMFiles) -> None:
    """``bits: {"Gather": 8}``: the table becomes uint8 codes with a scale and zero point per block (ORT's
    quantizer writes 4 bits only); ORT runs it and the logits stay closer to fp32 than with a 4-bit table."""
    out, metrics = _quantize_lm(tmp_path / "a", lm.onnx, lm.data, mode="int4", quantize_embeddings=True,
                                bits={"*lm_head*": 8, "Gather": 8})
    proto = onnx.load(str(out))
    embed = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(embed) == 1 and next(a.i for a in embed[0].attribute if a.name == "bits") == 8
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits[embed[0].input[0]].data_type == onnx.TensorProto.UINT8
    assert not [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
                and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT]
    assert metrics["weight_only"]["embedding_bits"] == {"8": 1}
    out4, _ = _quantize_lm(tmp_path / "b", lm.onnx, lm.data, mode="int4", quantize_embeddings=True,
                           bits={"*lm_head*": 8})
    ref = _logits(lm.onnx, lm.data)
    (top1, kl), (_, kl4) = _track(ref, _logits(out, lm.data)), _track(ref, _logits(out4, lm.data))
    assert top1 >= 0.85 and kl < 0.1 and kl < kl4, (top1, kl, kl4)


def test_int8_share_keeps_the_layer_with_the_highest_measured_kl_at_8_bits(tmp_path: Path, lm: LMFiles) -> None:
    """``int8_share: 0.5`` on a 2-layer Llama: each layer alone at 4 bits is judged by KL to the float model on
    the calibration rows, and the worse one goes to 8 bits (all its MatMuls), the other stays at 4."""
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", int8_share=0.5)
    mixed = metrics["weight_only"]["mixed_bits"]
    kl = {int(k): v for k, v in mixed["kl_per_layer"].items()}
    assert set(kl) == {0, 1} and all(v > 0 for v in kl.values())
    worst = max(kl, key=lambda k: kl[k])
    assert mixed["layers_at_8_bits"] == [worst]
    bits = _nbits(out)
    for name, b in bits.items():
        if "lm_head" not in name:
            assert b == (8 if f"layers.{worst}/" in name else 4), (name, b)
    assert metrics["weight_only"]["matmul_bits"] == {"4": 7, "8": 8}
    plain, _ = _quantize_lm(tmp_path / "plain", lm.onnx, lm.data, mode="int4", int8_share=0.0)
    ref = _logits(lm.onnx, lm.data)
    assert _track(ref, _logits(out, lm.data))[1] < _track(ref, _logits(plain, lm.data))[1]


def test_int8_share_without_calibration_text_keeps_every_layer_at_4_bits(tmp_path: Path, lm: LMFiles) -> None:
    _, metrics = _quantize_lm(tmp_path, lm.onnx, None, mode="int4", int8_share=0.5)
    assert "mixed_bits" not in metrics["weight_only"] and metrics["weight_only"]["matmul_bits"] == {"4": 14, "8": 1}


def test_int4_quantizes_the_embeddings_by_default_at_4_bits_where_tied_else_at_8(
    tmp_path: Path, lm: LMFiles
) -> None:
    """GPT-2 ties its head to the token embeddings: its tables go to 4 bits; the Llama here does not: its
    table goes to 8 bits; a spec's explicit ``quantize_embeddings: false`` wins."""
    from worker.passes.quantizers.weight_only import tied_embeddings

    assert tied_embeddings(onnx.load(str(lm.gpt2_onnx))) and not tied_embeddings(onnx.load(str(lm.onnx)))
    ops = lambda path: [n.op_type for n in onnx.load(str(path)).graph.node]  # noqa: E731
    gpt2, metrics = _quantize_lm(tmp_path / "g", lm.gpt2_onnx, None, mode="int4")
    # both of its tables: tokens and (GPT-2's learned) positions
    assert ops(gpt2).count("GatherBlockQuantized") == 2 and metrics["weight_only"]["embeddings"] == 2
    kept, _ = _quantize_lm(tmp_path / "k", lm.gpt2_onnx, None, mode="int4", quantize_embeddings=False)
    assert "GatherBlockQuantized" not in ops(kept) and gpt2.stat().st_size < 0.8 * kept.stat().st_size
    assert metrics["weight_only"]["embedding_bits"] == {"4": 2}
    llama, metrics = _quantize_lm(tmp_path / "l", lm.onnx, None, mode="int4")
    assert ops(llama).count("GatherBlockQuantized") == 1 and metrics["weight_only"]["embedding_bits"] == {"8": 1}
    assert not metrics["weight_only"]["shared_embeddings"]  # untied: its own table, as before
    eight, _ = _quantize_lm(tmp_path / "e", lm.gpt2_onnx, None, mode="int8_weight")  # 4-bit tables only
    assert "GatherBlockQuantized" not in ops(eight)


@pytest.fixture(scope="module")
def gemma3_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Gemma3 (tied head, hidden 96, vocab ~384) exported by the genai builder, as the
    service does: its token Gather reads the head's float weight through a Transpose."""
    from transformers import AutoModelForCausalLM

    from worker.lm.export import export_causal_lm

    root = tmp_path_factory.mktemp("gemma3")
    folder = tiny_lm_dir(root / "hf", kind="gemma3", layers=2, hidden=96, heads=2, kv_heads=1)
    path = root / "model.onnx"
    export_causal_lm(AutoModelForCausalLM.from_pretrained(folder).eval(), path, hf_dir=folder, method="genai",
                     generate_tokens=2)
    return path


def _with_output(path: Path, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The value ``name`` inside the graph at ``path`` for ``feeds`` (an empty past for a KV-cache file)."""
    m = onnx.load(str(path))
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    b = len(feeds["input_ids"])
    past = {i.name: np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values")}
    return np.asarray(sess.run([name], {**feeds, **past})[0])


@pytest.mark.parametrize("block_size", [32, 64])  # 96 = 3 blocks of 32; 2 blocks of 64 pad each row by 32
def test_int4_tied_head_and_token_lookup_share_one_quantized_table(
    tmp_path: Path, gemma3_onnx: Path, block_size: int
) -> None:
    """The genai builder's tied head (Gather over Transpose(head weight)): the head's 8-bit MatMulNBits bytes
    are the lookup's GatherBlockQuantized table, the float table is gone (the file shrinks by it), the
    embeddings are the table's 8-bit rows, the logits track fp32; at the head's 4 bits, the table too."""
    from worker.lm.session import LMSession

    float_table, _ = _quantize_lm(tmp_path / "f", gemma3_onnx, None, mode="int4", block_size=block_size,
                                  quantize_embeddings=False)
    out, metrics = _quantize_lm(tmp_path / "s", gemma3_onnx, None, mode="int4", block_size=block_size)
    proto = onnx.load(str(out))
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    lookup = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in proto.graph.node if n.output[0] == lookup.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # the same bytes
    assert list(lookup.input[2:]) == list(head.input[2:4])  # the same scales and zero points
    assert {a.name: a.i for a in lookup.attribute}["bits"] == 8 == {a.name: a.i for a in head.attribute}["bits"]
    assert "Transpose" not in [n.op_type for n in proto.graph.node]
    vocab, hidden = next(a.i for a in head.attribute if a.name == "N"), 96
    assert not [t.name for t in proto.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) == vocab * hidden]
    assert float_table.stat().st_size - out.stat().st_size == pytest.approx(vocab * hidden * 4, rel=0.01)
    assert metrics["weight_only"]["shared_embeddings"] and metrics["weight_only"]["embedding_bits"] == {"8": 1}

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 20)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    scaled = "/model/embed_tokens/Mul/output_0"  # the looked-up rows times sqrt(hidden)
    ref_emb, got_emb = _with_output(gemma3_onnx, scaled, feeds), _with_output(out, scaled, feeds)
    assert got_emb.shape == ref_emb.shape and np.abs(got_emb - ref_emb).max() < 0.01 * np.abs(ref_emb).max()
    ref = LMSession(gemma3_onnx).logits(ids, feeds["attention_mask"])
    _, kl = _track(ref, LMSession(out).logits(ids, feeds["attention_mask"]))
    _, kl_float = _track(ref, LMSession(float_table).logits(ids, feeds["attention_mask"]))
    assert kl < 0.01 and kl < 1.5 * kl_float, (kl, kl_float)

    four, metrics = _quantize_lm(tmp_path / "4", gemma3_onnx, None, mode="int4", block_size=block_size,
                                 bits={"*embed_tokens/Gather": 4})  # a pattern naming the lookup moves the head
    assert metrics["weight_only"]["embedding_bits"] == {"4": 1} and metrics["weight_only"]["matmul_bits"] == {"4": 11}
    err = np.abs(_with_output(four, scaled, feeds) - ref_emb)
    assert 0.01 * np.abs(ref_emb).max() < err.max() < 0.2 * np.abs(ref_emb).max()  # 4-bit rows, not garbage


def test_excluded_nodes_and_op_types_stay_float(tmp_path: Path, lm: LMFiles) -> None:
    q_proj = "/m/model/layers.0/self_attn/q_proj/MatMul"
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", quantize_embeddings=True,
                                nodes_to_exclude=[q_proj], op_types_to_exclude=["Gather"])
    proto = onnx.load(str(out))
    node = next(n for n in proto.graph.node if n.name == q_proj)
    inits = {t.name: t for t in proto.graph.initializer}
    assert node.op_type == "MatMul" and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
    assert "GatherBlockQuantized" not in [n.op_type for n in proto.graph.node]
    assert len(_nbits(out)) == 14
    assert {e["node"] for e in metrics["weight_only"]["excluded"]} == {q_proj, "/m/model/embed_tokens/Gather"}


def test_gpt2_gemm_weights_become_matmul_nbits(tmp_path: Path, lm: LMFiles) -> None:
    """GPT-2's Conv1D exports as Gemm: rewritten to MatMul + Add so its weights are quantized too."""
    assert "Gemm" in _ops(lm.gpt2_onnx)
    out, _ = _quantize_lm(tmp_path, lm.gpt2_onnx, None, mode="int8_weight")
    assert "Gemm" not in _ops(out) and len(_nbits(out)) == 2 * 4 + 1
    ref, got = _logits(lm.gpt2_onnx, lm.data), _logits(out, lm.data)
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("mode", ["dynamic", "fp16"])
def test_dynamic_and_fp16_still_work_on_an_lm(tmp_path: Path, lm: LMFiles, mode: str) -> None:
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode=mode)
    assert metrics["size_ratio"] > 1.5
    top1, kl = _track(_logits(lm.onnx, lm.data), _logits(out, lm.data))
    assert top1 >= 0.9 and kl < 0.05, (top1, kl)


def test_weight_only_failures_say_why(tmp_path: Path, lm: LMFiles) -> None:
    with pytest.raises(StepFailed) as e:
        _quantize_lm(tmp_path / "a", lm.onnx, None, mode="int4", algorithm="gptq")
    assert e.value.code == "calibration_data_missing"
    with pytest.raises(StepFailed) as e:
        _quantize_lm(tmp_path / "b", lm.onnx, None, mode="int8_weight", algorithm="hqq")
    assert e.value.code == "unsupported_algorithm" and "zero points" in e.value.message
    with pytest.raises(StepFailed) as e:
        _quantize_lm(tmp_path / "c", lm.onnx, None, mode="int4", op_types_to_exclude=["MatMul", "Gather"])
    assert e.value.code == "nothing_to_quantize" and "16 excluded" in e.value.message
    assert not list((tmp_path / "c" / "work").glob("quantized-*.onnx"))


def test_calibration_feeds_fill_an_empty_kv_cache_and_positions(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from worker.passes.quantizers.weight_only import calibration_feeds

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 16]),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT16, ["batch", 2, "past", 16]),
    ]
    ids = np.arange(30, dtype=np.int32).reshape(5, 6)
    mask = np.ones((5, 6), dtype=np.int64)
    mask[1, 4:] = 0
    data = ArrayDataset(inputs={"input_ids": ids, "attention_mask": mask})
    feeds = list(calibration_feeds(data, inputs, 2, _LMContext(tmp_path, data)))
    assert [f["input_ids"].shape[0] for f in feeds] == [2, 2, 1] and feeds[0]["input_ids"].dtype == np.int64
    assert feeds[0]["past_key_values.0.key"].shape == (2, 2, 0, 16)
    assert feeds[2]["past_key_values.0.value"].dtype == np.float16
    assert feeds[0]["position_ids"][1].tolist() == [0, 1, 2, 3, 3, 3]
    with pytest.raises(StepFailed) as e:
        list(calibration_feeds(ArrayDataset(inputs={"input_ids": ids}), inputs, 2, _LMContext(tmp_path, data)))
    assert e.value.code == "calibration_data_mismatch" and "attention_mask" in e.value.message


@pytest.mark.parametrize(("roles", "algorithm"), [({"calibration": "ds_cal"}, "gptq"), ({"train": "ds_tr"}, "gptq"),
                                                 ({"eval": "ds_ev"}, "rtn")])
def test_int4_default_algorithm_is_gptq_with_calibration_text_never_on_the_eval_set(
    tmp_path: Path, lm: LMFiles, roles: dict[str, str], algorithm: str
) -> None:
    """GPTQ by default when the job gives calibration or train text; with only eval text, RTN (GPTQ calibrated on
    the eval set would flatter the perplexity measured on it)."""
    _, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, roles, mode="int4")
    assert metrics["weight_only"]["algorithm"] == algorithm
    assert ("calibration" in metrics["weight_only"]) == (algorithm == "gptq")


def test_gptq_asymmetric_with_an_odd_block_count_per_column(tmp_path: Path, lm: LMFiles) -> None:
    """K / block_size odd (q_proj: K = 128, one block of 128) keeps its zero points: the packed zero-point row
    is padded to a whole byte (ORT's own GPTQ broke there)."""
    out, metrics = _quantize_lm(tmp_path, lm.onnx, lm.data, mode="int4", algorithm="gptq", block_size=128,
                                symmetric=False)
    proto = onnx.load(str(out))
    four = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.attribute and _nbits(out)[n.name] == 4]
    assert len(four) == 14 and all(len(n.input) == 4 for n in four)  # A, B, scales, zero points
    assert len(_nbits(out)) == 15
    calib = metrics["weight_only"]["calibration"]
    assert calib["method"] == "gptq" and 0 < calib["mean_output_error"] < 0.5
    top1, kl = _track(_logits(lm.onnx, lm.data), _logits(out, lm.data))
    assert top1 >= 0.8 and kl < 0.15, (top1, kl)


@pytest.mark.parametrize("method", ["torch", "genai"])
def test_every_mode_on_a_kv_cache_export(tmp_path: Path, lm: LMFiles, method: str) -> None:
    """On lmeval's KV-cache export (past_key_values inputs; GroupQueryAttention from the genai builder): each
    file loads, its logits track fp32 and greedy decoding with the cache matches its own full-sequence argmax."""
    export = pytest.importorskip("worker.lm.export")
    session = pytest.importorskip("worker.lm.session")
    from transformers import AutoModelForCausalLM

    src = tmp_path / "kv.onnx"
    export.export_causal_lm(AutoModelForCausalLM.from_pretrained(lm.hf_dir).eval(), src, hf_dir=lm.hf_dir,
                            method=method)
    ids, mask = lm.data.inputs["input_ids"][:8], lm.data.inputs["attention_mask"][:8]
    ref = session.LMSession(src).logits(ids, mask).astype(np.float64)
    for params in ({"mode": "int4", "algorithm": "gptq"}, {"mode": "int4"}, {"mode": "int8_weight"},
                   {"mode": "dynamic"}, {"mode": "fp16"}):
        out, _ = _quantize_lm(tmp_path / "-".join(map(str, params.values())), src, lm.data, **params)
        s = session.LMSession(out)
        top1, kl = _track(ref, s.logits(ids, mask).astype(np.float64))
        assert top1 >= 0.85 and kl < 0.1, (params, top1, kl)
        prompt = ids[0, :8].tolist()
        new = s.generate(prompt, 6)
        full = s.logits(np.asarray([prompt + new[:-1]]), np.ones((1, len(prompt) + 5), dtype=np.int64))
        assert new == full[0, len(prompt) - 1 :].argmax(-1).tolist(), params


def test_int8_share_s_sensitivity_runs_of_a_looping_lm_fail_with_run_time_limit(
    tmp_path: Path, run_cap_1s: float
) -> None:
    from tests.factories_onnx import looping_lm
    from worker.passes.quantizers import mixed_bits

    ctx = looping_context(tmp_path / "work")
    ids = np.ones((1, 4), np.int64)
    past = np.zeros((1, 1, 0, 2), np.float32)
    feeds = [{"input_ids": ids, "attention_mask": ids, "past_key_values.0.key": past, "past_key_values.0.value": past}]
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        mixed_bits.kl_per_layer(looping_lm(), {0: ["MatMul"]}, lambda m, names: m, feeds, ctx)
    assert failed.value.code == "run_time_limit" and "(int8_share sensitivity)" in failed.value.message
    assert time.monotonic() - started < 5


@pytest.mark.usefixtures("fast_cancel_poll")
def test_gptq_s_calibration_runs_of_a_looping_graph_end_at_a_cancel_within_seconds(tmp_path: Path) -> None:
    from tests.factories_onnx import looping_model
    from worker.passes.quantizers import weight_only

    ctx = looping_context(tmp_path / "work", cancel_after_s=1.5)
    m = looping_model(2**40, constant=False)
    next(n for n in m.graph.node if n.op_type == "MatMul").name = "head"
    p = QuantizeStep(type="quantize", mode="int4", algorithm="gptq", block_size=16)
    with pytest.raises(JobCancelled):
        weight_only.gptq(m, ["head"], weight_only.WeightOnlySettings.resolve(p), p, ctx.load_model("input"), ctx, False)
    assert ctx.cancel_at is not None and time.monotonic() - ctx.cancel_at <= 10 and ctx.seen_by[0] == "ort-watchdog"
