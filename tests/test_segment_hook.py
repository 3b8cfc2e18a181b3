"""SegmentHook against the Segment stand-in over HTTP: batching, auth, retries, faults, accounting."""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Iterator
from http import HTTPStatus
from itertools import pairwise
from typing import Any

import orjson
import pytest
import requests
from segment_helpers import (
    FakeClock,
    accounted,
    assert_received_equals_delivered,
    attempts_by_batch,
    connect,
    hook,
    identifies,
    identify,
    send_stopped_when,
    sender_threads,
    wait_until,
)
from standins.segment_standin import SegmentStandIn, segment_timestamp

from airflow_provider_looker_segment.batching import (
    DEFAULT_MAX_BATCH_BYTES,
    ENVELOPE_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    MAX_REQUEST_BYTES,
    Rejection,
    encode_event,
)
from airflow_provider_looker_segment.delivery import asked_wait, describe_transport_error
from airflow_provider_looker_segment.delivery_report import DeliveryReport
from airflow_provider_looker_segment.exceptions import (
    ConnectionConfigError,
    InvalidParameterError,
    SegmentConfigurationError,
)
from airflow_provider_looker_segment.flow_control import (
    INITIAL_WINDOW,
    SEGMENT_REQUESTS_PER_SECOND,
    FlowWindow,
    PaceMeter,
    Throttle,
    TokenBucket,
)
from airflow_provider_looker_segment.hooks.segment import DEFAULT_HOST, SegmentHook
from airflow_provider_looker_segment.sync_state import sync_key

SECRET_KEY = "wk-S3cr3t-Wr1te-Key-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[SegmentStandIn]:
    with SegmentStandIn(record="full", write_keys=("demo-write-key", SECRET_KEY)) as standin:
        yield standin


@pytest.fixture
def segment(server: SegmentStandIn) -> Iterator[SegmentStandIn]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def conn_id(monkeypatch: pytest.MonkeyPatch, segment: SegmentStandIn) -> str:
    return connect(monkeypatch, segment)


def sized(number: int, size: int, char: str = "x") -> dict[str, Any]:
    """An identify call whose encoding is exactly ``size`` bytes (padding ``char``, then ASCII)."""
    message = identify(number)
    message["traits"]["padding"] = ""
    room = size - len(encode_event(message))
    width = len(char.encode())
    message["traits"]["padding"] = char * (room // width) + "x" * (room % width)
    assert len(encode_event(message)) == size
    return message


def ids(messages: list[dict[str, Any]]) -> list[str]:
    return [m["messageId"] for m in messages]


# -- happy path, batching, gzip, auth ----------------------------------------------------------------------


def test_delivers_everything_and_the_standin_received_exactly_that(segment, conn_id):
    messages = [sized(i, 300 + (i * 37) % 3000, char="é😀"[i % 2]) for i in range(3000)]
    report = hook(conn_id, max_batch_events=400).send(iter(messages))
    assert (report.delivered, report.rejected, report.failed) == (3000, 0, 0)
    assert report.batches == segment.stats()["accepted_requests"] == report.requests >= 8
    assert report.retries == 0 and report.bytes == segment.stats()["wire_bytes"]
    assert_received_equals_delivered(segment, report, ids(messages))
    assert sorted(segment.events(), key=lambda e: e["messageId"]) == messages  # bytes as sent, unicode intact
    assert {r.auth for r in segment.records()} == {"basic"}


def test_batches_split_by_count_exactly_at_the_limit(segment, conn_id):
    messages = [
        {"type": "identify", "userId": f"u{i}", "messageId": f"m{i}"} for i in range(2 * MAX_BATCH_EVENTS + 1)
    ]
    report = hook(conn_id, max_in_flight=1).send(messages)
    assert [r.events for r in segment.records()] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 1]
    assert report.batches == 3
    assert_received_equals_delivered(segment, report, ids(messages))


@pytest.mark.parametrize("limit", [DEFAULT_MAX_BATCH_BYTES, MAX_REQUEST_BYTES])
def test_batches_split_by_bytes_exactly_at_the_limit(segment, conn_id, limit):
    """A body of exactly the cap is one request (Segment's 500 KB included); one byte more is two."""
    count = 20
    target = limit - ENVELOPE_BYTES - (count - 1)
    each = target // count
    messages = [sized(i, each, char="ß") for i in range(count - 1)]
    messages.append(sized(count - 1, target - each * (count - 1)))
    report = hook(conn_id, max_in_flight=1, max_batch_bytes=limit).send(messages)
    assert [(r.events, r.body_bytes, r.status) for r in segment.records()] == [(count, limit, 200)]
    assert_received_equals_delivered(segment, report, ids(messages))
    segment.reset()
    messages[-1] = sized(count - 1, len(encode_event(messages[-1])) + 1)
    report = hook(conn_id, max_in_flight=1, max_batch_bytes=limit).send(messages)
    assert [r.events for r in segment.records()] == [count - 1, 1]
    assert all(r.body_bytes <= limit and r.status == 200 for r in segment.records())
    assert_received_equals_delivered(segment, report, ids(messages))


def test_an_oversize_event_is_rejected_alone(segment, conn_id, capsys):
    messages = [sized(i, 600) for i in range(10)]
    messages[4] = sized(4, MAX_EVENT_BYTES + 1)
    messages[7] = sized(7, MAX_EVENT_BYTES)  # exactly at the limit: sent
    report = hook(conn_id).send(messages)
    assert (report.delivered, report.rejected, report.failed) == (9, 1, 0)
    assert report.rejected_message_ids == ["msg-0000004"]
    assert report.rejected_reasons == {Rejection.OVERSIZE.value: 1}
    logged = f"'msg-0000004' rejected before sending: {Rejection.OVERSIZE.value} (32769 bytes)"
    assert logged in capsys.readouterr().out
    assert [r.events for r in segment.records()] == [9]  # its neighbours went in one batch
    assert_received_equals_delivered(segment, report, ids(messages))


def test_gzip_request_bodies(segment, monkeypatch):
    conn_id = connect(monkeypatch, segment, extra={"gzip": True})
    messages = list(identifies(5000, pad=100))
    report = hook(conn_id, max_batch_events=1000).send(messages)
    records = segment.records()
    assert all(r.gzip and r.wire_bytes < r.body_bytes / 3 for r in records)
    assert report.bytes == sum(r.wire_bytes for r in records)
    assert_received_equals_delivered(segment, report, ids(messages))


def test_a_missing_message_id_is_assigned_and_sent(segment, conn_id):
    message = {"type": "identify", "userId": "u1", "traits": {"name": "Ty"}}
    report = hook(conn_id).send([message])
    (event,) = segment.events()
    assert report.delivered == 1 and len(event["messageId"]) == 36 and "messageId" not in message


# -- Segment refusing ----------------------------------------------------------------------------------


def test_an_unknown_write_key_is_answered_200_and_its_events_dropped_by_segment(segment, monkeypatch):
    """As Segment: HTTP 200 to every request, nothing received: only the source's debugger shows it."""
    conn_id = connect(monkeypatch, segment, write_key="not-the-key")
    report = hook(conn_id, max_batch_events=100).send(identifies(300))
    assert (report.delivered, report.rejected, report.failed) == (300, 0, 0)  # what Segment answered
    stats = segment.stats()
    assert (stats["events"], stats["dropped_events"], stats["by_status"]) == (0, 300, {"200": 3})


def test_a_wrong_write_key_gives_401_reported_and_not_retried(segment, monkeypatch):
    segment.unknown_write_key = "401"  # e.g. a gateway in front of Segment; Segment itself answers 200
    conn_id = connect(monkeypatch, segment, write_key="not-the-key")
    messages = list(identifies(2000))
    report = hook(conn_id, max_batch_events=100, max_in_flight=2).send(messages)
    assert (report.delivered, report.rejected, report.failed) == (0, 0, 2000)
    assert report.retries == 0
    assert (
        report.requests == segment.stats()["by_status"]["401"] <= 4
    )  # stopped at once: 20 batches, <= 4 sent
    assert report.aborted == "HTTP 401: invalid write key"
    assert report.failed_reasons["HTTP 401: invalid write key"] == report.requests * 100
    assert report.failed_reasons["not sent: HTTP 401: invalid write key"] == 2000 - report.requests * 100
    assert all(len(attempts) == 1 for attempts in attempts_by_batch(segment).values())
    assert_received_equals_delivered(segment, report, ids(messages))
    assert "2,000 failed" in report.summary() and "stopped early: HTTP 401" in report.summary()


@pytest.mark.parametrize("status", [400, 413])
def test_400_and_413_reject_the_batch_without_retry(segment, conn_id, status):
    segment.set_faults(script=["ok", str(status)])
    messages = list(identifies(300))
    report = hook(conn_id, max_batch_events=100, max_in_flight=1).send(messages)
    assert (report.delivered, report.rejected, report.failed) == (200, 100, 0)
    assert report.requests == 3 and report.retries == 0
    assert report.rejected_message_ids == ids(messages[100:200])
    assert list(report.rejected_reasons) == [f"HTTP {status}: {HTTPStatus(status).phrase}"]
    assert_received_equals_delivered(segment, report, ids(messages))


# -- retries ---------------------------------------------------------------------------------------------


def assert_retry_after_obeyed(segment: SegmentStandIn, wait: float) -> int:
    """Every batch answered 429 came back no sooner than asked, by the stand-in's own clock."""
    count = 0
    for attempts in attempts_by_batch(segment).values():
        for refused, retried in pairwise(attempts):
            if refused.action == "429":
                count += 1
                assert retried.arrived >= refused.answered + wait - 0.002, (refused, retried)
                assert retried.digest == refused.digest  # re-sent byte for byte
    return count


def test_429_storm_with_rate_limit_reset_is_obeyed(segment, conn_id, capsys):
    segment.set_faults(every_429=2, retry_after=0.3, retry_after_style="x-ratelimit-reset")
    messages = list(identifies(1200))
    report = hook(conn_id, max_batch_events=100, max_in_flight=4, max_attempts=30).send(messages)
    assert report.delivered == 1200 and report.failed == 0, report.failed_reasons
    halved = re.findall(r"Segment pushed back: at most (\d+) requests in flight", capsys.readouterr().out)
    assert halved and all(int(window) <= 2 for window in halved)  # from 4 at most: halved
    storm = segment.stats()["by_status"]["429"]
    assert storm >= 6 and report.retries == storm
    assert assert_retry_after_obeyed(segment, 0.3) == storm
    assert_received_equals_delivered(segment, report, ids(messages))


@pytest.mark.parametrize("style", ["seconds", "http-date"])
def test_retry_after_in_seconds_or_as_an_http_date_is_obeyed(segment, conn_id, style):
    segment.set_faults(script=["429"], retry_after=1, retry_after_style=style)
    messages = list(identifies(300))
    report = hook(conn_id, max_batch_events=100, max_in_flight=2).send(messages)
    assert report.delivered == 300 and report.retries == 1
    assert assert_retry_after_obeyed(segment, 1.0) == 1
    assert_received_equals_delivered(segment, report, ids(messages))


def test_sent_at_is_stamped_on_each_attempt_so_segment_keeps_the_events_timestamps(segment, conn_id):
    """
    Segment sets timestamp = receivedAt - (sentAt - timestamp): a retry waiting 10 s (Retry-After) must
    carry a sentAt of its own, or every event of the batch would be dated 10 s later.
    """
    clock, epoch = FakeClock(), 1_700_000_000.0
    segment.clock = lambda: epoch + clock()  # Segment's receivedAt and the client's wall clock agree
    segment.set_faults(script=["429"], retry_after=10)
    messages = [{**identify(number), "timestamp": "2023-11-14T21:00:00.000Z"} for number in range(50)]
    fake = {"clock": clock, "sleep": clock.sleep, "wall_clock": lambda: epoch + clock()}
    sender = hook(conn_id, max_in_flight=1, **fake)
    report = sender.send(messages)
    assert report.delivered == 50 and report.retries == 1
    refused, accepted = segment.records()
    assert (refused.action, accepted.action) == ("429", "200")
    assert accepted.arrived - refused.arrived == pytest.approx(10.0, abs=0.01)
    assert accepted.digest == refused.digest and accepted.sent_at != refused.sent_at  # same events
    stamped = segment_timestamp("2023-11-14T21:00:00.000Z", accepted.sent_at, accepted.arrived)
    assert stamped.isoformat() == "2023-11-14T21:00:00+00:00"
    assert_received_equals_delivered(segment, report, ids(messages))


def test_a_retry_after_beyond_the_time_budget_fails_the_batch_at_once(segment, conn_id):
    segment.set_faults(script=["429"], retry_after=30)
    messages = list(identifies(100))
    report = hook(conn_id, max_retry_time=2).send(messages)
    assert (report.delivered, report.failed, report.requests) == (0, 100, 1)
    assert list(report.failed_reasons) == ["HTTP 429: Too Many Requests (retry time budget exhausted)"]
    assert_received_equals_delivered(segment, report, ids(messages))


def test_500_bursts_are_retried(segment, conn_id):
    segment.set_faults(every_500=2, server_error_status=503)
    messages = list(identifies(2000))
    report = hook(conn_id, max_batch_events=100, max_attempts=30).send(messages)
    assert report.delivered == 2000 and report.retries == segment.stats()["by_status"]["503"] >= 10
    assert_received_equals_delivered(segment, report, ids(messages))


def test_connection_resets_are_retried(segment, conn_id):
    segment.set_faults(every_reset=3)
    messages = list(identifies(2000))
    report = hook(conn_id, max_batch_events=100, max_attempts=30).send(messages)
    assert report.delivered == 2000 and report.retries == segment.stats()["by_status"]["reset"] >= 6
    assert_received_equals_delivered(segment, report, ids(messages))


def test_a_reset_after_segment_accepted_gives_only_identical_duplicates(segment, conn_id):
    """Segment took the batch but the answer was lost: the re-send is byte for byte, counted once."""
    segment.set_faults(script=["accept-reset", "ok", "accept-reset"])
    messages = list(identifies(500))
    report = hook(conn_id, max_batch_events=100, max_in_flight=1).send(messages)
    assert (report.delivered, report.retries) == (500, 2)
    stats = segment.stats()
    assert (stats["events"], stats["unique_message_ids"], stats["duplicate_message_ids"]) == (700, 500, 200)
    assert_received_equals_delivered(segment, report, ids(messages))


def test_an_answer_broken_off_after_the_headers_is_re_sent(segment, conn_id):
    segment.set_faults(script=["partial"])
    messages = list(identifies(100))
    report = hook(conn_id).send(messages)
    assert (report.delivered, report.requests, report.retries) == (100, 2, 1)
    assert_received_equals_delivered(segment, report, ids(messages))


def test_an_endpoint_that_never_answers_times_out(segment, conn_id):
    segment.set_faults(hang=True, hang_seconds=3)
    messages = list(identifies(200))
    report = hook(conn_id, timeout=0.3, max_attempts=2, max_batch_events=100, max_in_flight=2).send(messages)
    assert (report.delivered, report.failed, report.requests) == (0, 200, 4)
    assert report.failed_reasons == {"timeout: no answer in time (retry attempts exhausted)": 200}
    assert segment.stats()["by_status"] == {"hang": 4}
    assert_received_equals_delivered(segment, report, ids(messages))


def test_one_request_that_never_answers_is_retried_after_the_timeout(segment, conn_id):
    segment.set_faults(script=["hang"], hang_seconds=3)
    messages = list(identifies(300))
    report = hook(conn_id, timeout=0.3, max_batch_events=100).send(messages)
    assert report.delivered == 300 and report.retries == 1
    assert_received_equals_delivered(segment, report, ids(messages))


def test_retry_budget_exhausted_gives_exact_failed_counts(segment, conn_id):
    messages = list(identifies(1000))
    poisoned = messages[350]["messageId"]  # in the 4th batch of 100
    segment.set_faults(status_for_ids={poisoned: 500}, every_500=5)
    report = hook(conn_id, max_batch_events=100, max_attempts=3).send(messages)
    assert (report.delivered, report.rejected, report.failed) == (900, 0, 100)
    assert report.failed_message_ids == ids(messages[300:400])
    assert report.failed_reasons == {"HTTP 500: Internal Server Error (retry attempts exhausted)": 100}
    assert len(attempts_by_batch(segment)[messages[300]["messageId"]]) == 3
    assert_received_equals_delivered(segment, report, ids(messages))


def test_delivery_stops_after_consecutive_failed_batches(segment, conn_id):
    segment.set_faults(every_500=1)
    messages = list(identifies(1000))
    report = hook(
        conn_id, max_batch_events=100, max_attempts=2, max_in_flight=1, max_consecutive_failed_batches=2
    )
    report = report.send(messages)
    assert (report.delivered, report.failed, report.requests) == (0, 1000, 4)
    assert report.aborted == "2 batches failed in a row"
    assert report.failed_reasons["not sent: 2 batches failed in a row"] == 800
    assert_received_equals_delivered(segment, report, ids(messages))


def test_backoff_doubles_with_jitter_up_to_its_cap(segment, conn_id):
    clock = FakeClock()
    segment.set_faults(every_500=1)
    settings = {"backoff_factor": 0.5, "backoff_max": 1.6, "backoff_jitter": 0.25}
    report = hook(conn_id, max_attempts=5, clock=clock, sleep=clock.sleep, **settings).send(identifies(100))
    assert (report.failed, report.requests, report.retries) == (100, 5, 4)
    assert list(report.failed_reasons) == ["HTTP 500: Internal Server Error (retry attempts exhausted)"]
    assert len(clock.sleeps) == 4  # one wait between two attempts, none after the last
    for waited, base in zip(clock.sleeps, [0.5, 1.0, 2.0, 4.0], strict=True):
        assert min(base, 1.6) <= waited <= min(base + 0.25, 1.6)


def test_no_retry_starts_past_the_time_budget(segment, conn_id):
    clock = FakeClock()
    segment.set_faults(every_500=1)
    settings = {"backoff_factor": 1, "backoff_max": 30, "backoff_jitter": 0, "max_retry_time": 2.5}
    report = hook(conn_id, max_attempts=10, clock=clock, sleep=clock.sleep, **settings).send(identifies(100))
    # the first retry starts 1 s after the first request; the second would start at 3 s, past 2.5 s
    assert (report.requests, clock.sleeps) == (2, [1.0])
    assert list(report.failed_reasons) == ["HTTP 500: Internal Server Error (retry time budget exhausted)"]


def test_a_retry_after_is_waited_for_instead_of_the_backoff(segment, conn_id):
    clock = FakeClock()
    segment.set_faults(script=["429", "500"], retry_after=7)
    messages = list(identifies(100))
    report = hook(conn_id, backoff_jitter=0, clock=clock, sleep=clock.sleep).send(messages)
    assert (report.delivered, report.retries) == (100, 2)
    assert clock.sleeps == [7.0, 0.02]  # the 429 says how long; the 500 gets the second backoff (2 x 0.01)
    assert_received_equals_delivered(segment, report, ids(messages))


@pytest.mark.parametrize("in_flight", [1, 4])
def test_client_side_rate_limit_spaces_requests(segment, conn_id, in_flight):
    """8 requests at 20/s: each waits for its own slot, 50 ms after the previous one, whatever the senders."""
    clock = FakeClock()
    messages = list(identifies(800))
    report = hook(
        conn_id,
        max_batch_events=100,
        max_in_flight=in_flight,
        requests_per_second=20,
        clock=clock,
        sleep=clock.sleep,
    ).send(messages)
    assert report.delivered == 800 and report.requests == 8
    assert clock() >= 7 * 0.05 - 1e-9  # the 8th slot is 7 intervals after the first
    if in_flight == 1:
        assert clock.sleeps == pytest.approx([0.05] * 7)
    assert_received_equals_delivered(segment, report, ids(messages))


def test_without_a_rate_limit_requests_keep_to_segments_guidance(segment, conn_id):
    """No requests_per_second: one request per millisecond at most (1,000/s, Segment's guidance)."""
    clock = FakeClock()
    report = hook(conn_id, max_batch_events=1, max_in_flight=1, clock=clock, sleep=clock.sleep).send(
        identifies(5)
    )
    assert report.delivered == 5 and report.requests == 5
    assert clock.sleeps == pytest.approx([1 / SEGMENT_REQUESTS_PER_SECOND] * 4)


# -- pacing in events per second ------------------------------------------------------------------------


def test_events_per_second_paces_each_batch_by_its_events(segment, conn_id):
    """1,000 events/s, batches of 100: each waits 0.1 s for its tokens; 1,000 events take 1 s."""
    clock = FakeClock()
    messages = list(identifies(1000))
    sender = hook(
        conn_id, max_batch_events=100, max_in_flight=1, events_per_second=1000, clock=clock, sleep=clock.sleep
    )
    report = sender.send(messages)
    assert report.delivered == 1000 and report.requests == 10
    assert clock.sleeps == pytest.approx([0.1] * 10)
    assert report.delivered / clock() == pytest.approx(1000)  # the paced rate, by the injected clock
    assert_received_equals_delivered(segment, report, ids(messages))


def busiest_second(segment: SegmentStandIn) -> int:
    """The most events Segment received within one second ([t, t + 1) windows, by the stand-in's clock)."""
    arrivals = sorted((r.arrived, r.events) for r in segment.records() if r.accepted)
    end = 1.0 - 1e-9  # the injected clock adds up sleeps of 0.1 s: 0.1 + 1.0 may come out as 1.0999...
    return max(
        sum(events for moment, events in arrivals if start <= moment < start + end) for start, _ in arrivals
    )


def test_events_per_second_is_a_ceiling_even_for_a_small_look(segment, conn_id):
    """1 event/s and 30 rows: 30 requests of one event, a second apart (it was one request of 30)."""
    clock = FakeClock()
    segment.clock = clock  # Segment's receivedAt, by the same injected clock
    messages = list(identifies(30))
    sender = hook(conn_id, max_in_flight=1, events_per_second=1, clock=clock, sleep=clock.sleep)
    report = sender.send(messages)
    assert report.delivered == 30
    assert [(r.events, r.arrived) for r in segment.records()] == [(1, pytest.approx(n)) for n in range(1, 31)]
    assert busiest_second(segment) == 1  # exactly the rate: nothing is late with an injected clock
    assert_received_equals_delivered(segment, report, ids(messages))


@pytest.mark.parametrize(("rate", "batch"), [(100, 10), (1000, 100), (2, 1)])
def test_no_second_carries_more_than_the_rate_plus_one_batch_after_a_pause(segment, conn_id, rate, batch):
    """
    Batches of a tenth of the rate from a bucket of one batch: Looker pausing for 5 s (the bucket fills)
    does not let a burst through; at most the rate plus one batch in any second (the batch in flight
    when the pause began goes late, with the next one right behind it: the documented burst).
    """
    clock = FakeClock()
    segment.clock = clock

    def rows_with_a_pause():
        for number, message in enumerate(identifies(rate * 6)):
            if number == rate * 3:
                clock.sleep(5.0)  # the Look's rows stop coming for 5 s
            yield message

    report = hook(conn_id, max_in_flight=1, events_per_second=rate, clock=clock, sleep=clock.sleep).send(
        rows_with_a_pause()
    )
    assert report.delivered == rate * 6
    assert {r.events for r in segment.records()} == {batch}
    assert busiest_second(segment) <= rate + batch


def test_the_pace_reached_is_logged_with_a_hint_above_segments_limit(segment, conn_id, capsys):
    clock = FakeClock()
    unpaced = hook(conn_id, max_batch_events=100, max_in_flight=1, clock=clock, sleep=clock.sleep)
    assert unpaced.send(identifies(3000)).delivered == 3000  # 30 requests, 1 ms apart (1,000 requests/s)
    out = capsys.readouterr().out
    line = re.search(r"Segment delivery pace: ([^\n]*)", out).group(1)
    assert line.startswith("3,000 events accepted in 0.0 s: 3,000 events/s sustained, at most 3,000 in one")
    assert "above Segment's 1,000 events per second per workspace, so Segment may queue the excess" in line
    assert "set events_per_second" in line
    paced = hook(conn_id, max_in_flight=1, events_per_second=1000, clock=clock, sleep=clock.sleep).send(
        identifies(3000)
    )
    assert paced.delivered == 3000
    line = re.search(r"Segment delivery pace: ([^\n]*)", capsys.readouterr().out).group(1)
    assert line.startswith("3,000 events accepted in 3.0 s: 1,000 events/s sustained, at most 1,000 in one")
    assert "(events_per_second 1,000)." in line and "above" not in line


def test_the_pace_meter_counts_the_busiest_second_whatever_the_answer_order():
    meter = PaceMeter()
    assert (meter.sustained(), meter.seconds, meter.peak) == (0.0, 0.0, 0)
    for started, events in [(0.0, 10), (0.5, 10), (0.2, 30), (1.1, 5), (1.15, 40), (3.0, 1)]:
        meter.record(started, started + 0.1, events)
    assert meter.peak == 85  # (0.15, 1.15]: 0.2, 0.5, 1.1 and 1.15, though 0.2 was recorded after 0.5
    assert (meter.events, meter.requests, meter.seconds) == (96, 6, pytest.approx(3.1))
    assert meter.sustained() == pytest.approx(96 / 3.1)
    assert "at most 85 in one second" in meter.describe(None) and "above" not in meter.describe(None)
    meter.record(3.5, 3.6, 1000)
    assert meter.peak == 1001 and meter.over_limit(None) and not meter.over_limit(1000)
    assert "above Segment's 1,000 events per second per workspace" in meter.describe(None)
    meter.begin(-1.0)  # later calls do not move the start
    assert meter.first == 0.0


def test_events_and_requests_per_second_together_the_slower_wins(segment, conn_id):
    clock = FakeClock()
    sender = hook(
        conn_id,
        max_batch_events=100,
        max_in_flight=1,
        events_per_second=1000,
        requests_per_second=2,
        clock=clock,
        sleep=clock.sleep,
    )
    report = sender.send(identifies(400))
    assert report.delivered == 400
    assert clock.sleeps == pytest.approx([0.1, 0.5, 0.5, 0.5])  # tokens first, then the request slots


def test_the_token_bucket_spreads_concurrent_reservations_at_its_rate():
    """Four senders asking at once get slots one batch's worth of time apart, in order."""
    clock = FakeClock()
    throttle = Throttle(None, 20_000, clock)
    starts = [throttle.reserve(2000) for _ in range(10)]  # nobody sleeps: the reservations queue up
    assert starts == pytest.approx([0.1 * n for n in range(1, 11)])
    assert 10 * 2000 / starts[-1] == pytest.approx(20_000)
    clock.sleep(starts[-1] + 5)  # idle for 5 s: the bucket fills to one second's worth, no more
    assert throttle.reserve(20_000) == 0
    assert throttle.reserve(2000) == pytest.approx(0.1)


def test_a_token_bucket_starts_empty_and_allows_debt():
    bucket = TokenBucket(100.0)
    assert bucket.take(50, 10.0) == pytest.approx(10.5)  # empty at first use: an average rate from the start
    assert bucket.take(300, 10.5) == pytest.approx(11.5)  # over capacity: waits for a full bucket, then goes
    assert bucket.take(100, 11.5) == pytest.approx(14.5)  # the debt of 200 is paid first
    with pytest.raises(ValueError, match="above 0"):
        TokenBucket(0)


# -- the adaptive window ------------------------------------------------------------------------------


def test_the_window_starts_small_then_hides_the_round_trip():
    window = FlowWindow(32)
    assert window.window == INITIAL_WINDOW  # nothing measured yet
    window.produced(0.01, 2000)  # 100 batches per second
    assert window.window == INITIAL_WINDOW
    window.accepted(0.2)  # 200 ms round trip: 100/s x 0.2 s x 1.5 = 30, plus one
    assert (window.window, window.peak) == (31, 31)
    window.accepted(0.2)
    assert FlowWindow(16, initial=4).window == 4
    loopback = FlowWindow(32)
    loopback.produced(0.01, 2000)
    loopback.accepted(0.002)  # 100/s x 2 ms x 1.5 = 0.3: one, plus one
    assert loopback.window == 2


def test_the_window_stays_under_the_cap_and_follows_the_rate():
    capped = FlowWindow(16)
    capped.produced(0.001, 2000)
    capped.accepted(0.2)
    assert capped.window == 16  # 300 wanted
    paced = FlowWindow(32, events_per_second=20_000)  # 10 batches of 2,000 per second at most
    paced.produced(0.001, 2000)
    paced.accepted(0.2)
    assert paced.window == 4  # 10/s x 0.2 s x 1.5 = 3, plus one
    instant = FlowWindow(8)
    instant.produced(0.0, 100)  # a fake clock: no time passes at all
    instant.accepted(0.0)
    assert instant.window == 1
    slow = FlowWindow(8)
    slow.produced(0.0, 100)
    slow.accepted(1.0)
    assert slow.window == 8  # batches without measurable cost: as many as allowed
    with pytest.raises(ValueError, match="at least 1"):
        FlowWindow(0)


def test_pushback_halves_the_window_once_per_episode_then_it_grows_by_one():
    window = FlowWindow(32)
    window.produced(0.01, 2000)
    window.accepted(0.2)
    assert window.window == 31
    sent_before = window.epoch
    assert window.congested(sent_before) and window.window == 15
    assert not window.congested(sent_before)  # in flight when it happened: same episode
    assert window.window == 15
    assert window.congested(window.epoch) and window.window == 7  # a request sent since: halves again
    for _ in range(6):
        window.accepted(0.2)
    assert window.window == 7
    window.accepted(0.2)  # a window's worth accepted: one more
    assert window.window == 8
    for _ in range(8):
        window.accepted(0.2)
    assert window.window == 9
    for _ in range(5):
        window.congested(window.epoch)
    assert window.window == 1  # never below one
    assert "up to 31 requests in flight (cap 32" in window.describe()


def test_the_window_grows_past_its_first_guess_to_hide_a_round_trip(monkeypatch):
    """Against a 300 ms Segment, a fast producer gets more than 8 requests in flight, never above the cap."""
    with SegmentStandIn(record="ids", latency_ms=300) as distant:
        conn_id = connect(monkeypatch, distant, "segment_distant")
        messages = list(identifies(6000))
        report = hook(conn_id, max_batch_events=100, max_in_flight=16).send(messages)
        assert report.delivered == 6000
        assert INITIAL_WINDOW == 8 < distant.stats()["max_concurrent_requests"] <= 16
        assert_received_equals_delivered(distant, report, ids(messages))


def test_batches_waiting_to_be_sent_are_capped_in_bytes(segment, conn_id):
    """Like the stop test below, with room for one waiting batch (bytes) instead of two (count)."""
    segment.set_faults(delay=1.5)
    pulled = 0

    def messages() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for message in identifies(20_000):
            pulled += 1
            yield message

    one_batch = len(b",".join(encode_event(m) for m in identifies(100))) + ENVELOPE_BYTES
    sender = hook(conn_id, max_batch_events=100, max_in_flight=2, max_queued_bytes=one_batch + 100)

    # 2 batches sending + 1 waiting (a second would pass the bytes cap), the 4th formed and waiting for
    # room: reading stops at message 401 (501 with the count cap alone)
    report = send_stopped_when(sender, messages(), lambda: pulled > 4 * 100, "a full pipeline")
    assert accounted(report) == pulled == 4 * 100 + 1
    for thread in sender_threads():
        thread.join(timeout=30)


# -- streaming, progress, input errors -----------------------------------------------------------------------


def test_input_is_consumed_lazily_with_bounded_batches_in_flight(segment, conn_id):
    segment.set_faults(delay=0.02)
    pulled = 0
    gaps: list[int] = []

    def messages() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for message in identifies(6000):
            pulled += 1
            yield message

    def progress(report: DeliveryReport) -> None:
        gaps.append(pulled - accounted(report))

    report = hook(conn_id, max_batch_events=100, max_in_flight=2).send(
        messages(), progress=progress, progress_interval=0.01
    )
    assert report.delivered == 6000 and gaps
    assert max(gaps) <= (2 * 2 + 1) * 100 + 1  # queued + sending + the batch being filled


def test_an_error_of_the_input_propagates_after_requests_in_flight(segment, conn_id, capsys):
    """The input breaks while one request is answered and one hangs: the error waits for both to end."""
    segment.set_faults(script=["ok", "hang"], hang_seconds=1)

    def messages() -> Iterator[dict[str, Any]]:
        yield from identifies(250)
        wait_until(lambda: segment.stats()["by_status"].keys() >= {"200", "hang"}, "both requests")
        raise ValueError("Looker stream broke")

    with pytest.raises(ValueError, match="Looker stream broke"):
        hook(conn_id, max_batch_events=100).send(messages())
    assert (segment.stats()["requests"], segment.stats()["events"]) == (2, 100)
    # both batches were accounted for before the error propagated; the broken one was not retried
    assert "so far: 100 delivered, 0 rejected, 100 failed in 2 batches, 2 requests" in capsys.readouterr().out


# -- stopping (the operator's on_kill) -----------------------------------------------------------------------


def test_stop_from_another_thread_ends_a_slow_send_promptly(segment, conn_id):
    """Stopped while its first requests are on the wire (each answered after 1.5 s): nothing more is sent."""
    segment.set_faults(delay=1.5)
    pulled = 0

    def messages() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for message in identifies(20_000):
            pulled += 1
            yield message

    sender = hook(conn_id, max_batch_events=100, max_in_flight=2)

    # 2 batches sending + 2 queued, the 5th formed and waiting for room: reading stops at message 501
    report = send_stopped_when(sender, messages(), lambda: pulled > 5 * 100, "a full pipeline")
    # the input was no longer read, and every message read is accounted for
    assert accounted(report) == pulled == 5 * 100 + 1
    assert (report.delivered, report.failed, report.failed_reasons) == (0, pulled, {"stopped": pulled})
    assert (
        set(report.failed_message_ids) == {f"msg-{n:07d}" for n in range(pulled)}
        and report.aborted == "stopped"
    )
    # at most the two senders' requests were made, and none after the stop
    assert report.requests <= 2 and report.retries == 0
    for thread in sender_threads():
        thread.join(timeout=30)  # they end with their abandoned request
    assert not sender_threads()
    assert segment.stats()["requests"] == report.requests
    assert set(segment.message_ids()) <= set(report.failed_message_ids)


def test_stop_cuts_a_wait_asked_by_segment_short(segment, conn_id):
    segment.set_faults(script=["429"], retry_after=600)
    sender = hook(conn_id, max_in_flight=1, max_retry_time=3600)
    report = send_stopped_when(sender, identifies(100), lambda: segment.stats()["requests"] == 1, "the 429")
    assert (report.requests, report.failed_reasons, report.aborted) == (1, {"stopped": 100}, "stopped")
    for thread in sender_threads():
        thread.join(timeout=30)
    assert not sender_threads()  # the sender did not wait the 600 s
    assert segment.stats()["requests"] == 1


def test_a_stopped_hook_sends_nothing(segment, conn_id):
    sender = hook(conn_id)
    sender.stop()
    pulled = []
    report = sender.send(pulled.append(m) or m for m in identifies(10))
    assert (pulled, accounted(report), report.requests, report.aborted) == ([], 0, 0, "stopped")
    assert segment.stats()["requests"] == 0


# -- connection and configuration ----------------------------------------------------------------------


def test_a_missing_write_key_is_a_clear_error_before_any_request(segment, monkeypatch):
    conn_id = connect(monkeypatch, segment, write_key=None)
    with pytest.raises(SegmentConfigurationError, match="no Segment write key"):
        hook(conn_id).send(identifies(10))
    assert segment.stats()["requests"] == 0
    ok, message = hook(conn_id).test_connection()
    assert not ok and "no Segment write key" in message


def test_official_segment_provider_connections_work(segment, monkeypatch):
    conn_id = connect(
        monkeypatch, segment, write_key=None, conn_type="segment", extra={"write_key": SECRET_KEY}
    )
    report = hook(conn_id).send(identifies(10))
    assert report.delivered == 10 and segment.records()[0].auth == "basic"


def test_extras_are_read_and_arguments_override_them(segment, monkeypatch):
    extra = {
        "timeout": "12",
        "gzip": "true",
        "max_in_flight": 2,
        "requests_per_second": "7.5",
        "events_per_second": "1000",
    }
    conn_id = connect(monkeypatch, segment, extra=extra)
    settings = SegmentHook(conn_id).validate_config()
    assert (settings.timeout, settings.gzip, settings.max_in_flight) == (12.0, True, 2)
    assert (settings.requests_per_second, settings.events_per_second) == (7.5, 1000.0)
    settings = SegmentHook(
        conn_id, timeout=3, gzip=False, max_in_flight=8, requests_per_second=0, events_per_second=20_000
    ).config
    assert (settings.timeout, settings.gzip, settings.max_in_flight) == (3.0, False, 8)
    assert (settings.requests_per_second, settings.events_per_second) == (None, 20_000.0)
    assert SegmentHook(conn_id, events_per_second="0").config.events_per_second is None
    assert settings.base_url == segment.base_url
    defaults = SegmentHook(connect(monkeypatch, segment, "segment_plain")).config
    assert defaults.max_in_flight == 32
    assert (defaults.requests_per_second, defaults.events_per_second) == (None, None)


@pytest.mark.parametrize(
    "extra",
    [
        {"timeout": "soon"},
        {"gzip": "perhaps"},
        {"max_in_flight": 0},
        {"max_in_flight": 100},
        {"max_in_flight": 2.5},
        {"timeout": -1},
    ],
)
def test_unusable_settings_are_configuration_errors(segment, monkeypatch, extra):
    conn_id = connect(monkeypatch, segment, extra=extra)
    (name,) = extra
    where = r"\(extra of connection 'segment_test'\)"
    with pytest.raises(InvalidParameterError, match=rf"^{name} {where} must be"):
        SegmentHook(conn_id).validate_config()


@pytest.mark.parametrize(
    ("host", "schema", "port", "expected"),
    [
        (None, None, None, DEFAULT_HOST),
        ("api.segment.io", None, None, "https://api.segment.io"),
        ("https://events.eu1.segmentapis.com/v1/", None, None, "https://events.eu1.segmentapis.com"),
        ("127.0.0.1", "http", 8080, "http://127.0.0.1:8080"),
        ("http://127.0.0.1:9000", None, 8080, "http://127.0.0.1:9000"),
        ("https://api.segment.io:443", None, None, "https://api.segment.io"),
        ("api.segment.io:443", None, None, "https://api.segment.io"),
        ("api.segment.io", "https", 443, "https://api.segment.io"),
        ("HTTPS://API.Segment.IO:443/V1/", None, None, "https://api.segment.io"),
        ("https://api.segment.io/", None, None, "https://api.segment.io"),
        ("https://api.segment.io:80", None, None, "https://api.segment.io:80"),
        ("http://127.0.0.1:80/v1", None, None, "http://127.0.0.1"),
        ("127.0.0.1", "HTTP", 80, "http://127.0.0.1"),
        ("http://[::1]:80", None, None, "http://[::1]"),
        ("https://proxy.example.com/Segment/v1", None, None, "https://proxy.example.com/Segment"),
    ],
)
def test_base_url_from_the_connection(monkeypatch, host, schema, port, expected):
    definition = {"conn_type": "segment_tracking", "password": SECRET_KEY, "host": host, "schema": schema}
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_URL", json.dumps({**definition, "port": port}))
    assert SegmentHook("segment_url").validate_config().base_url == expected


@pytest.mark.parametrize("host", ["https://api.segment.io:https", "https://api.segment.io:99999", "ftp://x"])
def test_a_malformed_host_is_a_configuration_error(monkeypatch, host):
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_BAD", json.dumps({"host": host, "password": SECRET_KEY}))
    with pytest.raises(ConnectionConfigError, match="The Segment connection's Host must be an http"):
        SegmentHook("segment_bad").validate_config()


@pytest.mark.parametrize(
    "form",
    [
        {"host": "https://api.segment.io:443"},
        {"host": "api.segment.io", "port": 443},
        {"host": "HTTPS://API.Segment.io/v1/"},
        {"host": "api.segment.io", "schema": "https"},
        {},
    ],
)
def test_the_base_url_and_the_sync_key_do_not_depend_on_how_the_host_is_written(monkeypatch, form):
    """The base URL is part of the changed-only sync's state key: an explicit :443 must not orphan it."""
    definition = {"conn_type": "segment_tracking", "password": SECRET_KEY, **form}
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_FORM", json.dumps(definition))
    settings = SegmentHook("segment_form").validate_config()
    assert (settings.base_url, settings.batch_url) == (DEFAULT_HOST, f"{DEFAULT_HOST}/v1/batch")
    assert sync_key("42", settings.base_url, settings.write_key) == sync_key("42", DEFAULT_HOST, SECRET_KEY)


def test_test_connection_says_what_it_checked(segment, conn_id, monkeypatch):
    ok, message = SegmentHook(conn_id).test_connection()
    assert ok and "Not checked: the write key" in message
    (record,) = segment.records()
    assert record.events == 0 and record.auth == "basic"
    wrong = connect(monkeypatch, segment, "segment_wrong", write_key="not-the-key")
    ok, message = SegmentHook(wrong).test_connection()
    assert ok and "Segment accepts unknown write keys with HTTP 200" in message  # as Segment: 200
    segment.unknown_write_key = "401"
    ok, message = SegmentHook(wrong).test_connection()
    assert not ok and "HTTP 401" in message
    closed = {"conn_type": "segment_tracking", "host": "http://127.0.0.1:9", "password": "k" * 20}
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_CLOSED", json.dumps(closed))
    ok, message = SegmentHook("segment_closed").test_connection()
    assert not ok and message.startswith("Could not reach http://127.0.0.1:9/v1/batch: could not connect: ")
    assert "Connection refused" in message


def test_the_write_key_never_appears_in_logs_errors_or_urls(segment, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    conn_id = connect(monkeypatch, segment, write_key=SECRET_KEY)
    segment.set_faults(
        script=["reset", "500", "429", "partial"], retry_after=0.1, retry_after_style="x-ratelimit-reset"
    )
    report = hook(conn_id, max_batch_events=50).send(identifies(500))
    assert report.delivered == 500
    texts += [json.dumps(report.to_dict()), report.summary(), repr(SegmentHook(conn_id).validate_config())]
    texts.append(SegmentHook(conn_id).test_connection()[1])
    segment.set_faults(every_500=1)
    failed = hook(conn_id, max_attempts=2).send(identifies(100))
    texts += [json.dumps(failed.to_dict()), failed.summary()]
    wrong_key = SECRET_KEY[::-1]
    monkeypatch.setenv(
        "AIRFLOW_CONN_SEGMENT_USERINFO",
        json.dumps(
            {"conn_type": "segment_tracking", "host": f"http://{wrong_key}@127.0.0.1:1", "password": "x" * 9}
        ),
    )
    with pytest.raises(ConnectionConfigError) as config_error:
        SegmentHook("segment_userinfo").validate_config()
    texts.append(str(config_error.value))
    captured = capsys.readouterr()
    texts += [caplog.text, captured.out, captured.err, *(r.path for r in segment.records())]
    logged = caplog.text + captured.out + captured.err
    assert "Retrying" in logged and "Segment batch of 100 events failed" in logged  # the logs were captured
    for text in texts:
        assert SECRET_KEY not in text and wrong_key not in text


# -- write key hygiene, TLS to a plain-HTTP port, setting ranges ------------------------------------------

HALF = len(SECRET_KEY) // 2


def spliced(char: str) -> str:
    """The secret key with ``char`` in its middle (at character ``HALF + 1``)."""
    return SECRET_KEY[:HALF] + char + SECRET_KEY[HALF:]


@pytest.mark.parametrize(
    ("conn_type", "password", "extra"),
    [
        ("segment_tracking", f"{SECRET_KEY}\n", {}),
        ("segment_tracking", f" \t{SECRET_KEY}  \r\n", {}),
        ("segment", None, {"write_key": f"{SECRET_KEY}\n"}),
        ("segment", " \n", {"write_key": f"  {SECRET_KEY}\n"}),  # a blank Password does not hide the extra
    ],
)
def test_the_write_key_is_used_trimmed_from_every_source(segment, monkeypatch, conn_type, password, extra):
    conn_id = connect(monkeypatch, segment, write_key=password, conn_type=conn_type, extra=extra)
    assert SegmentHook(conn_id).validate_config().write_key == SECRET_KEY
    report = hook(conn_id).send(identifies(10))
    assert report.delivered == 10 and [r.auth for r in segment.records()] == ["basic"]  # the exact key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        # not Latin-1: requests could not even encode it (the old "internal error: UnicodeEncodeError")
        (spliced("€"), f"a character outside ASCII (character {HALF + 1})"),
        (spliced("é"), "a character outside ASCII"),  # Latin-1, but servers differ on decoding it (UTF-8?)
        ("\ufeff" + SECRET_KEY, "a character outside ASCII (character 1)"),  # a byte-order mark
        (spliced(":"), f"a ':' (character {HALF + 1}; Basic auth ends the user name at the first ':')"),
        (spliced("\n"), "a control character"),
        (SECRET_KEY + "\x00", f"a control character (character {len(SECRET_KEY) + 1})"),  # strip() keeps NUL
    ],
)
@pytest.mark.parametrize("source", ["password", "extra"])
def test_a_write_key_unfit_for_a_basic_header_is_refused_before_any_request(
    segment, monkeypatch, caplog, key, problem, source
):
    caplog.set_level(logging.DEBUG)
    if source == "password":
        conn_id = connect(monkeypatch, segment, write_key=key)
    else:
        conn_id = connect(monkeypatch, segment, write_key=None, conn_type="segment", extra={"write_key": key})
    with pytest.raises(SegmentConfigurationError) as raised:
        SegmentHook(conn_id).validate_config()
    message = str(raised.value)
    assert message.startswith(f"The Segment write key of connection {conn_id!r} contains {problem}")
    assert "HTTP Basic" in message and "exactly as Segment shows it" in message
    with pytest.raises(SegmentConfigurationError):
        hook(conn_id).send(identifies(10))
    ok, tested = SegmentHook(conn_id).test_connection()
    assert not ok and tested == message
    assert segment.stats()["requests"] == 0
    for text in (message, caplog.text):
        assert SECRET_KEY[:HALF] not in text and SECRET_KEY[HALF:] not in text


def test_https_to_a_plain_http_port_fails_at_once_with_a_hint(segment, monkeypatch):
    conn_id = connect(monkeypatch, segment, host=segment.base_url.replace("http://", "https://"))
    messages = list(identifies(1000))
    report = hook(conn_id, max_batch_events=100, max_in_flight=1, max_attempts=8).send(messages)
    reason = report.aborted or ""
    assert (
        reason.startswith("TLS error: the server answered in plain HTTP") and "wrong scheme or port" in reason
    )
    assert (report.delivered, report.failed, report.requests, report.retries) == (0, 1000, 1, 0)
    assert (segment.stats()["tls_handshakes"], segment.stats()["requests"]) == (1, 0)
    assert report.failed_reasons == {reason: 100, f"not sent: {reason}": 900}
    assert_received_equals_delivered(segment, report, ids(messages))
    assert "wrong scheme or port" in report.summary()
    ok, message = SegmentHook(conn_id).test_connection()
    assert not ok and message == f"Could not reach https://127.0.0.1:{segment.port}/v1/batch: {reason}."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "plain HTTP"),
        ("[SSL] record layer failure (_ssl.c:1000)", "plain HTTP"),  # OpenSSL 3.2 and later
        ("[SSL: UNKNOWN_PROTOCOL] unknown protocol (_ssl.c:600)", "plain HTTP"),
        ("[SSL: PACKET_LENGTH_TOO_LONG] packet length too long (_ssl.c:1000)", "plain HTTP"),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate",
            "certificate",
        ),
    ],
)
def test_tls_errors_are_described_with_a_hint(text, expected):
    from urllib3.exceptions import MaxRetryError
    from urllib3.exceptions import SSLError as Urllib3SSLError

    error = requests.exceptions.SSLError(
        MaxRetryError(None, "/v1/batch", Urllib3SSLError(ssl.SSLError(1, text)))
    )
    kind, description = describe_transport_error(error)
    assert kind == ("plain_http" if expected == "plain HTTP" else "tls")
    assert description.startswith("TLS error") and expected in description and "scheme or port" in description


RATE_RANGE = "must be 0 (no limit) or a number at least 0.1 (one request every 10 s)"
PACE_RANGE = "must be 0 (no pacing) or a number at least 1"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("requests_per_second", 0.001, f"{RATE_RANGE}, got 0.001"),
        ("requests_per_second", "0.05", f"{RATE_RANGE}, got '0.05'"),
        ("requests_per_second", -1, f"{RATE_RANGE}, got -1"),
        ("requests_per_second", "nan", "must be a number, got 'nan'"),
        ("requests_per_second", "inf", "must be a number, got 'inf'"),
        ("events_per_second", 0.5, f"{PACE_RANGE}, got 0.5"),
        ("events_per_second", -20, f"{PACE_RANGE}, got -20"),
        ("events_per_second", "nan", "must be a number, got 'nan'"),
        ("max_in_flight", 0, "must be a whole number at least 1 and at most 64, got 0"),
        ("max_in_flight", 65, "must be a whole number at least 1 and at most 64, got 65"),
        ("max_in_flight", 2.5, "must be a whole number, got 2.5"),
        ("timeout", 0, "must be a number above 0, got 0"),
        ("timeout", "nan", "must be a number, got 'nan'"),
        ("timeout", "inf", "must be a number, got 'inf'"),
        ("gzip", "perhaps", "must be true or false, got 'perhaps'"),
    ],
)
@pytest.mark.parametrize("source", ["extra", "argument"])
def test_a_setting_out_of_range_is_refused_naming_it_its_value_and_the_range(
    segment, monkeypatch, name, value, expected, source
):
    conn_id = connect(monkeypatch, segment, extra={name: value} if source == "extra" else {})
    with pytest.raises(InvalidParameterError) as raised:
        SegmentHook(conn_id, **({name: value} if source == "argument" else {})).validate_config()
    where = "operator or hook argument" if source == "argument" else f"extra of connection {conn_id!r}"
    assert str(raised.value) == f"{name} ({where}) {expected}"
    assert segment.stats()["requests"] == 0


def test_the_limits_of_the_settings_are_accepted(segment, conn_id):
    settings = SegmentHook(conn_id, requests_per_second=0.1, max_in_flight=64, timeout=0.5).validate_config()
    assert (settings.requests_per_second, settings.max_in_flight, settings.timeout) == (0.1, 64, 0.5)
    assert (
        SegmentHook(conn_id, max_in_flight=1, requests_per_second="0").validate_config().requests_per_second
        is None
    )


def test_report_is_json_serialisable_and_bounded():
    report = DeliveryReport(max_listed_events=3)
    report.add("delivered", ["a", "b"])
    report.add("failed", [f"f{i}" for i in range(5)], "HTTP 500 (retry attempts exhausted)")
    report.add("rejected", ["big"], Rejection.OVERSIZE.value)
    data = orjson.loads(orjson.dumps(report.to_dict()))
    assert data == {
        "delivered": 2,
        "rejected": 1,
        "failed": 5,
        "batches": 0,
        "requests": 0,
        "retries": 0,
        "bytes": 0,
        "rejected_reasons": {Rejection.OVERSIZE.value: 1},
        "failed_reasons": {"HTTP 500 (retry attempts exhausted)": 5},
        "rejected_message_ids": ["big"],
        "failed_message_ids": ["f0", "f1", "f2"],
    }
    assert (report.failed_events_omitted, report.rejected_events_omitted, accounted(report)) == (2, 0, 8)
    report.add("failed", ["late"], "x")
    assert (report.failed, report.failed_message_ids, report.failed_events_omitted) == (
        6,
        ["f0", "f1", "f2"],
        3,
    )


def test_retry_after_header_parsing():
    now = 1_700_000_000.0
    assert asked_wait({"Retry-After": "2"}, now) == 2
    assert asked_wait({"Retry-After": "Tue, 14 Nov 2023 22:13:25 GMT"}, now) == 5  # an HTTP date
    assert asked_wait({"X-RateLimit-Reset": str(int((now + 5) * 1000))}, now) == 5  # epoch milliseconds
    assert asked_wait({"X-RateLimit-Reset": str(int(now + 5))}, now) == 5  # epoch seconds
    assert asked_wait({"X-RateLimit-Reset": "Thu, 01 Jan 1970 00:00:00 GMT"}, now) == 0  # in the past
    assert asked_wait({"Retry-After": "3", "X-RateLimit-Reset": "9"}, now) == 3  # Retry-After wins
    assert asked_wait({"Retry-After": "soon", "X-RateLimit-Reset": "9"}, now) == 9  # unreadable: the other
    assert asked_wait({"Retry-After": "garbage"}, now) is None
    assert asked_wait({}, now) is None


def test_a_progress_snapshot_leaves_the_undelivered_listener_behind():
    """The listener of a changed-only run holds its SQLite state: progress snapshots must not copy it."""
    import copy
    import sqlite3

    from airflow_provider_looker_segment.delivery_report import FAILED, DeliveryReport

    connection = sqlite3.connect(":memory:")
    seen: list[str] = []

    class Run:
        db = connection

        def record(self, message_ids):
            seen.extend(message_ids)

    report = DeliveryReport(listener=Run().record)
    report.add(FAILED, ["m1"], "timeout")
    snapshot = copy.deepcopy(report)
    assert snapshot.listener is None and snapshot.failed_message_ids == ["m1"] and seen == ["m1"]
