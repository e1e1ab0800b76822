"""Tiny causal LMs shared by the worker.lm tests (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.factories_lm import tiny_lm_dir


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models on shared cores: torch's default thread pool makes each matmul ~15x slower here."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``lm_dirs("llama")`` / ``lm_dirs("gpt2")``: a tiny hf causal LM folder with its tokenizer."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = tiny_lm_dir(tmp_path_factory.mktemp(f"lm-{kind}"), kind=kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def llama_dir(lm_dirs: Callable[[str], Path]) -> Path:
    return lm_dirs("llama")


@pytest.fixture(scope="session")
def tokenizer(llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def load_lm(folder: Path) -> Any:
    """The folder's AutoModelForCausalLM in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="session")
def llama_onnx(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny Llama exported with torch.onnx (path, layout)."""
    from worker.lm.export import export_causal_lm

    path = tmp_path_factory.mktemp("llama-onnx") / "model.onnx"
    layout = export_causal_lm(load_lm(llama_dir), path, method="torch", generate_tokens=8)
    return path, layout
