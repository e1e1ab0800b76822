"""Submit-time spec checks: every id exists for the owner, and npz data fits the ONNX model it is used with.

Each check is driven through ``POST /v1/jobs`` and judged by its problem+json body (``code``,
``errors[].field``, ``detail``); a refused spec creates no job.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.services.spec_checks import check_references
from models.db import session_scope
from models.spec import JobSpec
from models.tables import Job, Model
from tests.api import builders

X_4 = {"x": {"dtype": "float32", "shape": [8, 4]}}
LABELS_8 = {"labels": {"dtype": "int64", "shape": [8]}}


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Accepted jobs are recorded instead of sent to the broker."""
    import worker.celery_app

    calls: list[str] = []
    monkeypatch.setattr(worker.celery_app, "enqueue_job", lambda job_id, queue: calls.append(job_id))
    return calls


def _jobs() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def _refused(client: TestClient, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """POST the spec, assert a 422 validation problem that names its first field and made no job; its ``errors``."""
    before = _jobs()
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == "validation_error" and problem["status"] == 422
    first = problem["errors"][0]
    assert problem["detail"] == f"{first['field']}: {first['message']}"
    assert _jobs() == before
    errors: list[dict[str, Any]] = problem["errors"]
    return errors


def _accepted(client: TestClient, spec: dict[str, Any]) -> None:
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text


def _ds(fields: dict[str, Any], classes: list[str] | None = None, owner: str = "local", fmt: str = "npz") -> str:
    return builders.insert_dataset(owner=owner, format=fmt,
                                   meta={"num_samples": 8, "fields": fields, "classes": classes})


def _distill(**step: Any) -> list[dict[str, Any]]:
    return [{"type": "distill", **step}]


# --- ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"model": "mdl_missing"}, "model", "unknown model 'mdl_missing'"),
        ({"data": {"eval": "ds_missing"}}, "data.eval", "unknown dataset 'ds_missing'"),
        ({"data": {"calibration": "ds_missing"}}, "data.calibration", "unknown dataset 'ds_missing'"),
        ({"data": {"train": "ds_missing"}, "steps": _distill()}, "data.train", "unknown dataset 'ds_missing'"),
        ({"steps": _distill(teacher="mdl_t")}, "steps.0.teacher", "unknown model 'mdl_t'"),
        ({"steps": _distill(student={"model": "mdl_s"})}, "steps.0.student.model", "unknown model 'mdl_s'"),
    ],
)
def test_an_unknown_id_is_422_naming_its_field(
    client: TestClient, spec: dict[str, Any], field: str, message: str
) -> None:
    body = {"model": builders.insert_model(), "data": {"train": _ds(X_4)}, **spec}
    assert _refused(client, body) == [{"field": field, "message": message}]


def test_another_owners_ids_read_exactly_like_unknown_ones(client: TestClient) -> None:
    theirs_model = builders.insert_model(owner="someone-else")
    theirs_ds = _ds(X_4, owner="someone-else")
    mine = builders.insert_model()
    errors = _refused(client, {"model": theirs_model, "data": {"train": theirs_ds, "eval": theirs_ds},
                               "steps": _distill(teacher=theirs_model, student={"model": theirs_model})})
    assert errors == [
        {"field": "model", "message": f"unknown model {theirs_model!r}"},
        {"field": "data.train", "message": f"unknown dataset {theirs_ds!r}"},
        {"field": "data.eval", "message": f"unknown dataset {theirs_ds!r}"},
        {"field": "steps.0.teacher", "message": f"unknown model {theirs_model!r}"},
        {"field": "steps.0.student.model", "message": f"unknown model {theirs_model!r}"},
    ]
    # Their teacher is refused even when the job's own model is mine.
    errors = _refused(client, {"model": mine, "data": {"train": _ds(X_4)}, "steps": _distill(teacher=theirs_model)})
    assert errors == [{"field": "steps.0.teacher", "message": f"unknown model {theirs_model!r}"}]


def test_teacher_input_and_current_and_layer_students_need_no_ids(client: TestClient) -> None:
    model, train = builders.insert_model(), _ds(X_4)
    for teacher in ("input", "current"):
        _accepted(client, {"model": model, "data": {"train": train},
                           "steps": _distill(teacher=teacher, student={"layers": 2})})
    teacher = builders.insert_model()
    _accepted(client, {"model": model, "data": {"train": train},
                       "steps": _distill(teacher=teacher, student={"model": teacher})})


def test_id_errors_are_reported_before_the_data_is_checked_against_the_model(client: TestClient) -> None:
    wrong_arrays = _ds({"pixels": {"dtype": "float32", "shape": [8, 4]}})
    errors = _refused(client, {"model": builders.insert_model(),
                               "data": {"train": wrong_arrays, "eval": "ds_missing"}, "steps": _distill()})
    assert errors == [{"field": "data.eval", "message": "unknown dataset 'ds_missing'"}]


def test_check_references_returns_the_input_model(pg_env: str) -> None:
    model_id = builders.insert_model()
    with session_scope() as s:
        spec = JobSpec.model_validate({"model": model_id, "data": {"eval": _ds(X_4)}})
        assert check_references(s, "local", spec).id == model_id


# --- steps that need training data (JobSpec's own checks, answered the same way) ----------------------


@pytest.mark.parametrize("step", ["finetune", "distill"])
def test_a_training_step_without_train_data_is_422(client: TestClient, step: str) -> None:
    spec = {"model": builders.insert_model(), "data": {"eval": _ds(X_4)},
            "steps": [{"type": step}]}
    errors = _refused(client, spec)
    assert errors == [{"field": "steps.0", "message": f"a '{step}' step needs data.train"}]


def test_a_training_step_after_quantize_is_422(client: TestClient) -> None:
    spec = {"model": builders.insert_model(), "data": {"train": _ds(X_4)},
            "steps": [{"type": "quantize"}, {"type": "finetune"}]}
    errors = _refused(client, spec)
    assert errors[0]["field"] == "steps.1" and "cannot follow 'quantize'" in errors[0]["message"]


# --- npz arrays against the ONNX model's inputs --------------------------------------------------------


def test_a_missing_input_array_names_the_role_and_the_arrays_it_has(client: TestClient) -> None:
    ds = _ds({"pixels": {"dtype": "float32", "shape": [8, 4]}, "extra": {"dtype": "int64", "shape": [8]}})
    errors = _refused(client, {"model": builders.insert_model(), "data": {"calibration": ds}})
    assert errors == [{"field": "data.calibration", "message": f"dataset {ds} has no array 'x' for the model input "
                                                               "'x' (its arrays: extra, pixels)"}]


@pytest.mark.parametrize(
    ("have", "want"),
    [([8, 5], "[batch, 4]"), ([8, 4, 1], "[batch, 4]"), ([8], "[batch, 4]")],
)
def test_an_array_of_the_wrong_shape_is_422(client: TestClient, have: list[int], want: str) -> None:
    ds = _ds({"x": {"dtype": "float32", "shape": have}})
    errors = _refused(client, {"model": builders.insert_model(), "data": {"eval": ds}})
    shown = "[" + ", ".join(map(str, have)) + "]"
    assert errors == [{"field": "data.eval", "message": f"array 'x' has shape {shown} but the model input 'x' "
                                                        f"needs {want}"}]


def test_dynamic_dims_the_batch_axis_and_an_unknown_rank_fit_anything(client: TestClient) -> None:
    dynamic = builders.insert_model(inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", "seq", 4]}])
    _accepted(client, {"model": dynamic, "data": {"eval": _ds({"x": {"dtype": "float32", "shape": [2, 77, 4]}})}})
    unknown_rank = builders.insert_model(inputs=[{"name": "x", "dtype": "float32", "shape": []}])
    _accepted(client, {"model": unknown_rank, "data": {"eval": _ds({"x": {"dtype": "float32", "shape": [8, 9]}})}})
    fixed_batch = builders.insert_model(inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}])
    _accepted(client, {"model": fixed_batch, "data": {"eval": _ds(X_4)}})


def test_every_role_and_every_input_is_checked(client: TestClient) -> None:
    model = builders.insert_model(inputs=[{"name": "a", "dtype": "float32", "shape": ["batch", 2]},
                                          {"name": "b", "dtype": "float32", "shape": ["batch", 3]}])
    fits = _ds({"a": {"dtype": "float32", "shape": [8, 2]}, "b": {"dtype": "float32", "shape": [8, 3]}})
    no_b = _ds({"a": {"dtype": "float32", "shape": [8, 2]}})
    bad_a = _ds({"a": {"dtype": "float32", "shape": [8, 7]}, "b": {"dtype": "float32", "shape": [8, 3]}})
    errors = _refused(client, {"model": model, "data": {"train": no_b, "eval": fits, "calibration": bad_a},
                               "steps": _distill()})
    assert [e["field"] for e in errors] == ["data.train", "data.calibration"]
    assert "no array 'b'" in errors[0]["message"] and "array 'a' has shape [8, 7]" in errors[1]["message"]


def test_only_npz_data_for_an_onnx_model_is_checked(client: TestClient) -> None:
    wrong_arrays = {"pixels": {"dtype": "float32", "shape": [8, 4]}}
    hf_model = builders.insert_model(format="hf")
    _accepted(client, {"model": hf_model, "data": {"eval": _ds(wrong_arrays)}})
    text = _ds({"text": {"dtype": "str"}, "label": {"dtype": "str"}}, fmt="text")
    _accepted(client, {"model": builders.insert_model(), "data": {"eval": text}})


# --- labels --------------------------------------------------------------------------------------------


def test_a_label_count_that_differs_from_the_samples_is_422(client: TestClient) -> None:
    ds = _ds({**X_4, "labels": {"dtype": "int64", "shape": [6]}}, classes=["0", "1"])
    errors = _refused(client, {"model": builders.insert_model(), "data": {"eval": ds}})
    assert errors == [{"field": "data.eval", "message": "array 'labels' has 6 entries but the dataset has 8 samples"}]


@pytest.mark.parametrize("task", ["image-classification", "text-classification"])
def test_a_class_id_beyond_the_models_outputs_is_422_for_classification(client: TestClient, task: str) -> None:
    ds = _ds({**X_4, **LABELS_8}, classes=["0", "1", "3"])
    errors = _refused(client, {"model": builders.insert_model(), "task": task, "data": {"eval": ds}})
    assert errors == [{"field": "data.eval", "message": "array 'labels' holds class 3 but the model output 'y' "
                                                        "has 3 classes"}]


@pytest.mark.parametrize(
    ("task", "classes", "outputs"),
    [
        ("generic", ["0", "7"], None),  # not a classification task
        ("feature-extraction", ["0", "7"], None),
        ("image-classification", ["0", "1", "2"], None),  # every id within the 3 outputs
        ("image-classification", ["cat", "dog", "emu", "owl"], None),  # names, not ids
        ("image-classification", ["0", "7"], [{"name": "y", "dtype": "float32", "shape": ["batch", "n"]}]),
        ("image-classification", ["0", "7"], [{"name": "y", "dtype": "float32", "shape": ["batch", 1]}]),
        ("image-classification", ["0", "7"], [{"name": "y", "dtype": "float32", "shape": ["batch", 3, 3]}]),
    ],
)
def test_labels_the_class_check_cannot_judge_are_accepted(
    client: TestClient, task: str, classes: list[str], outputs: list[dict[str, Any]] | None
) -> None:
    ds = _ds({**X_4, **LABELS_8}, classes=classes)
    _accepted(client, {"model": builders.insert_model(outputs=outputs), "task": task, "data": {"eval": ds}})


@pytest.mark.parametrize("odd", ["²", "--1"])
def test_labels_that_only_look_numeric_are_names_not_a_500(client: TestClient, odd: str) -> None:
    # "²".isdigit() is true and "--1".lstrip("-") is "1", but int() refuses both: this used to answer 500.
    model = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes()).json()
    data = builders.npz_bytes({"x": np.ones((8, 4), np.float32), "labels": np.array([odd, "0"] * 4)})
    ds = client.put("/v1/datasets", params={"format": "npz"}, content=data).json()
    assert odd in ds["classes"]
    _accepted(client, {"model": model["id"], "task": "image-classification", "data": {"eval": ds["id"]}})


# --- budgets and limits the worker could only fail on --------------------------------------------------


def test_an_accuracy_budget_without_eval_data_is_422(client: TestClient) -> None:
    spec = {"model": builders.insert_model(), "evaluate": {"max_accuracy_drop": 0.01}}
    errors = _refused(client, spec)
    assert errors[0]["field"] == "evaluate.max_accuracy_drop" and "data.eval" in errors[0]["message"]
    _accepted(client, {**spec, "data": {"eval": _ds(X_4)}})


def _hf_model(config: dict[str, Any]) -> str:
    model_id = builders.insert_model(format="hf")
    with session_scope() as s:
        row = s.get(Model, model_id)
        assert row is not None
        row.meta = {**row.meta, "config": config, "task": "text"}
    return model_id


@pytest.mark.parametrize(("config", "limit"), [({"model_type": "bert", "max_position_embeddings": 64}, 64),
                                               ({"model_type": "roberta", "max_position_embeddings": 514}, 512)])
def test_text_max_length_over_the_models_positions_is_422(
    client: TestClient, config: dict[str, Any], limit: int
) -> None:
    model = _hf_model(config)
    errors = _refused(client, {"model": model, "task": "text-classification", "text": {"max_length": limit + 1}})
    assert errors[0]["field"] == "text.max_length" and str(limit) in errors[0]["message"]
    _accepted(client, {"model": model, "task": "text-classification", "text": {"max_length": limit}})


def test_text_max_length_over_gpt2s_n_positions_is_422(client: TestClient) -> None:
    model = _hf_model({"model_type": "gpt2", "n_positions": 128})
    errors = _refused(client, {"model": model, "task": "feature-extraction", "text": {"max_length": 129}})
    assert errors[0] == {"field": "text.max_length",
                         "message": "129 is more than the 128 positions the model has (n_positions); use at most 128"}


# --- causal LMs and tokenizers (real uploads of tiny Llama / GPT-2 archives) ---------------------------------


@pytest.fixture(scope="module")
def lm_zips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Zipped tiny LMs: a sharded Llama, a GPT-2 with the same tokenizer, one with another tokenizer, one
    without a tokenizer, one without a chat template, one whose tokenizer outgrows its config's vocab_size."""
    import json as _json

    from tests import factories_lm as lm
    from tests.factories_train import zip_dir

    tmp = tmp_path_factory.mktemp("lms")
    dirs = {"llama": lm.tiny_lm_dir(tmp / "llama", layers=1, max_shard_size="100KB"),
            "gpt2": lm.tiny_lm_dir(tmp / "gpt2", kind="gpt2", layers=1),
            "other": lm.tiny_lm_dir(tmp / "other", layers=1, seed=1),
            "bare": lm.tiny_lm_dir(tmp / "bare", layers=1, seed=2, tokenizer=False),
            "plain": lm.tiny_lm_dir(tmp / "plain", layers=1, seed=3),
            "small": lm.tiny_lm_dir(tmp / "small", layers=1, seed=4)}
    lm.lm_tokenizer(dirs["other"], corpus=lm.licence_paragraphs(("Apache-2.0",)))
    (dirs["plain"] / "chat_template.jinja").unlink(missing_ok=True)
    cfg = dirs["plain"] / "tokenizer_config.json"
    cfg.write_text(_json.dumps({k: v for k, v in _json.loads(cfg.read_text()).items() if k != "chat_template"}))
    config = _json.loads((dirs["small"] / "config.json").read_text())
    (dirs["small"] / "config.json").write_text(_json.dumps({**config, "vocab_size": 300}))
    return {name: zip_dir(d, tmp / f"{name}.zip", prefix=f"{name}/").read_bytes() for name, d in dirs.items()}


def _upload_lm(client: TestClient, data: bytes) -> str:
    r = client.put("/v1/models", params={"format": "hf"}, content=data)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _text_ds(client: TestClient, rows: list[dict[str, Any]]) -> str:
    import json as _json

    body = "".join(_json.dumps(r) + "\n" for r in rows).encode()
    r = client.put("/v1/datasets", params={"format": "text"}, content=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _prompts(client: TestClient) -> str:
    from tests import factories_lm as lm

    return _text_ds(client, lm.prompt_rows(4))


CHOICE_ROWS = [{"text": "Is this licence free?", "label": "yes"}, {"text": "Is it a warranty?", "label": "no"}]


def test_an_lm_job_on_lm_uploads_is_accepted_and_generic_means_text_generation(
    client: TestClient, lm_zips: dict[str, bytes]
) -> None:
    llama, gpt2 = _upload_lm(client, lm_zips["llama"]), _upload_lm(client, lm_zips["gpt2"])
    train, eval_ = _prompts(client), _text_ds(client, CHOICE_ROWS)
    spec = {"model": llama, "task": "text-generation", "data": {"train": train, "eval": eval_},
            "steps": [{"type": "distill", "teacher": gpt2}],
            "evaluate": {"choices": ["yes", "no"], "max_perplexity_increase": 0.1}}
    _accepted(client, spec)
    # generic on a causal LM is text-generation: a choice set without choices is refused the same way
    errors = _refused(client, {"model": llama, "data": {"eval": eval_}})
    assert errors == [{"field": "data.eval", "message": f"dataset {eval_} holds choice rows ({{\"text\", \"label\"}}), "
                                                        "scored against evaluate.choices, which is not given"}]
    _accepted(client, {"model": gpt2, "data": {"eval": eval_}, "evaluate": {"choices": ["yes", "no"]}})


def test_text_generation_needs_an_hf_causal_lm_and_a_causal_lm_needs_text_generation(
    client: TestClient, lm_zips: dict[str, bytes]
) -> None:
    onnx_model = builders.insert_model()
    assert _refused(client, {"model": onnx_model, "task": "text-generation"}) == [
        {"field": "task", "message": f"task 'text-generation' needs an hf causal LM (a *ForCausalLM archive); "
                                     f"model {onnx_model} is an onnx model"}]
    bert = client.put("/v1/models", params={"format": "hf"}, content=builders.zip_bytes(builders.hf_files())).json()
    errors = _refused(client, {"model": bert["id"], "task": "text-generation"})
    assert errors[0]["message"].endswith(f"model {bert['id']} is an hf 'text-classification' model")
    llama = _upload_lm(client, lm_zips["llama"])
    assert _refused(client, {"model": llama, "task": "text-classification"}) == [
        {"field": "task", "message": f"model {llama} is a causal LM (task 'text-generation'); task "
                                     "'text-classification' does not fit it"}]


def test_an_lm_takes_text_datasets_and_chat_rows_need_a_chat_template(
    client: TestClient, lm_zips: dict[str, bytes]
) -> None:
    from tests import factories_lm as lm

    llama, plain = _upload_lm(client, lm_zips["llama"]), _upload_lm(client, lm_zips["plain"])
    npz = _ds(X_4)
    assert _refused(client, {"model": llama, "task": "text-generation", "data": {"calibration": npz}}) == [
        {"field": "data.calibration", "message": f"dataset {npz} is npz; a causal LM takes text datasets (JSONL rows)"}]
    chat = _text_ds(client, lm.chat_rows(2))
    _accepted(client, {"model": llama, "task": "text-generation", "data": {"eval": chat}})
    assert _refused(client, {"model": plain, "task": "text-generation", "data": {"eval": chat}}) == [
        {"field": "data.eval", "message": f"dataset {chat} holds chat rows (messages) but model {plain} has no chat "
                                          "template to render them"}]


def test_choices_and_choice_rows_go_together(client: TestClient, lm_zips: dict[str, bytes]) -> None:
    llama, prompts, choice = _upload_lm(client, lm_zips["llama"]), _prompts(client), _text_ds(client, CHOICE_ROWS)
    base = {"model": llama, "task": "text-generation"}
    assert _refused(client, {**base, "evaluate": {"choices": ["yes", "no"]}}) == [
        {"field": "evaluate.choices", "message": "choices are scored on data.eval, which is not given"}]
    errors = _refused(client, {**base, "data": {"eval": prompts}, "evaluate": {"choices": ["yes", "no"]}})
    assert errors[0]["field"] == "evaluate.choices" and errors[0]["message"].endswith("holds prompt_completion rows")
    assert _refused(client, {**base, "data": {"eval": choice}, "evaluate": {"choices": ["yes", "maybe"]}}) == [
        {"field": "evaluate.choices", "message": "eval label 'no' is not one of the choices ['yes', 'maybe']"}]
    errors = _refused(client, {**base, "data": {"eval": choice, "train": prompts},
                               "evaluate": {"choices": ["yes", "no"], "few_shot": 2}})
    assert errors == [{"field": "evaluate.few_shot", "message": "few-shot examples come from data.train, which holds "
                                                                "prompt_completion rows, not choice rows"}]
    _accepted(client, {**base, "data": {"eval": choice, "train": choice},
                       "evaluate": {"choices": ["no", "yes"], "few_shot": 1}})
    bert = builders.insert_model(format="hf")
    assert _refused(client, {"model": bert, "task": "text-classification", "evaluate": {"choices": ["a", "b"]}}) == [
        {"field": "evaluate.choices", "message": "choices score a causal LM's log-likelihoods; they apply to task "
                                                 "'text-generation' only"}]


def test_a_perplexity_budget_needs_eval_data_and_an_lm(client: TestClient, lm_zips: dict[str, bytes]) -> None:
    llama = _upload_lm(client, lm_zips["llama"])
    budget = {"max_perplexity_increase": 0.05}
    assert _refused(client, {"model": llama, "task": "text-generation", "evaluate": budget}) == [
        {"field": "evaluate.max_perplexity_increase",
         "message": "a perplexity budget needs data.eval to measure the perplexity on"}]
    assert _refused(client, {"model": builders.insert_model(), "data": {"eval": _ds(X_4)}, "evaluate": budget}) == [
        {"field": "evaluate.max_perplexity_increase",
         "message": "a perplexity budget applies to task 'text-generation' (a causal LM) only"}]
    _accepted(client, {"model": llama, "data": {"eval": _prompts(client)}, "evaluate": budget})


def test_a_missing_or_oversized_tokenizer_is_422_naming_the_check(
    client: TestClient, lm_zips: dict[str, bytes]
) -> None:
    bare, small = _upload_lm(client, lm_zips["bare"]), _upload_lm(client, lm_zips["small"])
    assert _refused(client, {"model": bare, "task": "text-generation"}) == [
        {"field": "model", "message": f"tokenizer check: model {bare} has no tokenizer (tokenizer.json, vocab.txt, "
                                      "...) to turn text into token ids; add it to the archive"}]
    assert _refused(client, {"model": small, "data": {"eval": _prompts(client)}}) == [
        {"field": "model", "message": f"tokenizer vocabulary check: model {small}'s tokenizer has 384 tokens but its "
                                      "config's vocab_size is 300; ids from 300 up have no embedding"}]
    files = builders.hf_files()
    del files["vocab.txt"]
    bert = client.put("/v1/models", params={"format": "hf"}, content=builders.zip_bytes(files)).json()["id"]
    text = _text_ds(client, CHOICE_ROWS)
    errors = _refused(client, {"model": bert, "task": "text-classification", "data": {"eval": text}})
    assert errors[0]["field"] == "model" and errors[0]["message"].startswith("tokenizer check:")
    _accepted(client, {"model": bert, "task": "text-classification"})  # no text to tokenise


def test_distillation_between_lms_needs_the_same_tokenizer(client: TestClient, lm_zips: dict[str, bytes]) -> None:
    llama, gpt2, other = (_upload_lm(client, lm_zips[n]) for n in ("llama", "gpt2", "other"))
    train = _prompts(client)
    base = {"model": llama, "task": "text-generation", "data": {"train": train}}
    _accepted(client, {**base, "steps": _distill(teacher=gpt2, student={"model": gpt2})})
    message = (f"model {other} has another tokenizer than model {llama} (tokenizer fingerprints differ): distillation "
               "compares their predictions token by token, so both need the same tokenizer")
    assert _refused(client, {**base, "steps": _distill(teacher=other)}) == [{"field": "steps.0.teacher",
                                                                            "message": message}]
    assert _refused(client, {**base, "steps": _distill(student={"model": other})}) == [
        {"field": "steps.0.student.model", "message": message}]
    onnx_teacher = builders.insert_model()
    errors = _refused(client, {**base, "steps": _distill(teacher=onnx_teacher)})
    assert errors == [{"field": "steps.0.teacher", "message": f"model {onnx_teacher} is not a causal LM (an hf "
                                                              f"*ForCausalLM archive); it cannot distill with causal "
                                                              f"LM {llama}"}]


def test_generation_lengths_past_the_context_are_422(client: TestClient, lm_zips: dict[str, bytes]) -> None:
    gpt2 = _upload_lm(client, lm_zips["gpt2"])
    generation = {"prompt_tokens": 240, "max_new_tokens": 32}
    assert _refused(client, {"model": gpt2, "evaluate": {"generation": generation}}) == [
        {"field": "evaluate.generation.prompt_tokens",
         "message": f"prompt_tokens + max_new_tokens = 272 is more than the 256 positions model {gpt2} has"}]
    errors = _refused(client, {"model": gpt2, "text": {"max_length": 257}})
    assert errors[0]["field"] == "text.max_length" and "(n_positions)" in errors[0]["message"]
