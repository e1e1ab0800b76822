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
        assert out.onnx_path is not None
        metrics = {
            **out.meta.get("parity", {}),
            "opset": out.meta.get("opset", params.opset),  # an LM's genai export has the builder's own
            "size_bytes": out.onnx_path.stat().st_size,
        }
        if "export_method" in out.meta:
            metrics["method"] = out.meta["export_method"]
        return PassResult(out, metrics)
