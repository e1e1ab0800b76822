"""Post-training quantization of an ONNX graph with onnxruntime.quantization (dynamic, static QDQ, fp16)."""

from __future__ import annotations

import dataclasses
import functools
import platform
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import QuantizeStep
from worker.passes.base import Pass, PassContext, PassResult, StepFailed, WorkingModel

if TYPE_CHECKING:
    import onnx

    from worker.passes.base import ArrayDataset

# Above this a model is written with external data (protobuf's 2 GiB limit, with margin).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
CALIBRATION_BATCH = 32
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
    }
)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def lacks_vnni(machine: str, cpuinfo: str | None) -> bool:
    """Whether a CPU (``platform.machine()``, /proc/cpuinfo text) is x86 without VNNI, whose u8 x s8 kernels saturate."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    if cpuinfo is None:
        return True  # unknown x86: the safe choice costs one bit of weight precision
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return not _VNNI_FLAGS & set(flags)


@functools.cache
def cpu_lacks_vnni() -> bool:
    """``lacks_vnni`` for the CPU this worker runs on."""
    try:
        text: str | None = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = None
    return lacks_vnni(platform.machine(), text)


def reduce_range(p: QuantizeStep) -> bool:
    """7-bit weights when asked, or by default on a CPU whose int8 kernels would saturate."""
    return cpu_lacks_vnni() if p.reduce_range is None else p.reduce_range


def _unique_path(workdir: Path, stem: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{stem}.onnx"
    n = 1
    while path.exists():
        n += 1
        path = workdir / f"{stem}-{n}.onnx"
    return path


def _is_large(path: Path) -> bool:
    from worker.formats.onnx_model import model_size_bytes

    return model_size_bytes(path) > EXTERNAL_DATA_THRESHOLD


def _save(model: onnx.ModelProto, path: Path, large: bool) -> None:
    import onnx

    if large:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save_model(model, str(path))


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def _calibration_batch(n: int, *, equal: bool) -> int:
    """Calibration batch size: up to CALIBRATION_BATCH; when batches must be equal, a divisor of ``n``
    if one of at least 8 exists (otherwise the reader pads the last batch)."""
    batch = min(CALIBRATION_BATCH, n)
    if equal and n % batch:
        divisor = next((b for b in range(batch, 7, -1) if n % b == 0), None)
        batch = divisor or batch
    return batch


class _Reader:
    """CalibrationDataReader over an ArrayDataset: batches of model inputs, reporting progress as it goes."""

    def __init__(
        self, data: ArrayDataset, batch: int, ctx: PassContext, dtypes: dict[str, Any], pad: bool
    ) -> None:
        self.data, self.batch, self.ctx, self.dtypes, self.pad = data, batch, ctx, dtypes, pad
        self.n = len(data)
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.n:
            return None
        self.ctx.check_cancelled()
        self.ctx.progress("calibrating", fraction=self.pos / self.n)
        end = min(self.pos + self.batch, self.n)
        feed = {}
        for name, arr in self.data.inputs.items():
            chunk = arr[self.pos : end]
            if end - self.pos < self.batch and self.pad:
                # equal batches (fixed-batch models, histogram calibrators): wrap around to the start
                chunk = np.concatenate([chunk, arr[: self.batch - len(chunk)]])
            dt = self.dtypes.get(name)
            feed[name] = np.ascontiguousarray(chunk if dt is None else chunk.astype(dt, copy=False))
        self.pos = end
        return feed

    def rewind(self) -> None:
        self.pos = 0

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


class QuantizePass(Pass):
    """Post-training quantization with ONNX Runtime's quantizer.

    Integer quantization with affine (scale, zero-point) mapping, Jacob et al. 2018, "Quantization and
    Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference": ``dynamic`` (weights
    INT8 offline, activations quantized at run time), ``static`` (QDQ format, activation ranges from a
    calibration set by MinMax, Entropy (KL divergence, Migacz 2017) or Percentile); ``fp16`` halves the
    weights with ORT's float16 converter (Micikevicius et al. 2018, "Mixed Precision Training").
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
        if p.mode != "fp16":
            metrics["reduce_range"] = reduce_range(p)
        ctx.check_cancelled()
        if p.mode == "fp16":
            out = self._fp16(src, p, ctx)
        else:
            ctx.progress("preprocessing", fraction=0.0)
            pre, how = self._preprocess(src, ctx)
            metrics["preprocess"] = how
            ctx.check_cancelled()
            if p.auto_exclude is not None:  # sensitivity-guided mixed precision (worker/passes/sensitivity.py)
                from worker.passes import sensitivity

                kept, metrics["auto_exclude"] = sensitivity.select(self, pre, p, model, ctx)
                p = p.model_copy(update={"nodes_to_exclude": [*p.nodes_to_exclude, *kept]})
            if p.mode == "dynamic":
                out = self._dynamic(pre, p, ctx)
            else:
                out, n = self._static(pre, p, model, ctx)
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
        ops = _op_counts(out)
        metrics["size_bytes_after"] = model_size_bytes(out)
        metrics["size_ratio"] = before / max(metrics["size_bytes_after"], 1)
        metrics["quantized_ops"] = {k: v for k, v in sorted(ops.items()) if k in _QUANT_OPS}
        new = dataclasses.replace(model, form="onnx", onnx_path=out, meta={**model.meta, "quantized": p.mode})
        return PassResult(model=new, metrics=metrics)

    # -- stages -----------------------------------------------------------------------------------

    def _preprocess(self, src: Path, ctx: PassContext) -> tuple[Path, str]:
        """ORT's quant_pre_process (symbolic shape inference + optimization), with fallbacks; nodes named."""
        import logging

        from onnxruntime.quantization import quant_pre_process

        from worker.formats.onnx_model import scratch_cwd

        src = src.resolve()
        large = _is_large(src)
        dst = _unique_path(ctx.workdir, "quantize-pre").resolve()
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("full", {}),
            ("no_symbolic_shape", {"skip_symbolic_shape": True}),
            ("shape_only", {"skip_symbolic_shape": True, "skip_optimization": True}),
        ]
        chosen, how = src, "skipped"
        for label, kwargs in attempts:
            try:
                with scratch_cwd(
                    ctx.workdir.resolve() / "scratch"
                ):  # ORT's symbolic inference litters the CWD
                    quant_pre_process(
                        str(src),
                        str(dst),
                        save_as_external_data=large,
                        all_tensors_to_one_file=True,
                        external_data_location=dst.name + ".data" if large else None,
                        **kwargs,
                    )
                chosen, how = dst, label
                break
            except Exception as e:
                logging.getLogger(__name__).info("quant_pre_process (%s) failed: %s", label, e)
                ctx.log(f"quant_pre_process ({label}) failed, falling back", error=f"{type(e).__name__}: {e}")
        shutil.rmtree(ctx.workdir / "scratch", ignore_errors=True)
        if not large:
            chosen = self._name_nodes(chosen, ctx)
        return chosen, how

    @staticmethod
    def _name_nodes(path: Path, ctx: PassContext) -> Path:
        """Give unnamed nodes a unique name so exclusions by name and Gemm->MatMul renaming work."""
        import onnx

        m = onnx.load(str(path))
        names = {n.name for n in m.graph.node if n.name}
        changed = False
        for i, node in enumerate(m.graph.node):
            if not node.name:
                name = f"{node.op_type}_{i}"
                while name in names:
                    name += "_"
                node.name = name
                names.add(name)
                changed = True
        if not changed:
            return path
        dst = _unique_path(ctx.workdir, "quantize-named")
        onnx.save_model(m, str(dst))
        return dst

    @staticmethod
    def _node_exclusions(path: Path, p: QuantizeStep, dynamic: bool) -> list[str]:
        import onnx

        excluded = list(p.nodes_to_exclude)
        if dynamic and "Gemm" in p.op_types_to_exclude:
            # dynamic quantization rewrites Gemm to MatMul (named "<gemm>_MatMul") before quantizing
            m = onnx.load(str(path), load_external_data=False)
            for n in m.graph.node:
                if n.op_type == "Gemm" and n.name:
                    excluded += [n.name, f"{n.name}_MatMul"]
        return excluded

    def _dynamic(self, src: Path, p: QuantizeStep, ctx: PassContext) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        out = _unique_path(ctx.workdir, "quantized-dynamic")
        op_types = sorted(set(IntegerOpsRegistry) - set(p.op_types_to_exclude))
        ctx.progress("quantizing (dynamic)", fraction=0.3)
        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=op_types,
            per_channel=p.per_channel,
            reduce_range=reduce_range(p),
            weight_type=QuantType.QInt8 if p.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=self._node_exclusions(src, p, dynamic=True),
            use_external_data_format=_is_large(src),
            extra_options={"MatMulConstBOnly": True},
        )
        return out

    def _static(self, src: Path, p: QuantizeStep, model: WorkingModel, ctx: PassContext) -> tuple[Path, int]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        from worker.evaluate import _ORT_TO_NUMPY, make_session

        data = ctx.dataset("calibration", model)
        if data is None or len(data) == 0:
            raise StepFailed("calibration_data_missing", "static quantization needs a calibration dataset")
        data = data.take(p.calibration.samples)
        session = make_session(src, 1)
        dtypes = {i.name: _ORT_TO_NUMPY.get(i.type) for i in session.get_inputs()}
        fixed = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
        del session
        histogram = p.calibration.method != "minmax"  # ORT's histogram calibrators need equal batches
        batch = min(fixed) if fixed else _calibration_batch(len(data), equal=histogram)
        reader = _Reader(data, batch, ctx, dtypes, pad=bool(fixed) or histogram)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[p.calibration.method]
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if p.calibration.method == "percentile":
            extra["CalibPercentile"] = p.calibration.percentile
        op_types = sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(p.op_types_to_exclude))
        out = _unique_path(ctx.workdir, f"quantized-static-{p.calibration.method}")
        quantize_static(
            str(src),
            str(out),
            reader,  # a CalibrationDataReader by its __subclasshook__ (has get_next)
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=p.per_channel,
            reduce_range=reduce_range(p),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if p.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=self._node_exclusions(src, p, dynamic=False),
            use_external_data_format=_is_large(src),
            calibrate_method=method,
            extra_options=extra,
        )
        return out, len(data)

    def _fp16(self, src: Path, p: QuantizeStep, ctx: PassContext) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        ctx.progress("converting to float16", fraction=0.2)
        large = _is_large(src)
        m = onnx.load(str(src))
        converted = convert_float_to_float16(
            m,
            keep_io_types=p.keep_io_types,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(p.op_types_to_exclude)),
            node_block_list=list(p.nodes_to_exclude) or None,
            disable_shape_infer=large,
        )
        from onnxruntime.quantization.onnx_model import ONNXModel

        ONNXModel(converted).topological_sort()  # the converter appends its Cast nodes at the end
        out = _unique_path(ctx.workdir, "quantized-fp16")
        _save(converted, out, large)
        return out
