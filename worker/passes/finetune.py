"""Fine-tuning: full, frozen backbone with a (new) head, last-N layers, or LoRA through peft."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from models.spec import FinetuneStep
from worker.passes.base import ArrayDataset, Pass, PassContext, PassResult, StepFailed, WorkingModel

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
    if model.origin == "hf":
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


def lm_lora_wrap(module: torch.nn.Module, params: FinetuneStep) -> tuple[Any, list[str]]:
    """A causal LM wrapped by peft LoRA (``TaskType.CAUSAL_LM``) and the modules it adapts.

    Targets: the step's ``lora.target_modules``, else peft's defaults for the architecture (Llama ``q_proj``,
    ``v_proj``; GPT-2 ``c_attn``; ...), else every Linear but the LM head.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
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
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=None if targets is None else list(targets),
    )
    try:
        wrapped = get_peft_model(module, config)
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


def finetune_lm(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """Fine-tune a causal LM with its own LM loss on labelled tokens; early stopping on the eval loss."""
    from worker import training
    from worker.lm.objectives import LM_INPUTS, eval_loss, lm_loss_fn, with_labels
    from worker.torch_utils import count_params

    if params.num_labels is not None:
        raise StepFailed("invalid_step", "num_labels does not apply to a text-generation model (it has no classes)")
    if params.until is not None:
        raise StepFailed("invalid_step", "until.max_accuracy_drop applies to classifiers, not text-generation")
    train = ctx.dataset("train", model)
    if train is None or not len(train):
        raise StepFailed("no_data", "fine-tuning needs data.train")
    train = with_labels(train)
    evald = ctx.dataset("eval", model)
    evald = with_labels(evald) if evald is not None and len(evald) else None
    device = ctx.device
    inner = model.module
    inner.to(device)
    metrics: dict[str, Any] = {"mode": params.mode, "total_params": count_params(inner)}
    if evald is not None:
        before = eval_loss(inner, evald, device)
        metrics.update({"eval_loss_before": before["eval_loss"], "perplexity_before": before["perplexity"]})
        ctx.log("eval before fine-tuning", **before)

    peft_model = None
    if params.mode == "lora":
        peft_model, targets = lm_lora_wrap(inner, params)
        metrics["lora_targets"] = targets
    else:
        lm_trainable(inner, params)
    trained = peft_model if peft_model is not None else inner
    metrics["trainable_params"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    eval_fn = None if evald is None else (lambda: eval_loss(trained, evald, device))
    with training.checkpointing(trained, device) as checkpointed:
        outcome = training.train(
            trained,
            params,
            ctx,
            train,
            [n for n in LM_INPUTS if n in train.inputs],
            lm_loss_fn(trained),
            eval_fn,
            metric="eval_loss",
            higher_is_better=False,
            phase="training",
            seed=ctx.spec.seed,
        )
    if peft_model is not None:
        inner = peft_model.merge_and_unload()  # export sees a plain model
        model = replace(model, module=inner)
    inner.requires_grad_(True)
    inner.eval()
    metrics.update(
        {
            "best_eval_loss": outcome.best_metric,
            "best_epoch": outcome.best_epoch,
            "epochs_run": outcome.epochs_run,
            "optimizer_steps": outcome.steps,
            "stopped_early": outcome.stopped_early,
            "gradient_checkpointing": checkpointed,
            "train_samples_per_s": outcome.samples_per_s,
        }
    )
    if evald is not None:
        after = eval_loss(inner, evald, device)
        metrics.update({"eval_loss_after": after["eval_loss"], "perplexity_after": after["perplexity"]})
    return PassResult(model, metrics, outcome.curve)


class FinetunePass(Pass):
    """Supervised fine-tuning with AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
    ICLR 2019) and warm-up + cosine decay (Loshchilov & Hutter, "SGDR", 2017): full, frozen backbone with a
    new head (transfer learning, Yosinski et al. 2014), last-N layers, or LoRA (Hu et al., "LoRA:
    Low-Rank Adaptation of Large Language Models", 2021) through peft, merged before export. Causal LMs
    train on their own next-token loss over labelled tokens (prompts and padding masked) with early stopping
    on the eval loss, gradient checkpointing and bf16 autocast on CUDA.
    """

    name = "finetune"

    def run(self, model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
        """Train the working model on data.train; return it (LoRA merged) with the training curve."""
        from worker import training
        from worker.convert import ensure_torch
        from worker.lm.objectives import is_lm
        from worker.torch_utils import count_params, example_inputs, interface

        model = ensure_torch(model, ctx)
        if params.tasks:  # multi-task: one head per task, or an LM on the tasks' rows mixed
            from worker import multitask

            return multitask.run(model, params, ctx)
        if is_lm(model, ctx.spec.task):
            return finetune_lm(model, params, ctx)
        train = ctx.dataset("train", model)
        if train is None or train.labels is None:
            raise StepFailed("no_labels", "fine-tuning needs a labelled data.train")
        budget = None
        if params.until is None:
            evald = ctx.dataset("eval", model)
        else:  # stop on a validation split carved from train: the eval set stays unseen
            train, evald, budget = training.budget_split(params, ctx, train)
        assert train.labels is not None
        example = example_inputs(model, train, ctx.device)
        head = head_name(model, example)
        metrics: dict[str, Any] = {"mode": params.mode, "head": head}

        num_labels = params.num_labels
        current = int(model.module.get_submodule(head).weight.shape[0])
        if num_labels is not None and num_labels != current:
            replace_head(model, head, num_labels, train.classes)
            metrics["new_head"] = {"from": current, "to": num_labels}
            ctx.log("replaced the output layer", head=head, num_labels_before=current, num_labels=num_labels)
        out_dim = int(model.module.get_submodule(head).weight.shape[0])
        if int(train.labels.max()) >= out_dim:
            raise StepFailed(
                "dataset_mismatch",
                f"labels go up to {int(train.labels.max())} but the model has {out_dim} outputs; set num_labels",
            )

        inner = model.module
        peft_model = None
        if params.mode == "full":
            inner.requires_grad_(True)
        elif params.mode == "head":
            inner.requires_grad_(False)
            inner.get_submodule(head).requires_grad_(True)
        elif params.mode == "last_n":
            unfreeze_last(model, int(params.last_n or 1), head)
        else:
            peft_model = lora_wrap(model, params, head)
            model = replace(model, module=peft_model)
        trainable = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
        metrics.update({"trainable_params": trainable, "total_params": count_params(model.module)})

        wrapper = interface(model)
        outcome = training.train(
            wrapper,
            params,
            ctx,
            train,
            model.input_names,
            classification_loss(wrapper, model.input_names),
            accuracy_eval(wrapper, evald, model.input_names, ctx.device),
            metric="accuracy",
            phase="training",
            seed=ctx.spec.seed,
            budget=budget,
        )
        if budget is not None and evald is not None:
            metrics.update(training.budget_metrics(outcome, budget, evald))
        if peft_model is not None:
            model = replace(model, module=peft_model.merge_and_unload())
        model.module.requires_grad_(True)
        model.module.eval()
        metrics.update(
            {
                "best_accuracy": outcome.best_metric,
                "best_epoch": outcome.best_epoch,
                "epochs_run": outcome.epochs_run,
                "optimizer_steps": outcome.steps,
                "stopped_early": outcome.stopped_early,
                "train_samples_per_s": outcome.samples_per_s,
            }
        )
        return PassResult(model, metrics, outcome.curve)
