"""A multipart/form-data upload read from the request stream, counted as it arrives.

A form parser that spools the file to disk first and lets the route check its size afterwards
would let any client fill the disk (or the memory) with a body of any size. Here the body is
parsed as it streams in: a Content-Length that cannot fit is refused before a byte is read,
and a body that says nothing (chunked) or lies is cut the moment the file passes
VLLAMA_MAX_UPLOAD_BYTES. The file is held in memory only: nothing is written anywhere until
the whole upload has been checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.file_quota import shown
from common.errors import BadRequest, TooLarge

# What a multipart body may carry beyond the file's own bytes: boundaries, part headers and the
# small form fields (purpose). A Content-Length past the limit by more than this is refused
# unread; past it by less, the file's bytes are counted as they come.
ENVELOPE_BYTES = 64 * 1024
FIELD_BYTES = 4096  # a form field other than the file (purpose): a short word


@dataclass
class Upload:
    """The form of an upload: the file's bytes and name, and the other fields (purpose)."""

    content: bytearray = field(default_factory=bytearray)
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    has_file: bool = False


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the file is larger than VLLAMA_MAX_UPLOAD_BYTES ({shown(limit)}); split it into smaller "
                    "files (a batch per file), or raise VLLAMA_MAX_UPLOAD_BYTES on the server")


def refuse_early(request: Request, limit: int) -> None:
    """413 at once for a Content-Length that cannot fit; 400 for a body that is not a form."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + ENVELOPE_BYTES:
        raise too_large(limit)
    _boundary(request)


def least_file_bytes(request: Request) -> int:
    """The fewest bytes the file can have, from the Content-Length (0 when none is sent)."""
    declared = request.headers.get("content-length")
    return max(0, int(declared) - ENVELOPE_BYTES) if declared is not None and declared.isdigit() else 0


def _boundary(request: Request) -> bytes:
    kind, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BadRequest("send the file as multipart/form-data with fields `file` and `purpose` "
                         "(curl -F purpose=batch -F file=@requests.jsonl)")
    return boundary


async def read_upload(request: Request, limit: int) -> Upload:
    """The form, read from the request stream; TooLarge as soon as the file passes ``limit``."""
    refuse_early(request, limit)
    form = _Form(limit)
    try:
        parser = MultipartParser(_boundary(request), form.callbacks())
    except ValueError as exc:
        raise BadRequest(f"invalid multipart boundary: {exc}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + ENVELOPE_BYTES:  # the file is cut below; this bounds the rest
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"the upload is not a valid multipart/form-data body: {exc}") from None
    except ClientDisconnect:
        raise BadRequest("the upload ended before the whole file was sent; send it again") from None
    if not form.ended:
        raise BadRequest("the upload ended before the whole multipart body was sent; send it again")
    return form.upload


class _Form:
    """Callbacks for python_multipart's streaming parser: each part's headers, then its data."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.upload = Upload()
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers, self._name, self._is_file, self._value = {}, None, False, bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise BadRequest("each part of the upload needs a Content-Disposition: form-data header with a name")
        self._name = name.decode("utf-8", errors="replace")
        self._is_file = self._name == "file"
        if self._is_file:
            if self.upload.has_file:
                raise BadRequest("send one file per upload (the form has two `file` fields)")
            self.upload.has_file = True
            filename = params.get(b"filename")
            self.upload.filename = filename.decode("utf-8", errors="replace") if filename else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            content = self.upload.content
            if len(content) + (end - start) > self.limit:
                raise too_large(self.limit)
            content += data[start:end]
        else:
            if len(self._value) + (end - start) > FIELD_BYTES:
                raise BadRequest(f"form field `{self._name}` is longer than {FIELD_BYTES} bytes")
            self._value += data[start:end]

    def _part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.upload.fields[self._name] = self._value.decode("utf-8", errors="replace")

    def _end(self) -> None:
        self.ended = True
