"""Where and how a causal LM trains on this worker: the plan of ``models.memory_fit.training_plan`` applied.

A CPU worker refuses a model of ``Settings.cpu_train_max_params`` or more (``StepFailed`` ``model_too_large``
naming the size and the limit). On CUDA, LoRA on 1 B parameters and more runs on a frozen bf16 base, or on a
4-bit NF4 base through bitsandbytes where the bf16 one does not fit the GPU (QLoRA: Dettmers et al., "QLoRA:
Efficient Finetuning of Quantized LLMs", 2023); every CUDA run uses gradient checkpointing
(``worker.training.checkpointing``). After training the module is plain fp32 again, as export expects: a
QLoRA base is dequantized and its adapters added in float (``merge_4bit_lora``), not re-quantized.
These CUDA branches run only on a GPU; ``bench/gpu_check.py`` exercises them there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.memory_fit import TrainingPlan, training_plan
from models.settings import get_settings
from worker.core import StepFailed

if TYPE_CHECKING:
    import torch


def cuda_memory(device: str) -> int:
    """The total memory of CUDA ``device`` in bytes (0 on a CPU)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def plan_for(module: torch.nn.Module, mode: str, device: str) -> TrainingPlan:
    """The plan for training ``module`` in ``mode`` on ``device``; ``StepFailed`` where it cannot run here."""
    from worker.torch_utils import count_params

    plan = training_plan(count_params(module), mode, cuda=device.startswith("cuda"), gpu_memory=cuda_memory(device),
                         cpu_max_params=get_settings().cpu_train_max_params)
    if isinstance(plan, str):
        raise StepFailed("model_too_large", plan)
    return plan


def place(module: torch.nn.Module, plan: TrainingPlan, device: str) -> torch.nn.Module:
    """``module`` on ``device`` in the plan's dtype, its Linear layers in 4-bit NF4 for QLoRA (in place)."""
    import torch

    dtype = getattr(torch, plan.dtype)
    if not plan.base_4bit:
        return module.to(device=device, dtype=dtype)
    module.to(dtype=dtype)  # halve the float copy before the GPU sees it
    _quantize_linears_4bit(module, device)
    return module.to(device)


def _quantize_linears_4bit(module: torch.nn.Module, device: str) -> None:
    """Every Linear but the LM head as a bitsandbytes ``Linear4bit`` (NF4, bf16 compute), quantized on its way
    to ``device`` one layer at a time."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise StepFailed("model_too_large", "the model fits this GPU only with a 4-bit base (QLoRA), which needs "
                         "bitsandbytes on the worker: pip install bitsandbytes") from exc
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None  # type: ignore[operator]
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
            setattr(parent, name, q.to(device))  # the move to CUDA quantizes


def merge_4bit_lora(peft_model: Any) -> torch.nn.Module:
    """A QLoRA-trained model as a plain fp32 module: each NF4 weight dequantized, its LoRA update added in float."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    found = dict(base.named_modules())
    lora = [n for n, m in found.items() if isinstance(m, LoraLayer)]
    plain = [n for n, m in found.items() if isinstance(m, bnb.nn.Linear4bit) and not any(
        n.startswith(f"{w}.") for w in lora)]
    for name in lora + plain:
        layer = found[name]
        lin = layer.get_base_layer() if name in lora else layer
        weight = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
        if name in lora:
            for adapter in layer.active_adapters:
                weight += layer.get_delta_weight(adapter).float()
        new = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=weight.device)
        new.weight.data = weight
        if lin.bias is not None:
            new.bias.data = lin.bias.data.float()
        parent, _, attr = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, attr, new)
    return base.float()
