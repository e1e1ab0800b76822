"""LLMs of the size people use through the live service: ``quantize {mode: int4}`` of random-init Llamas
built from real configs, stored as bf16 sharded safetensors in an ``hf`` zip, on the embedded defaults.

Per size it prints the worker's peak RSS (the worker process and its pool children, sampled every 50 ms
from submit to ``succeeded``), the job's wall time (``POST /v1/jobs`` to ``succeeded``), bytes per
parameter at the peak, the INT4 ONNX size, which path ran (streamed or in memory) and the perplexities.
``--offline 8b`` runs the streamed job's phases in-process on sparse all-zero safetensors (no upload, no
generation of 16 GB): peak RSS per phase, time and file sizes at a scale the service run does not reach on
this machine in an afternoon. ``--genai`` also runs onnxruntime-genai's builder (``precision int4``, CPU) on the same folder in a
subprocess, for its peak RSS, time and file size.

Weights are not trained (perplexity is near the vocabulary size and says nothing), and to build 16 GB of
them on 2 cores they are drawn from one 32 M-value pool of N(0, 0.02) at random offsets. Big files live
under ``--cache`` (default /work/scale-cache), never in the repository, and are deleted after each size.

Goal (issue 19): 8 B completes with peak RSS <= 16 GB (<= 2 bytes/param) and INT4 <= 5.5 GB; 1.2 B within
4 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, RssSampler, emit, log, machine_info, new_run_id, service, submit_job, upload

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, tied, context)
CONFIGS: dict[str, tuple[int, int, int, int, int, int, bool, int]] = {
    "tiny": (256, 2, 4, 2, 512, 1000, False, 131072),  # a smoke run of the bench itself
    "0.35b": (1024, 24, 16, 8, 2816, 32000, False, 4096),
    "1.2b": (2048, 16, 32, 8, 8192, 128256, True, 131072),  # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192, 128256, True, 131072),  # Llama-3.2-3B
    "8b": (4096, 32, 32, 8, 14336, 128256, False, 131072),  # Llama-3.1-8B
}
SHARD_BYTES = 2 * 1024**3
POOL = 32 * 1024 * 1024
GB = 1e9


def _config(name: str) -> Any:
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, vocab, tied, context = CONFIGS[name]
    llama3: dict[str, Any] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    rope: dict[str, Any] = {"rope_parameters": llama3} if context > 8192 else {}
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=context,
                       tie_word_embeddings=tied, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"],
                       bos_token_id=2, eos_token_id=3, pad_token_id=0,
                       **rope)


def _tensors(config: Any) -> list[tuple[str, list[int]]]:
    h, kv_dim = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [config.vocab_size, h])]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", [h]), (f"{p}.self_attn.q_proj.weight", [h, h]),
                (f"{p}.self_attn.k_proj.weight", [kv_dim, h]), (f"{p}.self_attn.v_proj.weight", [kv_dim, h]),
                (f"{p}.self_attn.o_proj.weight", [h, h]), (f"{p}.post_attention_layernorm.weight", [h]),
                (f"{p}.mlp.gate_proj.weight", [config.intermediate_size, h]),
                (f"{p}.mlp.up_proj.weight", [config.intermediate_size, h]),
                (f"{p}.mlp.down_proj.weight", [h, config.intermediate_size])]
    out.append(("model.norm.weight", [h]))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", [config.vocab_size, h]))
    return out


def build_zip(name: str, cache: Path) -> tuple[Path, int]:
    """The hf zip of a random-init bf16 Llama of size ``name`` (sharded safetensors + index + tokenizer)."""
    from tests.factories_lm import lm_tokenizer

    config = _config(name)
    out = cache / f"llama-{name}.zip"
    tensors = _tensors(config)
    params = sum(int(np.prod(s)) for _, s in tensors)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for t in tensors:
        if size and size + 2 * int(np.prod(t[1])) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += 2 * int(np.prod(t[1]))
    rng = np.random.default_rng(0)
    pool = ((rng.standard_normal(POOL, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    one = np.full(1, 0x3F80, dtype=np.uint16)  # bf16 1.0 for the norms
    tmp = cache / f"tok-{name}"
    lm_tokenizer(tmp)
    weight_map: dict[str, str] = {}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        config.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            zf.write(f, f"llama/{f.name}")
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for tname, shape in shard:
                n = 2 * int(np.prod(shape))
                header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
                offset += n
                weight_map[tname] = fname
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            with zf.open(f"llama/{fname}", "w", force_zip64=True) as fh:
                fh.write(struct.pack("<Q", len(raw)) + raw)
                for _, shape in shard:
                    left = int(np.prod(shape))
                    if len(shape) == 1:
                        fh.write(np.repeat(one, left).tobytes())
                        continue
                    while left:
                        n = min(left, POOL // 2)
                        start = int(rng.integers(0, POOL - n + 1))
                        fh.write(pool[start:start + n].tobytes())
                        left -= n
        zf.writestr("llama/model.safetensors.index.json",
                    json.dumps({"metadata": {"total_size": 2 * params}, "weight_map": weight_map}))
    shutil.rmtree(tmp, ignore_errors=True)
    return out, params


def sparse_folder(name: str, folder: Path, random: bool = False) -> int:
    """The model of size ``name`` as an hf folder whose safetensors are sparse files of zeros (no disk, no
    generation time), or with ``random`` the weights build_zip draws; for the streamed path's memory, time and
    size at a scale the service run cannot reach here in an afternoon."""
    from tests.factories_lm import lm_tokenizer

    config = _config(name)
    folder.mkdir(parents=True, exist_ok=True)
    lm_tokenizer(folder)
    config.save_pretrained(folder)
    tensors = _tensors(config)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tname, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        if not random:
            fh.truncate(8 + len(raw) + offset)
        else:  # the same draw as build_zip: slices of one N(0, 0.02) pool, norms at 1.0
            rng = np.random.default_rng(0)
            pool = ((rng.standard_normal(POOL, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
            for _, shape in tensors:
                left = int(np.prod(shape))
                if len(shape) == 1:
                    fh.write(np.full(left, 0x3F80, dtype=np.uint16).tobytes())
                    continue
                while left:
                    n = min(left, POOL // 2)
                    start = int(rng.integers(0, POOL - n + 1))
                    fh.write(pool[start:start + n].tobytes())
                    left -= n
    return sum(int(np.prod(s)) for _, s in tensors)


def offline(name: str, cache: Path, random: bool = False) -> dict[str, Any]:
    """The streamed job's phases in this process, without the service: write the INT8 reference, open it and
    run 2 x 64 tokens + 4 greedy ones, write the INT4 file, the same on it; peak RSS (VmHWM) per phase."""
    from models.spec import QuantizeStep
    from worker import stream_job
    from worker.lm import stream
    from worker.lm.session import LMSession
    from worker.memory import peak_rss_bytes, release_memory, reset_peak_rss

    folder = cache / "sparse"
    t0 = time.perf_counter()
    params = sparse_folder(name, folder, random)
    log(f"{name}: {'random' if random else 'sparse zero'} weights written in {time.perf_counter() - t0:.0f} s")
    row: dict[str, Any] = {"size": name, "params": params, "weights": "random" if random else "zeros",
                           "phases": {}, "wall": {}}
    ids = np.random.default_rng(0).integers(0, 300, (2, 64), dtype=np.int64)

    def phase(label: str, t0: float) -> None:
        row["phases"][label] = peak_rss_bytes()
        row["wall"][label] = time.perf_counter() - t0
        log(f"{name} offline {label}: peak {row['phases'][label] / 2**30:.2f} GiB, {row['wall'][label]:.0f} s")
        release_memory()
        reset_peak_rss()

    reset_peak_rss()
    int4 = stream_job.settings_for(QuantizeStep(type="quantize", mode="int4"))  # the job's: 8-bit table, RTN
    for label, settings in (("reference", stream_job.REFERENCE), ("int4", int4)):
        t0 = time.perf_counter()
        written = stream.write_model(folder, cache / label / "model.onnx", settings)
        phase(f"write_{label}", t0)
        row[f"{label}_bytes"] = sum(f.stat().st_size for f in (cache / label).iterdir())
        row[f"{label}_projected_data_bytes"] = stream.projected_bytes(_config(name), settings)
        t0 = time.perf_counter()
        sess = LMSession(written.path, threads=1)
        sess.logits(ids, np.ones_like(ids))
        sess.generate([5, 6, 7], 4)
        del sess
        phase(f"evaluate_{label}", t0)
        shutil.rmtree(cache / label, ignore_errors=True)
    row["peak_rss"] = max(row["phases"].values())
    row["bytes_per_param"] = row["peak_rss"] / params
    return row


def _unzip(zip_path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest)
    return dest / "llama"


def genai_int4(folder: Path, out: Path) -> dict[str, Any]:
    """onnxruntime-genai's builder, int4 CPU, in a subprocess: its peak RSS, wall time and file size."""
    code = ("import sys; from onnxruntime_genai.models import builder as b; "
            "o = b.parse_extra_options(None, sys.argv[1], sys.argv[2], 'int4', 'cpu', sys.argv[3], "
            "['hf_token=false', 'filename=model.onnx']); "
            "b.create_model(None, sys.argv[1], sys.argv[2], 'int4', 'cpu', sys.argv[3], **o)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(out), str(out.parent / "genai-cache")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with RssSampler(proc.pid, interval=0.05) as rss:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.glob("model.onnx*")) if out.exists() else 0
    result = {"rc": proc.returncode, "wall_s": wall, "peak_rss": rss.peak(), "size_bytes": size}
    if proc.returncode:
        result["error"] = err.decode(errors="replace")[-600:]
    return result


def run_size(name: str, a: argparse.Namespace, run_id: str) -> dict[str, Any]:
    """Build, upload, quantize through the service, measure; everything under the cache removed after."""
    import httpx

    from tests.factories_lm import text_rows, write_jsonl

    cache = Path(a.cache) / f"{run_id}-{name}"
    cache.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"size": name}
    try:
        t0 = time.perf_counter()
        zip_path, params = build_zip(name, cache)
        row.update(params=params, zip_bytes=zip_path.stat().st_size, build_s=time.perf_counter() - t0)
        log(f"{name}: {params / 1e9:.2f} B parameters, {zip_path.stat().st_size / GB:.2f} GB zip "
            f"({row['build_s']:.0f} s)")
        if a.genai:
            folder = _unzip(zip_path, cache / "unzipped")
            row["genai"] = genai_int4(folder, cache / "genai")
            shutil.rmtree(cache / "unzipped", ignore_errors=True)
            shutil.rmtree(cache / "genai", ignore_errors=True)
            log(f"{name}: genai builder int4: {row['genai']}")
        text = write_jsonl(cache / "eval.jsonl", text_rows(8))
        # Short: prefill costs 2 x params FLOPs a token (8 B: 16 GFLOP), and 2 shared cores give ~20 GFLOP/s.
        spec_eval = {"max_samples": 2, "latency": {"runs": 2, "warmup": 1},
                     "generation": {"samples": 1, "max_new_tokens": 4, "prompt_tokens": 16}}
        with service("embedded", f"{run_id}{name.replace('.', '')}", worker=True, home_base=cache) as svc, \
                httpx.Client(base_url=svc.url, timeout=600) as client:
            model = upload(client, "models", zip_path, "hf")
            data = upload(client, "datasets", text, "text")
            zip_path.unlink()  # the store holds it now: disk for the worker's copy
            deadline = time.monotonic() + 120
            while " ready." not in svc.logs("worker.log") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert svc.worker is not None
            with RssSampler(svc.worker.pid, interval=0.05) as rss:
                idle = rss.rss()
                t0 = time.perf_counter()
                job_id = submit_job(client, {"model": model["id"], "task": "text-generation",
                                             "data": {"eval": data["id"]}, "evaluate": spec_eval,
                                             "text": {"max_length": 64},
                                             "steps": [{"type": "quantize", "mode": "int4"}]})
                while True:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    if job["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    time.sleep(1.0)
                wall = time.perf_counter() - t0
                time.sleep(3)
                after = rss.rss()
            row.update(status=job["status"], wall_s=wall, peak_rss=rss.peak(), idle_rss=idle, rss_after=after)
            if job["status"] != "succeeded":
                row["error"] = job.get("error")
                log(f"{name}: job {job['status']}: {job.get('error')}\n{svc.logs('worker.log')[-2000:]}")
            else:
                report = job["result"]["report"]
                step = report["steps"][0]["metrics"]
                row.update(streamed=bool(step.get("streamed")), int4_bytes=report["output"]["size_bytes"],
                           ppl_in=report["input"].get("perplexity"), ppl_out=report["output"].get("perplexity"),
                           reference=(report["input"].get("reference") or {}).get("kind", "float32"),
                           step_s=report["steps"][0]["wall_s"], eval_in_s=report["input"].get("wall_s"),
                           eval_out_s=report["output"].get("wall_s"),
                           phases=(report.get("memory") or {}).get("peak_rss_bytes_by_phase"),
                           session_peak_in=report["input"].get("peak_memory_bytes"),
                           session_peak_out=report["output"].get("peak_memory_bytes"))
        row["bytes_per_param"] = row["peak_rss"] / params
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return row


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sizes asked for and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.35b,1.2b", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--cache", default="/work/scale-cache")
    ap.add_argument("--genai", action="store_true", help="also measure onnxruntime-genai's int4 builder")
    ap.add_argument("--random", action="store_true", help="--offline with random weights (written to disk)")
    ap.add_argument("--offline", default=None, help="a size to run the streamed phases of in this process on "
                                                     "sparse (all-zero) weights, without the service")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # stop the service and remove the big files on a kill too
    run_id = new_run_id()
    rows = []
    if a.offline:
        cache = Path(a.cache) / f"{run_id}-offline"
        try:
            row = offline(a.offline, cache, a.random)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        log(json.dumps(row, default=str))
        emit("llm_scale", f"{a.offline} offline: peak {row['peak_rss'] / 2**30:.2f} GiB", {"offline": row})
        return {"offline": row}
    for name in a.sizes.split(","):
        row = run_size(name.strip(), a, run_id)
        rows.append(row)
        log(json.dumps(row, default=str))
    log("| params | path | job wall | worker peak RSS | bytes/param at peak | idle after | INT4 ONNX | "
        "ppl in (ref) -> out | genai builder int4 (peak, wall, size) |")
    for r in rows:
        g = r.get("genai")
        gtxt = "" if not g else (f"{g['peak_rss'] / 2**30:.1f} GiB, {g['wall_s']:.0f} s, {g['size_bytes'] / GB:.2f} GB"
                                 if not g["rc"] else f"failed: {g.get('error', '')[-120:]}")
        with contextlib.suppress(KeyError, TypeError):
            log(f"| {r['params'] / 1e9:.2f} B | {'streamed' if r.get('streamed') else 'in memory'} | "
                f"{r['wall_s']:.0f} s | {r['peak_rss'] / 2**30:.2f} GiB | {r['bytes_per_param']:.2f} | "
                f"{r['rss_after'] / 2**30:.2f} GiB | {r.get('int4_bytes', 0) / GB:.2f} GB | "
                f"{r.get('ppl_in', 0):.0f} ({r.get('reference')}) -> {r.get('ppl_out', 0):.0f} | {gtxt} |")
    figures = {"rows": rows, "machine": machine_info()}
    emit("llm_scale", "; ".join(f"{r['size']}: {r.get('status')} peak {r.get('peak_rss', 0) / 2**30:.2f} GiB"
                                for r in rows), figures)
    return figures


if __name__ == "__main__":
    main()
