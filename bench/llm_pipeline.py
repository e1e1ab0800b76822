"""LLM benchmark: weight-only INT4 of a small causal LM against its fp32 ONNX and ORT's quantizer by hand.

A Llama-style LM (grouped-query attention, SwiGLU; sizes below, about 2-20 M parameters) is trained in this
process on the English licence texts that ship with the OS (/usr/share/common-licenses, every 10th
paragraph held out as the test split) with a byte-level BPE tokenizer trained on the same text; the weights
are cached under bench/out/ so reruns skip training. Never a hub download.

In the same run:

- **fp32**: the KV-cache ONNX export (``worker.lm.export.export_causal_lm``);
- **ORT by hand**: ``MatMulNBitsQuantizer(model).process()`` with ORT's defaults (4 bits, RTN, block 128,
  asymmetric, every MatMul including the head);
- **ours**: the ``quantize`` pass with ``mode: int4`` and nothing else (the pass defaults), and candidates
  around it (algorithm, block size, symmetric, head/embeddings, per-node 8-bit overrides) from which the
  defaults in ``worker/passes/quantize.py`` were chosen.

Figures per variant: file size, held-out perplexity (``worker.lm.session.LMSession.logits``, masked NLL over
every test token), decode tokens/s at batch 1 (``LMSession.time_decode``, greedy with the KV cache).
Goals: INT4 >= 3.5x smaller than fp32, decode >= 2x fp32, and a perplexity increase at most half of what
ORT's quantizer with its defaults loses on the same model.

LoRA domain adaptation (``--lora-steps``, 0 to skip): the ``finetune`` pass (``mode: lora``) on a new domain,
the Python documentation that ships with CPython (``pydoc_data.topics``, every 10th topic held out); goal:
the domain's held-out perplexity >= 10 % lower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import OUT, emit, fmt_ratio, goal_met, log, machine_info, ratio

GOAL_SIZE, GOAL_DECODE, GOAL_PPL_SHARE, GOAL_LORA = 3.5, 2.0, 0.5, 0.9
LICENCES = Path("/usr/share/common-licenses")

# name -> quantize step parameters (besides type and mode int4); "ours" is the pass with its defaults (which
# quantize the embeddings of a tied-head model only), every other candidate says what it does with them.
CANDIDATES: dict[str, dict[str, Any]] = {
    "ours": {},
    "rtn b128 asym head4": {"algorithm": "rtn", "block_size": 128, "symmetric": False, "bits": {}, "quantize_embeddings": False},
    "rtn b128 asym head8": {"algorithm": "rtn", "block_size": 128, "symmetric": False, "quantize_embeddings": False},
    "rtn b64 asym head8": {"algorithm": "rtn", "block_size": 64, "symmetric": False, "quantize_embeddings": False},
    "rtn b64 asym head4": {"algorithm": "rtn", "block_size": 64, "symmetric": False, "bits": {}, "quantize_embeddings": False},
    "rtn b64 sym head8": {"algorithm": "rtn", "block_size": 64, "symmetric": True, "quantize_embeddings": False},
    "rtn b64 asym head8 acc0": {"algorithm": "rtn", "block_size": 64, "accuracy_level": 0, "quantize_embeddings": False},
    "rtn b32 sym head4": {"algorithm": "rtn", "block_size": 32, "symmetric": True, "bits": {}, "quantize_embeddings": False},
    "rtn b32 asym head4": {"algorithm": "rtn", "block_size": 32, "symmetric": False, "bits": {}, "quantize_embeddings": False},
    "rtn b32 asym head8": {"algorithm": "rtn", "block_size": 32, "symmetric": False, "quantize_embeddings": False},
    "rtn b64 head8 down8": {"algorithm": "rtn", "block_size": 64, "bits": {"*lm_head*": 8, "*down_proj*": 8}, "quantize_embeddings": False},
    "hqq b32 head4": {"algorithm": "hqq", "block_size": 32, "bits": {}, "quantize_embeddings": False},
    "hqq b32 head8": {"algorithm": "hqq", "block_size": 32, "quantize_embeddings": False},
    "hqq b64 head8": {"algorithm": "hqq", "block_size": 64, "quantize_embeddings": False},
    "hqq b128 head8": {"algorithm": "hqq", "block_size": 128, "quantize_embeddings": False},
    "gptq b32 asym head8": {"algorithm": "gptq", "block_size": 32, "symmetric": False, "quantize_embeddings": False},
    "gptq b64 asym head8": {"algorithm": "gptq", "block_size": 64, "symmetric": False, "quantize_embeddings": False},
    "hqq b64 head8 emb4": {"algorithm": "hqq", "block_size": 64, "quantize_embeddings": True},
    "rtn b32 asym head8 emb4": {"algorithm": "rtn", "block_size": 32, "symmetric": False, "quantize_embeddings": True},
    "rtn b64 asym head8 emb4": {"algorithm": "rtn", "block_size": 64, "symmetric": False, "quantize_embeddings": True},
}


# --- the seams to lmeval's export and session (replaceable for a scratch run) ------------------------


def export_lm(module: Any, path: Path, hf_dir: Path) -> Path:
    """fp32 ONNX with a KV cache (``input_ids``, ``attention_mask``, ``past_key_values.*`` -> ``logits``, ``present.*``)."""
    from worker.lm.export import export_causal_lm

    export_causal_lm(module, path, hf_dir=hf_dir)
    return path


def open_session(path: Path, threads: int) -> Any:
    """An ``LMSession`` (``logits``, ``time_decode``) over an LM ONNX file."""
    from worker.lm.session import LMSession

    return LMSession(path, threads=threads)


# --- data and training --------------------------------------------------------------------------------


def licence_corpus(every: int = 10) -> tuple[list[str], list[str]]:
    """Paragraphs of each distinct licence file (links and copies once), split into (train, test)."""
    seen: set[str] = set()
    paras: list[str] = []
    for path in sorted(LICENCES.iterdir()):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text in seen:
            continue
        seen.add(text)
        paras += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 8]
    test = paras[every - 1 :: every]
    train = [p for i, p in enumerate(paras) if i % every != every - 1]
    return train, test


def token_rows(tok: Any, texts: list[str], length: int) -> np.ndarray:
    """The texts tokenized, joined with eos and cut into rows of ``length`` tokens (int64 [N, length])."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // length
    return np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length)


def python_docs_corpus(every: int = 10) -> tuple[list[str], list[str]]:
    """The topics of CPython's bundled documentation (``pydoc_data.topics``), split into (train, test)."""
    from pydoc_data.topics import topics

    texts = [" ".join(topics[k].split()) for k in sorted(topics)]
    return [t for i, t in enumerate(texts) if i % every != every - 1], texts[every - 1 :: every]


@dataclass
class Trained:
    hf_dir: Path
    train_rows: np.ndarray
    test_rows: np.ndarray
    params: int
    train_loss: float
    train_s: float


def train_lm(a: argparse.Namespace) -> Trained:
    """Train (or load from bench/out/) the LM and its tokenizer; rows of ``a.seq`` tokens for train and test."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from tests.factories_lm import lm_tokenizer

    train, test = licence_corpus()
    arch = "" if a.arch == "llama" else f"{a.arch}-"
    key = (f"llm-{arch}v{a.vocab}-h{a.hidden}-l{a.layers}-i{a.intermediate}-t{a.seq}-s{a.steps}-b{a.batch}"
           f"-seed{a.seed}")
    folder = OUT / key
    meta_path = folder / "bench.json"
    if not meta_path.exists():
        torch.manual_seed(a.seed)
        torch.set_num_threads(a.threads)
        tmp = OUT / (key + ".tmp")
        tok = lm_tokenizer(tmp, train, vocab_size=a.vocab)
        rows = torch.from_numpy(token_rows(tok, train, a.seq))
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
        model: Any
        if a.arch == "gpt2":  # another shape: Conv1D weights, GELU MLP, learned positions, tied embeddings
            model = GPT2LMHeadModel(GPT2Config(
                vocab_size=len(tok), n_embd=a.hidden, n_inner=a.intermediate, n_layer=a.layers, n_head=a.heads,
                n_positions=max(512, 2 * a.seq), **special))
        else:
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.intermediate,
                num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                max_position_embeddings=max(512, 2 * a.seq), tie_word_embeddings=False, **special))
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
        log(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M-parameter LM for {a.steps} "
            f"steps on {len(rows)} rows of {a.seq} tokens")
        t0, losses = time.perf_counter(), []
        model.train()
        for step in range(a.steps):
            batch = rows[torch.randint(0, len(rows), (a.batch,))]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 50 == 49:
                log(f"step {step + 1}: loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - t0:.0f} s)")
        model.eval()
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "bench.json").write_text(json.dumps(
            {"train_loss": float(np.mean(losses[-50:])), "train_s": time.perf_counter() - t0}))
        tmp.replace(folder)
    meta = json.loads(meta_path.read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    return Trained(folder, token_rows(tok, train, a.seq), token_rows(tok, test, a.seq), params,
                   meta["train_loss"], meta["train_s"])


# --- measuring -----------------------------------------------------------------------------------------


def perplexity(session: Any, rows: np.ndarray, batch: int = 8) -> float:
    """exp(mean next-token NLL) over every token of ``rows`` (full rows, no padding)."""
    nll, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        out = session.logits(ids, np.ones_like(ids))
        for j in range(len(ids)):  # float64 one row at a time: a 262k vocabulary makes a batch's copy GBs
            logits = np.asarray(out[j, :-1], dtype=np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(np.take_along_axis(logp, ids[j, 1:, None], -1).sum())
        count += ids[:, 1:].size
    return math.exp(nll / count)


def file_size(path: Path) -> int:
    """Bytes of an ONNX file plus its external data."""
    from worker.formats.onnx_model import model_size_bytes

    return int(model_size_bytes(path))


def measure(path: Path, rows: np.ndarray, a: argparse.Namespace) -> dict[str, Any]:
    """Size and held-out perplexity of one ONNX file."""
    return {"size_bytes": file_size(path), "perplexity": perplexity(open_session(path, a.threads), rows)}


def decode_speeds(paths: dict[str, Path], a: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Greedy decode tokens/s of each file at batch 1, in ``a.runs`` interleaved rounds (each file once per
    round, so a busy minute on a shared machine hits all of them): the best round and the median."""
    sessions = {name: open_session(path, a.threads) for name, path in paths.items()}
    seen: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(a.runs):
        for name, session in sessions.items():
            seen[name].append(float(session.time_decode(a.prompt_tokens, a.new_tokens, 1)["tokens_per_s"]))
    return {name: {"tokens_per_s": max(v), "tokens_per_s_median": float(np.median(v))} for name, v in seen.items()}


def quantize_by_hand(src: Path, dst: Path) -> Path:
    """ORT's weight-only quantizer with every default, as a user would call it."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)))
    q.process()
    onnx.save_model(q.model.model, str(dst))
    return dst


def quantize_ours(src: Path, work: Path, params: dict[str, Any], calibration: Any) -> tuple[Path, dict[str, Any]]:
    """The quantize pass (mode int4 and ``params``) on the fp32 export, calibration rows for GPTQ."""
    from models.spec import JobSpec, QuantizeStep
    from worker.context import LocalContext
    from worker.core import WorkingModel
    from worker.passes.quantize import QuantizePass

    class Ctx(LocalContext):
        def dataset(self, role: Any, model: WorkingModel) -> Any:
            return calibration

    ctx = Ctx(work, JobSpec.model_validate({"model": "mdl_lm", "task": "text-generation"}), models={}, device="cpu")
    model = WorkingModel(form="onnx", origin="hf", input_names=["input_ids", "attention_mask"],
                         output_names=["logits"], onnx_path=src, meta={"hf_task": "text-generation"})
    result = QuantizePass().run(model, QuantizeStep.model_validate({"type": "quantize", "mode": "int4", **params}), ctx)
    assert result.model.onnx_path is not None
    return result.model.onnx_path, result.metrics


def lora_domain(a: argparse.Namespace, lm: Trained) -> dict[str, Any]:
    """The finetune pass (LoRA) on the Python docs: held-out perplexity of that domain before and after."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.spec import FinetuneStep, JobSpec
    from worker.context import LocalContext
    from worker.core import ArrayDataset, WorkingModel
    from worker.passes.finetune import FinetunePass

    tok = AutoTokenizer.from_pretrained(lm.hf_dir)
    train, test = python_docs_corpus()

    def rows(texts: list[str]) -> ArrayDataset:
        ids = token_rows(tok, texts, a.seq)
        return ArrayDataset(inputs={"input_ids": ids, "attention_mask": np.ones_like(ids)}, labels=ids.copy(),
                            meta={"shape": "text"})

    data = {"train": rows(train), "eval": rows(test).take(a.lora_eval_rows)}

    class Ctx(LocalContext):
        def dataset(self, role: Any, model: WorkingModel) -> Any:
            return data.get(role)

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    spec = JobSpec.model_validate({"model": "mdl_lm", "task": "text-generation", "seed": a.seed})
    with tempfile.TemporaryDirectory(prefix="bench-llm-lora-") as tmp:
        ctx = Ctx(Path(tmp), spec, models={}, device="cpu")
        model = WorkingModel(form="torch", origin="hf", input_names=["input_ids", "attention_mask"],
                             output_names=["logits"], module=AutoModelForCausalLM.from_pretrained(lm.hf_dir).eval(),
                             hf_dir=lm.hf_dir, meta={"hf_task": "text-generation"})
        step = FinetuneStep.model_validate({"type": "finetune", "mode": "lora", "epochs": 100, "max_steps": a.lora_steps,
                                            "batch_size": a.batch, "lr": a.lora_lr, "lora": {"r": 16, "alpha": 32}})
        t0 = time.perf_counter()
        metrics = FinetunePass().run(model, step, ctx).metrics
    before, after = float(metrics["perplexity_before"]), float(metrics["perplexity_after"])
    return {"domain_train_rows": len(data["train"]), "domain_eval_rows": len(data["eval"]), "steps": a.lora_steps,
            "trainable_params": metrics.get("trainable_params"), "perplexity_before": before,
            "perplexity_after": after, "ratio": after / before, "train_s": time.perf_counter() - t0}


# --- the run -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.llm_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("llama", "gpt2"), default="llama",
                   help="llama: GQA + SwiGLU, untied head; gpt2: MHA + GELU, tied head (--kv-heads unused)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=9, help="interleaved decode timing rounds")
    p.add_argument("--candidates", default="all", help="comma-separated CANDIDATES names, or all")
    p.add_argument("--decode-all", action="store_true", help="time decode for every candidate, not just ours")
    p.add_argument("--lora-steps", type=int, default=60, help="LoRA domain-adaptation steps (0: skip)")
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--lora-eval-rows", type=int, default=64)
    a = p.parse_args(argv)
    names = list(CANDIDATES) if a.candidates == "all" else ["ours", *[n for n in a.candidates.split(",") if n != "ours"]]
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        return _run(a, names, Path(tmp))


def _run(a: argparse.Namespace, names: list[str], work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from worker.core import ArrayDataset, StepFailed

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    lm = train_lm(a)
    log(f"LM: {lm.params / 1e6:.2f} M parameters, train loss {lm.train_loss:.3f}, "
        f"{len(lm.test_rows)} test rows of {a.seq} tokens")
    module = AutoModelForCausalLM.from_pretrained(lm.hf_dir).eval()
    fp32 = export_lm(module, work / "fp32.onnx", lm.hf_dir)
    calib_ids = lm.train_rows[:32]
    calibration = ArrayDataset(inputs={"input_ids": calib_ids, "attention_mask": np.ones_like(calib_ids)},
                               labels=calib_ids.copy(), meta={"shape": "text"})
    results: dict[str, dict[str, Any]] = {"fp32": measure(fp32, lm.test_rows, a)}
    t0 = time.perf_counter()
    by_hand = quantize_by_hand(fp32, work / "ort-defaults.onnx")
    results["ort defaults"] = {**measure(by_hand, lm.test_rows, a), "quantize_s": time.perf_counter() - t0}
    timed = {"fp32": fp32, "ort defaults": by_hand}
    failed: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            path, metrics = quantize_ours(fp32, work / re.sub(r"\W+", "-", name), CANDIDATES[name], calibration)
        except StepFailed as e:  # a candidate the quantizer cannot do on this graph is a finding, not a crash
            log(f"{name}: failed: {e.code}: {e.message}")
            failed[name] = f"{e.code}: {e.message}"
            continue
        row = measure(path, lm.test_rows, a)
        if name == "ours" or a.decode_all:
            timed[name] = path
        row["quantize_s"] = time.perf_counter() - t0
        row["weight_only"] = {k: metrics["weight_only"][k] for k in ("algorithm", "block_size", "symmetric",
                                                                      "accuracy_level", "matmul_bits", "embeddings")}
        results[name] = row
        log(f"{name}: ppl {row['perplexity']:.3f}, {row['size_bytes'] / 1e6:.2f} MB")
    log(f"timing decode of {len(timed)} files in {a.runs} interleaved rounds")
    for name, speed in decode_speeds(timed, a).items():
        results[name].update(speed)
    base = results["fp32"]
    for row in results.values():
        row["size_ratio"] = ratio(base["size_bytes"], row["size_bytes"])
        row["ppl_increase"] = row["perplexity"] / base["perplexity"] - 1
        if "tokens_per_s" in row:
            row["decode_ratio"] = ratio(row["tokens_per_s"], base["tokens_per_s"])
    print(f"{'variant':<24} {'MB':>7} {'smaller':>8} {'ppl':>8} {'ppl +%':>8} {'tok/s':>8} {'decode':>7}")
    for name, row in results.items():
        tps = f"{row['tokens_per_s']:8.1f} {row['decode_ratio']:6.2f}x" if "tokens_per_s" in row else ""
        print(f"{name:<24} {row['size_bytes'] / 1e6:7.2f} {row['size_ratio']:7.2f}x {row['perplexity']:8.3f} "
              f"{100 * row['ppl_increase']:+7.1f}% {tps}")
    for name, why in failed.items():
        print(f"{name:<24} failed: {why[:120]}")
    ours, ort_def = results["ours"], results["ort defaults"]
    # ORT's defaults losing nothing (or gaining, within noise) leave no loss to take a share of: the goal
    # then holds only if ours lost nothing either.
    share = (ratio(ours["ppl_increase"], ort_def["ppl_increase"]) if ort_def["ppl_increase"] > 1e-4
             else (0.0 if ours["ppl_increase"] <= 1e-4 else math.inf))
    print(f"ours vs fp32: size {fmt_ratio(ours['size_ratio'], GOAL_SIZE)}, decode "
          f"{fmt_ratio(ours['decode_ratio'], GOAL_DECODE)}; perplexity +{100 * ours['ppl_increase']:.1f}% vs ORT "
          f"defaults +{100 * ort_def['ppl_increase']:.1f}%: share {fmt_ratio(share, GOAL_PPL_SHARE, higher_is_better=False)}")
    lora = lora_domain(a, lm) if a.lora_steps else None
    if lora is not None:
        print(f"LoRA on the Python docs ({lora['steps']} steps): domain perplexity {lora['perplexity_before']:.2f} -> "
              f"{lora['perplexity_after']:.2f}: {fmt_ratio(lora['ratio'], GOAL_LORA, higher_is_better=False)}")
    figures = {
        "machine": machine_info(),
        "model": {"arch": a.arch, "params": lm.params, "train_loss": lm.train_loss, "train_s": lm.train_s,
                  "hidden": a.hidden,
                  "layers": a.layers, "vocab": a.vocab, "test_tokens": int(lm.test_rows.size)},
        "results": results,
        "failed": failed,
        "ppl_share_of_ort_defaults": share,
        "goals": {
            "size": goal_met(ours["size_ratio"], GOAL_SIZE),
            "decode": goal_met(ours["decode_ratio"], GOAL_DECODE),
            "ppl_share": goal_met(share, GOAL_PPL_SHARE, higher_is_better=False),
            **({"lora": goal_met(lora["ratio"], GOAL_LORA, higher_is_better=False)} if lora else {}),
        },
        "lora": lora,
    }
    emit("llm_pipeline", f"int4 {ours['size_ratio']:.2f}x smaller, decode {ours['decode_ratio']:.2f}x, ppl "
         f"+{100 * ours['ppl_increase']:.1f}% (ORT defaults +{100 * ort_def['ppl_increase']:.1f}%)", figures)
    return figures


run: Callable[[list[str] | None], dict[str, Any]] = main

if __name__ == "__main__":
    main(None)
