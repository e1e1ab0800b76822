"""Per-task adapter files for onnxruntime-genai's multi-LoRA: one base ONNX loaded once switches between the
tasks' adapters at run time and generates, with each, what torch generates with the same peft adapter; with no
adapter active it is the plain base. Through the finetune pass (``adapters: merge``, ``adapter_files: true``) the
step delivers ``adapters.zip`` beside the merged model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.spec import JobSpec
from tests import factories_train as f
from tests.factories_lm import licence_paragraphs, tiny_lm_archive, tiny_lm_dir
from worker.context import LocalContext
from worker.lm import adapter_files
from worker.passes.finetune import FinetunePass

PROMPT = [1, 5, 9, 22, 31, 7]


def _two_adapters(tmp_path: Path) -> tuple[Any, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = tiny_lm_dir(tmp_path / "hf")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf), config, adapter_name="gpl")
    peft_model.add_adapter("mit", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            p.data.normal_(0, 0.3)  # trained-like adapters, far apart (B is zero at init)
    return peft_model, hf


def test_one_base_switches_between_task_adapters_and_matches_torch(tmp_path: Path) -> None:
    peft_model, hf = _two_adapters(tmp_path)
    captured = adapter_files.capture(peft_model, ["gpl", "mit"], tmp_path / "snap", hf, PROMPT, steps=12)
    assert len({tuple(v) for v in captured.expected.values()}) == 3  # each adapter and the base generate differently
    metrics, archive = adapter_files.finish(captured, tmp_path / "out")
    assert metrics["model_loads"] == 1 and metrics["lora_inputs"] == 4 * 3 * 2  # 4 layers x 3 modules x A, B
    assert [r["adapter"] for r in metrics["runs"]] == ["gpl", "mit", "gpl", None]
    assert all(r["matches_torch"] for r in metrics["runs"])
    assert not (tmp_path / "snap").exists()  # the snapshot is gone once the files are built
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"model.onnx", "genai_config.json", "gpl.onnx_adapter", "mit.onnx_adapter"} <= names
    assert not [n for n in names if n.endswith(".data")]  # the builder's external data left no stale copy
    # each adapter file is small beside the base, and the base holds no task's weights: empty LoRA defaults
    folder = tmp_path / "out" / "genai"
    assert metrics["adapter_bytes"]["gpl"] < metrics["base_bytes"] / 5
    proto = onnx.load(str(folder / "model.onnx"))
    lora = [i for i in proto.graph.initializer if ".lora_" in i.name]
    assert len(lora) == 24 and all(0 in i.dims for i in lora)
    assert not [i.name for i in proto.graph.initializer if i.name in ("cos_cache", "sin_cache")]  # computed at load
    assert {i.name for i in proto.graph.input} >= {i.name for i in lora}

    # plain ONNX Runtime too: the adapter fed through RunOptions gives torch's logits with that adapter
    options = ort.SessionOptions()
    options.log_severity_level = 3  # each LoRA input with a default warns that it is not a constant: as meant
    sess = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds: dict[str, Any] = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, 6), np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros((1, 2, 0, 16), np.float32)  # tiny_lm_dir: 2 kv heads of 16
    for name in ("gpl", "mit"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(folder / f"{name}.onnx_adapter"))
        run = ort.RunOptions()
        run.add_active_adapter(adapter)
        logits = sess.run(["logits"], feeds, run_options=run)[0]
        peft_model.set_adapter(name)
        with torch.no_grad():
            want = peft_model(input_ids=torch.tensor([PROMPT])).logits.numpy()
        assert np.abs(logits - want).max() < 1e-4, name


def test_adapters_that_target_other_modules_are_refused(tmp_path: Path) -> None:
    from peft import LoraConfig

    peft_model, hf = _two_adapters(tmp_path)
    peft_model.add_adapter("bsd", LoraConfig(r=4, target_modules=["q_proj"]))
    snap = adapter_files.snapshot(peft_model, ["gpl", "bsd"], tmp_path / "snap", hf)
    with pytest.raises(adapter_files.StepFailed, match=r"task 'bsd': its adapter has no weight for .*v_proj"):
        adapter_files.build(snap, ["gpl", "bsd"], tmp_path / "out")


def test_the_merge_step_delivers_adapters_zip(tmp_path: Path) -> None:
    gpl, apache = licence_paragraphs(("GPL-3",)), licence_paragraphs(("Apache-2.0",))
    files: dict[str, tuple[Path, str, dict[str, Any]]] = {
        "g": (f.write_jsonl(tmp_path / "g.jsonl", [{"text": p} for p in gpl[:12]]), "text", {}),
        "a": (f.write_jsonl(tmp_path / "a.jsonl", [{"text": p} for p in apache[:12]]), "text", {}),
    }
    spec = JobSpec.model_validate({
        "model": "lm", "task": "text-generation", "text": {"max_length": 32},
        "steps": [{"type": "finetune", "mode": "lora", "epochs": 1, "batch_size": 8, "lr": 1e-2,
                   "tasks": [{"name": "gpl", "data": {"train": "g"}}, {"name": "apache", "data": {"train": "a"}}],
                   "adapters": "merge", "merge": {"methods": ["linear"]}, "adapter_files": True}],
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"lm": (tiny_lm_archive(tmp_path), "hf", {})}, datasets=files,
                       device="cpu")
    result = FinetunePass().run(ctx.load_model("input"), spec.steps[0], ctx)  # type: ignore[arg-type]
    shown = result.metrics["multitask"]["merge"]["adapter_files"]
    assert set(result.files) == {"adapters.zip"} and result.files["adapters.zip"].is_file()
    assert shown["model_loads"] == 1 and all(r["matches_torch"] for r in shown["runs"])
    assert set(shown["adapter_bytes"]) == {"gpl", "apache"}
    with zipfile.ZipFile(result.files["adapters.zip"]) as zf:
        assert json.loads(zf.read("genai_config.json"))["model"]["decoder"]["filename"] == "model.onnx"
    assert not any("lora" in k for k in result.model.module.state_dict())  # the merged model goes on as before


@pytest.mark.parametrize(("patch", "message"), [
    ({"task": "text-classification"}, "adapter_files: per-task adapter files are for causal LMs"),
    ({"adapters": None}, "adapter_files: applies with adapters 'merge' only"),
    ({"tasks": [{"name": "a", "data": {"train": "t"}}, {"name": "y", "data": {"train": "u"}}]},
     r"tasks.0.name: task 'a' cannot name a LoRA adapter"),
])
def test_adapter_files_is_refused_where_it_cannot_apply(patch: dict[str, Any], message: str) -> None:
    step: dict[str, Any] = {"type": "finetune", "mode": "lora", "adapters": "merge", "adapter_files": True,
                            "tasks": [{"name": "x", "data": {"train": "t"}}, {"name": "y", "data": {"train": "u"}}]}
    spec: dict[str, Any] = {"model": "m", "task": "text-generation", "steps": [step]}
    if "task" in patch:
        spec["task"] = patch["task"]
    else:
        step.update(patch)
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate(spec)
