"""The OpenAPI document's answers: every operation lists the problem+json errors it can give, and its other bodies.

Most statuses follow from the route itself: a key dependency gives 401, a write with a scoped key 403,
an id in the path 404, any parameter or body 422 (as a problem, not FastAPI's default shape), a
rate-limited dependency 429 (uploads: also 413 for size and quota), a JSON body route 413 and 415.
``ANSWERS`` adds what only a particular operation answers (a 409, a range, a stream, a page).
``tests/api/test_openapi_fuzz.py`` runs Schemathesis against the result: no 5xx, nothing undocumented.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api import deps
from api.bodylimit import JSON_ROUTES
from api.services.events import MAX_PAGE
from api.services.pagination import MAX_LIMIT
from models.schemas import Problem

PROBLEM = "application/problem+json"
REASONS = {
    400: "The body could not be parsed (a malformed JSON or multipart body)",
    401: "Missing, wrong or revoked API key",
    403: "The API key's scope does not allow this (a read key writing, a non-admin key managing keys)",
    404: "No such resource for this owner (another owner's is answered the same)",
    409: "The resource is in a state that does not allow this",
    413: "The body is larger than the limit, or storing it would pass the owner's storage quota",
    415: "The body's media type is not one this operation reads",
    416: "The byte range is not satisfiable",
    422: "A parameter or the body is not valid; ``errors`` names each field",
    429: "Past the key's rate limit (with ``Retry-After``) or the owner's job quota",
    503: "A service this operation needs is unavailable",
    507: "The server has no space left to store the upload (``storage_full``); nothing was stored",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}
# One Server-Sent Event (OpenAPI 3.1: the schema of a text/event-stream describes each event).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "id": {"type": "string", "description": "The event's id: resume after it with Last-Event-ID"},
        "event": {"type": "string", "description": "The event's kind (status, progress, log, metric, ...)"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "The event as JSON, as GET /v1/jobs/{job_id}/events lists it"},
    },
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _problem(status: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": REASONS[status],
                              "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if status in (429, 503):
        answer["headers"] = copy.deepcopy(_RETRY_AFTER)
    return answer


@dataclass(frozen=True)
class SameAs:
    """The body of another status of the same operation, with its own description."""

    status: str
    description: str


# What only some operations answer: a status to add (a problem), or a response object for a status.
ANSWERS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/readyz"): {"503": 503},
    ("GET", "/metrics"): {"401": 401, "200": {"description": "Prometheus text exposition",
                                             "content": {"text/plain": {"schema": {"type": "string"}}}}},
    ("POST", "/v1/models"): {"400": 400, "409": 409, "415": 415,
                             "200": SameAs("201", "The same bytes were uploaded before: that record")},
    ("PUT", "/v1/models"): {"409": 409, "200": SameAs("201", "The same bytes were uploaded before: that record")},
    ("POST", "/v1/datasets"): {"400": 400, "409": 409, "415": 415,
                               "200": SameAs("201", "The same bytes were uploaded before: that record")},
    ("PUT", "/v1/datasets"): {"409": 409, "200": SameAs("201", "The same bytes were uploaded before: that record")},
    ("POST", "/v1/jobs"): {"503": 503, "200": SameAs("202", "A repeated Idempotency-Key: the first job")},
    ("GET", "/v1/jobs/{job_id}"): {"200": {"description": "The job", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobOut"}}}}},
    ("GET", "/v1/jobs"): {"404": 404},  # ?parent= names a search the owner does not have
    ("POST", "/v1/jobs/{job_id}/cancel"): {"409": 409},
    ("DELETE", "/v1/models/{model_id}"): {"409": 409},
    ("DELETE", "/v1/datasets/{dataset_id}"): {"409": 409},
    ("GET", "/v1/jobs/{job_id}/events/stream"): {"200": {
        "description": "Server-Sent Events until the job ends", "content": {"text/event-stream": {
            "schema": _SSE_EVENT}}}},
    ("GET", "/v1/jobs/{job_id}/report.html"): {
        "200": {"description": "The report page", "content": {"text/html": {"schema": {"type": "string"}}}},
        "303": {"description": "A browser without a session: to the login page"}},
    ("GET", "/v1/artifacts/{artifact_id}/content"): {
        "200": {"description": "The artifact's bytes (its own media type)",
                "content": {"application/octet-stream": _BINARY, "*/*": _BINARY}},
        "206": {"description": "The requested byte range", "content": {"application/octet-stream": _BINARY,
                                                                        "*/*": _BINARY}},
        "304": {"description": "The client's copy (If-None-Match) is current"},
        "307": {"description": "With MODELPRESS_S3_PRESIGN_S on an S3 store: the bytes are at the presigned "
                               "URL in Location (send Range there; no Authorization header)",
                "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}}},
        "416": 416},
}


def _calls(dependant: Dependant) -> set[Any]:
    found: set[Any] = set()
    for sub in dependant.dependencies:
        found.add(sub.call)
        found |= _calls(sub)
    return found


def statuses(route: APIRoute, method: str) -> set[int]:
    """The problem statuses the route's own shape implies for ``method``."""
    calls = _calls(route.dependant)
    found: set[int] = set()
    if calls & {deps.current_principal, deps.optional_owner}:
        found.add(401)
    if (deps.current_principal in calls and method not in deps.SAFE_METHODS) or deps.admin_principal in calls:
        found.add(403)
    dependant = route.dependant
    if dependant.path_params:
        found.add(404)
    if any(_params(route.dependant)):
        found.add(422)
    actions = {deps.RATE_LIMITED[c] for c in calls if c in deps.RATE_LIMITED}
    if actions:  # a rate-limited owner is also an authenticated writer
        found |= {401, 403, 429}
    if "submit" in actions:
        found |= {503, 507}  # overloaded (api/services/admission.py); no space left for the database
    if "upload" in actions:
        found |= {413, 422, 507}  # too large or past the quota; a format or file that is not valid; disk full
    if (method, route.path) in JSON_ROUTES:
        found |= {413, 415}
    if dependant.body_params:
        found.add(400)
    return found


def _params(dependant: Dependant) -> list[Any]:
    out = [*dependant.path_params, *dependant.query_params, *dependant.header_params, *dependant.body_params]
    for sub in dependant.dependencies:
        out += _params(sub)
    return out


def _limit_bounds(operation: dict[str, Any], path: str) -> None:
    """Page sizes carry their bounds (the services refuse others with a 422 naming ``limit``)."""
    for param in operation.get("parameters", []):
        if param.get("name") == "limit" and param.get("in") == "query":
            param["schema"]["minimum"] = 1
            param["schema"]["maximum"] = MAX_PAGE if path.endswith("/events") else MAX_LIMIT


def api_routes(app: FastAPI) -> list[APIRoute]:
    """The routes of the routers ``create_app`` included (their paths carry the router prefix)."""
    routers = getattr(app.state, "routers", [])
    return [route for router in routers for route in router.routes if isinstance(route, APIRoute)]


def describe(app: FastAPI, document: dict[str, Any]) -> dict[str, Any]:
    """Add the error answers (and the other answers ``ANSWERS`` names) to ``document``, in place."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    for route in api_routes(app):
        if not route.include_in_schema:
            continue
        for method in sorted(route.methods or ()):
            operation = document["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            implied = statuses(route, method)
            for status in sorted(implied):
                responses[str(status)] = _problem(status)
            if 422 not in implied:
                responses.pop("422", None)  # FastAPI lists it for every operation, even one without input
            for code, answer in ANSWERS.get((method, route.path_format), {}).items():
                if isinstance(answer, int):
                    responses[code] = _problem(answer)
                elif isinstance(answer, SameAs):
                    responses[code] = {**copy.deepcopy(responses[answer.status]), "description": answer.description}
                else:
                    responses[code] = copy.deepcopy(answer)
            _limit_bounds(operation, route.path_format)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _accepted_inputs(document)
    return document


_NO_NUL = "^[^\\x00]*$"


def _accepted_inputs(document: dict[str, Any]) -> None:
    """State in the document what the services check by hand (so a schema-valid request is one they accept):
    an upload's ``format`` is required and one of the inspected formats, its ``name`` at most 255 characters
    without NUL; a multipart upload needs its ``file`` and ``format`` parts; ``meta`` filters are ``k=v``; a
    job names a model."""
    from api.services.uploads import FORMATS, MAX_NAME

    paths = document.get("paths", {})
    for kind, path in (("model", "/v1/models"), ("dataset", "/v1/datasets")):
        formats = list(FORMATS[kind])
        name = {"type": "string", "maxLength": MAX_NAME, "pattern": _NO_NUL}
        for param in paths.get(path, {}).get("put", {}).get("parameters", []):
            if param.get("name") == "format" and param.get("in") == "query":
                param.update(required=True, schema={"type": "string", "enum": formats})
            elif param.get("name") == "name" and param.get("in") == "query":
                param["schema"] = name
        post = paths.get(path, {}).get("post")
        if post is not None:
            post["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file", "format"],
                "properties": {"file": {"type": "string", "format": "binary"},
                               "format": {"type": "string", "enum": formats}, "name": name}}}}}
    for param in paths.get("/v1/jobs", {}).get("get", {}).get("parameters", []):
        if param.get("name") == "meta":
            param["schema"] = {"type": "array", "items": {"type": "string", "pattern": "^[^=\\x00]+=[^\\x00]*$"}}
    for schema_name in ("JobCreate", "JobSpec"):
        model = document.get("components", {}).get("schemas", {}).get(schema_name, {}).get("properties", {}).get("model")
        if model is not None:
            model.update(minLength=1, pattern="^[^\\x00]+$")


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the described document (built once, like FastAPI's own)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(app, build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
