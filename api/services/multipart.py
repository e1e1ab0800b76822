"""A streaming multipart/form-data parser for uploads: the ``file`` part flows through, small text fields are kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ProblemError, field_error

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class MultipartStream:
    """Parses a multipart/form-data body as it streams: yields the ``file`` part, keeps small text fields."""

    def __init__(self, request: Request, file_field: str = "file") -> None:
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise ProblemError(
                415, "unsupported_media_type", "send multipart/form-data with a 'file' part (curl -F file=@PATH)"
            )
        self.request = request
        self.file_field = file_field
        self.boundary = params[b"boundary"]
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.saw_file = False
        self._pending: list[bytes] = []
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _disp, params = parse_options_header(self._part.headers.get("content-disposition", ""))
        part = self._part
        part.name = params.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = params.get(b"filename")
        part.filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
        if part.name == self.file_field:
            if self.saw_file:
                raise ProblemError(422, "validation_error", "file: send exactly one 'file' part",
                                   errors=[{"field": "file", "message": "send exactly one 'file' part"}])
            part.is_file = True
            self.saw_file = True
            self.filename = part.filename

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.is_file:
            self._pending.append(bytes(data[start:end]))
            return
        self._part.data += data[start:end]
        if len(self._part.data) > MAX_FIELD_BYTES:
            raise field_error(422, "validation_error", self._part.name or "form", "form field too large")

    def _on_part_end(self) -> None:
        part = self._part
        if not part.is_file and part.name:
            self.fields[part.name] = part.data.decode("utf-8", "replace")
        self._part = _Part()

    def _on_part_begin(self) -> None:
        self._part = _Part()

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The bytes of the ``file`` part as they arrive; afterwards ``fields`` holds the other parts."""
        parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
            },
        )
        async for chunk in self.request.stream():
            try:
                parser.write(chunk)
            except ProblemError:
                raise
            except Exception as exc:
                raise ProblemError(400, "bad_request", f"malformed multipart body: {exc}") from exc
            while self._pending:
                yield self._pending.pop(0)
        parser.finalize()
        while self._pending:
            yield self._pending.pop(0)
        if not self.saw_file:
            raise field_error(422, "validation_error", "file", "the multipart body has no 'file' part")
