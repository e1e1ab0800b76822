"""The one evaluation harness for input and output causal LMs (task ``text-generation``).

On ONNX Runtime CPU, with the same tokenization of the eval text for both models: perplexity over the
label positions (``-100`` ignored, labels shifted by one), next-token top-1 agreement and mean KL
against the input model, zero-/few-shot choice accuracy (each choice scored by its log-likelihood after
the prompt), prefill latency of a ``generation.prompt_tokens`` prompt and decode tokens/s with the KV
cache at batch 1, the session's peak memory (RSS growth of a fresh process, `worker.lm.memory`), size on disk, parameters, and greedy
generations for the first eval prompts.

The input model's evaluation keeps, in ``Evaluation.outputs`` (not serialised), its top-1 token at every
scored position and its log-probabilities for as many positions as fit ``REFERENCE_ELEMENTS`` (float16),
the reference the output model's agreement and KL are measured against.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.evaluate import Evaluation, available_cores
from worker.ort_guard import RunGuard

if TYPE_CHECKING:
    from models.spec import EvaluateConfig
    from worker.core import ArrayDataset, WorkingModel
    from worker.lm.layout import LMLayout
    from worker.lm.session import LMSession

# The reference log-probabilities kept for KL: positions x vocab elements (float16: 128 MB).
REFERENCE_ELEMENTS = 64 * 1024 * 1024
# The logits of one eval batch: batch x tokens x vocab elements (float32: 256 MB); batches shrink to fit.
BATCH_LOGIT_ELEMENTS = 64 * 1024 * 1024
MAX_EVAL_BATCH = 8
DECODE_RUNS = 3


def _never() -> None:
    """The default cancel check."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float32."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def scored_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mask [N, T-1], targets [N, T-1])``: logits at t predict labels at t+1, ``-100`` ignored."""
    targets = labels[:, 1:]
    return targets != -100, targets


class _Accumulator:
    """Running NLL, token count, and the agreement/KL against a reference over batches."""

    def __init__(self, reference: dict[str, np.ndarray] | None, keep_reference: bool) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.reference = reference
        self.keep = keep_reference
        self.argmax: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []
        self.budget: int | None = None  # positions whose log-probs are kept (set from the first batch's vocab)
        self.kept = 0
        self.agree = 0
        self.compared = 0
        self.kl_sum = 0.0
        self.kl_count = 0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        mask, targets = scored_positions(labels)
        lp = log_softmax(logits[:, :-1][mask])  # [n, V] at the scored positions, in order
        if self.budget is None:
            self.budget = max(1, REFERENCE_ELEMENTS // max(1, lp.shape[-1]))
        tgt = targets[mask]
        self.nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        start = self.tokens
        self.tokens += len(tgt)
        top = lp.argmax(axis=-1).astype(np.int32)
        if self.keep:
            self.argmax.append(top)
            room = self.budget - self.kept
            if room > 0:
                self.logprobs.append(lp[:room].astype(np.float16))
                self.kept += min(room, len(lp))
        ref = self.reference
        if ref is not None:
            ref_top = ref["argmax"][start : start + len(top)]
            n = min(len(ref_top), len(top))
            self.agree += int((ref_top[:n] == top[:n]).sum())
            self.compared += n
            ref_lp = ref["logprobs"]
            if start < len(ref_lp):
                r = ref_lp[start : start + len(lp)].astype(np.float32)
                o = lp[: len(r)]
                self.kl_sum += float((np.exp(r) * (r - o)).sum())
                self.kl_count += len(r)

    def reference_outputs(self) -> dict[str, np.ndarray]:
        vocab_dim = self.logprobs[0].shape[1] if self.logprobs else 0
        return {
            "argmax": np.concatenate(self.argmax) if self.argmax else np.zeros(0, np.int32),
            "logprobs": np.concatenate(self.logprobs) if self.logprobs else np.zeros((0, vocab_dim), np.float16),
        }


def eval_batch_size(requested: int, tokens: int, vocab: int | None) -> int:
    """Rows per eval batch: at most ``requested`` and MAX_EVAL_BATCH, and logits within BATCH_LOGIT_ELEMENTS."""
    fit = BATCH_LOGIT_ELEMENTS // max(1, tokens * (vocab or 32_000))
    return max(1, min(requested, MAX_EVAL_BATCH, fit))


def _batches(data: ArrayDataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    assert data.labels is not None
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    for s in range(0, len(data), batch_size):
        m = mask[s : s + batch_size]
        width = int(m.sum(axis=1).max()) if m.size else 0  # right padding: cut the all-padding tail
        width = max(width, 2)
        yield ids[s : s + batch_size, :width], m[:, :width], data.labels[s : s + batch_size, :width]


def perplexity_from(nll: float, tokens: int) -> float | None:
    """exp(mean NLL); None without tokens."""
    if tokens == 0:
        return None
    mean = nll / tokens
    return float(math.exp(mean)) if mean < 700 else float("inf")


# ----------------------------------------------------------------------------------------------------------
# choices


def _label_index(label: Any, choices: list[str]) -> int | None:
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices):
        return label
    text = str(label).strip()
    return choices.index(text) if text in choices else None


def few_shot_prefix(rows: list[dict[str, Any]], choices: list[str], k: int) -> str:
    """``k`` solved examples from train rows, one per paragraph, each ``<text> <choice>``: taken class by class in
    turn (each class's rows in their order), so that a train file sorted by label still shows every choice
    rather than ``k`` rows of its first class (which would bias the in-context answer towards that class)."""
    by_class: list[list[dict[str, Any]]] = [[] for _ in choices]
    for row in rows:
        idx = _label_index(row.get("label"), choices)
        if idx is not None:
            by_class[idx].append(row)
    shots: list[str] = []
    turn = 0
    while len(shots) < k and any(turn < len(group) for group in by_class):
        for idx, group in enumerate(by_class):
            if turn < len(group) and len(shots) < k:
                shots.append(f"{group[turn]['text']} {choices[idx]}")
        turn += 1
    return "".join(s + "\n\n" for s in shots)


def choice_accuracy(sess: LMSession, tokenizer: Any, rows: list[dict[str, Any]], choices: list[str],
                    prefix: str = "", check_cancelled: Callable[[], None] = _never) -> dict[str, Any]:
    """Accuracy of picking, for each row, the choice with the highest summed log-likelihood after the prompt."""
    right = scored = 0
    cont = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    for row in rows:
        check_cancelled()
        gold = _label_index(row.get("label"), choices)
        if gold is None:
            continue
        ctx = tokenizer(prefix + str(row["text"]), add_special_tokens=False)["input_ids"] or [0]
        seqs = [ctx + c for c in cont]
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        lp = log_softmax(sess.logits(ids, mask))
        scores = []
        for i, c in enumerate(cont):
            pos = np.arange(len(ctx) - 1, len(ctx) - 1 + len(c))  # logits at t predict token t+1
            scores.append(float(lp[i, pos, c].sum()))
        right += int(int(np.argmax(scores)) == gold)
        scored += 1
    return {"accuracy": right / scored if scored else None, "scored": scored, "choices": choices}




def _tokenizer(hf_dir: Path | None) -> Any:
    if hf_dir is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def _context_length(hf_dir: Path | None) -> int | None:
    if hf_dir is None or not (Path(hf_dir) / "config.json").is_file():
        return None
    import json

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return None


def generations(sess: LMSession, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                check_cancelled: Callable[[], None] = _never) -> list[dict[str, str]]:
    """Greedy continuations (new text only) of ``prompts`` with the KV cache."""
    out = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for prompt in prompts:
        check_cancelled()
        ids = tokenizer(prompt)["input_ids"] or [eos or 0]
        new = sess.generate(list(ids), max_new_tokens, eos_token_id=eos, check_cancelled=check_cancelled)
        out.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True)})
    return out


def evaluate_lm(
    onnx_path: Path,
    data: ArrayDataset | None,
    cfg: EvaluateConfig,
    reference: dict[str, np.ndarray] | None = None,
    *,
    hf_dir: Path | None = None,
    train: ArrayDataset | None = None,
    layout: LMLayout | None = None,
    latency: bool | None = None,
    check_cancelled: Callable[[], None] = _never,
) -> Evaluation:
    """Evaluate the ONNX causal LM at ``onnx_path`` (see the module docstring); ``reference``: the input
    model's ``Evaluation.outputs`` (absent for the input itself); ``hf_dir``: its tokenizer. Every run is
    bounded and cancellable (``check_cancelled`` read by a watchdog, worker/ort_guard.py)."""
    import onnx

    from worker.formats.onnx_model import count_params, model_size_bytes
    from worker.lm.session import LMSession

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    report: dict[str, Any] = {"size_bytes": model_size_bytes(onnx_path, proto), "params": count_params(proto)}
    del proto
    if data is not None and cfg.max_samples is not None:
        data = data.take(cfg.max_samples)
    threads = max(1, min(cfg.latency.threads, available_cores()))
    tokenizer = _tokenizer(hf_dir)
    outputs: dict[str, np.ndarray] | None = None
    with RunGuard(check_cancelled, what=f"the model {onnx_path.name}") as guard:
        sess = LMSession(onnx_path, threads=threads, layout=layout, guard=guard)
        if data is not None and len(data) and data.labels is not None:
            vocab = sess.session.get_outputs()[0].shape[-1]
            acc = _Accumulator(reference, keep_reference=reference is None)
            t0 = time.perf_counter()
            batch_rows = eval_batch_size(cfg.batch_size, data.inputs["input_ids"].shape[1],
                                   vocab if isinstance(vocab, int) else None)
            for ids, mask, labels in _batches(data, batch_rows):
                check_cancelled()
                acc.add(sess.logits(ids, mask), labels)
            report["eval_s"] = time.perf_counter() - t0
            report["num_samples"] = len(data)
            report["tokens"] = acc.tokens
            report["nll"] = acc.nll / acc.tokens if acc.tokens else None
            report["perplexity"] = perplexity_from(acc.nll, acc.tokens)
            if reference is not None:
                report["agreement"] = {
                    "top1": acc.agree / acc.compared if acc.compared else None,
                    "mean_kl": acc.kl_sum / acc.kl_count if acc.kl_count else None,
                    "tokens": acc.compared,
                    "kl_tokens": acc.kl_count,
                }
            else:
                outputs = acc.reference_outputs()
        else:
            report.update({"num_samples": 0 if data is None else len(data), "tokens": 0, "nll": None,
                           "perplexity": None})
        report["accuracy"] = None
        rows = (data.meta.get("rows") if data is not None else None) or []
        if cfg.choices and rows and tokenizer is not None:
            train_rows = (train.meta.get("rows") if train is not None else None) or []
            prefix = few_shot_prefix(train_rows, list(cfg.choices), cfg.few_shot) if cfg.few_shot else ""
            scored = choice_accuracy(sess, tokenizer, rows[: cfg.max_samples], list(cfg.choices), prefix,
                                     check_cancelled)
            report["choice"] = {**scored, "few_shot": cfg.few_shot}
            report["accuracy"] = scored["accuracy"]
        if report["accuracy"] is not None:
            report["metric"] = {"name": "accuracy", "value": report["accuracy"], "higher_is_better": True}
        elif report["perplexity"] is not None:
            report["metric"] = {"name": "perplexity", "value": report["perplexity"], "higher_is_better": False}
        else:
            report["metric"] = None
        gen = cfg.generation
        prompt_tokens = gen.prompt_tokens
        context = _context_length(hf_dir)
        if context is not None:
            prompt_tokens = max(1, min(prompt_tokens, context - gen.max_new_tokens - 1))
        if latency if latency is not None else "latency" in cfg.metrics:
            report["latency_ms"] = sess.time_prefill(prompt_tokens, cfg.latency.runs, cfg.latency.warmup,
                                                     check_cancelled)
            report["latency_setup"] = {"what": "prefill", "prompt_tokens": prompt_tokens, "batch_size": 1,
                                       "runs": cfg.latency.runs, "warmup": cfg.latency.warmup, "threads": threads,
                                       "threads_requested": cfg.latency.threads}
            decode = sess.time_decode(prompt_tokens, gen.max_new_tokens, DECODE_RUNS, check_cancelled)
            report["decode"] = {k: decode[k] for k in ("tokens_per_s", "ms_per_token", "new_tokens", "prompt_tokens")}
        prompts = [str(p) for p in (data.meta.get("prompts") if data is not None else None) or []]
        if tokenizer is not None and prompts and gen.samples:
            report["generations"] = generations(sess, tokenizer, prompts[: gen.samples], gen.max_new_tokens,
                                                check_cancelled)
        del sess
    # Not this process's RSS growth, which under-reads once an earlier evaluation left the allocator's memory
    # mapped (worker.lm.memory): each model is measured in a fresh process, None when that could not run.
    report["peak_memory_bytes"] = _session_peak(onnx_path, threads, layout, cfg, prompt_tokens, check_cancelled)
    return Evaluation(report, outputs)


def _session_peak(onnx_path: Path, threads: int, layout: LMLayout | None, cfg: EvaluateConfig,
                  prompt_tokens: int, check_cancelled: Callable[[], None] = _never) -> int | None:
    """The session's peak memory (load + one prefill + decode), measured in a fresh process."""
    from worker.lm.memory import session_peak_bytes

    return session_peak_bytes(onnx_path, threads, layout.to_meta() if layout else None, prompt_tokens,
                              cfg.generation.max_new_tokens, check_cancelled)


# ----------------------------------------------------------------------------------------------------------
# torch side (after a training step)


def torch_perplexity(model: WorkingModel, data: ArrayDataset, batch_size: int = MAX_EVAL_BATCH,
                     check_cancelled: Callable[[], None] = _never) -> dict[str, Any]:
    """Perplexity of a torch-form causal LM on ``data`` (same positions and shift as the ONNX harness)."""
    import torch

    from worker.torch_utils import module_device

    module = model.module
    device = module_device(module)
    was_training = module.training
    module.eval()
    nll, tokens = 0.0, 0
    vocab = getattr(module.config.get_text_config(), "vocab_size", None) if hasattr(module, "config") else None
    try:
        with torch.inference_mode():
            for ids, mask, labels in _batches(data, eval_batch_size(batch_size, data.inputs["input_ids"].shape[1],
                                                                    vocab)):
                check_cancelled()
                logits = module(input_ids=torch.from_numpy(ids).to(device),
                                attention_mask=torch.from_numpy(mask).to(device)).logits
                keep, targets = scored_positions(labels)
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[torch.from_numpy(keep).to(device)]
                tgt = torch.from_numpy(targets[keep]).to(device)
                nll -= float(lp.gather(1, tgt[:, None]).sum())
                tokens += int(tgt.numel())
    finally:
        module.train(was_training)
    ppl = perplexity_from(nll, tokens)
    return {"perplexity": ppl, "nll": nll / tokens if tokens else None, "tokens": tokens,
            "metric": {"name": "perplexity", "value": ppl, "higher_is_better": False}}
