"""The search's interleaved re-measure on causal LMs: timed through the KV-cache harness of worker.lm
(a prefill at batch 1, past inputs fed empty), never with classifier-style synthetic inputs (which made
GroupQueryAttention reject seqlens_k = -1 on Llama and Gather index 16 on GPT-2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.worker.lm.conftest import load_lm
from worker import search


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_remeasure_times_a_kv_cache_lm_with_the_lm_harness(
    kind: str, lm_dirs: Callable[[str], Path], tmp_path: Path
) -> None:
    from worker.lm.export import export_causal_lm

    folder = lm_dirs(kind)
    path = tmp_path / "model.onnx"
    export_causal_lm(load_lm(folder), path, hf_dir=folder, generate_tokens=4)  # the pipeline's own export
    got = search.remeasure({"input": path, "trial": path}, threads=1, batch_size=64, warmup=1, runs=6, rounds=3,
                           prompt_tokens=24)
    assert set(got) == {"input", "trial"}
    for v in got.values():
        assert 0 < v["min"] <= v["median"] < 5000 and len(v["round_medians"]) == 3
