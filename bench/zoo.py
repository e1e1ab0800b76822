"""INT4 on real pretrained LLMs nobody here trained, through the live service, beside the peers by hand.

The models come from PyPI packages (``bench/zoo_models.py``: GGUF dequantized, RMSNorm gains folded, the
residual stream rotated off the GGUF's 4-bit grid; converted once and cached under ``MODELPRESS_ZOO_CACHE``,
default ~/.cache/modelpress-zoo). Text: the OS licence texts (/usr/share/common-licenses, ``bench.llm_pipeline``'s
``licence_corpus``): calibration rows from the training paragraphs, perplexity on the held-out paragraphs
(every 2nd), never the same text.

For each model, in one run:

- **fp32**: the hf archive uploaded and exported by a job (``steps: [export]``), downloaded;
- **ours**: a job ``steps: [export, quantize {mode: int4}]`` with the pass defaults (calibration data given,
  as a user with text would), downloaded and measured here like every other file;
- **peers by hand** on the same fp32 file: ORT's ``MatMulNBitsQuantizer`` with its defaults, ORT's HQQ
  (block 32, head in float, as its docs show); NNCF's weight compression (INT4 asym, AWQ + scale
  estimation, ONNX backend) where ``nncf`` is installed; llama.cpp's Q8_0 / Q4_K_M / Q4_0 of the same rotated
  weights (an F32 GGUF) through ik_llama.cpp's wheel (``ik-llama-cpp-python``, ``bench/zoo_llama_cpp.py``, in a
  subprocess), its F32 file measured too as the check that both perplexity protocols agree.
- ``--llama-cpp-only``: the llama.cpp rows alone beside the cached fp32 ONNX reference (no service).
- ``--candidates``: the quantize pass called in-process with other settings (how the defaults were chosen).

Per file: size, held-out perplexity and its increase over fp32, and decode tokens/s (batch 1, KV cache).
Goal (issue 16): ours on or below the peers' size/perplexity front, never worse than +30 %.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, log, machine_info
from bench.llm_pipeline import (
    file_size,
    licence_corpus,
    open_session,
    perplexity,
    quantize_by_hand,
    token_rows,
)

GOAL_MAX_PPL_INCREASE = 0.30
GOAL_SEARCH_PPL = 0.10  # the size search's constraint; goal: >= 5.2x smaller than fp32 (Q4_K_M's 124.9 MB of 653.6)
GOAL_SEARCH_SIZE_RATIO = 5.2
EVAL_EVERY = 2  # every 2nd licence paragraph is held out: about 21 k tokens of eval text, the rest calibrates

# in-process candidates (quantize step parameters besides type and mode int4), measured with --candidates
CANDIDATES: dict[str, dict[str, Any]] = {
    "rtn b64 head8 emb-float": {"algorithm": "rtn", "block_size": 64, "quantize_embeddings": False, "int8_share": 0},
    "rtn b64 head8 emb8": {"algorithm": "rtn", "block_size": 64, "bits": {"*lm_head*": 8, "Gather": 8},
                           "quantize_embeddings": True, "int8_share": 0},
    "rtn b64 head8 emb4 kl30": {"algorithm": "rtn", "block_size": 64, "bits": {"*lm_head*": 8},
                                "quantize_embeddings": True, "int8_share": 0.3},
    "rtn b64 head8 emb8 kl6": {"algorithm": "rtn", "block_size": 64, "bits": {"*lm_head*": 8, "Gather": 8},
                               "quantize_embeddings": True, "int8_share": 0.06},
    "rtn b64 head8 emb4": {"algorithm": "rtn", "block_size": 64, "bits": {"*lm_head*": 8},
                           "quantize_embeddings": True, "int8_share": 0},
    "rtn b32 head8 emb8": {"algorithm": "rtn", "block_size": 32, "bits": {"*lm_head*": 8, "Gather": 8},
                           "quantize_embeddings": True, "int8_share": 0},
    "hqq b64 head8 emb8": {"algorithm": "hqq", "block_size": 64, "bits": {"*lm_head*": 8, "Gather": 8},
                           "quantize_embeddings": True, "int8_share": 0},
    "gptq b64 head8 emb8": {"algorithm": "gptq", "block_size": 64, "bits": {"*lm_head*": 8, "Gather": 8},
                            "quantize_embeddings": True, "int8_share": 0},
    "gptq b32 head8 emb8": {"algorithm": "gptq", "block_size": 32, "bits": {"*lm_head*": 8, "Gather": 8},
                            "quantize_embeddings": True, "int8_share": 0},
    "gptq b64 head8 emb4": {"algorithm": "gptq", "block_size": 64, "bits": {"*lm_head*": 8},
                            "quantize_embeddings": True, "int8_share": 0},
}


def text_rows(hf_dir: Path, seq: int, eval_tokens: int, calib_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, held-out eval rows) of ``seq`` tokens from the licence texts, distinct paragraphs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    train, test = licence_corpus(EVAL_EVERY)
    ev = token_rows(tok, test, seq)[: max(1, eval_tokens // seq)]
    rng = np.random.default_rng(0)
    cal = token_rows(tok, train, seq)
    return cal[rng.permutation(len(cal))[:calib_rows]], ev


def fp32_export(hf_dir: Path, out: Path) -> Path:
    """The fp32 KV-cache ONNX of ``hf_dir`` (``worker.lm.export``), cached beside the model."""
    if out.exists():
        return out
    from transformers import AutoModelForCausalLM

    from worker.lm.export import export_causal_lm

    module = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    export_causal_lm(module, out, hf_dir=hf_dir)
    return out


def quantize_direct(src: Path, work: Path, params: dict[str, Any], calibration: np.ndarray) -> tuple[Path, dict]:
    """The quantize pass in-process (mode int4 and ``params``), calibration rows given."""
    from bench.llm_pipeline import quantize_ours
    from worker.core import ArrayDataset

    data = ArrayDataset(inputs={"input_ids": calibration, "attention_mask": np.ones_like(calibration)},
                        labels=calibration.copy(), meta={"shape": "text"})
    work.mkdir(parents=True, exist_ok=True)
    return quantize_ours(src, work, params, data)


def measure(path: Path, rows: np.ndarray, threads: int, ref_ppl: float | None = None) -> dict[str, Any]:
    """Size and held-out perplexity of one ONNX file (and its increase over ``ref_ppl``)."""
    t0 = time.perf_counter()
    ppl = perplexity(open_session(path, threads), rows, batch=4)
    row = {"size_mb": file_size(path) / 1e6, "perplexity": ppl, "eval_s": time.perf_counter() - t0}
    if ref_ppl:
        row["ppl_increase"] = ppl / ref_ppl - 1
    return row


def fp32_reference(name: str, hf: Path, ev: np.ndarray, a: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The fp32 ONNX and its size and perplexity on ``ev``, measured once and cached beside it."""
    from bench.zoo_models import cache_dir

    fp32 = fp32_export(hf, cache_dir() / f"{name}-fp32" / "model.onnx")
    ref_file = cache_dir() / f"{name}-fp32" / f"ppl-{a.seq}-{len(ev)}.json"
    if ref_file.exists():
        ref = json.loads(ref_file.read_text())
    else:
        ref = measure(fp32, ev, a.threads)
        ref_file.write_text(json.dumps(ref))
    log(f"{name}: fp32 {ref['size_mb']:.1f} MB, perplexity {ref['perplexity']:.3f} on {ev.size} tokens")
    return fp32, ref


def candidates(a: argparse.Namespace) -> dict[str, Any]:
    """Measure the in-process candidates (and ORT's defaults) on each model: the table defaults come from."""
    from bench.zoo_models import prepare

    figures: dict[str, Any] = {}
    for name in a.models.split(","):
        hf = prepare(name, log)
        cal, ev = text_rows(hf, a.seq, a.eval_tokens, a.calib_rows)
        fp32, ref = fp32_reference(name, hf, ev, a)
        rows: dict[str, Any] = {"fp32": ref}
        names = list(CANDIDATES) if a.candidates == "all" else a.candidates.split(",")
        with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
            for cand in names:
                t0 = time.perf_counter()
                try:
                    if cand == "ort defaults":
                        path = quantize_by_hand(fp32, Path(tmp) / "ort-defaults.onnx")
                        metrics: dict[str, Any] = {}
                    else:
                        path, metrics = quantize_direct(fp32, Path(tmp) / re.sub(r"\W+", "-", cand), CANDIDATES[cand], cal)
                except Exception as e:  # a candidate that fails is a finding
                    log(f"{name} {cand}: failed: {type(e).__name__}: {e}")
                    rows[cand] = {"failed": f"{type(e).__name__}: {e}"}
                    continue
                q_s = time.perf_counter() - t0
                row = {**measure(path, ev, a.threads, ref["perplexity"]), "quantize_s": q_s,
                       "weight_only": {k: v for k, v in metrics.get("weight_only", {}).items()
                                       if k in ("matmul_bits", "embedding_bits", "block_size", "algorithm",
                                                "mixed_bits")}}
                rows[cand] = row
                log(f"{name} {cand}: {row['size_mb']:.1f} MB, ppl {row['perplexity']:.3f} "
                    f"({100 * row['ppl_increase']:+.1f} %), quantize {q_s:.0f} s")
                for f in Path(tmp).rglob("*"):
                    if f.is_file():
                        f.unlink()
        figures[name] = rows
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=24576)
    p.add_argument("--calib-rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search-trials", type=int, default=3,
                   help="a size search (max_perplexity_increase 0.10) with this many trials on each model; 0: none")
    p.add_argument("--llama-cpp-only", action="store_true",
                   help="only the llama.cpp rows (ik_llama.cpp) beside the cached fp32 ONNX reference, no service")
    p.add_argument("--candidates", default=None, help="comma-separated CANDIDATES names or all: in-process only")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.candidates:
        figures = candidates(a)
        emit("zoo_candidates", "in-process int4 candidates on real LLMs", {"machine": machine_info(), **figures})
        return figures
    if a.llama_cpp_only:
        return llama_cpp_run(a)
    return service_run(a)


def llama_cpp_run(a: argparse.Namespace) -> dict[str, Any]:
    """The llama.cpp rows alone beside the fp32 ONNX reference (cached): quick, no service."""
    from bench.zoo_models import prepare

    figures: dict[str, Any] = {"machine": machine_info(), "models": {}}
    for name in a.models.split(","):
        hf = prepare(name, log)
        _, ev = text_rows(hf, a.seq, a.eval_tokens, a.calib_rows)
        _, ref = fp32_reference(name, hf, ev, a)
        rows = {"fp32": ref, **llama_cpp_peers(name, ev, a, ref["perplexity"])}
        figures["models"][name] = {"rows": rows, "eval_tokens": int(ev.size)}
        print_table(name, ev, ref, rows)
    emit("zoo_llama_cpp", "llama.cpp (ik_llama.cpp) on real LLMs: " + ", ".join(
        f"{n} {label} {r['size_mb']:.1f} MB {100 * r['ppl_increase']:+.1f} %"
        for n, m in figures["models"].items() for label, r in m["rows"].items() if "ppl_increase" in r), figures)
    return figures


def print_table(name: str, ev: np.ndarray, ref: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    """One model's rows, smallest file first."""
    print(f"\n{name}: held-out perplexity on {ev.size} tokens of licence text (fp32 {ref['perplexity']:.3f})")
    print(f"{'file':<44} {'MB':>8} {'ppl':>8} {'+%':>8} {'tok/s':>7}")
    for label, row in sorted(rows.items(), key=lambda kv: kv[1].get("size_mb", 0)):
        inc = f"{100 * row['ppl_increase']:+7.1f}%" if "ppl_increase" in row else ""
        speed = f"{row['decode_tok_s']:7.1f}" if "decode_tok_s" in row else ""
        print(f"{label:<44} {row.get('size_mb', 0):8.1f} {row['perplexity']:8.3f} {inc:>8} {speed:>7}")


def peers_by_hand(fp32: Path, work: Path) -> dict[str, Path]:
    """The peers a user would run by hand on the same fp32 file: ORT's quantizer with its defaults, ORT's
    HQQ at block 32 with the head in float; NNCF where installed."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out = {"ORT MatMulNBits defaults": quantize_by_hand(fp32, work / "ort-defaults.onnx")}
    m = onnx.load(str(fp32))
    head = [n.name for n in m.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    q = MatMulNBitsQuantizer(m, nodes_to_exclude=head, algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    q.process()
    out["ORT HQQ b32, head float"] = work / "ort-hqq.onnx"
    onnx.save_model(q.model.model, str(out["ORT HQQ b32, head float"]))
    return out


def _zip(folder: Path, dst: Path, prefix: str) -> Path:
    import zipfile

    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name != "zoo.json":
                zf.write(f, f"{prefix}/{f.name}")
    return dst


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def service_job(svc: Any, client: Any, hf: Path, name: str, a: argparse.Namespace, work: Path,
                ) -> tuple[Path, dict, dict[str, str]]:
    """Upload the model and the texts, run ``export -> quantize {mode: int4}`` (defaults) on the live service,
    download the file; the job's report and the uploads' ids."""
    from bench.common import submit_job, upload

    train, test = licence_corpus(EVAL_EVERY)
    model_id = upload(client, "models", _zip(hf, work / f"{name}.zip", name), "hf", name)["id"]
    cal_id = upload(client, "datasets", _jsonl(work / "calibration.jsonl", train[: a.calib_rows]), "text")["id"]
    eval_id = upload(client, "datasets", _jsonl(work / "eval.jsonl", test[:24]), "text")["id"]
    ids = {"model": model_id, "calibration": cal_id, "eval": eval_id}
    spec = {"model": model_id, "task": "text-generation", "data": {"eval": eval_id, "calibration": cal_id},
            "steps": [{"type": "export"}, {"type": "quantize", "mode": "int4"}], "text": {"max_length": a.seq},
            "evaluate": {"latency": {"runs": 3, "warmup": 1},
                         "generation": {"samples": 1, "max_new_tokens": 16, "prompt_tokens": 64}}}
    t0 = time.perf_counter()
    job = svc.wait_job(client, submit_job(client, spec), timeout=3600)
    if job["status"] != "succeeded":
        raise RuntimeError(f"{name}: job {job['id']} {job['status']}: {job.get('error')}\n{svc.logs('worker.log')[-3000:]}")
    log(f"{name}: export -> quantize int4 job succeeded in {time.perf_counter() - t0:.0f} s")
    return _download(client, job, work / "ours" / "model.onnx"), job["result"]["report"], ids


def _download(client: Any, job: dict[str, Any], dst: Path) -> Path:
    """A finished job's ``model.onnx`` (one file: weight-only files stay under 2 GB) to ``dst``."""
    art = next(x for x in job["result"]["artifacts"] if x["name"] == "model.onnx")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with client.stream("GET", f"/v1/artifacts/{art['id']}/content") as r, open(dst, "wb") as fh:
        for chunk in r.iter_bytes(1 << 20):
            fh.write(chunk)
    return dst


def service_search(svc: Any, client: Any, ids: dict[str, str], a: argparse.Namespace, work: Path,
                   ) -> tuple[Path | None, dict[str, Any]]:
    """A size search (``max_perplexity_increase`` GOAL_SEARCH_PPL) on the same uploads: its winner downloaded (None
    when it found none), the verdict and every trial."""
    from bench.common import submit_job

    spec = {"model": ids["model"], "task": "text-generation",
            "data": {"eval": ids["eval"], "calibration": ids["calibration"]}, "text": {"max_length": a.seq},
            "search": {"objective": "size", "space": "auto", "budget": {"max_trials": a.search_trials},
                       "constraints": {"max_perplexity_increase": GOAL_SEARCH_PPL}}}
    t0 = time.perf_counter()
    job = svc.wait_job(client, submit_job(client, spec), timeout=7200)
    sec = (job.get("result") or {}).get("report", {}).get("search", {})
    fig: dict[str, Any] = {
        "status": job["status"], "error": job.get("error"), "wall_s": round(time.perf_counter() - t0),
        "winner": ((job.get("result") or {}).get("best") or {}).get("label"),
        "trials": [{k: t.get(k) for k in ("index", "label", "state", "met", "misses", "size_bytes", "metric")}
                   for t in sec.get("trials", [])],
    }
    log(f"size search: {job['status']} in {fig['wall_s']} s, winner {fig['winner']}")
    if job["status"] != "succeeded":
        return None, fig
    return _download(client, job, work / "search" / "model.onnx"), fig


def decode_tps(paths: dict[str, Path], threads: int, rounds: int = 3) -> dict[str, float]:
    """Greedy decode tokens/s (batch 1, KV cache, 64-token prompt, 64 new), best of ``rounds`` interleaved."""
    sessions = {k: open_session(p, threads) for k, p in paths.items()}
    seen: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, sess in sessions.items():
            seen[k].append(float(sess.time_decode(64, 64, 1)["tokens_per_s"]))
    return {k: max(v) for k, v in seen.items()}


def service_run(a: argparse.Namespace) -> dict[str, Any]:
    """Each model through the live service (``export -> quantize int4``, defaults) beside the peers by hand."""
    import httpx

    from bench.common import new_run_id, service
    from bench.zoo_models import cache_dir, prepare

    figures: dict[str, Any] = {"machine": machine_info(), "models": {}}
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp, \
            service("distributed", run_id, worker=True) as svc, \
            httpx.Client(base_url=svc.url, timeout=600) as client:
        for name in a.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            hf = prepare(name, log)
            _, ev = text_rows(hf, a.seq, a.eval_tokens, a.calib_rows)
            fp32 = fp32_export(hf, cache_dir() / f"{name}-fp32" / "model.onnx")
            ours, report, ids = service_job(svc, client, hf, name, a, work)
            files = {"fp32": fp32, "ours (int4 defaults, via the API)": ours, **peers_by_hand(fp32, work)}
            search: dict[str, Any] | None = None
            if a.search_trials:
                winner, search = service_search(svc, client, ids, a, work)
                if winner is not None:
                    files[f"ours (size search winner: {search['winner']})"] = winner
            ref = measure(fp32, ev, a.threads)
            rows: dict[str, dict[str, Any]] = {"fp32": ref}
            for label, path in files.items():
                if label != "fp32":
                    rows[label] = measure(path, ev, a.threads, ref["perplexity"])
                    log(f"{name} {label}: {rows[label]['size_mb']:.1f} MB, {100 * rows[label]['ppl_increase']:+.1f} %")
            for label, tps in decode_tps({"fp32": fp32, "ours": ours}, a.threads).items():
                rows["fp32" if label == "fp32" else "ours (int4 defaults, via the API)"]["decode_tok_s"] = tps
            ours_label = "ours (int4 defaults, via the API)"
            for label, row in llama_cpp_peers(name, ev, a, ref["perplexity"], {ours_label: ours}).items():
                if label == ours_label:  # its decode speed in the same interleaved rounds as llama.cpp's
                    rows[label].update(row)
                else:
                    rows[label] = row
            q4km = next((r for label, r in rows.items() if label.startswith("llama.cpp Q4_K_M")), {})
            if "decode_tok_s_beside_llama_cpp" in rows[ours_label] and "decode_tok_s" in q4km:
                ratio = rows[ours_label]["decode_tok_s_beside_llama_cpp"] / q4km["decode_tok_s"]
                rows[ours_label]["decode_ratio_vs_llama_cpp_q4_k_m"] = ratio
                print(f"\n{name} decode, same interleaved rounds: ours {rows[ours_label]['decode_tok_s_beside_llama_cpp']:.1f}"
                      f" tok/s vs llama.cpp Q4_K_M {q4km['decode_tok_s']:.1f} tok/s: {ratio:.2f}x")
            wo = next((s.get("metrics", {}).get("weight_only") for s in report.get("steps", [])
                       if isinstance(s, dict) and (s.get("metrics") or {}).get("weight_only")), None)
            if search is not None:
                win = next((r for label, r in rows.items() if label.startswith("ours (size search")), None)
                if win is not None:
                    search.update(size_ratio_vs_fp32=ref["size_mb"] / win["size_mb"], ppl_increase=win["ppl_increase"],
                                  goal_met=ref["size_mb"] / win["size_mb"] >= GOAL_SEARCH_SIZE_RATIO
                                  and win["ppl_increase"] <= GOAL_SEARCH_PPL)
                print(f"\n{name} size search (max_perplexity_increase {GOAL_SEARCH_PPL}): {search['status']}, winner "
                      f"{search['winner']}" + (f": {search['size_ratio_vs_fp32']:.2f}x smaller than fp32, "
                                                f"{100 * search['ppl_increase']:+.1f} % (goal >= "
                                                f"{GOAL_SEARCH_SIZE_RATIO}x within +{100 * GOAL_SEARCH_PPL:.0f} %)"
                                                if "ppl_increase" in search else ""))
            figures["models"][name] = {"rows": rows, "eval_tokens": int(ev.size), "weight_only": wo, "search": search,
                                       "service_ppl": {"input": report["input"].get("perplexity"),
                                                       "output": report["output"].get("perplexity")}}
            print_table(name, ev, ref, rows)
            shutil.rmtree(work, ignore_errors=True)
    ok = all(r["rows"]["ours (int4 defaults, via the API)"]["ppl_increase"] <= GOAL_MAX_PPL_INCREASE
             for r in figures["models"].values())
    figures["goal_max_ppl_increase_met"] = ok
    emit("zoo", "int4 defaults on real LLMs vs peers: " + ", ".join(
        f"{n} {r['rows']['ours (int4 defaults, via the API)']['size_mb']:.1f} MB "
        f"{100 * r['rows']['ours (int4 defaults, via the API)']['ppl_increase']:+.1f} %"
        for n, r in figures["models"].items()), figures)
    return figures


LLAMA_CPP_TYPES = ("F32", "Q8_0", "Q4_K_M", "Q4_0")  # llama-quantize type names; F32: the source file itself
PROTOCOL_TOLERANCE = 0.01  # llama.cpp's F32 perplexity vs our fp32 ONNX one: the same weights and protocol


def llama_cpp_peers(name: str, ev: np.ndarray, a: argparse.Namespace, ref_ppl: float,
                    onnx: dict[str, Path] | None = None) -> dict[str, Any]:
    """llama.cpp's Q8_0 / Q4_K_M / Q4_0 of the same rotated weights (``llama-quantize`` on their F32 GGUF) through
    ik_llama.cpp's wheel, each file measured in a subprocess (``bench.zoo_llama_cpp``): perplexity on the same
    token rows (a fresh sequence per row, no BOS, like ours) and decode tokens/s at ``--threads``. The F32 file
    comes first: its perplexity must match our fp32 ONNX one (the check that the protocols agree). Decode
    speeds: one more subprocess, the files interleaved round by round, with ``onnx``'s files (label -> path) in
    the same rounds: their speeds come back as ``{label: {"decode_tok_s_beside_llama_cpp": ...}}``.

    The subprocess gets ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set one: ik_llama.cpp's CPU threads are
    OpenMP threads, and their spinning barriers collapse on a shared machine (measured here, 2 threads, load
    average 13: 0.6 tokens/s spinning, 4.9 passive, for the same F32 file)."""
    import subprocess
    import sys

    from bench.zoo_models import IK_LLAMA, cache_dir, ik_llama_site, rotated_gguf

    try:
        site = ik_llama_site()
    except subprocess.CalledProcessError as e:
        log(f"ik-llama-cpp-python did not install ({e}): llama.cpp peers skipped")
        return {}
    f32 = rotated_gguf(name, log)
    rows_file = cache_dir() / f"{name}-eval-rows.npy"
    np.save(rows_file, ev)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(root)])}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def call(*args: str) -> Any:
        res = subprocess.run([sys.executable, "-m", "bench.zoo_llama_cpp", *args], capture_output=True, text=True,
                             cwd=root, env=env)
        if res.returncode != 0:
            log(f"bench.zoo_llama_cpp {' '.join(args[:3])}: failed: {res.stderr[-800:]}")
            return None
        return json.loads(res.stdout.strip().splitlines()[-1])

    out: dict[str, Any] = {}
    files: dict[str, str] = {}
    for qtype in LLAMA_CPP_TYPES:
        label = f"llama.cpp {qtype} (ik_llama.cpp {IK_LLAMA[2]})"
        dst = f32 if qtype == "F32" else cache_dir() / f"{name}-rotated-{qtype}.gguf"
        if (row := call(str(f32), str(dst), qtype, str(rows_file), str(a.threads))) is None:
            continue
        row["ppl_increase"] = row["perplexity"] / ref_ppl - 1
        row["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
        out[label], files[label] = row, str(dst)
        log(f"{name} {label}: {row['size_mb']:.1f} MB, ppl {row['perplexity']:.3f} "
            f"({100 * row['ppl_increase']:+.2f} %), {row['eval_s']:.0f} s eval")
        if qtype == "F32":
            ok = abs(row["ppl_increase"]) <= PROTOCOL_TOLERANCE
            row["protocol_check_ok"] = ok
            print(f"protocol check: llama.cpp F32 perplexity {row['perplexity']:.4f} vs fp32 ONNX {ref_ppl:.4f} "
                  f"({100 * row['ppl_increase']:+.3f} %, tolerance {100 * PROTOCOL_TOLERANCE:.0f} %): "
                  f"{'same protocol' if ok else 'MISMATCH: the llama.cpp rows are not comparable'}")
    ours = {label: str(path) for label, path in (onnx or {}).items()}
    speeds = call("decode", str(rows_file), str(a.threads), *files.values(), *ours.values()) or {}
    for label, path in files.items():
        if path in speeds:
            out[label]["decode_tok_s"] = speeds[path]
    for label, path in ours.items():
        if path in speeds:
            out[label] = {"decode_tok_s_beside_llama_cpp": speeds[path]}
    return out


run: Callable[[list[str] | None], dict[str, Any]] = main

if __name__ == "__main__":
    main(None)
