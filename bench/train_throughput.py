"""Training throughput: the service's fine-tune pass against a bare PyTorch loop, same model, data and settings.

A ResNet-style CNN on 32x32x3 inputs (stem + three two-conv residual blocks, widths w, 2w, 4w, the last two
downsampling; 10 classes) is fine-tuned on synthetic images whose class is a learnable pattern:

* ``pass``: ``worker.passes.finetune.FinetunePass`` (mode ``full``) over a ``worker.context.LocalContext`` with
  an npz train set (no eval set, so no per-epoch evaluation): the service's loop in worker/training.py
  (AdamW, warm-up + cosine schedule, cancellation checks, progress events, the loss read once per epoch).
* ``bare``: ``torch.optim.AdamW`` over shuffled index batches of pinned CPU tensors copied with
  ``non_blocking``, the loss summed on the device and read once per epoch.

Both use the same initial weights, batch size, epochs, learning rate and weight decay; on CUDA both run
under bf16 autocast with channels_last (inputs and weights). samples/s counts training time only (from
the start of each epoch to its loss read-back); runs alternate ``bare, pass, bare, pass, ...`` and the best
of ``--repeats`` is the figure (the machine may be shared). ratio = pass / bare, goal >= 0.9.
Runs without the service's database or broker: only torch, numpy, pydantic and the worker package.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, fmt_ratio, goal_met, log, machine_info

GOAL = 0.9
DEFAULTS = {  # (samples, batch size, width, epochs) per device
    "cpu": (2048, 64, 16, 2),
    "cuda": (51200, 512, 64, 3),
}


def resnet32(width: int) -> Any:
    """The CNN: 3x32x32 -> 10 logits (three residual blocks, widths w, 2w, 4w)."""
    from tests.factories_train import small_resnet

    w = width
    return small_resnet(3, [(w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2)])


def make_data(n: int, seed: int) -> tuple[Any, Any]:
    """``n`` images (float32 NCHW) of noise plus a class-specific pattern, and their labels (int64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((10, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32) + 0.5 * patterns[y]
    return x, y


def bare_loop(module: Any, x: Any, y: Any, a: argparse.Namespace) -> dict[str, Any]:
    """Plain AdamW over pinned, shuffled batches; bf16 autocast + channels_last on CUDA."""
    import torch
    import torch.nn.functional as F

    device = a.device
    cuda = device.startswith("cuda")
    torch.manual_seed(a.seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    if cuda:
        xs, ys = xs.pin_memory(), ys.pin_memory()
    module.to(device)
    if cuda:
        module.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=a.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(a.seed)
    seen, train_s, losses = 0, 0.0, []
    for _ in range(a.epochs):
        module.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        perm = torch.randperm(len(ys), generator=generator)
        for i in range(0, len(ys), a.batch_size):
            idx = perm[i : i + a.batch_size]
            xb, yb = xs.index_select(0, idx), ys.index_select(0, idx)
            if cuda:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(module(xb).float(), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
        losses.append(float(loss_sum.item()) / len(ys))
        train_s += time.perf_counter() - t0
        seen += len(ys)
    return {"samples_per_s": seen / train_s, "train_s": train_s, "loss": losses}


def pass_loop(module: Any, npz: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The service's finetune pass (mode full) on the same module and data, over a LocalContext."""
    from models.spec import FinetuneStep, JobSpec
    from worker.context import LocalContext
    from worker.core import WorkingModel
    from worker.passes.finetune import FinetunePass

    step = {"type": "finetune", "mode": "full", "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
            "weight_decay": 0.01, "mixed_precision": "auto"}
    spec = JobSpec.model_validate({"model": "m", "task": "image-classification", "data": {"train": "tr"},
                                   "steps": [step], "seed": a.seed})
    ctx = LocalContext(work, spec, models={}, datasets={"tr": (npz, "npz", {})}, device=a.device)
    model = WorkingModel(form="torch", origin="onnx", input_names=["input"], output_names=["logits"],
                         module=module.to(a.device))
    ctx.dataset("train", model)  # loaded (and cached) before the clock, as the bare loop's arrays are
    t0 = time.perf_counter()
    result = FinetunePass().run(model, FinetuneStep.model_validate(step), ctx)
    wall = time.perf_counter() - t0
    return {"samples_per_s": result.metrics["train_samples_per_s"], "pass_wall_s": wall,
            "loss": [c["loss"] for c in result.curve]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda[:n])")
    p.add_argument("--samples", type=int, help="default: 2048 on cpu, 51200 on cuda")
    p.add_argument("--batch-size", type=int, help="default: 64 on cpu, 512 on cuda")
    p.add_argument("--width", type=int, help="first block width (default: 16 on cpu, 64 on cuda)")
    p.add_argument("--epochs", type=int, help="default: 2 on cpu, 3 on cuda")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on cpu (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import numpy as np
    import torch

    kind = "cuda" if a.device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    n, bs, width, epochs = DEFAULTS[kind]
    a.samples, a.batch_size = a.samples or n, a.batch_size or bs
    a.width, a.epochs = a.width or width, a.epochs or epochs
    if a.threads:
        torch.set_num_threads(a.threads)
    x, y = make_data(a.samples, a.seed)
    torch.manual_seed(a.seed)
    initial = resnet32(a.width)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "pass": []}
    with tempfile.TemporaryDirectory(prefix="modelpress-throughput-") as tmp:
        npz = Path(tmp) / "train.npz"
        np.savez(npz, input=x, labels=y)
        if kind == "cuda":  # cuDNN / allocator warm-up outside both measurements
            warm = argparse.Namespace(**{**vars(a), "epochs": 1})
            bare_loop(copy.deepcopy(initial), x[: 8 * a.batch_size], y[: 8 * a.batch_size], warm)
        for r in range(a.repeats):
            log(f"repeat {r + 1}/{a.repeats}: bare loop")
            runs["bare"].append(bare_loop(copy.deepcopy(initial), x, y, a))
            log(f"repeat {r + 1}/{a.repeats}: finetune pass")
            runs["pass"].append(pass_loop(copy.deepcopy(initial), npz, Path(tmp) / f"work{r}", a))
    best = {k: max(v["samples_per_s"] for v in runs[k]) for k in runs}
    value = best["pass"] / best["bare"]
    device_name = torch.cuda.get_device_name(0) if kind == "cuda" else "cpu"
    figures = {
        "device": a.device,
        "device_name": device_name,
        "samples": a.samples,
        "batch_size": a.batch_size,
        "width": a.width,
        "epochs": a.epochs,
        "bf16_channels_last": kind == "cuda",
        "torch_threads": torch.get_num_threads(),
        "samples_per_s": best,
        "ratio": value,
        "goal_met": goal_met(value, GOAL),
        "runs": runs,
        "machine": machine_info(),
        "torch": torch.__version__,
    }
    summary = (
        f"{device_name}: finetune pass {best['pass']:.0f} samples/s vs bare loop {best['bare']:.0f} samples/s "
        f"(batch {a.batch_size}, {a.epochs} epochs of {a.samples}): ratio {fmt_ratio(value, GOAL)}"
    )
    emit("train_throughput", summary, figures)
    return figures


if __name__ == "__main__":
    main()
