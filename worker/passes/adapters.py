"""Multi-task transfer by adapters (``finetune`` with ``tasks``, ``mode: lora``, ``adapters: merge``).

One LoRA adapter per task on the shared backbone, each trained with its task's head on that task's rows alone
(a validation split carved from its train rows picks its best epoch), one after the other inside this job; then
peft's ``add_weighted_adapter`` merges them by every method the step names (``linear``, ``ties``, ``dare_ties``,
``dare_linear``, ``cat``, the ``*_svd`` variants; each adapter weighted by its task's ``weight``, ``density`` for
the pruning methods). Each merge is measured on every task's validation split and the best mean accuracy wins;
the winner is folded into the backbone and the model leaves as the multi-task fine-tune's does: one ONNX file with
a ``logits_<task>`` output per task. The report keeps the whole table: each adapter alone on its own task, each
merge method per task, the method chosen and why. Merging task vectors: Ilharco et al., "Editing Models with Task
Arithmetic", 2023; TIES: Yadav et al., 2023; DARE: Yu et al., "Language Models are Super Mario", 2024.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import DENSITY_METHODS, MergeConfig
from worker.core import ArrayDataset, PassContext, StepFailed, WorkingModel
from worker.passes.base import PassResult
from worker.passes.multitask import (
    Task,
    accuracies,
    export_multihead,
    load_tasks,
    lora_config,
    multihead_class,
    stratified_split,
    task_heads,
    train_mixed,
)

if TYPE_CHECKING:
    import torch

    from models.spec import FinetuneStep

MERGED_PREFIX = "merged_"  # the peft adapter name of a merge: merged_<method>
REFIT_STEPS = 100  # full-batch Adam steps of a head's refit on the merged features
REFIT_LR = 1e-2


def carve_validation(tasks: list[Task], fraction: float, seed: int, ctx: PassContext) -> None:
    """Give every task a validation split carved from its train rows (few-shot tasks already have theirs)."""
    for i, task in enumerate(tasks):
        if task.validation is None:
            task.train, task.validation = stratified_split(task.train, seed + i, fraction)
            ctx.log("validation split carved from the task's train rows", task=task.name, train=len(task.train),
                    validation=len(task.validation))


def pick(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The merge with the highest mean validation metric (the first of equals); rows with an error never win."""
    done = [row for row in table if row.get("mean") is not None]
    if not done:
        raise StepFailed("merge_failed", "no merge method worked: " + "; ".join(
            f"{row['method']}: {row.get('error')}" for row in table))
    return max(done, key=lambda row: float(row["mean"]))


def why(table: list[dict[str, Any]], chosen: dict[str, Any], individual: dict[str, dict[str, Any]]) -> str:
    """Why the chosen merge won: its mean against the runner-up, and its worst task against that task's adapter."""
    text = f"{chosen['method']}: highest mean validation accuracy over the tasks ({100 * chosen['mean']:.1f}%)"
    others = sorted((r for r in table if r.get("mean") is not None and r is not chosen), key=lambda r: -r["mean"])
    if others:
        text += f"; next {others[0]['method']} ({100 * others[0]['mean']:.1f}%)"
    gaps = {t: chosen["per_task"][t] - individual[t]["validation"] for t in chosen["per_task"]
            if individual.get(t, {}).get("validation") is not None}
    if gaps:
        worst = min(gaps, key=lambda t: gaps[t])
        text += f"; furthest from its own adapter: {worst} ({100 * gaps[worst]:+.1f} points)"
    failed = [r["method"] for r in table if r.get("mean") is None]
    if failed:
        text += f"; not possible here: {', '.join(failed)}"
    return text


def _wrap(model: WorkingModel, params: FinetuneStep, tasks: list[Task]) -> Any:
    """The backbone under peft with one LoRA adapter per task, named after it (its rank: the task's or the step's)."""
    from peft import get_peft_model

    assert params.tasks is not None
    ranks = {spec.name: spec.rank for spec in params.tasks}
    wrapped: Any = None
    for task in tasks:
        config = lora_config(model.module, model, params, ranks.get(task.name))
        if wrapped is None:
            wrapped = get_peft_model(model.module, config, adapter_name=task.name)
        else:
            wrapped.add_adapter(task.name, config)
    return wrapped


def train_adapters(multi: Any, peft_model: Any, params: FinetuneStep, ctx: PassContext,
                   tasks: list[Task]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Train each task's adapter and head on its rows alone (best epoch by its validation split); each adapter's
    validation and eval accuracy, and the curve (``loss[<task>]``, ``accuracy[<task>]`` per epoch)."""
    import torch.nn.functional as F

    names, device = multi.input_names, ctx.device
    individual: dict[str, dict[str, Any]] = {}
    curve: list[dict[str, Any]] = []
    for task in tasks:
        ctx.check_cancelled()
        peft_model.set_adapter(task.name)  # this adapter trainable, the others frozen
        for name, head in multi.heads.items():
            head.requires_grad_(name == task.name)

        def loss_for(_: int, batch: dict[str, torch.Tensor], name: str = task.name) -> torch.Tensor:
            f = multi.features(*[batch[n] for n in names])
            return F.cross_entropy(multi.heads[name](f).float(), batch["labels"])

        trainable = sum(p.numel() for p in multi.parameters() if p.requires_grad)
        ctx.log("adapter: start", task=task.name, trainable_params=trainable)
        def own_accuracy(name: str = task.name) -> dict[str, dict[str, float]]:
            return accuracies(multi, tasks, names, device, "selection", only=name)

        outcome = train_mixed(multi, params, ctx, [task], names, loss_for, own_accuracy, "accuracy")
        own = accuracies(multi, tasks, names, device, "selection", only=task.name)
        held = accuracies(multi, tasks, names, device, "eval", only=task.name)
        individual[task.name] = {
            "validation": own.get(task.name, {}).get("accuracy"), "eval": held.get(task.name, {}).get("accuracy"),
            "best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run, "optimizer_steps": outcome.steps,
            "stopped_early": outcome.stopped_early, "trainable_params": trainable,
        }
        curve += [{"epoch": p["epoch"], **{k: v for k, v in p.items() if k.endswith(f"[{task.name}]")}}
                  for p in outcome.curve]
    return individual, curve


def _features(multi: Any, data: ArrayDataset, device: str) -> torch.Tensor:
    """The (merged) backbone's features of ``data``'s rows, without grad."""
    import torch

    from worker.torch_utils import to_tensors

    with torch.no_grad():
        return torch.cat([multi.features(*to_tensors(data, multi.input_names, device, slice(i, i + 256))).float()
                          for i in range(0, len(data), 256)])


def refit_heads(multi: Any, tasks: list[Task], ctx: PassContext, start: dict[str, dict[str, Any]]) -> None:
    """Each task's head, from its adapter-trained weights (``start``), refit on the merged backbone's features of
    its train rows: full-batch Adam, the backbone frozen (a linear probe; the validation split stays unseen)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(ctx.spec.seed)
    multi.eval()
    for task in tasks:
        assert task.train.labels is not None
        feats = _features(multi, task.train, ctx.device)
        labels = torch.from_numpy(task.train.labels).to(ctx.device)
        head = multi.heads[task.name]
        head.load_state_dict(start[task.name])
        head.requires_grad_(True)
        optimizer = torch.optim.Adam(head.parameters(), lr=REFIT_LR)
        for _ in range(REFIT_STEPS):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(feats).float(), labels).backward()
            optimizer.step()
        head.requires_grad_(False)


def merge_table(multi: Any, peft_model: Any, tasks: list[Task], merge: MergeConfig, ctx: PassContext,
                weights: list[float]) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """Each method of ``merge.methods`` as a new adapter (peft ``add_weighted_adapter``) measured on every task's
    validation split: per-task accuracy and their mean (after the heads' refit when ``refit_heads``; as trained
    too), or the error peft gave (e.g. unequal ranks); and each method's heads."""
    import torch

    names = [t.name for t in tasks]
    trained = {t: {k: v.detach().clone() for k, v in multi.heads[t].state_dict().items()} for t in names}
    heads: dict[str, dict[str, dict[str, Any]]] = {}
    table: list[dict[str, Any]] = []
    for method in merge.methods:
        ctx.check_cancelled()
        density = merge.density if method in DENSITY_METHODS else None
        row: dict[str, Any] = {"method": method, "density": density}
        torch.manual_seed(ctx.spec.seed)  # dare's random drops, the same on every run
        started = time.perf_counter()
        try:
            peft_model.base_model.add_weighted_adapter(
                adapters=names, weights=weights, adapter_name=MERGED_PREFIX + method, combination_type=method,
                density=density)
        except (ValueError, RuntimeError) as exc:
            row["error"] = str(exc)
            ctx.log("merge not possible", method=method, error=str(exc))
            table.append(row)
            continue
        peft_model.set_adapter(MERGED_PREFIX + method)
        for t in names:
            multi.heads[t].load_state_dict(trained[t])
        scores = accuracies(multi, tasks, multi.input_names, ctx.device, "selection")
        row["per_task"] = {t: scores[t]["accuracy"] for t in names if t in scores}
        if merge.refit_heads:
            refit_heads(multi, tasks, ctx, trained)
            row["per_task_heads_as_trained"] = row["per_task"]
            scores = accuracies(multi, tasks, multi.input_names, ctx.device, "selection")
            row["per_task"] = {t: scores[t]["accuracy"] for t in names if t in scores}
        heads[method] = {t: {k: v.detach().clone() for k, v in multi.heads[t].state_dict().items()} for t in names}
        row["mean"] = float(np.mean(list(row["per_task"].values()))) if row["per_task"] else None
        row["seconds"] = round(time.perf_counter() - started, 3)
        ctx.log("merge measured", method=method, mean=row["mean"], per_task=row["per_task"])
        table.append(row)
    return table, heads


def run(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """Train one LoRA adapter per task, merge them by each method, keep the best merge; export one ONNX file."""
    from worker.lm.objectives import is_lm
    from worker.torch_utils import interface

    if is_lm(model, ctx.spec.task):
        raise StepFailed("unsupported_model", "adapters: merge is built for classifiers (encoders, CNNs); a causal "
                                              "LM's adapters cannot be merged yet")
    merge = params.merge or MergeConfig()
    tasks = load_tasks(model, params, ctx, lm=False)
    carve_validation(tasks, merge.validation, ctx.spec.seed, ctx)
    names = model.input_names
    head, heads, reused = task_heads(model, tasks, ctx)
    peft_model = _wrap(model, params, tasks)
    multi = multihead_class()(interface(replace(model, module=peft_model)), heads, names).to(ctx.device)
    before = accuracies(multi, tasks, names, ctx.device, "eval")  # every LoRA B is zero: the input backbone
    ctx.progress("training one adapter per task", fraction=0.0)
    individual, curve = train_adapters(multi, peft_model, params, ctx, tasks)
    weights = [t.weight for t in tasks]
    ctx.progress("merging the adapters", fraction=0.9)
    table, method_heads = merge_table(multi, peft_model, tasks, merge, ctx, weights)
    chosen = pick(table)
    for name, state in method_heads[chosen["method"]].items():
        multi.heads[name].load_state_dict(state)
    ctx.log("merge chosen", method=chosen["method"], mean=chosen["mean"])
    adapter_params = _adapter_params(peft_model, [t.name for t in tasks])
    merged = peft_model.merge_and_unload(adapter_names=[MERGED_PREFIX + chosen["method"]])
    multi.backbone = interface(replace(model, module=merged))
    multi.requires_grad_(True)
    multi.eval()
    after_torch = accuracies(multi, tasks, names, ctx.device, "eval")
    exported, rows, size = export_multihead(model, multi, tasks, before, after_torch, reused, ctx)
    for row in rows:
        own = individual[row["task"]]
        row.update({"adapter_alone": own["eval"], "adapter_alone_validation": own["validation"],
                    "merged_validation": chosen["per_task"].get(row["task"])})
    size["adapter_params"] = adapter_params
    metrics: dict[str, Any] = {
        "mode": params.mode, "adapters": "merge", "head": head, "total_params": size["shared_params"],
        "trainable_params": sum(a["trainable_params"] for a in individual.values()),
        "multitask": {
            "kind": "one LoRA adapter per task, merged", "tasks": rows, "size": size,
            "merge": {
                "methods": table, "chosen": chosen["method"], "why": why(table, chosen, individual),
                "individual": individual, "weights": dict(zip([t.name for t in tasks], weights, strict=True)),
                "density": merge.density, "validation": merge.validation, "metric": "accuracy",
                "refit_heads": merge.refit_heads,
                "trained": "one adapter after another in this job",
            },
        },
    }
    return PassResult(exported, metrics, curve)


def _adapter_params(peft_model: Any, adapters: list[str]) -> dict[str, int]:
    """Each adapter's parameter count (its LoRA A and B matrices)."""
    out = dict.fromkeys(adapters, 0)
    for name, p in peft_model.named_parameters():
        for adapter in adapters:
            if name.endswith(f".{adapter}.weight") and ".lora_" in name:
                out[adapter] += p.numel()
    return out
