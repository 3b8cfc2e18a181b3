"""
The HTTP side of the Looker API stand-in: the server, the request handler's plumbing (recording, errors in
Looker's shapes, authorisation) and result bodies streamed in chunks. The routes are in
:mod:`.looker_standin` (Looks, login) and :mod:`.looker_query_routes` (queries, query tasks).
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from standins.looker_fixtures import CSV, JSON_DETAIL, RESULT_FORMATS, FixtureLook
from standins.looker_sql import generated_sql

if TYPE_CHECKING:
    from standins.looker_standin import LookerStandIn

DEFAULT_CLIENT_ID = "looker-demo-id"
DEFAULT_CLIENT_SECRET = "looker-demo-secret"
API_PREFIX = "/api/4.0"
DOCS_BASE = "https://docs.cloud.google.com/looker/docs/r/err/4.0"
#: The result format that answers the query's SQL (``run_query``, ``run_look``: "Returns the generated SQL
#: rather than running the query").
SQL = "sql"
#: Rows per HTTP chunk of a streamed result.
DEFAULT_CHUNK_ROWS = 2000

TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})
#: What a proxy or single sign-on gateway in front of Looker answers instead of the result (HTTP 200).
PROXY_PAGE = (
    b"<!DOCTYPE html>\n<html>\n<head><title>Sign in - Corporate Access Gateway</title></head>\n<body>\n"
    b"<h1>Your session has expired</h1>\n<p>Sign in again to reach   looker.example.com.</p>\n"
    b"</body>\n</html>\n"
)


@dataclass
class RecordedRequest:
    """
    One request the stand-in received.

    :param method: HTTP method.
    :param path: URL path without the query string.
    :param query: query parameters (last value wins).
    :param authorization: an ``Authorization`` header was sent.
    :param auth_scheme: the header's scheme in lower case (``bearer`` or ``token``), if any.
    :param status: the HTTP status answered (``None`` when the connection was dropped).
    """

    method: str
    path: str
    query: dict[str, str]
    authorization: bool
    auth_scheme: str | None
    status: int | None = None


class Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that knows its stand-in and does the TLS handshake in the request thread."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        standin: LookerStandIn,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(address, handler)
        self.standin = standin
        self.ssl_context = ssl_context

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Wrap the connection in TLS (in the request's thread) before handling it."""
        if self.ssl_context is not None:
            try:
                request.settimeout(10)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError):
                return  # e.g. a client that does not trust the certificate
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up (tests cut connections on purpose)."""


class HandlerBase(BaseHTTPRequestHandler):
    """The plumbing of the stand-in's HTTP/1.1 request handler (keep-alive; chunked transfer for results)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: do not wait for delayed ACKs
    server: Server
    server_version = "LookerStandIn/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Do not log requests to stderr."""

    # --- plumbing -------------------------------------------------------------------------------------

    @property
    def standin(self) -> LookerStandIn:
        return self.server.standin

    def _begin(self) -> tuple[RecordedRequest, dict[str, str]]:
        """Parse and record the request; apply an injected delay."""
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        header = self.headers.get("Authorization")
        scheme = header.split(" ", 1)[0].lower() if header else None
        record = RecordedRequest(self.command, parts.path, query, header is not None, scheme)
        self.standin._record(record)
        delay = self.standin._delay_for(parts.path)
        if delay:
            self.standin._wait(delay)
        return record, query

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, record: RecordedRequest, status: int, payload: Any) -> None:
        self._send_body(record, status, "application/json", json.dumps(payload).encode())

    def _send_body(self, record: RecordedRequest, status: int, content_type: str, body: bytes) -> None:
        """Answer ``status`` with a whole body."""
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(
        self,
        record: RecordedRequest,
        status: int,
        message: str,
        template: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer a Looker-shaped error; ``template`` is the route, e.g. ``looks/:look_id``."""
        doc = f"{DOCS_BASE}/{status}/{self.command.lower()}/{template}"
        body = json.dumps({"message": message, "documentation_url": doc}).encode()
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self, record: RecordedRequest, template: str) -> bool:
        """Check ``Authorization: Bearer|token <token>``; answer 401 when it is missing or invalid."""
        header = self.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() in ("bearer", "token") and self.standin.token_valid(token.strip()):
            return True
        self.standin._count("unauthorized")
        self._send_error(record, 401, "Requires authentication.", template)
        return False

    def _send_empty(self, record: RecordedRequest, status: int) -> None:
        """Answer ``status`` with no body (``204 No Content``, ``202 Accepted``)."""
        record.status = status
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_validation(
        self, record: RecordedRequest, template: str, errors: list[tuple[str, str, str]]
    ) -> None:
        """Answer 422 with Looker's ``ValidationError``: ``errors`` of ``(field, code, message)``."""
        doc = f"{DOCS_BASE}/422/{self.command.lower()}/{template}"
        details = [
            {"field": name, "code": code, "message": message, "documentation_url": doc}
            for name, code, message in errors
        ]
        payload = {"message": "Validation Failed", "errors": details, "documentation_url": doc}
        self._send_json(record, 422, payload)

    def _json_body(self, record: RecordedRequest, body: bytes, template: str) -> dict[str, Any] | None:
        """The request's JSON object, or ``None`` after answering 400."""
        try:
            value = json.loads(body or b"null")
        except ValueError:
            value = None
        if not isinstance(value, dict):
            self._send_error(record, 400, "The request body is not a JSON object.", template)
            return None
        return value

    def _serve_run(
        self, record: RecordedRequest, params: dict[str, str], look: FixtureLook, fmt: str, template: str
    ) -> None:
        """
        Run ``look`` (count it, apply the next run fault) and stream its result in ``fmt``; ``sql`` answers
        the SQL Looker would run, without running it.
        """
        if fmt == SQL:
            sql = generated_sql(look, params.get("limit"))
            self._send_body(record, 200, "text/plain; charset=utf-8", sql.encode())
            return
        if fmt not in RESULT_FORMATS:
            self._send_error(record, 400, f"Unsupported result format: {fmt}", template)
            return
        ran_before = self.standin._mark_run(look.id)
        fault = self.standin._take_run_fault(look.id)
        if fault and fault[0] == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault and fault[0] == "fail":
            status, retry_after = fault[1]
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            self._send_error(record, status, "Service temporarily unavailable.", template, headers)
            return
        if fault and fault[0] == "html":
            echo = self.headers.get("Authorization") if fault[1] else None
            self._send_body(record, 200, "text/html; charset=utf-8", proxy_page(echo))
            return
        cut, garbage = fault[1] if fault and fault[0] == "cut" else (None, None)
        cached = ran_before and params.get("cache", "true").lower() in TRUE_WORDS
        self._stream_result(record, look, fmt, params, cut, cached, garbage)

    # --- results --------------------------------------------------------------------------------------

    def _stream_result(
        self,
        record: RecordedRequest,
        look: FixtureLook,
        fmt: str,
        query: dict[str, str],
        cut: int | None,
        cached: bool,
        garbage: bytes | None = None,
    ) -> None:
        """
        Send the result in HTTP chunks; ``cut`` closes the connection after so many rows, or, with
        ``garbage``, sends it instead of the rest and ends the body.
        """
        record.status = 200
        self.send_response(200)
        content_type = "text/csv" if fmt == CSV else "application/json"
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if look.looker_error is not None:  # json_detail: its own shape, errors and no data (the reference)
            error = (
                detail_error_body(look, look.looker_error, None)
                if fmt == JSON_DETAIL
                else json.dumps([{"looker_error": look.looker_error}]).encode()
            )
            self._write_chunk(error)
            self._end_chunks()
            return
        rows_sent = body_bytes = 0
        pause = self.standin._take_pause(look.id)
        try:
            for piece, rows in result_pieces(look, fmt, query, self.standin.chunk_rows, cut, cached):
                self._write_chunk(piece)
                rows_sent += rows
                body_bytes += len(piece)
                if pause is not None and rows_sent >= pause[0]:
                    self.wfile.flush()
                    self.standin._wait(pause[1])
                    pause = None
        finally:
            self.standin._count("rows_sent", rows_sent)
            self.standin._count("result_bytes", body_bytes)
        if garbage is not None:
            self._write_chunk(garbage)
        elif cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._end_chunks()

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


def result_pieces(
    look: FixtureLook, fmt: str, query: dict[str, str], chunk_rows: int, cut: int | None, cached: bool
) -> Iterator[tuple[bytes, int]]:
    """Yield ``(bytes, rows in them)`` of a Look's result: prefix, row chunks, suffix (no suffix when cut)."""
    total = _rows_to_send(look, query.get("limit"))
    if cut is not None:
        total = min(total, cut)
    apply_vis = query.get("apply_vis", "false").lower() in TRUE_WORDS
    links = query.get("generate_drill_links", "true").lower() not in FALSE_WORDS  # Looker's default: true
    columns = look.columns(apply_vis)
    if fmt == JSON_DETAIL:
        prefix, suffix = _detail_frame(look, apply_vis, cached, query.get("limit"))
    elif fmt == CSV:
        prefix, suffix = look.csv_header(columns), b""
    else:
        prefix, suffix = b"[", b"]"
    step = max(1, chunk_rows)
    separator = b"" if fmt == CSV else b","
    yield prefix, 0
    for start in range(0, total, step):
        stop = min(total, start + step)
        lead = separator if start else b""
        yield lead + look.encode_rows(fmt, columns, start, stop, links and fmt == JSON_DETAIL), stop - start
    if cut is None:
        yield suffix, 0


def _rows_to_send(look: FixtureLook, limit: str | None) -> int:
    """Rows a run returns: ``limit`` (``-1`` = all), or the Look's saved limit when absent."""
    if limit is None or limit == "":
        wanted = look.saved_limit()
    else:
        try:
            wanted = int(limit)
        except ValueError:
            wanted = look.saved_limit()
    return look.row_count if wanted < 0 else min(wanted, look.row_count)


def _detail_frame(look: FixtureLook, apply_vis: bool, cached: bool, limit: Any = None) -> tuple[bytes, bytes]:
    """Return the ``json_detail`` body around the rows: meta keys then ``"data":[``, and ``],...}``."""
    meta = {
        "id": f"q{look.id}",
        "from_cache": cached,
        "fields": look.detail_fields(apply_vis),
        "pivots": look.detail_pivots(),
        "ran_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"timezone": look.query_timezone} if look.query_timezone else {}),
        "runtime": "0.042",
        "has_totals": False,
        "has_subtotals": False,
        "has_row_totals": False,
        "sql": generated_sql(look, limit),
    }
    if not look.sql_in_results:
        del meta["sql"]
    head = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
    prefix = head[:-1].encode() + b',"data":['
    suffix = b'],"null_sort_treatment":"low","expired":false}'
    return prefix, suffix


def proxy_page(authorization: str | None = None) -> bytes:
    """The page of a gateway in front of Looker; a debugging one quotes the request's ``Authorization``."""
    echo = f"<!-- request headers: Authorization: {authorization} -->\n" if authorization else ""
    return PROXY_PAGE.replace(b"<body>\n", f"<body>\n{echo}".encode(), 1)


def detail_error_body(look: FixtureLook, message: str, details: str | None) -> bytes:
    """
    A ``json_detail`` result of a failed query (a run's, or a query task's): HTTP 200, no rows, the
    database's error in ``errors`` (``message``, ``message_details``, ``sql_error_loc``), after an empty
    ``data`` as the reader must expect.
    """
    error = {
        "message": message,
        "message_details": details,
        "params": {},
        "sql_error_loc": {"line": 1, "character": 87} if look.looker_error else None,
        "level": "error",
    }
    body = {
        "id": f"q{look.id}",
        "runtime": "0.042",
        "sql": f"SELECT ... FROM {look.view}",
        "data": [],
        "errors": [error],
        "expired": False,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def api_user() -> dict[str, Any]:
    """The API user answered by ``GET /user``."""
    return {
        "id": "7",
        "first_name": "Demo",
        "last_name": "API",
        "display_name": "Demo API",
        "email": "api-demo@toastmates.com",
        "is_disabled": False,
        "locale": "en",
        "role_ids": ["2"],
        "group_ids": ["1"],
    }


def versions(standin: LookerStandIn) -> dict[str, Any]:
    """The answer of ``GET /api/versions``."""
    version = {"version": "4.0", "full_version": "4.0.25.0", "status": "current", "swagger_url": ""}
    return {
        "looker_release_version": "25.0.0",
        "current_version": version,
        "supported_versions": [version],
        "api_server_url": standin.base_url,
        "web_server_url": standin.base_url,
    }
