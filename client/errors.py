"""Typed errors of the SDK: one class per problem+json status family, plus job outcomes.

Names are chosen not to collide with pydantic's ``ValidationError``, SQLAlchemy's ``IntegrityError``
or the worker's ``JobCancelled``/``StepFailed``: code that imports several of them stays readable.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any

from pydantic import ValidationError

from models.spec import step_types


class ModelpressError(Exception):
    """Base of every error the SDK raises."""


class ConnectionFailed(ModelpressError):
    """The server could not be reached (after retries)."""


class APIError(ModelpressError):
    """An HTTP error answered with an RFC 9457 problem+json body (or something close to it)."""

    def __init__(
        self,
        status: int,
        detail: str,
        code: str | None = None,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.code = code or ""
        self.title = title or ""
        # ``[{field, message}]`` as the server sends them (api/errors.py), for validation problems.
        self.errors = errors or []
        self.body = body
        # Seconds the server asked the client to wait (``Retry-After``), if it said.
        self.retry_after = retry_after
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.status} {self.code or self.title or 'error'}: {self.detail}"
        fields = self.fields()
        if fields:
            text += f" (field: {', '.join(fields)})"
        return text

    def fields(self) -> list[str]:
        """Dotted paths of the offending fields named by a validation problem (``errors[].field``)."""
        return [str(err["field"]) for err in self.errors if err.get("field")]


class APIBadRequest(APIError):
    """400."""


class AuthenticationFailed(APIError):
    """401 or 403: missing or wrong API key."""


class ResourceNotFound(APIError):
    """404 (another owner's resource is a 404 too)."""


class ResourceConflict(APIError):
    """409 (for example, cancelling a finished job, or an idempotency key reused with another spec)."""


class PayloadTooLarge(APIError):
    """413: the upload is over the server's limit."""


class APIValidationError(APIError):
    """422: the request was understood but invalid; ``errors`` names the fields."""


class APIUnavailable(APIError):
    """503 (after retries)."""


class APIServerError(APIError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: APIBadRequest,
    401: AuthenticationFailed,
    403: AuthenticationFailed,
    404: ResourceNotFound,
    409: ResourceConflict,
    413: PayloadTooLarge,
    422: APIValidationError,
    503: APIUnavailable,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_for(status: int, body: Any, text: str = "", retry_after: float | None = None) -> APIError:
    """The typed error for an HTTP ``status`` and its (decoded) problem+json ``body``."""
    cls = _BY_STATUS.get(status) or (APIServerError if status >= 500 else APIError)
    if not isinstance(body, dict):
        return cls(status, text or f"HTTP {status}", body=body, retry_after=retry_after)
    detail = body.get("detail")
    errors = body.get("errors")
    return cls(
        status,
        str(detail if detail is not None else body.get("title") or text or "error"),
        code=body.get("code"),
        title=body.get("title"),
        errors=[e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else None,
        body=body,
        retry_after=retry_after,
    )


_STEP_IN_MESSAGE = re.compile(r"^(steps\.\d+):\s*(.*)$", re.S)


def _local_field(err: Any, step_tags: set[str]) -> dict[str, Any]:
    """A local pydantic error in the server's shape: ``{field, message}`` (``steps.1`` from the message)."""
    loc = list(err.get("loc", ()))
    parts = [
        str(p) for i, p in enumerate(loc)
        if not (isinstance(p, str) and (p[:1].isupper() or (p in step_tags and i >= 2 and loc[i - 2] == "steps")))
    ]
    field = ".".join(parts)
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    match = _STEP_IN_MESSAGE.match(message)
    if match and not field:
        field, message = match.group(1), match.group(2)  # a model validator's "steps.1: ..." message
    return {"field": field or "spec", "message": message}


def spec_validation_error(exc: ValidationError) -> APIValidationError:
    """A 422-like error for a spec that failed local validation, its fields named as the server names them."""
    tags = set(step_types())
    errors = [_local_field(e, tags) for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return APIValidationError(422, detail, code="invalid_spec", errors=errors)


class ChecksumMismatch(ModelpressError):
    """A downloaded artifact does not match the sha256 the server recorded for it."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"{name}: sha256 mismatch (expected {expected}, got {actual})")
        self.name = name
        self.expected = expected
        self.actual = actual


class JobFailed(ModelpressError):
    """The job ended ``failed``; carries the server's error code, message and failing step."""

    def __init__(self, job: Any, code: str, message: str, step: str | None = None) -> None:
        where = f" in step {step}" if step else ""
        super().__init__(f"job {getattr(job, 'id', '?')} failed{where}: {code}: {message}")
        self.job = job
        self.code = code
        self.message = message
        self.step = step


class JobWasCancelled(ModelpressError):
    """The job ended ``cancelled``."""

    def __init__(self, job: Any) -> None:
        super().__init__(f"job {getattr(job, 'id', '?')} was cancelled")
        self.job = job


class WaitTimeout(ModelpressError, TimeoutError):
    """``Job.wait`` gave up before the job reached a terminal state."""
