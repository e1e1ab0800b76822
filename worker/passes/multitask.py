"""Multi-task fine-tuning: one ``finetune`` step, several tasks, one model.

Encoders and CNNs: the working model's output layer becomes the shared backbone's feature output and each
task gets a head of its own (the input model's head is reused by a task with the same label set); the pass
exports one ONNX file with one output per task (``logits_<task>``) and ``modelpress.tasks`` metadata naming
each output's labels. Causal LMs: one model trained on the tasks' rows mixed by the sampling rule (choice rows
``{"text", "label"}`` train the label's likelihood after the text), evaluated per task (eval loss, and for
choice tasks zero-shot and fine-tuned accuracy, in-context too for a few-shot one). Each optimizer step draws
one batch from a task picked by the sampling rule (``proportional``, ``temperature``, ``uniform``; Raffel et al. 2020, T5
section 3.5.2). A task with few rows per class (few-shot) has a stratified validation split carved from its
train rows: early stopping and the best weights are chosen on it, never on the eval rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from worker.core import ArrayDataset, PassContext, StepFailed, WorkingModel
from worker.passes.base import PassResult
from worker.training import TrainOutcome

if TYPE_CHECKING:
    import torch

    from models.spec import FinetuneStep, TaskSpec

FEW_SHOT_MAX_PER_CLASS = 32  # a task with at most this many train rows per class is few-shot
FEW_SHOT_VALIDATION = 0.25  # of each class's rows, carved off for early stopping (at least one per class)
FEW_SHOT_PATIENCE = 3  # epochs without improvement before a few-shot run stops (when the step sets none)
IN_CONTEXT_SHOTS = 4  # solved train rows in the prompt of the in-context few-shot measurement
PROBE_STEPS = 200  # full-batch Adam steps of a few-shot task's head probe on the trained backbone's features
PROBE_LR = 1e-2
PROBE_EVERY = 10  # steps between the probe's measurements on the carved split
METADATA_KEY = "modelpress.tasks"


class TaskDataContext(PassContext, Protocol):
    """A PassContext that loads any dataset of the job by id (the job runner's and LocalContext)."""

    def dataset_by_id(self, ref: str, model: WorkingModel) -> ArrayDataset | None:
        """The dataset ``ref`` shaped for ``model``'s inputs."""
        ...


@dataclass
class Task:
    """One task as loaded: its rows, the validation split (few-shot) and its measurements."""

    name: str
    weight: float
    train: ArrayDataset
    eval: ArrayDataset | None
    classes: list[str] | None
    validation: ArrayDataset | None = None
    choice_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # LMs: raw train/eval choice rows

    @property
    def few_shot(self) -> bool:
        return self.validation is not None

    @property
    def selection(self) -> ArrayDataset | None:
        """Where the best epoch is chosen: the carved split for a few-shot task, else the task's eval rows."""
        return self.validation if self.validation is not None else self.eval


def mixing_probabilities(sizes: list[int], weights: list[float], rule: str, temperature: float = 2.0) -> list[float]:
    """The chance that a batch comes from each task: ``proportional`` to weight x rows, ``temperature``
    (weight x rows)^(1/T) (T=1 is proportional, large T nears uniform), ``uniform`` by weight alone."""
    if rule == "uniform":
        raw = [float(w) for w in weights]
    elif rule == "temperature":
        raw = [(w * n) ** (1.0 / temperature) for w, n in zip(weights, sizes, strict=True)]
    else:
        raw = [w * n for w, n in zip(weights, sizes, strict=True)]
    total = sum(raw)
    if total <= 0:
        raise StepFailed("no_data", "the tasks have no train rows")
    return [r / total for r in raw]


def stratified_split(data: ArrayDataset, seed: int, fraction: float = FEW_SHOT_VALIDATION) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, validation): ``fraction`` of each class's rows (at least one, never all) held out, seeded."""
    from worker.training import subset

    assert data.labels is not None
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(data.labels):
        rows = np.flatnonzero(data.labels == c)
        if len(rows) < 2:
            continue
        k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.extend(rng.permutation(rows)[:k].tolist())
    if not held:
        raise StepFailed("too_little_data", "a few-shot task needs at least two rows of some class to carve a "
                                            "validation split from")
    mask = np.zeros(len(data), dtype=bool)
    mask[held] = True
    return subset(data, np.flatnonzero(~mask)), subset(data, np.flatnonzero(mask))


def _remap(data: ArrayDataset, classes: list[str], where: str) -> ArrayDataset:
    """``data`` with its labels re-indexed into ``classes`` by name (an eval set may lack a class)."""
    if data.labels is None or data.classes is None or data.classes == classes:
        return data
    index = {c: i for i, c in enumerate(classes)}
    missing = [c for c in data.classes if c not in index]
    if missing:
        raise StepFailed("dataset_mismatch", f"{where}: label {missing[0]!r} is not among the train labels {classes}")
    table = np.array([index[c] for c in data.classes], dtype=np.int64)
    return ArrayDataset(data.inputs, table[data.labels], classes, data.meta)


def _load(ctx: PassContext, ref: str, model: WorkingModel, where: str) -> ArrayDataset:
    loader = getattr(ctx, "dataset_by_id", None)
    if loader is None:
        raise StepFailed("invalid_step", "this runner cannot load the tasks' datasets")
    try:
        data = loader(ref, model)
    except KeyError:
        raise StepFailed("dataset_mismatch", f"{where}: unknown dataset {ref!r}") from None
    if data is None or not len(data):
        raise StepFailed("no_data", f"{where}: dataset {ref!r} has no rows")
    return data


def task_eval_rows(ctx: PassContext, task: TaskSpec, index: int, model: WorkingModel,
                   labels: list[str] | None) -> ArrayDataset | None:
    """A task's eval rows shaped for ``model``, labels re-indexed into ``labels`` (the order its output scores
    them in, as the model's metadata names them); None when the task names no eval rows."""
    if task.data.eval is None:
        return None
    where = f"tasks.{index} ({task.name}).data.eval"
    data = _load(ctx, task.data.eval, model, where)
    return _remap(data, labels, where) if labels else data


def load_tasks(model: WorkingModel, params: FinetuneStep, ctx: PassContext, lm: bool) -> list[Task]:
    """The step's tasks with their data (labels by the train set's class names; few-shot splits carved)."""
    assert params.tasks is not None
    out: list[Task] = []
    for i, spec in enumerate(params.tasks):
        where = f"tasks.{i} ({spec.name})"
        train = _load(ctx, spec.data.train, model, f"{where}.data.train")
        evald = _load(ctx, spec.data.eval, model, f"{where}.data.eval") if spec.data.eval else None
        if lm:
            out.append(Task(spec.name, spec.weight, train, evald, None))
            continue
        if train.labels is None:
            raise StepFailed("no_labels", f"{where}.data.train: a task needs labelled rows")
        classes = list(train.classes) if train.classes else [str(c) for c in range(int(train.labels.max()) + 1)]
        if spec.labels is not None and sorted(spec.labels) != sorted(classes):
            raise StepFailed("dataset_mismatch", f"{where}.labels: {spec.labels} but data.train holds {classes}")
        train = ArrayDataset(train.inputs, train.labels, classes, train.meta)
        if evald is not None and evald.labels is not None:
            evald = _remap(evald, classes, f"{where}.data.eval")
        task = Task(spec.name, spec.weight, train, evald, classes)
        if len(train) <= FEW_SHOT_MAX_PER_CLASS * len(classes):
            task.train, task.validation = stratified_split(train, ctx.spec.seed + i)
            ctx.log("few-shot task: validation split carved from its train rows", task=spec.name,
                    train=len(task.train), validation=len(task.validation))
        out.append(task)
    return out


# ----------------------------------------------------------------------------------------------------------
# the mixed training loop


@dataclass
class MixedOutcome(TrainOutcome):
    """What the mixed loop did: the training loop's outcome, plus the batches each task got."""

    batches: dict[str, int] = field(default_factory=dict)


def _batch_stream(data: ArrayDataset, names: list[str], batch_size: int, generator: Any) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches of ``data``, pass after pass (the single-task loop's batches: one task alone
    trains exactly as ``finetune`` without tasks does)."""
    from worker.training import _batches

    while True:
        yield from _batches(data, names, batch_size, generator, False)


def selection_mean(per_task: dict[str, dict[str, float]], tasks: list[Task], metric: str) -> float | None:
    """The tasks' ``metric`` on their selection rows, each weighted by its rows (the share of all selection rows
    it gets right, for accuracy): a few-shot task's carved split of a handful of rows moves in steps of 10 points
    or more, and by a plain mean its noise would pick the shared backbone's epoch for every task."""
    pairs = [(per_task[t.name][metric], len(t.selection)) for t in tasks
             if t.selection is not None and per_task.get(t.name, {}).get(metric) is not None]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def train_mixed(
    module: torch.nn.Module,
    params: FinetuneStep,
    ctx: PassContext,
    tasks: list[Task],
    names: list[str],
    loss_for: Callable[[int, dict[str, torch.Tensor]], torch.Tensor],
    evaluate: Callable[[], dict[str, dict[str, float]]],
    metric: str,
    higher_is_better: bool = True,
) -> MixedOutcome:
    """Train ``module`` on batches drawn task by task with ``params.sampling``; ``evaluate()`` gives each task's
    metrics on its selection split after every epoch, whose mean (weighted by rows: ``selection_mean``) picks the
    best weights and drives early stopping."""
    import torch

    from worker.training import _BestWeights, autocast, cosine_with_warmup, param_groups, use_bf16

    device = ctx.device
    torch.manual_seed(ctx.spec.seed)
    generator = torch.Generator().manual_seed(ctx.spec.seed)
    rng = np.random.default_rng(ctx.spec.seed)
    module.to(device)
    groups = param_groups(module, params.weight_decay)
    if not groups:
        raise StepFailed("invalid_step", "nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(groups, lr=params.lr, fused=device.startswith("cuda"))
    sizes = [len(t.train) for t in tasks]
    probs = mixing_probabilities(sizes, [t.weight for t in tasks], params.sampling, params.temperature)
    per_epoch = sum(max(1, math.ceil(n / params.batch_size)) for n in sizes)
    epochs = params.planned_epochs()
    total = max(1, math.ceil(per_epoch / params.grad_accum)) * epochs
    if params.max_steps is not None:
        total = min(total, params.max_steps)
    warmup = int(params.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total))
    bf16 = use_bf16(device, params.mixed_precision)
    streams = [_batch_stream(t.train, names, params.batch_size, generator) for t in tasks]
    patience = params.early_stopping_patience
    if patience is None and any(t.few_shot for t in tasks):
        patience = FEW_SHOT_PATIENCE
    best = _BestWeights(module, patience, higher_is_better)
    outcome = MixedOutcome(batches={t.name: 0 for t in tasks})
    ctx.log("multi-task training: start", tasks=[t.name for t in tasks], rows=sizes, sampling=params.sampling,
            probabilities=[round(p, 4) for p in probs], batches_per_epoch=per_epoch, optimizer_steps=total,
            device=device)
    seen, train_time = 0, 0.0
    for epoch in range(1, epochs + 1):
        ctx.check_cancelled()
        module.train()
        started = time.perf_counter()
        loss_sum = [0.0] * len(tasks)
        count = [0] * len(tasks)
        optimizer.zero_grad(set_to_none=True)
        picks = rng.choice(len(tasks), size=per_epoch, p=probs)
        for i, t in enumerate(picks.tolist()):
            if i % 4 == 0 and i:
                ctx.check_cancelled()
            batch = {k: v.to(device, non_blocking=True) for k, v in next(streams[t]).items()}
            with autocast(device, bf16):
                loss = loss_for(t, batch)
            (loss / params.grad_accum).backward()
            loss_sum[t] += float(loss.detach())
            count[t] += 1
            seen += len(next(iter(batch.values())))
            outcome.batches[tasks[t].name] += 1
            if (i + 1) % params.grad_accum == 0 or i + 1 == per_epoch:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                outcome.steps += 1
                if outcome.steps >= total:
                    break
        train_time += time.perf_counter() - started
        outcome.epochs_run = epoch
        module.eval()
        per_task = evaluate()
        value = selection_mean(per_task, tasks, metric)
        point: dict[str, Any] = {"epoch": epoch, "loss": sum(loss_sum) / max(1, sum(count)), "eval_metric": value,
                                 "lr": float(optimizer.param_groups[0]["lr"])}
        for t, task in enumerate(tasks):
            if count[t]:
                point[f"loss[{task.name}]"] = loss_sum[t] / count[t]
            for k, v in per_task.get(task.name, {}).items():
                point[f"{k}[{task.name}]"] = v
        outcome.curve.append(point)
        ctx.progress(f"multi-task epoch {epoch}/{epochs}", fraction=epoch / epochs, epoch=epoch, epochs=epochs,
                     metrics={"loss": point["loss"], **({metric: value} if value is not None else {})})
        if value is not None and best.record(outcome, value, epoch):
            outcome.stopped_early = True
            ctx.log("multi-task training: early stop", epoch=epoch, best_epoch=outcome.best_epoch)
            break
        if outcome.steps >= total:
            break
    if best.restore(outcome):
        ctx.log("multi-task training: restored best weights", best_epoch=outcome.best_epoch)
    module.eval()
    outcome.samples_per_s = seen / train_time if train_time else 0.0
    return outcome


# ----------------------------------------------------------------------------------------------------------
# encoders and CNNs: shared backbone, one head per task


def multihead_class() -> type:
    import torch

    from worker.torch_utils import first_output

    class MultiHead(torch.nn.Module):
        """``forward(*inputs)`` -> one logits tensor per task (a dict when called by keyword, as hf models are)."""

        def __init__(self, backbone: torch.nn.Module, heads: dict[str, torch.nn.Module], input_names: list[str]):
            super().__init__()
            self.backbone = backbone
            self.heads = torch.nn.ModuleDict(heads)
            self.input_names = list(input_names)

        def features(self, *args: torch.Tensor) -> torch.Tensor:
            return first_output(self.backbone(*args))

        def forward(self, *args: torch.Tensor, return_dict: bool = False, **kwargs: torch.Tensor) -> Any:
            if kwargs:
                args = tuple(kwargs[n] for n in self.input_names)
            f = self.features(*args)
            outs = tuple(head(f) for head in self.heads.values())
            if return_dict:
                return {f"logits_{name}": o for name, o in zip(self.heads, outs, strict=True)}
            return outs

    return MultiHead


def _old_head_fits(classes: list[str], old: Any, model: WorkingModel) -> bool:
    """Whether the input model's head already scores ``classes`` (same names in the same order)."""
    if int(old.weight.shape[0]) != len(classes):
        return False
    config = getattr(model.module, "config", None)
    id2label = getattr(config, "id2label", None) if config is not None else None
    if id2label:
        return [str(id2label[i]) for i in range(len(classes))] == classes
    return classes == [str(i) for i in range(len(classes))]


def lora_config(module: torch.nn.Module, model: WorkingModel, params: FinetuneStep, r: int | None = None) -> Any:
    """A peft LoRA config for the backbone (rank ``r``, default the step's): the step's targets, the
    architecture's, else every Linear (Conv2d when it has none)."""
    import torch
    from peft import LoraConfig

    from worker.passes.tuning import LORA_TARGETS

    targets = params.lora.target_modules
    if targets is None:
        model_type = str(model.meta.get("model_type") or getattr(getattr(module, "config", None), "model_type", ""))
        targets = LORA_TARGETS.get(model_type)
    if targets is None:
        for kind in (torch.nn.Linear, torch.nn.Conv2d):
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, kind) and n})
            if targets:
                break
    if not targets:
        raise StepFailed("unsupported_model", "no Linear or Conv2d layers to attach LoRA adapters to")
    return LoraConfig(r=r or params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
                      target_modules=list(targets))


def _lora_backbone(module: torch.nn.Module, model: WorkingModel, params: FinetuneStep) -> Any:
    """The backbone wrapped by peft LoRA (``lora_config``)."""
    from peft import get_peft_model

    return get_peft_model(module, lora_config(module, model, params))


def accuracies(module: Any, tasks: list[Task], names: list[str], device: str, split: str,
                only: str | None = None) -> dict[str, dict[str, float]]:
    """Each task's top-1 accuracy on its ``selection`` or ``eval`` rows (tasks without them are left out; with
    ``only``, that task alone)."""
    import torch

    from worker.torch_utils import to_tensors

    out: dict[str, dict[str, float]] = {}
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.inference_mode():
            for t, task in enumerate(tasks):
                data = task.selection if split == "selection" else task.eval
                if data is None or data.labels is None or only not in (None, task.name):
                    continue
                preds = []
                for start in range(0, len(data), 256):
                    args = to_tensors(data, names, device, slice(start, start + 256))
                    preds.append(module(*args)[t].float().argmax(1).cpu().numpy())
                out[task.name] = {"accuracy": float((np.concatenate(preds) == data.labels).mean())}
    finally:
        for m, mode in modes:
            m.training = mode
    return out


def _onnx_accuracies(path: Path, tasks: list[Task], names: list[str]) -> dict[str, float]:
    """Each task's top-1 accuracy of the exported file's ``logits_<task>`` output on its eval rows (ORT)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    declared = {i.name for i in sess.get_inputs()}
    out: dict[str, float] = {}
    for task in tasks:
        if task.eval is None or task.eval.labels is None:
            continue
        preds = []
        for start in range(0, len(task.eval), 256):
            feed = {n: np.ascontiguousarray(task.eval.inputs[n][start:start + 256]) for n in names if n in declared}
            preds.append(np.asarray(sess.run([f"logits_{task.name}"], feed)[0]).argmax(1))
        out[task.name] = float((np.concatenate(preds) == task.eval.labels).mean())
    return out


def features(multi: Any, data: ArrayDataset, device: str) -> torch.Tensor:
    """The (trained or merged) backbone's features of ``data``'s rows, without grad."""
    import torch

    from worker.torch_utils import to_tensors

    with torch.no_grad():
        return torch.cat([multi.features(*to_tensors(data, multi.input_names, device, slice(i, i + 256))).float()
                          for i in range(0, len(data), 256)])


def probe_few_shot_heads(multi: Any, tasks: list[Task], ctx: PassContext) -> dict[str, dict[str, Any]]:
    """Each few-shot task's head refit on the trained backbone's features of its train rows (a linear probe: the
    backbone frozen, full-batch Adam), its step chosen on the carved split (accuracy, then loss; step 0 is the head
    as the mixed training left it). A task with tens of rows gets a handful of batches an epoch in the mixed (or
    its own) loop, too few for a fresh head to converge at a backbone's learning rate; its features are cheap."""
    import torch
    import torch.nn.functional as F

    out: dict[str, dict[str, Any]] = {}
    torch.manual_seed(ctx.spec.seed)
    multi.eval()
    for task in tasks:
        if task.validation is None or task.train.labels is None or task.validation.labels is None:
            continue
        ctx.check_cancelled()
        x, xv = features(multi, task.train, ctx.device), features(multi, task.validation, ctx.device)
        y = torch.from_numpy(task.train.labels).to(ctx.device)
        yv = torch.from_numpy(task.validation.labels).to(ctx.device)
        head = multi.heads[task.name]
        head.requires_grad_(True)

        def score(head: Any = head, xv: Any = xv, yv: Any = yv) -> tuple[float, float]:
            with torch.no_grad():
                logits = head(xv).float()
                return float((logits.argmax(1) == yv).float().mean()), -float(F.cross_entropy(logits, yv))

        best, best_step = score(), 0
        start = best
        state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        optimizer = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
        for step in range(1, PROBE_STEPS + 1):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(x).float(), y).backward()
            optimizer.step()
            if step % PROBE_EVERY == 0 and (now := score()) > best:
                best, best_step = now, step
                state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        head.load_state_dict(state)
        head.requires_grad_(False)
        out[task.name] = {"steps": best_step, "validation_before": start[0], "validation": best[0]}
        ctx.log("few-shot task: head probed on the trained features", task=task.name, best_step=best_step,
                validation_before=start[0], validation=best[0])
    return out


def write_task_metadata(path: Path, tasks: list[dict[str, Any]]) -> None:
    """Name each task's output and labels in the ONNX file's ``modelpress.tasks`` metadata (a JSON list)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(tasks))
    onnx.save_model(proto, str(path))


def _sizes(shared_params: int, backbone: int, heads: dict[str, int], shared_bytes: int | None) -> dict[str, Any]:
    """The shared model against N separate single-task models (one backbone each, with that task's head)."""
    separate = sum(backbone + h for h in heads.values())
    size: dict[str, Any] = {"tasks": len(heads), "shared_params": shared_params, "separate_params": separate,
                            "backbone_params": backbone, "head_params": heads,
                            "ratio": shared_params / separate if separate else None}
    if shared_bytes is not None and shared_params:
        size["shared_bytes"] = shared_bytes
        size["separate_bytes"] = round(shared_bytes * separate / shared_params)  # same bytes per parameter
    return size


def run_classifier(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """Shared backbone + one head per task, trained on mixed batches; exported to ONNX with one output per task."""
    import torch.nn.functional as F

    from worker.passes.tuning import unfreeze_last
    from worker.torch_utils import interface

    tasks = load_tasks(model, params, ctx, lm=False)
    names = model.input_names
    head, heads, reused = task_heads(model, tasks, ctx)
    inner = model.module
    if params.mode == "full":
        inner.requires_grad_(True)
    elif params.mode == "head":
        inner.requires_grad_(False)
    elif params.mode == "last_n":
        unfreeze_last(model, int(params.last_n or 1), head)
    else:
        inner = _lora_backbone(inner, model, params)
    backbone = interface(replace(model, module=inner))
    multi = multihead_class()(backbone, heads, names).to(ctx.device)
    for h in multi.heads.values():
        h.requires_grad_(True)

    def loss_for(t: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        f = multi.features(*[batch[n] for n in names])
        return F.cross_entropy(multi.heads[tasks[t].name](f).float(), batch["labels"])

    before = accuracies(multi, tasks, names, ctx.device, "eval")
    trainable = sum(p.numel() for p in multi.parameters() if p.requires_grad)
    outcome = train_mixed(multi, params, ctx, tasks, names, loss_for,
                          lambda: accuracies(multi, tasks, names, ctx.device, "selection"), "accuracy")
    if params.mode == "lora":
        multi.backbone = interface(replace(model, module=inner.merge_and_unload()))
    probed = probe_few_shot_heads(multi, tasks, ctx)
    multi.requires_grad_(True)
    multi.eval()
    after_torch = accuracies(multi, tasks, names, ctx.device, "eval")

    exported, rows, size = export_multihead(model, multi, tasks, before, after_torch, reused, ctx)
    for row in rows:
        row["batches"] = outcome.batches.get(row["task"], 0)
        if row["task"] in probed:
            row["head_probe"] = probed[row["task"]]
    metrics = {
        **_run_metrics(params, tasks, outcome, rows, "shared backbone, one head per task", "best_selection_accuracy"),
        "total_params": size["shared_params"], "trainable_params": trainable, "head": head,
    }
    metrics["multitask"]["size"] = size
    return PassResult(exported, metrics, outcome.curve)


def task_heads(model: WorkingModel, tasks: list[Task], ctx: PassContext) -> tuple[str, dict[str, Any], list[str]]:
    """The output layer's name, a new Linear head per task (the input's own copied where its labels fit) and the
    tasks that got it; the output layer itself becomes an Identity (the backbone's feature output)."""
    import torch

    from worker.passes.tuning import _set_submodule, head_name
    from worker.torch_utils import example_inputs

    head = head_name(model, example_inputs(model, tasks[0].train, ctx.device))
    old = model.module.get_submodule(head)
    if not isinstance(old, torch.nn.Linear):
        raise StepFailed("unsupported_model", f"the output layer {head!r} is not a Linear layer")
    heads: dict[str, Any] = {}
    reused: list[str] = []
    for task in tasks:
        assert task.classes is not None
        new = torch.nn.Linear(old.in_features, len(task.classes), bias=old.bias is not None)
        if _old_head_fits(task.classes, old, model):
            new.load_state_dict(old.state_dict())
            reused.append(task.name)
        heads[task.name] = new.to(device=old.weight.device, dtype=old.weight.dtype)
    _set_submodule(model.module, head, torch.nn.Identity())
    return head, heads, reused


def export_multihead(model: WorkingModel, multi: Any, tasks: list[Task], before: dict[str, dict[str, float]],
                     after_torch: dict[str, dict[str, float]], reused: list[str],
                     ctx: PassContext) -> tuple[WorkingModel, list[dict[str, Any]], dict[str, Any]]:
    """``multi`` exported to one ONNX file with an output per task (labels in its metadata); each task's row
    (accuracy before, after in torch and in the ONNX file) and the shared model's size against N models."""
    from worker import convert
    from worker.torch_utils import count_params

    outputs = [f"logits_{t.name}" for t in tasks]
    working = replace(model, module=multi, output_names=outputs)
    sample = next(d for t in tasks for d in (t.eval, t.train) if d is not None)
    exported = convert.to_onnx(working, ctx, ctx.spec.export.opset, name="multitask", data=sample)
    assert exported.onnx_path is not None
    described = [{"name": t.name, "output": f"logits_{t.name}", "labels": t.classes} for t in tasks]
    write_task_metadata(exported.onnx_path, described)
    after_onnx = _onnx_accuracies(exported.onnx_path, tasks, model.input_names)
    rows = [{
        "task": task.name, "metric": "accuracy", "labels": task.classes, "train_rows": len(task.train),
        "validation_rows": len(task.validation) if task.validation is not None else None,
        "eval_rows": len(task.eval) if task.eval is not None else None, "few_shot": task.few_shot,
        "before": before.get(task.name, {}).get("accuracy"), "after": after_onnx.get(task.name),
        "after_torch": after_torch.get(task.name, {}).get("accuracy"), "output": f"logits_{task.name}",
        "head_from_input": task.name in reused,
    } for task in tasks]
    head_params = {t.name: count_params(multi.heads[t.name]) for t in tasks}
    shared = count_params(multi)
    size = _sizes(shared, shared - sum(head_params.values()), head_params, exported.onnx_path.stat().st_size)
    return replace(exported, meta={**exported.meta, "tasks": described}), rows, size


# ----------------------------------------------------------------------------------------------------------
# causal LMs: one model, the tasks' rows mixed


class TorchScorer:
    """``logits(ids, mask)`` of a torch causal LM as numpy (the interface ``choice_accuracy`` scores with)."""

    def __init__(self, module: Any, device: str) -> None:
        self.module, self.device = module, device

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Float32 logits ``[B, T, V]``."""
        import torch

        with torch.inference_mode():
            out = self.module(input_ids=torch.from_numpy(ids).to(self.device),
                              attention_mask=torch.from_numpy(mask).to(self.device), use_cache=False)
        return out.logits.float().cpu().numpy()


def _choice_rows(data: ArrayDataset | None) -> list[dict[str, Any]]:
    return list(data.meta.get("rows") or []) if data is not None and data.meta.get("shape") == "choice" else []


def label_rows(rows: list[dict[str, Any]], model: WorkingModel, ctx: PassContext) -> ArrayDataset:
    """Choice rows as prompt/completion rows: the loss on the label's tokens after the text (label likelihood)."""
    from worker.formats.lm_text import lm_dataset

    pc = [{"prompt": str(r["text"]), "completion": " " + str(r["label"])} for r in rows]
    return lm_dataset(pc, {"row_shape": "prompt_completion"}, model, ctx.spec)


def lm_task_metrics(module: Any, task: Task, ctx: PassContext, tokenizer: Any, *, shots: int = 0,
                     split: str = "eval") -> dict[str, float]:
    """A task's eval loss and perplexity (its selection or eval rows) and, for choice rows, its choice accuracy."""
    from worker.lm.evaluate import choice_accuracy, few_shot_prefix
    from worker.lm.objectives import eval_loss

    data = task.selection if split == "selection" else task.eval
    if data is None:
        return {}
    out = dict(eval_loss(module, data, ctx.device))
    rows = task.choice_rows.get("validation" if split == "selection" and task.few_shot else "eval") or []
    if rows and task.classes:
        prefix = few_shot_prefix(task.choice_rows.get("train") or [], task.classes, shots) if shots else ""
        scorer: Any = TorchScorer(module, ctx.device)  # LMSession's logits() over a torch module
        scored = choice_accuracy(scorer, tokenizer, rows, task.classes, prefix,
                                 ctx.check_cancelled)
        if scored["accuracy"] is not None:
            out["accuracy"] = float(scored["accuracy"])
    return out


def prepare_lm_task(task: Task, model: WorkingModel, ctx: PassContext, index: int) -> None:
    """Choice tasks train on the label's likelihood; a few-shot one gets a stratified split carved from train."""
    from worker.lm.objectives import with_labels

    train_rows, eval_rows = _choice_rows(task.train), _choice_rows(task.eval)
    if not train_rows:
        task.train = with_labels(task.train)
        task.eval = with_labels(task.eval) if task.eval is not None else None
        return
    task.classes = sorted({str(r["label"]) for r in train_rows})
    if len(train_rows) <= FEW_SHOT_MAX_PER_CLASS * len(task.classes):
        idx = {c: i for i, c in enumerate(task.classes)}
        labelled = ArrayDataset({"row": np.arange(len(train_rows))},
                                np.array([idx[str(r["label"])] for r in train_rows], dtype=np.int64))
        keep, held = stratified_split(labelled, ctx.spec.seed + index)
        val_rows = [train_rows[i] for i in held.inputs["row"]]
        train_rows = [train_rows[i] for i in keep.inputs["row"]]
        task.validation = label_rows(val_rows, model, ctx)
        task.choice_rows["validation"] = val_rows
        ctx.log("few-shot task: validation split carved from its train rows", task=task.name,
                train=len(train_rows), validation=len(val_rows))
    task.choice_rows["train"], task.choice_rows["eval"] = train_rows, eval_rows
    task.train = label_rows(train_rows, model, ctx)
    task.eval = label_rows(eval_rows, model, ctx) if eval_rows else None


def in_context_tasks(tasks: list[Task]) -> list[Task]:
    """The tasks whose in-context few-shot accuracy is measured: the few-shot choice tasks. Its prompts are
    (shots + 1) rows long, so on a task with many rows it would cost several zero-shot passes for a comparison
    that only a task with a handful of rows a class needs (issue item 3: zero-shot, in-context, fine-tuned)."""
    return [t for t in tasks if t.few_shot and t.choice_rows.get("eval") and t.choice_rows.get("train")]


def run_lm(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """One causal LM trained on the tasks' rows mixed by the sampling rule (LoRA merged before export)."""
    from worker.formats.tokenizer import load_tokenizer
    from worker.lm.objectives import LM_INPUTS, lm_loss_fn
    from worker.passes.tuning import lm_lora_wrap, lm_trainable
    from worker.torch_utils import count_params

    tasks = load_tasks(model, params, ctx, lm=True)
    for i, task in enumerate(tasks):
        prepare_lm_task(task, model, ctx, i)
    tokenizer = load_tokenizer(model)
    inner = model.module
    inner.to(ctx.device)
    before = {t.name: lm_task_metrics(inner, t, ctx, tokenizer) for t in tasks}
    in_context = {t.name: lm_task_metrics(inner, t, ctx, tokenizer, shots=IN_CONTEXT_SHOTS)
                  for t in in_context_tasks(tasks)}
    peft_model = None
    if params.mode == "lora":
        peft_model, _targets = lm_lora_wrap(inner, params)
    else:
        lm_trainable(inner, params)
    trained = peft_model if peft_model is not None else inner
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    loss = lm_loss_fn(trained)
    outcome = train_mixed(
        trained, params, ctx, tasks, [n for n in LM_INPUTS if n in tasks[0].train.inputs],
        lambda t, batch: loss(batch),
        lambda: {t.name: lm_task_metrics(trained, t, ctx, tokenizer, split="selection") for t in tasks},
        "eval_loss", higher_is_better=False,
    )
    if peft_model is not None:
        inner = peft_model.merge_and_unload()
        model = replace(model, module=inner)
    inner.requires_grad_(True)
    inner.eval()
    after = {t.name: lm_task_metrics(inner, t, ctx, tokenizer) for t in tasks}
    params_n = count_params(inner)
    rows = lm_task_rows(tasks, before, after, in_context)
    for row in rows:
        row["batches"] = outcome.batches.get(row["task"], 0)
    metrics = {
        **_run_metrics(params, tasks, outcome, rows, "one causal LM, the tasks' rows mixed", "best_selection_eval_loss"),
        "total_params": params_n, "trainable_params": trainable,
    }
    metrics["multitask"]["size"] = _sizes(params_n, params_n, {t.name: 0 for t in tasks}, None)
    return PassResult(model, metrics, outcome.curve)


def lm_task_rows(tasks: list[Task], before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                 in_context: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each LM task's row: accuracy (choice rows) or eval loss before and after, and zero-shot, fine-tuned and
    (few-shot tasks) in-context accuracy side by side for choice tasks."""
    rows = []
    for task in tasks:
        b, a = before.get(task.name, {}), after.get(task.name, {})
        choice = "accuracy" in a
        rows.append({
            "task": task.name, "metric": "accuracy" if choice else "eval_loss", "labels": task.classes,
            "train_rows": len(task.train), "eval_rows": len(task.eval) if task.eval is not None else None,
            "validation_rows": len(task.validation) if task.validation is not None else None,
            "few_shot": task.few_shot, "before": b.get("accuracy" if choice else "eval_loss"),
            "after": a.get("accuracy" if choice else "eval_loss"),
            "eval_loss_before": b.get("eval_loss"), "eval_loss_after": a.get("eval_loss"),
            "zero_shot": b.get("accuracy") if choice else None,
            "in_context": in_context.get(task.name, {}).get("accuracy") if choice else None,
            "in_context_shots": IN_CONTEXT_SHOTS if task.name in in_context else None,
            "fine_tuned": a.get("accuracy") if choice else None,
        })
    return rows


def _run_metrics(params: FinetuneStep, tasks: list[Any], outcome: MixedOutcome, rows: list[dict[str, Any]],
                 kind: str, selection: str) -> dict[str, Any]:
    """The step metrics both kinds of multi-task run report: the loop's outcome and the mixing of the tasks."""
    return {
        "mode": params.mode, selection: outcome.best_metric, "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run, "optimizer_steps": outcome.steps, "stopped_early": outcome.stopped_early,
        "train_samples_per_s": outcome.samples_per_s,
        "multitask": {
            "kind": kind, "sampling": params.sampling,
            "temperature": params.temperature if params.sampling == "temperature" else None,
            "probabilities": dict(zip([t.name for t in tasks], mixing_probabilities(
                [len(t.train) for t in tasks], [t.weight for t in tasks], params.sampling, params.temperature),
                strict=True)),
            "tasks": rows,
        },
    }


def run(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """The multi-task fine-tune of ``params.tasks``: heads per task (encoders, CNNs) or one mixed LM."""
    from worker.lm.objectives import is_lm

    if is_lm(model, ctx.spec.task):
        return run_lm(model, params, ctx)
    return run_classifier(model, params, ctx)
