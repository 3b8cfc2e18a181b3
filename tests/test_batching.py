"""The pure batcher: encoding once, Segment's size and count limits, oversize events isolated."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standins import segment_standin

from airflow_provider_looker_segment.batching import (
    DEFAULT_MAX_BATCH_BYTES,
    ENVELOPE_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    MAX_REQUEST_BYTES,
    SENT_AT_LENGTH,
    Batch,
    Batcher,
    RejectedEvent,
    Rejection,
    encode_event,
    format_sent_at,
    plan_batches,
)
from airflow_provider_looker_segment.exceptions import SegmentConfigurationError

SENT_AT = "2024-01-31T12:00:00.000Z"


def sized(message_id: str, size: int, *, char: str = "x") -> dict:
    """An identify call whose encoding is exactly ``size`` bytes, padded with ``char`` (then ASCII)."""
    message = {"type": "identify", "userId": "u", "messageId": message_id, "traits": {"p": ""}}
    room = size - len(encode_event(message))
    width = len(char.encode())
    assert room >= 0, (size, room)
    message["traits"]["p"] = char * (room // width) + "x" * (room % width)
    assert len(encode_event(message)) == size
    return message


def split(messages: list[dict], **limits: int) -> list[Batch | RejectedEvent]:
    return list(Batcher(**limits).split(messages))


def test_limits_match_segment_and_the_standin():
    assert MAX_EVENT_BYTES == segment_standin.MAX_EVENT_BYTES == 32768
    assert MAX_REQUEST_BYTES == segment_standin.MAX_REQUEST_BYTES == 512000
    assert MAX_BATCH_EVENTS == segment_standin.MAX_BATCH_EVENTS == 2500
    assert DEFAULT_MAX_BATCH_BYTES < MAX_REQUEST_BYTES
    assert len(format_sent_at()) == SENT_AT_LENGTH
    assert len(Batch([], [], 0).body(SENT_AT)) == ENVELOPE_BYTES


def test_encode_event_is_compact_utf8_and_knows_datetimes_and_decimals():
    message = {
        "userId": "ü",
        "traits": {"n": Decimal("2"), "f": Decimal("2.5")},
        "timestamp": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    }
    data = encode_event(message)
    assert data == '{"userId":"ü","traits":{"n":2,"f":2.5},"timestamp":"2024-01-02T03:04:05+00:00"}'.encode()
    with pytest.raises(TypeError):
        encode_event({"x": object()})


def test_body_is_valid_json_of_exactly_the_announced_size():
    messages = [sized(f"m{i}", 100 + i, char="é") for i in range(0, 20, 2)]
    (batch,) = split(messages)
    body = batch.body(SENT_AT)
    assert len(body) == batch.size
    decoded = orjson.loads(body)
    assert decoded["sentAt"] == SENT_AT
    assert decoded["batch"] == messages
    assert batch.message_ids == [m["messageId"] for m in messages]


def test_a_batch_counts_its_events_by_their_message_ids():
    """The delivery drops the encoded events once the body is built (a batch in flight keeps its ids)."""
    (batch,) = split([sized(f"m{i}", 100) for i in range(7)])
    body = batch.body(SENT_AT)
    batch.events = []
    assert len(batch) == 7 and repr(batch) == f"Batch(events=7, size={len(body)})"


def test_split_by_count_exactly_at_the_limit():
    messages = [sized(f"m{i}", 80) for i in range(MAX_BATCH_EVENTS + 1)]
    first, second = split(messages)
    assert len(first) == MAX_BATCH_EVENTS and len(second) == 1
    (only,) = split(messages[:MAX_BATCH_EVENTS])
    assert len(only) == MAX_BATCH_EVENTS


@pytest.mark.parametrize("char", ["x", "é", "😀"])
def test_split_by_bytes_exactly_at_the_limit(char: str):
    """20 events whose body is exactly the cap fit in one batch; one byte more moves the last one out."""
    count, limit, width = 20, DEFAULT_MAX_BATCH_BYTES, len(char.encode())
    base = len(encode_event({"type": "identify", "userId": "u", "messageId": "m00", "traits": {"p": ""}}))
    target = limit - ENVELOPE_BYTES - (count - 1)  # bytes of events, commas excluded
    each = (target // count - base) // width * width + base
    messages = [sized(f"m{i:02d}", each, char=char) for i in range(count - 1)]
    last = target - each * (count - 1)
    messages.append(sized(f"m{count - 1:02d}", last))
    (batch,) = split(messages)
    assert batch.size == limit == len(batch.body(SENT_AT))
    grown = [*messages[:-1], sized(f"m{count - 1:02d}", last + 1)]
    first, second = split(grown)
    assert (len(first), len(second)) == (count - 1, 1)
    assert first.size == limit - last - 1


@pytest.mark.parametrize("char", ["é", "😀"])
def test_sizes_are_bytes_not_characters(char: str):
    """Multi-byte characters count by their UTF-8 bytes, for the batch and for the 32 KB limit."""
    width = len(char.encode())
    base = len(encode_event({"type": "identify", "userId": "u", "messageId": "big", "traits": {"p": ""}}))
    chars = (MAX_EVENT_BYTES - base) // width + 1  # as characters it would fit, as bytes it does not
    message = {"type": "identify", "userId": "u", "messageId": "big", "traits": {"p": char * chars}}
    assert len(orjson.dumps(message).decode()) < MAX_EVENT_BYTES < len(encode_event(message))
    (rejected,) = split([message])
    assert rejected == RejectedEvent("big", Rejection.OVERSIZE, len(encode_event(message)))


def test_oversize_event_is_rejected_alone():
    messages = [
        sized("a", 100),
        sized("big", MAX_EVENT_BYTES + 1),
        sized("b", 100),
        sized("c", MAX_EVENT_BYTES),
    ]
    rejected, batch = split(messages)
    assert rejected == RejectedEvent("big", Rejection.OVERSIZE, MAX_EVENT_BYTES + 1)
    assert batch.message_ids == ["a", "b", "c"]  # the oversize event did not sink nor split the batch


def test_unsendable_events_are_rejected_with_a_reason():
    messages = [
        {"type": "identify", "messageId": "no-id", "traits": {}},
        {"type": "identify", "userId": "", "anonymousId": None, "messageId": "empty-id"},
        {"type": "identify", "userId": "u", "messageId": "not-json", "traits": {"x": object()}},
        ["not", "a", "mapping"],
        {"type": "identify", "anonymousId": "anon", "messageId": "ok"},
        {"type": "identify", "userId": 0, "messageId": "zero-user"},
    ]
    items = split(messages)
    assert [(i.message_id, i.reason) for i in items if isinstance(i, RejectedEvent)] == [
        ("no-id", Rejection.NO_IDENTITY),
        ("empty-id", Rejection.NO_IDENTITY),
        ("not-json", Rejection.NOT_JSON),
        (None, Rejection.NOT_A_MAPPING),
    ]
    (batch,) = [i for i in items if isinstance(i, Batch)]
    assert batch.message_ids == ["ok", "zero-user"]


def test_a_missing_message_id_is_added_to_the_encoded_event():
    (batch,) = split([{"type": "track", "userId": "u", "event": "Signed Up"}])
    (event,) = orjson.loads(batch.body(SENT_AT))["batch"]
    assert event["messageId"] == batch.message_ids[0] and len(event["messageId"]) == 36


def test_input_is_consumed_lazily():
    pulled = []

    def messages():
        for i in range(10):
            pulled.append(i)
            yield sized(f"m{i}", 80)

    batches = Batcher(max_batch_events=3).split(messages())
    first = next(batches)
    assert len(first) == 3 and len(pulled) == 4  # the 4th event showed the batch was full


@pytest.mark.parametrize(
    "limits",
    [
        {"max_batch_events": 0},
        {"max_batch_events": MAX_BATCH_EVENTS + 1},
        {"max_event_bytes": MAX_EVENT_BYTES + 1},
        {"max_batch_bytes": MAX_REQUEST_BYTES + 1},
        {"max_batch_bytes": 1000, "max_event_bytes": 1000},
    ],
)
def test_limits_beyond_segments_are_refused(limits: dict):
    with pytest.raises(SegmentConfigurationError):
        Batcher(**limits)


def test_plan_batches_counts_like_a_delivery():
    messages = [sized("a", 100), sized("big", MAX_EVENT_BYTES + 5), sized("b", 100), {"userId": None}]
    plan = plan_batches(iter(messages))
    assert (plan.events, plan.batches, plan.rejected) == (2, 1, 2)
    assert plan.bytes == ENVELOPE_BYTES + 201
    assert plan.rejected_message_ids[0] == "big"
    assert plan.reasons == {Rejection.OVERSIZE.value: 1, Rejection.NO_IDENTITY.value: 1}
    assert all(type(reason) is str for reason in plan.reasons)  # plain strings: JSON, XCom
    assert plan_batches(messages, max_listed=0).rejected_message_ids == []


def test_rejection_reasons_are_the_documented_texts():
    """docs/troubleshooting.md and the task's summary show these reasons as they are."""
    assert Rejection.OVERSIZE.value == "event over Segment's 32 KB limit (32768 bytes encoded)"
    assert Rejection.NO_IDENTITY.value == "event has neither userId nor anonymousId"


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(min_value=0, max_value=700), st.sampled_from(["x", "é", "€", "😀"])),
        max_size=80,
    ),
    max_batch_events=st.integers(min_value=1, max_value=12),
    max_event_bytes=st.integers(min_value=60, max_value=600),
    extra_bytes=st.integers(min_value=0, max_value=3000),
)
def test_property_batches_respect_limits_and_reproduce_the_input(
    events: list[tuple[int, str]], max_batch_events: int, max_event_bytes: int, extra_bytes: int
):
    max_batch_bytes = ENVELOPE_BYTES + max_event_bytes + extra_bytes
    messages = [
        {"type": "identify", "userId": "u", "messageId": f"m{i}", "traits": {"p": char * length}}
        for i, (length, char) in enumerate(events)
    ]
    batcher = Batcher(
        max_batch_bytes=max_batch_bytes, max_batch_events=max_batch_events, max_event_bytes=max_event_bytes
    )
    items = list(batcher.split(iter(messages)))
    sent: list[dict] = []
    rejected: list[dict] = []
    previous: Batch | None = None
    for item in items:
        if isinstance(item, RejectedEvent):
            message = messages[int(item.message_id[1:])]
            assert item.size == len(encode_event(message)) > max_event_bytes
            rejected.append(message)
            continue
        body = item.body(SENT_AT)
        assert 1 <= len(item) <= max_batch_events
        assert len(body) == item.size <= max_batch_bytes
        decoded = orjson.loads(body)["batch"]
        assert all(len(encode_event(event)) <= max_event_bytes for event in decoded)
        sent.extend(decoded)
        if previous is not None:  # a batch is closed only when the next event did not fit
            first = item.events[0]
            assert len(previous) == max_batch_events or previous.size + 1 + len(first) > max_batch_bytes
        previous = item
    assert sent == [m for m in messages if len(encode_event(m)) <= max_event_bytes]
    assert rejected == [m for m in messages if len(encode_event(m)) > max_event_bytes]


def test_pre_encoded_messages_are_sent_as_encoded():
    """An EncodedMessage's bytes go into the batch as they are: the batcher does not encode it again."""
    from airflow_provider_looker_segment.batching import EncodedMessage

    message = EncodedMessage(type="identify", userId="u1", traits={}, messageId="m1")
    message.encoded = b'{"type":"identify","userId":"u1","traits":{"marker":1},"messageId":"m1"}'
    (batch,) = list(Batcher().split([message]))
    assert batch.events == [message.encoded] and batch.message_ids == ["m1"]
    message.set_message_id("m2")
    assert message.encoded.endswith(b'"messageId":"m2"}') and message["messageId"] == "m2"
