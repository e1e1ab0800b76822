"""Moving a working model between forms: torch -> ONNX (with a parity check), ONNX -> torch (onnx2torch)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.core import ArrayDataset, StepFailed, WorkingModel, any_data
from worker.torch_utils import count_params, first_output, interface, to_tensors

if TYPE_CHECKING:
    from worker.core import PassContext

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

    from worker.onnx2torch_ops import register

    register()  # the opset-18+ converters onnx2torch lacks (idempotent)
    return convert


# ----------------------------------------------------------------------------------------------------------
# torch -> ONNX


def is_causal_lm(model: WorkingModel) -> bool:
    """Whether ``model`` is a decoder-only LM (task ``text-generation``): exported with a KV cache."""
    return model.meta.get("hf_task") == "text-generation" or "lm" in model.meta


def _lm_check_text(data: ArrayDataset, rows: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A few eval rows for the export's logits parity, cut after the longest row's last real token."""
    ids, mask = data.inputs["input_ids"][:rows], data.inputs["attention_mask"][:rows]
    width = max(2, int(mask.sum(axis=1).max()) if mask.size else 2)
    return np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(mask[:, :width])


def lm_to_onnx(model: WorkingModel, ctx: PassContext, opset: int, *, name: str, atol: float = 1e-3,
               data: ArrayDataset | None = None) -> WorkingModel:
    """A torch-form causal LM as ``ctx.workdir/<name>/model.onnx`` with a KV cache (``worker.lm.export``),
    checked against torch on eval text and 32 greedy tokens; the layout goes to ``meta["lm"]``."""
    from worker.lm.export import export_causal_lm

    if model.form != "torch" or model.module is None:
        raise StepFailed("wrong_form", "export needs a torch-form model")
    data = data if data is not None else any_data(ctx, model)
    ids, mask = _lm_check_text(data)
    path = Path(ctx.workdir) / name / "model.onnx"  # its own folder: external data and genai_config beside it
    ctx.log("exporting the causal LM to ONNX with a KV cache", opset=opset)
    layout = export_causal_lm(model.module, path, opset=opset, hf_dir=model.hf_dir, check_ids=ids,
                              check_mask=mask, atol=atol)
    ctx.log("exported", method=layout.method, parity=layout.parity)
    meta = {**model.meta, "lm": layout.to_meta(), "parity": layout.parity, "opset": layout.opset or opset,
            "export_method": layout.method, "hf_task": "text-generation"}
    return dataclasses.replace(model, form="onnx", onnx_path=path, module=None, meta=meta,
                               input_names=["input_ids", "attention_mask"], output_names=["logits"])


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

    if model.form == "torch" and is_causal_lm(model):
        return lm_to_onnx(model, ctx, opset, name=name, atol=atol, data=data)
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
    # TorchScript refuses a bare number as a name ('26' is what it names an unnamed output itself): such names are
    # exported under a placeholder and given back to the file afterwards.
    names = {n: (f"mp_io_{n}" if n.isdigit() else n) for n in [*model.input_names, *model.output_names]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=[names[n] for n in model.input_names],
                output_names=[names[n] for n in model.output_names],
                dynamic_axes={names.get(k, k): v for k, v in axes.items()},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the message
        raise StepFailed("export_failed", f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    _rename_io(path, {safe: n for n, safe in names.items() if safe != n})
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


def _rename_io(path: Path, renames: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them) in the ONNX file at ``path``."""
    if not renames:
        return
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    for value in [*graph.input, *graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.save(proto, str(path))


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
    if is_causal_lm(model):
        raise StepFailed(
            "unsupported_model",
            "a causal LM in ONNX form (KV-cache graph) cannot be made trainable again; put the torch steps "
            "(prune, finetune, distill, export) before the ONNX ones (quantize)",
        )
    import onnx

    convert = import_onnx2torch()

    from worker.onnx_fold import fold_bias_adds

    proto = onnx.load(str(model.onnx_path))
    axes = {vi.name: _symbolic_dims(vi) for vi in [*proto.graph.input, *proto.graph.output]}
    folded = fold_bias_adds(proto)  # Conv/MatMul + a constant Add (paddle2onnx's biases): one prunable layer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(proto)
    except NotImplementedError as exc:
        raise StepFailed("unsupported_model", f"cannot make this ONNX graph trainable: {exc}") from exc
    flattened = _flatten_reshapes(module, proto)
    module = module.to(ctx.device)
    ctx.log("converted ONNX to torch", parameters=count_params(module),
            **({"reshapes_made_shape_agnostic": flattened} if flattened else {}),
            **({"bias_adds_folded": len(folded)} if folded else {}))
    meta = {
        **model.meta,
        "dynamic_axes": {k: v for k, v in axes.items() if v},
        "source_onnx": str(model.onnx_path),
    }
    return dataclasses.replace(model, form="torch", onnx_path=None, module=module, meta=meta)


def _flatten_reshapes(module: Any, proto: Any) -> list[str]:
    """Constant-shape flattens (the dynamo exporter's) made shape-agnostic before any pass prunes (worker.onnx_reshape)."""
    from worker.onnx_reshape import example_inputs, flatten_reshapes

    example = example_inputs(proto)
    return flatten_reshapes(module, example) if example is not None else []


def ensure_torch(model: WorkingModel, ctx: PassContext) -> WorkingModel:
    """``model`` in torch form on ``ctx.device`` (converting from ONNX when needed)."""
    model = to_torch(model, ctx) if model.form == "onnx" else model
    model.module.to(ctx.device)
    return model
