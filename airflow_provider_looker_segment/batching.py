"""
Pure encoding and batching of Segment messages for the Tracking API's ``POST /v1/batch`` (no I/O here).

Each message is encoded once (orjson) and batched within Segment's limits on the encoded bytes (see
docs/delivery.md, "Batches"); a refused event comes out alone as a :class:`RejectedEvent`. The dry run counts
with :func:`plan_batches`; :mod:`~airflow_provider_looker_segment.delivery` sends what :meth:`Batcher.split`
yields.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, NamedTuple

import orjson

from airflow_provider_looker_segment.exceptions import SegmentConfigurationError

#: Segment's limit for one event (one call), in bytes of encoded JSON.
MAX_EVENT_BYTES = 32 * 1024
#: Segment's limit for one ``/v1/batch`` request body, in bytes.
MAX_REQUEST_BYTES = 500 * 1024
#: Segment's limit for the number of events in one batch.
MAX_BATCH_EVENTS = 2500
#: The batcher's default cap on a whole request body, envelope included: 12,000 bytes below
#: :data:`MAX_REQUEST_BYTES`, which also satisfies a decimal reading of "500 KB".
DEFAULT_MAX_BATCH_BYTES = 500_000

_PREFIX = b'{"batch":['
_SENT_AT = b'],"sentAt":"'
_SUFFIX = b'"}'
#: Length of a ``sentAt`` value as :func:`format_sent_at` writes it (``2024-01-31T12:00:00.000Z``).
SENT_AT_LENGTH = 24
#: Bytes of a batch body that are not events: ``{"batch":[`` + ``],"sentAt":"...Z"}``.
ENVELOPE_BYTES = len(_PREFIX) + len(_SENT_AT) + SENT_AT_LENGTH + len(_SUFFIX)


class Rejection(str, Enum):
    """Why the batcher refused an event; the value is the reason shown in reports and logs."""

    OVERSIZE = f"event over Segment's 32 KB limit ({MAX_EVENT_BYTES} bytes encoded)"
    NOT_JSON = "event is not JSON-serialisable"
    NO_IDENTITY = "event has neither userId nor anonymousId"
    NOT_A_MAPPING = "event is not a mapping"


class RejectedEvent(NamedTuple):
    """
    An event the batcher refused before any request.

    :param message_id: the event's ``messageId`` (``None`` when it has none and could not be encoded).
    :param reason: why.
    :param size: the encoded size in bytes, ``0`` when the event could not be encoded.
    """

    message_id: Any
    reason: Rejection
    size: int


class Batch:
    """
    Events encoded once, ready to be joined into one ``/v1/batch`` request body.

    :param events: the encoded events, in input order.
    :param message_ids: their ``messageId`` values, in the same order.
    :param size: the exact length in bytes of :meth:`body`.
    """

    __slots__ = ("events", "message_ids", "size")

    def __init__(self, events: list[bytes], message_ids: list[Any], size: int) -> None:
        self.events = events
        self.message_ids = message_ids
        self.size = size

    def __len__(self) -> int:
        return len(self.message_ids)  # the events may be released once the body is built

    def __repr__(self) -> str:
        return f"Batch(events={len(self)}, size={self.size})"

    def head(self) -> bytes:
        """
        Return the request body up to its ``sentAt`` value: ``{"batch":[...],"sentAt":"``.

        Build it once per batch; each attempt completes it with :func:`stamp_body`, so retries carry the same
        events (Segment deduplicates them by ``messageId``) and the moment they were sent.
        """
        return b"".join((_PREFIX, b",".join(self.events), _SENT_AT))

    def body(self, sent_at: str | None = None) -> bytes:
        """
        Return the request body ``{"batch":[...],"sentAt":"..."}``.

        :param sent_at: the ``sentAt`` value, as :func:`format_sent_at` writes it; now when omitted.
        """
        return stamp_body(self.head(), sent_at or format_sent_at())


def stamp_body(head: bytes, sent_at: str) -> bytes:
    """
    Complete a batch's :meth:`Batch.head` with its ``sentAt``: ``head + sent_at + '"}'``.

    :param head: the body up to its ``sentAt`` value.
    :param sent_at: the moment the attempt is sent, as :func:`format_sent_at` writes it.
    """
    stamp = sent_at.encode("ascii")
    if len(stamp) != SENT_AT_LENGTH:
        raise ValueError(f"sentAt must be {SENT_AT_LENGTH} characters, e.g. 2024-01-31T12:00:00.000Z")
    return head + stamp + _SUFFIX


def format_sent_at(moment: datetime | None = None) -> str:
    """
    Format a ``sentAt`` timestamp: UTC, milliseconds, always :data:`SENT_AT_LENGTH` characters.

    :param moment: an aware datetime; now when omitted.
    """
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _default(value: Any) -> Any:
    """Encode the few types orjson does not know natively (called only for those)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode_event(message: Mapping[str, Any]) -> bytes:
    """
    Encode one Segment message as compact UTF-8 JSON, the bytes that go into a batch.

    Datetimes become RFC 3339 strings, decimals numbers. Raises :class:`TypeError` for other unknown types.

    :param message: a Segment message (``identify``, ``track``, ``group``, ...).
    """
    return orjson.dumps(message, default=_default)


class EncodedMessage(dict):
    """
    A Segment message that carries its own JSON encoding (:attr:`encoded`), made once by its producer (the
    transform encodes each row's message once, for its messageId and for the batch). :class:`Batcher` sends
    :attr:`encoded` as it is: change the message only through :meth:`set_message_id`. :attr:`alias`, when
    set, is the anonymousId derived from the row's email of a message with a userId (never sent).
    """

    __slots__ = ("alias", "encoded")

    def set_message_id(self, message_id: str) -> None:
        """Replace the ``messageId`` (the last key of :attr:`encoded`) in the message and in its encoding."""
        tail = b'"messageId":' + orjson.dumps(self["messageId"]) + b"}"
        if not self.encoded.endswith(tail):
            raise ValueError("the encoded message does not end with its messageId")
        self.encoded = self.encoded[: -len(tail)] + b'"messageId":' + orjson.dumps(message_id) + b"}"
        self["messageId"] = message_id


def _has_identity(message: Mapping[str, Any]) -> bool:
    """Whether the message carries a non-empty ``userId`` or ``anonymousId`` (``0`` counts)."""
    return any(message.get(key) not in (None, "") for key in ("userId", "anonymousId"))


class Batcher:
    """
    Split a stream of Segment messages into batches within Segment's limits.

    :param max_batch_bytes: cap on a whole request body, envelope included (at most
        :data:`MAX_REQUEST_BYTES`).
    :param max_batch_events: cap on the events of a batch (at most :data:`MAX_BATCH_EVENTS`).
    :param max_event_bytes: cap on one encoded event (at most :data:`MAX_EVENT_BYTES`; a larger event is
        rejected as :attr:`Rejection.OVERSIZE`; tests use smaller caps).
    """

    def __init__(
        self,
        *,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        if not 1 <= max_batch_events <= MAX_BATCH_EVENTS:
            raise SegmentConfigurationError(
                f"max_batch_events must be between 1 and {MAX_BATCH_EVENTS}, not {max_batch_events}."
            )
        if not 1 <= max_event_bytes <= MAX_EVENT_BYTES:
            raise SegmentConfigurationError(
                f"max_event_bytes must be between 1 and {MAX_EVENT_BYTES}, not {max_event_bytes}."
            )
        if not ENVELOPE_BYTES + max_event_bytes <= max_batch_bytes <= MAX_REQUEST_BYTES:
            raise SegmentConfigurationError(
                f"max_batch_bytes must leave room for one event of max_event_bytes ({max_event_bytes}) plus "
                f"the {ENVELOPE_BYTES}-byte envelope and be at most {MAX_REQUEST_BYTES}, "
                f"not {max_batch_bytes}."
            )
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_events = max_batch_events
        self.max_event_bytes = max_event_bytes

    def split(self, messages: Iterable[Mapping[str, Any]]) -> Iterator[Batch | RejectedEvent]:
        """
        Consume ``messages`` lazily; yield batches, and rejected events as soon as they are met.

        At most one batch is held here. Every message comes out exactly once, in input order, in a
        :class:`Batch` or as a :class:`RejectedEvent` (a rejected event never closes a batch). Events without
        a non-empty ``userId`` or ``anonymousId`` are rejected: Segment would answer 200, then drop them.

        :param messages: Segment messages; each should carry a ``messageId`` (a random one is added when
            missing, so that retries deduplicate).
        """
        max_bytes, max_events, max_event = self.max_batch_bytes, self.max_batch_events, self.max_event_bytes
        dumps, default = orjson.dumps, _default
        events: list[bytes] = []
        ids: list[Any] = []
        size = ENVELOPE_BYTES
        for message in messages:
            try:
                data = (
                    message.encoded
                    if message.__class__ is EncodedMessage
                    else dumps(message, default=default)
                )
                message_id = message.get("messageId")
                if message_id is None:
                    message_id = str(uuid.uuid4())
                    data = dumps({**message, "messageId": message_id}, default=default)
                if not message.get("userId") and not _has_identity(message):
                    yield RejectedEvent(message_id, Rejection.NO_IDENTITY, len(data))
                    continue
            except TypeError:
                message_id = message.get("messageId") if isinstance(message, Mapping) else None
                yield RejectedEvent(message_id, Rejection.NOT_JSON, 0)
                continue
            except AttributeError:
                yield RejectedEvent(None, Rejection.NOT_A_MAPPING, 0)
                continue
            length = len(data)
            if length > max_event:
                yield RejectedEvent(message_id, Rejection.OVERSIZE, length)
                continue
            if events:
                if size + length + 1 > max_bytes or len(events) >= max_events:
                    yield Batch(events, ids, size)
                    events, ids, size = [data], [message_id], ENVELOPE_BYTES + length
                    continue
                size += length + 1
            else:
                size += length
            events.append(data)
            ids.append(message_id)
        if events:
            yield Batch(events, ids, size)


@dataclass
class BatchPlan:
    """
    What a delivery would send, computed without a network (the operator's dry run).

    :param events: events that would be sent.
    :param batches: requests that would be made (no retries).
    :param bytes: request body bytes, uncompressed, envelopes included.
    :param rejected: events refused before sending.
    :param reasons: rejected events per reason.
    :param rejected_message_ids: the first ``max_listed`` rejected events' messageIds.
    """

    events: int = 0
    batches: int = 0
    bytes: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    rejected_message_ids: list[Any] = field(default_factory=list)


def plan_batches(
    messages: Iterable[Mapping[str, Any]], *, batcher: Batcher | None = None, max_listed: int = 10_000
) -> BatchPlan:
    """
    Batch messages exactly as a delivery would and count the result; nothing is sent.

    :param messages: Segment messages.
    :param batcher: the batcher to use; Segment's limits when omitted.
    :param max_listed: cap on the rejected messageIds listed in the plan.
    """
    plan = BatchPlan()
    for item in (batcher or Batcher()).split(messages):
        if isinstance(item, Batch):
            plan.events += len(item)
            plan.batches += 1
            plan.bytes += item.size
            continue
        plan.rejected += 1
        plan.reasons[item.reason.value] = plan.reasons.get(item.reason.value, 0) + 1
        if len(plan.rejected_message_ids) < max_listed:
            plan.rejected_message_ids.append(item.message_id)
    return plan
