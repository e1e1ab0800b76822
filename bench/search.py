"""Search benchmark: the auto-optimize search's winner against the best fixed recipe of the README, in one run,
through the live service (uvicorn + real Celery workers on Redis + PostgreSQL, a throwaway database).

Two models, both built in this process and uploaded **as ONNX**:

* CNN: the residual digits CNN of ``bench.digits_pipeline`` (tests/factories_train.py ``digits_resnet``,
  trained here, cached under bench/out/) with its train / eval / calibration npz files. Fixed recipe (README):
  ``prune(structured 0.5) -> distill(5 epochs) -> quantize(static)``. Search: ``objective: latency``,
  constraints ``max_accuracy_drop: 0.01`` and ``max_size_mb`` = input size / 10, over the static INT8 recipe
  alone and prune ratios with recovery distillation and static INT8.
* Encoder: a random-init BERT (``--hidden``, ``--layers``) trained briefly on ``bench.bert_pipeline``'s 4-topic
  text set with the service's own finetune pass (so its outputs mean something), then exported as a
  feature-extraction encoder: ``input_ids`` + ``attention_mask`` -> the masked mean of the last hidden state
  (one sentence embedding per row). Eval npz: the tokenised eval rows (no labels). Fixed recipe (README:
  ``bench.job_overhead``): dynamic INT8, per channel. Search: ``objective: latency``, ``min_fidelity: 0.99``
  (judged on the worst eval sample's cosine to the fp32 embedding), over the ``auto`` space.

Throughput: both searches run first with one worker, then again after a second worker joined (both
single-process, same queues, ``parallelism: 2`` each time); trials per minute = trials that ran (not skipped)
/ the searches' own wall time (``started_at`` to ``finished_at``, which includes the serial finalize), summed
over the two searches, and the 2-worker / 1-worker ratio is printed.

Figures (goals from the issue): encoder winner worst-case cosine (>= 0.99) and latency ratio to fp32 (>= 1.8x);
CNN winner size ratio (>= 10x), latency ratio (>= 3x), top-1 drop (within 1 point); the 2-worker / 1-worker
trials-per-minute ratio. Each latency is the search's interleaved re-measurement (one harness for every
finalist and the input); the fixed recipes' latencies are their job reports'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import bert_pipeline, digits_pipeline
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

GOAL_COSINE, GOAL_ENC_LATENCY = 0.99, 1.8
GOAL_SIZE, GOAL_LATENCY, GOAL_ACC_POINTS = 10.0, 3.0, 1.0
SEQ = bert_pipeline.MAX_LENGTH


# --- assets ----------------------------------------------------------------------------------------


def cnn_assets(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The digits CNN (trained once, cached) and its npz files, built by bench.digits_pipeline."""
    ns = argparse.Namespace(widths=a.widths, teacher_epochs=a.teacher_epochs, seed=a.seed, threads=a.threads,
                            calibration=256)
    return digits_pipeline.build_assets(ns, work / "cnn")


def encoder_assets(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The trained BERT as a feature-extraction ONNX encoder (cached under bench/out/) and its eval npz."""
    import numpy as np

    tag = f"h{a.hidden}-l{a.layers}-a{a.heads}-n{a.train_rows}-e{a.enc_epochs}-s{a.seed}"
    model = OUT / f"encoder-{tag}.onnx"
    tok_dir = OUT / f"encoder-{tag}-tokenizer"
    OUT.mkdir(parents=True, exist_ok=True)
    folder = work / "encoder"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not model.exists() or not tok_dir.exists():
        train = bert_pipeline.write_jsonl(folder / "train.jsonl",
                                          bert_pipeline.rows(a.train_rows, seed=a.seed + 1, noise=0.05))
        evald = bert_pipeline.write_jsonl(folder / "eval.jsonl", bert_pipeline.rows(200, seed=a.seed + 2))
        ns = argparse.Namespace(hidden=a.hidden, layers=a.layers, heads=a.heads, seed=a.seed, threads=a.threads,
                                teacher_epochs=a.enc_epochs, teacher_lr=1e-3)
        log(f"training the encoder (BERT h{a.hidden} L{a.layers}, {a.train_rows} rows, {a.enc_epochs} epochs)")
        _, info = bert_pipeline.train_teacher(ns, folder, train, evald)
        log(f"encoder trained: topic accuracy {info['accuracy']:.3f} in {info['train_s']:.1f} s")
        _export_encoder(folder / "bert-teacher", model)
        import shutil

        tok_dir.mkdir(exist_ok=True)
        for p in (folder / "bert-teacher").iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "vocab")):
                shutil.copy(p, tok_dir / p.name)
    train_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [r["text"] for r in bert_pipeline.rows(a.eval_rows, seed=a.seed + 3)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    path = folder / "encoder-eval.npz"
    np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    return {"paths": {"model": model, "eval": path}, "train_s": train_s}


def _export_encoder(src: Path, path: Path) -> None:
    """``BertModel`` of a saved checkpoint -> ONNX: ids + mask in, the masked mean of the last hidden state out."""
    import warnings

    import onnx
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Explicit position and token-type ids (see bench.job_overhead: ORT's shape inference).
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    ids = torch.randint(5, 20, (2, SEQ), dtype=torch.long)
    mask = torch.ones_like(ids)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(bert), (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], opset_version=17, do_constant_folding=True, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "embedding": {0: "batch"}},
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)


# --- specs -----------------------------------------------------------------------------------------


def _latency(a: argparse.Namespace) -> dict[str, Any]:
    return {"runs": a.latency_runs, "warmup": a.latency_warmup, "threads": 1, "batch_size": 1}


def cnn_fixed_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    ns = argparse.Namespace(ratio=0.5, importance="l2", epochs=a.distill_epochs, lr=3e-3, batch_size=32,
                            temperature=4.0, alpha=0.5, calibration=256, latency_runs=a.latency_runs,
                            latency_warmup=a.latency_warmup, seed=a.seed)
    return digits_pipeline.job_spec(ns, model_id, data)


def cnn_search_spec(a: argparse.Namespace, model_id: str, data: dict[str, str], input_bytes: int) -> dict[str, Any]:
    static = {"type": "quantize", "mode": "static", "per_channel": True,
              "calibration": {"method": "minmax", "samples": 256}}
    distill = {"type": "distill", "epochs": a.distill_epochs, "lr": 3e-3, "batch_size": 32, "temperature": 4.0,
               "alpha": 0.5}
    space: list[list[dict[str, Any]]] = [[static]]
    for r in a.cnn_ratios:
        space.append([{"type": "prune", "method": "structured", "ratio": r, "importance": "l2"}, distill, static])
    return {"model": model_id, "task": "image-classification", "data": data, "seed": a.seed,
            "evaluate": {"latency": _latency(a)},
            "search": {"objective": "latency", "space": space, "parallelism": 2,
                       "constraints": {"max_accuracy_drop": GOAL_ACC_POINTS / 100,
                                       "max_size_mb": input_bytes / GOAL_SIZE / 1e6}}}


def enc_fixed_spec(a: argparse.Namespace, model_id: str, eval_id: str) -> dict[str, Any]:
    return {"model": model_id, "task": "feature-extraction", "data": {"eval": eval_id},
            "steps": [{"type": "quantize", "mode": "dynamic", "per_channel": True, "weight_type": "int8"}],
            "evaluate": {"latency": _latency(a)}}


def enc_search_spec(a: argparse.Namespace, model_id: str, eval_id: str) -> dict[str, Any]:
    return {"model": model_id, "task": "feature-extraction", "data": {"eval": eval_id},
            "evaluate": {"latency": _latency(a)},
            "search": {"objective": "latency", "space": "auto", "parallelism": 2,
                       "constraints": {"min_fidelity": GOAL_COSINE}}}


# --- running ---------------------------------------------------------------------------------------


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def run_job(svc: Any, client: Any, spec: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    job = svc.wait_job(client, submit_job(client, spec), timeout=timeout)
    job["_client_wall_s"] = time.perf_counter() - t0
    if job["status"] != SUCCEEDED:
        raise RuntimeError(f"{what}: job {job['id']} {job['status']}: {job.get('error')}\n{svc.logs('worker.log')}")
    log(f"{what}: {job['status']} in {job['_client_wall_s']:.1f} s")
    return job


def fixed_figures(job: dict[str, Any]) -> dict[str, Any]:
    rep = job["result"]["report"]
    fid = rep["output"].get("fidelity") or rep.get("fidelity") or {}
    return {"job_s": job["_client_wall_s"], "latency_ms": {"input": rep["input"]["latency_ms"]["median"],
                                                          "output": rep["output"]["latency_ms"]["median"]},
            "latency_ratio": rep["gains"]["latency_ratio"], "size_ratio": rep["gains"]["size_ratio"],
            "accuracy": {"input": rep["input"].get("accuracy"), "output": rep["output"].get("accuracy")},
            "min_cosine": fid.get("min_cosine")}


def search_figures(job: dict[str, Any]) -> dict[str, Any]:
    """The winner (latency re-measured against the input's, one harness), trials, and trials per minute."""
    rep = job["result"]["report"]
    sec = rep["search"]
    best = job["result"]["best"]
    ts = {k: _ts(v) for k, v in job["timestamps"].items()}
    wall = (ts["finished_at"] - ts["started_at"]).total_seconds() if ts["finished_at"] and ts["started_at"] else None
    ran = [t for t in sec["trials"] if t["state"] != "skipped"]
    fid = rep["output"].get("fidelity") or rep.get("fidelity") or {}
    in_lat = sec["input_latency_ms_remeasured"]
    return {
        "wall_s": wall, "client_wall_s": job["_client_wall_s"], "trials_ran": len(ran),
        "trials_skipped": len(sec["trials"]) - len(ran),
        "trials_per_min": ratio(len(ran), (wall or 0) / 60),
        "workers": sorted({t["worker"] for t in ran if t.get("worker")}),
        "winner": best["label"], "winner_latency_ms": best["latency_ms"], "input_latency_ms": in_lat,
        "latency_ratio": ratio(in_lat, best["latency_ms"]),
        "latency_ratio_report": rep["gains"]["latency_ratio"],
        "size_ratio": rep["gains"]["size_ratio"],
        "accuracy": {"input": rep["input"].get("accuracy"), "output": rep["output"].get("accuracy")},
        "min_cosine": fid.get("min_cosine"),
        "trials": [{k: t.get(k) for k in ("index", "label", "state", "met", "misses", "reason", "size_bytes",
                                          "latency_ms", "latency_ms_remeasured", "metric")} for t in sec["trials"]],
    }


def _wait_ready(svc: Any, log_name: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in svc.logs(log_name):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{log_name}: worker not ready:\n{svc.logs(log_name)}")


@contextlib.contextmanager
def second_worker(svc: Any) -> Any:
    """A second single-process worker on the same queues (as tests/e2e/test_search.py), stopped afterwards."""
    queues = f"{svc.env['MODELPRESS_CPU_QUEUE']},{svc.env['MODELPRESS_GPU_QUEUE']}"
    proc = svc._spawn(["-m", "worker.main", "--queues", queues, "--loglevel", "INFO"], "worker2.log")
    try:
        _wait_ready(svc, "worker2.log")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _run(a: argparse.Namespace, run_id: str, work: Path) -> dict[str, Any]:
    import httpx

    cnn = cnn_assets(a, work)
    enc = encoder_assets(a, work)
    cp, ep = cnn["paths"], enc["paths"]
    fig: dict[str, Any] = {"quick": a.quick, "input_train_s": {"cnn": cnn["train_s"], "encoder": enc["train_s"]},
                           "input_bytes": {"cnn": cp["model"].stat().st_size, "encoder": ep["model"].stat().st_size}}
    with service("distributed", run_id, worker=True) as svc, httpx.Client(base_url=svc.url, timeout=60) as client:
        cm = upload(client, "models", cp["model"], "onnx")["id"]
        cdata = {role: upload(client, "datasets", cp[role], "npz")["id"] for role in ("train", "eval", "calibration")}
        em = upload(client, "models", ep["model"], "onnx")["id"]
        ee = upload(client, "datasets", ep["eval"], "npz")["id"]
        _wait_ready(svc, "worker.log")
        fig["cnn_fixed"] = fixed_figures(run_job(svc, client, cnn_fixed_spec(a, cm, cdata), a.timeout, "CNN fixed"))
        fig["encoder_fixed"] = fixed_figures(run_job(svc, client, enc_fixed_spec(a, em, ee), a.timeout,
                                                     "encoder fixed"))
        enc_search = enc_search_spec(a, em, ee)
        cnn_search = cnn_search_spec(a, cm, cdata, fig["input_bytes"]["cnn"])
        fig["encoder_search_1w"] = search_figures(run_job(svc, client, enc_search, a.timeout, "encoder search, 1 worker"))
        fig["cnn_search_1w"] = search_figures(run_job(svc, client, cnn_search, a.timeout, "CNN search, 1 worker"))
        with second_worker(svc):
            # Unmeasured: the encoder search's first trials start at once, one on each worker, so the new
            # worker's pool process has imported torch and onnxruntime before the clock (as the first's had).
            run_job(svc, client, enc_search, a.timeout, "warm-up search, 2 workers (not counted)")
            fig["encoder_search"] = search_figures(run_job(svc, client, enc_search, a.timeout,
                                                           "encoder search, 2 workers"))
            fig["cnn_search"] = search_figures(run_job(svc, client, cnn_search, a.timeout, "CNN search, 2 workers"))
    es, cs = fig["encoder_search"], fig["cnn_search"]
    cs["accuracy_drop_points"] = (cs["accuracy"]["input"] - cs["accuracy"]["output"]) * 100
    cf = fig["cnn_fixed"]
    cf["accuracy_drop_points"] = (cf["accuracy"]["input"] - cf["accuracy"]["output"]) * 100
    # Both searches together: more trials per figure than one small search gives.
    for n in ("1w", "2w"):
        runs = [fig[f"{m}_search{'_1w' if n == '1w' else ''}"] for m in ("encoder", "cnn")]
        fig[f"trials_per_min_{n}"] = ratio(sum(r["trials_ran"] for r in runs), sum(r["wall_s"] or 0 for r in runs) / 60)
        fig[f"trials_{n}"] = sum(r["trials_ran"] for r in runs)
        fig[f"search_wall_s_{n}"] = sum(r["wall_s"] or 0 for r in runs)
    fig["throughput_ratio"] = ratio(fig["trials_per_min_2w"], fig["trials_per_min_1w"])
    fig["goals"] = {
        "encoder_min_cosine": goal_met(es["min_cosine"] if es["min_cosine"] is not None else float("nan"),
                                       GOAL_COSINE),
        "encoder_latency_ratio": goal_met(es["latency_ratio"], GOAL_ENC_LATENCY),
        "cnn_size_ratio": goal_met(cs["size_ratio"], GOAL_SIZE),
        "cnn_latency_ratio": goal_met(cs["latency_ratio"], GOAL_LATENCY),
        "cnn_accuracy_within_1_point": goal_met(cs["accuracy_drop_points"], GOAL_ACC_POINTS, higher_is_better=False),
    }
    fig["machine"] = machine_info()
    ef = fig["encoder_fixed"]
    cos = es["min_cosine"]
    print(f"encoder search winner: {es['winner']}: worst-case cosine {cos if cos is None else f'{cos:.4f}'} "
          f"(goal >= {GOAL_COSINE}: {'met' if fig['goals']['encoder_min_cosine'] else 'MISSED'}), latency "
          f"{es['input_latency_ms']:.3f} -> {es['winner_latency_ms']:.3f} ms "
          f"{fmt_ratio(es['latency_ratio'], GOAL_ENC_LATENCY)}; fixed recipe (dynamic INT8): "
          f"{fmt_ratio(ef['latency_ratio'])}, worst-case cosine {ef['min_cosine']}", flush=True)
    print(f"CNN search winner: {cs['winner']}: size {fmt_ratio(cs['size_ratio'], GOAL_SIZE)}, latency "
          f"{cs['input_latency_ms']:.3f} -> {cs['winner_latency_ms']:.3f} ms "
          f"{fmt_ratio(cs['latency_ratio'], GOAL_LATENCY)}, top-1 {cs['accuracy']['input']:.4f} -> "
          f"{cs['accuracy']['output']:.4f} ({-cs['accuracy_drop_points']:+.2f} points, goal within "
          f"{GOAL_ACC_POINTS:g}: {'met' if fig['goals']['cnn_accuracy_within_1_point'] else 'MISSED'}); "
          f"fixed recipe: size {fmt_ratio(cf['size_ratio'])}, latency {fmt_ratio(cf['latency_ratio'])}, "
          f"{-cf['accuracy_drop_points']:+.2f} points", flush=True)
    print(f"search throughput (encoder + CNN searches): 1 worker {fig['trials_per_min_1w']:.2f} trials/min "
          f"({fig['trials_1w']} trials, {fig['search_wall_s_1w']:.1f} s), 2 workers {fig['trials_per_min_2w']:.2f} "
          f"trials/min ({fig['trials_2w']} trials, {fig['search_wall_s_2w']:.1f} s): "
          f"{fmt_ratio(fig['throughput_ratio'])}", flush=True)
    summary = (f"encoder {es['winner']}: cos {cos}, {es['latency_ratio']:.2f}x; CNN {cs['winner']}: "
               f"{cs['size_ratio']:.1f}x smaller, {cs['latency_ratio']:.2f}x faster, "
               f"{-cs['accuracy_drop_points']:+.2f} pts; 2 vs 1 workers {fig['throughput_ratio']:.2f}x")
    emit("search", summary, fig)
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small run (smaller encoder training, fewer latency runs and CNN trials)")
    p.add_argument("--widths", type=int, nargs=2, default=[64, 128], metavar=("W1", "W2"))
    p.add_argument("--teacher-epochs", type=int, default=15, help="CNN training epochs")
    p.add_argument("--distill-epochs", type=int, default=5)
    p.add_argument("--cnn-ratios", type=float, nargs="+", default=[0.5, 0.625, 0.75],
                   help="prune ratios of the CNN search's prune -> distill -> static trials")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--train-rows", type=int, default=2000, help="encoder training rows")
    p.add_argument("--enc-epochs", type=int, default=4, help="encoder training epochs")
    p.add_argument("--eval-rows", type=int, default=300, help="encoder eval rows")
    p.add_argument("--latency-runs", type=int, default=300)
    p.add_argument("--latency-warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training in this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0)
    a = p.parse_args(argv)
    if a.quick:
        a.train_rows, a.enc_epochs, a.eval_rows = min(a.train_rows, 800), min(a.enc_epochs, 3), min(a.eval_rows, 200)
        a.latency_runs, a.latency_warmup = min(a.latency_runs, 100), min(a.latency_warmup, 10)
        a.cnn_ratios = a.cnn_ratios[:2]
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix=f"modelpress-{run_id}-") as tmp:
        return _run(a, run_id, Path(tmp))


if __name__ == "__main__":
    main()
