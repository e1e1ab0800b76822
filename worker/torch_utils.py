"""Small torch helpers the torch-form passes share.

The interface wrapper that makes any working model a plain ``forward(*inputs) -> outputs`` module,
arrays to tensors, batched prediction, finding the layers that produce the model's outputs (which
pruning must never touch), and a module's device and parameter count. torch is imported inside.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.core import ArrayDataset, StepFailed, WorkingModel

if TYPE_CHECKING:
    import torch


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
    return _interface_class()(model.module, model.input_names, model.output_names, model.transformers)


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


def module_device(module: torch.nn.Module) -> str:
    """The device a module's parameters live on (``cpu`` for a module without parameters)."""
    for p in module.parameters():
        return str(p.device)
    return "cpu"


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
