"""Knowledge distillation from a teacher (the input model by default) into the working or a derived student."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from models.spec import ACCURACY_TASKS, DistillStep, StudentLayers, StudentModel
from worker.core import ArrayDataset, PassContext, StepFailed, WorkingModel
from worker.passes.base import Pass, PassResult
from worker.passes.lm_device import plan_for

if TYPE_CHECKING:
    import torch


def kept_layers(total: int, k: int) -> list[int]:
    """``k`` evenly spaced layer indices out of ``total``, always keeping the first and the last."""
    if k >= total:
        return list(range(total))
    if k == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})


def drop_layers(teacher: WorkingModel, k: int) -> tuple[WorkingModel, list[int]]:
    """A copy of an hf transformer teacher keeping ``k`` evenly spaced layers (DistilBERT-style init)."""
    import torch

    from worker.passes.tuning import layer_stack

    if not teacher.transformers:
        raise StepFailed("invalid_student", "student.layers needs an hf transformer teacher")
    module = copy.deepcopy(teacher.module)
    stack = layer_stack(module)
    if stack is None:
        raise StepFailed("invalid_student", "the teacher has no stack of transformer layers")
    total = len(stack)
    if k >= total:
        raise StepFailed("invalid_student", f"student.layers={k} must be below the teacher's {total} layers")
    keep = kept_layers(total, k)
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ModuleList) and len(child) == total and child[0] is stack[0]:
                setattr(parent, name, torch.nn.ModuleList([child[i] for i in keep]))
    for new_idx, block in enumerate(layer_stack(module) or []):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx  # type: ignore[assignment]
    config = getattr(module, "config", None)
    if config is not None:
        for attr in ("num_hidden_layers", "n_layers"):
            if hasattr(config, attr):
                setattr(config, attr, len(keep))
    return replace(teacher, module=module, meta={**teacher.meta, "student_layers": keep}), keep


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-position values (B, S) over positions where ``mask`` is 1 (all positions without a mask)."""
    if mask is None or values.ndim != 2 or mask.shape != values.shape:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def feature_loss(s: torch.Tensor, t: torch.Tensor, kind: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Cosine (1 - cos) or MSE distance between student and teacher embeddings, masked over padding."""
    import torch.nn.functional as F

    s, t = s.float(), t.float()
    per = 1.0 - F.cosine_similarity(s, t, dim=-1) if kind == "cosine" else (s - t).pow(2).mean(-1)
    return _masked_mean(per, mask)


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton et al. 2015), batch mean."""
    import torch.nn.functional as F

    T = temperature
    return F.kl_div(
        F.log_softmax(s.float() / T, -1),
        F.log_softmax(t.float() / T, -1),
        log_target=True,
        reduction="batchmean",
    ) * (T * T)


def _hf_forward(module: torch.nn.Module, names: list[str], args: list[torch.Tensor], output: str) -> Any:
    out = module(**dict(zip(names, args, strict=True)), output_hidden_states=True, return_dict=True)
    return out[output], out.hidden_states


def _same_hidden(student: WorkingModel, teacher: WorkingModel) -> bool:
    sc = getattr(student.module, "config", None)
    tc = getattr(teacher.module, "config", None)
    return bool(
        student.transformers
        and teacher.transformers
        and sc is not None
        and tc is not None
        and getattr(sc, "hidden_size", None) == getattr(tc, "hidden_size", None)
    )


def make_loss(
    student: WorkingModel, teacher: WorkingModel, params: DistillStep, task: str, has_labels: bool
) -> Any:
    """loss_fn(batch) combining soft targets, the task loss and optional hidden-state matching."""
    import torch
    import torch.nn.functional as F

    from worker.torch_utils import first_output, interface

    s_wrap, t_wrap = interface(student), interface(teacher)
    hidden = params.hidden_weight > 0 and _same_hidden(student, teacher)
    out_name = student.output_names[0]
    feature = task == "feature-extraction"

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s_args = [batch[n] for n in student.input_names]
        t_args = [batch[n] for n in teacher.input_names]
        with torch.no_grad():
            if hidden:
                t_out, t_hidden = _hf_forward(teacher.module, teacher.input_names, t_args, out_name)
            else:
                t_out = first_output(t_wrap(*t_args))
        if hidden:
            s_out, s_hidden = _hf_forward(student.module, student.input_names, s_args, out_name)
        else:
            s_out = first_output(s_wrap(*s_args))
        mask = batch.get("attention_mask")
        if feature or s_out.ndim != 2:
            loss = feature_loss(s_out, t_out, params.feature_loss, mask)
        else:
            loss = kd_loss(s_out, t_out, params.temperature)
            if has_labels and params.alpha < 1.0:
                loss = params.alpha * loss + (1 - params.alpha) * F.cross_entropy(
                    s_out.float(), batch["labels"]
                )
        if hidden:
            ls, lt = len(s_hidden) - 1, len(t_hidden) - 1
            terms = [
                feature_loss(s_hidden[j], t_hidden[round(j * lt / ls)], params.feature_loss, mask)
                for j in range(1, ls + 1)
            ]
            loss = loss + params.hidden_weight * torch.stack(terms).mean()
        return loss

    return loss_fn


def make_eval(
    student: WorkingModel, data: ArrayDataset | None, reference: Any, task: str, device: str
) -> tuple[Any, str]:
    """eval_fn and its metric: accuracy with labels, else cosine fidelity to the teacher's outputs."""
    from worker.metrics import accuracy, cosine_fidelity
    from worker.torch_utils import interface, predict

    if data is None:
        return None, "accuracy"
    wrapper = interface(student)
    labels = data.labels
    if labels is not None and task in ACCURACY_TASKS and reference is not None and reference.ndim == 2:
        return (
            lambda: {"accuracy": accuracy(predict(wrapper, data, student.input_names, device), labels)}
        ), "accuracy"

    def fidelity() -> dict[str, float]:
        return {"fidelity": cosine_fidelity(predict(wrapper, data, student.input_names, device), reference)}

    return fidelity, "fidelity"


def _names_dataset(
    ctx: PassContext, role: str, student: WorkingModel, teacher: WorkingModel
) -> ArrayDataset | None:
    """Data for ``role`` carrying the inputs of both student and teacher."""
    extra = [n for n in teacher.input_names if n not in student.input_names]
    target = replace(student, input_names=[*student.input_names, *extra]) if extra else student
    return ctx.dataset(role, target)  # type: ignore[arg-type]


def lm_layer_student(
    teacher: WorkingModel, k: int, data: ArrayDataset, device: str
) -> tuple[WorkingModel, list[int], list[float]]:
    """A copy of a causal-LM teacher keeping its ``k`` most important decoder layers (block influence on ``data``)."""
    from worker.lm.importance import decoder_layers, keep_layers, layer_importance, most_important

    module = copy.deepcopy(teacher.module)
    total = len(decoder_layers(module))
    if k >= total:
        raise StepFailed("invalid_student", f"student.layers={k} must be below the teacher's {total} layers")
    scores = layer_importance(module, data, device=device)
    keep = most_important(scores, k)
    keep_layers(module, keep)
    return replace(teacher, module=module, meta={**teacher.meta, "student_layers": keep}), keep, scores


def _vocabulary(model: WorkingModel) -> dict[str, int] | None:
    """The token -> id map of the model's tokenizer (None when its folder has none)."""
    if model.hf_dir is None or not any(
        (model.hf_dir / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer

    try:
        vocab: dict[str, int] = AutoTokenizer.from_pretrained(model.hf_dir).get_vocab()
    except (OSError, ValueError):  # a tokenizer transformers cannot load: compare by vocabulary size only
        return None
    return vocab


def check_same_tokenizer(student: WorkingModel, teacher: WorkingModel) -> None:
    """StepFailed unless student and teacher score the same vocabulary (token-level KD compares their logits)."""
    sizes = [int(m.module.get_output_embeddings().weight.shape[0]) for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        raise StepFailed(
            "tokenizer_mismatch",
            f"the student predicts {sizes[0]} tokens and the teacher {sizes[1]}: distillation needs the same tokenizer",
        )
    if student.hf_dir != teacher.hf_dir:
        sv, tv = _vocabulary(student), _vocabulary(teacher)
        if sv is not None and tv is not None and sv != tv:
            raise StepFailed("tokenizer_mismatch", "the student's and the teacher's tokenizers map tokens differently")


def lm_kd_loss(student: torch.nn.Module, teacher: torch.nn.Module, params: DistillStep) -> Any:
    """loss_fn(batch) = alpha * token KL(teacher/T || student/T) * T^2 + (1 - alpha) * the student's LM loss."""
    import torch

    from worker.lm.objectives import token_kd

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        lm = params.alpha < 1.0
        out = student(input_ids=ids, attention_mask=mask, labels=batch["labels"] if lm else None, use_cache=False)
        loss = token_kd(out.logits, t_logits, mask, params.temperature)
        if lm:
            loss = params.alpha * loss + (1 - params.alpha) * out.loss.float()
        return loss

    return loss_fn


def distill_lm(
    model: WorkingModel, teacher: WorkingModel, params: DistillStep, ctx: PassContext
) -> PassResult:
    """Token-level distillation of a causal LM into the working model, a layer-dropped copy or another upload."""
    from worker import training
    from worker.convert import ensure_torch
    from worker.lm.objectives import LM_INPUTS, eval_loss, is_lm, with_labels
    from worker.torch_utils import count_params

    device = ctx.device
    train = ctx.dataset("train", model)
    if train is None or not len(train):
        raise StepFailed("no_data", "distillation needs data.train")
    train = with_labels(train)
    evald = ctx.dataset("eval", model)
    evald = with_labels(evald) if evald is not None and len(evald) else None
    if not device.startswith("cuda"):
        plan_for(teacher.module, "distill", device)  # a CPU worker refuses running a teacher this large too
    teacher.module.to(device).eval().requires_grad_(False)
    metrics: dict[str, Any] = {"teacher": params.teacher}
    if isinstance(params.student, StudentLayers):
        calibration = ctx.dataset("calibration", model) or train
        student, keep, scores = lm_layer_student(teacher, params.student.layers, calibration, device)
        metrics.update({"student_layers": keep, "layer_scores": scores})
        ctx.log("student keeps the most important layers", kept=keep, scores=scores)
    elif isinstance(params.student, StudentModel):
        student = ensure_torch(ctx.load_model(params.student.model), ctx)
    else:
        student = ensure_torch(model, ctx)
    if student.module is teacher.module:
        student = replace(student, module=copy.deepcopy(teacher.module))
    if not is_lm(student, ctx.spec.task) or student.module.get_output_embeddings() is None:
        raise StepFailed("invalid_student", "a causal-LM teacher distils into a causal-LM student only")
    check_same_tokenizer(student, teacher)
    plan_for(student.module, "distill", device)  # a CPU refuses a student this large; on CUDA: does it fit
    s_module = student.module.to(device).requires_grad_(True)
    if evald is not None:
        teacher_eval = eval_loss(teacher.module, evald, device)
        before = eval_loss(s_module, evald, device)
        metrics.update(
            {
                "teacher_eval_loss": teacher_eval["eval_loss"],
                "teacher_perplexity": teacher_eval["perplexity"],
                "student_eval_loss_before": before["eval_loss"],
                "student_perplexity_before": before["perplexity"],
            }
        )
    eval_fn = None if evald is None else (lambda: eval_loss(s_module, evald, device))
    with training.checkpointing(s_module, device) as checkpointed:
        outcome = training.train(
            s_module,
            params,
            ctx,
            train,
            [n for n in LM_INPUTS if n in train.inputs],
            lm_kd_loss(s_module, teacher.module, params),
            eval_fn,
            metric="eval_loss",
            higher_is_better=False,
            phase="distilling",
            seed=ctx.spec.seed,
            keep_initial=params.student is None,  # the working model is already a candidate result
        )
    s_module.eval()
    if evald is not None:
        after = eval_loss(s_module, evald, device)
        metrics.update({"student_eval_loss_after": after["eval_loss"], "student_perplexity_after": after["perplexity"]})
    metrics.update(
        {
            "metric": "eval_loss",
            "best": outcome.best_metric,
            "best_epoch": outcome.best_epoch,
            "epochs_run": outcome.epochs_run,
            "optimizer_steps": outcome.steps,
            "teacher_params": count_params(teacher.module),
            "student_params": count_params(s_module),
            "gradient_checkpointing": checkpointed,
            "train_samples_per_s": outcome.samples_per_s,
        }
    )
    return PassResult(student, metrics, outcome.curve)


class DistillPass(Pass):
    """Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015):
    alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * cross-entropy; cosine/MSE on embeddings for
    feature extraction; layer-dropped students initialised from the teacher as in DistilBERT (Sanh et al.
    2019), with optional hidden-state matching. Causal LMs: the KL term per token over non-padding positions
    plus the LM loss, a layer-dropped student keeping the layers of highest block influence (ShortGPT, Men
    et al. 2024).
    """

    name = "distill"

    def run(self, model: WorkingModel, params: DistillStep, ctx: PassContext) -> PassResult:
        """Train the student against the frozen teacher on data.train."""
        from worker import training
        from worker.convert import ensure_torch
        from worker.lm.objectives import is_lm
        from worker.metrics import torch_metric
        from worker.torch_utils import count_params, interface, predict

        if params.teacher == "current":  # what the earlier steps made teaches (a frozen copy of it)
            current = ensure_torch(model, ctx)
            teacher = replace(current, module=copy.deepcopy(current.module))
        else:
            teacher = ensure_torch(ctx.load_model(params.teacher), ctx)
        teacher.module.eval().requires_grad_(False)
        if is_lm(teacher, ctx.spec.task):
            if params.until is not None:
                raise StepFailed("invalid_step", "until.max_accuracy_drop applies to classifiers, not text-generation")
            return distill_lm(model, teacher, params, ctx)
        metrics: dict[str, Any] = {"teacher": params.teacher}
        if isinstance(params.student, StudentLayers):
            student, keep = drop_layers(teacher, params.student.layers)
            metrics["student_layers"] = keep
        elif isinstance(params.student, StudentModel):
            student = ensure_torch(ctx.load_model(params.student.model), ctx)
        else:
            student = ensure_torch(model, ctx)
        student.module.to(ctx.device).requires_grad_(True)
        if student.module is teacher.module:
            student = replace(student, module=copy.deepcopy(teacher.module).requires_grad_(True))

        train = _names_dataset(ctx, "train", student, teacher)
        if train is None:
            raise StepFailed("no_data", "distillation needs data.train")
        budget = None
        if params.until is None:
            evald = _names_dataset(ctx, "eval", student, teacher)
        else:  # stop on a validation split carved from train: the eval set stays unseen
            train, evald, budget = training.budget_split(params, ctx, train)
        task = ctx.spec.task
        reference = None
        if evald is not None:
            reference = predict(interface(teacher), evald, teacher.input_names, ctx.device)
            metrics["teacher_metrics"] = torch_metric(teacher, evald, ctx.spec, device=ctx.device)
            metrics["student_metrics_before"] = torch_metric(
                student, evald, ctx.spec, reference=reference, device=ctx.device
            )
        has_labels = train.labels is not None and task in ACCURACY_TASKS
        eval_fn, metric = make_eval(student, evald, reference, task, ctx.device)
        loss_fn = make_loss(student, teacher, params, task, has_labels)
        teacher.module.eval()  # the teacher's BatchNorm and dropout stay in inference mode throughout
        wrapper = interface(student)
        outcome = training.train(
            wrapper,
            params,
            ctx,
            train,
            [*student.input_names, *[n for n in teacher.input_names if n not in student.input_names]],
            loss_fn,
            eval_fn,
            metric=metric,
            phase="distilling",
            seed=ctx.spec.seed,
            keep_initial=params.student is None,  # the working model is already a candidate result
            budget=budget,
        )
        if budget is not None and evald is not None:
            metrics.update(training.budget_metrics(outcome, budget, evald))
        student.module.eval()
        if evald is not None:
            metrics["student_metrics_after"] = torch_metric(
                student, evald, ctx.spec, reference=reference, device=ctx.device
            )
        metrics.update(
            {
                "metric": metric,
                "best": outcome.best_metric,
                "best_epoch": outcome.best_epoch,
                "epochs_run": outcome.epochs_run,
                "optimizer_steps": outcome.steps,
                "teacher_params": count_params(teacher.module),
                "student_params": count_params(student.module),
                "train_samples_per_s": outcome.samples_per_s,
            }
        )
        return PassResult(student, metrics, outcome.curve)
