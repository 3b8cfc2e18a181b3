"""
Hook for Segment's HTTP Tracking API: reads and checks the connection, and :meth:`SegmentHook.send` hands the
messages to a :class:`~airflow_provider_looker_segment.delivery.Delivery`. See docs/delivery.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import requests
from airflow.sdk import BaseHook
from requests.adapters import HTTPAdapter

from airflow_provider_looker_segment import __version__
from airflow_provider_looker_segment.batching import (
    DEFAULT_MAX_BATCH_BYTES,
    ENVELOPE_BYTES,
    MAX_BATCH_EVENTS,
    Batch,
    Batcher,
)
from airflow_provider_looker_segment.delivery import (
    DEFAULT_MAX_QUEUED_BYTES,
    Delivery,
    RetryPolicy,
    SegmentConnectionConfig,
    describe_transport_error,
    response_message,
)
from airflow_provider_looker_segment.delivery_report import DeliveryReport
from airflow_provider_looker_segment.exceptions import (
    InvalidParameterError,
    LookerSegmentError,
    SegmentConfigurationError,
)
from airflow_provider_looker_segment.flow_control import SEGMENT_REQUESTS_PER_SECOND
from airflow_provider_looker_segment.net import normalise_base_url, redact
from airflow_provider_looker_segment.params import to_bool, to_number

DEFAULT_HOST = "https://api.segment.io"
DEFAULT_TIMEOUT = 30.0
#: Default cap on requests in flight: at a 200 ms round trip, 32 requests carry 160 batches per second (about
#: 250,000 events per second with batches of ~1,600 identify calls), for workspaces whose limit was raised
#: above the 1,000 events per second Segment takes without prior arrangement (see ``events_per_second``).
DEFAULT_MAX_IN_FLIGHT = 32
MAX_IN_FLIGHT_LIMIT = 64
#: Lowest client-side rate limit: one request every 10 s (lower ones turn a sync into days).
MIN_REQUESTS_PER_SECOND = 0.1
#: Lowest event pacing: one event per second.
MIN_EVENTS_PER_SECOND = 1.0
DEFAULT_MAX_CONSECUTIVE_FAILED_BATCHES = 3
_USER_AGENT = f"airflow-provider-looker-segment/{__version__}"
_CONNECTION_TYPES = ("segment_tracking", "segment")


class SegmentHook(BaseHook):
    """
    Send messages (``identify``, ``group``, ``track``) to Segment's HTTP Tracking API.

    Connection type ``segment_tracking`` (Password = write key, Host = API base URL); connections of the
    official Segment provider (type ``segment``, extra ``write_key``) work unchanged. Every field and extra:
    docs/parameters.md#connections; delivery, pacing and Segment's limits: docs/delivery.md. Constructor
    arguments override extras.

    :param segment_conn_id: the Airflow connection to use.
    :param timeout: seconds to wait for Segment's answer to one request (extra ``timeout``, default 30).
    :param gzip: gzip request bodies (extra ``gzip``, default off).
    :param max_in_flight: cap on the batch requests in flight (extra ``max_in_flight``, default 32, 1 to 64).
    :param requests_per_second: cap on requests per second (extra ``requests_per_second``; 0 for none).
    :param events_per_second: ceiling on events sent per second (extra ``events_per_second``; 0 for none).
    :param max_attempts: requests per batch at most, the first included (default 8).
    :param max_retry_time: seconds from a batch's first request after which it is not retried (default 300).
    :param backoff_factor: first backoff in seconds, doubled on each retry (default 0.5).
    :param backoff_max: longest backoff in seconds (default 30).
    :param backoff_jitter: up to this many random seconds added to a backoff (default 1).
    :param max_batch_bytes: cap on a request body, envelope included (default 500,000; Segment: 500 KB).
    :param max_batch_events: cap on the events of a batch (default and Segment's limit: 2,500).
    :param max_consecutive_failed_batches: stop sending after this many failed batches in a row (``None``:
        never).
    :param max_queued_bytes: cap on the request bodies waiting to be sent (default 4,000,000).
    :param clock: monotonic seconds for rate limits, pauses, the retry budget and the window (tests: a fake).
    :param sleep: waits a number of seconds between attempts (tests pass a fake); by default a wait that
        :meth:`stop` cuts short.
    :param wall_clock: Unix time, for the ``sentAt`` stamped on each attempt (tests pass a fake).
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
        events_per_second: float | None = None,
        max_attempts: int = RetryPolicy.max_attempts,
        max_retry_time: float = RetryPolicy.max_retry_time,
        backoff_factor: float = RetryPolicy.backoff_factor,
        backoff_max: float = RetryPolicy.backoff_max,
        backoff_jitter: float = RetryPolicy.backoff_jitter,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_consecutive_failed_batches: int | None = DEFAULT_MAX_CONSECUTIVE_FAILED_BATCHES,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.segment_conn_id = segment_conn_id
        self._overrides = {
            "timeout": timeout,
            "gzip": gzip,
            "max_in_flight": max_in_flight,
            "requests_per_second": requests_per_second,
            "events_per_second": events_per_second,
        }
        self.retry_policy = RetryPolicy(
            max_attempts=to_number(max_attempts, name="max_attempts", whole=True, minimum=1),
            max_retry_time=to_number(max_retry_time, name="max_retry_time", minimum=0),
            backoff_factor=to_number(backoff_factor, name="backoff_factor", minimum=0),
            backoff_max=to_number(backoff_max, name="backoff_max", minimum=0),
            backoff_jitter=to_number(backoff_jitter, name="backoff_jitter", minimum=0),
        )
        self.batcher = Batcher(max_batch_bytes=max_batch_bytes, max_batch_events=max_batch_events)
        self.max_consecutive_failed_batches = max_consecutive_failed_batches
        self.max_queued_bytes = to_number(max_queued_bytes, name="max_queued_bytes", whole=True, minimum=1)
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._config: SegmentConnectionConfig | None = None
        self._stopped = False
        self._delivery: Delivery | None = None
        #: The report of the last :meth:`send` (``None`` before one ended).
        self.last_report: DeliveryReport | None = None

    @property
    def config(self) -> SegmentConnectionConfig:
        """The resolved connection; reads it once (see :meth:`validate_config`)."""
        if self._config is None:
            self._config = self._load_config()
        return self._config

    def validate_config(self) -> SegmentConnectionConfig:
        """
        Read and check the connection and the settings without any request.

        :raises SegmentConfigurationError: no write key, or a write key that cannot go into an HTTP Basic
            header (a ``:``, a control character, a character outside ASCII).
        :raises ConnectionConfigError: an unusable Host.
        :raises InvalidParameterError: an unusable setting (extra or argument), naming it.
        """
        return self.config

    def _load_config(self) -> SegmentConnectionConfig:
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
        problem = _write_key_problem(write_key)
        if problem:
            raise SegmentConfigurationError(
                f"The Segment write key of connection {self.segment_conn_id!r} contains {problem}, so it "
                "cannot be sent in an HTTP Basic Authorization header. Set the Password (or the extra "
                "'write_key') to the source's write key exactly as Segment shows it (the source's Settings > "
                "API Keys)."
            )
        host = (conn.host or "").strip()
        base_url = (
            normalise_base_url(host, conn.schema, conn.port, what="The Segment connection", keep_path=True)
            if host
            else DEFAULT_HOST
        )
        value, name = self._setting(extra, "timeout")
        timeout = to_number(value, name=name, default=DEFAULT_TIMEOUT, above=0)
        value, name = self._setting(extra, "gzip")
        gzip = to_bool(value, name=name, default=False)
        value, name = self._setting(extra, "max_in_flight")
        max_in_flight = to_number(
            value,
            name=name,
            default=DEFAULT_MAX_IN_FLIGHT,
            whole=True,
            minimum=1,
            maximum=MAX_IN_FLIGHT_LIMIT,
        )
        value, name = self._setting(extra, "requests_per_second")
        rate = to_number(value, name=name, default=0.0)
        if rate != 0 and rate < MIN_REQUESTS_PER_SECOND:
            raise InvalidParameterError(
                f"{name} must be 0 (no limit) or a number at least {MIN_REQUESTS_PER_SECOND:g} (one request "
                f"every 10 s), got {value!r}"
            )
        value, name = self._setting(extra, "events_per_second")
        events_rate = to_number(value, name=name, default=0.0)
        if events_rate != 0 and events_rate < MIN_EVENTS_PER_SECOND:
            raise InvalidParameterError(
                f"{name} must be 0 (no pacing) or a number at least {MIN_EVENTS_PER_SECOND:g}, got {value!r}"
            )
        return SegmentConnectionConfig(
            base_url, write_key, timeout, gzip, max_in_flight, rate or None, events_rate or None
        )

    def _setting(self, extra: Mapping[str, Any], name: str) -> tuple[Any, str]:
        """A setting's raw value (the argument wins over the extra) and its name for error messages."""
        override = self._overrides[name]
        if override is not None:
            return override, f"{name} (operator or hook argument)"
        return extra.get(name), f"{name} (extra of connection {self.segment_conn_id!r})"

    def get_conn(self) -> requests.Session:
        """Return a new ``requests`` session authenticated with the write key (Basic auth)."""
        return _new_session(self.config)

    def send(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        progress: Callable[[DeliveryReport], None] | None = None,
        progress_interval: float = 10.0,
        on_undelivered: Callable[[Sequence[Any]], None] | None = None,
    ) -> DeliveryReport:
        """
        Deliver messages in batches; return what became of each.

        The input is consumed lazily; memory is bounded by the batches in flight and waiting, not by the
        input's size (see :class:`~airflow_provider_looker_segment.delivery.Delivery`). Every message read
        ends in exactly one of delivered, rejected or failed. An exception raised by ``messages`` propagates
        once the requests on the wire have ended. After :meth:`stop`, the input is no longer read and the
        report accounts for the messages read so far.

        :param messages: Segment messages, each with a ``messageId`` (one is added when missing).
        :param progress: called from the calling thread with a copy of the report every
            ``progress_interval`` seconds; when omitted, progress is logged instead.
        :param progress_interval: seconds between progress reports.
        :param on_undelivered: also given the messageIds of every rejected or failed event, all of them (the
            report lists a bounded number), from the thread that settled them.
        """
        config = self.config
        self.log.info(
            "Sending to %s: up to %d requests in flight (adaptive), gzip %s, at most %s requests/s%s, %s.",
            config.batch_url,
            config.max_in_flight,
            "on" if config.gzip else "off",
            f"{config.requests_per_second:,g}"
            if config.requests_per_second
            else f"{SEGMENT_REQUESTS_PER_SECOND:,g}",
            "" if config.requests_per_second else " (Segment's guidance)",
            f"events paced at {config.events_per_second:,g}/s"
            if config.events_per_second
            else "events not paced",
        )
        delivery = Delivery(
            config,
            new_session=partial(_new_session, config),
            batcher=self.batcher,
            policy=self.retry_policy,
            max_consecutive_failed_batches=self.max_consecutive_failed_batches,
            log=self.log,
            max_queued_bytes=self.max_queued_bytes,
            clock=self._clock,
            sleep=self._sleep,
            wall_clock=self._wall_clock,
            progress=progress,
            progress_interval=progress_interval,
            on_undelivered=on_undelivered,
        )
        self._delivery = delivery
        self.last_report = None
        if self._stopped:  # stop() came first: read nothing, send nothing
            delivery.stop()
        try:
            report = delivery.run(messages)
        finally:
            self._delivery = None
        self.last_report = report
        # A clean delivery is in the sync's summary line; one with rejected or failed events says why here.
        level = logging.INFO if report.rejected or report.failed else logging.DEBUG
        self.log.log(level, "Segment delivery done: %s", report.summary())
        return report

    def stop(self) -> None:
        """
        Make a running :meth:`send` return promptly, and later ones send nothing (for an operator's
        ``on_kill``). Thread-safe and signal-safe.

        The input is no longer read; no request or retry is started; the batches queued, in flight or being
        filled count as failed with reason ``stopped``; requests in flight are abandoned (their sender
        threads exit when they end).
        """
        self._stopped = True
        delivery = self._delivery
        if delivery is not None:
            delivery.stop()

    def test_connection(self) -> tuple[bool, str]:
        """
        Check the configuration and reach the endpoint with an empty batch; say what was and was not checked.

        Segment answers HTTP 200 to an empty batch, and to many bad requests (unknown write keys included),
        so a success proves the address, TLS and that a Tracking API answers, not that the key is right.
        """
        try:
            config = self.config
        except LookerSegmentError as exc:
            return False, str(exc)
        try:
            with _new_session(config) as session:
                response = session.post(
                    config.batch_url,
                    data=Batch([], [], ENVELOPE_BYTES).body(),
                    headers={"Content-Type": "application/json"},
                    timeout=(min(config.timeout, 10.0), config.timeout),
                    allow_redirects=False,
                )
        except requests.RequestException as exc:
            return False, f"Could not reach {config.batch_url}: {describe_transport_error(exc)[1]}."
        status = response.status_code
        message = redact(response_message(response), (config.write_key,), basic_auth=True)
        answer = f"HTTP {status}{': ' + message if message else ''}"
        if 200 <= status < 300:
            return True, (
                f"Reached {config.batch_url}: HTTP {status} to an empty batch. Checked: the address, TLS "
                "and that the Tracking API answers with Basic auth. Not checked: the write key itself "
                "(Segment accepts unknown write keys with HTTP 200 and drops their events) nor the events' "
                "contents; send a test event and look for it in the source's debugger."
            )
        if status in (401, 403):
            return False, f"Segment refused the write key ({answer})."
        return False, f"{config.batch_url} answered {answer}."


def _new_session(config: SegmentConnectionConfig) -> requests.Session:
    """
    A session with Basic auth (write key as user name, empty password), the provider's User-Agent, one
    kept-alive connection, and urllib3's retries off (the delivery's loop is the only retry mechanism).
    """
    session = requests.Session()
    session.auth = (config.write_key, "")
    session.headers["User-Agent"] = _USER_AGENT
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


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
