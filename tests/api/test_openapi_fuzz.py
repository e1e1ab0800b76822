"""Schemathesis against the OpenAPI document (api/openapi.py): no 5xx, every answer's status, media type,
body and headers as the document describes, for valid and for invalid requests (fixed seed, bounded examples).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api import builders
from tests.api.tenants import BOOTSTRAP, bearer, make_key

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# The operations in groups small enough for one quick test each; a test below asserts they cover all.
GROUPS = {
    "models": ("/v1/models",),
    "datasets": ("/v1/datasets",),
    "jobs": ("/v1/jobs",),
    "artifacts": ("/v1/artifacts",),
    "keys": ("/v1/keys",),
    "service": ("/healthz", "/readyz", "/metrics", "/v1/passes"),
}
EXAMPLES = 6


@pytest.fixture
def keyed(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API with the bootstrap key set and its document served (``PUBLIC_DOCS``)."""
    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_API_KEY", BOOTSTRAP)
    monkeypatch.setenv("MODELPRESS_PUBLIC_DOCS", "true")
    # Limits raised: a 429 from a rate limit or a quota would stand in for the operation's own answer.
    for limit in ("UPLOAD_RATE_PER_MINUTE", "SUBMIT_RATE_PER_MINUTE", "QUOTA_ACTIVE_JOBS", "QUOTA_STORED_BYTES"):
        monkeypatch.setenv(f"MODELPRESS_{limit}", "0")
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c
    get_settings.cache_clear()


def _group_of(path: str) -> str | None:
    for name, prefixes in GROUPS.items():
        if any(path == p or path.startswith(p + "/") for p in prefixes):
            return name
    return None


def _summary(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return " | ".join(_summary(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {str(exc)[:1500]}"


def _real_references(case: Any, ids: dict[str, str]) -> None:
    """A valid job spec names the real model and datasets (random ids would only ever be a 422)."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = ids["model_id"]
        if isinstance(case.body.get("data"), dict):
            case.body["data"] = {k: ids["dataset_id"] for k in case.body["data"] if k in ("train", "eval", "calibration")}


def _fuzz(operation: Any, mode: GenerationMode, failures: list[str], ids: dict[str, str],
          answers: dict[str, list[int]] | None = None) -> None:
    fixed = {name: ids[name] for name in _path_params(operation.path)} if mode == GenerationMode.POSITIVE else None

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        if mode == GenerationMode.POSITIVE:
            _real_references(case, ids)
        response = case.call(headers=bearer(BOOTSTRAP))
        if answers is not None:
            answers.setdefault(operation.label, []).append(response.status_code)
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:
            sent = case.as_curl_command(headers=bearer(BOOTSTRAP))
            raise AssertionError(f"{_summary(exc)}\n{sent}\n-> {response.status_code} {response.text[:500]}") from exc

    try:
        check()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, operation.label  # no input breaks the document: nothing to send
    except (Exception, BaseExceptionGroup) as exc:
        failures.append(f"{operation.label} ({mode}): {_summary(exc)}")


def _resources(client: TestClient) -> dict[str, str]:
    auth = bearer(BOOTSTRAP)
    model = client.put("/v1/models", params={"format": "onnx"}, content=builders.onnx_bytes(), headers=auth).json()
    data = builders.npz_bytes({"x": np.ones((8, 4), np.float32)})
    dataset = client.put("/v1/datasets", params={"format": "npz"}, content=data, headers=auth).json()
    job = client.post("/v1/jobs", json={"model": model["id"], "data": {"eval": dataset["id"]},
                                        "steps": [{"type": "quantize"}]}, headers=auth).json()
    builders.add_events(job["id"], 3)
    artifact = builders.insert_artifact(job["id"], bytes(range(256)) * 4)
    builders.set_status(job["id"], "succeeded")  # its event stream ends, a cancel is a 409
    key_id, _ = make_key("someone", "read")
    return {"model_id": model["id"], "dataset_id": dataset["id"], "job_id": job["id"], "artifact_id": artifact,
            "key_id": key_id}


def _has_input(operation: Any) -> bool:
    """Whether invalid requests can be made up beyond the path (any string is a valid path id)."""
    raw = operation.definition.raw
    return "requestBody" in raw or any(p.get("in") != "path" for p in raw.get("parameters", []))


def _schema(client: TestClient) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", client.app)


def test_the_groups_cover_every_operation(keyed: TestClient) -> None:
    paths = keyed.get("/openapi.json", headers=bearer(BOOTSTRAP)).json()["paths"]
    assert {p: _group_of(p) for p in paths if _group_of(p) is None} == {}


# Negative: every group whose operations take input besides the path (the service probes take none).
RUNS = [(g, GenerationMode.POSITIVE) for g in sorted(GROUPS)] + [
    (g, GenerationMode.NEGATIVE) for g in sorted(GROUPS) if g != "service"]


@pytest.mark.parametrize(("group", "mode"), RUNS)
def test_the_api_answers_as_its_document_says(keyed: TestClient, group: str, mode: GenerationMode) -> None:
    """Valid requests name real resources (a finished job with events, an artifact, a key); invalid ones do not."""
    ids = _resources(keyed)
    failures: list[str] = []
    answers: dict[str, list[int]] = {}
    fuzzed = 0
    for result in _schema(keyed).get_all_operations():
        operation = result.ok()
        if _group_of(operation.path) == group and (mode == GenerationMode.POSITIVE or _has_input(operation)):
            _fuzz(operation, mode, failures, ids, answers)
            fuzzed += 1
    assert fuzzed and not failures, "\n\n".join(failures)
    # Every operation was exercised, not answered by a limit; valid job submissions were accepted.
    assert {label: codes for label, codes in answers.items() if 429 in codes} == {}
    if group == "jobs" and mode == GenerationMode.POSITIVE:
        assert 202 in answers["POST /v1/jobs"], answers["POST /v1/jobs"]


def test_every_operation_documents_its_errors_as_problems(keyed: TestClient) -> None:
    doc = keyed.get("/openapi.json", headers=bearer(BOOTSTRAP)).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = {int(c) for c in op["responses"]}
            for code in {c for c in codes if c >= 400}:  # successes and redirects carry their own bodies
                content = op["responses"][str(code)]["content"]
                assert list(content) == ["application/problem+json"], (method, path, code)
            public = path in ("/healthz", "/readyz")
            assert public or 401 in codes, (method, path)
            assert method in ("get", "head") or 403 in codes, (method, path)  # reads need no write scope
            assert "{" not in path or 404 in codes, (method, path)
            for param in op.get("parameters", []):
                if param["name"] == "limit":
                    assert param["schema"]["minimum"] == 1 and param["schema"]["maximum"] in (100, 1000)
    for path in ("/v1/models", "/v1/datasets"):  # an upload into a full disk: 507 storage_full
        assert all("507" in doc["paths"][path][m]["responses"] for m in ("put", "post")), path
    content = doc["paths"]["/v1/artifacts/{artifact_id}/content"]["get"]["responses"]
    assert "application/octet-stream" in content["200"]["content"] and {"206", "304", "416"} <= set(content)


def test_the_document_states_what_the_server_accepts(keyed: TestClient) -> None:
    """The inputs Schemathesis found valid by the document yet refused: each is now outside the document."""
    doc = keyed.get("/openapi.json", headers=bearer(BOOTSTRAP)).json()
    put = {p["name"]: p for p in doc["paths"]["/v1/models"]["put"]["parameters"]}
    assert put["format"]["required"] and put["format"]["schema"]["enum"] == ["onnx", "hf"]  # name='' without format
    assert put["name"]["schema"]["maxLength"] == 255
    body = doc["paths"]["/v1/datasets"]["post"]["requestBody"]  # an empty multipart POST
    assert body["required"] and body["content"]["multipart/form-data"]["schema"]["required"] == ["file", "format"]
    meta = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "meta")
    assert re.fullmatch(meta["schema"]["items"]["pattern"], "team=vision") and \
        not re.fullmatch(meta["schema"]["items"]["pattern"], "")  # meta=''
    assert doc["components"]["schemas"]["JobCreate"]["properties"]["model"]["minLength"] == 1  # model=''
    # ... and the server answers those inputs as the document now says: 422 naming the field.
    auth = bearer(BOOTSTRAP)
    assert keyed.put("/v1/models", params={"name": ""}, content=b"x", headers=auth).json()["errors"][0]["field"] == "format"
    assert keyed.get("/v1/jobs", params={"meta": ""}, headers=auth).json()["errors"][0]["field"] == "meta"
    r = keyed.post("/v1/jobs", json={"model": "", "steps": [{"type": "quantize"}]}, headers=auth)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "model"


def test_without_a_key_every_operation_is_the_documented_401(keyed: TestClient) -> None:
    doc = keyed.get("/openapi.json", headers=bearer(BOOTSTRAP)).json()
    checked = 0
    for result in _schema(keyed).get_all_operations():
        operation = result.ok()
        if operation.path in ("/healthz", "/readyz", "/metrics"):  # probes; /metrics is open with public docs
            continue
        case = operation.Case(path_parameters={p: "x_1" for p in _path_params(operation.path)})
        response = case.call()
        assert response.status_code == 401, (operation.label, response.status_code)
        assert response.headers["content-type"] == ["application/problem+json"], operation.label
        assert "401" in doc["paths"][operation.path][operation.method.lower()]["responses"]
        checked += 1
    assert checked >= 20


def _path_params(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)
