"""RFC 9457 problem+json for every error: raised ProblemErrors, HTTP errors, validation, and crashes."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, TypedDict, Unpack

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from models.db import is_transient
from models.ids import new_id
from models.schemas import Problem
from storage.base import StorageFull, StorageUnavailable, UploadTooLarge, is_full

log = logging.getLogger("modelpress.api")

PROBLEM_JSON = "application/problem+json"
_LOC_ROOTS = frozenset({"body", "query", "path", "header", "cookie"})
_FIELD_PREFIX = re.compile(r"^(?:Value error, |Assertion failed, )?([A-Za-z_][\w]*(?:\.\w+)*):\s*(.*)$", re.S)
_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "upload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class ProblemExtras(TypedDict, total=False):
    """The optional parts of a problem: field errors, response headers, a title other than the status phrase."""

    errors: list[dict[str, Any]] | None
    headers: dict[str, str] | None
    title: str | None


class ProblemError(Exception):
    """An error the API answers with a problem+json body; raise it from services and routes."""

    def __init__(self, status: int, code: str, detail: str, **extras: Unpack[ProblemExtras]) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = extras.get("errors")
        self.headers = extras.get("headers")
        self.title = extras.get("title")

    def response(self, request: Request | None) -> JSONResponse:
        """This problem as a problem+json response (``instance`` is the request path)."""
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        body = Problem(
            title=self.title or phrase,
            status=self.status,
            detail=self.detail,
            code=self.code,
            instance=request.url.path if request is not None else None,
            errors=self.errors,
        )
        return JSONResponse(
            body.model_dump(exclude_none=True), status_code=self.status, headers=self.headers, media_type=PROBLEM_JSON
        )


def field_error(status: int, code: str, field: str, message: str) -> ProblemError:
    """A problem naming one offending field (``detail`` is ``"<field>: <message>"``)."""
    return ProblemError(status, code, f"{field}: {message}", errors=[{"field": field, "message": message}])


def not_found(kind: str, ident: str) -> ProblemError:
    """404 for an id the owner does not have."""
    return ProblemError(404, "not_found", f"{kind} {ident!r} not found")


def problem_response(
    request: Request | None, status: int, code: str, detail: str, **extras: Unpack[ProblemExtras]
) -> JSONResponse:
    """A problem+json response (``instance`` is the request path)."""
    return ProblemError(status, code, detail, **extras).response(request)


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "steps", 0, "prune", "ratio")`` becomes ``steps.0.ratio`` (union tags dropped)."""
    from models.spec import step_types

    tags = set(step_types())
    parts: list[str] = []
    items = list(loc)
    if items and items[0] in _LOC_ROOTS:
        items = items[1:]
    for i, item in enumerate(items):
        if isinstance(item, int):
            parts.append(str(item))
            continue
        text = str(item)
        after_step_index = i >= 2 and items[i - 2] == "steps" and isinstance(items[i - 1], int)
        if after_step_index and text in tags:
            continue  # the discriminator tag pydantic adds for a tagged union member
        if "[" in text or text[:1].isupper():
            continue  # union member names (StudentLayers) and validator wrappers (function-after[...])
        parts.append(text)
    return ".".join(parts)


def validation_errors(errors: list[Any] | tuple[Any, ...]) -> list[dict[str, Any]]:
    """Pydantic errors as ``[{field, message}]``; a model-level "steps.1: ..." message names its field."""
    out: list[dict[str, Any]] = []
    for err in errors:
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            pos = [p for p in err.get("loc", ()) if isinstance(p, int)]
            out.append({"field": "body", "message": message + (f" at position {pos[0]}" if pos else "")})
            continue
        field = _field_path(err.get("loc", ()))
        match = _FIELD_PREFIX.match(message)
        if match and (not field or field == "body"):
            field, message = match.group(1), match.group(2)  # a model validator's "steps.1: ..." message
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        out.append({"field": field or "body", "message": message})
    return out


async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return exc.response(request)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES_BY_STATUS.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return problem_response(request, exc.status_code, code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (the router reports only the first route's)."""
    methods: set[str] = set()
    for router in getattr(request.app.state, "routers", []):
        for route in router.routes:
            regex = getattr(route, "path_regex", None)
            if regex is not None and regex.match(request.url.path):
                methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(list(exc.errors()))
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return problem_response(
        request, 422, "validation_error", f"{first['field']}: {first['message']}", errors=errors
    )


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UploadTooLarge)
    return problem_response(
        request, 413, "upload_too_large",
        f"the upload is larger than the limit of {exc.limit} bytes set by MODELPRESS_MAX_UPLOAD_BYTES on this "
        "server; uploads stream to disk, so unset it for no cap beyond the disk and the owner's stored-bytes quota",
    )


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    # Nothing was recorded: the upload's row is inserted only after its blob is stored.
    log.warning("blob store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 503, "storage_unavailable", f"the blob store is unavailable, try again later: {exc}",
        headers={"Retry-After": "5"},
    )


async def _storage_full(request: Request, exc: Exception) -> JSONResponse:
    # Nothing was recorded and the staged temp file is gone: the row is inserted only after its blob is stored.
    log.error("blob store full on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 507, "storage_full",
        f"{exc.strerror if isinstance(exc, OSError) else exc}; nothing was stored, try again once space is freed",
    )


async def _disconnected(request: Request, exc: Exception) -> JSONResponse:
    log.info("client went away during %s %s", request.method, request.url.path)
    return problem_response(request, 400, "client_disconnected", "the client closed the connection mid-request")


async def _bad_data(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a client-supplied value (a NUL byte in an id or cursor, a number out of range).
    log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 422, "validation_error", "a value in the request is not valid (for example, it contains a NUL byte)"
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_full(exc):  # the database's disk is full: waiting does not free space (a 507, not a 503 + Retry-After)
        log.error("database disk full on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(request, 507, "storage_full",
                                "no space left for the database; nothing was recorded, try again once space is freed")
    if not is_transient(exc):
        return await _crash(request, exc)
    # PostgreSQL restarting or unreachable: the transaction rolled back, so nothing was recorded.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(
        request, 503, "database_unavailable", "the database is unavailable, try again later",
        headers={"Retry-After": "2"},
    )


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    # No pooled connection came within DB_POOL_TIMEOUT_S: nothing was read or written for this request.
    log.warning("no database connection free on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 503, "overloaded", "the server is busy (no database connection free); nothing was done, retry",
        headers={"Retry-After": "1"},
    )


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    ref = new_id("err")
    log.error("unhandled error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
    return problem_response(
        request, 500, "internal_error", f"an unexpected error occurred (reference {ref}); it was logged"
    )


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(UploadTooLarge, _too_large)
    app.add_exception_handler(StorageUnavailable, _storage_down)
    app.add_exception_handler(StorageFull, _storage_full)
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(DataError, _bad_data)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _pool_exhausted)
    app.add_exception_handler(Exception, _crash)
