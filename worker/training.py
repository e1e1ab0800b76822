"""The one training loop shared by fine-tuning and distillation.

AdamW with decoupled weight decay (Loshchilov & Hutter 2019; none on biases and norm weights), linear
warm-up then cosine decay, gradient accumulation, early stopping on the eval metric with the best weights
restored, ``max_steps``, ``until`` (stop once an accuracy budget holds on a validation split carved from
the train data, never the eval set), bf16 autocast and channels_last on CUDA, seeded shuffling, and no per-batch host
syncs (the loss is summed on the device and read once per epoch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.core import ArrayDataset, StepFailed

if TYPE_CHECKING:
    import torch

    from models.spec import TrainingParams
    from worker.core import PassContext, WorkingModel

CANCEL_EVERY = 4  # batches between cancellation checks
VALIDATION_FRACTION = 0.1  # of data.train, carved off as the validation split of ``until``
MIN_VALIDATION = 32  # samples in that split at the least (and as many left to train on)
LossFn = Callable[[dict[str, "torch.Tensor"]], "torch.Tensor"]
EvalFn = Callable[[], dict[str, float]]


@dataclass
class TrainOutcome:
    """What the loop did: the curve, the best eval metric (if any), epochs and optimizer steps run."""

    curve: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_run: int = 0
    steps: int = 0
    stopped_early: bool = False
    samples_per_s: float = 0.0
    budget_held: bool | None = None  # with a Budget: whether the metric reached it


@dataclass(frozen=True)
class Budget:
    """``until``: stop once the eval metric is at least ``reference - max_drop`` (both on the same split)."""

    reference: float
    max_drop: float

    @property
    def threshold(self) -> float:
        return self.reference - self.max_drop

    def holds(self, value: float) -> bool:
        return value >= self.threshold - 1e-12


def subset(data: ArrayDataset, index: np.ndarray) -> ArrayDataset:
    """The samples of ``data`` at ``index`` (labels and classes kept)."""
    labels = None if data.labels is None else data.labels[index]
    return ArrayDataset({k: v[index] for k, v in data.inputs.items()}, labels, data.classes, dict(data.meta))


def carve_validation(
    data: ArrayDataset, seed: int, fraction: float = VALIDATION_FRACTION, minimum: int = MIN_VALIDATION
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, validation): a seeded random ``fraction`` of ``data`` (at least ``minimum``) held out."""
    n = len(data)
    k = max(minimum, round(fraction * n))
    if n - k < minimum:
        raise StepFailed(
            "too_little_data",
            f"until needs a validation split of {k} samples carved from data.train and {minimum} left to "
            f"train on; data.train has {n}",
        )
    order = np.random.default_rng(seed).permutation(n)
    return subset(data, np.sort(order[k:])), subset(data, np.sort(order[:k]))


def input_accuracy(ctx: PassContext, data: ArrayDataset) -> float:
    """Top-1 accuracy of the job's input model on ``data`` (ONNX Runtime for an ONNX upload)."""
    model: WorkingModel = ctx.load_model("input")
    if data.labels is None:
        raise StepFailed("no_labels", "until needs a labelled data.train")
    if model.form == "onnx" and model.onnx_path is not None:
        from worker.evaluate import _Runner, make_session
        from worker.ort_guard import RunGuard

        runner = _Runner(make_session(model.onnx_path, 1))
        with RunGuard(ctx.check_cancelled, what="the input model (until's baseline accuracy)") as guard:
            out = runner.run_all({k: data.inputs[k] for k in model.input_names}, 256, ctx.check_cancelled, guard)
        logits = out[runner.output_names[0]]
    else:
        from worker.torch_utils import interface, predict

        model.module.to(ctx.device)
        logits = predict(interface(model), data, model.input_names, ctx.device)
    if logits.ndim != 2:
        raise StepFailed("unsupported_task", "until.max_accuracy_drop needs a classifier (2-D logits)")
    return float((np.asarray(logits).argmax(1) == data.labels).mean())


def budget_split(
    params: TrainingParams, ctx: PassContext, train: ArrayDataset
) -> tuple[ArrayDataset, ArrayDataset, Budget]:
    """``until``: (train, validation, budget), the reference being the input model's accuracy on validation."""
    from models.spec import ACCURACY_TASKS

    assert params.until is not None
    if ctx.spec.task not in ACCURACY_TASKS or train.labels is None:
        raise StepFailed(
            "invalid_step", "until.max_accuracy_drop applies to classifiers trained on labelled data.train"
        )
    rest, val = carve_validation(train, ctx.spec.seed)
    budget = Budget(input_accuracy(ctx, val), params.until.max_accuracy_drop)
    ctx.log("until: validation split carved from data.train", samples=len(val), reference_accuracy=budget.reference)
    return rest, val, budget


def budget_metrics(outcome: TrainOutcome, budget: Budget, validation: ArrayDataset) -> dict[str, Any]:
    """The step metrics of ``until``: whether the budget held, on what split, against what reference."""
    return {
        "budget_held": bool(outcome.budget_held),
        "budget": {
            "max_accuracy_drop": budget.max_drop,
            "reference_accuracy": budget.reference,
            "threshold": budget.threshold,
            "best_validation_accuracy": outcome.best_metric,
            "validation_samples": len(validation),
            "split": "data.train",
        },
    }


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup + 1) if warmup else 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices, kernels) and non-decayed (biases, norms)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def use_bf16(device: str, mixed_precision: str) -> bool:
    """Whether to autocast to bf16: only on CUDA, only when allowed and supported."""
    if not device.startswith("cuda") or mixed_precision == "no":
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())


def autocast(device: str, enabled: bool) -> Any:
    """A bf16 autocast context on CUDA when ``enabled``, else a no-op."""
    if not enabled:
        return nullcontext()
    import torch

    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


@contextmanager
def checkpointing(module: torch.nn.Module, device: str) -> Iterator[bool]:
    """Gradient checkpointing of an hf model for the duration, on CUDA only (activations recomputed in backward)."""
    enabled = device.startswith("cuda") and bool(getattr(module, "supports_gradient_checkpointing", False))
    if enabled:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    try:
        yield enabled
    finally:
        if enabled:
            module.gradient_checkpointing_disable()  # type: ignore[operator]


def has_conv2d(module: torch.nn.Module) -> bool:
    """Whether the module contains 2-D convolutions (channels_last pays off on CUDA)."""
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def _batches(
    data: ArrayDataset, names: list[str], batch_size: int, generator: Any, pin: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches via a DataLoader over whole-batch index lists (vectorised gather, pinned on CUDA)."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

    tensors = {n: torch.from_numpy(np.ascontiguousarray(data.inputs[n])) for n in names}
    if data.labels is not None:
        tensors["labels"] = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    n = len(data)

    class _Gather(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, idx: list[int]) -> dict[str, torch.Tensor]:
            index = torch.as_tensor(idx)
            return {k: v.index_select(0, index) for k, v in tensors.items()}

    sampler = BatchSampler(RandomSampler(range(n), generator=generator), batch_size, drop_last=False)
    loader = DataLoader(_Gather(), sampler=sampler, batch_size=None, pin_memory=pin, num_workers=0)
    yield from loader


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch."""
    return max(1, math.ceil(n / batch_size))


@dataclass
class _Loop:
    """What one training run set up: the optimizer and schedule, device placement and the step budget."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: Any
    device: str
    bf16: bool
    channels_last: bool
    per_epoch: int
    total: int


def _setup(module: torch.nn.Module, params: TrainingParams, ctx: PassContext, n: int, seed: int, phase: str) -> _Loop:
    """Seed, place ``module`` on the device (channels_last for convnets on CUDA), build AdamW and the schedule."""
    import torch

    device = ctx.device
    cuda = device.startswith("cuda")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    bf16 = use_bf16(device, params.mixed_precision)
    if params.mixed_precision == "bf16" and not bf16:
        ctx.log("bf16 requested but not available on this device; training in fp32", device=device)
    channels_last = cuda and has_conv2d(module)
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    groups = param_groups(module, params.weight_decay)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(groups, lr=params.lr, fused=cuda)
    per_epoch = num_batches(n, params.batch_size)
    updates_per_epoch = max(1, math.ceil(per_epoch / params.grad_accum))
    total = updates_per_epoch * params.planned_epochs()
    if params.max_steps is not None:
        total = min(total, params.max_steps)
    warmup = int(params.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total))
    ctx.log(
        f"{phase}: start",
        samples=n,
        epochs=params.planned_epochs(),
        batch_size=params.batch_size,
        grad_accum=params.grad_accum,
        optimizer_steps=total,
        warmup_steps=warmup,
        bf16=bf16,
        channels_last=channels_last,
        device=device,
    )
    return _Loop(module, optimizer, scheduler, generator, device, bf16, channels_last, per_epoch, total)


def _epoch(
    loop: _Loop,
    params: TrainingParams,
    ctx: PassContext,
    data: ArrayDataset,
    input_names: list[str],
    loss_fn: LossFn,
    outcome: TrainOutcome,
) -> tuple[float, int]:
    """One pass over shuffled ``data`` (stopping at the step budget): the mean loss and the samples seen."""
    import torch

    device = loop.device
    loop.module.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    loop.optimizer.zero_grad(set_to_none=True)
    batches = _batches(data, input_names, params.batch_size, loop.generator, device.startswith("cuda"))
    for i, cpu_batch in enumerate(batches):
        if i % CANCEL_EVERY == 0 and i:
            ctx.check_cancelled()
        batch = {}
        for k, v in cpu_batch.items():
            v = v.to(device, non_blocking=True)
            if loop.channels_last and v.ndim == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
            batch[k] = v
        size = len(next(iter(cpu_batch.values())))
        with autocast(device, loop.bf16):
            loss = loss_fn(batch)
        (loss / params.grad_accum).backward()
        loss_sum += loss.detach().float() * size
        seen += size
        if (i + 1) % params.grad_accum == 0 or i + 1 == loop.per_epoch:
            loop.optimizer.step()
            loop.scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
            outcome.steps += 1
            if outcome.steps >= loop.total:
                break
    return float(loss_sum.item()) / max(1, seen), seen  # the one host sync of the epoch


class _BestWeights:
    """Keeps the weights of the best eval metric so far and counts epochs without improvement."""

    def __init__(self, module: torch.nn.Module, patience: int | None, higher_is_better: bool = True) -> None:
        self.module = module
        self.sign = 1.0 if higher_is_better else -1.0
        self.patience = patience
        self.patience_left = patience
        self.state: dict[str, torch.Tensor] | None = None

    def record(self, outcome: TrainOutcome, value: float, epoch: int) -> bool:
        """Note ``value`` at ``epoch`` (keeping the weights if it is the best); True once patience ran out."""
        if outcome.best_metric is None or self.sign * value > self.sign * outcome.best_metric:
            outcome.best_metric, outcome.best_epoch = value, epoch
            self.state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.patience_left = self.patience
            return False
        if self.patience_left is None:
            return False
        self.patience_left -= 1
        return self.patience_left <= 0

    def restore(self, outcome: TrainOutcome) -> bool:
        """Load the best weights unless the last epoch's are the best; whether it did."""
        if self.state is None or outcome.best_epoch == outcome.epochs_run:
            return False
        self.module.load_state_dict(self.state)
        return True


def train(
    module: torch.nn.Module,
    params: TrainingParams,
    ctx: PassContext,
    data: ArrayDataset,
    input_names: list[str],
    loss_fn: LossFn,
    eval_fn: EvalFn | None = None,
    *,
    metric: str = "accuracy",
    phase: str = "training",
    seed: int = 0,
    keep_initial: bool = False,
    higher_is_better: bool = True,
    budget: Budget | None = None,
) -> TrainOutcome:
    """Train ``module``'s trainable parameters on ``data`` with ``loss_fn(batch)``; evaluate with ``eval_fn``.

    ``batch`` maps each input name (and ``labels`` when present) to a tensor on ``ctx.device``;
    ``eval_fn`` returns metrics (higher ``metric`` is better, lower with ``higher_is_better=False``, as for an
    eval loss) and drives early stopping and best-weight restore;
    with ``keep_initial`` the weights before training compete too (training never leaves the model worse);
    with ``budget`` (``until``; ``eval_fn`` then measures the validation split) training stops after the
    first epoch whose ``metric`` meets it, at most ``params.planned_epochs()``, best weights restored.
    """
    import torch

    loop = _setup(module, params, ctx, len(data), seed, phase)
    outcome = TrainOutcome()
    best = _BestWeights(module, params.early_stopping_patience, higher_is_better)
    samples_seen, train_time = 0, 0.0
    if budget is not None and eval_fn is None:
        raise ValueError("a budget needs an eval_fn on the validation split")
    epochs = params.planned_epochs()
    if eval_fn is not None and keep_initial:
        module.eval()
        initial = eval_fn().get(metric)
        if initial is not None:
            best.record(outcome, initial, 0)
            ctx.log(f"{phase}: eval before training", **{metric: initial})
            if budget is not None and budget.holds(initial):
                epochs = 0  # the budget holds already: nothing to recover
                outcome.budget_held = outcome.stopped_early = True
                ctx.log(f"{phase}: budget holds before training", **{metric: initial}, threshold=budget.threshold)
    for epoch in range(1, epochs + 1):
        ctx.check_cancelled()
        started = time.perf_counter()
        epoch_loss, seen = _epoch(loop, params, ctx, data, input_names, loss_fn, outcome)
        train_time += time.perf_counter() - started
        samples_seen += seen
        outcome.epochs_run = epoch
        metrics: dict[str, float] = {}
        if eval_fn is not None:
            module.eval()
            metrics = eval_fn()
        value = metrics.get(metric)
        lr = float(loop.optimizer.param_groups[0]["lr"])
        outcome.curve.append({"epoch": epoch, "loss": epoch_loss, "eval_metric": value, "lr": lr, **metrics})
        ctx.progress(
            f"{phase} epoch {epoch}/{epochs}",
            fraction=epoch / epochs,
            epoch=epoch,
            epochs=epochs,
            metrics={"loss": epoch_loss, **({metric: value} if value is not None else {})},
        )
        patience_out = value is not None and best.record(outcome, value, epoch)
        if budget is not None and value is not None and budget.holds(value):
            outcome.budget_held = True
            outcome.stopped_early = epoch < epochs
            ctx.log(f"{phase}: budget holds", epoch=epoch, **{metric: value}, threshold=budget.threshold)
            break
        if patience_out:
            outcome.stopped_early = True
            ctx.log(f"{phase}: early stop", epoch=epoch, best_epoch=outcome.best_epoch)
            break
        if outcome.steps >= loop.total:
            break
    if budget is not None and not outcome.budget_held:
        outcome.budget_held = False
        ctx.log(f"{phase}: budget did not hold", best=outcome.best_metric, threshold=budget.threshold)
    if best.restore(outcome):
        ctx.log(f"{phase}: restored best weights", best_epoch=outcome.best_epoch, best=outcome.best_metric)
    module.eval()
    if loop.channels_last:
        module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    outcome.samples_per_s = samples_seen / train_time if train_time else 0.0
    ctx.check_cancelled()
    return outcome
