"""ONNX Runtime's integer and float16 quantizers: dynamic INT8, static INT8 QDQ with calibration, fp16."""

from __future__ import annotations

import functools
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import QuantizeStep
from worker.core import PassContext, StepFailed, WorkingModel
from worker.ort_guard import GuardedSession, RunGuard
from worker.passes.quantizers.files import calibration_batch, is_large, name_unnamed_nodes, save, unique_path

if TYPE_CHECKING:
    from worker.core import ArrayDataset

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


# The guard of the calibration running in this thread: its calibrator's runs go through it.
_CALIBRATION_GUARD: ContextVar[RunGuard | None] = ContextVar("calibration_guard", default=None)


@functools.cache
def _guard_calibrators() -> None:
    """Make ``quantize_static`` give each calibrator it creates a :class:`GuardedSession` under the current
    ``_CALIBRATION_GUARD`` (ORT makes and runs the calibration session itself, without RunOptions; its
    ``quantize`` module calls ``create_calibrator`` by that name). Installed once; no guard set: unchanged."""
    import importlib

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the package's `quantize` is a function
    create = ort_quantize.create_calibrator

    def create_calibrator(*args: Any, **kwargs: Any) -> Any:
        calibrator = create(*args, **kwargs)
        guard = _CALIBRATION_GUARD.get()
        if guard is not None and calibrator.infer_session is not None:
            calibrator.infer_session = GuardedSession(calibrator.infer_session, guard)
        return calibrator

    ort_quantize.create_calibrator = create_calibrator  # type: ignore[attr-defined]


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


def optimize_first(src: Path, mode: str) -> bool:
    """Whether ``quant_pre_process`` should also optimize the graph: yes for static INT8 and for graphs with
    convolutions (BatchNorm folded before calibrating), no for dynamic INT8 of a graph without them: the
    optimized graph it saves keeps ORT from its own load-time fusions (all-MiniLM-L6-v2 on a Xeon, 1 thread:
    the float graph 9 % slower, its dynamic INT8 5 % slower than from the unoptimized one)."""
    import onnx

    if mode != "dynamic":
        return True
    m = onnx.load(str(src), load_external_data=False)
    return any(n.op_type in ("Conv", "ConvTranspose") for n in m.graph.node)


def preprocess(src: Path, ctx: PassContext, optimize: bool = True) -> tuple[Path, str]:
    """ORT's quant_pre_process (symbolic shape inference, and optimization unless ``optimize`` is False), with
    fallbacks; nodes named."""
    import logging

    from onnxruntime.quantization import quant_pre_process

    from storage.base import StorageFull
    from worker.checked_io import checked_onnx_write
    from worker.formats.onnx_model import scratch_cwd

    src = src.resolve()
    large = is_large(src)
    dst = unique_path(ctx.workdir, "quantize-pre").resolve()
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("full", {}),
        ("no_symbolic_shape", {"skip_symbolic_shape": True}),
        ("shape_only", {"skip_symbolic_shape": True, "skip_optimization": True}),
    ] if optimize else [
        ("no_optimization", {"skip_optimization": True}),
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
        chosen = name_nodes(chosen, ctx)
    return chosen, how


def name_nodes(path: Path, ctx: PassContext) -> Path:
    """Give unnamed nodes a unique name so exclusions by name and Gemm->MatMul renaming work."""
    import onnx

    m = onnx.load(str(path))
    if not name_unnamed_nodes(m):
        return path
    dst = unique_path(ctx.workdir, "quantize-named")
    onnx.save_model(m, str(dst))
    return dst


def node_exclusions(path: Path, p: QuantizeStep, dynamic: bool) -> list[str]:
    """The step's excluded node names, plus the MatMul names dynamic quantization gives excluded Gemms."""
    import onnx

    excluded = list(p.nodes_to_exclude)
    if dynamic and "Gemm" in p.op_types_to_exclude:
        # dynamic quantization rewrites Gemm to MatMul (named "<gemm>_MatMul") before quantizing
        m = onnx.load(str(path), load_external_data=False)
        for n in m.graph.node:
            if n.op_type == "Gemm" and n.name:
                excluded += [n.name, f"{n.name}_MatMul"]
    return excluded


def dynamic(src: Path, p: QuantizeStep, ctx: PassContext) -> Path:
    """Dynamic INT8: weights quantized offline, activations at run time (MatMulInteger/ConvInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    out = unique_path(ctx.workdir, "quantized-dynamic")
    op_types = sorted(set(IntegerOpsRegistry) - set(p.op_types_to_exclude))
    ctx.progress("quantizing (dynamic)", fraction=0.3)
    quantize_dynamic(
        str(src),
        str(out),
        op_types_to_quantize=op_types,
        per_channel=p.per_channel,
        reduce_range=reduce_range(p),
        weight_type=QuantType.QInt8 if p.weight_type == "int8" else QuantType.QUInt8,
        nodes_to_exclude=node_exclusions(src, p, dynamic=True),
        use_external_data_format=is_large(src),
        extra_options={"MatMulConstBOnly": True},
    )
    return out


def static(src: Path, p: QuantizeStep, model: WorkingModel, ctx: PassContext) -> tuple[Path, int]:
    """Static INT8 QDQ calibrated on the calibration set; the path and the number of samples used."""
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
    batch = min(fixed) if fixed else calibration_batch(len(data), equal=histogram)
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
    out = unique_path(ctx.workdir, f"quantized-static-{p.calibration.method}")
    with calibration_guard(ctx, src):
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
            nodes_to_exclude=node_exclusions(src, p, dynamic=False),
            use_external_data_format=is_large(src),
            calibrate_method=method,
            extra_options=extra,
        )
    return out, len(data)


@contextmanager
def calibration_guard(ctx: PassContext, src: Path, phase: str = "calibration") -> Iterator[RunGuard]:
    """The block's calibration runs (``quantize_static``'s) bounded and cancellable (worker/ort_guard.py);
    inside another such block, that block's guard (one phase, one cap: auto_exclude's rounds)."""
    outer = _CALIBRATION_GUARD.get()
    if outer is not None:
        yield outer
        return
    _guard_calibrators()
    with RunGuard(ctx.check_cancelled, what=f"the model {src.name} ({phase})") as guard:
        token = _CALIBRATION_GUARD.set(guard)
        try:
            yield guard
        finally:
            _CALIBRATION_GUARD.reset(token)


def fp16(src: Path, p: QuantizeStep, ctx: PassContext) -> Path:
    """Float16 weights and compute with ORT's converter (its block list and the step's exclusions in fp32)."""
    ctx.progress("converting to float16", fraction=0.2)
    return to_fp16(src, unique_path(ctx.workdir, "quantized-fp16"), p)


def to_fp16(src: Path, out: Path, p: QuantizeStep) -> Path:
    """``src`` converted to float16 into ``out`` (the step's exclusions and ORT's block list stay fp32); also
    the search's probe of whether the provider runs float16 faster (``worker/search.py``)."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from worker.lm.rope import PREFIX

    large = is_large(src)
    m = onnx.load(str(src))
    # computed RoPE caches (worker.lm.rope) stay float32: positions past 2048 are not integers in float16
    rope = [n.name for n in m.graph.node if n.name.startswith(PREFIX + "/")]
    converted = convert_float_to_float16(
        m,
        keep_io_types=p.keep_io_types,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(p.op_types_to_exclude)),
        node_block_list=[*p.nodes_to_exclude, *rope] or None,
        disable_shape_infer=large,
    )
    ONNXModel(converted).topological_sort()  # the converter appends its Cast nodes at the end
    save(converted, out, large)
    return out

# -- weight-only ------------------------------------------------------------------------------
