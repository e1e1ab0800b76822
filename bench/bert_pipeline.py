"""BERT pipeline benchmark: ``finetune(lora) -> distill(student: {layers: 2}) -> quantize(dynamic)`` through the
live service, on a small randomly initialised BERT uploaded as an ``hf`` archive.

The data set is built here: four topics, each with its own keywords; a row is filler words plus three
keywords of its topic and one or two distractor keywords of another topic (the model has to weigh keyword
counts, not just spot one word); 5% of the rows (train and eval) carry a random wrong label, so the best
possible accuracy is about 95% and a model that memorises the noise loses on eval. Train and eval rows
are JSONL ``{text, label}`` files, tokenised by the worker with the uploaded model's tokenizer (a WordLevel
tokenizer of the corpus, ``max_length`` 32).

The BERT (by default hidden 128, 4 layers, 4 heads, intermediate 512; random init) first gets real accuracy:
it is fully fine-tuned in this process with the service's own ``finetune`` pass (worker.passes.finetune over
a worker.context.LocalContext), saved back to safetensors and zipped. That teacher is uploaded, and the job
LoRA-fine-tunes it, distills the LoRA-tuned model (``teacher: current``) into a 2-layer student
(DistilBERT-style: evenly spaced layers kept, initialised from that teacher), and quantizes the exported
ONNX with dynamic INT8.

Figures: top-1 accuracy of input and output (and after each step), ONNX Runtime CPU latency (batch 1,
1 thread, the report's harness) and its ratio, and the size ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, fmt_ratio, log, machine_info, new_run_id, service, submit_job, upload
from models.tables import SUCCEEDED
from tests.factories_train import write_jsonl

TOPICS: dict[str, list[str]] = {
    "sports": ["goal", "match", "team", "score", "coach", "league", "referee", "stadium", "player", "season"],
    "food": ["pizza", "bread", "soup", "cheese", "recipe", "spice", "oven", "salad", "butter", "noodle"],
    "tech": ["laptop", "code", "chip", "server", "robot", "phone", "network", "cloud", "kernel", "pixel"],
    "travel": ["flight", "hotel", "beach", "ticket", "island", "museum", "train", "passport", "tour", "map"],
}
FILLER = [
    "the", "a", "of", "and", "to", "in", "is", "was", "it", "for", "on", "with", "as", "at", "by", "this", "that",
    "from", "very", "some", "more", "our", "their", "yesterday", "today", "really", "quite", "new", "old", "big",
    "small", "good", "bad",
]  # fmt: skip
MAX_LENGTH = 32


def rows(n: int, seed: int, noise: float = 0.0) -> list[dict[str, Any]]:
    """``n`` rows ``{text, label}``: fillers, 3 keywords of the label's topic, 1-2 of another topic; a
    ``noise`` fraction of the rows then gets a random other label (so that no model reaches 100%)."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out = []
    for i in range(n):
        label = names[i % len(names)]
        other = rng.choice([t for t in names if t != label])
        words = rng.choices(FILLER, k=rng.randint(5, 12))
        words += rng.sample(TOPICS[label], 3) + rng.sample(TOPICS[other], rng.randint(1, 2))
        rng.shuffle(words)
        if rng.random() < noise:
            label = rng.choice([t for t in names if t != label])
        out.append({"text": " ".join(words), "label": label})
    rng.shuffle(out)
    return out


def random_bert(folder: Path, a: argparse.Namespace) -> Path:
    """A randomly initialised BertForSequenceClassification plus a WordLevel tokenizer of the corpus."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tests import factories_train as f

    torch.manual_seed(a.seed)
    folder.mkdir(parents=True, exist_ok=True)
    f.tokenizer(folder, [" ".join(FILLER), *(" ".join(v) for v in TOPICS.values())])
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    names = sorted(TOPICS)
    config = BertConfig(  # type: ignore[call-arg]
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=4 * a.hidden,
        vocab_size=vocab,
        max_position_embeddings=64,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder


def train_teacher(a: argparse.Namespace, work: Path, train: Path, evald: Path) -> tuple[Path, dict[str, Any]]:
    """Full fine-tune of the random BERT with the service's finetune pass; returns the zipped hf teacher."""
    import torch

    from models.spec import FinetuneStep, JobSpec
    from tests import factories_train as f
    from worker.context import LocalContext
    from worker.passes.finetune import FinetunePass

    torch.set_num_threads(a.threads)
    src = random_bert(work / "bert-random", a)
    archive = f.zip_dir(src, work / "bert-random.zip", prefix="bert/")
    step = {"type": "finetune", "mode": "full", "epochs": a.teacher_epochs, "lr": a.teacher_lr, "batch_size": 32}
    spec = JobSpec.model_validate({"model": "bert", "task": "text-classification",
                                   "data": {"train": "tr", "eval": "ev"}, "text": {"max_length": MAX_LENGTH},
                                   "steps": [step], "seed": a.seed})
    ctx = LocalContext(work / "teacher-work", spec, models={"bert": (archive, "hf", {})},
                       datasets={"tr": (train, "text", {}), "ev": (evald, "text", {})}, device="cpu")
    t0 = time.perf_counter()
    result = FinetunePass().run(ctx.load_model("input"), FinetuneStep.model_validate(step), ctx)
    out = work / "bert-teacher"
    result.model.module.save_pretrained(out, safe_serialization=True)
    for p in src.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(p, out / p.name)
    info = {"train_s": time.perf_counter() - t0, "accuracy": result.metrics["best_accuracy"],
            "curve": [{"epoch": c["epoch"], "loss": c["loss"], "accuracy": c.get("accuracy")} for c in result.curve]}
    return f.zip_dir(out, work / "bert-teacher.zip", prefix="bert/"), info


def job_spec(a: argparse.Namespace, model_id: str, train_id: str, eval_id: str) -> dict[str, Any]:
    """LoRA fine-tune -> distill into ``--student-layers`` layers -> dynamic INT8."""
    return {
        "model": model_id,
        "task": "text-classification",
        "data": {"train": train_id, "eval": eval_id},
        "text": {"max_length": MAX_LENGTH},
        "steps": [
            {"type": "finetune", "mode": "lora", "epochs": a.lora_epochs, "lr": a.lora_lr, "batch_size": 32},
            {"type": "distill", "teacher": "current", "student": {"layers": a.student_layers},
             "epochs": a.distill_epochs,
             "lr": a.distill_lr, "batch_size": 32},
            {"type": "quantize", "mode": "dynamic"},
        ],
        "evaluate": {"latency": {"runs": a.latency_runs, "warmup": 20, "threads": 1, "batch_size": 1}},
        "seed": a.seed,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.bert_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", choices=["distributed", "embedded"], default="distributed")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=600)
    p.add_argument("--label-noise", type=float, default=0.05, help="fraction of rows with a wrong label")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--lora-epochs", type=int, default=2)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--distill-epochs", type=int, default=4)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--latency-runs", type=int, default=300)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training the teacher here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    a = p.parse_args(argv)
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix=f"modelpress-{run_id}-") as tmp:
        return _run(a, run_id, Path(tmp))


def _run(a: argparse.Namespace, run_id: str, work: Path) -> dict[str, Any]:
    import httpx

    train = write_jsonl(work / "train.jsonl", rows(a.train_rows, seed=a.seed + 1, noise=a.label_noise))
    evald = write_jsonl(work / "eval.jsonl", rows(a.eval_rows, seed=a.seed + 2, noise=a.label_noise))
    log(f"training the teacher (hidden {a.hidden}, {a.layers} layers, {a.teacher_epochs} epochs, full fine-tune)")
    teacher, teacher_info = train_teacher(a, work, train, evald)
    log(f"teacher accuracy {teacher_info['accuracy']:.3f} after {teacher_info['train_s']:.1f} s; service: {a.service}")
    with service(a.service, run_id, worker=True) as svc, httpx.Client(base_url=svc.url, timeout=60) as client:
        model = upload(client, "models", teacher, "hf")
        tr = upload(client, "datasets", train, "text")
        ev = upload(client, "datasets", evald, "text")
        spec = job_spec(a, model["id"], tr["id"], ev["id"])
        t0 = time.perf_counter()
        job = svc.wait_job(client, submit_job(client, spec), timeout=a.timeout)
        job_s = time.perf_counter() - t0
    if job["status"] != SUCCEEDED:
        raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
    report = job["result"]["report"]
    steps, gains = report["steps"], report["gains"]
    in_acc, out_acc = report["input"]["accuracy"], report["output"]["accuracy"]
    lat_in, lat_out = report["input"]["latency_ms"]["median"], report["output"]["latency_ms"]["median"]
    figures: dict[str, Any] = {
        "service": a.service,
        "status": job["status"],
        "spec": spec,
        "teacher": teacher_info,
        "job_s": job_s,
        "accuracy": {"input": in_acc, "after_lora": steps[0]["eval"].get("accuracy"),
                     "after_distill": steps[1]["eval"].get("accuracy"), "output": out_acc},
        "accuracy_delta_points": (out_acc - in_acc) * 100,
        "latency_ms": {"input": lat_in, "output": lat_out},
        "latency_ratio": gains["latency_ratio"],
        "size_bytes": {"input": report["input"]["size_bytes"], "output": report["output"]["size_bytes"]},
        "size_ratio": gains["size_ratio"],
        "params_ratio": gains["params_ratio"],
        "lora": {k: steps[0]["metrics"].get(k) for k in ("trainable_params", "total_params")},
        "student_layers": steps[1]["metrics"].get("student_layers"),
        "distill_curve": [{k: c.get(k) for k in ("epoch", "loss", "accuracy")} for c in steps[1]["curve"]],
        "step_wall_s": {s["type"]: s["wall_s"] for s in steps},
        "machine": machine_info(),
    }
    summary = (
        f"{a.service}: BERT h{a.hidden} L{a.layers} -> L{a.student_layers} INT8: top-1 {in_acc:.4f} -> "
        f"{out_acc:.4f} ({figures['accuracy_delta_points']:+.2f} points; after LoRA "
        f"{figures['accuracy']['after_lora']:.3f}, after distill {figures['accuracy']['after_distill']:.3f}), "
        f"ORT latency {lat_in:.3f} -> {lat_out:.3f} ms ({fmt_ratio(gains['latency_ratio'])}), "
        f"size {fmt_ratio(gains['size_ratio'])}, job {job_s:.1f} s"
    )
    emit("bert_pipeline", summary, figures)
    return figures


if __name__ == "__main__":
    main()
