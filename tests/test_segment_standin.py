"""The Segment Tracking API stand-in: Segment's limits and auth, fault injection, records, control API."""

from __future__ import annotations

import email.utils
import gzip
import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator

import orjson
import pytest
import requests
from standins.segment_standin import (
    DEFAULT_WRITE_KEY,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    MAX_REQUEST_BYTES,
    Faults,
    SegmentStandIn,
    SegmentStandInClient,
    SegmentStandInProcess,
    segment_timestamp,
)

AUTH = (DEFAULT_WRITE_KEY, "")
SENT_AT = "2024-01-31T12:00:00.000Z"


@pytest.fixture(scope="module")
def server() -> Iterator[SegmentStandIn]:
    with SegmentStandIn(record="full") as standin:
        yield standin


@pytest.fixture
def segment(server: SegmentStandIn) -> Iterator[SegmentStandIn]:
    server.reset()
    yield server
    server.reset()


def event(message_id: str, size: int = 0) -> dict:
    """An identify call, padded so that its compact JSON is ``size`` bytes when ``size`` is given."""
    message = {"type": "identify", "userId": "u", "messageId": message_id, "traits": {"p": ""}}
    if size:
        message["traits"]["p"] = "x" * (size - len(orjson.dumps(message)))
        assert len(orjson.dumps(message)) == size
    return message


def batch_body(events: list[dict], **extra: object) -> bytes:
    return orjson.dumps({"batch": events, "sentAt": SENT_AT, **extra})


def body_of_size(total: int) -> bytes:
    """A valid batch body of exactly ``total`` bytes (events under 32 KB)."""
    events = [event(f"m{i:02d}", 25_000) for i in range(total // 25_500)]
    filler = event("last")
    missing = total - len(batch_body([*events, filler]))
    filler = event("last", len(orjson.dumps(filler)) + missing)
    body = batch_body([*events, filler])
    assert len(body) == total
    return body


def post(
    segment: SegmentStandIn, body: bytes, *, path: str = "/v1/batch", **kwargs: object
) -> requests.Response:
    kwargs.setdefault("auth", AUTH)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    return requests.post(f"{segment.base_url}{path}", data=body, headers=headers, timeout=10, **kwargs)


def test_accepts_a_batch_and_records_what_arrived(segment: SegmentStandIn):
    events = [event("a"), event("b")]
    before = time.time()
    response = post(segment, batch_body(events))
    assert response.status_code == 200 and response.json() == {"success": True}
    (record,) = segment.records()
    assert record.action == "200" and record.accepted and record.auth == "basic"
    assert record.events == 2 and record.message_ids == ("a", "b") and record.first_message_id == "a"
    assert before <= record.arrived <= record.answered <= time.time()
    assert segment.events() == events and segment.message_ids() == ["a", "b"]
    stats = segment.stats()
    assert stats["requests"] == stats["accepted_requests"] == 1
    assert (stats["events"], stats["unique_message_ids"], stats["duplicate_message_ids"]) == (2, 2, 0)
    assert stats["by_status"] == {"200": 1}


@pytest.mark.parametrize(
    ("auth", "body_key", "status", "recorded", "received"),
    [
        (AUTH, None, 200, "basic", 1),
        (None, DEFAULT_WRITE_KEY, 200, "body", 1),
        (("wrong-key", ""), None, 200, "unknown", 0),  # Segment: 200, and the events are dropped
        (None, "wrong-key", 200, "unknown", 0),
        (None, None, 401, "none", 0),
    ],
)
def test_write_key_by_basic_auth_or_in_the_body(segment, auth, body_key, status, recorded, received):
    extra = {"writeKey": body_key} if body_key else {}
    response = post(segment, batch_body([event("a")], **extra), auth=auth)
    assert response.status_code == status
    (record,) = segment.records()
    assert record.auth == recorded and record.accepted == bool(received)
    stats = segment.stats()
    assert (stats["events"], stats["dropped_events"]) == (received, 1 if recorded == "unknown" else 0)
    assert segment.message_ids() == ["a"] * received
    assert "wrong-key" not in response.text


@pytest.mark.parametrize(("auth", "body_key"), [(("wrong-key", ""), None), (None, "wrong-key")])
def test_an_unknown_write_key_can_get_401_instead(auth, body_key):
    extra = {"writeKey": body_key} if body_key else {}
    with SegmentStandIn(unknown_write_key="401") as strict:
        response = post(strict, batch_body([event("a")], **extra), auth=auth)
        assert response.status_code == 401 and "wrong-key" not in response.text
        (record,) = strict.records()
        assert record.auth == "wrong" and strict.stats()["dropped_events"] == 0
    with pytest.raises(ValueError, match="unknown_write_key"):
        SegmentStandIn(unknown_write_key="403")


def test_sent_at_is_recorded_and_segment_corrects_timestamps_with_it(segment: SegmentStandIn):
    """Segment's timestamp = receivedAt - (sentAt - timestamp): a sentAt older than the request shifts it."""
    segment.clock = lambda: 1_700_000_100.0  # 2023-11-14T22:15:00Z: receivedAt
    late = batch_body([event("a")]).replace(SENT_AT.encode(), b"2023-11-14T22:14:30.000Z")
    assert post(segment, late).status_code == 200
    (record,) = segment.records()
    assert (record.arrived, record.sent_at) == (1_700_000_100.0, "2023-11-14T22:14:30.000Z")
    shifted = segment_timestamp("2023-11-14T22:00:00.000Z", record.sent_at, record.arrived)
    assert shifted.isoformat() == "2023-11-14T22:00:30+00:00"  # 30 s later than the event happened
    same = segment_timestamp("2023-11-14T22:00:00.000Z", "2023-11-14T22:15:00.000Z", record.arrived)
    assert same.isoformat() == "2023-11-14T22:00:00+00:00"


def test_gzip_bodies(segment: SegmentStandIn):
    raw = batch_body([event("a", 2000), event("b", 2000)])
    response = post(segment, gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    (record,) = segment.records()
    assert record.gzip and record.body_bytes == len(raw) > record.wire_bytes
    assert segment.message_ids() == ["a", "b"]
    bad = post(segment, b"not gzip", headers={"Content-Encoding": "gzip"})
    assert bad.status_code == 400 and "gzip" in bad.json()["message"]


def test_a_request_over_500_kb_gets_400(segment: SegmentStandIn):
    assert post(segment, body_of_size(MAX_REQUEST_BYTES)).status_code == 200
    response = post(segment, body_of_size(MAX_REQUEST_BYTES + 1))
    assert response.status_code == 400 and "over" in response.json()["message"]
    stats = segment.stats()
    assert stats["accepted_requests"] == 1 and stats["rejected_requests"] == 1
    assert segment.records()[1].body_bytes == MAX_REQUEST_BYTES + 1


def test_an_event_over_32_kb_gets_400(segment: SegmentStandIn):
    assert post(segment, batch_body([event("ok", MAX_EVENT_BYTES), event("b")])).status_code == 200
    response = post(segment, batch_body([event("big", MAX_EVENT_BYTES + 1), event("c")]))
    assert response.status_code == 400 and str(MAX_EVENT_BYTES + 1) in response.json()["message"]
    assert segment.message_ids() == ["ok", "b"]
    assert segment.stats()["rejected_events"] == 2


def test_more_than_2500_events_are_answered_200_but_rejected(segment: SegmentStandIn):
    events = [event(f"m{i}") for i in range(MAX_BATCH_EVENTS + 1)]
    assert post(segment, batch_body(events)).status_code == 200
    stats = segment.stats()
    assert stats["events"] == 0 and stats["rejected_events"] == MAX_BATCH_EVENTS + 1
    assert post(segment, batch_body(events[:MAX_BATCH_EVENTS])).status_code == 200
    assert segment.stats()["events"] == MAX_BATCH_EVENTS


@pytest.mark.parametrize("body", [b"{not json", b'{"batch": {}}', b"[]"])
def test_malformed_bodies_get_400(segment: SegmentStandIn, body: bytes):
    assert post(segment, body).status_code == 400
    assert segment.stats()["events"] == 0


def test_single_identify_call(segment: SegmentStandIn):
    body = orjson.dumps(
        {"userId": "u1", "traits": {"name": "Ty"}, "messageId": "x", "writeKey": DEFAULT_WRITE_KEY}
    )
    response = post(segment, body, path="/v1/identify", auth=None)
    assert response.status_code == 200
    assert segment.events() == [
        {"userId": "u1", "traits": {"name": "Ty"}, "messageId": "x", "type": "identify"}
    ]


def test_keep_alive_connections_are_reused(segment: SegmentStandIn):
    connection = http.client.HTTPConnection("127.0.0.1", segment.port, timeout=5)
    headers = {"Authorization": requests.auth._basic_auth_str(*AUTH), "Content-Type": "application/json"}
    sockets = []
    for message_id in ("a", "b", "c"):
        connection.request("POST", "/v1/batch", body=batch_body([event(message_id)]), headers=headers)
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b'{"success":true}'
        sockets.append(connection.sock)
    connection.close()
    assert sockets[0] is sockets[1] is sockets[2] and sockets[0] is not None
    assert segment.message_ids() == ["a", "b", "c"]


@pytest.mark.parametrize("style", ["seconds", "http-date", "x-ratelimit-reset"])
def test_429_with_retry_after_or_rate_limit_reset(segment: SegmentStandIn, style: str):
    segment.set_faults(every_429=1, retry_after=2.5, retry_after_style=style)
    response = post(segment, batch_body([event("a")]))
    assert response.status_code == 429
    (record,) = segment.records()
    assert record.action == "429" and not record.accepted and record.first_message_id == "a"
    if style == "seconds":  # as Segment documents them: both headers, "the number of seconds" to wait
        assert (response.headers["Retry-After"], response.headers["X-RateLimit-Reset"]) == ("3", "2.5")
    elif style == "http-date":
        moment = email.utils.parsedate_to_datetime(response.headers["Retry-After"]).timestamp()
        assert record.answered + 2.5 <= moment < record.answered + 3.5
    else:
        assert "Retry-After" not in response.headers
        assert response.headers["X-RateLimit-Reset"] == "2.5"  # seconds, not an epoch time
    assert segment.stats()["events"] == 0


def test_every_nth_request_fails(segment: SegmentStandIn):
    segment.set_faults(every_500=2, server_error_status=503)
    statuses = [post(segment, batch_body([event(f"m{i}")])).status_code for i in range(4)]
    assert statuses == [200, 503, 200, 503]
    assert segment.stats()["by_status"] == {"200": 2, "503": 2}
    assert segment.message_ids() == ["m0", "m2"]


def raw_exchange(segment: SegmentStandIn, body: bytes) -> bytes:
    """Send one request on a raw socket and read until the server closes or resets the connection."""
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: {requests.auth._basic_auth_str(*AUTH)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", segment.port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_reset_is_a_real_tcp_reset(segment: SegmentStandIn):
    segment.set_faults(every_reset=1)
    with pytest.raises(ConnectionResetError):  # a FIN would end the read with b"" instead
        raw_exchange(segment, batch_body([event("a")]))
    (record,) = segment.records()
    assert record.action == "reset" and record.status is None and not record.accepted


def test_partial_answer_sends_headers_then_resets(segment: SegmentStandIn):
    segment.set_faults(script=["partial"])
    with pytest.raises(ConnectionResetError):
        raw_exchange(segment, batch_body([event("a")]))
    assert segment.records()[0].action == "partial"


def test_a_tls_handshake_gets_a_plain_http_answer_and_is_counted(segment: SegmentStandIn):
    """A client using https:// on the stand-in's plain-HTTP port fails its handshake (as on any HTTP port)."""
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(segment.batch_url.replace("http://", "https://"), batch_body([event("a")]), timeout=5)
    stats = segment.stats()
    assert (stats["tls_handshakes"], stats["requests"], segment.records()) == (1, 0, [])
    assert SegmentStandInClient(segment.base_url).stats()["tls_handshakes"] == 1  # over the control API too
    segment.reset()
    assert segment.stats()["tls_handshakes"] == 0


def test_accept_then_reset_records_the_events(segment: SegmentStandIn):
    segment.set_faults(script=["accept-reset"])
    with pytest.raises(requests.ConnectionError):
        post(segment, batch_body([event("a")]))
    assert post(segment, batch_body([event("a")])).status_code == 200
    stats = segment.stats()
    assert (stats["events"], stats["unique_message_ids"], stats["duplicate_message_ids"]) == (2, 1, 1)
    assert [r.action for r in segment.records()] == ["accept-reset", "200"]


def test_slow_answers(segment: SegmentStandIn):
    segment.set_faults(delay=0.2)
    assert post(segment, batch_body([event("a")])).status_code == 200
    (record,) = segment.records()
    assert record.answered - record.arrived >= 0.2


def test_a_round_trip_holds_every_answer_at_least_that_long():
    with SegmentStandIn(latency_ms=200, faults=Faults(script=["429"], retry_after=0)) as standin:
        started = time.monotonic()
        refused = post(standin, batch_body([event("a")]))
        between = time.monotonic()
        accepted = post(standin, batch_body([event("a")]))
        ended = time.monotonic()
        assert (refused.status_code, accepted.status_code) == (429, 200)  # errors come as late as successes
        assert between - started >= 0.2 and ended - between >= 0.2  # as the client saw it
        for record in standin.records():  # and by the stand-in's own clock
            assert record.answered is not None and record.answered - record.arrived >= 0.2
        assert standin.stats()["latency_ms"] == 200


def test_held_answers_overlap_instead_of_queueing():
    """Eight requests on eight connections at once: all arrive before the first answer leaves."""
    count = 8
    start = threading.Barrier(count)
    statuses: list[int] = []

    def send(number: int) -> None:
        start.wait(timeout=30)
        statuses.append(post(standin, batch_body([event(f"m{number}")])).status_code)

    with SegmentStandIn(latency_ms=1000, record="ids") as standin:
        threads = [threading.Thread(target=send, args=(number,)) for number in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        records = standin.records()
        assert statuses == [200] * count and len(records) == count
        assert max(r.arrived for r in records) < min(r.answered for r in records)  # type: ignore[type-var]
        assert standin.stats()["max_concurrent_requests"] == count
        assert sorted(standin.message_ids()) == [f"m{number}" for number in range(count)]


def test_accepted_connections_have_nagle_off(segment: SegmentStandIn):
    with requests.Session() as session:
        response = session.post(segment.batch_url, data=batch_body([event("a")]), auth=AUTH, timeout=10)
        assert response.status_code == 200
        sockets = segment.accepted_sockets()  # the session's kept-alive connection among them
        assert sockets
        assert all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in sockets)


def test_the_round_trip_is_checked():
    with pytest.raises(ValueError, match="latency_ms must be"):
        SegmentStandIn(latency_ms=-1)
    with pytest.raises(ValueError, match="latency_ms must be"):
        SegmentStandIn(latency_ms=float("inf"))


def test_never_answering(segment: SegmentStandIn):
    segment.set_faults(hang=True, hang_seconds=2)
    with pytest.raises(requests.ReadTimeout):
        requests.post(segment.batch_url, data=batch_body([event("a")]), auth=AUTH, timeout=0.3)
    (record,) = segment.records()
    assert record.action == "hang" and record.answered is None
    assert segment.stats()["events"] == 0


def test_script_comes_first_then_normal_service(segment: SegmentStandIn):
    segment.set_faults(script=["429", "500", "delay:0.05", "400"])
    statuses = [post(segment, batch_body([event(f"m{i}")])).status_code for i in range(5)]
    assert statuses == [429, 500, 200, 400, 200]
    assert segment.message_ids() == ["m2", "m4"]


def test_fixed_answer_for_requests_with_given_message_ids(segment: SegmentStandIn):
    segment.set_faults(status_for_ids={"poison": 500})
    assert post(segment, batch_body([event("a"), event("poison")])).status_code == 500
    assert post(segment, batch_body([event("b")])).status_code == 200
    assert segment.message_ids() == ["b"]


def test_faults_are_validated():
    with pytest.raises(ValueError, match="unknown fault settings"):
        Faults.from_dict({"every_42": 1})
    with pytest.raises(ValueError, match="script action"):
        Faults(script=["explode"])
    with pytest.raises(ValueError):
        Faults(retry_after_style="eventually")


def test_count_mode_keeps_counters_only():
    with SegmentStandIn(record="count") as standin:
        body = batch_body([event("a"), event("a")])
        assert post(standin, body).status_code == 200
        stats = standin.stats()
        assert stats["events"] == 2 and stats["unique_message_ids"] is None
        assert stats["duplicate_message_ids"] is None
        (record,) = standin.records()
        assert record.events == 2 and record.first_message_id == "a" and record.message_ids is None
        assert standin.events() == [] and standin.message_ids() == []


def test_control_endpoints_over_http(segment: SegmentStandIn):
    client = SegmentStandInClient(segment.base_url)
    client.set_faults(every_429=2, retry_after=0.1, retry_after_style="x-ratelimit-reset")
    assert client.faults.every_429 == 2
    for message_id in ("a", "b", "c"):
        post(segment, batch_body([event(message_id)]))
    assert client.stats()["by_status"] == {"200": 2, "429": 1}
    assert client.message_ids() == ["a", "c"]
    assert [e["messageId"] for e in client.events()] == ["a", "c"]
    assert client.events(offset=1, limit=1)[0]["messageId"] == "c"
    records = client.records()
    assert [r.action for r in records] == ["200", "429", "200"]
    assert records[1].first_message_id == "b"
    assert client.records(ids=False)[0].message_ids is None
    with pytest.raises(urllib.error.HTTPError) as raised:
        client._call("POST", "faults", {"nonsense": 1})
    assert raised.value.code == 400
    client.reset()
    assert client.stats()["requests"] == 0 and client.faults == Faults()
    assert client.wait_for_events(0, timeout=1)


def test_runs_by_hand_and_is_read_from_another_process(tmp_path):
    """``python -m ...segment_standin --port 0`` prints its URL and key, serves, and stops on SIGTERM."""
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "standins.segment_standin", "--port", "0"),
            *("--record", "ids", "--write-key", "cli-key", "--faults", '{"every_500": 2}'),
            *("--unknown-write-key", "401"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip().removeprefix("SEGMENT_STANDIN_URL=")
        assert process.stdout.readline().strip() == "SEGMENT_STANDIN_WRITE_KEY=cli-key"
        assert url.startswith("http://127.0.0.1:")
        statuses = [
            requests.post(
                f"{url}/v1/batch", data=batch_body([event(m)]), auth=("cli-key", ""), timeout=5
            ).status_code
            for m in ("a", "b", "c", "d")
        ]
        assert statuses == [200, 500, 200, 500]
        unknown = requests.post(f"{url}/v1/batch", data=batch_body([event("e")]), auth=("x", ""), timeout=5)
        assert unknown.status_code == 401  # --unknown-write-key 401 (Segment's own answer is 200)
        client = SegmentStandInClient(url)
        assert client.message_ids() == ["a", "c"]
        assert client.stats()["record"] == "ids"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_stop_releases_hanging_requests_and_open_connections():
    standin = SegmentStandIn(faults=Faults(hang=True))
    standin.start()
    session = requests.Session()
    with pytest.raises(requests.ReadTimeout):
        session.post(standin.batch_url, data=batch_body([event("a")]), auth=AUTH, timeout=0.2)
    standin.stop()  # returns although a request hangs: the hanging handler is released
    with pytest.raises(requests.ConnectionError):
        requests.post(standin.batch_url, data=b"{}", timeout=1)


def test_standin_in_a_child_process():
    faults = Faults(script=["429"], retry_after=0)
    with SegmentStandInProcess(record="ids", faults=faults, latency_ms=50) as child:
        client = child.client
        assert client.faults.script == ["429"]
        body = batch_body([event("a"), event("b")])
        statuses = [requests.post(child.base_url + "/v1/batch", data=body, auth=AUTH, timeout=5).status_code]
        statuses.append(
            requests.post(child.base_url + "/v1/batch", data=body, auth=AUTH, timeout=5).status_code
        )
        assert statuses == [429, 200]
        assert [r.message_ids for r in client.records()] == [("a", "b"), ("a", "b")]
        assert client.message_ids() == ["a", "b"]
        assert all(r.answered - r.arrived >= 0.05 for r in client.records())  # --latency-ms 50
        assert client.stats()["latency_ms"] == 50
        url = child.base_url
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/_standin/stats", timeout=2)
