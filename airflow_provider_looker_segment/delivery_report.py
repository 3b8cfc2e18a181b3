"""What became of the events given to a Segment delivery (see docs/delivery.md and docs/summary.md)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

DELIVERED, REJECTED, FAILED = "delivered", "rejected", "failed"
DEFAULT_MAX_LISTED_EVENTS = 10_000
_MAX_REASONS = 100


@dataclass
class DeliveryReport:
    """
    What became of the messages given to a delivery; each is counted exactly once.

    :param delivered: events Segment accepted (HTTP 2xx).
    :param rejected: events Segment (or the batcher, before sending) refused: too large, invalid, HTTP
        400/413. Re-sending them as they are will not help.
    :param failed: events not delivered although they may be valid: retries exhausted (429, 5xx, timeouts,
        connection errors), HTTP 401/403/404, not sent after delivery stopped, or in flight when it was
        stopped.
    :param requests: HTTP requests made, retries included.
    :param batches: batches formed (sent or not).
    :param bytes: request body bytes sent, as on the wire (after gzip), retries included.
    :param retries: requests that re-sent a batch.
    :param rejected_reasons: number of rejected events per reason.
    :param failed_reasons: number of failed events per reason.
    :param rejected_message_ids: messageIds of rejected events, the first ``max_listed_events``.
    :param failed_message_ids: messageIds of failed events, the first ``max_listed_events``.
    :param rejected_events_omitted: rejected events beyond the listed ones.
    :param failed_events_omitted: failed events beyond the listed ones.
    :param aborted: why sending stopped early, if it did.
    :param refused: why Segment refused the connection for good, if it did (HTTP 401, 403 or 404, a
        redirect, ``https://`` to a plain-HTTP port): a retry of the task would fail the same way.
    :param max_listed_events: cap on each of the two lists, so memory stays bounded.
    :param listener: also given the messageIds of every rejected or failed event, unbounded (a changed-only
        run writes them to disk to know which identities must not advance).
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
    rejected_message_ids: list[Any] = field(default_factory=list)
    failed_message_ids: list[Any] = field(default_factory=list)
    rejected_events_omitted: int = 0
    failed_events_omitted: int = 0
    aborted: str | None = None
    refused: str | None = None
    max_listed_events: int = DEFAULT_MAX_LISTED_EVENTS
    listener: Callable[[Sequence[Any]], None] | None = field(default=None, repr=False, compare=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> DeliveryReport:
        """A copy of the figures (progress snapshots), without the listener."""
        values = {
            f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self) if f.name != "listener"
        }
        return DeliveryReport(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (e.g. for XCom or a task log)."""
        return {
            "delivered": self.delivered,
            "rejected": self.rejected,
            "failed": self.failed,
            "batches": self.batches,
            "requests": self.requests,
            "retries": self.retries,
            "bytes": self.bytes,
            "rejected_reasons": dict(self.rejected_reasons),
            "failed_reasons": dict(self.failed_reasons),
            "rejected_message_ids": list(self.rejected_message_ids),
            "failed_message_ids": list(self.failed_message_ids),
        }

    def summary(self) -> str:
        """One line for a task log."""
        text = (
            f"{self.delivered:,} delivered, {self.rejected:,} rejected, {self.failed:,} failed "
            f"in {self.batches:,} batches, {self.requests:,} requests ({self.retries:,} retries), "
            f"{self.bytes:,} bytes"
        )
        reasons = {**self.rejected_reasons, **self.failed_reasons}  # a reason is either kind, not both
        if reasons:
            top = sorted(reasons.items(), key=lambda item: -item[1])[:5]
            text += "; reasons: " + "; ".join(f"{reason} ({count:,})" for reason, count in top)
        if self.aborted:
            text += f"; stopped early: {self.aborted}"
        return text

    def add(self, category: str, message_ids: Sequence[Any], reason: str = "") -> None:
        """
        Account for events (not thread-safe: the delivery holds its lock).

        :param category: :data:`DELIVERED`, :data:`REJECTED` or :data:`FAILED`.
        :param message_ids: the events' messageIds.
        :param reason: why they were rejected or failed.
        """
        count = len(message_ids)
        if category == DELIVERED:
            self.delivered += count
            return
        if self.listener is not None:
            self.listener(message_ids)
        rejected = category == REJECTED
        reasons, listed = (
            (self.rejected_reasons, self.rejected_message_ids)
            if rejected
            else (self.failed_reasons, self.failed_message_ids)
        )
        key = reason if reason in reasons or len(reasons) < _MAX_REASONS else "other reasons"
        reasons[key] = reasons.get(key, 0) + count
        room = max(0, self.max_listed_events - len(listed))
        listed.extend(message_ids[:room])
        omitted = max(0, count - room)
        if rejected:
            self.rejected += count
            self.rejected_events_omitted += omitted
        else:
            self.failed += count
            self.failed_events_omitted += omitted
