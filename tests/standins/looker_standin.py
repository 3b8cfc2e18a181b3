"""
A local stand-in for the Looker API 4.0, faithful enough for the unmodified ``looker_sdk``.

It serves the Looks of :mod:`.looker_fixtures` over plain HTTP (or HTTPS with a given certificate) on
127.0.0.1::

    with LookerStandIn() as looker:           # free port, credentials looker-demo-id / looker-demo-secret
        sdk = looker_sdk.init40(...)           # base_url = looker.base_url
        looker.add_look(generated_look(1_000_000, look_id="900"))
        looker.fail_next_runs(2, status=503)   # fault injection
        looker.garble_after("1", 3)             # the body goes on with a proxy's HTML page after 3 rows
        looker.answer_html_next_runs(1)         # HTTP 200 with a text/html page instead of the result
        assert looker.counters["runs"] == 1

Endpoints: ``POST /api/4.0/login``, ``DELETE /api/logout`` and ``/api/4.0/logout``, ``GET /api/versions``,
``GET /api/4.0/user``, ``GET /api/4.0/looks/{id}`` and ``GET /api/4.0/looks/{id}/run/{json|json_detail|csv}``.
Errors have Looker's shape ``{"message", "documentation_url"}``; the documentation URLs use the
``https://docs.cloud.google.com/looker/docs/r/err/`` form, which looker_sdk does not try to download.

Run it by hand with ``python -m standins.looker_standin --port 0``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from standins.looker_fixtures import (
    CSV,
    JSON_DETAIL,
    RESULT_FORMATS,
    FixtureLook,
    fixture_looks,
    resolve_generated,
)
from standins.processes import ThreadedStandIn

DEFAULT_CLIENT_ID = "looker-demo-id"
DEFAULT_CLIENT_SECRET = "looker-demo-secret"
API_PREFIX = "/api/4.0"
DOCS_BASE = "https://docs.cloud.google.com/looker/docs/r/err/4.0"
#: Rows per HTTP chunk of a streamed result.
DEFAULT_CHUNK_ROWS = 2000

_LOOK_PATH = re.compile(r"^/api/4\.0/looks/([^/]+)$")
_RUN_PATH = re.compile(r"^/api/4\.0/looks/([^/]+)/run/([^/]+)$")
_TRUE = frozenset({"true", "1", "yes"})
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


@dataclass
class _Faults:
    """Fault injection settings; guarded by the stand-in's lock."""

    # look id -> [rows, times left, bytes sent after the rows (None: close the connection instead)]
    cut_after: dict[str, list[Any]] = field(default_factory=dict)
    fail_runs: int = 0
    fail_status: int = 503
    fail_retry_after: float | None = 0
    html_runs: int = 0
    html_echo: bool = False
    drop_runs: int = 0
    delay: float = 0.0
    delay_prefix: str = API_PREFIX


class LookerStandIn(ThreadedStandIn):
    """
    A Looker API 4.0 stand-in on 127.0.0.1 (``ThreadingHTTPServer``; thread-safe counters and records).

    :param client_id: the accepted API client id.
    :param client_secret: the accepted API client secret.
    :param host: interface to bind.
    :param port: port to bind; ``0`` picks a free port.
    :param token_lifetime: seconds an access token stays valid on the server.
    :param advertised_token_lifetime: the ``expires_in`` answered at login (default: ``token_lifetime``);
        a larger value than ``token_lifetime`` makes tokens expire while the client still trusts them.
    :param looks: the Looks by id (default: :func:`.looker_fixtures.fixture_looks`).
    :param tls_certfile: PEM certificate; with ``tls_keyfile`` the stand-in speaks HTTPS.
    :param tls_keyfile: PEM private key.
    :param chunk_rows: rows per HTTP chunk of a streamed result.
    """

    def __init__(
        self,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: float = 3600.0,
        advertised_token_lifetime: int | None = None,
        looks: dict[str, FixtureLook] | None = None,
        tls_certfile: str | None = None,
        tls_keyfile: str | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.host = host
        self.port = port
        self.token_lifetime = token_lifetime
        self.advertised_token_lifetime = advertised_token_lifetime
        self.chunk_rows = chunk_rows
        self._looks = fixture_looks() if looks is None else dict(looks)
        self._ssl_context = _server_ssl_context(tls_certfile, tls_keyfile)
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._looks_run: set[str] = set()
        self._requests: list[RecordedRequest] = []
        self._counters: Counter[str] = Counter()
        self._faults = _Faults()

    # --- life cycle -----------------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """``https`` when a certificate was given, else ``http``."""
        return "https" if self._ssl_context else "http"

    @property
    def base_url(self) -> str:
        """``scheme://127.0.0.1:PORT`` of the running server."""
        if self._serving is None:
            raise RuntimeError("the Looker stand-in is not running")
        return f"{self.scheme}://{self.host}:{self._serving.port}"

    _thread_name = "looker-standin"

    def _make_server(self) -> _Server:
        return _Server((self.host, self.port), _Handler, self, self._ssl_context)

    # --- Looks ----------------------------------------------------------------------------------------

    def add_look(self, look: FixtureLook) -> FixtureLook:
        """Add (or replace) a Look at runtime and return it."""
        with self._lock:
            self._looks[look.id] = look
        return look

    def remove_look(self, look_id: str | int) -> None:
        """Remove a Look, so that it answers 404."""
        with self._lock:
            self._looks.pop(str(look_id), None)

    def look(self, look_id: str | int) -> FixtureLook | None:
        """Return the Look with this id (fixture, added, or generated from the reserved id range)."""
        look_id = str(look_id)
        with self._lock:
            found = self._looks.get(look_id)
        return found if found is not None else resolve_generated(look_id)

    # --- tokens ---------------------------------------------------------------------------------------

    def issue_token(self) -> str:
        """Issue an access token (as a successful login does)."""
        token = secrets.token_urlsafe(30)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime
        return token

    def token_valid(self, token: str) -> bool:
        """Whether ``token`` was issued, is not revoked and has not expired."""
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and expires > time.monotonic()

    def revoke_token(self, token: str) -> None:
        """Revoke one token (logout)."""
        with self._lock:
            self._tokens.pop(token, None)

    def revoke_tokens(self) -> int:
        """Revoke every token, as if they had all expired; return how many there were."""
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
        return count

    # --- fault injection ------------------------------------------------------------------------------

    def cut_connection_after(self, look_id: str | int, rows: int, *, times: int = 1) -> None:
        """Close the connection after ``rows`` rows of the next ``times`` runs of a Look (no final chunk)."""
        with self._lock:
            self._faults.cut_after[str(look_id)] = [rows, times, None]

    def garble_after(
        self, look_id: str | int, rows: int, *, garbage: bytes = PROXY_PAGE, times: int = 1
    ) -> None:
        """After ``rows`` rows of the next ``times`` runs of a Look, send ``garbage`` and end the body."""
        with self._lock:
            self._faults.cut_after[str(look_id)] = [rows, times, garbage]

    def answer_html_next_runs(self, count: int, *, echo_authorization: bool = False) -> None:
        """
        Answer the next ``count`` Look runs with HTTP 200 and a ``text/html`` page, as a proxy or single
        sign-on gateway in front of Looker may; ``echo_authorization`` quotes the request's credentials in it.
        """
        with self._lock:
            self._faults.html_runs = count
            self._faults.html_echo = echo_authorization

    def fail_next_runs(self, count: int, *, status: int = 503, retry_after: float | None = 0) -> None:
        """Answer the next ``count`` Look runs with ``status`` (and ``Retry-After`` unless ``None``)."""
        with self._lock:
            self._faults.fail_runs = count
            self._faults.fail_status = status
            self._faults.fail_retry_after = retry_after

    def drop_next_runs(self, count: int) -> None:
        """Close the connection of the next ``count`` Look runs without answering."""
        with self._lock:
            self._faults.drop_runs = count

    def set_delay(self, seconds: float, *, path_prefix: str = API_PREFIX) -> None:
        """Wait ``seconds`` before answering requests whose path starts with ``path_prefix``."""
        with self._lock:
            self._faults.delay = seconds
            self._faults.delay_prefix = path_prefix

    def clear_faults(self) -> None:
        """Remove every injected fault and delay."""
        with self._lock:
            self._faults = _Faults()

    # --- records --------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def run_requests(self) -> list[RecordedRequest]:
        """The requests that ran a Look."""
        return [r for r in self.requests if "/run/" in r.path]

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters (``logins``, ``failed_logins``, ``unauthorized``, ``runs``, ...)."""
        with self._lock:
            return dict(self._counters)

    def clear_records(self) -> None:
        """Forget the recorded requests and reset the counters."""
        with self._lock:
            self._requests.clear()
            self._counters.clear()

    # --- used by the request handler ------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._counters["requests"] += 1

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def _take_run_fault(self, look_id: str) -> tuple[str, Any] | None:
        """
        Consume this run's fault: ``("drop", None)``, ``("fail", (status, retry))``, ``("html", echo)`` or
        ``("cut", (rows, garbage or None))``.
        """
        with self._lock:
            faults = self._faults
            if faults.drop_runs > 0:
                faults.drop_runs -= 1
                return ("drop", None)
            if faults.fail_runs > 0:
                faults.fail_runs -= 1
                return ("fail", (faults.fail_status, faults.fail_retry_after))
            if faults.html_runs > 0:
                faults.html_runs -= 1
                return ("html", faults.html_echo)
            cut = faults.cut_after.get(look_id)
            if cut is not None:
                cut[1] -= 1
                if cut[1] <= 0:
                    del faults.cut_after[look_id]
                return ("cut", (cut[0], cut[2]))
        return None

    def _mark_run(self, look_id: str) -> bool:
        """Count a run of ``look_id``; return whether the Look had run before (a cache hit)."""
        with self._lock:
            self._counters["runs"] += 1
            seen = look_id in self._looks_run
            self._looks_run.add(look_id)
        return seen

    def _delay_for(self, path: str) -> float:
        with self._lock:
            return self._faults.delay if path.startswith(self._faults.delay_prefix) else 0.0

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


def _server_ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """Build the server's TLS context, or ``None`` for plain HTTP."""
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


class _Server(ThreadingHTTPServer):
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


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 request handler of the stand-in (keep-alive; chunked transfer for results)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: do not wait for delayed ACKs
    server: _Server
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

    # --- routes ---------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        record, query = self._begin()
        body = self._read_body()
        if record.path == f"{API_PREFIX}/login":
            self._login(record, query, body)
        else:
            self._send_error(record, 404, "Not found", record.path.removeprefix(f"{API_PREFIX}/"))

    def do_DELETE(self) -> None:
        record, _ = self._begin()
        self._read_body()
        if record.path not in ("/api/logout", f"{API_PREFIX}/logout"):
            self._send_error(record, 404, "Not found", record.path.removeprefix(f"{API_PREFIX}/"))
            return
        if not self._authorized(record, "logout"):
            return
        self.standin.revoke_token((self.headers.get("Authorization") or "").partition(" ")[2].strip())
        self.standin._count("logouts")
        record.status = 204
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        record, query = self._begin()
        path = record.path
        if path == "/api/versions":
            self._send_json(record, 200, _versions(self.standin))
            return
        run = _RUN_PATH.match(path)
        if run:
            self._run_look(record, query, run.group(1), run.group(2))
            return
        look = _LOOK_PATH.match(path)
        if look:
            self._get_look(record, look.group(1))
        elif path == f"{API_PREFIX}/user":
            if self._authorized(record, "user"):
                self._send_json(record, 200, _api_user())
        else:
            self._send_error(record, 404, "Not found", path.removeprefix(f"{API_PREFIX}/"))

    def _login(self, record: RecordedRequest, query: dict[str, str], body: bytes) -> None:
        form = dict(query)
        if body:
            form.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        standin = self.standin
        id_ok = hmac.compare_digest(form.get("client_id", "").encode(), standin.client_id.encode())
        secret_ok = hmac.compare_digest(
            form.get("client_secret", "").encode(), standin.client_secret.encode()
        )
        if not (id_ok and secret_ok):
            standin._count("failed_logins")
            self._send_error(record, 404, "Not found", "login")
            return
        standin._count("logins")
        expires_in = standin.advertised_token_lifetime
        if expires_in is None:
            expires_in = int(standin.token_lifetime)
        token = standin.issue_token()
        self._send_json(
            record,
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "refresh_token": None},
        )

    def _get_look(self, record: RecordedRequest, look_id: str) -> None:
        if not self._authorized(record, "looks/:look_id"):
            return
        look = self.standin.look(look_id)
        if look is None:
            self._send_error(record, 404, "Not found", "looks/:look_id")
            return
        self._send_json(record, 200, look.look_json())

    def _run_look(self, record: RecordedRequest, query: dict[str, str], look_id: str, fmt: str) -> None:
        template = "looks/:look_id/run/:result_format"
        if not self._authorized(record, template):
            return
        look = self.standin.look(look_id)
        if look is None or look.deleted:
            self._send_error(record, 404, "Not found", template)
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
            self._send_body(record, 200, "text/html; charset=utf-8", _proxy_page(echo))
            return
        cut, garbage = fault[1] if fault and fault[0] == "cut" else (None, None)
        cached = ran_before and query.get("cache", "true").lower() in _TRUE
        self._stream_result(record, look, fmt, query, cut, cached, garbage)

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
        if look.looker_error is not None:
            self._write_chunk(json.dumps([{"looker_error": look.looker_error}]).encode())
            self._end_chunks()
            return
        rows_sent = 0
        try:
            for piece, rows in _result_pieces(look, fmt, query, self.standin.chunk_rows, cut, cached):
                self._write_chunk(piece)
                rows_sent += rows
        finally:
            self.standin._count("rows_sent", rows_sent)
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


def _result_pieces(
    look: FixtureLook, fmt: str, query: dict[str, str], chunk_rows: int, cut: int | None, cached: bool
) -> Iterator[tuple[bytes, int]]:
    """Yield ``(bytes, rows in them)`` of a Look's result: prefix, row chunks, suffix (no suffix when cut)."""
    total = _rows_to_send(look, query.get("limit"))
    if cut is not None:
        total = min(total, cut)
    apply_vis = query.get("apply_vis", "false").lower() in _TRUE
    columns = look.columns(apply_vis)
    if fmt == JSON_DETAIL:
        prefix, suffix = _detail_frame(look, apply_vis, cached)
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
        yield lead + look.encode_rows(fmt, columns, start, stop), stop - start
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


def _detail_frame(look: FixtureLook, apply_vis: bool, cached: bool) -> tuple[bytes, bytes]:
    """Return the ``json_detail`` body around the rows: meta keys then ``"data":[``, and ``],...}``."""
    meta = {
        "id": f"q{look.id}",
        "from_cache": cached,
        "fields": look.detail_fields(apply_vis),
        "pivots": look.detail_pivots(),
        "ran_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime": "0.042",
        "has_totals": False,
        "has_subtotals": False,
        "has_row_totals": False,
        "sql": f"SELECT ... FROM {look.view} LIMIT {look.limit or 5000}",
    }
    head = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
    prefix = head[:-1].encode() + b',"data":['
    suffix = b'],"null_sort_treatment":"low","expired":false}'
    return prefix, suffix


def _proxy_page(authorization: str | None = None) -> bytes:
    """The page of a gateway in front of Looker; a debugging one quotes the request's ``Authorization``."""
    echo = f"<!-- request headers: Authorization: {authorization} -->\n" if authorization else ""
    return PROXY_PAGE.replace(b"<body>\n", f"<body>\n{echo}".encode(), 1)


def _api_user() -> dict[str, Any]:
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


def _versions(standin: LookerStandIn) -> dict[str, Any]:
    """The answer of ``GET /api/versions``."""
    version = {"version": "4.0", "full_version": "4.0.25.0", "status": "current", "swagger_url": ""}
    return {
        "looker_release_version": "25.0.0",
        "current_version": version,
        "supported_versions": [version],
        "api_server_url": standin.base_url,
        "web_server_url": standin.base_url,
    }


def main(argv: list[str] | None = None) -> int:
    """Serve the stand-in until interrupted (``python -m ...looker_standin --port 0``)."""
    parser = argparse.ArgumentParser(description="Run the local Looker API 4.0 stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (default)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    parser.add_argument("--token-lifetime", type=float, default=3600.0, help="seconds")
    parser.add_argument("--tls-cert", help="PEM certificate (serve HTTPS)")
    parser.add_argument("--tls-key", help="PEM private key")
    args = parser.parse_args(argv)
    standin = LookerStandIn(
        args.client_id,
        args.client_secret,
        host=args.host,
        port=args.port,
        token_lifetime=args.token_lifetime,
        tls_certfile=args.tls_cert,
        tls_keyfile=args.tls_key,
    )
    url = standin.start()
    conn = {"conn_type": "looker", "host": url, "login": args.client_id, "password": args.client_secret}
    print(f"Looker API stand-in listening on {url}", flush=True)
    print(f"client_id={args.client_id} client_secret={args.client_secret}", flush=True)
    print(f"AIRFLOW_CONN_LOOKER_DEFAULT='{json.dumps(conn)}'", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
