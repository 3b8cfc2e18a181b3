"""Helpers for the Segment tests: connections to the stand-in, messages, and the delivery invariant."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from standins.segment_standin import DEFAULT_WRITE_KEY, SegmentStandIn

from airflow_provider_looker_segment.delivery_report import DeliveryReport
from airflow_provider_looker_segment.hooks.segment import SegmentHook

#: Retry settings that keep the tests quick; a test overrides what it is about.
FAST = {
    "timeout": 5.0,
    "max_attempts": 5,
    "max_retry_time": 30.0,
    "backoff_factor": 0.01,
    "backoff_max": 0.05,
    "backoff_jitter": 0.005,
}


def identify(number: int, *, pad: int = 0, name: str = "Ty Arthur") -> dict[str, Any]:
    """An identify call like the transform's, with ``pad`` extra characters in a trait."""
    message: dict[str, Any] = {
        "type": "identify",
        "userId": f"user-{number}",
        "traits": {"name": name, "email": f"user{number}@example.com", "sessions count": number % 7},
        "context": {"library": {"name": "airflow-provider-looker-segment", "version": "test"}},
        "messageId": f"msg-{number:07d}",
    }
    if pad:
        message["traits"]["padding"] = "x" * pad
    return message


def identifies(count: int, *, start: int = 0, pad: int = 0) -> Iterator[dict[str, Any]]:
    """``count`` identify calls, generated lazily."""
    for number in range(start, start + count):
        yield identify(number, pad=pad)


def connect(
    monkeypatch: pytest.MonkeyPatch,
    standin: SegmentStandIn,
    conn_id: str = "segment_test",
    *,
    write_key: str | None = DEFAULT_WRITE_KEY,
    conn_type: str = "segment_tracking",
    extra: dict[str, Any] | None = None,
    host: str | None = None,
) -> str:
    """Define an Airflow connection (environment variable) to the stand-in (or ``host``); return its id."""
    definition: dict[str, Any] = {
        "conn_type": conn_type,
        "host": host or standin.base_url,
        "extra": extra or {},
    }
    if write_key is not None:
        definition["password"] = write_key
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(definition))
    return conn_id


def hook(conn_id: str, **settings: Any) -> SegmentHook:
    """A hook with the quick retry settings, overridden by ``settings``."""
    return SegmentHook(conn_id, **{**FAST, **settings})


def accounted(report: DeliveryReport) -> int:
    """All the events a report accounts for: delivered, rejected and failed."""
    return report.delivered + report.rejected + report.failed


def assert_received_equals_delivered(
    standin: SegmentStandIn, report: DeliveryReport, sent_ids: list[Any]
) -> None:
    """
    The delivery invariant: every sent event is in exactly one of delivered / rejected / failed, the set the
    stand-in received equals the set reported delivered, and duplicates come only from identical re-sends.
    """
    assert report.rejected_events_omitted == 0 and report.failed_events_omitted == 0
    rejected, failed = set(report.rejected_message_ids), set(report.failed_message_ids)
    assert len(rejected) == report.rejected and len(failed) == report.failed
    assert not rejected & failed
    assert accounted(report) == len(sent_ids)
    delivered = set(sent_ids) - rejected - failed
    assert report.delivered == len(delivered)
    received = standin.message_ids()
    assert set(received) == delivered, "stand-in received a different set than reported delivered"
    digests: dict[Any, set[int | None]] = defaultdict(set)
    for record in standin.records():
        if record.accepted:
            for message_id in record.message_ids or ():
                digests[message_id].add(record.digest)
    duplicated = [message_id for message_id, count in Counter(received).items() if count > 1]
    assert all(len(digests[message_id]) == 1 for message_id in duplicated), "a duplicate was not a re-send"


def attempts_by_batch(standin: SegmentStandIn) -> dict[Any, list[Any]]:
    """Ingestion records grouped by batch (first messageId), in arrival order."""
    grouped: dict[Any, list[Any]] = defaultdict(list)
    for record in standin.records():
        grouped[record.first_message_id].append(record)
    return grouped


class FakeClock:
    """
    A clock and a sleep for :class:`SegmentHook` (``clock=fake, sleep=fake.sleep``): time moves only when
    the hook sleeps, by exactly what it asked for, so waits are checked without depending on the machine.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


def wait_until(condition: Callable[[], bool], what: str, guard: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail after ``guard`` seconds (a hang guard, not a timing check)."""
    deadline = time.monotonic() + guard
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def send_stopped_when(
    sender: SegmentHook, messages: Iterable[dict[str, Any]], condition: Callable[[], bool], what: str
) -> DeliveryReport:
    """``sender.send(messages)`` while another thread calls ``sender.stop()`` once ``condition`` holds."""

    def stop_when_ready() -> None:
        wait_until(condition, what)
        sender.stop()

    stopper = threading.Thread(target=stop_when_ready)
    stopper.start()
    try:
        return sender.send(messages)
    finally:
        stopper.join()


def sender_threads() -> list[threading.Thread]:
    """The delivery's sender threads still alive."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("segment-send")]
