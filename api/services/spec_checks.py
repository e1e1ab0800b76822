"""Submit-time checks a JobSpec cannot make on its own: ids exist for the owner, data fits the model.

Text jobs on hf models: the tokenizer is present and no larger than the model's vocabulary. Causal LMs
(task ``text-generation``, or ``generic`` on an upload inspected as one): text datasets only, chat rows
need a chat template, ``evaluate.choices`` and choice rows go together, a perplexity budget needs eval
data, distillation teachers and students share the input model's tokenizer, lengths fit the context.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.errors import ProblemError
from api.services.convertibility import distill_model_errors, torch_step_errors
from api.services.lookup import find_owned
from api.services.task_checks import task_errors
from models.spec import CLASSIFICATION_TASKS, LM_TASKS, JobSpec, carve_refusal, carve_sizes
from models.tables import Dataset, Model

ROLES = ("train", "eval", "calibration")


def _raise(errors: list[dict[str, Any]]) -> None:
    if errors:
        first = errors[0]
        raise ProblemError(422, "validation_error", f"{first['field']}: {first['message']}", errors=errors)


def _fmt_shape(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _class_id(label: str) -> int | None:
    """A label that is a class index (``"3"``, ``"-1"``), else None (names, ``"²"``, ``"--1"`` are not)."""
    digits = label[1:] if label.startswith("-") else label
    return int(label) if digits.isdecimal() else None


def _npz_against_inputs(field: str, ds: Dataset, model_meta: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Errors where the npz arrays do not fit the ONNX model's inputs (names, rank, fixed dims, labels)."""
    errors: list[dict[str, Any]] = []
    meta = ds.meta or {}
    fields: dict[str, Any] = meta.get("fields") or {}
    arrays = ", ".join(sorted(fields)) or "none"
    for inp in model_meta.get("inputs") or []:
        name = inp["name"]
        if name not in fields:
            errors.append({"field": field, "message": f"dataset {ds.id} has no array {name!r} for the model "
                                                      f"input {name!r} (its arrays: {arrays})"})
            continue
        want: list[Any] = inp.get("shape") or []
        have: list[Any] = fields[name].get("shape") or []
        if not want:
            continue  # rank unknown in the graph
        mismatch = len(want) != len(have) or any(
            isinstance(w, int) and w > 0 and w != h for w, h in zip(want[1:], have[1:], strict=False)
        )
        if mismatch:
            errors.append({"field": field, "message": f"array {name!r} has shape {_fmt_shape(have)} but the model "
                                                      f"input {name!r} needs {_fmt_shape(want)}"})
    if "labels" in fields:
        n_labels = (fields["labels"].get("shape") or [0])[0]
        if n_labels != meta.get("num_samples"):
            errors.append({"field": field, "message": f"array 'labels' has {n_labels} entries but the dataset has "
                                                      f"{meta.get('num_samples')} samples"})
        outputs = model_meta.get("outputs") or []
        classes = meta.get("classes") or []
        ids = [_class_id(c) for c in classes]
        if task in CLASSIFICATION_TASKS and outputs and ids and all(i is not None for i in ids):
            shape = outputs[0].get("shape") or []
            if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
                top = max(i for i in ids if i is not None)
                if top >= shape[1]:
                    errors.append({"field": field, "message": f"array 'labels' holds class {top} but the model "
                                                              f"output {outputs[0]['name']!r} has {shape[1]} classes"})
    return errors


def _carve_check(spec: JobSpec, eval_ds: Dataset | None) -> list[dict[str, Any]]:
    """A job that calibrates on rows carved from data.eval (no calibration or train data): enough eval rows to split."""
    if eval_ds is None or not spec.carves_calibration():
        return []
    rows = (eval_ds.meta or {}).get("num_samples")
    if not isinstance(rows, int) or carve_sizes(spec, rows) is not None:
        return []
    return [{"field": "data.calibration", "message": carve_refusal(spec, rows)}]


# Models whose position ids start after the padding index (HF's create_position_ids_from_input_ids).
_PADDED_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "ibert", "mpnet"})


def _budget_and_limits(spec: JobSpec, model: Model) -> list[dict[str, Any]]:
    """Settings the worker could only fail on after running: an accuracy budget with nothing to measure
    it on, a text length past the positions the model has."""
    errors: list[dict[str, Any]] = []
    last = max((i for i, s in enumerate(spec.steps) if getattr(s, "tasks", None)), default=None)
    if spec.evaluate.max_accuracy_drop is not None and last is not None and spec.task not in LM_TASKS:
        for j, t in enumerate(getattr(spec.steps[last], "tasks", None) or []):  # the budget holds on every task
            if t.data.eval is None:
                errors.append({"field": f"steps.{last}.tasks.{j}.data.eval",
                               "message": f"task {t.name!r}: the accuracy budget holds on every task, measured on "
                                          "its own eval rows, which are not given"})
    elif spec.evaluate.max_accuracy_drop is not None and spec.data.eval is None:
        errors.append({"field": "evaluate.max_accuracy_drop",
                       "message": "an accuracy budget needs data.eval to measure the accuracy on"})
    config = (model.meta or {}).get("config") or {}
    key, positions = _positions(config)
    if model.format == "hf" and spec.task != "image-classification" and positions is not None:
        if str(config.get("model_type", "")).lower() in _PADDED_POSITIONS:
            positions -= 2
        if spec.text.max_length > positions:
            errors.append({"field": "text.max_length",
                           "message": f"{spec.text.max_length} is more than the {positions} positions the model "
                                      f"has ({key}); use at most {positions}"})
    return errors


# Where configs keep their number of positions (BERT/Llama: max_position_embeddings; GPT-2: n_positions).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _positions(config: dict[str, Any]) -> tuple[str, int | None]:
    for key in _POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return "", None


def is_causal_lm(model: Model) -> bool:
    """Whether the upload was inspected as a causal LM (an hf archive of a ``*ForCausalLM`` architecture)."""
    return model.format == "hf" and (model.meta or {}).get("task") in LM_TASKS


def effective_task(spec: JobSpec, model: Model) -> str:
    """The spec's task, where ``generic`` on a causal LM means ``text-generation`` (as the worker loads it)."""
    if spec.task == "generic" and is_causal_lm(model):
        return "text-generation"
    return spec.task


def _tokenizer_of(model: Model) -> dict[str, Any] | None:
    """The upload's tokenizer summary, None when it has none; ``{}`` when an older record cannot tell."""
    meta = model.meta or {}
    if "tokenizer" in meta:
        found = meta["tokenizer"]
        return found if isinstance(found, dict) else None
    return None if meta.get("has_tokenizer") is False else {}


def _tokenizer_checks(model: Model) -> list[dict[str, Any]]:
    """A text job's tokenizer: present, and no larger than the embedding table of the model."""
    tokenizer = _tokenizer_of(model)
    if tokenizer is None:
        return [{"field": "model", "message": f"tokenizer check: model {model.id} has no tokenizer (tokenizer.json, "
                                              "vocab.txt, ...) to turn text into token ids; add it to the archive"}]
    vocab = ((model.meta or {}).get("config") or {}).get("vocab_size")
    size = tokenizer.get("vocab_size")
    if isinstance(vocab, int) and isinstance(size, int) and size > vocab:
        return [{"field": "model", "message": f"tokenizer vocabulary check: model {model.id}'s tokenizer has {size} "
                                              f"tokens but its config's vocab_size is {vocab}; ids from {vocab} up "
                                              "have no embedding"}]
    return []


def _same_tokenizer(field: str, other: Model, model: Model) -> list[dict[str, Any]]:
    """A teacher or student upload must be a causal LM with the input model's tokenizer."""
    if not is_causal_lm(other):
        return [{"field": field, "message": f"model {other.id} is not a causal LM (an hf *ForCausalLM archive); "
                                            f"it cannot distill with causal LM {model.id}"}]
    mine, theirs = _tokenizer_of(model) or {}, _tokenizer_of(other) or {}
    if mine.get("sha256") and mine.get("sha256") != theirs.get("sha256"):
        return [{"field": field, "message": f"model {other.id} has another tokenizer than model {model.id} "
                                            "(tokenizer fingerprints differ): distillation compares their "
                                            "predictions token by token, so both need the same tokenizer"}]
    return []


def _lm_checks(spec: JobSpec, model: Model, datasets: dict[str, Dataset],
               others: list[tuple[str, Model]]) -> list[dict[str, Any]]:
    """A text-generation job: an hf causal LM, text datasets of shapes it can use, settings that fit it."""
    errors: list[dict[str, Any]] = []
    if not is_causal_lm(model):
        kind = f"an hf {(model.meta or {}).get('task')!r} model" if model.format == "hf" else f"an {model.format} model"
        return [{"field": "task", "message": f"task 'text-generation' needs an hf causal LM (a *ForCausalLM "
                                             f"archive); model {model.id} is {kind}"}]
    for role, ds in datasets.items():
        if ds.format != "text":
            errors.append({"field": f"data.{role}", "message": f"dataset {ds.id} is {ds.format}; a causal LM takes "
                                                               "text datasets (JSONL rows)"})
        elif (ds.meta or {}).get("row_shape") == "messages" and not (model.meta or {}).get("chat_template"):
            errors.append({"field": f"data.{role}", "message": f"dataset {ds.id} holds chat rows (messages) but model "
                                                               f"{model.id} has no chat template to render them"})
    shape = {role: (ds.meta or {}).get("row_shape") for role, ds in datasets.items() if ds.format == "text"}
    choices = spec.evaluate.choices
    if choices is not None:
        if "eval" not in datasets:
            errors.append({"field": "evaluate.choices", "message": "choices are scored on data.eval, which is not given"})
        elif shape.get("eval") != "choice":
            errors.append({"field": "evaluate.choices", "message": f"choices score eval rows of shape choice "
                                                                   f"({{\"text\", \"label\"}}); dataset "
                                                                   f"{datasets['eval'].id} holds "
                                                                   f"{shape.get('eval')} rows"})
        else:
            missing = [c for c in (datasets["eval"].meta or {}).get("classes") or [] if c not in choices]
            if missing:
                errors.append({"field": "evaluate.choices", "message": f"eval label {missing[0]!r} is not one of "
                                                                       f"the choices {choices}"})
        if spec.evaluate.few_shot and "train" in datasets and shape.get("train") != "choice":
            errors.append({"field": "evaluate.few_shot", "message": f"few-shot examples come from data.train, which "
                                                                    f"holds {shape.get('train')} rows, not choice rows"})
    elif shape.get("eval") == "choice":
        errors.append({"field": "data.eval", "message": f"dataset {datasets['eval'].id} holds choice rows "
                                                        "({\"text\", \"label\"}), scored against evaluate.choices, "
                                                        "which is not given"})
    for field, other in others:
        errors.extend(_same_tokenizer(field, other, model))
    context = _positions((model.meta or {}).get("config") or {})[1]
    gen = spec.evaluate.generation
    if context is not None and gen.prompt_tokens + gen.max_new_tokens > context:
        errors.append({"field": "evaluate.generation.prompt_tokens",
                       "message": f"prompt_tokens + max_new_tokens = {gen.prompt_tokens + gen.max_new_tokens} is more "
                                  f"than the {context} positions model {model.id} has"})
    return errors


def _text_checks(spec: JobSpec, model: Model, datasets: dict[str, Dataset],
                 others: list[tuple[str, Model]]) -> list[dict[str, Any]]:
    """Checks of text jobs on hf models: the tokenizer, the causal-LM rules, the perplexity budget."""
    errors: list[dict[str, Any]] = []
    task = effective_task(spec, model)
    lm = task in LM_TASKS
    if is_causal_lm(model) and not lm:
        errors.append({"field": "task", "message": f"model {model.id} is a causal LM (task 'text-generation'); "
                                                   f"task {spec.task!r} does not fit it"})
    uses_text = lm or any(ds.format == "text" for ds in datasets.values())
    if model.format == "hf" and task != "image-classification" and uses_text:
        errors.extend(_tokenizer_checks(model))
    if lm:
        errors.extend(_lm_checks(spec, model, datasets, others))
    else:
        if spec.evaluate.choices is not None:
            errors.append({"field": "evaluate.choices", "message": "choices score a causal LM's log-likelihoods; they "
                                                                   "apply to task 'text-generation' only"})
    if spec.evaluate.max_perplexity_increase is not None:
        if not lm:
            errors.append({"field": "evaluate.max_perplexity_increase",
                           "message": "a perplexity budget applies to task 'text-generation' (a causal LM) only"})
        elif spec.data.eval is None:
            errors.append({"field": "evaluate.max_perplexity_increase",
                           "message": "a perplexity budget needs data.eval to measure the perplexity on"})
    return errors


def check_references(session: Session, owner: str, spec: JobSpec) -> Model:
    """The spec's input model after checking every referenced id and the data's fit; else 422 naming fields."""
    errors: list[dict[str, Any]] = []

    def model_exists(model_id: str, field: str) -> Model | None:
        row = find_owned(session, Model, owner, model_id)
        if row is None:
            errors.append({"field": field, "message": f"unknown model {model_id!r}"})
            return None
        return row

    model = model_exists(spec.model, "model")
    others: list[tuple[str, Model]] = []  # models the steps refer to (distillation teachers and students)
    datasets: dict[str, Dataset] = {}
    for role in ROLES:
        ds_id = getattr(spec.data, role)
        if ds_id is None:
            continue
        ds = find_owned(session, Dataset, owner, ds_id)
        if ds is None:
            errors.append({"field": f"data.{role}", "message": f"unknown dataset {ds_id!r}"})
        else:
            datasets[role] = ds
    for i, step in enumerate(spec.steps):
        for ref in step.model_refs():
            field = f"steps.{i}.{ref.field}"
            if (row := model_exists(ref.model_id, field)) is not None:
                others.append((field, row))
    errors.extend(task_errors(session, owner, spec, model, spec.task if model is None else effective_task(spec, model)))
    _raise(errors)
    assert model is not None
    if model.format == "onnx":
        for role, ds in datasets.items():
            if ds.format == "npz":
                errors.extend(_npz_against_inputs(f"data.{role}", ds, model.meta or {}, spec.task))
        errors.extend(torch_step_errors(spec, model.meta or {}))
    errors.extend(_budget_and_limits(spec, model))
    errors.extend(_carve_check(spec, datasets.get("eval")))
    errors.extend(_text_checks(spec, model, datasets, others))
    errors.extend(distill_model_errors(session, owner, spec))
    _raise(errors)
    return model
