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
        looker.end_next_query_tasks("killed")   # the next query task ends killed
        looker.fail_next_requests(2, path="/api/4.0/login", status=503, retry_after=1)  # any route
        assert looker.counters["runs"] == 1

Endpoints: ``POST /api/4.0/login``, ``DELETE /api/logout`` and ``/api/4.0/logout``, ``GET /api/versions``,
``GET /api/4.0/user``, ``GET /api/4.0/looks/{id}`` and
``GET /api/4.0/looks/{id}/run/{json|json_detail|csv|sql}``; ``GET /api/4.0/datagroups`` (their
``triggered_at`` advanced by ``looker.datagroups.trigger(model, name)``, a schedule, or
``POST /standin/datagroups/{model}/{name}/trigger``: :mod:`.looker_datagroups`); queries
(``POST /api/4.0/queries``, ``GET /api/4.0/queries/{id}[/run/{format}]``,
``GET /api/4.0/queries/slug/{slug}``, ``POST /api/4.0/queries/run/{format}``) with filters applied to the
fixture rows, and async query tasks (``POST /api/4.0/query_tasks``,
``GET /api/4.0/query_tasks/{id}[/results]``, ``DELETE /api/4.0/running_queries/{id}``): see
:mod:`.looker_query_routes` and :mod:`.looker_queries`.
Errors have Looker's shapes (``Error``: ``{"message", "documentation_url"}``; ``ValidationError`` adds
``errors``); the documentation URLs use the ``https://docs.cloud.google.com/looker/docs/r/err/`` form, which
looker_sdk does not try to download. Runs and query tasks take ``generate_drill_links`` (default true, as in
Looker): ``json_detail`` cells then carry the drill ``links`` Looker computes for them, and
``generate_drill_links=false`` leaves them out. A failed query's ``json_detail`` result (a run or a query
task's) is the ``json_detail`` shape with ``errors`` and an empty ``data``; ``json`` runs answer Looker's
``[{"looker_error": ...}]`` row.

Run it by hand with ``python -m standins.looker_standin --port 0``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import secrets
import signal
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from standins.looker_datagroups import Datagroups
from standins.looker_fixtures import FixtureLook, fixture_looks, resolve_generated
from standins.looker_http import (
    API_PREFIX,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DOCS_BASE,
    PROXY_PAGE,
    RecordedRequest,
    Server,
    api_user,
    versions,
)
from standins.looker_queries import QueryStore, QueryTasks
from standins.looker_query_routes import QueryRoutes
from standins.processes import ThreadedStandIn

__all__ = [
    "API_PREFIX",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DOCS_BASE",
    "PROXY_PAGE",
    "LookerStandIn",
    "RecordedRequest",
]

_LOOK_PATH = re.compile(r"^/api/4\.0/looks/([^/]+)$")
_RUN_PATH = re.compile(r"^/api/4\.0/looks/([^/]+)/run/([^/]+)$")
_QUERY_PATH = re.compile(r"^/api/4\.0/queries/([^/]+)$")
_QUERY_SLUG_PATH = re.compile(r"^/api/4\.0/queries/slug/([^/]+)$")
_DATAGROUP_TRIGGER_PATH = re.compile(r"^/standin/datagroups/([^/]+)/([^/]+)/trigger$")
_QUERY_RUN_PATH = re.compile(r"^/api/4\.0/queries/([^/]+)/run/([^/]+)$")
_INLINE_RUN_PATH = re.compile(r"^/api/4\.0/queries/run/([^/]+)$")
_TASK_PATH = re.compile(r"^/api/4\.0/query_tasks/([^/]+)$")
_TASK_RESULTS_PATH = re.compile(r"^/api/4\.0/query_tasks/([^/]+)/results$")
_KILL_PATH = re.compile(r"^/api/4\.0/running_queries/([^/]+)$")


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
    # look id -> [rows, seconds]: the next run of the Look pauses its body after so many rows
    pause_after: dict[str, list[Any]] = field(default_factory=dict)
    # answers of the next query task status polls: (HTTP status, Retry-After), or status 0 to close the link
    task_polls: list[tuple[int, float | None]] = field(default_factory=list)
    # answers of the next requests to a route: [method, path, status, Retry-After, times left]
    requests: list[list[Any]] = field(default_factory=list)
    # results of complete query tasks still answered "not ready" this many more times
    late_results: int = 0


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
    :param polls_per_step: how many looks at a query task (status or results requests) move it one step
        (``added`` → ``running`` → its end).
    :param pending_results_status: what ``GET /query_tasks/{id}/results`` answers while the task has not
        ended: 202 (Looker's current documentation) or 204 (older releases).
    :param validate_queries_on_create: ``POST /queries`` refuses (422) a filter on a field that is not in
        the explore; with ``False`` it stores the query and the run refuses it (400 ``Invalid filter``).
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
        polls_per_step: int = 1,
        pending_results_status: int = 202,
        validate_queries_on_create: bool = True,
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
        self._issued: list[str] = []
        self._looks_run: set[str] = set()
        self._requests: list[RecordedRequest] = []
        self._counters: Counter[str] = Counter()
        self._faults = _Faults()
        self.polls_per_step = polls_per_step
        self.pending_results_status = pending_results_status
        self.validate_queries_on_create = validate_queries_on_create
        self.queries = QueryStore()
        self.query_tasks = QueryTasks()
        self.datagroups = Datagroups()

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

    def _make_server(self) -> Server:
        return Server((self.host, self.port), _Handler, self, self._ssl_context)

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

    def all_looks(self) -> list[FixtureLook]:
        """The fixture and added Looks (not the generated ones of the reserved id range)."""
        with self._lock:
            return list(self._looks.values())

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
            self._issued.append(token)
        return token

    @property
    def issued_tokens(self) -> list[str]:
        """Every access token issued so far (revoked and expired ones too), oldest first."""
        with self._lock:
            return list(self._issued)

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

    def pause_after(self, look_id: str | int, rows: int, seconds: float) -> None:
        """
        In the next run of a Look, stop sending for ``seconds`` after ``rows`` rows (the rows sent so far
        are flushed), then send the rest: a warehouse or a network that is slow mid-result.
        """
        with self._lock:
            self._faults.pause_after[str(look_id)] = [rows, seconds]

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

    def end_next_query_tasks(self, outcome: str, count: int = 1) -> None:
        """
        Make the next ``count`` query tasks end ``error``, ``killed`` or ``expired`` (or ``complete``), or
        ``never`` end (they stay ``running``).
        """
        self.query_tasks.end_next(outcome, count)

    def fail_next_task_polls(
        self, count: int, *, status: int | None = 503, retry_after: float | None = None
    ) -> None:
        """
        Answer the next ``count`` query task status polls with ``status`` (``None``: drop the link), with
        ``Retry-After`` when given (429 is documented on every Looker operation).
        """
        with self._lock:
            self._faults.task_polls.extend([(status or 0, retry_after)] * count)

    def fail_next_requests(
        self,
        count: int,
        *,
        method: str = "POST",
        path: str = f"{API_PREFIX}/login",
        status: int = 503,
        retry_after: float | None = None,
    ) -> None:
        """
        Answer the next ``count`` requests ``method path`` (e.g. ``POST /api/4.0/login``, ``/queries``,
        ``/query_tasks``) with ``status`` in Looker's error shape, with ``Retry-After`` when given, before
        looking at them: a Looker upgrade's 503, or a 429.
        """
        with self._lock:
            self._faults.requests.append([method.upper(), path, status, retry_after, count])

    def delay_results_after_complete(self, count: int) -> None:
        """
        Answer the next ``count`` results requests of complete query tasks as if they were still running
        (``pending_results_status``), as Looker may right after a task reported ``complete``.
        """
        with self._lock:
            self._faults.late_results += count

    def clear_faults(self) -> None:
        """Remove every injected fault and delay (query task outcomes included)."""
        with self._lock:
            self._faults = _Faults()
        self.query_tasks.clear()

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

    def _take_pause(self, look_id: str) -> tuple[int, float] | None:
        """Consume the pause of the next run of ``look_id``: ``(rows, seconds)``, or ``None``."""
        with self._lock:
            pause = self._faults.pause_after.pop(look_id, None)
        return (int(pause[0]), float(pause[1])) if pause else None

    def _take_task_poll_fault(self) -> tuple[int, float | None] | None:
        """
        Consume the next status poll's fault: ``(HTTP status, Retry-After)``, status ``0`` to drop the
        connection, or ``None``.
        """
        with self._lock:
            return self._faults.task_polls.pop(0) if self._faults.task_polls else None

    def _take_request_fault(self, method: str, path: str) -> tuple[int, float | None] | None:
        """Consume a fault of the route ``method path``: ``(HTTP status, Retry-After)``, or ``None``."""
        with self._lock:
            for fault in self._faults.requests:
                if fault[0] == method and fault[1] == path and fault[4] > 0:
                    fault[4] -= 1
                    self._counters["request_faults"] += 1
                    return fault[2], fault[3]
        return None

    def _take_late_result(self) -> bool:
        """Whether this results request of a complete task is answered as if it were still running."""
        with self._lock:
            if self._faults.late_results > 0:
                self._faults.late_results -= 1
                return True
        return False

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


class _Handler(QueryRoutes):
    """The stand-in's request handler: routes (the query and query-task ones are in :class:`QueryRoutes`)."""

    def do_POST(self) -> None:
        record, query = self._begin()
        body = self._read_body()
        path = record.path
        inline = _INLINE_RUN_PATH.match(path)
        if self._injected_fault(record):
            return
        if path == f"{API_PREFIX}/login":
            self._login(record, query, body)
        elif path == f"{API_PREFIX}/queries":
            self._create_query(record, query, body)
        elif inline:
            self._run_inline_query(record, query, body, inline.group(1))
        elif path == f"{API_PREFIX}/query_tasks":
            self._create_query_task(record, query, body)
        elif found := _DATAGROUP_TRIGGER_PATH.match(path):  # the stand-in's own control route (no auth)
            try:
                value = self.standin.datagroups.trigger(found.group(1), found.group(2))
            except KeyError:
                self._send_error(record, 404, "Not found", "standin/datagroups")
                return
            self._send_json(record, 200, {"triggered_at": value})
        else:
            self._send_error(record, 404, "Not found", path.removeprefix(f"{API_PREFIX}/"))

    def do_DELETE(self) -> None:
        record, _ = self._begin()
        self._read_body()
        kill = _KILL_PATH.match(record.path)
        if kill:
            self._kill_query(record, kill.group(1))
            return
        if record.path not in ("/api/logout", f"{API_PREFIX}/logout"):
            self._send_error(record, 404, "Not found", record.path.removeprefix(f"{API_PREFIX}/"))
            return
        if not self._authorized(record, "logout"):
            return
        self.standin.revoke_token((self.headers.get("Authorization") or "").partition(" ")[2].strip())
        self.standin._count("logouts")
        self._send_empty(record, 204)

    def do_GET(self) -> None:
        record, query = self._begin()
        path = record.path
        if self._injected_fault(record):
            return
        if path == "/api/versions":
            self._send_json(record, 200, versions(self.standin))
        elif path == f"{API_PREFIX}/user":
            if self._authorized(record, "user"):
                self._send_json(record, 200, api_user())
        elif found := _RUN_PATH.match(path):
            self._run_look(record, query, found.group(1), found.group(2))
        elif found := _LOOK_PATH.match(path):
            self._get_look(record, found.group(1))
        elif path == f"{API_PREFIX}/datagroups":
            if self._authorized(record, "datagroups"):
                self._send_json(record, 200, self.standin.datagroups.json())
        elif found := _QUERY_SLUG_PATH.match(path):
            self._get_query_for_slug(record, query, found.group(1))
        elif found := _QUERY_RUN_PATH.match(path):
            self._run_query(record, query, found.group(1), found.group(2))
        elif found := _QUERY_PATH.match(path):
            self._get_query(record, query, found.group(1))
        elif found := _TASK_RESULTS_PATH.match(path):
            self._query_task_results(record, found.group(1))
        elif found := _TASK_PATH.match(path):
            self._query_task(record, query, found.group(1))
        else:
            self._send_error(record, 404, "Not found", path.removeprefix(f"{API_PREFIX}/"))

    def _injected_fault(self, record: RecordedRequest) -> bool:
        """Answer a fault of :meth:`LookerStandIn.fail_next_requests` for this route; whether one was."""
        fault = self.standin._take_request_fault(record.method, record.path)
        if fault is None:
            return False
        status, retry_after = fault
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        message = "Too Many Requests" if status == 429 else "Service temporarily unavailable."
        self._send_error(record, status, message, record.path.removeprefix(f"{API_PREFIX}/"), headers)
        return True

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
        self._serve_run(record, query, look, fmt, template)


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
    # Ctrl-C stops it even when started in the background by a shell that ignores SIGINT (Python then keeps
    # that disposition instead of raising KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
