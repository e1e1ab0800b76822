"""``client.errors``: problem+json bodies of the real API as typed errors, fields read from ``errors[].field``."""

from __future__ import annotations

import ast
import email.utils
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy.exc

import client
from client import APIError, APIValidationError, Client, ModelpressError
from client.errors import error_for, parse_retry_after
from client.transport import Transport
from tests.e2e.harness import LiveService

ROOT = Path(__file__).resolve().parents[2]


def server_error(svc: LiveService, spec: dict[str, Any]) -> APIError:
    """What the server answers to ``spec`` (sent as is: no local validation)."""
    t = Transport(svc.url)
    try:
        with pytest.raises(APIError) as err:
            t.send("POST", "/v1/jobs", json_body=spec)
        return err.value
    finally:
        t.close()


def local_error(spec: dict[str, Any]) -> APIError:
    """What local validation raises for ``spec`` (no request)."""
    with pytest.raises(APIValidationError) as err:
        Client.build_spec(spec)
    return err.value


def test_the_server_and_local_validation_name_the_same_fields(
    api_service: LiveService, uploaded: dict[str, str]
) -> None:
    model, data = uploaded["model"], uploaded["data"]
    out_of_range = {"model": model, "data": {"train": data}, "steps": [{"type": "prune", "ratio": 1.5}]}
    after_quantize = {"model": model, "data": {"train": data},
                      "steps": [{"type": "quantize"}, {"type": "finetune"}]}
    for spec, field in ((out_of_range, "steps.0.ratio"), (after_quantize, "steps.1")):
        remote = server_error(api_service, spec)
        assert isinstance(remote, APIValidationError) and remote.status == 422
        assert remote.code == "validation_error"
        assert remote.fields() == [field] == [e["field"] for e in remote.body["errors"]]
        assert local_error(spec).fields() == [field]
        assert field in str(remote)
    unknown = server_error(api_service, {"model": "mdl_nope", "steps": [{"type": "quantize"}]})
    assert isinstance(unknown, APIValidationError) and unknown.fields() == ["model"]


def test_each_status_family_has_its_error() -> None:
    expected = {400: "APIBadRequest", 401: "AuthenticationFailed", 403: "AuthenticationFailed",
                404: "ResourceNotFound", 409: "ResourceConflict", 413: "PayloadTooLarge", 422: "APIValidationError",
                503: "APIUnavailable", 500: "APIServerError", 502: "APIServerError", 418: "APIError"}
    for status, name in expected.items():
        err = error_for(status, {"title": "t", "status": status, "detail": "d", "code": "c"})
        assert type(err) is getattr(client, name) and isinstance(err, ModelpressError)
        assert (err.status, err.detail, err.code) == (status, "d", "c")
    plain = error_for(502, None, "<html>bad gateway</html>")
    assert isinstance(plain, client.APIServerError) and plain.detail == "<html>bad gateway</html>" and plain.errors == []


def test_retry_after_as_seconds_or_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(email.utils.formatdate(1_000_060, usegmt=True), now=1_000_000) == 60.0
    assert parse_retry_after(email.utils.formatdate(1_000_000, usegmt=True), now=1_000_060) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def _class_names(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}


def test_no_error_name_collides_with_pydantic_sqlalchemy_or_the_worker() -> None:
    worker = set().union(*(_class_names(p) for p in (ROOT / "worker").rglob("*.py")))
    api = set().union(*(_class_names(p) for p in (ROOT / "api").rglob("*.py")))
    taken = set(dir(pydantic)) | set(dir(sqlalchemy.exc)) | worker | api
    errors = {name for name in client.__all__ if isinstance(getattr(client, name), type)
              and issubclass(getattr(client, name), BaseException)}
    assert len(errors) >= 10 and errors.isdisjoint(taken), errors & taken
