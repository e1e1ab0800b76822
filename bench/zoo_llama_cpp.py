"""llama.cpp as a peer, run in an interpreter that has llama-cpp-python: quantize an F32 GGUF to a type and
measure it (``python -m bench.zoo_llama_cpp SRC DST FTYPE ROWS.npy THREADS`` prints one JSON line).

Imports nothing from this project (the interpreter may be a separate virtualenv)."""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time

import numpy as np


def main() -> None:
    """Quantize (unless done), then perplexity over the rows and decode tokens/s; one JSON line."""
    import llama_cpp

    src, dst, ftype, rows_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    if not os.path.exists(dst):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize failed for ftype {ftype}")
    rows = np.load(rows_file)
    llm = llama_cpp.Llama(dst, n_ctx=int(rows.shape[1]) + 8, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False, n_batch=int(rows.shape[1]))
    nll, count = 0.0, 0
    for row in rows:
        llm.reset()
        llm.eval(row.tolist())
        logits = np.asarray(llm.scores[: len(row)], dtype=np.float64)[:-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, row[1:, None], -1).sum())
        count += len(row) - 1
    prompt = rows[0][:64].tolist()
    best = 0.0
    for _ in range(3):
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(64):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        best = max(best, 64 / (time.perf_counter() - t0))
    print(json.dumps({"size_mb": os.path.getsize(dst) / 1e6, "perplexity": math.exp(nll / count),
                      "decode_tok_s": best}))


if __name__ == "__main__":
    main()
