"""Where and how a causal LM trains on this worker: the plan of ``models.memory_fit.training_plan`` applied.

A CPU worker refuses a model of ``Settings.cpu_train_max_params`` or more (``StepFailed`` ``model_too_large``
naming the size and the limit). On CUDA, LoRA on 1 B parameters and more runs on a frozen bf16 base, or on a
4-bit NF4 base through bitsandbytes where the bf16 one does not fit the GPU (QLoRA: Dettmers et al., "QLoRA:
Efficient Finetuning of Quantized LLMs", 2023); every CUDA run uses gradient checkpointing
(``worker.training.checkpointing``). Both train a twin of the module (``place``); the LoRA updates are then
added in float to the original fp32 weights, left on the CPU meanwhile (``merge_lora_into``): the model that is
exported differs from its input by the updates only, never by the twin's bf16 or 4-bit rounding.
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
    """The module to train on ``device``: ``module`` itself for an fp32 plan; else a twin in the plan's dtype
    (its Linear layers in 4-bit NF4 for QLoRA), ``module`` left untouched in fp32 on the CPU for the merge."""
    import torch

    if plan.dtype == "float32" and not plan.base_4bit:
        return module.to(device)
    dtype = getattr(torch, plan.dtype)
    twin = _twin(module, "cpu" if plan.base_4bit else device, dtype)  # a 4-bit base is quantized layer by layer
    if plan.base_4bit:
        _quantize_linears_4bit(twin, device)
    return twin.to(device)


def _twin(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of hf model ``module`` built on the meta device and filled with its weights in ``dtype`` on
    ``device`` (float32 buffers, such as rotary frequencies, as they are); tied weights tied again."""
    import torch

    with torch.device("meta"):
        twin = type(module)(module.config)
    state = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
             for k, v in module.state_dict().items()}
    twin.load_state_dict(state, strict=True, assign=True)
    for name, buf in module.named_buffers():  # non-persistent buffers are not in the state dict
        owner_name, _, attr = name.rpartition(".")
        owner = twin.get_submodule(owner_name) if owner_name else twin
        owner.register_buffer(attr, buf.to(device), persistent=attr not in owner._non_persistent_buffers_set)
    tie: Any = getattr(twin, "tie_weights", None)
    if tie is not None:
        tie()
    return twin.eval()


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


def merge_lora_into(original: torch.nn.Module, peft_model: Any) -> None:
    """Add each trained LoRA update of ``peft_model`` (on a twin of ``original``) to ``original``'s fp32 weight of
    the same name, in float: neither the bf16 nor the 4-bit rounding of the twin's base reaches the result."""
    import torch
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, layer in peft_model.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):
                weight = original.get_submodule(name).weight
                delta: Any = getattr(layer, "get_delta_weight")  # noqa: B009 (each LoRA layer kind has one)
                for adapter in layer.active_adapters:
                    weight += delta(adapter).to(device=weight.device, dtype=weight.dtype)
