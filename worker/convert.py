"""Moving a working model between forms: torch -> ONNX (with a parity check), ONNX -> torch (onnx2torch).

Also the small torch helpers every training pass shares: the interface wrapper that makes any working
model a plain ``forward(*inputs) -> outputs`` module, batched prediction, the task metric, and finding the
layers that produce the model's outputs (which pruning must never touch).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.passes.base import ArrayDataset, Role, StepFailed, WorkingModel

if TYPE_CHECKING:
    import torch

    from models.spec import JobSpec
    from worker.passes.base import PassContext

CLASSIFICATION_TASKS = ("image-classification", "text-classification")
HF_OUTPUTS = ("logits", "last_hidden_state", "pooler_output")
RTOL = 1e-3


# ----------------------------------------------------------------------------------------------------------
# onnx2torch without torchvision


def _torchvision_stub() -> tuple[types.ModuleType, types.ModuleType]:
    """A stand-in ``torchvision`` whose ``ops.nms``, ``ops.box_convert`` and ``ops.roi_align`` raise."""

    def _missing(op: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                f"ONNX operator needing torchvision.ops.{op} is not supported by this worker "
                "(torchvision is not installed)"
            )

        return fail

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
    ops.nms = _missing("nms")  # type: ignore[attr-defined]
    ops.box_convert = _missing("box_convert")  # type: ignore[attr-defined]
    ops.roi_align = _missing("roi_align")  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    tv.__modelpress_stub__ = True  # type: ignore[attr-defined]
    return tv, ops


def import_onnx2torch() -> Any:
    """``onnx2torch.convert``, importing onnx2torch with a stand-in torchvision when the real one is missing.

    The stand-in sits in ``sys.modules`` only while onnx2torch imports (its nms/roialign converters bind it
    at import time), so that transformers and others still see torchvision as absent afterwards.
    """
    if "onnx2torch" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        tv, ops = _torchvision_stub()
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
        try:
            import onnx2torch  # noqa: F401
        finally:
            for name, mod in (("torchvision", tv), ("torchvision.ops", ops)):
                if sys.modules.get(name) is mod:
                    del sys.modules[name]
    from onnx2torch import convert

    return convert


# ----------------------------------------------------------------------------------------------------------
# The interface wrapper


@functools.cache
def _interface_class() -> type:
    import torch

    class Interface(torch.nn.Module):
        """``forward(*inputs)`` in ``input_names`` order -> one tensor or a tuple in ``output_names`` order."""

        def __init__(self, inner: torch.nn.Module, input_names: list[str], output_names: list[str], hf: bool):
            super().__init__()
            self.training = inner.training  # a fresh wrapper reports the mode of what it wraps
            self.inner = inner
            self.input_names = list(input_names)
            self.output_names = list(output_names)
            self.hf = hf

        def forward(self, *args: torch.Tensor) -> Any:
            if self.hf:
                out = self.inner(**dict(zip(self.input_names, args, strict=True)), return_dict=True)
                picked = [out[name] for name in self.output_names]
                return picked[0] if len(picked) == 1 else tuple(picked)
            out = self.inner(*args)
            if isinstance(out, dict):
                out = tuple(out.values())
            if isinstance(out, list | tuple) and len(out) == 1:
                return out[0]
            return out

    return Interface


def interface(model: WorkingModel) -> torch.nn.Module:
    """``model.module`` wrapped as ``forward(*inputs) -> outputs`` with the model's ONNX interface."""
    if model.module is None:
        raise StepFailed("wrong_form", "the working model has no torch module")
    return _interface_class()(model.module, model.input_names, model.output_names, model.origin == "hf")


def first_output(out: Any) -> torch.Tensor:
    """The first output of a forward call (a tensor, or the first of a tuple)."""
    return out[0] if isinstance(out, list | tuple) else out


def to_tensors(
    data: ArrayDataset, names: list[str], device: str, sl: slice | None = None
) -> list[torch.Tensor]:
    """Input arrays (optionally a slice of them) as tensors on ``device``, in ``names`` order."""
    import torch

    missing = [n for n in names if n not in data.inputs]
    if missing:
        raise StepFailed("dataset_mismatch", f"dataset has no arrays for model inputs {missing}")
    out = []
    for name in names:
        arr = data.inputs[name] if sl is None else data.inputs[name][sl]
        out.append(torch.from_numpy(np.ascontiguousarray(arr)).to(device))
    return out


def example_inputs(
    model: WorkingModel, data: ArrayDataset, device: str, n: int = 2
) -> tuple[torch.Tensor, ...]:
    """A few real samples as a tuple of tensors, for graph tracing and op counting."""
    return tuple(to_tensors(data, model.input_names, device, slice(0, max(1, n))))


def predict(
    module: torch.nn.Module, data: ArrayDataset, names: list[str], device: str, batch_size: int = 256
) -> np.ndarray:
    """First output of ``module`` (an interface wrapper) on all of ``data``, as float32 numpy."""
    import torch

    modes = [(m, m.training) for m in module.modules()]  # restored one by one: a frozen teacher stays in eval
    module.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                args = to_tensors(data, names, device, slice(start, start + batch_size))
                chunks.append(first_output(module(*args)).float().cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(chunks).numpy()


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits against integer labels."""
    return float((outputs.reshape(len(outputs), -1).argmax(1) == labels).mean())


def cosine_fidelity(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity between per-sample flattened outputs and a reference."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def torch_metric(
    model: WorkingModel,
    data: ArrayDataset,
    spec: JobSpec,
    *,
    reference: np.ndarray | None = None,
    device: str | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Task metric of a torch-form model on ``data``: accuracy with labels, cosine fidelity given ``reference``."""
    module = interface(model)
    device = device or module_device(model.module)
    outputs = predict(module, data, model.input_names, device, batch_size)
    metrics: dict[str, float] = {}
    if data.labels is not None and spec.task != "feature-extraction" and outputs.ndim == 2:
        metrics["accuracy"] = accuracy(outputs, data.labels)
    if reference is not None:
        metrics["fidelity"] = cosine_fidelity(outputs, reference)
    return metrics


def output_layers(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> list[torch.nn.Module]:
    """The Conv/Linear/Embedding layers nearest to the outputs: changing their width changes the interface.

    Walks the autograd graph back from every output and stops at the first parametric layer on each path.
    """
    import torch

    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.Embedding)
    producers: dict[Any, torch.nn.Module] = {}

    def hook(mod: torch.nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            producers[out.grad_fn] = mod

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.enable_grad():
            out = module(*args)
    finally:
        for h in handles:
            h.remove()
    outs = list(out) if isinstance(out, list | tuple) else [out]
    found: list[torch.nn.Module] = []
    seen: set[Any] = set()
    stack: list[Any] = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in producers:
            if producers[fn] not in found:
                found.append(producers[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def any_data(ctx: PassContext, model: WorkingModel) -> ArrayDataset:
    """Eval data for ``model``, else train, else calibration; StepFailed when the job has none."""
    roles: tuple[Role, ...] = ("eval", "train", "calibration")
    for role in roles:
        data = ctx.dataset(role, model)
        if data is not None and len(data):
            return data
    raise StepFailed("no_data", "this step needs samples (data.eval or data.train) to trace the model")


# ----------------------------------------------------------------------------------------------------------
# torch -> ONNX


def _dynamic_axes(
    model: WorkingModel, data: ArrayDataset, batch: bool, sequence: bool
) -> dict[str, dict[int, str]]:
    recorded: dict[str, dict[int, str]] = {
        k: {int(d): n for d, n in v.items()} for k, v in model.meta.get("dynamic_axes", {}).items()
    }
    axes: dict[str, dict[int, str]] = {}
    for name in model.input_names:
        arr = data.inputs[name]
        if name in recorded:
            axes[name] = dict(recorded[name])
        else:
            axes[name] = {0: "batch"}
            if np.issubdtype(arr.dtype, np.integer) and arr.ndim == 2:
                axes[name][1] = "sequence"
    for name in model.output_names:
        if name in recorded:
            axes[name] = dict(recorded[name])
        else:
            axes[name] = {0: "batch"}
            if name == "last_hidden_state":
                axes[name][1] = "sequence"
    if not batch:
        axes = {k: {d: n for d, n in v.items() if n != "batch" and d != 0} for k, v in axes.items()}
    if not sequence:
        axes = {k: {d: n for d, n in v.items() if n != "sequence"} for k, v in axes.items()}
    return {k: v for k, v in axes.items() if v}


def _onnx_outputs(path: Path, data: ArrayDataset, names: list[str]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    declared = {i.name for i in sess.get_inputs()}
    feed = {n: np.ascontiguousarray(data.inputs[n]) for n in names if n in declared}
    return np.asarray(sess.run(None, feed)[0], dtype=np.float32)


def to_onnx(
    model: WorkingModel,
    ctx: PassContext,
    opset: int,
    *,
    name: str,
    atol: float = 1e-3,
    samples: int = 16,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    data: ArrayDataset | None = None,
) -> WorkingModel:
    """Export a torch-form model to ``ctx.workdir/<name>.onnx`` and check parity on a few eval samples."""
    import torch

    if model.form != "torch" or model.module is None:
        raise StepFailed("wrong_form", "export needs a torch-form model")
    data = (data if data is not None else any_data(ctx, model)).take(samples)
    inner = copy.deepcopy(model.module).cpu().float()
    wrapper = interface(replace(model, module=inner)).eval()
    args = tuple(to_tensors(data, model.input_names, "cpu"))
    with torch.inference_mode():
        expected = first_output(wrapper(*args)).float().numpy()
    path = Path(ctx.workdir) / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = _dynamic_axes(model, data, dynamic_batch, dynamic_sequence)
    ctx.log("exporting to ONNX", opset=opset, dynamic_axes={k: list(v.values()) for k, v in axes.items()})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=model.input_names,
                output_names=model.output_names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the message
        raise StepFailed("export_failed", f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    wrapper.eval()  # the exporter restores the caller's training flag recursively
    got = _onnx_outputs(path, data, model.input_names)
    if got.shape != expected.shape:
        raise StepFailed(
            "export_mismatch",
            f"ONNX output shape {list(got.shape)} != torch output shape {list(expected.shape)}",
        )
    diff = np.abs(got - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    allowed = atol + RTOL * np.abs(expected)
    if not bool((diff <= allowed).all()):
        worst = int(diff.argmax())
        raise StepFailed(
            "export_mismatch",
            f"ONNX output differs from torch on {len(data)} samples: max abs diff {max_abs:.3g} "
            f"(torch {float(expected.flat[worst]):.6g} vs onnx {float(got.flat[worst]):.6g}); "
            f"tolerance atol={atol:g} + rtol={RTOL:g}*|torch|",
        )
    parity: dict[str, Any] = {"max_abs_diff": max_abs, "samples": len(data), "atol": atol}
    if expected.ndim == 2 and expected.shape[1] > 1:
        parity["top1_agreement"] = float((expected.argmax(1) == got.argmax(1)).mean())
    meta = {**model.meta, "parity": parity, "opset": opset}
    return dataclasses.replace(model, form="onnx", onnx_path=path, module=None, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# ONNX -> torch


def _symbolic_dims(value_info: Any) -> dict[int, str]:
    dims = value_info.type.tensor_type.shape.dim
    out = {}
    for i, d in enumerate(dims):
        if d.HasField("dim_param") or not d.HasField("dim_value"):
            out[i] = d.dim_param or ("batch" if i == 0 else f"dim_{i}")
    return out


def to_torch(model: WorkingModel, ctx: PassContext) -> WorkingModel:
    """An ONNX-form model as a trainable torch module (onnx2torch); interface names are kept."""
    if model.form == "torch":
        return model
    if model.onnx_path is None:
        raise StepFailed("wrong_form", "the working model has no ONNX file")
    import onnx

    convert = import_onnx2torch()

    proto = onnx.load(str(model.onnx_path))
    axes = {vi.name: _symbolic_dims(vi) for vi in [*proto.graph.input, *proto.graph.output]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(proto)
    except NotImplementedError as exc:
        raise StepFailed("unsupported_model", f"cannot make this ONNX graph trainable: {exc}") from exc
    module = module.to(ctx.device)
    ctx.log("converted ONNX to torch", parameters=sum(p.numel() for p in module.parameters()))
    meta = {
        **model.meta,
        "dynamic_axes": {k: v for k, v in axes.items() if v},
        "source_onnx": str(model.onnx_path),
    }
    return dataclasses.replace(model, form="torch", onnx_path=None, module=module, meta=meta)


def ensure_torch(model: WorkingModel, ctx: PassContext) -> WorkingModel:
    """``model`` in torch form on ``ctx.device`` (converting from ONNX when needed)."""
    model = to_torch(model, ctx) if model.form == "onnx" else model
    model.module.to(ctx.device)
    return model


def module_device(module: torch.nn.Module) -> str:
    """The device a module's parameters live on (``cpu`` for a module without parameters)."""
    for p in module.parameters():
        return str(p.device)
    return "cpu"


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
