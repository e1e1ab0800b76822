"""The evaluation harness: real ORT latency, accuracy equal to a hand computation, exact self-fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.spec import EvaluateConfig
from tests.factories import digits_split, export_onnx
from tests.worker.conftest import DigitsFiles
from worker.core import ArrayDataset
from worker.evaluate import evaluate

FAST = EvaluateConfig.model_validate(
    {"latency": {"warmup": 2, "runs": 12, "batch_size": 4}, "batch_size": 100}
)


def _eval_data() -> ArrayDataset:
    _, (x, y) = digits_split()
    return ArrayDataset({"pixels": x}, y)


def _numpy_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """The MLP's logits computed by hand from its initializers (Gemm: x @ W.T + b, ReLU between)."""
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h = x.astype(np.float64)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    for i, node in enumerate(gemms):
        w, b = weights[node.input[1]], weights[node.input[2]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        h = h @ (w.T if trans_b else w) + b
        if i < len(gemms) - 1:
            h = np.maximum(h, 0)
    return h


def test_latency_accuracy_and_size(digits_mlp: DigitsFiles) -> None:
    data = _eval_data()
    ev = evaluate(digits_mlp.model, data, FAST, "image-classification")
    lat, setup = ev["latency_ms"], ev["latency_setup"]
    assert setup["runs"] == 12 and setup["batch_size"] == 4 and setup["threads"] == 1
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] and lat["mean"] > 0
    assert setup["synthetic_inputs"] is False
    expected = float(
        (_numpy_forward(digits_mlp.model, data.inputs["pixels"]).argmax(1) == data.labels).mean()
    )
    assert ev["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert ev["metric"] == {"name": "accuracy", "value": ev["accuracy"]}
    assert ev["size_bytes"] == digits_mlp.model.stat().st_size
    assert ev["params"] == 85002 and ev["macs"] == 64 * 256 + 256 * 256 + 256 * 10
    assert ev["num_samples"] == len(data) and "fidelity" not in ev
    assert ev.outputs is not None and ev.outputs["logits"].shape == (len(data), 10)
    import json

    assert "outputs" not in json.loads(json.dumps(ev))  # the arrays stay out of the JSON report


def test_fidelity_of_a_model_with_itself_is_exact(digits_mlp: DigitsFiles) -> None:
    data = _eval_data()
    cfg = EvaluateConfig.model_validate({"metrics": ["accuracy"], "max_samples": 50, "batch_size": 16})
    first = evaluate(digits_mlp.model, data, cfg, "generic")
    again = evaluate(digits_mlp.model, data, cfg, "generic", reference_outputs=first.outputs)
    assert "latency_ms" not in again and again["num_samples"] == 50
    fid = again["fidelity"]
    assert fid["max_abs_err"] == 0.0 and fid["mean_abs_err"] == 0.0
    assert fid["cosine"] == pytest.approx(1.0, abs=1e-12) and fid["top1_agreement"] == 1.0
    # a perturbed reference lowers the agreement measures
    assert first.outputs is not None
    noisy = {"logits": first.outputs["logits"] + np.random.default_rng(0).normal(0, 5, (50, 10))}
    worse = evaluate(digits_mlp.model, data, cfg, "generic", reference_outputs=noisy)["fidelity"]
    assert worse["max_abs_err"] > 1 and worse["cosine"] < 0.99


def test_fixed_batch_model_runs_sample_by_sample(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 64),),
        str(fixed),
        dynamo=False,
        input_names=["pixels"],
        output_names=["logits"],
        opset_version=17,
    )
    data = _eval_data()
    ev = evaluate(fixed, data, FAST, "image-classification")
    assert ev["fixed_batch"] == 1 and ev["latency_setup"]["per_sample_calls"] is True
    with torch.no_grad():
        expected = float(
            (model(torch.from_numpy(data.inputs["pixels"])).argmax(1).numpy() == data.labels).mean()
        )
    assert ev["accuracy"] == pytest.approx(expected)


def test_a_dynamically_quantized_model_is_evaluated_one_request_at_a_time(
    tmp_path: Path, digits_mlp: DigitsFiles
) -> None:
    """Dynamic INT8 scales each activation over the whole batch: its outputs are those of the latency batch's
    calls (one row a call here), never of eval batches whose rows change each other's results."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dyn = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(digits_mlp.model), str(dyn), weight_type=QuantType.QInt8)
    data = _eval_data().take(64)
    x = data.inputs["pixels"].copy()
    x[0] *= 50.0  # one loud row: batched with it, every other row's activations get a coarse scale
    data = ArrayDataset({"pixels": x}, data.labels)
    cfg = EvaluateConfig.model_validate({"metrics": ["accuracy"], "batch_size": 64, "latency": {"batch_size": 1}})
    ev = evaluate(dyn, data, cfg, "image-classification")
    assert ev["eval_batch_size"] == 1
    sess = ort.InferenceSession(str(dyn), providers=["CPUExecutionProvider"])
    one_by_one = np.concatenate([sess.run(None, {"pixels": x[i : i + 1]})[0] for i in range(len(x))])
    batched = sess.run(None, {"pixels": x})[0]
    assert ev.outputs is not None
    np.testing.assert_array_equal(ev.outputs["logits"], one_by_one)
    assert np.abs(batched - one_by_one)[1:].max() > 1e-3  # the batch really does couple the rows
    # a float model keeps the eval batch
    assert evaluate(digits_mlp.model, data, cfg, "image-classification")["eval_batch_size"] == 64


def test_feature_extraction_metric_is_cosine_to_the_input_embeddings(tmp_path: Path) -> None:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(
                x.reshape(x.shape[0], 8, 8)[..., None].expand(-1, 8, 8, 8).reshape(x.shape[0], 8, 64)
            )

    torch.manual_seed(0)
    path = tmp_path / "enc.onnx"
    export_onnx(Encoder(), torch.zeros(1, 64), path)
    data = ArrayDataset({"pixels": _eval_data().inputs["pixels"][:20]})
    cfg = EvaluateConfig.model_validate({"metrics": ["size"]})
    base = evaluate(path, data, cfg, "feature-extraction")
    assert base["metric"] == {"name": "embedding_cosine", "value": 1.0} and base["accuracy"] is None
    assert base.outputs is not None and base.outputs["logits"].shape == (20, 8, 32)
    same = evaluate(path, data, cfg, "feature-extraction", reference_outputs=base.outputs)
    assert same["metric"]["value"] == pytest.approx(1.0, abs=1e-9)
    flipped = {"logits": -base.outputs["logits"]}
    assert evaluate(path, data, cfg, "feature-extraction", flipped)["metric"]["value"] == pytest.approx(-1.0)


def test_without_data_latency_uses_synthetic_inputs(digits_mlp: DigitsFiles) -> None:
    ev = evaluate(digits_mlp.model, None, FAST, "generic")
    assert ev["latency_setup"]["synthetic_inputs"] is True and ev["latency_ms"]["median"] > 0
    assert ev["accuracy"] is None and ev["num_samples"] == 0 and ev.outputs is None


def test_threads_are_clamped_to_the_workers_cores(digits_mlp: DigitsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.evaluate

    monkeypatch.setattr(worker.evaluate, "available_cores", lambda: 2)
    cfg = EvaluateConfig.model_validate({"latency": {"warmup": 0, "runs": 2, "batch_size": 2, "threads": 200}})
    report = evaluate(digits_mlp.model, None, cfg, "image-classification")
    assert report["latency_setup"]["threads"] == 2 and report["latency_setup"]["threads_requested"] == 200


@pytest.mark.parametrize(("field", "value"), [("runs", 1001), ("batch_size", 1025), ("threads", 257)])
def test_latency_bounds(field: str, value: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EvaluateConfig.model_validate({"latency": {field: value}})
    EvaluateConfig.model_validate({"latency": {field: value - 1}})


def test_the_provider_is_used_and_recorded_and_a_missing_one_fails_the_step(digits_mlp: DigitsFiles) -> None:
    import onnxruntime as ort

    from worker.core import StepFailed

    cfg = EvaluateConfig.model_validate(
        {"latency": {"warmup": 0, "runs": 2, "batch_size": 4, "threads": 1, "provider": "CPUExecutionProvider"}})
    report = evaluate(digits_mlp.model, None, cfg, "generic")
    assert report["latency_setup"]["provider"] == "CPUExecutionProvider"
    assert report["latency_setup"]["batch_size"] == 4
    missing = next(p for p in ("TensorrtExecutionProvider", "CoreMLExecutionProvider")
                   if p not in ort.get_available_providers())
    cfg = EvaluateConfig.model_validate({"latency": {"provider": missing}})
    with pytest.raises(StepFailed, match=f"{missing}' is not available on this worker") as err:
        evaluate(digits_mlp.model, None, cfg, "generic")
    assert err.value.code == "provider_unavailable"


def test_cpu_model_is_the_model_name_of_proc_cpuinfo() -> None:
    from worker.evaluate import cpu_model

    names = [line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    assert names and cpu_model() == names[0]
