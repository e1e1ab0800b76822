"""A job that streams an LLM too large for the in-memory path: ``quantize`` (int4 / int8_weight) of an hf
causal LM of the Llama family, written layer by layer from its safetensors (``worker.lm.stream``). As in memory,
``int4`` is GPTQ when the job names calibration or train text (its Hessians collected one decoder layer at a
time: ``worker.passes.quantizers.gptq_layers``), RTN otherwise; the token table is written at 8 bits.

The in-memory path peaks at 14-18 bytes per parameter (the bf16 module, an fp32 copy, the exporter's fp32
ONNX, a serialised copy), so a job goes this way when that would not fit the worker's memory. The input is
then never materialised in float: its evaluation (perplexity, agreement reference, generations) runs on an
INT8 weight-only copy written the same way (block 32, accuracy level 4), which the report names as the baseline
(``input.reference``); the step writes the requested INT4/INT8 file directly. Memory: one weight chunk in
float while writing, one ONNX Runtime session while evaluating.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import memory_fit
from worker.lm import stream
from worker.memory import peak_rss_bytes, release_memory, reset_peak_rss

if TYPE_CHECKING:
    from models.spec import JobSpec, QuantizeStep
    from worker.core import PipelineContext, WorkingModel
    from worker.stages import PipelineResult

# The reference the input is evaluated on when it is streamed. Accuracy level 4 (int8 activations): at the
# default (fp32) level ONNX Runtime's 8-bit MatMulNBits was still evaluating a 1.2 B reference after 8 minutes,
# which level 4 evaluated in 19-68 s (2 shared cores); it stayed within 0.5 % of the float perplexity in the tests.
REFERENCE = stream.StreamSettings(bits=8, block_size=32, symmetric=False, accuracy_level=4, head_bits=8)
# The token table of a streamed int4 file: 8 bits (the in-memory pass's default for an untied table, the same
# bytes: ``stream.quantize_table_8bit``). A Llama-3.1-8B's bf16 table is 1.05 GB of its 5.67 GB INT4 file; at
# 8 bits 0.57 GB, so the file is 5.19 GB (``stream.projected_bytes``), under the 5.5 GB.
EMBEDDING_BITS = 8


def worker_memory() -> int:
    """The memory this worker plans jobs against: ``MODELPRESS_WORKER_MEMORY_BYTES``, else what it has."""
    from models.settings import get_settings

    return memory_fit.planned_memory(get_settings().worker_memory_bytes)


def settings_for(step: QuantizeStep) -> stream.StreamSettings:
    """The writer's settings for a streamable quantize step: the quantize pass's defaults for its None; at
    4 bits the token table at 8 (``EMBEDDING_BITS``) unless ``quantize_embeddings`` is false."""
    from worker.passes.quantizers.weight_only import DEFAULT_HEAD_BITS, WeightOnlySettings

    s = WeightOnlySettings.resolve(step)
    table = EMBEDDING_BITS if s.mode_bits == 4 and step.quantize_embeddings is None else None
    return stream.StreamSettings(bits=s.mode_bits, block_size=s.block_size, symmetric=s.symmetric,
                                 accuracy_level=s.accuracy_level, head_bits=max(s.mode_bits, DEFAULT_HEAD_BITS),
                                 embedding_bits=table)


def algorithm_for(step: QuantizeStep, ctx: Any) -> str:
    """``gptq`` when asked, or by default at 4 bits when the job names calibration or train text (as the
    in-memory quantize pass chooses); else ``rtn``."""
    from worker.passes.quantizers.weight_only import own_calibration_text

    if step.algorithm is not None:
        return step.algorithm
    return "gptq" if step.mode == "int4" and own_calibration_text(ctx) else "rtn"


def calibration_batches(step: QuantizeStep, ctx: Any, model: WorkingModel) -> list[tuple[Any, Any]]:
    """The job's calibration rows (``step.calibration.samples`` of them) as ``(input_ids, attention_mask)``
    batches of ``GPTQ_BATCH`` rows, as the in-memory GPTQ feeds its graph."""
    from worker.core import StepFailed
    from worker.passes.quantizers.weight_only import GPTQ_BATCH

    data = ctx.dataset("calibration", model)
    if data is None or len(data) == 0:
        raise StepFailed("calibration_data_missing", "algorithm gptq needs a calibration dataset")
    data = data.take(step.calibration.samples)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    return [(ids[i:i + GPTQ_BATCH], mask[i:i + GPTQ_BATCH]) for i in range(0, len(ids), GPTQ_BATCH)]


def wanted(spec: JobSpec, ctx: Any) -> tuple[Path, dict[str, Any]] | None:
    """The input's stored archive and meta when this job goes the streamed way, else None."""
    model_file = getattr(ctx, "model_file", None)
    if model_file is None or len(spec.steps) != 1 or memory_fit.streamable_step(spec.steps[0]) is not None:
        return None
    path, fmt, meta = model_file("input")
    if fmt != "hf" or meta.get("architecture") not in memory_fit.STREAM_ARCHITECTURES:
        return None
    params = int(meta.get("parameters") or 0)
    if not params or memory_fit.in_memory_fits(params, worker_memory()):
        return None
    return Path(path), meta


def _working(path: Path, root: Path, meta: dict[str, Any], what: str) -> WorkingModel:
    from worker.core import WorkingModel
    from worker.lm.layout import LMLayout

    layout = LMLayout.from_onnx(path)
    layout.method = "stream"
    return WorkingModel("onnx", "hf", ["input_ids", "attention_mask"], ["logits"], onnx_path=path, hf_dir=root,
                        meta={**meta, "hf_task": "text-generation", "lm": layout.to_meta(), "export_method": "stream",
                              "opset": layout.opset, "quantized": what})


def run(spec: JobSpec, ctx: PipelineContext, path: Path, meta: dict[str, Any]) -> PipelineResult:
    """The streamed job: evaluate the INT8 reference, write the step's file, evaluate it; the report."""
    from models.spec import QuantizeStep, step_label
    from worker.families import CausalLM
    from worker.formats import hf
    from worker.formats.onnx_model import model_size_bytes
    from worker.stages import PipelineResult, build_report, stage, timed

    step = spec.steps[0]
    assert isinstance(step, QuantizeStep)
    family = CausalLM()
    total = 3
    workdir = Path(ctx.workdir)
    params = int(meta.get("parameters") or 0)

    def progress(what: str) -> Any:
        return lambda done, layers: ctx.progress(f"{what}: layer {done} of {layers}", fraction=done / layers)

    phases: dict[str, int] = {}  # the worker's peak RSS in each phase (bytes), in the report's "memory"

    def phase(name: str) -> None:
        phases[name] = peak_rss_bytes()
        reset_peak_rss()

    reset_peak_rss()
    ctx.check_cancelled()
    ctx.begin_step(0, total, "evaluate input")
    with stage("evaluate input"):
        root = hf.extract(path, workdir / "models" / "input")
        ctx.log("streaming the LLM from its safetensors (the in-memory export would need "
                f"{params * memory_fit.IN_MEMORY_BYTES_PER_PARAM / 1e9:.1f} GB)", parameters=params)
        t0 = time.perf_counter()
        ref = stream.write_model(root, workdir / "reference" / "model.onnx", REFERENCE,
                                 progress("writing the INT8 reference"), ctx.check_cancelled)
        write_s = time.perf_counter() - t0
        phase("write_reference")
        ref_model = _working(ref.path, root, meta, "int8_weight")
        algorithm = algorithm_for(step, ctx)
        batches = calibration_batches(step, ctx, ref_model) if algorithm == "gptq" else []
        t0 = time.perf_counter()
        baseline = family.evaluate(ref_model, ctx, spec, None)
        wall = time.perf_counter() - t0
        baseline_report: dict[str, Any] = {
            **baseline, "wall_s": wall,
            "reference": {"kind": "int8_weight", "block_size": REFERENCE.block_size, "write_s": write_s,
                          "why": f"the input ({params / 1e9:.2f} B parameters) was streamed, not loaded in float: "
                                 "its metrics are those of an INT8 weight-only copy (block 32, accuracy level 4)",
                          "float32_bytes": 4 * params, "size_bytes": baseline.get("size_bytes")},
            "size_bytes": 4 * params,  # the fp32 ONNX the in-memory path would have written: the gains' baseline
        }
    reference = baseline.outputs
    del baseline
    shutil.rmtree(ref.path.parent, ignore_errors=True)
    release_memory()
    phase("evaluate_reference")

    ctx.check_cancelled()
    label = step_label(step)
    ctx.begin_step(1, total, label)
    with stage(f"steps[0] {step.type}"):
        settings = settings_for(step)
        t0 = time.perf_counter()
        quantizer = None
        if algorithm == "gptq":
            from worker.passes.quantizers.gptq_layers import StreamedGPTQ

            ctx.log("int4 by GPTQ, its Hessians collected layer by layer on the calibration text",
                    batches=len(batches))
            quantizer = StreamedGPTQ(root, batches, progress=ctx.progress)
        written = stream.write_model(root, workdir / "step0" / "model.onnx", settings,
                                     progress(f"writing {step.mode}"), ctx.check_cancelled, quantizer)
        wall = time.perf_counter() - t0
        model = _working(written.path, root, meta, step.mode)
        size = model_size_bytes(written.path)
        bits: dict[str, int] = {}
        for b in written.matmul_bits.values():
            bits[str(b)] = bits.get(str(b), 0) + 1
        weight_only: dict[str, Any] = {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k not in ("head_bits", "embedding_bits")},
            "algorithm": algorithm, "matmul_bits": dict(sorted(bits.items())),
            "embeddings": int(written.embedding_bits is not None),
            "embedding_bits": {} if written.embedding_bits is None else {"8": 1},
            "bits_overrides": {}, "excluded": []}
        if quantizer is not None:
            weight_only["calibration"] = quantizer.report()
        metrics: dict[str, Any] = {
            "mode": step.mode, "streamed": True, "size_bytes_before": 4 * params, "size_bytes_after": size,
            "size_ratio": 4 * params / max(size, 1),
            "quantized_ops": {"MatMulNBits": len(written.matmul_bits)},
            "max_float_elements": written.max_float_elements, "weight_only": weight_only,
        }
        del quantizer, batches
    steps: list[dict[str, Any]] = [{"index": 0, "type": step.type, "label": label, "wall_s": wall,
                                    "metrics": metrics, "eval": {}, "curve": []}]
    ctx.log(f"step {label} done (streamed)", wall_s=wall)
    release_memory()
    phase("write_output")

    ctx.check_cancelled()
    ctx.begin_step(total - 1, total, "export + evaluate output")
    with stage("evaluate output"):
        output, wall = timed(lambda: family.evaluate(model, ctx, spec, reference))
    output_report = {**output, "wall_s": wall}
    phase("evaluate_output")
    steps[0]["eval"] = {"measured": True, **{k: output[k] for k in family.step_eval_keys if k in output}}
    report = build_report(spec, baseline_report, output_report, steps, ctx.device, family)
    report["memory"] = {"peak_rss_bytes_by_phase": phases, "streamed": True}
    data = written.path.with_name(written.path.name + ".data")
    return PipelineResult(output_path=written.path, report=report, files={"model.onnx.data": data})
