"""Post-training quantization of an ONNX graph with onnxruntime.quantization (dynamic, static QDQ, fp16,
weight-only INT4/INT8 blocks to ``MatMulNBits``/``GatherBlockQuantized``).

This module is the pass and its dispatch; the back ends live in ``worker/passes/quantizers/``: ``ort.py``
(dynamic, static, fp16), ``weight_only.py`` (int4, int8_weight), ``folded.py`` (int8_folded), ``files.py``
(what they share).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from models.spec import WEIGHT_ONLY_MODES, QuantizeStep
from worker.core import PassContext, StepFailed, WorkingModel
from worker.passes.base import Pass, PassResult
from worker.passes.quantizers import ort
from worker.passes.quantizers.files import op_counts
from worker.passes.quantizers.folded import quantize_folded
from worker.passes.quantizers.weight_only import quantize_weight_only

_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QAttention",
        "QGemm",
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)


class QuantizePass(Pass):
    """Post-training quantization with ONNX Runtime's quantizer.

    Integer quantization with affine (scale, zero-point) mapping, Jacob et al. 2018, "Quantization and
    Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference": ``dynamic`` (weights
    INT8 offline, activations quantized at run time), ``static`` (QDQ format, activation ranges from a
    calibration set by MinMax, Entropy (KL divergence, Migacz 2017) or Percentile); ``fp16`` halves the
    weights with ORT's float16 converter (Micikevicius et al. 2018, "Mixed Precision Training").
    ``int4``/``int8_weight``: weight-only block quantization with ORT's ``matmul_nbits_quantizer``
    (``MatMulNBits``, ``GatherBlockQuantized``): round-to-nearest per block, HQQ (Badri & Shaji 2023,
    "Half-Quadratic Quantization of Large Machine Learning Models") or GPTQ (Frantar et al. 2023, "GPTQ:
    Accurate Post-Training Quantization for Generative Pre-trained Transformers", calibrated).
    ``int8_folded``: weight-only symmetric INT8 for Conv/Gemm/MatMul as ``int8 -> Cast -> Mul(scale)``, folded
    to float by ONNX Runtime's constant folding at load (smaller files at float speed).
    """

    name = "quantize"

    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        """Quantize ``model`` (onnx form) as ``params`` says and return the quantized model."""
        p: QuantizeStep = params if isinstance(params, QuantizeStep) else QuantizeStep.model_validate(params)
        if model.form != "onnx" or model.onnx_path is None:
            raise StepFailed("wrong_form", "quantize needs an ONNX model")
        from worker.formats.onnx_model import model_size_bytes

        src = Path(model.onnx_path)
        before = model_size_bytes(src)
        metrics: dict[str, Any] = {"mode": p.mode, "size_bytes_before": before}
        if p.mode in ("dynamic", "static"):
            metrics["reduce_range"] = ort.reduce_range(p)
        ctx.check_cancelled()
        if p.mode == "fp16":
            out = ort.fp16(src, p, ctx)
        elif p.mode == "int8_folded":
            out, metrics["folded"] = quantize_folded(src, p, ctx)
        elif p.mode in WEIGHT_ONLY_MODES:
            out, metrics["weight_only"] = quantize_weight_only(src, p, model, ctx)
        else:
            ctx.progress("preprocessing", fraction=0.0)
            pre, how = ort.preprocess(src, ctx, optimize=ort.optimize_first(src, p.mode))
            metrics["preprocess"] = how
            ctx.check_cancelled()
            if p.smooth is not None:  # SmoothQuant scales first: auto_exclude then ranks the smoothed graph
                from worker.passes.quantizers.smooth import smooth

                pre, metrics["smooth"] = smooth(pre, p.smooth, p.nodes_to_exclude, model, ctx)
            if p.auto_exclude is not None:  # sensitivity-guided mixed precision (worker/passes/sensitivity.py)
                from worker.passes import sensitivity

                kept, metrics["auto_exclude"] = sensitivity.select(pre, p, model, ctx)
                p = p.model_copy(update={"nodes_to_exclude": [*p.nodes_to_exclude, *kept]})
            if p.mode == "dynamic":
                out = ort.dynamic(pre, p, ctx)
            else:
                out, n = ort.static(pre, p, model, ctx)
                metrics["calibration"] = {
                    "method": p.calibration.method,
                    "samples": n,
                    **(
                        {"percentile": p.calibration.percentile}
                        if p.calibration.method == "percentile"
                        else {}
                    ),
                }
        ctx.progress("quantized", fraction=1.0)
        ops = op_counts(out)
        metrics["size_bytes_after"] = model_size_bytes(out)
        metrics["size_ratio"] = before / max(metrics["size_bytes_after"], 1)
        metrics["quantized_ops"] = {k: v for k, v in sorted(ops.items()) if k in _QUANT_OPS}
        new = dataclasses.replace(model, form="onnx", onnx_path=out, meta={**model.meta, "quantized": p.mode})
        return PassResult(model=new, metrics=metrics)

    # -- stages -----------------------------------------------------------------------------------
