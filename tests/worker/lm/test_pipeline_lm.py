"""worker.pipeline for task text-generation: export with a KV cache, the LM harness on both sides, the
perplexity budget, and a clear failure for a torch step after the LM went to ONNX."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.spec import JobSpec
from tests.factories_lm import licence_paragraphs
from tests.factories_train import MemoryContext
from tests.worker.lm.builders import text_dataset, torch_greedy
from tests.worker.lm.conftest import load_lm
from worker import pipeline, stages
from worker.core import WorkingModel
from worker.families import CausalLM, family_for
from worker.lm.layout import LMLayout
from worker.lm.session import LMSession

FAST = {"latency": {"runs": 3, "warmup": 1}, "generation": {"samples": 2, "max_new_tokens": 8, "prompt_tokens": 32}}


def _spec(steps: list[dict[str, Any]], **evaluate: Any) -> JobSpec:
    return JobSpec.model_validate({"model": "m", "task": "text-generation", "data": {"eval": "e"},
                                   "steps": steps, "evaluate": {**FAST, **evaluate}})


class PipelineMemoryContext(MemoryContext):
    """MemoryContext that also hears the pipeline's step changes (a PipelineContext)."""

    def begin_step(self, index: int, total: int, label: str) -> None:
        self.events.append({"kind": "step", "index": index, "total": total, "label": label})


def _ctx(tmp_path: Path, spec: JobSpec, folder: Path, tokenizer: Any) -> MemoryContext:
    data = text_dataset(tokenizer, licence_paragraphs()[:6], max_length=40)

    def model() -> WorkingModel:
        return WorkingModel("torch", "hf", ["input_ids", "attention_mask"], ["logits"], module=load_lm(folder),
                            hf_dir=folder, meta={"hf_task": "text-generation"})

    return PipelineMemoryContext(tmp_path / "work", spec, data={"eval": data}, models={"input": model})


def test_export_job_reports_lm_metrics_and_writes_a_kv_cache_onnx(
    tmp_path: Path, llama_dir: Path, tokenizer: Any
) -> None:
    spec = _spec([{"type": "export"}], max_perplexity_increase=0.01)
    result = pipeline.run(spec, _ctx(tmp_path, spec, llama_dir, tokenizer))
    report = result.report
    b, a = report["input"], report["output"]

    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5) and b["perplexity"] > 10
    assert a["agreement"]["top1"] == 1.0 and a["agreement"]["mean_kl"] < 1e-4
    assert report["fidelity"] == a["agreement"]
    assert a["decode"]["tokens_per_s"] > 0 and a["latency_ms"]["median"] > 0
    assert report["gains"]["perplexity_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert report["gains"]["decode_speedup"] > 0
    assert report["budget"]["met"] is True and report["budget"]["perplexity_increase"] == pytest.approx(0, abs=1e-5)
    assert [g["text"] for g in b["generations"]] == [g["text"] for g in a["generations"]]
    step = report["steps"][0]
    assert step["eval"]["perplexity"] == a["perplexity"] and step["metrics"]["greedy_identical"] is True
    assert step["metrics"]["method"] == "genai" and step["metrics"]["opset"] >= 17  # auto on a Llama

    # the artifact is a KV-cache model that generates what torch generates
    assert result.output_path.name == "model.onnx" and not result.files
    layout = LMLayout.from_onnx(result.output_path)
    assert layout.layers == 4 and layout.kv_heads == 2
    prompt = tokenizer(b["generations"][0]["prompt"])["input_ids"]
    assert LMSession(result.output_path).generate(prompt, 16) == torch_greedy(load_lm(llama_dir), prompt, 16)


def test_a_torch_step_after_the_lm_is_onnx_fails_clearly(tmp_path: Path, llama_dir: Path, tokenizer: Any) -> None:
    spec = _spec([{"type": "export"}, {"type": "prune", "ratio": 0.25}])
    with pytest.raises(stages.StepError) as err:
        pipeline.run(spec, _ctx(tmp_path, spec, llama_dir, tokenizer))
    assert err.value.step == "steps[1] prune" and err.value.code == "unsupported_model"
    assert "before quantize" in err.value.message


def test_after_a_torch_step_the_perplexity_is_measured_in_torch(
    tmp_path: Path, llama_dir: Path, tokenizer: Any
) -> None:
    spec = _spec([])
    ctx = _ctx(tmp_path, spec, llama_dir, tokenizer)
    model = ctx.load_model("input")
    family = family_for(spec.task, model)
    assert isinstance(family, CausalLM)
    after = family.measure_after_step(model, ctx, spec, None)
    result = pipeline.run(spec, ctx)
    full = result.report["input"]
    exports = [e for e in ctx.events if e.get("message") == "exported"]
    assert len(exports) == 1 and result.output_path.parent.name == "input"  # no steps: one export serves both
    assert after["measured"] and after["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)
    assert after["tokens"] == full["tokens"]


def _side(ppl: float, acc: float | None = None, tps: float = 100.0) -> dict[str, Any]:
    metric = {"name": "accuracy" if acc is not None else "perplexity", "value": acc if acc is not None else ppl}
    return {"perplexity": ppl, "accuracy": acc, "metric": metric, "decode": {"tokens_per_s": tps},
            "size_bytes": 1000, "params": 10, "latency_ms": {"median": 1.0}}


@pytest.mark.parametrize(
    ("out_ppl", "allowed", "met"), [(10.4, 0.05, True), (10.6, 0.05, False), (9.0, 0.0, True)]
)
def test_perplexity_budget_is_a_relative_increase(out_ppl: float, allowed: float, met: bool) -> None:
    spec = _spec([], max_perplexity_increase=allowed)
    report = stages.build_report(spec, _side(10.0), _side(out_ppl, tps=250.0), [], "cpu")
    budget = report["budget"]
    assert budget["met"] is met
    assert budget["perplexity_increase"] == pytest.approx(out_ppl / 10.0 - 1)
    assert report["gains"]["perplexity_ratio"] == pytest.approx(out_ppl / 10.0)
    assert report["gains"]["decode_speedup"] == pytest.approx(2.5)
    if not met:
        assert "perplexity rose 6.00%" in budget["reason"]


def test_choice_accuracy_budget_for_lms() -> None:
    spec = _spec([], max_accuracy_drop=0.05)
    missed = stages.build_report(spec, _side(10.0, acc=0.8), _side(10.0, acc=0.7), [], "cpu")["budget"]
    assert missed["met"] is False and missed["accuracy_drop"] == pytest.approx(0.1)
    assert "choice accuracy fell 10.00 points" in missed["reason"]
    kept = stages.build_report(spec, _side(10.0, acc=0.8), _side(12.0, acc=0.78), [], "cpu")["budget"]
    assert kept["met"] is True
    assert np.isclose(kept["accuracy_drop"], 0.02)


@pytest.mark.parametrize(("kind", "mode"), [("llama", "dynamic"), ("gpt2", "dynamic"), ("gpt2", "fp16")])
def test_an_onnx_step_after_export_runs_on_the_kv_cache_graph(
    kind: str, mode: str, tmp_path: Path, lm_dirs: Callable[[str], Path]
) -> None:
    """On the genai builder's graph (Llama) and on the traced one with onnxruntime's fusions (GPT-2)."""
    spec = _spec([{"type": "export"}, {"type": "quantize", "mode": mode}])
    folder = lm_dirs(kind)
    from transformers import AutoTokenizer

    result = pipeline.run(spec, _ctx(tmp_path, spec, folder, AutoTokenizer.from_pretrained(folder)))
    b, a = result.report["input"], result.report["output"]
    assert a["size_bytes"] < (0.5 if mode == "dynamic" else 0.6) * b["size_bytes"]  # int8 / fp16 weights
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=0.1)  # a random-init model barely notices
    assert 0.5 < a["agreement"]["top1"] <= 1.0 and a["agreement"]["mean_kl"] > 0
    assert len(a["generations"]) == 2 and a["decode"]["tokens_per_s"] > 0
    # the quantized file still has the cache interface the session feeds an empty past to
    assert LMLayout.from_onnx(result.output_path).layers == 4
    assert len(LMSession(result.output_path).generate([5, 6, 7], 6)) == 6


def test_big_lm_weights_travel_as_a_second_artifact(
    tmp_path: Path, llama_dir: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.lm import export as lm_export

    monkeypatch.setattr(lm_export, "TWO_GB", 100_000)  # the tiny model's 0.8 MB count as "over 2 GB"
    spec = _spec([{"type": "export"}], metrics=["accuracy", "size"])
    result = pipeline.run(spec, _ctx(tmp_path, spec, llama_dir, tokenizer))
    data_file = result.files["model.onnx.data"]
    assert data_file == result.output_path.with_name("model.onnx.data") and data_file.stat().st_size > 500_000
    assert result.report["output"]["size_bytes"] > result.output_path.stat().st_size + 500_000  # counts both
    folder = tmp_path / "downloaded"  # what a client gets: both artifacts in one folder
    folder.mkdir()
    for name, path in {"model.onnx": result.output_path, **result.files}.items():
        (folder / name).write_bytes(path.read_bytes())
    assert len(LMSession(folder / "model.onnx").generate([5, 6, 7], 4)) == 4


def test_the_input_is_exported_once_for_its_evaluation_and_the_first_step(
    tmp_path: Path, llama_dir: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.lm import export as lm_export

    exports: list[Path] = []
    real = lm_export.export_causal_lm

    def counted(module: Any, out_path: Path, **kwargs: Any) -> LMLayout:
        exports.append(Path(out_path))
        return real(module, out_path, **kwargs)

    monkeypatch.setattr(lm_export, "export_causal_lm", counted)
    spec = _spec([{"type": "quantize", "mode": "int4"}])
    result = pipeline.run(spec, _ctx(tmp_path, spec, llama_dir, tokenizer))
    assert [p.parent.name for p in exports] == ["input"]
    assert result.report["output"]["size_bytes"] < 0.5 * result.report["input"]["size_bytes"]
    assert {n.op_type for n in __import__("onnx").load(str(result.output_path)).graph.node} >= {"MatMulNBits"}


def test_a_gemma3_model_exports_and_quantizes_to_int4_through_the_job_path(
    tmp_path: Path, lm_dirs: Callable[[str], Path], tokenizer: Any
) -> None:
    """Gemma 3 (sandwich norms, q/k norms, 1 + w gains, tied head, sliding-window layers shorter than the
    eval rows): the builder's export, then int4, loads and stays near the fp32 file's perplexity."""
    folder = lm_dirs("gemma3")
    spec = _spec([{"type": "export"}, {"type": "quantize", "mode": "int4"}])
    result = pipeline.run(spec, _ctx(tmp_path, spec, folder, tokenizer))
    b, a = result.report["input"], result.report["output"]

    export = result.report["steps"][0]["metrics"]
    assert export["method"] == "genai" and export["greedy_identical"] and export["max_abs_diff"] < 1e-4
    assert {n.op_type for n in __import__("onnx").load(str(result.output_path)).graph.node} >= {"MatMulNBits"}
    assert a["size_bytes"] < 0.6 * b["size_bytes"]
    assert b["perplexity"] > 10 and a["perplexity"] < 1.05 * b["perplexity"], (b["perplexity"], a["perplexity"])
    assert a["agreement"]["mean_kl"] < 0.01  # top-1 is a coin toss on a random-init model's flat logits
    sess = LMSession(result.output_path)
    assert len(sess.generate([5, 6, 7], 24)) == 24  # past the 16-token window
