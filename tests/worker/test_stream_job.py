"""worker.stream_job: an LLM over the worker's in-memory budget is quantized without a float export, its
baseline measured on an INT8 reference that the report names, and the output equals the in-memory path's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.inspection.hf import inspect_hf
from api.inspection.text import inspect_text
from models import memory_fit
from models.spec import JobSpec, QuantizeStep
from tests.factories_lm import text_rows, tiny_lm_archive, write_jsonl
from worker import pipeline
from worker.context import LocalContext
from worker.lm.session import LMSession

FAST = {"latency": {"runs": 2, "warmup": 1}, "generation": {"samples": 2, "max_new_tokens": 6, "prompt_tokens": 16},
        "max_samples": 6}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("stream-job")
    archive = tiny_lm_archive(tmp)
    text = write_jsonl(tmp / "eval.jsonl", text_rows(8))
    calibration = write_jsonl(tmp / "calibration.jsonl", text_rows(12, names=("Apache-2.0",)))
    return {"model": (archive, "hf", inspect_hf(archive)), "eval": (text, "text", inspect_text(text)),
            "calibration": (calibration, "text", inspect_text(calibration))}


def _run(tmp_path: Path, files: dict[str, Any], step: dict[str, Any] | list[dict[str, Any]],
         calibrate: bool = False) -> pipeline.PipelineResult:
    data = {"eval": "ds_eval", **({"calibration": "ds_cal"} if calibrate else {})}
    steps = step if isinstance(step, list) else [step]
    spec = JobSpec.model_validate({"model": "mdl_lm", "task": "text-generation", "data": data,
                                   "steps": steps, "evaluate": FAST})
    ctx = LocalContext(tmp_path, spec, models={"mdl_lm": files["model"]},
                       datasets={"ds_eval": files["eval"], "ds_cal": files["calibration"]}, device="cpu")
    return pipeline.run(spec, ctx)


def _count_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths of every torch -> ONNX export of a causal LM from now on (``worker.convert`` calls it)."""
    from worker.lm import export as lm_export

    exports: list[Path] = []
    real = lm_export.export_causal_lm
    monkeypatch.setattr(lm_export, "export_causal_lm", lambda m, p, **kw: exports.append(Path(p)) or real(m, p, **kw))
    return exports


def test_a_model_over_the_memory_budget_is_streamed_and_matches_the_in_memory_path(
    tmp_path: Path, files: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    step = {"type": "quantize", "mode": "int4"}
    exports = _count_exports(monkeypatch)
    in_memory = _run(tmp_path / "mem", files, step).report
    # in memory, one export per model per job: the input's ONNX form serves its evaluation and step 0
    assert len(exports) == 1 and exports[0].parent.name == "input"
    assert in_memory["steps"][0]["metrics"]["weight_only"]["algorithm"] == "rtn"  # no calibration text

    exports.clear()
    monkeypatch.setattr(memory_fit, "IN_MEMORY_BYTES_PER_PARAM", 10**12)  # any model is "too large" here
    result = _run(tmp_path / "stream", files, step)
    report = result.report
    assert exports == []  # no float export, no torch module
    reference = report["input"]["reference"]
    assert reference["kind"] == "int8_weight" and "streamed" in reference["why"]
    params = files["model"][2]["parameters"]
    assert report["input"]["size_bytes"] == 4 * params
    step0 = report["steps"][0]["metrics"]
    assert step0["streamed"] and step0["weight_only"]["matmul_bits"] == {"4": 20, "8": 1}
    # the same file as the in-memory path (bytes equal, tests/worker/lm/test_stream.py): the same perplexity
    out, mem = report["output"], in_memory["output"]
    assert out["perplexity"] == pytest.approx(mem["perplexity"], rel=1e-4)
    # the INT8 reference stands in for the float input: within 0.5 % of the float perplexity
    assert report["input"]["perplexity"] == pytest.approx(in_memory["input"]["perplexity"], rel=0.005)
    assert out["agreement"]["top1"] > 0.5 and len(out["generations"]) == 2
    assert result.files["model.onnx.data"].stat().st_size > 0.5 * out["size_bytes"]
    assert len(LMSession(result.output_path).generate([5, 6, 7], 4)) == 4
    phases = report["memory"]["peak_rss_bytes_by_phase"]
    assert list(phases) == ["write_reference", "evaluate_reference", "write_output", "evaluate_output"]
    assert all(50 * 1024**2 < v < 8 * 1024**3 for v in phases.values())
    assert not (tmp_path / "stream" / "reference").exists()  # the reference's files went after its evaluation


def test_with_calibration_text_the_streamed_int4_is_gptq_and_matches_the_in_memory_gptq(
    tmp_path: Path, files: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job names calibration text: both paths choose GPTQ; the streamed one collects its Hessians layer by
    layer (tests/worker/lm/test_stream_gptq.py: the same codes); the outputs' perplexities agree within 0.5 %."""
    step = {"type": "quantize", "mode": "int4"}
    exports = _count_exports(monkeypatch)
    in_memory = _run(tmp_path / "mem", files, step, calibrate=True).report
    assert len(exports) == 1  # GPTQ's calibration runs the input's one export too
    assert in_memory["steps"][0]["metrics"]["weight_only"]["algorithm"] == "gptq"
    exports.clear()
    monkeypatch.setattr(memory_fit, "IN_MEMORY_BYTES_PER_PARAM", 10**12)
    report = _run(tmp_path / "stream", files, step, calibrate=True).report
    assert exports == []
    wo = report["steps"][0]["metrics"]["weight_only"]
    assert wo["algorithm"] == "gptq" and wo["embedding_bits"] == {"8": 1}
    cal = wo["calibration"]
    mem_cal = in_memory["steps"][0]["metrics"]["weight_only"]["calibration"]
    assert cal["streamed"] and cal["samples"] == mem_cal["samples"] > 4  # the same rows, in batches of 4
    assert cal["mean_output_error"] == pytest.approx(mem_cal["mean_output_error"], rel=0.05)
    assert report["output"]["perplexity"] == pytest.approx(in_memory["output"]["perplexity"], rel=0.005)


def test_steps_the_writer_cannot_do_go_the_in_memory_way() -> None:
    for step, why in (({"type": "quantize", "mode": "int4", "algorithm": "hqq"}, "algorithm hqq"),
                      ({"type": "quantize", "mode": "dynamic"}, "only quantize int4"),
                      ({"type": "quantize", "mode": "int4", "int8_share": 0.2}, "int8_share"),
                      ({"type": "quantize", "mode": "int4", "quantize_embeddings": True}, "quantize_embeddings")):
        assert why in (memory_fit.streamable_step(QuantizeStep.model_validate(step)) or "")
    assert memory_fit.streamable_step(QuantizeStep.model_validate(
        {"type": "quantize", "mode": "int4", "algorithm": "gptq", "quantize_embeddings": False})) is None
    assert memory_fit.in_memory_fits(100_000_000, memory=24 * 1024**3)
    assert not memory_fit.in_memory_fits(1_200_000_000, memory=24 * 1024**3)


def test_an_export_step_first_is_the_inputs_export_reused(
    tmp_path: Path, files: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export -> quantize``: the input's export, made to evaluate it, is the export step's (parity included);
    an export step asking for other settings exports again."""
    exports = _count_exports(monkeypatch)
    report = _run(tmp_path / "same", files, [{"type": "export"}, {"type": "quantize", "mode": "int4"}]).report
    assert len(exports) == 1 and exports[0].parent.name == "input"
    export = report["steps"][0]["metrics"]
    assert export["reused"] == "input" and export["size_bytes"] > 0 and "opset" in export
    assert report["steps"][1]["metrics"]["weight_only"]["algorithm"] == "rtn"
    exports.clear()
    _run(tmp_path / "other", files, [{"type": "export", "atol": 0.01}, {"type": "quantize", "mode": "int4"}])
    assert len(exports) == 2  # the input's, then the step's own with its tolerance
