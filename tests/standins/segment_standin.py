"""
A local stand-in for Segment's HTTP Tracking API, with Segment's limits, fault injection and a record of
everything it received.

It listens on 127.0.0.1 (HTTP/1.1, keep-alive, one thread per connection, Nagle off on every accepted socket)
and answers like Segment::

    with SegmentStandIn(record="ids") as segment:      # free port, write key "demo-write-key"
        segment.set_faults(every_429=3, retry_after=1)  # every third request: 429 + Retry-After: 1
        ...                                             # POST {segment.base_url}/v1/batch
        assert segment.stats()["duplicate_message_ids"] == 0

Ingestion: ``POST /v1/batch`` (and ``/v1/import``) with ``{"batch": [...]}``, and single calls
``POST /v1/identify`` (``track``, ``page``, ``screen``, ``group``, ``alias``). Basic auth with the write key
as user name, or ``writeKey`` in the body; gzip request bodies (``Content-Encoding: gzip``). Segment's limits:
400 for a body over 500 KB or any event over 32 KB; a batch of more than 2,500 events is answered 200 but its
events are counted as rejected, not received. An unknown write key is answered 200 and its events are dropped
(counted in ``stats()["dropped_events"]``, not received), as Segment does ("Segment returns a 200 response for
all API requests except errors caused by large payloads and JSON errors"); ``unknown_write_key="401"``
(``--unknown-write-key 401``) answers 401 instead, as a gateway in front of it might; a missing write key is
answered 401. Each request's ``sentAt`` is recorded, and :func:`segment_timestamp` computes the ``timestamp``
Segment derives from it: ``receivedAt - (sentAt - timestamp)``.

Round trip: ``latency_ms`` (``--latency-ms``) holds every answer to an ingestion request until that long after
the request arrived, as a distant Segment would (it answers a batch in 50-200 ms); each connection has its own
thread, so held answers overlap and never delay other requests. ``stats()["max_concurrent_requests"]`` tells
how many ingestion requests were being served at once (the client's requests in flight).

Faults (:class:`Faults`, also settable over HTTP): 429 with ``Retry-After`` and ``X-RateLimit-Reset`` (both
seconds, as Segment documents them; or ``Retry-After`` as an HTTP date, or ``X-RateLimit-Reset`` alone) every
N requests, 5xx every N, a TCP reset (``SO_LINGER`` 0) every N, slow answers,
never answering, a per-request script, and fixed answers for requests that contain given messageIds.

Record modes: ``full`` keeps every event; ``ids`` keeps messageIds (arrival order, duplicates counted);
``count`` keeps counters and one line per request only (fastest, for benchmarks).

Control endpoints, for tests running in another process (see :class:`SegmentStandInClient`):

* ``GET /_standin/stats`` - counters;
* ``GET /_standin/requests?offset=0&ids=1`` - one record per ingestion request (arrival and answer times,
  action, events, messageIds);
* ``GET /_standin/events?offset=0&limit=1000`` - received events in arrival order (``full`` mode);
* ``GET /_standin/message_ids?offset=0`` - received messageIds in arrival order, duplicates included;
* ``GET /_standin/faults`` and ``POST /_standin/faults`` (a JSON object of :class:`Faults` fields;
  replaces the faults and restarts their request count);
* ``POST /_standin/reset`` - forget everything received and clear the faults.

Run it by hand: ``python -m standins.segment_standin --port 0 [--latency-ms 200]`` (it prints
``SEGMENT_STANDIN_URL=...`` and ``SEGMENT_STANDIN_WRITE_KEY=...`` first), or from Python in a child process
with :class:`SegmentStandInProcess` - the fastest set-up (its own interpreter), e.g. for the benchmark.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import email.utils
import gc
import itertools
import math
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from standins.processes import StandInProcess, ThreadedStandIn

MODULE = "standins.segment_standin"
DEFAULT_WRITE_KEY = "demo-write-key"
#: Segment's documented limits (the same values as :mod:`airflow_provider_looker_segment.batching`).
MAX_EVENT_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
#: Bodies larger than this are not even read: the connection is closed after a 413.
HARD_BODY_LIMIT = 16 * 1024 * 1024
RECORD_MODES = ("full", "ids", "count")
RETRY_AFTER_STYLES = ("seconds", "http-date", "x-ratelimit-reset", "none")
#: What an unknown write key gets: ``drop`` (HTTP 200, events dropped: Segment's behaviour) or ``401``.
UNKNOWN_WRITE_KEY_ANSWERS = ("drop", "401")
BATCH_PATHS = frozenset({"/v1/batch", "/v1/import"})
SINGLE_PATHS = {f"/v1/{kind}": kind for kind in ("identify", "track", "page", "screen", "group", "alias")}
CONTROL_PREFIX = "/_standin/"
#: Script actions besides an HTTP status such as ``"429"``; ``"delay:0.5"`` answers normally after 0.5 s.
ACTIONS = ("ok", "reset", "accept-reset", "partial", "hang")


@dataclass
class Faults:
    """
    Faults injected into ingestion requests, counted from when they were set.

    Precedence for a request: ``script`` (one action per request while it lasts), then ``status_for_ids``,
    then ``every_reset``, ``every_429``, ``every_500``, then ``hang``; otherwise the request is served.

    :param every_429: answer every Nth request 429 (0 = never).
    :param every_500: answer every Nth request ``server_error_status`` (0 = never).
    :param every_reset: reset the TCP connection (no answer) on every Nth request (0 = never).
    :param server_error_status: the status of ``every_500``.
    :param retry_after: seconds a 429 asks the client to wait.
    :param retry_after_style: ``seconds`` (``Retry-After`` in whole seconds, rounded up, and
        ``X-RateLimit-Reset`` in seconds, as Segment's HTTP API documents them), ``http-date``
        (``Retry-After`` as an HTTP date, rounded up to the second), ``x-ratelimit-reset``
        (``X-RateLimit-Reset`` in seconds, no ``Retry-After``) or ``none``.
    :param delay: seconds to wait before answering any ingestion request (slow answers).
    :param hang: never answer any ingestion request (the connection is held until the stand-in stops or
        ``hang_seconds`` pass, then closed without an answer).
    :param hang_seconds: how long a hanging request is held.
    :param script: actions for the next requests, in arrival order: an HTTP status (``"429"``, ``"500"``,
        ``"400"``...), ``"ok"``, ``"reset"``, ``"accept-reset"`` (record the events, then reset instead of
        answering: the client will send them again), ``"partial"`` (send the status line and headers, then
        reset), ``"hang"`` or ``"delay:SECONDS"``.
    :param status_for_ids: answer this status to every request containing one of these messageIds.
    """

    every_429: int = 0
    every_500: int = 0
    every_reset: int = 0
    server_error_status: int = 500
    retry_after: float = 1.0
    retry_after_style: str = "seconds"
    delay: float = 0.0
    hang: bool = False
    hang_seconds: float = 3600.0
    script: list[str] = field(default_factory=list)
    status_for_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.retry_after_style not in RETRY_AFTER_STYLES:
            raise ValueError(f"retry_after_style must be one of {RETRY_AFTER_STYLES}")
        self.script = [str(action) for action in self.script]
        for action in self.script:
            if not _valid_action(action):
                raise ValueError(f"unknown script action {action!r}")
        self.status_for_ids = {str(key): int(value) for key, value in self.status_for_ids.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        """Build from JSON, refusing unknown keys."""
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


def _valid_action(action: str) -> bool:
    if action in ACTIONS or (action.isdigit() and len(action) == 3):
        return True
    if action.startswith("delay:"):
        try:
            return float(action[6:]) >= 0
        except ValueError:
            return False
    return False


@dataclass
class RequestRecord:
    """
    One ingestion request, as the stand-in saw and answered it.

    :param seq: its number among ingestion requests since the last reset (1-based).
    :param path: the URL path.
    :param arrived: when its headers had been read (Segment's ``receivedAt``), by the stand-in's ``clock``
        (``time.time()`` unless a test sets another).
    :param answered: when the answer (or reset) was written, by the same clock; ``None`` for ``hang``.
    :param action: what was done: the HTTP status answered (``"200"``, ``"429"``...), ``"reset"``,
        ``"accept-reset"``, ``"partial"`` or ``"hang"``.
    :param status: the HTTP status answered, ``None`` if none was.
    :param accepted: its events were recorded as received.
    :param events: events in the body (0 if it was not parsed).
    :param wire_bytes: body bytes as received.
    :param body_bytes: body bytes after gunzip.
    :param gzip: the body was gzip-encoded.
    :param auth: ``basic`` (Basic auth with a known key), ``body`` (``writeKey`` in the body), ``unknown``
        (an unknown key, answered 200 and dropped), ``wrong`` (an unknown key answered 401), ``none`` or
        ``unchecked`` (answered before authentication).
    :param first_message_id: the first event's messageId (identifies a batch and its retries).
    :param message_ids: every event's messageId (``ids`` and ``full`` modes).
    :param digest: CRC-32 of the events as received (the body without its ``sentAt``; ``ids`` and ``full``
        modes): re-sends of the same events match.
    :param error: the error message answered, if any.
    :param sent_at: the body's ``sentAt``, if any.
    """

    seq: int
    path: str
    arrived: float
    answered: float | None = None
    action: str = ""
    status: int | None = None
    accepted: bool = False
    events: int = 0
    wire_bytes: int = 0
    body_bytes: int = 0
    gzip: bool = False
    auth: str = "unchecked"
    first_message_id: Any = None
    message_ids: tuple[Any, ...] | None = None
    digest: int | None = None
    error: str | None = None
    sent_at: str | None = None

    def to_dict(self, *, ids: bool = True) -> dict[str, Any]:
        """A JSON-serialisable copy, optionally without the messageIds."""
        data = asdict(self)
        if not ids:
            data["message_ids"] = None
        return data


class _Rejected(Exception):
    """An ingestion request answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SegmentStandIn(ThreadedStandIn):
    """
    Segment Tracking API stand-in server.

    :param host: address to bind (keep the default ``127.0.0.1``).
    :param port: port to bind, 0 for a free one.
    :param write_keys: accepted write keys (the first is :attr:`write_key`).
    :param record: ``full``, ``ids`` or ``count`` (see the module's documentation).
    :param faults: faults to start with.
    :param max_request_bytes: Segment's per-request limit (bytes after gunzip).
    :param max_event_bytes: Segment's per-event limit.
    :param max_batch_events: events per batch beyond which a batch's events are rejected.
    :param latency_ms: the round trip: every answer to an ingestion request is held until this many
        milliseconds after the request arrived (0: answer at once).
    :param unknown_write_key: ``drop`` (default: HTTP 200, events dropped, as Segment) or ``401``.
    :ivar clock: Unix time for the records' ``arrived`` and ``answered`` (Segment's ``receivedAt``); a test
        may set a fake one shared with the client (``reset`` puts ``time.time`` back).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        write_keys: tuple[str, ...] | list[str] = (DEFAULT_WRITE_KEY,),
        record: str = "full",
        faults: Faults | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_batch_events: int = MAX_BATCH_EVENTS,
        latency_ms: float = 0.0,
        unknown_write_key: str = "drop",
    ) -> None:
        if record not in RECORD_MODES:
            raise ValueError(f"record must be one of {RECORD_MODES}, not {record!r}")
        if not write_keys:
            raise ValueError("at least one write key is needed")
        if not 0 <= latency_ms < math.inf:
            raise ValueError(f"latency_ms must be a number of milliseconds, at least 0, not {latency_ms!r}")
        if unknown_write_key not in UNKNOWN_WRITE_KEY_ANSWERS:
            raise ValueError(f"unknown_write_key must be one of {UNKNOWN_WRITE_KEY_ANSWERS}")
        super().__init__()
        self.unknown_write_key = self._unknown_write_key = unknown_write_key
        self.clock: Callable[[], float] = time.time
        self.host = host
        self.port = port
        self.write_keys = frozenset(write_keys)
        self.write_key = next(iter(write_keys))
        self.record = record
        self.max_request_bytes = max_request_bytes
        self.max_event_bytes = max_event_bytes
        self.max_batch_events = max_batch_events
        self.latency = latency_ms / 1000.0
        self._lock = threading.Lock()
        self._active = 0  # ingestion requests being served (not cleared by reset)
        self._faults = faults or Faults()
        self._fault_seq = 0
        self._script_pos = 0
        self._clear_records()

    # -- life cycle --------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the Segment connection's host)."""
        return f"http://{self.host}:{self.port}"

    url = base_url

    @property
    def batch_url(self) -> str:
        """URL of ``POST /v1/batch``."""
        return f"{self.base_url}/v1/batch"

    _thread_name = "segment-standin"

    def _make_server(self) -> _Server:
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        return server

    def _before_close(self, server: _Server) -> None:
        server.close_connections()  # hanging requests were released by stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` is called from elsewhere (or Ctrl-C)."""
        self.start()
        try:
            while self.running and not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    # -- faults ------------------------------------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        """The faults in effect (a copy)."""
        with self._lock:
            return Faults.from_dict(self._faults.to_dict())

    def set_faults(self, faults: Faults | None = None, **settings: Any) -> Faults:
        """
        Replace the faults and restart their request count.

        :param faults: the new faults; or give :class:`Faults` fields as keyword arguments.
        """
        new = faults if faults is not None else Faults.from_dict(settings)
        with self._lock:
            self._faults = new
            self._fault_seq = 0
            self._script_pos = 0
        return new

    def clear_faults(self) -> None:
        """No more faults."""
        self.set_faults(Faults())

    # -- records -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """
        Forget everything received, clear the faults, put the real clock back and the answer to unknown
        write keys given at construction.
        """
        with self._lock:
            self.clock = time.time
            self.unknown_write_key = self._unknown_write_key
            self._clear_records()
            self._faults = Faults()
            self._fault_seq = 0
            self._script_pos = 0

    def _clear_records(self) -> None:
        self._seq = 0
        self._records: list[RequestRecord] = []
        self._events: list[Any] = []
        self._id_chunks: list[tuple[Any, ...]] = []  # tuples of strings are not traversed by the GC
        self._seen: set[Any] = set()
        self._counters: dict[str, int] = dict.fromkeys(
            ("requests", "accepted_requests", "events", "duplicate_message_ids", "rejected_events"), 0
        )
        self._counters.update(
            rejected_requests=0, wire_bytes=0, tls_handshakes=0, dropped_requests=0, dropped_events=0
        )
        self._counters["max_concurrent_requests"] = self._active  # those being served now still count
        self._by_status: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        """
        Counters since the last reset.

        ``requests``: ingestion requests; ``by_status``: requests per action (``"200"``, ``"429"``,
        ``"reset"``...); ``accepted_requests`` and ``events``: requests and events recorded as received
        (duplicates included); ``unique_message_ids`` and ``duplicate_message_ids`` (``None`` in ``count``
        mode); ``rejected_requests`` and ``rejected_events`` (answered 4xx, or over 2,500 events);
        ``dropped_requests`` and ``dropped_events`` (an unknown write key: answered 200, not received);
        ``wire_bytes``; ``tls_handshakes`` (connections that opened with a TLS handshake, i.e. a client using
        ``https://`` on this plain-HTTP port; answered 400 in plain HTTP, as any HTTP server would, which the
        client sees as a TLS error); ``first_arrival`` and ``last_arrival`` (``time.time()``);
        ``max_concurrent_requests``: the most ingestion requests being served at once (from their headers
        to their answer; with a latency, the client's requests in flight); ``latency_ms``.
        """
        with self._lock:
            stats: dict[str, Any] = dict(self._counters)
            stats["by_status"] = dict(self._by_status)
            tracked = self.record != "count"
            stats["unique_message_ids"] = len(self._seen) if tracked else None
            if not tracked:
                stats["duplicate_message_ids"] = None
            stats["first_arrival"] = self._records[0].arrived if self._records else None
            stats["last_arrival"] = self._records[-1].arrived if self._records else None
            stats["record"] = self.record
            stats["latency_ms"] = self.latency * 1000.0
        return stats

    def records(self, offset: int = 0) -> list[RequestRecord]:
        """Ingestion requests in arrival order (the records themselves; do not modify them)."""
        with self._lock:
            return self._records[offset:]

    def events(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Received events in arrival order, duplicates included (``full`` mode only)."""
        with self._lock:
            end = None if limit is None else offset + limit
            return self._events[offset:end]

    def message_ids(self, offset: int = 0) -> list[Any]:
        """Received messageIds in arrival order, duplicates included (``ids`` and ``full`` modes)."""
        with self._lock:
            chunks = list(self._id_chunks)
        return list(itertools.chain.from_iterable(chunks))[offset:]

    def wait_for_events(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` events were received; return whether they were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._counters["events"] >= count:
                    return True
            time.sleep(0.01)
        return False

    # -- request handling (called by the handler threads) ------------------------------------------------
    def _next_action(self, message_ids: tuple[Any, ...] | None) -> str:
        """Decide the fate of the next ingestion request."""
        with self._lock:
            faults = self._faults
            self._fault_seq += 1
            seq = self._fault_seq
            if self._script_pos < len(faults.script):
                self._script_pos += 1
                return faults.script[self._script_pos - 1]
        if faults.status_for_ids and message_ids:
            for message_id in message_ids:
                status = faults.status_for_ids.get(str(message_id))
                if status is not None:
                    return str(status)
        for every, action in (
            (faults.every_reset, "reset"),
            (faults.every_429, "429"),
            (faults.every_500, str(faults.server_error_status)),
        ):
            if every and seq % every == 0:
                return action
        return "hang" if faults.hang else "ok"

    def _count_tls_handshake(self) -> None:
        with self._lock:
            self._counters["tls_handshakes"] += 1

    def _enter(self) -> None:
        """An ingestion request is being served: count it in the concurrency high-water mark."""
        with self._lock:
            self._active += 1
            if self._active > self._counters["max_concurrent_requests"]:
                self._counters["max_concurrent_requests"] = self._active

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def _hold(self, arrived: float) -> None:
        """Wait until the round trip (``latency``) has passed since ``arrived``; a stop cuts it short."""
        remaining = arrived + self.latency - time.time()
        if remaining > 0:
            self._stopping.wait(remaining)

    def accepted_sockets(self) -> list[socket.socket]:
        """The connections open now, as accepted (for tests: their socket options)."""
        serving = self._serving
        if serving is None:
            return []
        server = serving.server
        assert isinstance(server, _Server)
        with server._open_lock:
            return list(server._open)

    def _new_record(self, path: str, arrived: float) -> RequestRecord:
        with self._lock:
            self._seq += 1
            return RequestRecord(seq=self._seq, path=path, arrived=arrived)

    def _finish(self, record: RequestRecord, events: list[Any] | None) -> None:
        """Store a request's record; with ``events``, record them as received."""
        with self._lock:
            self._records.append(record)
            self._counters["requests"] += 1
            self._counters["wire_bytes"] += record.wire_bytes
            self._by_status[record.action] = self._by_status.get(record.action, 0) + 1
            if record.status is not None and 400 <= record.status < 500 and record.status not in (408, 429):
                self._counters["rejected_requests"] += 1
                self._counters["rejected_events"] += record.events
            if events is None:
                return
            self._counters["accepted_requests"] += 1
            self._counters["events"] += len(events)
            if self.record == "full":
                self._events.extend(events)
            if self.record != "count" and record.message_ids is not None:
                self._remember_ids(record.message_ids)

    def _remember_ids(self, message_ids: tuple[Any, ...]) -> None:
        seen = self._seen
        before = len(seen)
        seen.update(message_ids)
        self._counters["duplicate_message_ids"] += len(message_ids) - (len(seen) - before)
        self._id_chunks.append(message_ids)

    def _count_dropped(self, record: RequestRecord) -> None:
        """A batch of an unknown write key: answered 200, its events dropped."""
        with self._lock:
            self._counters["dropped_events"] += record.events
            self._counters["dropped_requests"] += 1

    def _count_oversize_batch(self, record: RequestRecord) -> None:
        """A batch over the event-count limit: answered 200, events counted as rejected."""
        with self._lock:
            self._counters["rejected_events"] += record.events
            self._counters["rejected_requests"] += 1


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server that knows its stand-in and can close its open connections."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], standin: SegmentStandIn) -> None:
        self.standin = standin
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._open_lock:
            self._open.add(request)
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection so their handler threads end."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away; report anything else."""
        error = sys.exc_info()[1]
        if isinstance(error, (OSError, ValueError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes ingestion and control requests; writes each answer in one send."""

    protocol_version = "HTTP/1.1"
    server_version = "SegmentStandIn/1.0"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """No access log (it would slow the benchmark down)."""

    @property
    def standin(self) -> SegmentStandIn:
        return self.server.standin

    # -- plumbing ----------------------------------------------------------------------------------------
    def _respond(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _read_body(self) -> bytes | None:
        """The request body, or ``None`` after answering an unusable length."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._respond(411, {"success": False, "message": "Content-Length required"})
            return None
        size = int(length)
        if size > HARD_BODY_LIMIT:
            self.close_connection = True
            self._respond(413, {"success": False, "message": "request too large"})
            return None
        return self.rfile.read(size)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (``SO_LINGER`` 0, then close)."""
        self.close_connection = True
        connection = self.connection
        try:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            connection.close()
        except OSError:
            pass

    # -- routing -----------------------------------------------------------------------------------------
    def parse_request(self) -> bool:
        """Count a TLS handshake (record type 22, TLS 1.x) before the base class answers it 400."""
        if self.raw_requestline.startswith(b"\x16\x03"):
            self.standin._count_tls_handshake()
        return super().parse_request()

    def do_POST(self) -> None:
        path, _ = _split(self.path)
        if path in BATCH_PATHS or path in SINGLE_PATHS:
            self._ingest(path, time.time())
        elif path.startswith(CONTROL_PREFIX):
            body = self._read_body()
            if body is not None:
                self._control_post(path[len(CONTROL_PREFIX) :], body)
        else:
            self._read_body()
            self._respond(404, {"success": False, "message": f"no such endpoint: POST {path}"})

    def do_GET(self) -> None:
        path, query = _split(self.path)
        if path.startswith(CONTROL_PREFIX):
            self._control_get(path[len(CONTROL_PREFIX) :], query)
        else:
            self._respond(404, {"success": False, "message": f"no such endpoint: GET {path}"})

    # -- control endpoints -------------------------------------------------------------------------------
    def _control_get(self, name: str, query: dict[str, str]) -> None:
        standin = self.standin
        offset = int(query.get("offset", 0))
        if name == "stats":
            self._respond(200, standin.stats())
        elif name == "requests":
            ids = query.get("ids", "1") not in ("0", "false")
            records = [record.to_dict(ids=ids) for record in standin.records(offset)]
            self._respond(200, {"offset": offset, "requests": records})
        elif name == "events":
            limit = int(query["limit"]) if "limit" in query else None
            events = standin.events(offset, limit)
            self._respond(200, {"offset": offset, "record": standin.record, "events": events})
        elif name == "message_ids":
            self._respond(200, {"offset": offset, "message_ids": standin.message_ids(offset)})
        elif name == "faults":
            self._respond(200, standin.faults.to_dict())
        elif name == "health":
            self._respond(200, {"ok": True, "record": standin.record})
        else:
            self._respond(404, {"success": False, "message": f"no such control endpoint: {name}"})

    def _control_post(self, name: str, body: bytes) -> None:
        standin = self.standin
        if name == "reset":
            standin.reset()
            self._respond(200, {"ok": True})
        elif name == "faults":
            try:
                faults = standin.set_faults(Faults.from_dict(orjson.loads(body or b"{}")))
            except (ValueError, TypeError) as exc:
                self._respond(400, {"success": False, "message": str(exc)})
                return
            self._respond(200, faults.to_dict())
        else:
            self._respond(404, {"success": False, "message": f"no such control endpoint: {name}"})

    # -- ingestion ---------------------------------------------------------------------------------------
    def _ingest(self, path: str, arrived: float) -> None:
        standin = self.standin
        standin._enter()
        try:
            self._ingest_held(path, arrived)
        finally:
            standin._leave()

    def _ingest_held(self, path: str, arrived: float) -> None:
        """Read, decide, hold the answer for the round trip (``latency``), then answer."""
        standin = self.standin
        record = standin._new_record(path, standin.clock())
        wire = self._read_body()
        if wire is None:
            return
        record.wire_bytes = len(wire)
        record.gzip = self.headers.get("Content-Encoding", "").lower() == "gzip"
        parsed = (
            self._peek(record, wire) if standin.record != "count" or standin._faults.status_for_ids else None
        )
        action = standin._next_action(record.message_ids)
        if action.startswith("delay:"):
            standin._stopping.wait(float(action[6:]))
            action = "ok"
        elif standin._faults.delay:
            standin._stopping.wait(standin._faults.delay)
        if action != "hang":
            standin._hold(arrived)
        if action in ("ok", "accept-reset"):
            self._serve(record, wire, parsed, reset_after=action == "accept-reset")
        else:
            self._fault(record, action)

    def _peek(self, record: RequestRecord, wire: bytes) -> Any:
        """Parse a body early (to name its batch in the record) without judging it; ``None`` if unusable."""
        record.digest = zlib.crc32(wire)
        try:
            raw = _gunzip(wire) if record.gzip else wire
            data = orjson.loads(raw)
        except (orjson.JSONDecodeError, OSError, EOFError, zlib.error):
            return None
        if isinstance(data, dict) and isinstance(data.get("sentAt"), str):
            record.sent_at = data["sentAt"]
            record.digest = zlib.crc32(raw.replace(f'"sentAt":"{record.sent_at}"'.encode(), b""))
        events = _events_of(record.path, data)
        if events is not None:
            _name_events(record, events)
        return data

    def _fault(self, record: RequestRecord, action: str) -> None:
        """Answer with an injected fault; the record is stored before anything reaches the client."""
        standin = self.standin
        record.action = action
        if action == "hang":
            standin._finish(record, None)
            standin._stopping.wait(standin._faults.hang_seconds)
            self._reset()
            return
        record.answered = standin.clock()
        if action in ("reset", "partial"):
            standin._finish(record, None)
            if action == "partial":
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
                )
            self._reset()
            return
        record.status = int(action)
        headers = self._rate_limit_headers(record.status, time.time())
        standin._finish(record, None)
        self._respond(record.status, {"success": False, "message": _phrase(record.status)}, headers)

    def _rate_limit_headers(self, status: int, now: float) -> dict[str, str]:
        """Rate-limit headers for a 429, computed from the moment the answer is written."""
        faults = self.standin._faults
        if status != 429 or faults.retry_after_style == "none":
            return {}
        reset = f"{faults.retry_after:g}"  # seconds to wait, as Segment documents X-RateLimit-Reset
        if faults.retry_after_style == "seconds":
            return {"Retry-After": str(math.ceil(faults.retry_after)), "X-RateLimit-Reset": reset}
        if faults.retry_after_style == "http-date":
            return {"Retry-After": email.utils.formatdate(math.ceil(now + faults.retry_after), usegmt=True)}
        return {"X-RateLimit-Reset": reset}

    def _serve(self, record: RequestRecord, wire: bytes, parsed: Any, *, reset_after: bool) -> None:
        """Judge a request like Segment; store the record, then answer (or reset after accepting)."""
        standin = self.standin
        try:
            events = self._accept(record, wire, parsed)
        except _Rejected as rejected:
            record.status, record.action, record.error = (
                rejected.status,
                str(rejected.status),
                rejected.message,
            )
            record.answered = standin.clock()
            standin._finish(record, None)
            self._respond(rejected.status, {"success": False, "message": rejected.message})
            return
        if record.auth == "unknown":  # Segment: HTTP 200, and the events are dropped
            record.status, record.action, record.answered = 200, "200", standin.clock()
            standin._count_dropped(record)
            standin._finish(record, None)
            self._respond(200, b'{"success":true}')
            return
        if len(events) > standin.max_batch_events:
            standin._count_oversize_batch(record)
            events = None
        record.accepted = events is not None
        record.answered = standin.clock()
        if reset_after:
            record.action = "accept-reset"
            standin._finish(record, events)
            self._reset()
            return
        record.status, record.action = 200, "200"
        standin._finish(record, events)
        self._respond(200, b'{"success":true}')

    def _accept(self, record: RequestRecord, wire: bytes, parsed: Any) -> list[Any]:
        """The request's events if Segment would take them; raises :class:`_Rejected` otherwise."""
        standin = self.standin
        try:
            raw = _gunzip(wire) if record.gzip else wire
        except (OSError, EOFError, zlib.error):
            raise _Rejected(400, "body is not valid gzip") from None
        record.body_bytes = len(raw)
        if len(raw) > standin.max_request_bytes:
            raise _Rejected(400, f"request body over {standin.max_request_bytes} bytes")
        header_key = self._basic_auth_user(record)
        if parsed is None:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _Rejected(400, "body is not valid JSON") from None
        if header_key is None:
            self._check_body_key(record, parsed)
        events = _events_of(record.path, parsed)
        if events is None:
            raise _Rejected(
                400, "body has no batch array" if record.path in BATCH_PATHS else "body is not an object"
            )
        if record.message_ids is None or standin.record == "count":
            record.events = len(events)
            record.first_message_id = (
                events[0].get("messageId") if events and isinstance(events[0], dict) else None
            )
        if standin.record != "count" and record.message_ids is None:
            _name_events(record, events)
        if len(raw) > standin.max_event_bytes:
            _check_event_sizes(events, standin.max_event_bytes)
        return events

    def _basic_auth_user(self, record: RequestRecord) -> str | None:
        """The write key of a Basic ``Authorization`` header (401 if unknown); ``None`` without one."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        try:
            user = base64.b64decode(token.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if scheme.lower() != "basic" or not user:
            record.auth = "wrong"
            raise _Rejected(401, "invalid write key")
        if user not in self.standin.write_keys:
            self._unknown_key(record)
        else:
            record.auth = "basic"
        return user

    def _check_body_key(self, record: RequestRecord, parsed: Any) -> None:
        """Accept ``writeKey`` in the body when there is no Authorization header."""
        key = parsed.get("writeKey") if isinstance(parsed, dict) else None
        if key is None:
            record.auth = "none"
            raise _Rejected(401, "missing write key: use Basic auth or writeKey in the body")
        if key not in self.standin.write_keys:
            self._unknown_key(record)
            return
        record.auth = "body"

    def _unknown_key(self, record: RequestRecord) -> None:
        """An unknown write key: dropped after a 200 (Segment), or 401 with ``unknown_write_key="401"``."""
        if self.standin.unknown_write_key == "401":
            record.auth = "wrong"
            raise _Rejected(401, "invalid write key")
        record.auth = "unknown"


def segment_timestamp(timestamp: str, sent_at: str, received_at: float) -> datetime:
    """
    The ``timestamp`` Segment gives an event: ``receivedAt - (sentAt - timestamp)``, the correction of the
    client's clock ("Timestamps" in Segment's Spec: Common fields).

    :param timestamp: the event's ``timestamp`` as sent (ISO 8601).
    :param sent_at: the request's ``sentAt`` (ISO 8601).
    :param received_at: when the request arrived (Unix time: a record's ``arrived``).
    """
    received = datetime.fromtimestamp(received_at, timezone.utc)
    return received - (_iso(sent_at) - _iso(timestamp))


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _events_of(path: str, data: Any) -> list[Any] | None:
    """The events of a parsed body: the batch array, or the single call itself."""
    if path in BATCH_PATHS:
        batch = data.get("batch") if isinstance(data, dict) else None
        return batch if isinstance(batch, list) else None
    if not isinstance(data, dict):
        return None
    event = {key: value for key, value in data.items() if key != "writeKey"}
    event.setdefault("type", SINGLE_PATHS[path])
    return [event]


def _name_events(record: RequestRecord, events: list[Any]) -> None:
    """Put the events' count and messageIds into the record."""
    record.events = len(events)
    record.message_ids = tuple(
        [event.get("messageId") if isinstance(event, dict) else None for event in events]
    )
    record.first_message_id = record.message_ids[0] if record.message_ids else None


def _check_event_sizes(events: list[Any], limit: int) -> None:
    """Raise a 400 if any event's compact JSON is over ``limit`` bytes."""
    dumps = orjson.dumps
    for event in events:
        size = len(dumps(event))
        if size > limit:
            raise _Rejected(400, f"event over {limit} bytes ({size} bytes)")


def _gunzip(data: bytes) -> bytes:
    """Decompress a gzip body, refusing to inflate past the hard limit."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    raw = inflater.decompress(data, HARD_BODY_LIMIT)
    if inflater.unconsumed_tail:
        raise OSError("gzip body inflates past the limit")
    return raw + inflater.flush()


def _split(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    return parts.path, dict(parse_qsl(parts.query))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class SegmentStandInClient:
    """
    Read and steer a stand-in running in another process, over its control endpoints.

    :param base_url: the stand-in's ``http://127.0.0.1:PORT``.
    :param timeout: seconds per control request.
    """

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, name: str, payload: Any = None, **query: Any) -> Any:
        url = f"{self.base_url}{CONTROL_PREFIX}{name}"
        if query:
            url += "?" + "&".join(f"{key}={value}" for key, value in query.items())
        data = orjson.dumps(payload) if payload is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return orjson.loads(response.read())

    def stats(self) -> dict[str, Any]:
        """See :meth:`SegmentStandIn.stats`."""
        return self._call("GET", "stats")

    def records(self, offset: int = 0, *, ids: bool = True) -> list[RequestRecord]:
        """See :meth:`SegmentStandIn.records`."""
        data = self._call("GET", "requests", offset=offset, ids=int(ids))
        return [_record_from_json(item) for item in data["requests"]]

    def events(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """See :meth:`SegmentStandIn.events`."""
        query: dict[str, Any] = {"offset": offset}
        if limit is not None:
            query["limit"] = limit
        return self._call("GET", "events", **query)["events"]

    def message_ids(self, offset: int = 0) -> list[Any]:
        """See :meth:`SegmentStandIn.message_ids`."""
        return self._call("GET", "message_ids", offset=offset)["message_ids"]

    @property
    def faults(self) -> Faults:
        """See :attr:`SegmentStandIn.faults`."""
        return Faults.from_dict(self._call("GET", "faults"))

    def set_faults(self, faults: Faults | None = None, **settings: Any) -> Faults:
        """See :meth:`SegmentStandIn.set_faults`."""
        payload = (faults or Faults.from_dict(settings)).to_dict()
        return Faults.from_dict(self._call("POST", "faults", payload))

    def reset(self) -> None:
        """See :meth:`SegmentStandIn.reset`."""
        self._call("POST", "reset")

    def wait_for_events(self, count: int, timeout: float = 10.0) -> bool:
        """See :meth:`SegmentStandIn.wait_for_events`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["events"] >= count:
                return True
            time.sleep(0.05)
        return False


class SegmentStandInProcess(StandInProcess):
    """
    A stand-in running in a child process (``python -m standins.segment_standin``), read over HTTP.

    Its own interpreter keeps it off the caller's GIL (the way to benchmark the hook against it) and lets
    tests whose Airflow tasks run in other processes assert what it received, through :attr:`client`.

    :param record: ``full``, ``ids`` or ``count``.
    :param write_keys: accepted write keys.
    :param faults: faults to start with.
    :param port: port to bind, 0 for a free one.
    :param latency_ms: the round trip every answer is held for (see :class:`SegmentStandIn`).
    :param unknown_write_key: ``drop`` (HTTP 200, Segment's behaviour) or ``401``.
    """

    def __init__(
        self,
        *,
        record: str = "full",
        write_keys: tuple[str, ...] | list[str] = (DEFAULT_WRITE_KEY,),
        faults: Faults | None = None,
        port: int = 0,
        latency_ms: float = 0.0,
        unknown_write_key: str = "drop",
    ) -> None:
        args = ["--port", str(port), "--record", record, "--latency-ms", f"{latency_ms:g}"]
        args += ["--unknown-write-key", unknown_write_key]
        for key in write_keys:
            args += ["--write-key", key]
        if faults is not None:
            args += ["--faults", orjson.dumps(faults.to_dict()).decode()]
        super().__init__("segment-standin", [sys.executable, "-m", MODULE, *args], "SEGMENT_STANDIN_URL=")
        self.write_key = next(iter(write_keys))

    @property
    def client(self) -> SegmentStandInClient:
        """A client for the control endpoints."""
        return SegmentStandInClient(self.base_url)


def _record_from_json(data: dict[str, Any]) -> RequestRecord:
    if data.get("message_ids") is not None:
        data = {**data, "message_ids": tuple(data["message_ids"])}
    return RequestRecord(**data)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local stand-in for Segment's HTTP Tracking API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for a free one (default)")
    parser.add_argument(
        "--write-key",
        action="append",
        dest="write_keys",
        help=f"accepted write key (default {DEFAULT_WRITE_KEY})",
    )
    parser.add_argument("--record", choices=RECORD_MODES, default="full", help="what to keep (default full)")
    parser.add_argument("--faults", default=None, help="faults as JSON, e.g. '{\"every_429\": 5}'")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="hold every answer this many milliseconds after its request arrived, as a distant Segment "
        "would (default 0)",
    )
    parser.add_argument(
        "--unknown-write-key",
        choices=UNKNOWN_WRITE_KEY_ANSWERS,
        default="drop",
        help="an unknown write key: drop (HTTP 200, events dropped, as Segment; default) or 401",
    )
    parser.add_argument("--url-file", default=None, help="also write the base URL to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); print the URL and write key first."""
    args = _parse_args(argv)
    # A server process keeps few cycles but many containers: collect less often, and never the start-up
    # objects again, so a benchmark measures requests rather than the garbage collector.
    gc.set_threshold(100_000, 50, 100)
    gc.freeze()
    faults = Faults.from_dict(orjson.loads(args.faults)) if args.faults else None
    standin = SegmentStandIn(
        host=args.host,
        port=args.port,
        write_keys=args.write_keys or [DEFAULT_WRITE_KEY],
        record=args.record,
        latency_ms=args.latency_ms,
        unknown_write_key=args.unknown_write_key,
    )
    if faults:
        standin.set_faults(faults)
    url = standin.start()
    print(f"SEGMENT_STANDIN_URL={url}")
    print(f"SEGMENT_STANDIN_WRITE_KEY={standin.write_key}")
    print(
        f"Segment Tracking API stand-in: POST {url}/v1/batch (Basic auth, write key {standin.write_key!r}), "
        f"answers held {args.latency_ms:g} ms."
    )
    print(f"Received events: GET {url}/_standin/stats | /_standin/events | /_standin/requests; Ctrl-C stops.")
    sys.stdout.flush()
    if args.url_file:
        with open(args.url_file, "w", encoding="utf-8") as handle:
            handle.write(url + "\n")

    def _terminate(signum: int, frame: FrameType | None) -> None:
        standin._stopping.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    try:
        standin.serve_forever()
    except KeyboardInterrupt:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
