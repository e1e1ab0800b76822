"""Hugging Face models: a zip or tar.gz of a transformers directory (config.json, *.safetensors, tokenizer).

Built from the config with the stock transformers classes; weights from safetensors only (sharded with an
index, or one file); never ``trust_remote_code``, never a pickle. A causal LM (an architecture in
transformers' causal-LM table) loads as ``AutoModelForCausalLM`` with task ``text-generation``, inputs
``input_ids``/``attention_mask`` and output ``logits``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.spec import HF_TASKS
from storage import archive
from worker.core import StepFailed, WorkingModel
from worker.formats.upload import extract_upload

if TYPE_CHECKING:
    import numpy as np

LIMITS = archive.HF_LIMITS  # the caps the API's inspection applied to the same upload
LM_INPUTS = ["input_ids", "attention_mask"]


def find_root(folder: Path) -> Path:
    """The folder holding config.json: ``folder`` itself or one level below."""
    if (folder / "config.json").is_file():
        return folder
    found = [p.parent for p in folder.glob("*/config.json") if p.is_file()]
    if len(found) != 1:
        raise StepFailed("invalid_model", "the hf archive must contain exactly one config.json")
    return found[0]


def extract(path: Path, workdir: Path) -> Path:
    """Safely extract an hf archive under ``workdir``; return the folder with config.json."""
    dest = extract_upload(path, workdir, LIMITS, prefix="hf-", code="invalid_model", what="hf archive")
    root = find_root(dest)
    if not any(root.glob("*.safetensors")):
        raise StepFailed(
            "invalid_model", "the hf archive has no *.safetensors weights (pickled weights are refused)"
        )
    return root


def is_causal_lm(config: Any) -> bool:
    """Whether the config names an architecture AutoModelForCausalLM builds (transformers' own table)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    return any(arch in known for arch in getattr(config, "architectures", None) or [])


def _task_of(config: Any, meta: dict[str, Any]) -> str:
    task = meta.get("task")
    if task in HF_TASKS:
        return str(task)
    if is_causal_lm(config):
        return "text-generation"
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
    return "feature-extraction"


def _auto_class(task: str) -> Any:
    import transformers

    return {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "image-classification": transformers.AutoModelForImageClassification,
        "feature-extraction": transformers.AutoModel,
        "text-generation": transformers.AutoModelForCausalLM,
    }[task]


def default_input_names(module: Any) -> list[str]:
    """Inputs of an hf model: pixel_values for vision; input_ids, attention_mask (+ token_type_ids) for text."""
    main = getattr(module, "main_input_name", "input_ids")
    if main != "input_ids":
        return [main]
    accepted = inspect.signature(module.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted:
        names.append("token_type_ids")
    return names


def load(path: Path, meta: dict[str, Any], workdir: Path) -> WorkingModel:
    """The hf archive at ``path`` as a torch-form WorkingModel (origin ``hf``, ``hf_dir`` = extracted folder)."""
    import transformers

    root = extract(path, Path(workdir))
    if "auto_map" in _raw_config(root):
        raise StepFailed("invalid_model", "config.json has 'auto_map' (custom model code), which is never run")
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise StepFailed(
            "invalid_model", f"config.json is not a supported transformers config: {exc}"
        ) from exc
    task = _task_of(config, meta)
    cls = _auto_class(task)
    try:
        module = cls.from_pretrained(
            root, config=config, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    except (ValueError, KeyError, OSError) as exc:
        raise StepFailed("invalid_model", f"cannot build {cls.__name__} from this archive: {exc}") from exc
    module.eval()
    if task == "text-generation":
        input_names, output_names = list(LM_INPUTS), ["logits"]
    else:
        input_names = list(meta.get("input_names") or default_input_names(module))
        output_names = list(
            meta.get("output_names") or (["last_hidden_state"] if task == "feature-extraction" else ["logits"])
        )
    return WorkingModel(
        form="torch",
        origin="hf",
        input_names=input_names,
        output_names=output_names,
        module=module,
        hf_dir=root,
        meta={
            **meta,
            "hf_task": task,
            "model_type": config.model_type,
            "architecture": type(module).__name__,
        },
    )


def _raw_config(root: Path) -> dict[str, Any]:
    import json

    try:
        raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StepFailed("invalid_model", f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise StepFailed("invalid_model", "config.json is not a JSON object")
    return raw


def label_index(names: list[str], model: WorkingModel) -> dict[str, int] | None:
    """The model config's label2id when it names every class in ``names`` (and isn't the LABEL_i default)."""
    config = getattr(model.module, "config", None)
    label2id = getattr(config, "label2id", None) or {}
    if not label2id or all(str(k).startswith("LABEL_") for k in label2id):
        return None
    if all(n in label2id for n in names):
        return {str(k): int(v) for k, v in label2id.items()}
    return None


def classes_by_id(index: dict[str, int]) -> list[str]:
    """Class names ordered by their id."""
    return [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]


def encode_labels(raw: list[Any], model: WorkingModel) -> tuple[np.ndarray, list[str]]:
    """Integer labels and class names: config label2id when it covers the names, ints as given, else sorted."""
    import numpy as np

    values = [str(v) for v in raw]
    if all(v.lstrip("-").isdigit() for v in values):
        ints = np.array([int(v) for v in values], dtype=np.int64)
        if ints.min(initial=0) < 0:
            raise StepFailed("dataset_mismatch", "integer labels must be >= 0")
        return ints, [str(i) for i in range(int(ints.max(initial=-1)) + 1)]
    index = label_index(sorted(set(values)), model)
    if index is None:
        index = {name: i for i, name in enumerate(sorted(set(values)))}
    return np.array([index[v] for v in values], dtype=np.int64), classes_by_id(index)
