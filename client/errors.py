"""Typed errors of the SDK: one class per problem+json status family, plus job outcomes."""

from __future__ import annotations

from typing import Any


class ModelpressError(Exception):
    """Base of every error the SDK raises."""


class ConnectionFailed(ModelpressError):
    """The server could not be reached (after retries)."""


class ApiError(ModelpressError):
    """An HTTP error answered with an RFC 9457 problem+json body (or something close to it)."""

    def __init__(
        self,
        status: int,
        detail: str,
        code: str | None = None,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.code = code or ""
        self.title = title or ""
        self.errors = errors or []
        self.body = body
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.status} {self.code or self.title or 'error'}: {self.detail}"
        fields = self.fields()
        if fields:
            text += f" (field: {', '.join(fields)})"
        return text

    def fields(self) -> list[str]:
        """Dotted paths of the offending fields named by a validation problem."""
        out: list[str] = []
        for err in self.errors:
            loc = err.get("loc") or err.get("field") or err.get("path")
            if isinstance(loc, list | tuple):
                out.append(".".join(str(p) for p in loc))
            elif loc:
                out.append(str(loc))
        return out


class BadRequest(ApiError):
    """400."""


class Unauthorized(ApiError):
    """401 or 403: missing or wrong API key."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409 (for example, cancelling a finished job, or an idempotency key reused with another spec)."""


class PayloadTooLarge(ApiError):
    """413: the upload is over the server's limit."""


class ValidationError(ApiError):
    """422: the request was understood but invalid; ``errors`` names the fields."""


class ServiceUnavailable(ApiError):
    """503 (after retries)."""


class ServerError(ApiError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    503: ServiceUnavailable,
}


def error_for(status: int, body: Any, text: str = "") -> ApiError:
    """The typed error for an HTTP ``status`` and its (decoded) problem+json ``body``."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    if isinstance(body, dict):
        detail = body.get("detail")
        errors = body.get("errors")
        if isinstance(detail, list):  # FastAPI's default 422 shape
            errors, detail = detail, "validation failed"
        return cls(
            status,
            str(detail if detail is not None else body.get("title") or text or "error"),
            code=body.get("code"),
            title=body.get("title"),
            errors=errors if isinstance(errors, list) else None,
            body=body,
        )
    return cls(status, text or f"HTTP {status}", body=body)


class IntegrityError(ModelpressError):
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


class JobCancelled(ModelpressError):
    """The job ended ``cancelled``."""

    def __init__(self, job: Any) -> None:
        super().__init__(f"job {getattr(job, 'id', '?')} was cancelled")
        self.job = job
