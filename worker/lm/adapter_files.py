"""One base ONNX model and one adapter file per task that onnxruntime-genai's multi-LoRA API switches at run time.

``adapters: merge`` on a causal LM with ``adapter_files: true`` (docs/architecture.md, "Multi-task transfer by
adapters") keeps, beside the merged model, the unmerged base and each task's own adapter:

1. ``snapshot`` (before any merge touches the base): the base weights with the LoRA layers stripped, saved as a
   Hugging Face folder, and each task's peft adapter (``save_pretrained(selected_adapters=…)``).
2. ``build``: onnxruntime-genai's builder writes the base with one task's adapter (``adapter_path``): each LoRA
   target becomes ``MatMul(x, W) + MatMul(MatMul(x, A), B·scaling)``. Each ``A``/``B`` initializer then becomes a
   graph input of dynamic rank (``lora_r``) whose default is an empty ``[in, 0]`` / ``[0, out]`` tensor, so the
   model runs as the plain base when no adapter is active (Olive's ``ExtractAdapters`` makes the same form).
   Each task's weights are written as an ONNX Runtime adapter file (``onnxruntime.AdapterFormat``,
   ``<task>.onnx_adapter``) under those input names; the first task's, recomputed from its peft file, must
   equal what the builder wrote, which checks the name mapping.
3. ``check_switching``: one ``og.Model`` loaded once, every adapter loaded into one ``og.Adapters``, greedy
   tokens generated with each adapter active in turn (and none): what each task gives, and how long a switch
   takes against loading the base.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.core import StepFailed

# ``…layers.<i>.<anything>.<module>.lora_<A|B>.…``: peft's saved keys and the builder's initializer names alike
LORA_KEY = re.compile(r"layers\.(\d+)\.(?:.*\.)?([^.]+)\.lora_([AB])\.")
RANK_DIM = "lora_r"
ADAPTER_SUFFIX = ".onnx_adapter"
BASE_FOLDER, ADAPTERS_FOLDER = "base", "adapters"


@dataclass
class AdapterSet:
    """The genai folder (``model.onnx``, ``genai_config.json``, tokenizer) and each task's adapter file."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    lora_inputs: int = 0
    adapter_bytes: dict[str, int] = field(default_factory=dict)


def snapshot(peft_model: Any, tasks: list[str], dest: Path, hf_dir: Path | None) -> Path:
    """The base weights (LoRA stripped) as an hf folder under ``dest/base`` with ``hf_dir``'s tokenizer files,
    and each task's peft adapter under ``dest/adapters/<task>``; ``dest``."""
    base = peft_model.get_base_model()
    state = {k.replace(".base_layer.", "."): v.detach().cpu().clone() for k, v in base.state_dict().items()
             if ".lora_" not in k}
    plain = type(base)(base.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied head is re-tied by the config
        raise StepFailed("adapter_files_failed", f"base weights without LoRA did not load: missing {missing[:3]}, "
                                                 f"unexpected {unexpected[:3]}")
    (dest / BASE_FOLDER).mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest / BASE_FOLDER, safe_serialization=True)
    if hf_dir is not None:
        from worker.lm.export import copy_side_files

        copy_side_files(hf_dir, dest / BASE_FOLDER)
    for task in tasks:
        peft_model.save_pretrained(dest / ADAPTERS_FOLDER, selected_adapters=[task], safe_serialization=True)
    return dest


def _adapter_dir(snap: Path, task: str) -> Path:
    """peft saves a non-default adapter under a folder of its name."""
    nested = snap / ADAPTERS_FOLDER / task
    return nested if (nested / "adapter_config.json").exists() else snap / ADAPTERS_FOLDER


def _key(name: str) -> tuple[int, str, str] | None:
    m = LORA_KEY.search(name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def task_weights(adapter_dir: Path) -> dict[tuple[int, str, str], np.ndarray]:
    """One peft adapter's weights as the builder lays them out: ``A.T`` and ``(B·scaling).T`` by (layer, module,
    A|B)."""
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = int(config["r"]), float(config.get("lora_alpha") or config["r"])
    scaling = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    out: dict[tuple[int, str, str], np.ndarray] = {}
    for name, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        key = _key(name + ".")
        if key is None:
            continue
        value = value.astype(np.float32)
        out[key] = np.ascontiguousarray((value * scaling if key[2] == "B" else value).T)
    return out


def build(snap: Path, tasks: list[str], out: Path) -> AdapterSet:
    """The genai base with LoRA inputs under ``out`` and ``out/<task>.onnx_adapter`` for each task."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from transformers import AutoConfig

    from worker.lm.export import _dims, _fix_head_dim, _save, run_genai_builder
    from worker.lm.rope import compact_rope_caches

    out.mkdir(parents=True, exist_ok=True)
    try:  # the base with the first task's adapter: the builder writes its LoRA MatMuls
        run_genai_builder(snap / BASE_FOLDER, out, out / ".cache", (f"adapter_path={_adapter_dir(snap, tasks[0])}",))
    except Exception as exc:
        raise StepFailed("adapter_files_failed", f"onnxruntime-genai builder failed with the adapter: "
                                                 f"{type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(out / ".cache", ignore_errors=True)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stale = {out / d.value for t in proto.graph.initializer for d in t.external_data if d.key == "location"}
    onnx.load_external_data_for_model(proto, str(out))
    for f in stale:  # the builder's data file: _save below writes the model anew (one file under 2 GB)
        f.unlink()
    _fix_head_dim(proto, _dims(AutoConfig.from_pretrained(snap / BASE_FOLDER))[2])  # as genai_export does
    compact_rope_caches(proto)
    found = {i.name: _key(i.name) for i in proto.graph.initializer if ".lora_" in i.name}
    names = {n: k for n, k in found.items() if k is not None}
    if not names or len(names) < len(found):
        raise StepFailed("adapter_files_failed", f"the builder's LoRA weights are not named by layer and module: "
                                                 f"{sorted(set(found) - set(names))[:3]}")
    weights = {t: task_weights(_adapter_dir(snap, t)) for t in tasks}
    for task, values in weights.items():
        lacking = sorted(n for n, k in names.items() if k not in values)
        if lacking:
            raise StepFailed("adapter_files_failed", f"task {task!r}: its adapter has no weight for {lacking[0]} "
                                                     "(every task's adapter must target the same modules)")
    kept = list(proto.graph.initializer)
    del proto.graph.initializer[:]
    for init in kept:
        key = names.get(init.name)
        if key is None:
            proto.graph.initializer.append(init)
            continue
        written = numpy_helper.to_array(init)
        if not np.allclose(written, weights[tasks[0]][key], rtol=1e-5, atol=1e-6):
            raise StepFailed("adapter_files_failed", f"{init.name}: the builder's weight is not task "
                                                     f"{tasks[0]!r}'s adapter as laid out here")
        dims: list[int | str] = [written.shape[0], RANK_DIM] if key[2] == "A" else [RANK_DIM, written.shape[1]]
        empty = np.zeros((written.shape[0], 0) if key[2] == "A" else (0, written.shape[1]), np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(empty, init.name))  # the default: no adapter
        proto.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, dims))
    _save(proto, out / "model.onnx")
    result = AdapterSet(out, lora_inputs=len(names))
    for task in tasks:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(weights[task][k]) for n, k in names.items()})
        path = out / f"{task}{ADAPTER_SUFFIX}"
        fmt.export_adapter(str(path))
        result.files[task] = path
        result.adapter_bytes[task] = path.stat().st_size
    return result


def greedy(model: Any, prompt: list[int], steps: int, adapters: Any = None, name: str | None = None) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` from a loaded ``og.Model`` with adapter ``name`` active (or none)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while len(tokens) < steps and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def check_switching(adapter_set: AdapterSet, prompt: list[int], steps: int) -> dict[str, Any]:
    """Load the base once, every adapter into it, and generate with each task's adapter in turn, then the first
    again and none: each run's tokens and seconds, the base's load time, and whether a switch ever reloaded it."""
    import onnxruntime_genai as og

    started = time.perf_counter()
    model = og.Model(str(adapter_set.folder))
    load_s = time.perf_counter() - started
    adapters = og.Adapters(model)
    load_adapter_s: dict[str, float] = {}
    for task, path in adapter_set.files.items():
        t0 = time.perf_counter()
        adapters.load(str(path), task)
        load_adapter_s[task] = round(time.perf_counter() - t0, 4)
    order: list[str | None] = [*adapter_set.files, next(iter(adapter_set.files)), None]
    runs: list[dict[str, Any]] = []
    for name in order:
        t0 = time.perf_counter()
        tokens = greedy(model, prompt, steps, adapters, name)
        runs.append({"adapter": name, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 4)})
    return {"base_load_s": round(load_s, 4), "adapter_load_s": load_adapter_s, "runs": runs,
            "model_loads": 1}


def torch_greedy(peft_model: Any, prompt: list[int], steps: int, adapter: str | None) -> list[int]:
    """``steps`` greedy tokens from the peft model with ``adapter`` active (None: adapters disabled), recomputing
    the whole sequence each token (short checks only)."""
    import torch

    ids = torch.tensor([prompt], device=next(peft_model.parameters()).device)
    out: list[int] = []
    ctx = peft_model.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        peft_model.set_adapter(adapter)
    was_training = peft_model.training
    peft_model.eval()
    with ctx, torch.no_grad():
        for _ in range(steps):
            nxt = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    peft_model.train(was_training)
    return out


@dataclass
class Captured:
    """What ``capture`` kept before the merge: the snapshot folder, the check prompt and each adapter's tokens."""

    folder: Path
    tasks: list[str]
    prompt: list[int]
    expected: dict[str | None, list[int]]


def capture(peft_model: Any, tasks: list[str], dest: Path, hf_dir: Path | None, prompt: list[int],
            steps: int = 16) -> Captured:
    """Before the merge folds an adapter into the base: the snapshot, and what torch generates with each task's
    adapter (and none) after ``prompt``, for ``finish`` to compare with onnxruntime-genai."""
    snapshot(peft_model, tasks, dest, hf_dir)
    expected: dict[str | None, list[int]] = {t: torch_greedy(peft_model, prompt, steps, t) for t in tasks}
    expected[None] = torch_greedy(peft_model, prompt, steps, None)
    return Captured(dest, tasks, prompt, expected)


def finish(captured: Captured, out: Path) -> tuple[dict[str, Any], Path]:
    """Build the genai base and the adapter files, check that one loaded base switches between them and
    generates what torch did with each; the step's ``adapter_files`` metrics and ``adapters.zip``."""
    import zipfile

    steps = len(next(iter(captured.expected.values())))
    adapter_set = build(captured.folder, captured.tasks, out / "genai")
    switching = check_switching(adapter_set, captured.prompt, steps)
    runs = [{**run, "matches_torch": run["tokens"] == captured.expected[run["adapter"]]}
            for run in switching["runs"]]
    mismatched = [str(r["adapter"]) for r in runs if not r["matches_torch"]]
    if mismatched:
        raise StepFailed("adapter_files_failed", f"onnxruntime-genai with adapter(s) {', '.join(mismatched)} "
                                                 "generated other tokens than the torch model with the same adapter")
    archive = out / "adapters.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for f in sorted(adapter_set.folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(adapter_set.folder).as_posix())
    base_bytes = sum(f.stat().st_size for f in adapter_set.folder.iterdir()
                     if f.is_file() and f.suffix != ADAPTER_SUFFIX)
    metrics = {
        "artifact": "adapters.zip", "lora_inputs": adapter_set.lora_inputs, "base_bytes": base_bytes,
        "adapter_bytes": adapter_set.adapter_bytes, "zip_bytes": archive.stat().st_size,
        "base_load_s": switching["base_load_s"], "adapter_load_s": switching["adapter_load_s"],
        "model_loads": switching["model_loads"], "check_tokens": steps,
        "runs": [{"adapter": r["adapter"], "seconds": r["seconds"], "matches_torch": r["matches_torch"]}
                 for r in runs],
        "usage": "og.Model(folder); a = og.Adapters(model); a.load('<task>.onnx_adapter', '<task>'); "
                 "generator.set_active_adapter(a, '<task>')",
    }
    shutil.rmtree(captured.folder, ignore_errors=True)
    return metrics, archive
