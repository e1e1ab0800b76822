"""Multi-task transfer by adapters (``finetune`` with ``tasks``, ``mode: lora``, ``adapters: merge``).

One LoRA adapter per task on the shared backbone, each trained with its task's head on that task's rows alone
(a validation split carved from its train rows picks its best epoch): in a job, each by a child job of its own
(``adapter_task``, spread over the workers by ``worker/adapter_jobs.py``; the child keeps its adapter as
``adapter.zip``, which the parent loads into the same peft model), else one after the other here; then
peft's ``add_weighted_adapter`` merges them by every method the step names (``linear``, ``ties``, ``dare_ties``,
``dare_linear``, ``cat``, the ``*_svd`` variants; each adapter weighted by its task's ``weight``, ``density`` for
the pruning methods). Each merge is measured on every task's validation split and the best mean accuracy wins;
the winner is folded into the backbone and the model leaves as the multi-task fine-tune's does: for classifiers one
ONNX file with a ``logits_<task>`` output per task (each head refit on the merged features first); a causal LM
(tasks of text or choice rows, chosen by the mean validation eval loss) goes on down the pipeline as one plain
model. The report keeps the whole table: each adapter alone on its own task, each
merge method per task, the method chosen and why. Merging task vectors: Ilharco et al., "Editing Models with Task
Arithmetic", 2023; TIES: Yadav et al., 2023; DARE: Yu et al., "Language Models are Super Mario", 2024.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.spec import DENSITY_METHODS, MergeConfig
from worker.core import ArrayDataset, PassContext, StepFailed, WorkingModel
from worker.passes.base import PassResult
from worker.passes.multitask import (
    Task,
    accuracies,
    export_multihead,
    features,
    load_tasks,
    lora_config,
    multihead_class,
    stratified_split,
    task_heads,
    train_mixed,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from models.spec import FinetuneStep

ADAPTER_FILE = "adapter.zip"  # a task adapter's child job keeps it: the peft adapter dir, its head, its measurements
MERGED_PREFIX = "merged_"  # the peft adapter name of a merge: merged_<method>
REFIT_STEPS = 100  # full-batch Adam steps of a head's refit on the merged features
REFIT_LR = 1e-2
LM_VALIDATION_MIN = 2  # rows a causal LM task keeps for validation at least


class AdapterSource(Protocol):
    """Where a job's merge step gets its task adapters when child jobs trained them (``worker/adapter_jobs.py``)."""

    def fetch(self, params: FinetuneStep, ctx: PassContext) -> dict[str, tuple[str, Path]]:
        """Each task's job and ``adapter.zip`` once the jobs ended; StepFailed naming the task when one did not
        succeed."""
        ...


class Family(Protocol):
    """What differs between merging a classifier's adapters and a causal LM's."""

    metric: str  # the selection metric: ``accuracy`` (higher is better) or ``eval_loss`` (lower)
    higher_is_better: bool
    module: Any  # what trains: the multi-head wrapper, or the peft-wrapped LM
    input_names: list[str]

    def focus(self, task: Task) -> None:
        """Make ``task``'s parts (its head) the only trainable ones beside its adapter."""

    def loss(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``task``'s training loss on ``batch``."""

    def measure(self, split: str, only: str | None = None) -> dict[str, dict[str, float]]:
        """Each task's metrics on its ``selection`` or ``eval`` rows."""

    def after_merge(self) -> tuple[dict[str, dict[str, float]], Any] | None:
        """Once a merge is active: the metrics as merged before any refit and a snapshot to restore, or None."""

    def restore(self, snapshot: Any) -> None:
        """Put back what ``after_merge`` returned (the chosen merge's refit heads)."""

    def head(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s head weights (none for a causal LM)."""

    def load_head(self, task: str, state: dict[str, torch.Tensor]) -> None:
        """Put ``task``'s head weights (as ``head`` gave them) in place."""


class ClassifierAdapters:
    """A shared backbone (each task's adapter) and one head per task; heads refit on merged features."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, multi: Any, tasks: list[Task], ctx: PassContext, refit: bool) -> None:
        self.module, self.tasks, self.ctx, self.refit = multi, tasks, ctx, refit
        self.input_names = list(multi.input_names)
        self.trained: dict[str, dict[str, Any]] = {}

    def focus(self, task: Task) -> None:
        for name, head in self.module.heads.items():
            head.requires_grad_(name == task.name)

    def loss(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        f = self.module.features(*[batch[n] for n in self.input_names])
        return F.cross_entropy(self.module.heads[task.name](f).float(), batch["labels"])

    def measure(self, split: str, only: str | None = None) -> dict[str, dict[str, float]]:
        return accuracies(self.module, self.tasks, self.input_names, self.ctx.device, split, only)

    def _heads(self) -> dict[str, dict[str, Any]]:
        return {t: {k: v.detach().clone() for k, v in h.state_dict().items()} for t, h in self.module.heads.items()}

    def after_merge(self) -> tuple[dict[str, dict[str, float]], Any] | None:
        if not self.trained:
            self.trained = self._heads()  # the heads as their adapters' training left them
        self.restore(self.trained)
        if not self.refit:
            return None
        as_trained = self.measure("selection")
        refit_heads(self.module, self.tasks, self.ctx, self.trained)
        return as_trained, self._heads()

    def restore(self, snapshot: Any) -> None:
        for name, state in snapshot.items():
            self.module.heads[name].load_state_dict(state)

    def head(self, task: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.heads[task].state_dict().items()}

    def load_head(self, task: str, state: dict[str, torch.Tensor]) -> None:
        self.module.heads[task].load_state_dict(state)


class LMAdapters:
    """A causal LM under peft, one adapter per task of text or choice rows; merges chosen by eval loss."""

    metric, higher_is_better = "eval_loss", False

    def __init__(self, peft_model: Any, tasks: list[Task], ctx: PassContext, tokenizer: Any, names: list[str]) -> None:
        from worker.lm.objectives import lm_loss_fn

        self.module, self.tasks, self.ctx, self.tokenizer = peft_model, tasks, ctx, tokenizer
        self.input_names = names
        self._loss = lm_loss_fn(peft_model)

    def focus(self, task: Task) -> None:
        return None

    def loss(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(batch)

    def measure(self, split: str, only: str | None = None) -> dict[str, dict[str, float]]:
        from worker.passes.multitask import lm_task_metrics

        return {t.name: lm_task_metrics(self.module, t, self.ctx, self.tokenizer, split=split)
                for t in self.tasks if only in (None, t.name)}

    def after_merge(self) -> tuple[dict[str, dict[str, float]], Any] | None:
        return None

    def restore(self, snapshot: Any) -> None:
        return None

    def head(self, task: str) -> dict[str, torch.Tensor]:
        return {}

    def load_head(self, task: str, state: dict[str, torch.Tensor]) -> None:
        return None


def carve_validation(tasks: list[Task], fraction: float, seed: int, ctx: PassContext) -> None:
    """Give every classifier task a validation split carved from its train rows (few-shot ones have theirs)."""
    for i, task in enumerate(tasks):
        if task.validation is None:
            task.train, task.validation = stratified_split(task.train, seed + i, fraction)
            ctx.log("validation split carved from the task's train rows", task=task.name, train=len(task.train),
                    validation=len(task.validation))


def carve_lm_validation(task: Task, model: WorkingModel, fraction: float, seed: int, ctx: PassContext) -> None:
    """A causal LM task's validation split: choice rows stratified by label, text rows (sequences) at random."""
    from worker.passes.multitask import label_rows
    from worker.training import subset

    if task.validation is not None:
        return
    rows = task.choice_rows.get("train") or []
    if rows and task.classes:
        index = {c: i for i, c in enumerate(task.classes)}
        labelled = ArrayDataset({"row": np.arange(len(rows))}, np.array([index[str(r["label"])] for r in rows]))
        keep, held = stratified_split(labelled, seed, fraction)
        task.choice_rows["validation"] = [rows[i] for i in held.inputs["row"]]
        task.choice_rows["train"] = [rows[i] for i in keep.inputs["row"]]
        task.train = label_rows(task.choice_rows["train"], model, ctx)
        task.validation = label_rows(task.choice_rows["validation"], model, ctx)
    else:
        n = len(task.train)
        if n < 2 * LM_VALIDATION_MIN:
            raise StepFailed("too_little_data", f"task {task.name!r}: {n} train sequences are too few to carve a "
                                                "validation split from")
        order = np.random.default_rng(seed).permutation(n)
        k = max(LM_VALIDATION_MIN, round(fraction * n))
        task.train, task.validation = subset(task.train, np.sort(order[k:])), subset(task.train, np.sort(order[:k]))
    ctx.log("validation split carved from the task's train rows", task=task.name, train=len(task.train),
            validation=len(task.validation))


def pick(table: list[dict[str, Any]], higher_is_better: bool = True) -> dict[str, Any]:
    """The merge with the best mean validation metric (the first of equals); rows with an error never win."""
    done = [row for row in table if row.get("mean") is not None]
    if not done:
        raise StepFailed("merge_failed", "no merge method worked: " + "; ".join(
            f"{row['method']}: {row.get('error')}" for row in table))
    sign = 1.0 if higher_is_better else -1.0
    return max(done, key=lambda row: sign * float(row["mean"]))


def why(table: list[dict[str, Any]], chosen: dict[str, Any], individual: dict[str, dict[str, Any]],
        metric: str = "accuracy", higher_is_better: bool = True) -> str:
    """Why the chosen merge won: its mean against the runner-up, and its worst task against that task's adapter."""
    def shown(v: float) -> str:
        return f"{100 * v:.1f}%" if metric == "accuracy" else f"{v:.4g}"

    sign = 1.0 if higher_is_better else -1.0
    text = (f"{chosen['method']}: {'highest' if higher_is_better else 'lowest'} mean validation {metric.replace('_', ' ')}"
            f" over the tasks ({shown(chosen['mean'])})")
    others = sorted((r for r in table if r.get("mean") is not None and r is not chosen), key=lambda r: -sign * r["mean"])
    if others:
        text += f"; next {others[0]['method']} ({shown(others[0]['mean'])})"
    gaps = {t: sign * (chosen["per_task"][t] - individual[t]["validation"]) for t in chosen["per_task"]
            if individual.get(t, {}).get("validation") is not None}
    if gaps:
        worst = min(gaps, key=lambda t: gaps[t])
        gap = sign * gaps[worst]
        text += (f"; furthest from its own adapter: {worst} ("
                 + (f"{100 * gap:+.1f} points)" if metric == "accuracy" else f"{gap:+.4g})"))
    failed = [r["method"] for r in table if r.get("mean") is None]
    if failed:
        text += f"; not possible here: {', '.join(failed)}"
    return text


def _wrap(module: Any, configs: dict[str, Any]) -> Any:
    """``module`` under peft with one LoRA adapter per task, named after it (each adapter's random A matrices drawn
    after the caller's seed, so a child job that trains one of them starts it from the same weights)."""
    from peft import get_peft_model

    wrapped: Any = None
    for name, config in configs.items():
        if wrapped is None:
            wrapped = get_peft_model(module, config, adapter_name=name)
        else:
            wrapped.add_adapter(name, config)
    return wrapped


def train_adapters(family: Family, peft_model: Any, params: FinetuneStep, ctx: PassContext,
                   tasks: list[Task]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Train each task's adapter (and head) on its rows alone (best epoch by its validation split); each adapter's
    validation and eval metric, and the curve (``loss[<task>]``, ``<metric>[<task>]`` per epoch)."""
    individual: dict[str, dict[str, Any]] = {}
    curve: list[dict[str, Any]] = []
    for task in tasks:
        ctx.check_cancelled()
        peft_model.set_adapter(task.name)  # this adapter trainable, the others frozen
        family.focus(task)
        trainable = sum(p.numel() for p in family.module.parameters() if p.requires_grad)
        ctx.log("adapter: start", task=task.name, trainable_params=trainable)

        def loss_for(_: int, batch: dict[str, torch.Tensor], task: Task = task) -> torch.Tensor:
            return family.loss(task, batch)

        def own(name: str = task.name) -> dict[str, dict[str, float]]:
            return family.measure("selection", only=name)

        start = own().get(task.name, {}).get(family.metric)  # its LoRA B is zero: the input backbone
        outcome = train_mixed(family.module, params, ctx, [task], family.input_names, loss_for, own, family.metric,
                              higher_is_better=family.higher_is_better)
        chosen, held = own().get(task.name, {}), family.measure("eval", only=task.name).get(task.name, {})
        individual[task.name] = {
            "validation_before": start, "validation": chosen.get(family.metric), "eval": held.get(family.metric),
            "validation_metrics": chosen, "eval_metrics": held,
            "best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run, "optimizer_steps": outcome.steps,
            "stopped_early": outcome.stopped_early, "trainable_params": trainable,
        }
        curve += [{"epoch": p["epoch"], **{k: v for k, v in p.items() if k.endswith(f"[{task.name}]")}}
                  for p in outcome.curve]
    return individual, curve


def refit_heads(multi: Any, tasks: list[Task], ctx: PassContext, start: dict[str, dict[str, Any]]) -> None:
    """Each task's head, from its adapter-trained weights (``start``), refit on the merged backbone's features of
    its train rows: full-batch Adam, the backbone frozen (a linear probe; the validation split stays unseen)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(ctx.spec.seed)
    multi.eval()
    for task in tasks:
        assert task.train.labels is not None
        feats = features(multi, task.train, ctx.device)
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


def merge_table(family: Family, peft_model: Any, tasks: list[Task], merge: MergeConfig, ctx: PassContext,
                weights: list[float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each method of ``merge.methods`` as a new adapter (peft ``add_weighted_adapter``) measured on every task's
    validation split: per-task metric and their mean (after the heads' refit where the family refits; as merged
    too), or the error peft gave (e.g. unequal ranks); and each method's snapshot (its refit heads)."""
    import torch

    names = [t.name for t in tasks]
    snapshots: dict[str, Any] = {}
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
        refit = family.after_merge()
        if refit is not None:
            as_merged, snapshots[method] = refit
            row["per_task_heads_as_trained"] = {t: as_merged[t][family.metric] for t in names if t in as_merged}
        scores = family.measure("selection")
        row["per_task"] = {t: scores[t][family.metric] for t in names if scores.get(t, {}).get(family.metric) is not None}
        row["mean"] = float(np.mean(list(row["per_task"].values()))) if row["per_task"] else None
        row["seconds"] = round(time.perf_counter() - started, 3)
        ctx.log("merge measured", method=method, mean=row["mean"], per_task=row["per_task"])
        table.append(row)
    return table, snapshots


def save_adapter(family: Family, peft_model: Any, task: str, individual: dict[str, Any], curve: list[dict[str, Any]],
                 folder: Path) -> Path:
    """``task``'s adapter as ``adapter.zip`` beside ``folder``: peft's saved adapter dir (``peft/``), its head's
    weights (``head.safetensors``, classifiers) and its measurements and curve (``adapter.json``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder / "peft"), selected_adapters=[task])
    head = family.head(task)
    if head:
        save_file(head, str(folder / "head.safetensors"))
    (folder / "adapter.json").write_text(json.dumps({"task": task, "individual": individual, "curve": curve},
                                                    default=float))
    out = folder.with_name(ADAPTER_FILE)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    return out


def load_adapters(family: Family, peft_model: Any, tasks: list[Task], files: dict[str, tuple[str, Path]],
                  ctx: PassContext) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Each task's ``adapter.zip`` (``files``: its job and file) loaded into the adapter of its name (and its head):
    each adapter's measurements as its job took them, and the curves one after the other."""
    from peft import load_peft_weights, set_peft_model_state_dict
    from safetensors.torch import load_file

    individual: dict[str, dict[str, Any]] = {}
    curve: list[dict[str, Any]] = []
    for task in tasks:
        job_id, path = files[task.name]
        folder = ctx.workdir / "adapters" / task.name
        with zipfile.ZipFile(path) as z:
            z.extractall(folder)  # our own child's file; extractall keeps every name inside ``folder``
        configs = sorted(folder.glob("peft/**/adapter_config.json"))
        meta_file = folder / "adapter.json"
        if not configs or not meta_file.is_file():
            raise StepFailed("adapter_missing", f"task {task.name!r}: the adapter.zip of job {job_id} holds no "
                                                "peft adapter or no adapter.json")
        try:
            loaded = set_peft_model_state_dict(peft_model, load_peft_weights(str(configs[0].parent), device="cpu"),
                                               adapter_name=task.name)
        except RuntimeError as exc:  # another shape: the job's step was not this one
            raise StepFailed("adapter_mismatch", f"task {task.name!r}: the adapter of job {job_id}: {exc}") from exc
        unexpected = list(getattr(loaded, "unexpected_keys", []))
        if unexpected:
            raise StepFailed("adapter_mismatch", f"task {task.name!r}: the adapter of job {job_id} has weights this "
                                                 f"model lacks: {unexpected[:3]}")
        head = folder / "head.safetensors"
        if head.is_file():
            family.load_head(task.name, load_file(str(head)))
        meta = json.loads(meta_file.read_text())
        individual[task.name] = {**meta["individual"], "job_id": job_id}
        curve += meta["curve"]
        ctx.log("adapter: loaded from its child job", task=task.name, job=job_id)
    return individual, curve


def _obtain(family: Family, peft_model: Any, params: FinetuneStep, ctx: PassContext,
            tasks: list[Task]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], str]:
    """Every task's adapter trained: by child jobs when the job runs them (its context's ``task_adapters``), else
    one after the other here; each adapter's measurements, the curves, and how they were trained."""
    source: AdapterSource | None = getattr(ctx, "task_adapters", None)
    if source is None:
        ctx.progress("training one adapter per task", fraction=0.0)
        individual, curve = train_adapters(family, peft_model, params, ctx, tasks)
        return individual, curve, "one adapter after another in this job"
    files = source.fetch(params, ctx)
    individual, curve = load_adapters(family, peft_model, tasks, files, ctx)
    return individual, curve, "one child job per task, loaded here"


def _merge_all(family: Family, peft_model: Any, params: FinetuneStep, ctx: PassContext, tasks: list[Task],
               before_unload: Callable[[], None] | None = None,
               ) -> tuple[Any, dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Get the adapters trained, merge them by every method, keep the best: the merged plain module, the step's
    merge metrics, the curve and each adapter's own measurements (``before_unload`` runs while the base is
    untouched and every adapter is still there)."""
    merge = params.merge or MergeConfig()
    individual, curve, trained = _obtain(family, peft_model, params, ctx, tasks)
    weights = [t.weight for t in tasks]
    ctx.progress("merging the adapters", fraction=0.9)
    table, snapshots = merge_table(family, peft_model, tasks, merge, ctx, weights)
    chosen = pick(table, family.higher_is_better)
    if chosen["method"] in snapshots:
        family.restore(snapshots[chosen["method"]])
    ctx.log("merge chosen", method=chosen["method"], mean=chosen["mean"])
    adapter_params = _adapter_params(peft_model, [t.name for t in tasks])
    if before_unload is not None:
        before_unload()
    merged = peft_model.merge_and_unload(adapter_names=[MERGED_PREFIX + chosen["method"]])
    info = {
        "methods": table, "chosen": chosen["method"], "chosen_per_task": chosen["per_task"],
        "why": why(table, chosen, individual, family.metric, family.higher_is_better),
        "individual": individual, "weights": dict(zip([t.name for t in tasks], weights, strict=True)),
        "density": merge.density, "validation": merge.validation, "metric": family.metric,
        "refit_heads": merge.refit_heads if isinstance(family, ClassifierAdapters) else None,
        "adapter_params": adapter_params, "trained": trained,
    }
    return merged, info, curve, individual


def _train_own(family: Family, peft_model: Any, params: FinetuneStep, ctx: PassContext,
               tasks: list[Task]) -> tuple[Any, dict[str, Any], list[dict[str, Any]], Path]:
    """``adapter_task`` (a merge job's child): that task's adapter (and head) alone, kept as ``adapter.zip``; the
    module with that adapter merged, its measurements, its curve and the file."""
    task = next(t for t in tasks if t.name == params.adapter_task)
    ctx.progress(f"training the adapter of task {task.name}", fraction=0.0)
    individual, curve = train_adapters(family, peft_model, params, ctx, [task])
    path = save_adapter(family, peft_model, task.name, individual[task.name], curve, ctx.workdir / "adapter")
    return peft_model.merge_and_unload(adapter_names=[task.name]), individual[task.name], curve, path


def _own_metrics(params: FinetuneStep, kind: str, rows: list[dict[str, Any]], size: dict[str, Any],
                 own: dict[str, Any], few_shot: set[str], **extra: Any) -> dict[str, Any]:
    """A child's step metrics: every task's row with the one adapter merged, and that adapter's measurements."""
    for row in rows:
        row["few_shot"] = row["task"] in few_shot
    return {"mode": params.mode, "adapters": "merge", "adapter_task": params.adapter_task,
            "total_params": size["shared_params"], "trainable_params": own["trainable_params"], **extra,
            "multitask": {"kind": kind, "tasks": rows, "size": size, "adapter": own}}


def _metrics(params: FinetuneStep, kind: str, rows: list[dict[str, Any]], size: dict[str, Any],
             info: dict[str, Any], few_shot: set[str], **extra: Any) -> dict[str, Any]:
    """The step's metrics: each task's row with its adapter alone beside the merge, sizes, the merge table."""
    for row in rows:
        row["few_shot"] = row["task"] in few_shot  # every task has a carved split here; few-shot is the row count
        own = info["individual"][row["task"]]
        row.update({"adapter_alone": own["eval_metrics"].get(row["metric"]),  # the row's metric, its eval rows
                    "adapter_alone_validation": own["validation"],  # the selection metric from here on
                    "merged_validation": info["chosen_per_task"].get(row["task"])})
    size["adapter_params"] = info.pop("adapter_params")
    info.pop("chosen_per_task")
    return {"mode": params.mode, "adapters": "merge", "total_params": size["shared_params"],
            "trainable_params": sum(a["trainable_params"] for a in info["individual"].values()), **extra,
            "multitask": {"kind": kind, "tasks": rows, "size": size, "merge": info}}


def run_classifier(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """Adapters and heads per task on a shared backbone, merged; one ONNX file with an output per task."""
    from worker.torch_utils import interface

    merge = params.merge or MergeConfig()
    tasks = load_tasks(model, params, ctx, lm=False)
    few_shot = {t.name for t in tasks if t.few_shot}
    carve_validation(tasks, merge.validation, ctx.spec.seed, ctx)
    names = model.input_names
    _seed(ctx)  # the heads' and adapters' first weights: the same in the job and in each of its adapter jobs
    head, heads, reused = task_heads(model, tasks, ctx)
    ranks = _ranks(params)
    peft_model = _wrap(model.module, {t.name: lora_config(model.module, model, params, ranks.get(t.name))
                                      for t in tasks})
    multi = multihead_class()(interface(replace(model, module=peft_model)), heads, names).to(ctx.device)
    family = ClassifierAdapters(multi, tasks, ctx, merge.refit_heads)
    before = family.measure("eval")  # every LoRA B is zero: the input backbone
    if params.adapter_task is not None:
        merged, own, curve, path = _train_own(family, peft_model, params, ctx, tasks)
    else:
        merged, info, curve, _ = _merge_all(family, peft_model, params, ctx, tasks)
    multi.backbone = interface(replace(model, module=merged))
    multi.requires_grad_(True)
    multi.eval()
    after_torch = family.measure("eval")
    exported, rows, size = export_multihead(model, multi, tasks, before, after_torch, reused, ctx)
    if params.adapter_task is not None:
        metrics = _own_metrics(params, f"the LoRA adapter of task {params.adapter_task} alone", rows, size, own,
                               few_shot, head=head)
        return PassResult(exported, metrics, curve, {ADAPTER_FILE: path})
    metrics = _metrics(params, "one LoRA adapter per task, merged", rows, size, info, few_shot, head=head)
    return PassResult(exported, metrics, curve)


def run_lm(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """Adapters per task on a causal LM (text or choice rows), merged into one plain model for the pipeline."""
    from worker.formats.tokenizer import load_tokenizer
    from worker.lm.objectives import LM_INPUTS
    from worker.passes.multitask import lm_task_rows, prepare_lm_task
    from worker.passes.tuning import lm_lora_config
    from worker.torch_utils import count_params

    merge = params.merge or MergeConfig()
    tasks = load_tasks(model, params, ctx, lm=True)
    few_shot: set[str] = set()
    for i, task in enumerate(tasks):
        prepare_lm_task(task, model, ctx, i)
        if task.few_shot:
            few_shot.add(task.name)
        carve_lm_validation(task, model, merge.validation, ctx.spec.seed + i, ctx)
    tokenizer = load_tokenizer(model)
    inner = model.module
    inner.to(ctx.device)
    ranks = _ranks(params)
    _seed(ctx)  # the adapters' first weights: the same in the job and in each of its adapter jobs
    try:
        peft_model = _wrap(inner, {t.name: lm_lora_config(inner, params, ranks.get(t.name)) for t in tasks})
    except ValueError as exc:  # e.g. target modules that are not in the model
        raise StepFailed("invalid_step", f"lora: {exc}") from exc
    family = LMAdapters(peft_model, tasks, ctx, tokenizer, [n for n in LM_INPUTS if n in tasks[0].train.inputs])
    before = family.measure("eval")  # every LoRA B is zero: the input model
    captured: list[Any] = []

    def keep_adapters() -> None:  # the unmerged base and each task's adapter, for adapters.zip
        from worker.lm import adapter_files

        ctx.progress("keeping the base and each task's adapter", fraction=0.95)
        assert tasks[0].validation is not None
        row = tasks[0].validation.inputs
        mask = row["attention_mask"][0] if "attention_mask" in row else np.ones_like(row["input_ids"][0])
        prompt = [int(t) for t, m in zip(row["input_ids"][0], mask, strict=True) if m][:16]
        captured.append(adapter_files.capture(peft_model, [t.name for t in tasks], ctx.workdir / "adapter-snapshot",
                                              model.hf_dir, prompt))

    files: dict[str, Path] = {}
    if params.adapter_task is not None:
        merged, own, curve, files[ADAPTER_FILE] = _train_own(family, peft_model, params, ctx, tasks)
    else:
        merged, info, curve, _ = _merge_all(family, peft_model, params, ctx, tasks,
                                            keep_adapters if params.adapter_files else None)
    if captured:
        from worker.lm import adapter_files

        ctx.progress("writing the base ONNX and one adapter file per task", fraction=0.97)
        info["adapter_files"], files["adapters.zip"] = adapter_files.finish(captured[0], ctx.workdir / "adapter-files")
        ctx.log("adapter files written", **{k: v for k, v in info["adapter_files"].items() if k != "runs"})
    merged.requires_grad_(True)
    merged.eval()
    family.module = merged
    after = family.measure("eval")
    n = count_params(merged)
    rows = lm_task_rows(tasks, before, after, {})
    size = {"tasks": len(tasks), "shared_params": n, "separate_params": n * len(tasks), "ratio": 1 / len(tasks)}
    if params.adapter_task is not None:
        metrics = _own_metrics(params, f"the LoRA adapter of task {params.adapter_task} alone on a causal LM", rows,
                               size, own, few_shot)
        return PassResult(replace(model, module=merged), metrics, curve, files)
    metrics = _metrics(params, "one LoRA adapter per task on a causal LM, merged", rows, size, info, few_shot)
    return PassResult(replace(model, module=merged), metrics, curve, files)


def _seed(ctx: PassContext) -> None:
    import torch

    torch.manual_seed(ctx.spec.seed)


def _ranks(params: FinetuneStep) -> dict[str, int | None]:
    return {spec.name: spec.rank for spec in params.tasks or []}


def run(model: WorkingModel, params: FinetuneStep, ctx: PassContext) -> PassResult:
    """Train one LoRA adapter per task, merge them by each method, keep the best merge."""
    from worker.lm.objectives import is_lm

    if is_lm(model, ctx.spec.task):
        return run_lm(model, params, ctx)
    return run_classifier(model, params, ctx)


def _adapter_params(peft_model: Any, adapters: list[str]) -> dict[str, int]:
    """Each adapter's parameter count (its LoRA A and B matrices)."""
    out = dict.fromkeys(adapters, 0)
    for name, p in peft_model.named_parameters():
        for adapter in adapters:
            if name.endswith(f".{adapter}.weight") and ".lora_" in name:
                out[adapter] += p.numel()
    return out
