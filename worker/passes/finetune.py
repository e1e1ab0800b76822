"""Fine-tuning: full, frozen backbone with a (new) head, last-N layers, or LoRA through peft."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from models.spec import FinetuneStep
from worker.core import PassContext, StepFailed, WorkingModel
from worker.passes.base import Pass, PassResult
from worker.passes.lm_device import merge_lora_into, place, plan_for
from worker.passes.tuning import (
    accuracy_eval,
    classification_loss,
    head_name,
    lm_lora_wrap,
    lm_trainable,
    lora_wrap,
    replace_head,
    unfreeze_last,
)


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
    original = model.module
    total = count_params(original)
    plan = plan_for(original, params.mode, device)  # a CPU refuses a model this large; CUDA: dtype, QLoRA
    inner = place(original, plan, device)  # fp32: the module itself; bf16 / 4-bit: a twin, the original kept
    twin = inner is not original
    metrics: dict[str, Any] = {"mode": params.mode, "total_params": total, "device": plan.device,
                               "dtype": plan.dtype, "base_4bit": plan.base_4bit, "planned_peak_bytes": plan.peak_bytes}
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
    after = eval_loss(trained, evald, device) if twin and evald is not None else None  # before the twin goes
    if twin:  # the updates go into the original fp32 weights: the rest of the model is left exactly as it was
        merge_lora_into(original, peft_model)
        inner = original
        del trained, peft_model
    elif peft_model is not None:
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
        after = after or eval_loss(inner, evald, device)
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
        if params.tasks and params.adapters == "merge":  # one LoRA adapter per task, merged
            from worker.passes import adapters

            return adapters.run(model, params, ctx)
        if params.tasks:  # multi-task: one head per task, or an LM on the tasks' rows mixed
            from worker.passes import multitask

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
