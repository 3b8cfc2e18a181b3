"""
Delivery of Segment batches: the calling thread forms batches, sender threads POST them to ``/v1/batch``
within the adaptive window, and :meth:`Delivery._post` is the one retry loop. See docs/delivery.md.
"""

from __future__ import annotations

import copy
import email.utils
import gzip as gzip_module
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

import orjson
import requests

from airflow_provider_looker_segment import net
from airflow_provider_looker_segment.batching import Batch, Batcher, RejectedEvent, format_sent_at, stamp_body
from airflow_provider_looker_segment.delivery_report import DELIVERED, FAILED, REJECTED, DeliveryReport
from airflow_provider_looker_segment.flow_control import (
    SEGMENT_REQUESTS_PER_SECOND,
    FlowWindow,
    PaceMeter,
    Throttle,
    paced_batch_events,
)

#: The reason of the events a :meth:`Delivery.stop` left unsent or in flight.
STOPPED = "stopped"
#: Statuses worth another attempt: timeouts, rate limits and server errors.
RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})
#: Statuses whose ``Retry-After`` (or ``X-RateLimit-Reset``) is obeyed.
WAIT_STATUSES = frozenset({429, 503})
#: Statuses that will not get better for the next batch either: stop sending at once.
FATAL_STATUSES = frozenset({401, 403, 404})
PLAIN_HTTP_TLS_ERROR = (
    "TLS error: the server answered in plain HTTP (wrong scheme or port: use http:// for a plain-HTTP "
    "endpoint, or the port that serves HTTPS)"
)
_GZIP_LEVEL = 6
_MAX_REASON_TEXT = 200
#: Default cap on the request bodies of the batches waiting to be sent (about eight full batches).
DEFAULT_MAX_QUEUED_BYTES = 4_000_000
#: How often the calling thread, waiting for the senders, looks for a stop (a signal handler cannot wake it).
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class SegmentConnectionConfig:
    """
    Where and how a :class:`Delivery` sends: a Segment connection resolved with its hook's arguments.

    :param base_url: Tracking API base URL without a trailing ``/v1``.
    :param write_key: the source's write key (never shown in ``repr``).
    :param timeout: seconds to wait for Segment's answer to one request.
    :param gzip: compress request bodies.
    :param max_in_flight: cap on the batch requests in flight (the adaptive window stays below it).
    :param requests_per_second: client-side cap on requests per second, ``None`` for none.
    :param events_per_second: pacing of the events sent, ``None`` for none.
    """

    base_url: str
    write_key: str = field(repr=False)
    timeout: float
    gzip: bool
    max_in_flight: int
    requests_per_second: float | None
    events_per_second: float | None

    @property
    def batch_url(self) -> str:
        """URL of ``POST /v1/batch``."""
        return f"{self.base_url}/v1/batch"


@dataclass(frozen=True)
class RetryPolicy:
    """
    How a batch is retried.

    :param max_attempts: requests per batch at most, the first included.
    :param max_retry_time: seconds from a batch's first request after which no retry is started (a wait
        reaching past it ends the retries at once).
    :param backoff_factor: first backoff in seconds; doubled on each further retry.
    :param backoff_max: longest backoff in seconds.
    :param backoff_jitter: up to this many random seconds added to each backoff (before the cap).
    """

    max_attempts: int = 8
    max_retry_time: float = 300.0
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    backoff_jitter: float = 1.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt when Segment did not say how long."""
        wait = self.backoff_factor * 2.0 ** (failures - 1) + random.random() * self.backoff_jitter
        return min(self.backoff_max, wait)


def asked_wait(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """
    Seconds Segment asks the client to wait: ``Retry-After`` (seconds or an HTTP date), else
    ``X-RateLimit-Reset`` (epoch milliseconds, epoch seconds, seconds or an HTTP date); ``None`` when neither
    is there and readable.

    :param headers: the answer's headers.
    :param now: the current epoch time (``time.time()`` when omitted).
    """
    now = time.time() if now is None else now
    for value in (headers.get("Retry-After"), headers.get("X-RateLimit-Reset")):
        try:
            number = float(value)  # type: ignore[arg-type]
        except TypeError:  # absent
            continue
        except ValueError:
            try:
                moment = email.utils.parsedate_to_datetime(value).timestamp()  # type: ignore[arg-type]
            except (TypeError, ValueError, IndexError):
                continue
        else:
            if not math.isfinite(number):
                continue
            moment = number / 1000.0 if number > 1e11 else number if number > 1e9 else now + number
        return max(0.0, moment - now)
    return None


def describe_transport_error(exc: BaseException) -> tuple[str, str]:
    """
    A request that got no answer, in a few secret-free words.

    :return: ``(kind, text)``: the kind from :func:`~airflow_provider_looker_segment.net.transport_problem`
        (:data:`~airflow_provider_looker_segment.net.PLAIN_HTTP` is fatal) and the text for reports and logs.
    """
    kind, reason = net.transport_problem(exc)
    texts = {
        net.PLAIN_HTTP: PLAIN_HTTP_TLS_ERROR,
        net.TLS: f"TLS error ({reason}): check the scheme or port of the connection's host, and that the "
        "worker trusts the server's certificate",
        net.TIMEOUT: f"timeout: {reason}",
        net.UNREACHABLE: f"could not connect: {reason}",
    }
    return kind, texts.get(kind, reason)


def response_message(response: requests.Response) -> str:
    """Segment's error message from an answer's body, short and on one line (not yet redacted)."""
    text = response.text or ""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("message") or data.get("error") or data.get("errors") or text)
    return " ".join(text.split())[:_MAX_REASON_TEXT]


class _Outcome(NamedTuple):
    """What became of one batch; ``fatal`` stops the delivery (the next batches would fare no better)."""

    category: str
    reason: str = ""
    fatal: bool = False


class Delivery:
    """
    One :meth:`SegmentHook.send`: the calling thread feeds batches to sender threads, as many as the
    :class:`~airflow_provider_looker_segment.flow_control.FlowWindow` lets be in flight.

    Memory stays bounded: at most ``window`` batches (and ``max_queued_bytes``, one batch always allowed)
    wait, at most ``window`` are in flight, plus the one being filled (docs/delivery.md, "Speed and pacing").

    :param config: the hook's resolved connection.
    :param new_session: makes an authenticated ``requests`` session (one per sender thread).
    :param batcher: splits the input into batches.
    :param policy: how a batch is retried.
    :param max_consecutive_failed_batches: stop sending after this many failed batches in a row (or never).
    :param log: where to log.
    :param max_queued_bytes: cap on the request bodies of the batches waiting to be sent.
    :param clock: monotonic seconds (rate limits, pauses, the retry budget, the window's measurements).
    :param sleep: waits a number of seconds; by default a wait that :meth:`stop` cuts short.
    :param wall_clock: Unix time, for the ``sentAt`` of each attempt.
    :param progress: called from the calling thread with a copy of the report every ``progress_interval``
        seconds; when omitted, progress is logged instead.
    :param progress_interval: seconds between progress reports.
    :param on_undelivered: given the messageIds of every rejected or failed event (under the lock).
    """

    def __init__(
        self,
        config: SegmentConnectionConfig,
        *,
        new_session: Callable[[], requests.Session],
        batcher: Batcher,
        policy: RetryPolicy,
        max_consecutive_failed_batches: int | None,
        log: logging.Logger,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        progress: Callable[[DeliveryReport], None] | None = None,
        progress_interval: float = 10.0,
        on_undelivered: Callable[[Sequence[Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.new_session = new_session
        pace = config.events_per_second
        if pace:  # a ceiling: batches of a tenth of a second's worth, a bucket of one batch (flow_control)
            most = paced_batch_events(pace, batcher.max_batch_events)
            batcher = Batcher(
                max_batch_bytes=batcher.max_batch_bytes,
                max_batch_events=most,
                max_event_bytes=batcher.max_event_bytes,
            )
        self.batcher = batcher
        self.policy = policy
        self.max_consecutive_failures = max_consecutive_failed_batches
        self.log = log
        self.max_queued_bytes = max_queued_bytes
        self.clock = clock
        self.wall_clock = wall_clock
        self.stopping = threading.Event()
        self.sleep = sleep or self.stopping.wait
        request_rate = config.requests_per_second or SEGMENT_REQUESTS_PER_SECOND
        self.throttle = Throttle(request_rate, pace, clock, burst=batcher.max_batch_events if pace else None)
        self.meter = PaceMeter()
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.timeouts = (min(config.timeout, 10.0), config.timeout)
        # ``lock`` guards the report, the window and the state below; senders wait for ``work``, the caller
        # for ``room``.
        self.lock = threading.Lock()
        self.work, self.room = threading.Condition(self.lock), threading.Condition(self.lock)
        self.flow = FlowWindow(
            config.max_in_flight,
            requests_per_second=request_rate,
            events_per_second=pace,
        )
        self.report = DeliveryReport(listener=on_undelivered)
        self.progress, self.progress_interval = progress, max(progress_interval, 0.01)
        self.queue: deque[Batch] = deque()
        self.queued_bytes = 0
        self.pending: dict[Batch, None] = {}  # queued or sending, not yet accounted for (in order)
        self.sending = 0  # batches a sender holds: requests on the wire, or waits between attempts
        self.senders: list[threading.Thread] = []
        self.closed = False  # no more batches will come: idle senders exit
        self.halted = False  # accounting is over: no more requests, late outcomes are dropped
        self.consecutive_failures = 0
        self.rejections_logged = 0
        self.waited = 0.0  # seconds the calling thread waited for room (sending was the bottleneck)

    def stop(self) -> None:
        """
        Make :meth:`run` return promptly: no new request, no retry, no more input read. Batches not yet
        accounted for (queued, in flight, or being filled) count as failed with reason :data:`STOPPED`;
        requests in flight are abandoned and their senders exit when they end. Thread-safe, and safe to call
        from a signal handler (it takes no lock the calling thread may hold).
        """
        self.stopping.set()

    # -- calling thread ------------------------------------------------------------------------------------
    def run(self, messages: Iterable[Mapping[str, Any]]) -> DeliveryReport:
        """
        Send everything and return the report; an exception of the input (or any other) propagates once the
        requests on the wire have ended (no new request, no retry meanwhile).
        """
        self.next_report = time.monotonic() + self.progress_interval
        try:
            working_since = self.clock()
            for item in self.batcher.split(self._until_stopped(messages)):
                if isinstance(item, Batch):
                    with self.lock:
                        before = self.flow.window
                        self.flow.produced(self.clock() - working_since, len(item))
                        self._window_changed(before)
                    waiting_since = time.monotonic()
                    self._wait(lambda batch=item: self._has_room(batch))
                    self.waited += time.monotonic() - waiting_since
                    self._dispatch(item)
                    working_since = self.clock()
                else:
                    self._reject(item)
                self._report_progress()
            with self.lock:
                self.closed = True
                self.work.notify_all()
            self._wait(lambda: not self.pending)
        except BaseException:
            self.stopping.set()
            self._wait(lambda: not self.sending, stoppable=False)
            self._halt(STOPPED)
            self.log.warning("Segment delivery interrupted; so far: %s", self.report.summary())
            raise
        if self.stopping.is_set():
            self._halt(STOPPED)
            self.log.warning("Segment delivery stopped: %s", self.report.summary())
        else:
            with self.lock:
                senders = list(self.senders)
            for sender in senders:
                sender.join()
        self.log.debug(
            "Segment delivery flow: %s; reading waited %.2f s for room.", self.flow.describe(), self.waited
        )
        pace = self.config.events_per_second
        level = logging.WARNING if self.meter.over_limit(pace) else logging.INFO
        self.log.log(level, "Segment delivery pace: %s.", self.meter.describe(pace))
        return self.report

    def _until_stopped(self, messages: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """The input, ending early after a stop (so the batch being filled is still accounted for)."""
        stopping = self.stopping
        if stopping.is_set():
            return
        for message in messages:
            yield message
            if stopping.is_set():
                return

    def _has_room(self, batch: Batch) -> bool:
        """Whether ``batch`` may wait in the queue: fewer than ``window`` batches and ``max_queued_bytes``."""
        if not self.queue:
            return True
        return len(self.queue) < self.flow.window and self.queued_bytes + batch.size <= self.max_queued_bytes

    def _wait(self, ready: Callable[[], bool], *, stoppable: bool = True) -> None:
        """Wait until ``ready()`` (checked under the lock) or, if ``stoppable``, a stop; report progress."""
        while True:
            with self.lock:
                if ready() or (stoppable and self.stopping.is_set()):
                    return
                self.room.wait(min(_POLL_SECONDS, max(0.0, self.next_report - time.monotonic())))
            if stoppable:
                self._report_progress()

    def _report_progress(self) -> None:
        """Call the progress callback with a copy of the report (or log it) when it is due."""
        now = time.monotonic()
        if now < self.next_report:
            return
        self.next_report = now + self.progress_interval
        with self.lock:
            snapshot = copy.deepcopy(self.report)  # later updates must not change what the callback got
        if self.progress is not None:
            self.progress(snapshot)
        else:
            self.log.info("Segment delivery in progress: %s", snapshot.summary())

    def _dispatch(self, batch: Batch) -> None:
        """Queue a batch for the senders, or count it failed if delivery was stopped."""
        with self.lock:
            self.report.batches += 1
            if self.stopping.is_set():
                self.report.add(FAILED, batch.message_ids, STOPPED)
            elif self.report.aborted:
                self.report.add(FAILED, batch.message_ids, f"not sent: {self.report.aborted}")
            else:
                self.meter.begin(self.clock())
                self.pending[batch] = None
                self.queue.append(batch)
                self.queued_bytes += batch.size
                self._start_senders()
                self.work.notify()

    def _start_senders(self) -> None:
        """Start senders while queued batches outnumber free senders, up to the window (under the lock)."""
        while len(self.queue) > len(self.senders) - self.sending and len(self.senders) < self.flow.window:
            sender = threading.Thread(
                target=self._sender, name=f"segment-send-{len(self.senders)}", daemon=True
            )
            self.senders.append(sender)
            sender.start()

    def _reject(self, item: RejectedEvent) -> None:
        """Account for an event the batcher refused (too large, not JSON, no identity); log the first ten."""
        with self.lock:
            self.report.add(REJECTED, [item.message_id], item.reason.value)
            self.rejections_logged += 1
            first = self.rejections_logged <= 10
        if first:
            size = f" ({item.size} bytes)" if item.size else ""
            self.log.warning(
                "Segment event %r rejected before sending: %s%s", item.message_id, item.reason.value, size
            )

    def _halt(self, reason: str) -> None:
        """Close the accounting: batches still pending count as failed; senders make no more requests."""
        with self.lock:
            self.halted = self.closed = True
            if self.report.aborted is None:
                self.report.aborted = reason
            for batch in self.pending:
                self.report.add(FAILED, batch.message_ids, reason)
            self.pending.clear()
            self.queue.clear()
            self.queued_bytes = 0
            self.work.notify_all()

    # -- sender threads ------------------------------------------------------------------------------------
    def _sender(self) -> None:
        """Take batches from the queue, while the window allows, and deliver them until there are no more."""
        session = self.new_session()
        try:
            while True:
                with self.lock:
                    while not (self.queue and self.sending < self.flow.window) and not (
                        self.closed and not self.queue
                    ):
                        self.work.wait()
                    if not self.queue:
                        return
                    batch = self.queue.popleft()
                    self.queued_bytes -= batch.size
                    self.sending += 1
                    self.room.notify()
                    if self.closed and not self.queue:
                        self.work.notify_all()  # the last batch is taken: idle senders may exit
                    aborted = self.report.aborted
                try:
                    outcome = (
                        _Outcome(FAILED, f"not sent: {aborted}") if aborted else self._post(session, batch)
                    )
                except BaseException as exc:  # whatever happens, the batch is accounted for
                    outcome = _Outcome(FAILED, f"internal error: {type(exc).__name__}")
                    self.log.exception("Unexpected error while sending a Segment batch")
                self._settle(batch, outcome)
        finally:
            session.close()

    def _post(self, session: requests.Session, batch: Batch) -> _Outcome:
        """
        POST one batch until Segment accepts or refuses it for good, or attempts or time run out.

        Which answers are retried, the waits and the per-attempt ``sentAt``: see docs/delivery.md, "Retries
        and sentAt". A 408, 429, 5xx or timeout also halves the window (:meth:`FlowWindow.congested`); an
        accepted request's round trip is measured for it.
        """
        head = batch.head()
        batch.events = []  # the head holds them now (memory of a batch in flight)
        policy, secrets = self.policy, (self.config.write_key,)
        deadline = math.inf
        attempt = 0
        while True:
            attempt += 1
            wait = self.throttle.reserve(len(batch))
            if wait > 0:
                self.sleep(wait)
            if attempt == 1:
                deadline = self.clock() + policy.max_retry_time
            body = stamp_body(head, format_sent_at(datetime.fromtimestamp(self.wall_clock(), timezone.utc)))
            if self.config.gzip:
                body = gzip_module.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)
            epoch = self._count_request(len(body), retry=attempt > 1)
            if epoch is None:
                return _Outcome(FAILED, STOPPED)
            started = self.clock()
            try:
                response = session.post(
                    self.config.batch_url,
                    data=body,
                    headers=self.headers,
                    timeout=self.timeouts,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                kind, problem = describe_transport_error(exc)
                if kind == net.PLAIN_HTTP:  # wrong scheme or port: no retry can help
                    return _Outcome(FAILED, problem, fatal=True)
                if kind == net.TIMEOUT:
                    self._measure(epoch, None)
                asked = None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    answered = self.clock()
                    self._measure(epoch, answered - started, (started, answered, len(batch)))
                    return _Outcome(DELIVERED)
                message = net.redact(response_message(response), secrets, basic_auth=True)
                problem = f"HTTP {status}: {message}" if message else f"HTTP {status}"
                if 300 <= status < 400:
                    redirect = f"HTTP {status}: unexpected redirect; check the connection's host"
                    return _Outcome(FAILED, redirect, fatal=True)
                if status in FATAL_STATUSES:
                    return _Outcome(FAILED, problem, fatal=True)
                if status not in RETRY_STATUSES:
                    return _Outcome(REJECTED, problem)
                self._measure(epoch, None)
                asked = asked_wait(response.headers) if status in WAIT_STATUSES else None
            if attempt >= policy.max_attempts:
                return _Outcome(FAILED, f"{problem} (retry attempts exhausted)")
            delay = policy.backoff(attempt) if asked is None else asked
            if self.clock() + delay > deadline:
                return _Outcome(FAILED, f"{problem} (retry time budget exhausted)")
            if self.stopping.is_set():
                return _Outcome(FAILED, STOPPED)
            self.log.warning(
                "Retrying a Segment batch of %d events in %.2f s (%s): attempt %d of %d failed: %s",
                len(batch),
                delay,
                "asked by Segment" if asked is not None else "backoff",
                attempt,
                policy.max_attempts,
                problem,
            )
            if asked is None:
                self.sleep(delay)
            else:
                self.throttle.pause_until(self.clock() + delay)

    def _count_request(self, size: int, *, retry: bool) -> int | None:
        """
        Count a request about to be made and return the window's epoch it is sent in; ``None`` (and nothing
        counted) once delivery is stopping.
        """
        with self.lock:
            if self.halted or self.stopping.is_set():
                return None
            self.report.requests += 1
            self.report.retries += int(retry)
            self.report.bytes += size
            return self.flow.epoch

    def _measure(
        self, epoch: int, round_trip: float | None, accepted: tuple[float, float, int] | None = None
    ) -> None:
        """
        Tell the window about an answer: accepted after ``round_trip`` seconds, or pushback (``None``); and
        the pace meter about an accepted request (``(started, answered, events)``).
        """
        with self.lock:
            before = self.flow.window
            if accepted is not None:
                self.meter.record(*accepted)
            if round_trip is not None:
                self.flow.accepted(round_trip)
            elif self.flow.congested(epoch):
                self.log.info("Segment pushed back: at most %d requests in flight for now.", self.flow.window)
            self._window_changed(before)

    def _window_changed(self, before: int) -> None:
        """After a measurement (under the lock): start and wake only the senders a larger window lets go."""
        grown = self.flow.window - before
        if grown > 0:
            self._start_senders()
            self.work.notify(grown)
            self.room.notify()

    def _settle(self, batch: Batch, outcome: _Outcome) -> None:
        """Account for a batch; stop sending after a fatal answer or too many failed batches in a row."""
        stop_reason = None
        with self.lock:
            self.sending -= 1
            self.room.notify()
            self.work.notify()
            if batch not in self.pending:  # accounted for when delivery was halted
                return
            del self.pending[batch]
            self.report.add(outcome.category, batch.message_ids, outcome.reason)
            if outcome.category == DELIVERED:
                self.consecutive_failures = 0
            elif outcome.category == FAILED and not self.stopping.is_set():
                self.consecutive_failures += 1
                limit = self.max_consecutive_failures
                if self.report.aborted is None and (
                    outcome.fatal or (limit and self.consecutive_failures >= limit)
                ):
                    stop_reason = outcome.reason if outcome.fatal else f"{limit} batches failed in a row"
                    self.report.aborted = stop_reason
                    if outcome.fatal:
                        self.report.refused = outcome.reason
        if outcome.category != DELIVERED:
            self.log.warning(
                "Segment batch of %d events %s: %s", len(batch), outcome.category, outcome.reason
            )
        if stop_reason:
            self.log.error(
                "Stopped sending to Segment: %s; the remaining events count as failed.", stop_reason
            )
