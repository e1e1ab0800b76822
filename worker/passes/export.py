"""Export: torch -> ONNX with dynamic batch/sequence axes and a parity check on eval samples; causal LMs
(task text-generation) with a KV cache through ``worker.lm.export`` (logits and 32 greedy tokens checked)."""

from __future__ import annotations

from models.spec import ExportStep
from worker.core import PassContext, WorkingModel
from worker.passes.base import Pass, PassResult


class ExportPass(Pass):
    """ONNX export with torch.onnx (TorchScript-based exporter; ONNX: Bai et al., "Open Neural Network
    Exchange", 2017), followed by a numerical parity check of ONNX Runtime against the torch module.
    """

    name = "export"

    def run(self, model: WorkingModel, params: ExportStep, ctx: PassContext) -> PassResult:
        """Write the ONNX file into the job's workdir and return the onnx-form model."""
        from worker.convert import to_onnx

        out = to_onnx(
            model,
            ctx,
            params.opset,
            name=f"export-opset{params.opset}",
            atol=params.atol,
            samples=params.samples,
            dynamic_batch=params.dynamic_batch,
            dynamic_sequence=params.dynamic_sequence,
        )
        return PassResult(out, export_metrics(out, params.opset))

    @staticmethod
    def repeats(params: ExportStep, opset: int) -> bool:
        """Whether this step asks for the export the pipeline already made of the input to evaluate it (the
        job's opset, the default checks and axes): then that export is the step's, one export per model."""
        default = ExportStep(type="export", opset=opset)
        return all(getattr(params, k) == getattr(default, k)
                   for k in ("opset", "dynamic_batch", "dynamic_sequence", "atol", "samples"))


def export_metrics(out: WorkingModel, opset: int) -> dict[str, object]:
    """An export's report metrics: its parity check, opset, size and method."""
    assert out.onnx_path is not None
    metrics = {
        **out.meta.get("parity", {}),
        "opset": out.meta.get("opset", opset),  # an LM's genai export has the builder's own
        "size_bytes": out.onnx_path.stat().st_size,
    }
    if "export_method" in out.meta:
        metrics["method"] = out.meta["export_method"]
    return metrics
