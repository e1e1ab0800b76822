"""What fine-tuning and multi-task fine-tuning share: the head and layer stack of a module, LoRA wrapping of
classifiers and causal LMs, what a non-LoRA LM fine-tune trains, a classification loss and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.spec import FinetuneStep
from worker.core import ArrayDataset, StepFailed, WorkingModel

if TYPE_CHECKING:
    import torch

# LoRA targets per hf model_type when the step names none (the attention projections, as in Hu et al.)
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "vit": ["query", "value"],
    "deit": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}


def head_name(model: WorkingModel, example: tuple[Any, ...]) -> str:
    """Qualified name of the output (classification) layer of ``model.module``."""
    import torch

    from worker.torch_utils import interface, output_layers

    inner = model.module
    if model.transformers:
        for attr in ("classifier", "score"):
            sub = getattr(inner, attr, None)
            if isinstance(sub, torch.nn.Linear):
                return attr
            if isinstance(sub, torch.nn.Module):
                linears = [n for n, m in sub.named_modules() if isinstance(m, torch.nn.Linear)]
                if linears:
                    return f"{attr}.{linears[-1]}"
    layers = output_layers(interface(model), example)
    names = {id(m): n for n, m in inner.named_modules()}
    found = [
        names[id(m)] for m in layers if id(m) in names and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    if len(found) != 1:
        raise StepFailed("unsupported_model", f"cannot identify a single output layer (found {found})")
    return found[0]


def _set_submodule(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def replace_head(model: WorkingModel, name: str, num_labels: int, classes: list[str] | None) -> None:
    """Swap the output layer for a fresh Linear with ``num_labels`` outputs (transfer learning)."""
    import torch

    old = model.module.get_submodule(name)
    if not isinstance(old, torch.nn.Linear):
        raise StepFailed("unsupported_model", f"the output layer {name!r} is not a Linear layer")
    new = torch.nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    _set_submodule(model.module, name, new)
    config = getattr(model.module, "config", None)
    if config is not None:
        config.num_labels = num_labels
        names = (
            classes
            if classes is not None and len(classes) == num_labels
            else [f"LABEL_{i}" for i in range(num_labels)]
        )
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}


def layer_stack(module: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The longest ModuleList of blocks (a transformer's layers), or None."""
    import torch

    lists: list[torch.nn.ModuleList] = [
        m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
    ]
    if not lists:
        return None
    longest = max(range(len(lists)), key=lambda i: len(lists[i]))
    return list(lists[longest])


def unfreeze_last(model: WorkingModel, n: int, head: str) -> None:
    """Train only the last ``n`` transformer layers (or last ``n`` parametric blocks) plus the head."""
    import torch

    inner = model.module
    inner.requires_grad_(False)
    stack = layer_stack(inner)
    if stack is not None:
        for block in stack[-n:]:
            block.requires_grad_(True)
        for name, m in inner.named_modules():  # final norms / poolers after the stack stay trainable too
            if name.split(".")[-1] in ("pooler", "layernorm", "final_layer_norm", "ln_f"):
                m.requires_grad_(True)
    else:
        kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
        leaves = [m for name, m in inner.named_modules() if isinstance(m, kinds) and name != head]
        for m in leaves[-n:]:
            m.requires_grad_(True)
    inner.get_submodule(head).requires_grad_(True)


def lora_wrap(model: WorkingModel, params: FinetuneStep, head: str) -> Any:
    """``model.module`` wrapped by peft LoRA (the head trained in full through ``modules_to_save``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = params.lora.target_modules
    if targets is None:
        model_type = str(
            model.meta.get("model_type") or getattr(getattr(model.module, "config", None), "model_type", "")
        )
        targets = LORA_TARGETS.get(model_type)
    if targets is None:  # any other model: every Linear except the head
        targets = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.module.named_modules()
                if isinstance(m, torch.nn.Linear) and n != head
            }
        )
    if not targets:
        raise StepFailed("unsupported_model", "no Linear layers to attach LoRA adapters to")
    config = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=list(targets),
        modules_to_save=[head],
    )
    return get_peft_model(model.module, config)


def classification_loss(wrapper: torch.nn.Module, input_names: list[str]) -> Any:
    """loss_fn(batch) = cross-entropy of the wrapper's logits against ``batch['labels']``."""
    import torch.nn.functional as F

    from worker.torch_utils import first_output

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = first_output(wrapper(*[batch[n] for n in input_names]))
        return F.cross_entropy(out.float(), batch["labels"])

    return loss_fn


def accuracy_eval(wrapper: torch.nn.Module, data: ArrayDataset | None, names: list[str], device: str) -> Any:
    """eval_fn() -> {"accuracy": ...} on ``data`` (None when there is no labelled eval data)."""
    if data is None or data.labels is None:
        return None
    from worker.metrics import accuracy
    from worker.torch_utils import predict

    labels = data.labels

    def eval_fn() -> dict[str, float]:
        return {"accuracy": accuracy(predict(wrapper, data, names, device), labels)}

    return eval_fn


def lm_lora_config(module: torch.nn.Module, params: FinetuneStep, r: int | None = None) -> Any:
    """A peft LoRA config (``TaskType.CAUSAL_LM``, rank ``r``, default the step's) for a causal LM.

    Targets: the step's ``lora.target_modules``, else peft's defaults for the architecture (Llama ``q_proj``,
    ``v_proj``; GPT-2 ``c_attn``; ...), else every Linear but the LM head.
    """
    import torch
    from peft import LoraConfig, TaskType
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = params.lora.target_modules
    model_type = str(getattr(getattr(module, "config", None), "model_type", ""))
    if targets is None and model_type not in DEFAULTS:
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None  # type: ignore[operator]
        targets = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in module.named_modules()
                if isinstance(m, torch.nn.Linear) and m is not head
            }
        )
        if not targets:
            raise StepFailed("unsupported_model", "no Linear layers to attach LoRA adapters to")
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r or params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=None if targets is None else list(targets),
    )


def lm_lora_wrap(module: torch.nn.Module, params: FinetuneStep) -> tuple[Any, list[str]]:
    """A causal LM wrapped by peft LoRA (``lm_lora_config``) and the modules it adapts."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(module, lm_lora_config(module, params))
    except ValueError as exc:  # e.g. target modules that are not in the model
        raise StepFailed("invalid_step", f"lora: {exc}") from exc
    return wrapped, sorted(getattr(wrapped.base_model, "targeted_module_names", []))


def lm_trainable(module: torch.nn.Module, params: FinetuneStep) -> None:
    """Mark what a non-LoRA LM fine-tune trains: everything, the LM head, or the last N decoder layers."""
    from worker.lm.importance import decoder_layers

    if params.mode == "full":
        module.requires_grad_(True)
        return
    module.requires_grad_(False)
    head = module.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise StepFailed("unsupported_model", "the model has no LM head to fine-tune")
    head.requires_grad_(True)
    if params.mode == "last_n":
        for block in list(decoder_layers(module))[-int(params.last_n or 1) :]:
            block.requires_grad_(True)
        for name, m in module.named_modules():  # the final norm after the stack
            if name.split(".")[-1] in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
                m.requires_grad_(True)
