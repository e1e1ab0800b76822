"""KV-cache export of a causal LM: torch.onnx (TorchScript, flat-past wrapper) against onnxruntime-genai's builder.

Random-init Llama models (grouped-query attention) of two sizes, each exported both ways by
``worker.lm.export`` (with its parity check: logits on random tokens, 32 greedy tokens), then timed on
ONNX Runtime CPU with one thread by ``worker.lm.session.LMSession``: prefill of a ``--prompt``-token
prompt at batch 1 (median of ``--runs``), decode tokens/s with the cache (``--new-tokens`` after that
prompt, median of 3), interleaved ``torch, genai, torch, genai`` over ``--rounds`` so load drift hits
both. ratio = genai / torch for decode tokens/s and torch / genai for prefill ms (> 1: genai is faster).
This is what ``method="auto"`` rests on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, log, machine_info

SIZES = {  # name: (layers, hidden, heads, kv heads)
    "tiny": (4, 64, 4, 2),
    "small": (8, 512, 8, 2),
}


def _model(folder: Path, layers: int, hidden: int, heads: int, kv: int) -> Any:
    from transformers import AutoModelForCausalLM

    from tests.factories_lm import tiny_lm_dir

    tiny_lm_dir(folder, layers=layers, hidden=hidden, heads=heads, kv_heads=kv, context=512)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def measure(size: str, prompt: int, new_tokens: int, runs: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """Export one size both ways and time both files."""
    from worker.lm.export import export_causal_lm
    from worker.lm.session import LMSession

    folder = tmp / size
    module = _model(folder, *SIZES[size])
    out: dict[str, Any] = {}
    sessions = {}
    for method in ("torch", "genai"):
        path = tmp / f"{size}-{method}" / "model.onnx"
        t0 = time.perf_counter()
        layout = export_causal_lm(module, path, hf_dir=folder, method=method)
        out[method] = {"export_s": time.perf_counter() - t0, "size_bytes": path.stat().st_size,
                       "max_abs_diff": layout.parity["max_abs_diff"],
                       "greedy_identical": layout.parity["greedy_identical"], "prefill_ms": [], "tokens_per_s": []}
        sessions[method] = LMSession(path, threads=1)
    for r in range(rounds):
        for method, sess in sessions.items():
            pre = sess.time_prefill(prompt, runs, warmup=3)
            dec = sess.time_decode(prompt, new_tokens, 3)
            out[method]["prefill_ms"].append(pre["median"])
            out[method]["tokens_per_s"].append(dec["tokens_per_s"])
            log(f"{size} round {r} {method}: prefill {pre['median']:.3f} ms, decode {dec['tokens_per_s']:.0f} tok/s")
    for m in out.values():
        m["prefill_ms"] = statistics.median(m["prefill_ms"])
        m["tokens_per_s"] = statistics.median(m["tokens_per_s"])
    out["prefill_ratio"] = out["torch"]["prefill_ms"] / out["genai"]["prefill_ms"]
    out["decode_ratio"] = out["genai"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.lm_export", description=__doc__)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    figures: dict[str, Any] = {"machine": machine_info(), "prompt": a.prompt, "new_tokens": a.new_tokens}
    parts = []
    with tempfile.TemporaryDirectory(prefix="mp-bench-lm-") as tmp:
        for size in a.sizes:
            m = measure(size, a.prompt, a.new_tokens, a.runs, a.rounds, Path(tmp))
            figures[size] = m
            parts.append(
                f"{size}: prefill {m['torch']['prefill_ms']:.3f} -> {m['genai']['prefill_ms']:.3f} ms "
                f"({m['prefill_ratio']:.2f}x), decode {m['torch']['tokens_per_s']:.0f} -> "
                f"{m['genai']['tokens_per_s']:.0f} tok/s ({m['decode_ratio']:.2f}x), "
                f"export {m['torch']['export_s']:.1f} vs {m['genai']['export_s']:.1f} s"
            )
    emit("lm_export", "torch.onnx -> genai builder: " + "; ".join(parts), figures)
    return figures


if __name__ == "__main__":
    main()
