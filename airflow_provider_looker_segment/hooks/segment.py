"""
Hook for Segment's HTTP Tracking API: reliable, fast delivery of messages in batches (``POST /v1/batch``).

The hook is the only module of the provider that talks to Segment. It streams messages through
:class:`~airflow_provider_looker_segment.batching.Batcher`, keeps a bounded number of batch requests in flight
on ``requests`` sessions (one per worker thread, connections reused), and retries with urllib3's
:class:`~urllib3.util.retry.Retry` (429 with ``Retry-After`` / ``X-RateLimit-Reset``, 408, 5xx, connection
errors, resets and timeouts; exponential backoff with jitter; bounded by attempts and by time). A retried
batch is re-sent byte for byte, so Segment deduplicates it by ``messageId``. Every message ends in exactly one
of *delivered*, *rejected* or *failed* of the returned :class:`DeliveryReport`.
"""

from __future__ import annotations

import base64
import email.utils
import gzip as gzip_module
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import RemoteDisconnected
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import requests
from airflow.sdk import BaseHook
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    InvalidHeader,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ResponseError,
)
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.util.retry import Retry

from airflow_provider_looker_segment import __version__
from airflow_provider_looker_segment.batching import (
    DEFAULT_MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    Batch,
    Batcher,
    RejectedEvent,
    format_sent_at,
)
from airflow_provider_looker_segment.exceptions import SegmentConfigurationError, SegmentDeliveryError

DEFAULT_HOST = "https://api.segment.io"
EU_HOST = "https://events.eu1.segmentapis.com"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_IN_FLIGHT = 4
MAX_IN_FLIGHT_LIMIT = 32
#: Lowest client-side rate limit: one request every 10 s (lower ones turn a sync into days).
MIN_REQUESTS_PER_SECOND = 0.1
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_MAX_RETRY_TIME = 300.0
DEFAULT_BACKOFF_FACTOR = 0.5
DEFAULT_BACKOFF_MAX = 30.0
DEFAULT_BACKOFF_JITTER = 1.0
DEFAULT_MAX_CONSECUTIVE_FAILED_BATCHES = 3
DEFAULT_MAX_LISTED_EVENTS = 10_000
#: Statuses worth another attempt: timeouts, rate limits and server errors.
RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})
#: Statuses that will not get better for the next batch either: stop sending at once.
FATAL_STATUSES = frozenset({401, 403, 404})
_GZIP_LEVEL = 6
_MAX_REASONS = 100
_MAX_REASON_TEXT = 200
_USER_AGENT = f"airflow-provider-looker-segment/{__version__}"
_CONNECTION_TYPES = ("segment_tracking", "segment")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: OpenSSL's words (by version) for a TLS handshake answered in plain HTTP: wrong scheme or port.
_PLAIN_HTTP_TLS_WORDS = (
    "wrong version number",
    "record layer failure",
    "unknown protocol",
    "packet length too long",
)
PLAIN_HTTP_TLS_ERROR = (
    "TLS error: the server answered in plain HTTP (wrong scheme or port: use http:// for a plain-HTTP "
    "endpoint, or the port that serves HTTPS)"
)
#: Delivery settings (connection extras, or constructor arguments): type, check, accepted values.
_SETTINGS: tuple[tuple[str, type, Callable[[Any], bool], str], ...] = (
    ("timeout", float, lambda value: 0 < value < math.inf, "use a number of seconds above 0"),
    ("gzip", bool, lambda value: True, ""),
    (
        "max_in_flight",
        int,
        lambda value: 1 <= value <= MAX_IN_FLIGHT_LIMIT,
        f"use a whole number from 1 to {MAX_IN_FLIGHT_LIMIT}",
    ),
    (
        "requests_per_second",
        float,
        lambda value: value == 0 or MIN_REQUESTS_PER_SECOND <= value < math.inf,
        f"use a number from {MIN_REQUESTS_PER_SECOND:g} (one request every 10 s) up, or 0 or nothing for "
        "no limit",
    ),
)

DELIVERED, REJECTED, FAILED = "delivered", "rejected", "failed"


@dataclass
class DeliveryReport:
    """
    What became of the messages given to :meth:`SegmentHook.send`; each is counted exactly once.

    :param delivered: events Segment accepted (HTTP 2xx).
    :param rejected: events Segment (or the client, before sending) refused: too large, invalid, HTTP 400/413.
        Re-sending them as they are will not help.
    :param failed: events not delivered although they may be valid: retries exhausted (429, 5xx, timeouts,
        connection errors), HTTP 401/403/404, or not sent after delivery was stopped.
    :param requests: HTTP requests made, retries included.
    :param batches: batches formed (sent or not).
    :param bytes: request body bytes sent, as on the wire (after gzip), retries included.
    :param retries: requests that re-sent a batch.
    :param rejected_reasons: number of rejected events per reason.
    :param failed_reasons: number of failed events per reason.
    :param rejected_events: ``(messageId, reason)`` of rejected events, the first ``max_listed_events``.
    :param failed_events: ``(messageId, reason)`` of failed events, the first ``max_listed_events``.
    :param rejected_events_omitted: rejected events beyond the listed ones.
    :param failed_events_omitted: failed events beyond the listed ones.
    :param aborted: why sending stopped early, if it did (the rest of the input was counted as failed).
    :param elapsed: seconds since delivery started.
    :param max_listed_events: cap on each of the two lists, so memory stays bounded.
    """

    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    batches: int = 0
    bytes: int = 0
    retries: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    failed_reasons: dict[str, int] = field(default_factory=dict)
    rejected_events: list[tuple[Any, str]] = field(default_factory=list)
    failed_events: list[tuple[Any, str]] = field(default_factory=list)
    rejected_events_omitted: int = 0
    failed_events_omitted: int = 0
    aborted: str | None = None
    elapsed: float = 0.0
    max_listed_events: int = DEFAULT_MAX_LISTED_EVENTS

    @property
    def total(self) -> int:
        """All events accounted for: delivered + rejected + failed."""
        return self.delivered + self.rejected + self.failed

    @property
    def ok(self) -> bool:
        """Whether every event was delivered."""
        return not self.rejected and not self.failed

    @property
    def reasons(self) -> dict[str, int]:
        """Rejected and failed events per reason, both kinds together."""
        merged = dict(self.rejected_reasons)
        for reason, count in self.failed_reasons.items():
            merged[reason] = merged.get(reason, 0) + count
        return merged

    @property
    def rejected_ids(self) -> list[Any]:
        """The listed rejected events' messageIds."""
        return [message_id for message_id, _ in self.rejected_events]

    @property
    def failed_ids(self) -> list[Any]:
        """The listed failed events' messageIds."""
        return [message_id for message_id, _ in self.failed_events]

    @property
    def events_per_second(self) -> float:
        """Events accounted for per second of elapsed time."""
        return self.total / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (e.g. for XCom or a task log)."""
        return {
            "delivered": self.delivered,
            "rejected": self.rejected,
            "failed": self.failed,
            "requests": self.requests,
            "batches": self.batches,
            "bytes": self.bytes,
            "retries": self.retries,
            "reasons": self.reasons,
            "rejected_reasons": dict(self.rejected_reasons),
            "failed_reasons": dict(self.failed_reasons),
            "rejected_message_ids": self.rejected_ids,
            "failed_message_ids": self.failed_ids,
            "rejected_events": [{"messageId": i, "reason": r} for i, r in self.rejected_events],
            "failed_events": [{"messageId": i, "reason": r} for i, r in self.failed_events],
            "rejected_events_omitted": self.rejected_events_omitted,
            "failed_events_omitted": self.failed_events_omitted,
            "aborted": self.aborted,
            "elapsed": round(self.elapsed, 3),
            "events_per_second": round(self.events_per_second, 1),
        }

    def summary(self) -> str:
        """One line for a task log."""
        text = (
            f"{self.delivered:,} delivered, {self.rejected:,} rejected, {self.failed:,} failed "
            f"in {self.batches:,} batches, {self.requests:,} requests ({self.retries:,} retries), "
            f"{self.bytes:,} bytes, {self.elapsed:.1f} s"
        )
        reasons = self.reasons
        if reasons:
            top = sorted(reasons.items(), key=lambda item: -item[1])[:5]
            text += "; reasons: " + "; ".join(f"{reason} ({count:,})" for reason, count in top)
        if self.aborted:
            text += f"; stopped early: {self.aborted}"
        return text

    def raise_for_failures(self, *, max_rejected: int = 0, max_failed: int = 0) -> None:
        """
        Raise :class:`SegmentDeliveryError` if more events were rejected or failed than allowed.

        :param max_rejected: rejected events tolerated.
        :param max_failed: failed events tolerated.
        """
        if self.rejected > max_rejected or self.failed > max_failed:
            raise SegmentDeliveryError(f"Segment delivery incomplete: {self.summary()}")

    def snapshot(self) -> DeliveryReport:
        """Return a copy (dicts and lists copied) that later updates do not change."""
        copy = DeliveryReport(**{name: getattr(self, name) for name in self.__dataclass_fields__})
        copy.rejected_reasons = dict(self.rejected_reasons)
        copy.failed_reasons = dict(self.failed_reasons)
        copy.rejected_events = list(self.rejected_events)
        copy.failed_events = list(self.failed_events)
        return copy

    def add(self, category: str, message_ids: Sequence[Any], reason: str = "", detail: str = "") -> None:
        """
        Account for events (not thread-safe: callers hold their own lock).

        :param category: ``delivered``, ``rejected`` or ``failed``.
        :param message_ids: the events' messageIds.
        :param reason: the aggregated reason (a key of :attr:`rejected_reasons` / :attr:`failed_reasons`).
        :param detail: the per-event text kept with the messageIds; ``reason`` when empty.
        """
        count = len(message_ids)
        if category == DELIVERED:
            self.delivered += count
            return
        rejected = category == REJECTED
        reasons = self.rejected_reasons if rejected else self.failed_reasons
        key = reason if reason in reasons or len(reasons) < _MAX_REASONS else "other reasons"
        reasons[key] = reasons.get(key, 0) + count
        listed = self.rejected_events if rejected else self.failed_events
        room = max(0, self.max_listed_events - len(listed))
        text = detail or reason
        listed.extend((message_id, text) for message_id in message_ids[:room])
        omitted = max(0, count - room)
        if rejected:
            self.rejected += count
            self.rejected_events_omitted += omitted
        else:
            self.failed += count
            self.failed_events_omitted += omitted


@dataclass(frozen=True)
class SegmentSettings:
    """
    Resolved delivery settings of a :class:`SegmentHook` (connection + constructor arguments).

    :param base_url: Tracking API base URL without a trailing ``/v1``.
    :param write_key: the source's write key (never shown in ``repr``).
    :param timeout: seconds to wait for Segment's answer to one request.
    :param gzip: compress request bodies.
    :param max_in_flight: batch requests sent at once.
    :param requests_per_second: client-side cap on requests per second, ``None`` for none.
    """

    base_url: str
    write_key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    gzip: bool = False
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    requests_per_second: float | None = None

    @property
    def batch_url(self) -> str:
        """URL of ``POST /v1/batch``."""
        return f"{self.base_url}/v1/batch"


@dataclass(frozen=True)
class RetryPolicy:
    """
    How a batch is retried.

    :param max_attempts: requests per batch at most, the first included.
    :param max_retry_time: seconds from a batch's first request after which it is not retried again (a
        ``Retry-After`` reaching past it ends the retries at once).
    :param backoff_factor: first backoff in seconds; doubled on each further retry.
    :param backoff_max: longest backoff in seconds.
    :param backoff_jitter: up to this many random seconds added to each backoff.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_retry_time: float = DEFAULT_MAX_RETRY_TIME
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR
    backoff_max: float = DEFAULT_BACKOFF_MAX
    backoff_jitter: float = DEFAULT_BACKOFF_JITTER

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise SegmentConfigurationError(f"max_attempts must be at least 1, not {self.max_attempts}.")
        for name in ("max_retry_time", "backoff_factor", "backoff_max", "backoff_jitter"):
            if getattr(self, name) < 0:
                raise SegmentConfigurationError(f"{name} must not be negative.")


class _Throttle:
    """Shared by a delivery's workers: optional requests-per-second cap and pauses asked for by Segment."""

    def __init__(self, requests_per_second: float | None) -> None:
        self._interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._paused_until = 0.0

    def pause_until(self, moment: float) -> None:
        """Hold every worker's next request until ``moment`` (``time.monotonic()`` seconds)."""
        with self._lock:
            self._paused_until = max(self._paused_until, moment)

    def wait(self, stop: threading.Event) -> None:
        """Block until this worker may send a request (or until ``stop`` is set)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._paused_until, self._next_slot)
            if self._interval:
                self._next_slot = start + self._interval
        if start > now:
            stop.wait(start - now)


class _Attempts:
    """The retry state of one batch, shared by the ``Retry`` objects urllib3 derives from each other."""

    __slots__ = ("deadline", "delay", "delay_from_server", "gave_up", "requests", "stop", "throttle")

    def __init__(self, deadline: float, throttle: _Throttle, stop: threading.Event) -> None:
        self.deadline = deadline
        self.throttle = throttle
        self.stop = stop
        self.requests = 0
        self.delay = 0.0
        self.delay_from_server = False
        self.gave_up: str | None = None


def _parse_rate_limit_reset(value: str) -> float | None:
    """
    Seconds to wait from an ``X-RateLimit-Reset`` header.

    Accepts epoch milliseconds, epoch seconds, seconds to wait, or an HTTP date; ``None`` when unreadable.
    """
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError):
            return None
    if number > 1e11:
        return max(0.0, number / 1000.0 - time.time())
    if number > 1e9:
        return max(0.0, number - time.time())
    return max(0.0, number)


class SegmentRetry(Retry):
    """
    urllib3 ``Retry`` for Segment batches.

    Adds to urllib3's behaviour: ``X-RateLimit-Reset`` when ``Retry-After`` is absent; a deadline per batch
    (no retry is started that would begin after it); a backoff before the first retry too; a pause of all
    workers when Segment asks for one; a client-side rate limit; and an ``_Attempts`` record of what happened.
    413 is not retried even with ``Retry-After``.
    """

    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def __init__(self, *args: Any, attempts: _Attempts | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts = attempts

    def new(self, **kw: Any) -> SegmentRetry:
        """Copy with changed counters, keeping the batch's shared attempt record."""
        retry = super().new(**kw)
        retry.attempts = self.attempts
        return retry

    def get_backoff_time(self) -> float:
        """Exponential backoff with jitter, also before the first retry (urllib3 retries at once)."""
        errors = len(self.history)
        if errors == 0:
            return 0.0
        backoff = self.backoff_factor * (2 ** (errors - 1)) + random.random() * self.backoff_jitter
        return float(max(0.0, min(self.backoff_max, backoff)))

    def get_retry_after(self, response: Any) -> float | None:
        """Seconds asked for by ``Retry-After`` (seconds or HTTP date), else by ``X-RateLimit-Reset``."""
        value = response.headers.get("Retry-After")
        if value is not None:
            try:
                return self.parse_retry_after(value)
            except InvalidHeader:
                pass
        reset = response.headers.get("X-RateLimit-Reset")
        if reset is None:
            return None
        return _parse_rate_limit_reset(reset)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> SegmentRetry:
        """Count a failed attempt; give up when attempts, the deadline or the delivery are over."""
        attempts = self.attempts
        if error is not None and _plain_http_answer(error):  # wrong scheme or port: retrying cannot help
            if attempts is not None:
                attempts.gave_up = "not retried"
            raise MaxRetryError(_pool, url, error) from error
        try:
            retry = super().increment(method, url, response, error, _pool, _stacktrace)
        except MaxRetryError:
            if attempts is not None:
                attempts.gave_up = "retry attempts exhausted"
            raise
        if attempts is None:
            return retry
        delay, from_server = retry._next_delay(response)
        reason = error or ResponseError(f"gave up on HTTP {getattr(response, 'status', '?')}")
        if attempts.stop.is_set():
            attempts.gave_up = "delivery stopped"
            raise MaxRetryError(_pool, url, reason)
        if time.monotonic() + delay > attempts.deadline:
            attempts.gave_up = "retry time budget exhausted"
            raise MaxRetryError(_pool, url, reason)
        attempts.delay, attempts.delay_from_server = delay, from_server
        return retry

    def _next_delay(self, response: Any) -> tuple[float, bool]:
        """Seconds to wait before the next attempt and whether Segment asked for them."""
        if response is not None and self.respect_retry_after_header:
            retry_after = self.get_retry_after(response)
            if retry_after is not None:
                return retry_after, True
        return self.get_backoff_time(), False

    def sleep(self, response: Any = None) -> None:
        """Wait as planned by :meth:`increment`; a wait Segment asked for holds every worker."""
        attempts = self.attempts
        if attempts is None:
            super().sleep(response)
            return
        if attempts.delay_from_server:
            attempts.throttle.pause_until(time.monotonic() + attempts.delay)
        elif attempts.delay > 0:
            attempts.stop.wait(attempts.delay)
        attempts.throttle.wait(attempts.stop)
        if attempts.stop.is_set():
            attempts.gave_up = "delivery stopped"
            raise MaxRetryError(None, None, ResponseError("delivery stopped"))  # type: ignore[arg-type]
        attempts.requests += 1


def _redact(text: str, secret: str) -> str:
    """Remove a secret, and its Basic-auth encoding, from a text."""
    if not secret:
        return text
    encoded = base64.b64encode(f"{secret}:".encode()).decode()
    return text.replace(secret, "***").replace(encoded, "***")


def _response_message(response: requests.Response) -> str:
    """Segment's error message from a response body, short and on one line."""
    text = response.text or ""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("message") or data.get("error") or data.get("errors") or text)
    text = " ".join(text.split())
    return text[:_MAX_REASON_TEXT]


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it, following urllib3's and requests' wrapping."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 12 and current not in chain:
        chain.append(current)
        if isinstance(current, MaxRetryError) and current.reason is not None:
            current = current.reason
            continue
        nested = next((arg for arg in current.args if isinstance(arg, BaseException)), None)
        current = nested or current.__cause__ or current.__context__
    return chain


def _plain_http_answer(exc: BaseException) -> bool:
    """Whether a TLS handshake failed because the server answered in plain HTTP (``https://`` to HTTP)."""
    tls = (item for item in _exception_chain(exc) if isinstance(item, ssl.SSLError))
    texts = [str(item).replace("_", " ").lower() for item in tls]
    return any(words in text for text in texts for words in _PLAIN_HTTP_TLS_WORDS)


def _tls_error_text(chain: list[BaseException]) -> str:
    """A TLS failure, with OpenSSL's reason code and what to check."""
    if _plain_http_answer(chain[0]):
        return PLAIN_HTTP_TLS_ERROR
    codes = (getattr(item, "reason", None) for item in chain if isinstance(item, ssl.SSLError))
    code = next((code for code in codes if code), None)
    return (
        f"TLS error{f' ({code})' if code else ''}: check the scheme or port of the connection's host, and "
        "that the worker trusts the server's certificate"
    )


def describe_exception(exc: BaseException) -> str:
    """A short, secret-free description of a connection problem (no URL, no body)."""
    chain = _exception_chain(exc)
    checks: list[tuple[tuple[type[BaseException], ...], str]] = [
        ((NameResolutionError,), "host name not resolved"),
        ((ConnectionRefusedError,), "connection refused"),
        ((NewConnectionError,), "could not connect"),
        ((RemoteDisconnected,), "connection closed by the server without an answer"),
        ((ConnectionResetError,), "connection reset by the server"),
        ((requests.exceptions.SSLError, ssl.SSLError), ""),  # described by _tls_error_text
        ((Urllib3TimeoutError, TimeoutError, requests.Timeout), "timeout: no answer in time"),
        ((ProtocolError, ConnectionError, requests.ConnectionError), "connection closed without an answer"),
    ]
    for types, text in checks:
        if any(isinstance(item, types) for item in chain):
            return text or _tls_error_text(chain)
    return f"request error ({type(chain[-1]).__name__})"


class _Delivery:
    """One :meth:`SegmentHook.send` call: a bounded pool of workers fed by the batcher."""

    def __init__(
        self,
        settings: SegmentSettings,
        policy: RetryPolicy,
        batcher: Batcher,
        *,
        max_consecutive_failed_batches: int | None,
        max_listed_events: int,
        log: Any,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.batcher = batcher
        self.max_consecutive_failures = max_consecutive_failed_batches
        self.log = log
        self.report = DeliveryReport(max_listed_events=max_listed_events)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.throttle = _Throttle(settings.requests_per_second)
        self.slots = threading.Semaphore(2 * settings.max_in_flight)
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.consecutive_failures = 0
        self.started = time.monotonic()
        self.logged_rejections = 0
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.timeouts = (min(settings.timeout, 10.0), settings.timeout)
        self.retry_template = SegmentRetry(
            total=policy.max_attempts - 1,
            connect=None,
            read=None,
            status=None,
            other=None,
            redirect=False,
            allowed_methods=frozenset({"POST"}),
            status_forcelist=RETRY_STATUSES,
            backoff_factor=policy.backoff_factor,
            backoff_max=policy.backoff_max,
            backoff_jitter=policy.backoff_jitter,
            raise_on_status=False,
            raise_on_redirect=False,
            respect_retry_after_header=True,
        )

    # -- main thread -------------------------------------------------------------------------------------
    def run(
        self,
        messages: Iterable[Mapping[str, Any]],
        progress: Callable[[DeliveryReport], None] | None,
        every: float,
    ) -> DeliveryReport:
        """Send everything, then return the report; re-raise what the input raises after in-flight ends."""
        reporter = _ProgressTicker(self, progress, every)
        executor = ThreadPoolExecutor(self.settings.max_in_flight, thread_name_prefix="segment-send")
        try:
            for item in self.batcher.split(messages):
                if isinstance(item, Batch):
                    self._dispatch(item, executor, reporter)
                else:
                    self._reject_alone(item)
                reporter.tick()
            for _ in range(2 * self.settings.max_in_flight):
                reporter.acquire(self.slots)
        except BaseException:
            self.stop.set()
            executor.shutdown(wait=True, cancel_futures=True)
            self.log.warning("Segment delivery interrupted; so far: %s", self._snapshot().summary())
            raise
        finally:
            executor.shutdown(wait=True)
            self._close_sessions()
        self.report.elapsed = time.monotonic() - self.started
        return self.report

    def _dispatch(self, batch: Batch, executor: ThreadPoolExecutor, reporter: _ProgressTicker) -> None:
        """Hand a batch to a worker once a slot is free (or fail it unsent once delivery was stopped)."""
        with self.lock:
            self.report.batches += 1
            aborted = self.report.aborted
        if aborted:
            with self.lock:
                self.report.add(FAILED, batch.message_ids, f"not sent: {aborted}")
            return
        reporter.acquire(self.slots)
        executor.submit(self._deliver, batch)

    def _reject_alone(self, item: RejectedEvent) -> None:
        """Account for an event the batcher refused (too large, not JSON, no identity)."""
        detail = f"{item.reason} ({item.size} bytes)" if item.size else item.reason
        with self.lock:
            self.report.add(REJECTED, [item.message_id], item.reason, detail)
            self.logged_rejections += 1
            first = self.logged_rejections <= 10
        if first:
            self.log.warning("Segment event %r rejected before sending: %s", item.message_id, detail)

    def _snapshot(self) -> DeliveryReport:
        with self.lock:
            snapshot = self.report.snapshot()
        snapshot.elapsed = time.monotonic() - self.started
        return snapshot

    def _close_sessions(self) -> None:
        for session in self.sessions:
            session.close()

    # -- worker threads ----------------------------------------------------------------------------------
    def _deliver(self, batch: Batch) -> None:
        """Worker: send one batch and account for all its events, whatever happens."""
        try:
            try:
                if self.report.aborted or self.stop.is_set():
                    outcome = _Outcome(FAILED, f"not sent: {self.report.aborted or 'delivery stopped'}")
                else:
                    outcome = self._send(batch)
            except Exception as exc:  # a bug here must not lose events
                outcome = _Outcome(FAILED, f"internal error: {type(exc).__name__}")
                self.log.exception("Unexpected error while sending a Segment batch")
            self._account(batch, outcome)
        finally:
            self.slots.release()  # after accounting, so a finished delivery has counted every event

    def _send(self, batch: Batch) -> _Outcome:
        """POST a batch with retries; re-post only if a connection broke outside urllib3's retries."""
        body = batch.body(format_sent_at())
        if self.settings.gzip:
            body = gzip_module.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)
        attempts = _Attempts(time.monotonic() + self.policy.max_retry_time, self.throttle, self.stop)
        session, adapter = self._session()
        try:
            while True:
                adapter.max_retries = self._retry_for(attempts)
                self.throttle.wait(self.stop)
                attempts.requests += 1
                try:
                    response = session.post(
                        self.settings.batch_url,
                        data=body,
                        headers=self.headers,
                        timeout=self.timeouts,
                        allow_redirects=False,
                    )
                except requests.RequestException as exc:
                    if self._may_post_again(attempts):
                        continue
                    return self._outcome_of_error(exc, attempts)
                return self._outcome_of_response(response, attempts)
        finally:
            with self.lock:
                self.report.requests += attempts.requests
                self.report.retries += max(0, attempts.requests - 1)
                self.report.bytes += len(body) * attempts.requests

    def _retry_for(self, attempts: _Attempts) -> SegmentRetry:
        """A fresh ``Retry`` allowing what is left of the batch's attempts."""
        retry = self.retry_template.new(total=self.policy.max_attempts - attempts.requests - 1)
        retry.attempts = attempts
        return retry

    def _may_post_again(self, attempts: _Attempts) -> bool:
        """After an error urllib3 did not retry (the answer broke off), wait and re-post if budget remains."""
        if attempts.gave_up or attempts.requests >= self.policy.max_attempts or self.stop.is_set():
            return False
        delay = min(self.policy.backoff_max, self.policy.backoff_factor * 2 ** (attempts.requests - 1))
        if time.monotonic() + delay > attempts.deadline:
            return False
        self.stop.wait(delay)
        return not self.stop.is_set()

    def _session(self) -> tuple[requests.Session, HTTPAdapter]:
        """This worker thread's session (created once, connections reused)."""
        pair = getattr(self.local, "pair", None)
        if pair is None:
            session = _new_session(self.settings)
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=self.retry_template)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            pair = self.local.pair = (session, adapter)
            with self.lock:
                self.sessions.append(session)
        return pair

    def _outcome_of_response(self, response: requests.Response, attempts: _Attempts) -> _Outcome:
        status = response.status_code
        if 200 <= status < 300:
            return _Outcome(DELIVERED)
        message = _redact(_response_message(response), self.settings.write_key)
        reason = f"HTTP {status}" + (f": {message}" if message else "")
        if status in RETRY_STATUSES:
            return _Outcome(FAILED, f"{reason} ({attempts.gave_up or 'retry attempts exhausted'})")
        if status in FATAL_STATUSES:
            return _Outcome(FAILED, reason, fatal=True)
        if 300 <= status < 400:
            return _Outcome(FAILED, f"HTTP {status}: unexpected redirect; check the connection's host", True)
        return _Outcome(REJECTED, reason)

    def _outcome_of_error(self, exc: BaseException, attempts: _Attempts) -> _Outcome:
        text = describe_exception(exc)
        if _plain_http_answer(exc):
            return _Outcome(FAILED, text, fatal=True)
        return _Outcome(FAILED, f"{text} ({attempts.gave_up or 'retry attempts exhausted'})")

    def _account(self, batch: Batch, outcome: _Outcome) -> None:
        """Record a batch's outcome; stop sending after a fatal answer or too many failed batches in a row."""
        stop_reason = None
        with self.lock:
            self.report.add(outcome.category, batch.message_ids, outcome.reason)
            if outcome.category == DELIVERED:
                self.consecutive_failures = 0
            elif outcome.category == FAILED:
                self.consecutive_failures += 1
                limit = self.max_consecutive_failures
                if outcome.fatal or (limit and self.consecutive_failures >= limit):
                    stop_reason = outcome.reason if outcome.fatal else f"{limit} batches failed in a row"
                    if self.report.aborted is None:
                        self.report.aborted = stop_reason
                    else:
                        stop_reason = None
        if outcome.category != DELIVERED:
            self.log.warning(
                "Segment batch of %d events %s: %s", len(batch), outcome.category, outcome.reason
            )
        if stop_reason:
            self.log.error(
                "Stopped sending to Segment: %s; the remaining events count as failed.", stop_reason
            )


class _Outcome:
    """What became of one batch."""

    __slots__ = ("category", "fatal", "reason")

    def __init__(self, category: str, reason: str = "", fatal: bool = False) -> None:
        self.category = category
        self.reason = reason
        self.fatal = fatal


class _ProgressTicker:
    """Calls the progress callback (or logs) every ``every`` seconds from the main thread."""

    def __init__(
        self, delivery: _Delivery, callback: Callable[[DeliveryReport], None] | None, every: float
    ) -> None:
        self.delivery = delivery
        self.callback = callback
        self.every = max(every, 0.01)
        self.next_at = time.monotonic() + self.every

    def tick(self) -> None:
        """Report if the interval has passed."""
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.every
        snapshot = self.delivery._snapshot()
        if self.callback is not None:
            self.callback(snapshot)
        else:
            self.delivery.log.info("Segment delivery in progress: %s", snapshot.summary())

    def acquire(self, slots: threading.Semaphore) -> None:
        """Take a slot, reporting progress while waiting for one."""
        while not slots.acquire(timeout=max(0.0, self.next_at - time.monotonic())):
            self.tick()


def _new_session(settings: SegmentSettings) -> requests.Session:
    """A session with Basic auth (write key as user name, empty password) and the provider's headers."""
    session = requests.Session()
    session.auth = (settings.write_key, "")
    session.headers["User-Agent"] = _USER_AGENT
    return session


def _coerce(value: Any, kind: type, name: str) -> Any:
    """Read a connection extra or argument that may arrive as a string; ``None`` when unset."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, bool) and kind is not bool:
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                return lowered in {"true", "1", "yes", "on"}
            return bool(value)
        return kind(value)
    except (TypeError, ValueError):
        kind_name = {int: "whole number", float: "number"}.get(kind, kind.__name__)
        raise SegmentConfigurationError(
            f"Segment setting {name!r} must be a {kind_name}, not {value!r}."
        ) from None


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _write_key_problem(write_key: str) -> str | None:
    """What keeps a write key out of an HTTP Basic ``Authorization`` header, or ``None`` (never the key)."""
    for position, char in enumerate(write_key, 1):
        if char == ":":
            return f"a ':' (character {position}; Basic auth ends the user name at the first ':')"
        if not char.isascii():
            return f"a character outside ASCII (character {position})"
        if not char.isprintable():
            return f"a control character (character {position})"
    return None


def build_base_url(host: str | None, schema: str | None = None, port: int | None = None) -> str:
    """
    Normalise a connection's host into a Tracking API base URL: the same URL however the host is written.

    ``api.segment.io`` becomes ``https://api.segment.io``; a scheme in the host wins, else the connection's
    schema (``http``/``https``); a port is added if the host has none, unless it is the scheme's default (443,
    80); scheme and host are lower-cased; a trailing ``/`` or ``/v1`` is dropped.

    :param host: the connection's host, empty for Segment's default.
    :param schema: the connection's schema field.
    :param port: the connection's port field.
    """
    host = (host or "").strip()
    if not host:
        return DEFAULT_HOST
    if "://" not in host:
        scheme = schema.lower() if schema and schema.lower() in ("http", "https") else "https"
        host = f"{scheme}://{host}"
    parts = urlsplit(host)
    if parts.username or parts.password or "@" in parts.netloc:
        raise SegmentConfigurationError(
            "The Segment connection's host must not contain credentials; put the write key in the Password."
        )
    try:
        port = parts.port or port
    except ValueError:  # not a number, or over 65535
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise SegmentConfigurationError(
            "The Segment connection's host must be an http(s) URL or a host name."
        )
    netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port and port != _DEFAULT_PORTS[parts.scheme]:
        netloc = f"{netloc}:{port}"
    path = parts.path.rstrip("/")
    if path.lower().endswith("/v1"):
        path = path[:-3].rstrip("/")
    return urlunsplit((parts.scheme, netloc, path, "", ""))


class SegmentHook(BaseHook):
    """
    Send messages (``identify`` now; ``track``, ``group``, ... fit too) to Segment's HTTP Tracking API.

    Connection (type ``segment_tracking``): Password = the source's write key; Host = API base URL (default
    ``https://api.segment.io``; EU workspaces ``https://events.eu1.segmentapis.com``); extras ``timeout``,
    ``gzip``, ``max_in_flight``, ``requests_per_second``. Connections of the official Segment provider (type
    ``segment``, write key in extra ``write_key``) work unchanged. Constructor arguments override extras.

    :param segment_conn_id: the Airflow connection to use.
    :param timeout: seconds to wait for Segment's answer to one request (extra ``timeout``, default 30).
    :param gzip: gzip request bodies (extra ``gzip``, default off).
    :param max_in_flight: batch requests sent at once (extra ``max_in_flight``, default 4, 1 to 32).
    :param requests_per_second: client-side cap on requests per second, for workspaces with low limits
        (extra ``requests_per_second``, default none; at least 0.1, or 0 for none).
    :param max_attempts: requests per batch at most, the first included (default 8).
    :param max_retry_time: seconds from a batch's first request after which it is not retried (default 300).
    :param backoff_factor: first backoff in seconds, doubled on each retry (default 0.5).
    :param backoff_max: longest backoff in seconds (default 30).
    :param backoff_jitter: up to this many random seconds added to a backoff (default 1).
    :param max_batch_bytes: cap on a request body, envelope included (default 500,000; Segment: 500 KB).
    :param max_batch_events: cap on the events of a batch (default and Segment's limit: 2,500).
    :param max_consecutive_failed_batches: after this many batches in a row failed despite retries, stop
        sending; the remaining events count as failed (``None`` never stops). A 401, 403 or 404 stops at once.
    :param max_listed_events: rejected and failed messageIds listed in the report, each (default 10,000).
    """

    conn_name_attr = "segment_conn_id"
    default_conn_name = "segment_default"
    conn_type = "segment_tracking"
    hook_name = "Segment Tracking API"

    def __init__(
        self,
        segment_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        gzip: bool | None = None,
        max_in_flight: int | None = None,
        requests_per_second: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_retry_time: float = DEFAULT_MAX_RETRY_TIME,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_consecutive_failed_batches: int | None = DEFAULT_MAX_CONSECUTIVE_FAILED_BATCHES,
        max_listed_events: int = DEFAULT_MAX_LISTED_EVENTS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.segment_conn_id = segment_conn_id
        self._overrides = {
            "timeout": timeout,
            "gzip": gzip,
            "max_in_flight": max_in_flight,
            "requests_per_second": requests_per_second,
        }
        self.retry_policy = RetryPolicy(
            max_attempts, max_retry_time, backoff_factor, backoff_max, backoff_jitter
        )
        self.batcher = Batcher(max_batch_bytes=max_batch_bytes, max_batch_events=max_batch_events)
        self.max_consecutive_failed_batches = max_consecutive_failed_batches
        self.max_listed_events = max_listed_events
        self._settings: SegmentSettings | None = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form's field behaviour, from the provider's metadata (one source of truth)."""
        from airflow_provider_looker_segment.get_provider_info import get_provider_info

        for conn_type in get_provider_info()["connection-types"]:
            if conn_type["connection-type"] == cls.conn_type:
                return dict(conn_type["ui-field-behaviour"])
        return {}

    @property
    def settings(self) -> SegmentSettings:
        """The resolved settings; reads the connection once. Raises if there is no write key."""
        if self._settings is None:
            self._settings = self._load_settings()
        return self._settings

    def _load_settings(self) -> SegmentSettings:
        conn = self.get_connection(self.segment_conn_id)
        extra = conn.extra_dejson or {}
        if conn.conn_type and conn.conn_type not in _CONNECTION_TYPES:
            self.log.warning(
                "Connection %r has type %r; expected one of %s.",
                conn.conn_id,
                conn.conn_type,
                _CONNECTION_TYPES,
            )
        keys = (str(key).strip() for key in (conn.password, extra.get("write_key")) if key is not None)
        write_key = next((key for key in keys if key), "")  # a blank Password does not hide the extra
        if not write_key:
            raise SegmentConfigurationError(
                f"Connection {self.segment_conn_id!r} has no Segment write key: set its Password "
                "(Write key), or the extra 'write_key' for a connection of type 'segment'."
            )
        _mask(write_key)
        return self._validated(write_key, build_base_url(conn.host, conn.schema, conn.port), extra)

    def _validated(self, write_key: str, base_url: str, extra: Mapping[str, Any]) -> SegmentSettings:
        """Check the write key; merge arguments over connection extras over defaults, and check them."""
        write_key = write_key.strip()
        problem = _write_key_problem(write_key)
        if problem:
            raise SegmentConfigurationError(
                f"The Segment write key of connection {self.segment_conn_id!r} contains {problem}, so it "
                "cannot be sent in an HTTP Basic Authorization header. Set the Password (or the extra "
                "'write_key') to the source's write key exactly as Segment shows it (the source's Settings > "
                "API Keys)."
            )
        values: dict[str, Any] = {}
        in_extra = f"extra of connection {self.segment_conn_id!r}"
        for name, kind, usable, accepted in _SETTINGS:
            override = self._overrides[name]
            value = _coerce(_first(override, extra.get(name)), kind, name)
            if value is not None and not usable(value):
                where = in_extra if override is None else "operator or hook argument"
                raise SegmentConfigurationError(
                    f"Segment setting {name!r} is {value!r} ({where}): {accepted}."
                )
            values[name] = value
        return SegmentSettings(
            base_url=base_url,
            write_key=write_key,
            timeout=_first(values["timeout"], DEFAULT_TIMEOUT),
            gzip=_first(values["gzip"], False),
            max_in_flight=_first(values["max_in_flight"], DEFAULT_MAX_IN_FLIGHT),
            requests_per_second=values["requests_per_second"] or None,
        )

    def validate_config(self) -> SegmentSettings:
        """
        Read and check the connection and the settings without any request.

        :raises SegmentConfigurationError: no write key, a write key that cannot go into an HTTP Basic header
            (a ``:``, a control character, a character outside ASCII), or an unusable host or setting.
        """
        return self.settings

    def get_conn(self) -> requests.Session:
        """Return a new ``requests`` session authenticated with the write key (Basic auth)."""
        return _new_session(self.settings)

    def send(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        progress: Callable[[DeliveryReport], None] | None = None,
        progress_interval: float = 10.0,
    ) -> DeliveryReport:
        """
        Deliver messages in batches; return what became of each.

        The input is consumed lazily; memory is bounded by the batches in flight (at most
        ``2 * max_in_flight`` queued or sending, plus the one being filled), not by the input's size.
        Every message ends in exactly one of delivered, rejected or failed. Exceptions raised by
        ``messages`` propagate (after the requests in flight end).

        :param messages: Segment messages, each with a ``messageId`` (one is added when missing).
        :param progress: called from the calling thread with a snapshot of the report every
            ``progress_interval`` seconds; when omitted, progress is logged instead.
        :param progress_interval: seconds between progress reports.
        """
        settings = self.settings
        self.log.info(
            "Sending to %s: up to %d requests in flight, gzip %s, rate limit %s.",
            settings.batch_url,
            settings.max_in_flight,
            "on" if settings.gzip else "off",
            f"{settings.requests_per_second}/s" if settings.requests_per_second else "none",
        )
        delivery = _Delivery(
            settings,
            self.retry_policy,
            self.batcher,
            max_consecutive_failed_batches=self.max_consecutive_failed_batches,
            max_listed_events=self.max_listed_events,
            log=self.log,
        )
        report = delivery.run(messages, progress, progress_interval)
        self.log.info("Segment delivery done: %s", report.summary())
        return report

    def test_connection(self) -> tuple[bool, str]:
        """
        Check the configuration and reach the endpoint with an empty batch; say what was and was not checked.

        Segment answers HTTP 200 to an empty batch, and to many bad requests (unknown write keys included),
        so a success proves the address, TLS and that a Tracking API answers, not that the key is right.
        """
        try:
            settings = self.settings
        except SegmentConfigurationError as exc:
            return False, str(exc)
        body = b'{"batch":[],"sentAt":"' + format_sent_at().encode() + b'"}'
        try:
            with _new_session(settings) as session:
                response = session.post(
                    settings.batch_url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=(min(settings.timeout, 10.0), settings.timeout),
                    allow_redirects=False,
                )
        except requests.RequestException as exc:
            return False, f"Could not reach {settings.batch_url}: {describe_exception(exc)}."
        return _connection_verdict(settings, response)


def _connection_verdict(settings: SegmentSettings, response: requests.Response) -> tuple[bool, str]:
    """Turn the answer to an empty batch into ``test_connection``'s result."""
    status = response.status_code
    message = _redact(_response_message(response), settings.write_key)
    if 200 <= status < 300:
        return True, (
            f"Reached {settings.batch_url}: HTTP {status} to an empty batch. Checked: the address, TLS "
            "and that the Tracking API answers with Basic auth. Not checked: the write key itself (Segment "
            "accepts unknown write keys with HTTP 200 and drops their events) nor the events' contents; "
            "send a test event and look for it in the source's debugger."
        )
    if status in (401, 403):
        return False, f"Segment refused the write key (HTTP {status}{': ' + message if message else ''})."
    return False, f"{settings.batch_url} answered HTTP {status}{': ' + message if message else ''}."


def _mask(secret: str) -> None:
    """Ask Airflow to mask the write key in task logs (extras named ``write_key`` are not masked by name)."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older task SDKs
        return
    try:
        mask_secret(secret)
    except Exception:  # pragma: no cover - masking is best effort outside a task
        pass
