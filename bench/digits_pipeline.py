"""Digits acceptance benchmark: ``prune(structured) -> distill -> quantize(static)`` through the live service.

A ResNet-style CNN for 8x8 digits (tests/factories_train.py ``digits_resnet``: stem + three two-conv residual
blocks, widths 64 and 128 by default, about 0.6 M parameters and 10 M MACs per sample) is trained in this
process on the sklearn digits train split (1200 samples), exported to ONNX (BatchNorm folded), and uploaded
**as ONNX** with train / eval (597 held-out samples) / calibration (the first 256 train images, no labels)
npz files. The job ``prune(structured, ratio) -> distill(teacher: input) -> quantize(static, QDQ,
per-channel)`` runs on a live API + Celery worker (Redis + PostgreSQL with a throwaway database by default,
or the embedded SQLite defaults), and the output ONNX is downloaded.

Figures (goals from issue 3): output size ratio (input / output, goal >= 10x), ONNX Runtime CPU latency
ratio (input / output at batch 1, 1 thread, goal >= 3x; from the job report, i.e. the worker's one
evaluation harness, and re-measured here in the bench process with the same ORT session settings as a
cross-check), top-1 accuracy of input and output on the held-out split (goal: within 1 point).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    OUT,
    emit,
    fmt_ratio,
    goal_met,
    log,
    machine_info,
    new_run_id,
    ratio,
    service,
    submit_job,
    upload,
)
from models.tables import SUCCEEDED

GOAL_SIZE, GOAL_LATENCY, GOAL_ACC_POINTS = 10.0, 3.0, 1.0


def build_assets(a: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The trained input model as ONNX (cached under bench/out/) and the three npz files."""
    import numpy as np
    import torch

    from tests import factories_train as f

    widths = (a.widths[0], a.widths[1])
    OUT.mkdir(parents=True, exist_ok=True)
    model = OUT / f"digits-resnet-w{widths[0]}-{widths[1]}-e{a.teacher_epochs}-s{a.seed}.onnx"
    train, evald = f.digits()
    t0 = time.perf_counter()
    if not model.exists():
        log(f"training the input model (widths {widths}, {a.teacher_epochs} epochs)")
        torch.set_num_threads(a.threads)
        tmp = model.with_suffix(".tmp.onnx")
        f.digits_resnet_onnx(tmp, widths, a.teacher_epochs, a.seed)
        tmp.replace(model)
    train_s = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": model}
    for name, data, labels in (
        ("train", train, True),
        ("eval", evald, True),
        ("calibration", train.take(a.calibration), False),
    ):
        arrays = {f.INPUT: data.inputs[f.INPUT]}
        if labels and data.labels is not None:
            arrays["labels"] = data.labels
        paths[name] = folder / f"digits-{name}.npz"
        np.savez(paths[name], **arrays)  # type: ignore[arg-type]
    return {"paths": paths, "train_s": train_s, "eval": evald}


def job_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    """The job: prune -> distill (teacher: the input) -> static INT8, with the report's latency settings."""
    return {
        "model": model_id,
        "task": "image-classification",
        "data": data,
        "steps": [
            {"type": "prune", "method": "structured", "ratio": a.ratio, "importance": a.importance},
            {
                "type": "distill",
                "epochs": a.epochs,
                "lr": a.lr,
                "batch_size": a.batch_size,
                "temperature": a.temperature,
                "alpha": a.alpha,
            },
            {"type": "quantize", "mode": "static", "per_channel": True,
             "calibration": {"method": "minmax", "samples": a.calibration}},
        ],
        "evaluate": {
            "max_accuracy_drop": GOAL_ACC_POINTS / 100,
            "latency": {"runs": a.latency_runs, "warmup": a.latency_warmup, "threads": 1, "batch_size": 1},
        },
        "seed": a.seed,
    }


def cross_check(a: argparse.Namespace, input_path: Path, output_path: Path, evald: Any) -> dict[str, Any]:
    """Latency and accuracy of both models re-measured here, with the worker's ORT session settings."""
    import numpy as np

    from models.spec import EvaluateConfig
    from worker.evaluate import make_session, measure_latency

    cfg = EvaluateConfig.model_validate({"latency": {"threads": 1, "batch_size": 1}})
    x = evald.inputs["input"]
    out: dict[str, Any] = {}
    sessions = {"input": make_session(input_path, cfg.latency.threads),
                "output": make_session(output_path, cfg.latency.threads)}
    for name, sess in sessions.items():
        logits = np.asarray(sess.run(None, {"input": x})[0])
        out[f"{name}_accuracy"] = float((logits.argmax(1) == evald.labels).mean())
    # interleaved rounds, so that load from other processes hits both models alike
    medians: dict[str, list[float]] = {"input": [], "output": []}
    for _ in range(a.rounds):
        for name, sess in sessions.items():
            m = measure_latency(sess, {"input": x[:1]}, a.latency_warmup, a.latency_runs)
            medians[name].append(m["ms"]["median"])
    for name in sessions:
        out[f"{name}_latency_ms"] = float(np.median(medians[name]))
    out["latency_ratio"] = ratio(out["input_latency_ms"], out["output_latency_ms"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.digits_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", choices=["distributed", "embedded"], default="distributed",
                   help="Redis + PostgreSQL (throwaway database) or the embedded SQLite defaults")
    p.add_argument("--widths", type=int, nargs=2, default=[64, 128], metavar=("W1", "W2"))
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--importance", default="l2", choices=["l1", "l2", "taylor"])
    p.add_argument("--epochs", type=int, default=5, help="distillation epochs (the goal allows <= 5)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--calibration", type=int, default=256, help="calibration samples (from the train split)")
    p.add_argument("--latency-runs", type=int, default=300)
    p.add_argument("--latency-warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds of the cross-check")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training the input model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    a = p.parse_args(argv)
    if a.epochs > 5:
        p.error("--epochs: the acceptance goal allows at most 5 distillation epochs")
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix=f"modelpress-{run_id}-") as tmp:
        return _run(a, run_id, Path(tmp))


def _run(a: argparse.Namespace, run_id: str, work: Path) -> dict[str, Any]:
    import httpx

    assets = build_assets(a, work)
    paths = assets["paths"]
    log(f"service: {a.service}")
    with service(a.service, run_id, worker=True) as svc, httpx.Client(base_url=svc.url, timeout=60) as client:
        model = upload(client, "models", paths["model"], "onnx")
        data = {role: upload(client, "datasets", paths[role], "npz")["id"]
                for role in ("train", "eval", "calibration")}
        spec = job_spec(a, model["id"], data)
        t0 = time.perf_counter()
        job = svc.wait_job(client, submit_job(client, spec), timeout=a.timeout)
        job_s = time.perf_counter() - t0
        if job["status"] != SUCCEEDED and (job.get("error") or {}).get("code") != "accuracy_budget_exceeded":
            raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}\n{svc.logs('worker.log')}")
        art = {x["name"]: x for x in job["result"]["artifacts"]}["model.onnx"]
        out_path = work / "output.onnx"
        resp = client.get(f"/v1/artifacts/{art['id']}/content")
        resp.raise_for_status()
        out_path.write_bytes(resp.content)
    report = job["result"]["report"]
    steps = report["steps"]
    gains = report["gains"]
    in_acc, out_acc = report["input"]["accuracy"], report["output"]["accuracy"]
    drop_points = (in_acc - out_acc) * 100
    log("re-measuring both models in this process")
    check = cross_check(a, paths["model"], out_path, assets["eval"])
    size_ratio = ratio(paths["model"].stat().st_size, out_path.stat().st_size)
    figures: dict[str, Any] = {
        "status": job["status"],
        "service": a.service,
        "spec": spec,
        "input_train_s": assets["train_s"],
        "job_s": job_s,
        "size_bytes": {"input": report["input"]["size_bytes"], "output": report["output"]["size_bytes"]},
        "size_ratio": gains["size_ratio"],
        "size_ratio_files": size_ratio,
        "latency_ms": {"input": report["input"]["latency_ms"]["median"],
                       "output": report["output"]["latency_ms"]["median"]},
        "latency_ratio": gains["latency_ratio"],
        "params_ratio": gains["params_ratio"],
        "macs_ratio": gains["macs_ratio"],
        "accuracy": {"input": in_acc, "after_prune": steps[0]["eval"].get("accuracy"),
                     "after_distill": steps[1]["eval"].get("accuracy"), "output": out_acc},
        "accuracy_drop_points": drop_points,
        "distill_curve": [{k: c.get(k) for k in ("epoch", "loss", "accuracy", "lr")} for c in steps[1]["curve"]],
        "step_wall_s": {s["type"]: s["wall_s"] for s in steps},
        "cross_check": check,
        "goals": {
            "size_ratio": goal_met(gains["size_ratio"], GOAL_SIZE),
            "latency_ratio": goal_met(gains["latency_ratio"], GOAL_LATENCY),
            "latency_ratio_cross_check": goal_met(check["latency_ratio"], GOAL_LATENCY),
            "accuracy_within_1_point": goal_met(drop_points, GOAL_ACC_POINTS, higher_is_better=False),
        },
        "machine": machine_info(),
    }
    summary = (
        f"{a.service}: size {fmt_ratio(gains['size_ratio'], GOAL_SIZE)}, "
        f"ORT latency {fmt_ratio(gains['latency_ratio'], GOAL_LATENCY)} "
        f"({figures['latency_ms']['input']:.3f} -> {figures['latency_ms']['output']:.3f} ms; "
        f"cross-check {check['latency_ratio']:.2f}x), "
        f"top-1 {in_acc:.4f} -> {out_acc:.4f} ({-drop_points:+.2f} points, goal within {GOAL_ACC_POINTS:g}: "
        f"{'met' if figures['goals']['accuracy_within_1_point'] else 'MISSED'}; after prune "
        f"{figures['accuracy']['after_prune']:.3f}), job {job_s:.1f} s"
    )
    emit("digits_pipeline", summary, figures)
    return figures


if __name__ == "__main__":
    main()
