"""A cap on JSON request bodies (POST /v1/jobs), counted while reading, and their media type.

Pure ASGI middleware: FastAPI reads a whole body before any dependency runs, so the limit has to
sit in front of it. The body is buffered up to the limit and then replayed to the app.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import problem_response
from api.services.numbers import length_over
from models.settings import get_settings

# (method, path) of the routes whose body is a JSON document.
JSON_ROUTES = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/keys")})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JsonBodyLimit:
    """413 problem once a JSON route's body passes ``max_json_body_bytes``; 415 for another media type."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/") or "/") not in JSON_ROUTES:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        content_type = request.headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            await problem_response(request, 415, "unsupported_media_type",
                                   f"the body must be application/json, not {content_type.split(';')[0]!r}")(
                scope, receive, send)
            return
        limit = get_settings().max_json_body_bytes
        too_large = problem_response(request, 413, "body_too_large",
                                     f"the request body is larger than the limit of {limit} bytes")
        if length_over(request.headers.get("content-length"), limit):
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
