"""HTML pages: the dashboard (``GET /``), a job's self-contained report, and the login that opens them in a browser."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from api.deps import DB, MaybeOwner, principal_for_key, settings_dep, unauthorized
from api.errors import ProblemError
from api.services import pages, sessions
from api.services.pagination import MAX_LIMIT
from models.settings import Settings

router = APIRouter(tags=["ui"])

# Pages are self-contained: forbid every external fetch, allow only inline styles; forms post here only.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; base-uri 'none'"
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
            "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"}
TEMPLATES = Environment(
    loader=PackageLoader("api", "templates"), autoescape=select_autoescape(default=True), undefined=StrictUndefined,
    trim_blocks=True, lstrip_blocks=True,
)
SettingsDep = Annotated[Settings, Depends(settings_dep)]


def _html(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    signed_in = sessions.COOKIE in request.cookies
    body = TEMPLATES.get_template(template).render(signed_in=signed_in, **context)
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


def _sign_in_first(request: Request) -> Response:
    """A browser without a session goes to the login page; an API client (or a wrong key) gets a 401 problem."""
    if "authorization" in request.headers or "text/html" not in request.headers.get("accept", ""):
        raise unauthorized()
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def _local(target: str | None) -> str:
    """``target`` when it is a path on this site, else ``/`` (no open redirect)."""
    parts = urlsplit(target or "/")
    if not target or parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _same_origin(request: Request) -> None:
    """403 for a form posted from another site (login CSRF); browsers send Origin on every POST."""
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise ProblemError(403, "forbidden", "cross-site form posts are refused")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard(
    request: Request, owner: MaybeOwner, db: DB,
    status: str | None = Query(None, max_length=16), limit: int = Query(MAX_LIMIT, ge=1, le=500),
) -> Response:
    """The newest jobs with status, phase, progress, and links to reports and artifacts."""
    if owner is None:
        return _sign_in_first(request)
    page = pages.dashboard(db, owner, status, min(limit, MAX_LIMIT))  # one page of the jobs service at most
    return _html(request, "dashboard.html", page=page, refresh=page.refresh)


@router.get("/v1/jobs/{job_id}/report.html", response_class=HTMLResponse)
def job_report(request: Request, job_id: str, owner: MaybeOwner, db: DB) -> Response:
    """One job's report as a single HTML page (inline CSS and SVG, no external requests)."""
    if owner is None:
        return _sign_in_first(request)
    page = pages.report_page(db, owner, job_id)
    return _html(request, "report.html", page=page, refresh=page.refresh)


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, settings: SettingsDep, next: str = Query("/", max_length=2000)) -> Response:
    """The sign-in form (straight to ``next`` when no API key is configured)."""
    if not settings.api_key:
        return RedirectResponse(_local(next), status_code=303)
    return _html(request, "login.html", next=_local(next), failed=False, refresh=None)


@router.post("/login", response_class=HTMLResponse, include_in_schema=False)
def login(
    request: Request, settings: SettingsDep,
    key: Annotated[str, Form(max_length=4096)] = "", next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    """Check the API key; on success set the HttpOnly session cookie and go to ``next``."""
    _same_origin(request)
    if not settings.api_key:
        return RedirectResponse(_local(next), status_code=303)
    principal = principal_for_key(settings, key or None)
    if principal is None:
        return _html(request, "login.html", status=401, next=_local(next), failed=True, refresh=None)
    response = RedirectResponse(_local(next), status_code=303)
    cookie = sessions.issue(settings, principal.owner, key_id=principal.key_id)  # ends when that key is revoked
    response.set_cookie(
        sessions.COOKIE, cookie, max_age=settings.session_ttl_s, path="/",
        httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", include_in_schema=False)
def logout(request: Request) -> Response:
    """End the browser session and go to the login page."""
    _same_origin(request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response
