"""An ONNX Runtime CPU session over a KV-cache causal LM (see ``worker.lm.export`` for the layout).

Full-sequence logits (empty past), greedy generation with the cache, prefill and decode timing. Any
``past_key_values.*`` input the caller does not feed gets an empty past ``[batch, kv_heads, 0, head_dim]``,
so a file another pass rewrote (quantized weights) runs as long as its cache inputs keep their names.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from worker.lm.layout import LMLayout
from worker.ort_guard import RunGuard

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(bfloat16)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _never() -> None:
    """The default cancel check."""


def _stats(times_ms: list[float]) -> dict[str, float]:
    times = sorted(times_ms)
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90)),
            "mean": statistics.fmean(times), "min": times[0]}


class LMSession:
    """Logits, greedy generation and timing over one ONNX causal LM file (CPU, ``threads`` intra-op);
    ``guard``: every run bounded and cancellable (worker/ort_guard.py, its cost counted per token)."""

    def __init__(self, onnx_path: Path, threads: int = 1, layout: LMLayout | None = None,
                 guard: RunGuard | None = None) -> None:
        from worker.evaluate import make_session

        self.guard = guard
        self.path = Path(onnx_path)
        self.session = make_session(self.path, threads)
        self.layout = layout or LMLayout.from_onnx(self.path)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_inputs = [n for n in self.inputs if n.startswith("past_key_values.")]
        # present.{i}.key -> past_key_values.{i}.key: what each output feeds at the next step
        self.present_to_past = {n: "past_key_values." + n[len("present."):] for n in self.output_names
                                if n.startswith("present.") and "past_key_values." + n[len("present."):] in self.inputs}

    # -- running ---------------------------------------------------------------------------------------

    def _past_dtype(self, name: str) -> Any:
        return _NP.get(self.inputs[name].type, np.float32)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """A zero-length past for every cache input."""
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return {n: np.zeros(shape, dtype=self._past_dtype(n)) for n in self.past_inputs}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            past: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: ``(logits, next past)``; ``attention_mask`` covers past + current tokens."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        feed.update(self.empty_past(len(input_ids)))
        if past:
            feed.update(past)
        if "position_ids" in self.inputs:
            pos = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
            feed["position_ids"] = np.ascontiguousarray(pos[:, -input_ids.shape[1]:], dtype=np.int64)
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        if self.guard is not None:
            outs = self.guard.run(self.session, self.output_names, feed, rows=int(input_ids.size))
        else:
            outs = self.session.run(self.output_names, feed)
        by_name = dict(zip(self.output_names, outs, strict=True))
        nxt = {self.present_to_past[n]: v for n, v in by_name.items() if n in self.present_to_past}
        return np.asarray(by_name["logits"]), nxt

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``[B, T, V]`` (float32) with an empty past."""
        logits, _ = self.run(input_ids, attention_mask)
        return np.asarray(logits, dtype=np.float32)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 check_cancelled: Callable[[], None] = _never) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (batch 1) with the KV cache; stops after an eos token."""
        eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        if not prompt_ids:
            raise ValueError("generate needs at least one prompt token")
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = self.run(ids, mask)
        out: list[int] = []
        for _ in range(max_new_tokens):
            check_cancelled()
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            if token in eos or len(out) == max_new_tokens:
                break
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            logits, past = self.run(np.asarray([[token]], dtype=np.int64), mask, past)
        return out

    # -- timing ----------------------------------------------------------------------------------------

    def _prompt(self, prompt_tokens: int) -> np.ndarray:
        """Random token ids (timing does not depend on which tokens), below the vocab size the file states."""
        dims = self.session.get_outputs()[0].shape
        vocab = dims[2] if len(dims) == 3 and isinstance(dims[2], int) else 256
        return np.random.default_rng(0).integers(0, vocab, (1, prompt_tokens), dtype=np.int64)

    def time_prefill(self, prompt_tokens: int, runs: int, warmup: int,
                     check_cancelled: Callable[[], None] = _never) -> dict[str, float]:
        """Milliseconds for one forward over a ``prompt_tokens`` prompt at batch 1 (median/p90/mean/min)."""
        ids = self._prompt(prompt_tokens)
        mask = np.ones_like(ids)
        for _ in range(warmup):
            check_cancelled()
            self.run(ids, mask)
        times = []
        for _ in range(max(1, runs)):
            check_cancelled()
            t0 = time.perf_counter()
            self.run(ids, mask)
            times.append((time.perf_counter() - t0) * 1000.0)
        return _stats(times)

    def time_decode(self, prompt_tokens: int, new_tokens: int, runs: int,
                    check_cancelled: Callable[[], None] = _never) -> dict[str, float]:
        """Decode speed after a ``prompt_tokens`` prefill: ``tokens_per_s`` and ``ms_per_token`` (medians
        over ``runs`` decodes of ``new_tokens`` tokens each, one token per step with the cache)."""
        ids = self._prompt(prompt_tokens)
        per_token: list[float] = []
        for r in range(max(1, runs) + 1):  # the first run warms up
            check_cancelled()
            logits, past = self.run(ids, np.ones_like(ids))
            total = ids.shape[1]
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                token = np.asarray([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
                total += 1
                logits, past = self.run(token, np.ones((1, total), dtype=np.int64), past)
            if r:
                per_token.append((time.perf_counter() - t0) * 1000.0 / new_tokens)
        ms = statistics.median(per_token)
        return {"tokens_per_s": 1000.0 / ms if ms > 0 else float("inf"), "ms_per_token": ms,
                "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "runs": len(per_token)}
