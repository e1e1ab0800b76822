"""Post-training quantization of an ONNX graph with onnxruntime.quantization (dynamic, static QDQ, fp16,
weight-only INT4/INT8 blocks to ``MatMulNBits``/``GatherBlockQuantized``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import platform
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import WEIGHT_ONLY_MODES, QuantizeStep
from worker.passes.base import Pass, PassContext, PassResult, StepFailed, WorkingModel

if TYPE_CHECKING:
    from collections.abc import Iterator

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
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

# -- weight-only (int4 / int8_weight) defaults, for the spec's None --
# Chosen with ``python -m bench.llm_pipeline`` (a 4.0 M-parameter Llama trained on the OS licence texts,
# genai-builder KV export, held-out perplexity 62.41 in fp32, 2 shared cores; figures in README). Against
# ORT's quantizer with its defaults (RTN, block 128, asymmetric, head at 4 bits: +1.3 % perplexity, 3.88x
# smaller):
# - algorithm rtn: HQQ lost less (+0.2..0.4 %) but its float zero points take ORT's slow CPU path, 0.07-0.19x
#   of fp32 decode speed against 1-3x for RTN; GPTQ (b64 +0.4 %, b32 +0.6 %) needs calibration text and
#   was no better than RTN at the same block size.
# - block 64: +0.4 % at 3.58x smaller; block 32 +0.6 % (3.39x: the scales eat the size goal), block 128
#   +0.9 % with the head at 8 bits.
# - asymmetric: at block 32 symmetric lost the same (+0.6 %); at block 64 symmetric lost +1.1 %.
# - head at 8 bits: the head at 4 bits cost +0.1..0.4 point of perplexity (b64 +0.8 %, b128 +1.3 % vs +0.9 %).
# - embeddings in float (``quantize_embeddings`` False): 4-bit embeddings made files 5-6x smaller but lost
#   +1.0..1.2 %, as much as ORT's defaults (+0.7..0.8 % in a later run, against +0.1 % in float). Except
#   where the head is tied to the embedding table (``tied_embeddings``): on a GPT-2 of the same size
#   (``--arch gpt2``, tied, traced export) the float table was the largest tensor left, the file only 3.36x
#   smaller (+0.20 %), and 4-bit embeddings made it 5.79x at +0.13 %: there they are on by default.
# - accuracy level 4 (int8 activations in MatMulNBits): 2.56x fp32 decode; the same file at level 0 decoded
#   at 0.23x, with the same perplexity (+0.4 %).
# Result: 3.58x smaller, 2.56x decode tokens/s, +0.4 % perplexity = 0.33x of what ORT's defaults lose.
DEFAULT_ALGORITHM = "rtn"
DEFAULT_BLOCK_SIZE = 64
DEFAULT_SYMMETRIC = False
DEFAULT_ACCURACY_LEVEL = 4
# Bits of the output head (the last MatMul with a constant weight) when the spec gives no ``bits``.
DEFAULT_HEAD_BITS = 8
_FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16


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


def name_unnamed_nodes(m: onnx.ModelProto) -> bool:
    """Give every unnamed node a unique ``<op>_<index>`` name (exclusions by name, Gemm->MatMul renaming
    and per-node bits need names); whether any node was renamed."""
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
    return changed


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
    ``int4``/``int8_weight``: weight-only block quantization with ORT's ``matmul_nbits_quantizer``
    (``MatMulNBits``, ``GatherBlockQuantized``): round-to-nearest per block, HQQ (Badri & Shaji 2023,
    "Half-Quadratic Quantization of Large Machine Learning Models") or GPTQ (Frantar et al. 2023, "GPTQ:
    Accurate Post-Training Quantization for Generative Pre-trained Transformers", calibrated).
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
            metrics["reduce_range"] = reduce_range(p)
        ctx.check_cancelled()
        if p.mode == "fp16":
            out = self._fp16(src, p, ctx)
        elif p.mode in WEIGHT_ONLY_MODES:
            out, metrics["weight_only"] = self._weight_only(src, p, model, ctx)
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

        from storage.base import StorageFull
        from worker.checked_io import checked_onnx_write
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
                ), checked_onnx_write(dst, "quant_pre_process's output"):  # the CWD: ORT's shape inference litters it
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
            except StorageFull:  # ORT logs an ENOSPC and goes on: checked_onnx_write saw it; no fallback helps
                raise
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
        if not name_unnamed_nodes(m):
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

    # -- weight-only ------------------------------------------------------------------------------

    def _weight_only(
        self, src: Path, p: QuantizeStep, model: WorkingModel, ctx: PassContext
    ) -> tuple[Path, dict[str, Any]]:
        """Weight-only block quantization: the 4-bit MatMuls by ``algorithm``, 8-bit ones by RTN, then
        embeddings (Gather -> GatherBlockQuantized, 4-bit); nodes excluded or unsupported stay float."""
        import onnx

        s = WeightOnlySettings.resolve(p)
        large = _is_large(src)
        ctx.progress("preparing weight-only quantization", fraction=0.0)
        m = onnx.load(str(src))
        prepare_for_nbits(m)
        if p.quantize_embeddings is None and s.mode_bits == 4 and tied_embeddings(m):
            p = p.model_copy(update={"quantize_embeddings": True})
            ctx.log("the output head shares the embedding table: quantizing the embeddings too "
                    "(quantize_embeddings: false keeps them in float)")
        if p.quantize_embeddings:
            opset_for_int4_tables(m)
        plan = plan_weight_only(m, p, s)
        if not plan.four and not plan.eight and not plan.gathers:
            raise StepFailed(
                "nothing_to_quantize",
                "no MatMul with a constant 2-D float weight left to quantize"
                + (f" ({len(plan.excluded)} excluded)" if plan.excluded else ""),
            )
        calibration: dict[str, Any] | None = None
        if plan.four:
            ctx.check_cancelled()
            ctx.progress(f"quantizing {len(plan.four)} MatMul to 4 bits ({s.algorithm})", fraction=0.1)
            if s.algorithm == "gptq":
                m, calibration = self._gptq(m, plan.four, s, p, model, ctx, large)
            else:
                m = _nbits(m, plan.four, _matmul_config(s, bits=4))
        if plan.eight:
            ctx.check_cancelled()
            ctx.progress(f"quantizing {len(plan.eight)} MatMul to 8 bits (rtn)", fraction=0.7)
            m = _nbits(m, plan.eight, _matmul_config(dataclasses.replace(s, algorithm="rtn"), bits=8))
        if plan.gathers:
            ctx.check_cancelled()
            ctx.progress(f"quantizing {len(plan.gathers)} embeddings to 4 bits", fraction=0.85)
            m = _nbits(m, plan.gathers, _gather_config(s))
        if s.accuracy_level is not None:
            set_accuracy_level(m, s.accuracy_level)
        out = _unique_path(ctx.workdir, f"quantized-{p.mode}")
        _save(m, out, large)
        bits = Counter(_attr(n, "bits") for n in m.graph.node if n.op_type == "MatMulNBits")
        metrics: dict[str, Any] = {
            "algorithm": s.algorithm,
            "block_size": s.block_size,
            "symmetric": s.symmetric if s.algorithm != "hqq" else False,
            "accuracy_level": s.accuracy_level,
            "matmul_bits": {str(k): v for k, v in sorted(bits.items())},
            "embeddings": sum(n.op_type == "GatherBlockQuantized" for n in m.graph.node),
            "bits_overrides": plan.overrides,
            "excluded": plan.excluded,
        }
        if calibration is not None:
            metrics["calibration"] = calibration
        return out, metrics

    def _gptq(
        self,
        m: onnx.ModelProto,
        names: list[str],
        s: WeightOnlySettings,
        p: QuantizeStep,
        model: WorkingModel,
        ctx: PassContext,
        large: bool,
    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """GPTQ of the ``names`` MatMuls at 4 bits (the Hessians from the calibration set), the rest untouched.

        ORT's ``neural_compressor.gptq_quantize`` is called directly: ``MatMulNBitsQuantizer`` hands it
        every MatMul and ignores ``nodes_to_exclude`` on this path.
        """
        import contextlib
        import io

        from onnxruntime.quantization.neural_compressor import gptq_quantize

        _quiet_ort_quantizer_logs()
        data = ctx.dataset("calibration", model)
        if data is None or len(data) == 0:
            raise StepFailed("calibration_data_missing", "algorithm gptq needs a calibration dataset")
        data = data.take(p.calibration.samples)
        batch = _calibration_batch(len(data), equal=False)
        feeds = list(calibration_feeds(data, list(m.graph.input), batch, ctx))
        chosen = set(names)
        scheme = "sym" if s.symmetric else "asym"
        rows = {t.name: int(t.dims[0]) for t in m.graph.initializer if len(t.dims) == 2}
        config: dict[str, Any] = {}
        odd: list[str] = []
        for n in m.graph.node:
            if n.op_type != "MatMul":
                continue
            if n.name not in chosen:
                config[n.name] = "fp32"
                continue
            node_scheme = scheme
            if scheme == "asym" and -(-rows.get(n.input[1], 0) // s.block_size) % 2:
                # ORT's GPTQ packs two 4-bit zero points per byte across columns and breaks on an odd
                # number of blocks per column (K / block_size): those weights go symmetric (no zero points)
                node_scheme = "sym"
                odd.append(n.name)
            config[n.name] = {"bits": 4, "group_size": s.block_size, "scheme": node_scheme}
        target: Any = m
        if large:  # the quantizer serializes the model for its session: > 2 GiB must go by path
            target_path = _unique_path(ctx.workdir, "quantize-gptq-src")
            _save(m, target_path, True)
            target = str(target_path)
        ctx.progress("calibrating (gptq)", fraction=0.2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress bar writes to stdout
                quantized = gptq_quantize(
                    target,
                    ((feed, None) for feed in feeds),
                    weight_config=config,
                    num_bits=4,
                    group_size=s.block_size,
                    scheme=scheme,
                    n_samples=-1,
                    accuracy_level=s.accuracy_level or 0,
                )
        except Exception as e:  # ORT raises many types from its calibration session
            raise StepFailed("quantize_failed", f"GPTQ failed: {type(e).__name__}: {e}") from e
        info: dict[str, Any] = {"method": "gptq", "samples": len(data), "batch": batch}
        if odd:
            info["symmetric_nodes"] = odd
        return quantized.model, info


@dataclasses.dataclass(frozen=True)
class WeightOnlySettings:
    """A weight-only step's settings with the measured defaults filled in."""

    mode_bits: int
    algorithm: str
    block_size: int
    symmetric: bool
    accuracy_level: int | None

    @classmethod
    def resolve(cls, p: QuantizeStep) -> WeightOnlySettings:
        """The spec's values, None replaced by the defaults; unsupported combinations named."""
        mode_bits = 4 if p.mode == "int4" else 8
        algorithm = p.algorithm or (DEFAULT_ALGORITHM if mode_bits == 4 else "rtn")
        if mode_bits == 8 and algorithm != "rtn":
            raise StepFailed(
                "unsupported_algorithm",
                f"mode int8_weight supports algorithm rtn only, not {algorithm!r}: ORT's 8-bit MatMulNBits "
                "CPU kernel rejects HQQ's float zero points and its GPTQ writes 4-bit weights only",
            )
        if mode_bits == 8 and p.quantize_embeddings:
            raise StepFailed(
                "unsupported_option",
                "quantize_embeddings needs mode int4: ORT's quantizer writes GatherBlockQuantized at 4 bits only",
            )
        return cls(
            mode_bits=mode_bits,
            algorithm=algorithm,
            block_size=p.block_size or DEFAULT_BLOCK_SIZE,
            symmetric=DEFAULT_SYMMETRIC if p.symmetric is None else p.symmetric,
            accuracy_level=DEFAULT_ACCURACY_LEVEL if p.accuracy_level is None else p.accuracy_level,
        )


@dataclasses.dataclass
class WeightOnlyPlan:
    """Which nodes get which treatment: MatMul names at 4 and at 8 bits, Gather names at 4 bits, the rest."""

    four: list[str] = dataclasses.field(default_factory=list)
    eight: list[str] = dataclasses.field(default_factory=list)
    gathers: list[str] = dataclasses.field(default_factory=list)
    excluded: list[dict[str, str]] = dataclasses.field(default_factory=list)
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)


def _attr(node: onnx.NodeProto, name: str) -> Any:
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def prepare_for_nbits(m: onnx.ModelProto) -> None:
    """In place: unique names for unnamed nodes, Gemm with a constant weight as MatMul + Add (GPT-2's
    Conv1D exports as Gemm, which MatMulNBits does not cover)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    name_unnamed_nodes(m)
    if any(n.op_type == "Gemm" for n in m.graph.node):
        ONNXModel(m).replace_gemm_with_matmul()


def opset_for_int4_tables(m: onnx.ModelProto) -> None:
    """In place: opset 21 at least, for embeddings going to int4 (ORT's quantizer would only relabel it)."""
    from onnx import version_converter

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 21)
    if opset < 21:
        m.CopyFrom(version_converter.convert_version(m, 21))


def tied_embeddings(m: onnx.ModelProto) -> bool:
    """Whether the output head (the last MatMul with a constant weight, ``[hidden, vocab]``) multiplies by
    the token-embedding table: a Gather's ``[vocab, hidden]`` table equal to that weight transposed (the
    exporters write the tied matrix twice, once per layout)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer if len(t.dims) == 2 and t.data_type in _FLOAT_TYPES}
    head = next((n for n in reversed(m.graph.node)
                 if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits), None)
    if head is None:
        return False
    weight = inits[head.input[1]]
    hidden, vocab = weight.dims
    for node in m.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is not None and tuple(table.dims) == (vocab, hidden):
            return bool(np.array_equal(numpy_helper.to_array(table).T, numpy_helper.to_array(weight)))
    return False


def _bits_for(node: onnx.NodeProto, overrides: dict[str, int], default: int) -> tuple[int, str | None]:
    """The first ``overrides`` pattern (fnmatch) matching the node's name or op type, else ``default``."""
    for pattern, bits in overrides.items():
        if fnmatch.fnmatchcase(node.name, pattern) or fnmatch.fnmatchcase(node.op_type, pattern):
            return bits, pattern
    return default, None


def plan_weight_only(m: onnx.ModelProto, p: QuantizeStep, s: WeightOnlySettings) -> WeightOnlyPlan:
    """Sort the quantizable nodes (MatMul with a constant 2-D float weight; embeddings Gathers when asked)."""
    inits = {t.name: t for t in m.graph.initializer if len(t.dims) == 2 and t.data_type in _FLOAT_TYPES}
    candidates = [
        n
        for n in m.graph.node
        if (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits)
        or (p.quantize_embeddings and n.op_type == "Gather" and n.input[0] in inits)
    ]
    overrides: dict[str, int] = dict(p.bits)
    if "bits" not in p.model_fields_set:
        head = next((n.name for n in reversed(candidates) if n.op_type == "MatMul"), None)
        if head is not None and s.mode_bits != DEFAULT_HEAD_BITS:
            overrides = {head: DEFAULT_HEAD_BITS}
    plan = WeightOnlyPlan()
    for node in candidates:
        if node.name in p.nodes_to_exclude or node.op_type in p.op_types_to_exclude:
            plan.excluded.append({"node": node.name, "op_type": node.op_type, "reason": "excluded"})
            continue
        bits, pattern = _bits_for(node, overrides, s.mode_bits)
        if pattern is not None:
            plan.overrides[node.name] = bits
        if node.op_type == "Gather":
            if bits == 4:
                plan.gathers.append(node.name)
            else:
                plan.excluded.append(
                    {"node": node.name, "op_type": "Gather", "reason": "GatherBlockQuantized is 4-bit only"}
                )
        else:
            (plan.four if bits == 4 else plan.eight).append(node.name)
    return plan


def _matmul_config(s: WeightOnlySettings, bits: int) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if s.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=s.block_size, bits=bits, op_types_to_quantize=("MatMul",))
    # "rtn": ORT's own blockwise round-to-nearest (its C++ kernels; symmetric or with zero points)
    return DefaultWeightOnlyQuantConfig(
        block_size=s.block_size,
        is_symmetric=s.symmetric,
        accuracy_level=s.accuracy_level,
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )


def _gather_config(s: WeightOnlySettings) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    # HQQ's float zero points are not supported by GatherBlockQuantized: embeddings are always RTN
    return DefaultWeightOnlyQuantConfig(
        block_size=s.block_size, is_symmetric=s.symmetric, bits=4, op_types_to_quantize=("Gather",)
    )


def _quiet_ort_quantizer_logs() -> None:
    """ORT's weight-only quantizer logs every node at INFO (and sets up root logging at import): warnings only."""
    import logging

    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import configures the logger)

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _nbits(m: onnx.ModelProto, names: list[str], config: Any) -> onnx.ModelProto:
    """``MatMulNBitsQuantizer`` over ``m`` with ``config``, restricted to the nodes named ``names``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet_ort_quantizer_logs()

    keep = set(names)
    others = [n.name for n in m.graph.node if n.name not in keep]
    quantizer = MatMulNBitsQuantizer(m, nodes_to_exclude=others, algo_config=config)
    try:
        quantizer.process()
    except Exception as e:  # the quantizer asserts and raises many types; the user needs the message
        raise StepFailed("quantize_failed", f"{config.algorithm} quantization failed: {type(e).__name__}: {e}") from e
    return quantizer.model.model


def set_accuracy_level(m: onnx.ModelProto, level: int) -> None:
    """In place: the compute type of every MatMulNBits (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)."""
    import onnx

    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def calibration_feeds(
    data: ArrayDataset, inputs: list[onnx.ValueInfoProto], batch: int, ctx: PassContext
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of graph inputs from ``data``: what the data lacks is filled for a causal LM with a KV cache,
    ``past_key_values.*`` empty (``[batch, kv_heads, 0, head_dim]``, dims from the graph) and
    ``position_ids`` counted from ``attention_mask``; any other missing input is named."""
    import onnx

    n = len(data)
    specs = []
    for vi in inputs:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append((vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), dims))
    for name, _, dims in specs:
        if name in data.inputs or (name == "position_ids" and "attention_mask" in data.inputs):
            continue
        if name.startswith("past_key_values"):
            if len(dims) != 4 or dims[1] is None or dims[3] is None:
                raise StepFailed(
                    "calibration_data_mismatch",
                    f"cannot build an empty past for input {name}: shape {dims} is not [batch, heads, past, dim]",
                )
            continue
        raise StepFailed("calibration_data_mismatch", f"calibration data has no input {name!r}")
    for start in range(0, n, batch):
        ctx.check_cancelled()
        ctx.progress("calibrating", fraction=start / n)
        chunk = {k: v[start : start + batch] for k, v in data.inputs.items()}
        b = len(next(iter(chunk.values())))
        feed: dict[str, np.ndarray] = {}
        for name, dtype, dims in specs:
            if name in chunk:
                feed[name] = np.ascontiguousarray(chunk[name].astype(dtype, copy=False))
            elif name == "position_ids":
                mask = chunk["attention_mask"].astype(np.int64)
                feed[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(dtype)
            else:
                feed[name] = np.zeros((b, int(dims[1] or 0), 0, int(dims[3] or 0)), dtype=dtype)
        yield feed
