"""bench.zoo_llama_cpp: the llama.cpp rows score a row exactly as ``bench.llm_pipeline.perplexity`` scores it for
our ONNX files (every next token after the first, float64 log-softmax), so their perplexities compare."""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.llm_pipeline import perplexity
from bench.zoo_llama_cpp import row_nll


class _TorchLM:
    """A real (tiny, random) Llama behind the ``logits(ids, mask)`` call ``perplexity`` makes on a session."""

    def __init__(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        self.model = LlamaForCausalLM(config).eval()

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def test_row_nll_gives_the_onnx_protocols_perplexity() -> None:
    lm = _TorchLM()
    rows = np.random.default_rng(0).integers(0, 96, (3, 10)).astype(np.int64)
    ours = perplexity(lm, rows, batch=2)
    nll = sum(row_nll(lm.logits(r[None], np.ones((1, len(r)), np.int64))[0], r) for r in rows)
    assert math.isclose(math.exp(nll / (rows.shape[0] * (rows.shape[1] - 1))), ours, rel_tol=1e-9)
    # one prediction fewer per row (scoring from the 3rd token on) is another protocol: the check tells them apart
    shifted = sum(row_nll(lm.logits(r[None], np.ones((1, len(r)), np.int64))[0][1:], r[1:]) for r in rows)
    assert not math.isclose(math.exp(shifted / (rows.shape[0] * (rows.shape[1] - 2))), ours, rel_tol=1e-6)
