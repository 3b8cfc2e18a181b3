"""
``sync_mode="changed"``: keep only the calls whose identity is new or whose traits changed, and make the calls
of identities that entered and left the cohort.

* An identity is a userId, else an anonymousId; for group calls, a groupId.
* **Exit call** (with a membership trait): the run's own call type with only the membership trait set to
  ``false`` (``traits`` for identify and group calls, ``properties`` of the track event for track calls). A
  group's exit call carries the anonymousId derived from its group id (the state keeps group ids only).
* **Entry event** (``entered_event``): a track call for each identity not in the previous state, right after
  its call; properties: the identity's traits as sent by that call. For group calls the track call carries
  the same userId/anonymousId and ``context.groupId``.
* **Exit event** (``exited_event``): a track call for each identity that left, with no properties but the
  membership trait (``false``) when there is one: the state keeps hashes, never traits, and nothing is sent
  that was not delivered before.

Entry and exit messages have deterministic messageIds (run namespace + identity), so a retried task re-sends
the same ones and Segment drops the repeats.

Pure message logic on top of a :class:`~airflow_provider_looker_segment.sync_state.SyncRun` (which owns the
state file); the operator wires it between the transform and the Segment hook.

In this mode every messageId starts with the identity's hash (16 hex digits, see
:func:`~airflow_provider_looker_segment.sync_state.format_identity_hash`), so the rejected and failed
messageIds of a delivery report tell which identities must not advance in the state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_looker_segment.batching import EncodedMessage
from airflow_provider_looker_segment.sync_state import (
    ANONYMOUS_ID,
    GROUP_ID,
    NEW,
    UNCHANGED,
    USER_ID,
    ExitIdentity,
    SyncRun,
    format_identity_hash,
    identity_hash,
    identity_hash_from_message_id,
    traits_digest,
)
from airflow_provider_looker_segment.transform import MESSAGE_ID_PREFIX
from airflow_provider_looker_segment.values import anonymous_id_from_group

#: Values of the operator's ``sync_mode``.
SYNC_ALL = "all"
SYNC_CHANGED = "changed"
SYNC_MODES = (SYNC_ALL, SYNC_CHANGED)


@dataclass
class CohortCounts:
    """
    What a changed-only run did with the Look's identities.

    :param new: identities not in the previous state (sent).
    :param changed: identities whose traits changed (sent); in a full refresh, every identity of the previous
        state (sent whatever its traits).
    :param unchanged: identities whose traits did not change (not sent; 0 in a full refresh).
    :param exits: identities of the previous state absent from the Look.
    :param exits_sent: of those, the identities whose exit (membership call and/or exit event) was handed to
        Segment (0 without a membership trait or an exit event).
    :param entered_events: entry events (``entered_event``) handed to Segment.
    :param exited_events: exit events (``exited_event``) handed to Segment.
    :param exits_skipped: why the exits were not sent, if they were not.
    :param guard_tripped: the exit guard's error message, if it tripped (the caller fails the task).
    :param keep_departed: the departed identities stay in the state (pass ``exits_sent=not keep_departed``
        to :meth:`~airflow_provider_looker_segment.sync_state.SyncRun.commit`). True until
        :func:`exit_messages` has run and found it safe to let them go; it stays true when the Look may be
        truncated or the exit guard tripped.
    """

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    exits: int = 0
    exits_sent: int = 0
    entered_events: int = 0
    exited_events: int = 0
    exits_skipped: str | None = None
    guard_tripped: str | None = field(default=None, repr=False)
    keep_departed: bool = True


@dataclass(frozen=True)
class CohortEvents:
    """
    What a changed-only run sends besides its calls, and how it writes them.

    :param call: the run's call type (``identify``, ``group`` or ``track``): the type of exit calls.
    :param event: the event of the run's track calls (``call="track"``).
    :param membership_trait: the trait set on every call; exit calls set it to ``false``.
    :param entered_event: the track event sent for each identity that entered the cohort, or ``None``.
    :param exited_event: the track event sent for each identity that left, or ``None``.
    :param message_id_namespace: what makes the task run unique.
    :param timestamp: the messages' ``timestamp`` (when Looker ran the query), or ``None``.
    :param library: ``context.library``.
    """

    call: str = "identify"
    event: str | None = None
    membership_trait: str | None = None
    entered_event: str | None = None
    exited_event: str | None = None
    message_id_namespace: str = ""
    timestamp: str | None = None
    library: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sends_exits(self) -> bool:
        """Whether identities that left get anything (a membership call or an exit event)."""
        return bool(self.membership_trait or self.exited_event)

    def message_id(self, ihash: int, what: str, kind: str, identity: str) -> str:
        """The deterministic, identity-keyed messageId of an entry or exit message."""
        digest = hashlib.blake2b(
            f"{self.message_id_namespace}\x1e{what}\x1e{kind}:{identity}".encode("utf-8", "surrogatepass"),
            digest_size=16,
        ).hexdigest()
        return keyed_message_id(ihash, MESSAGE_ID_PREFIX + digest)

    def finish(self, message: dict[str, Any], context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add the timestamp and context (``library`` and ``context``'s keys) to a message."""
        if self.timestamp is not None:
            message["timestamp"] = self.timestamp
        message["context"] = {"library": dict(self.library), **(context or {})}
        return message


def identity_of(message: Mapping[str, Any]) -> tuple[str, str]:
    """
    Return the identity a message is keyed by in the state: a group call's groupId, else its userId if any,
    else its anonymousId.
    """
    if message.get("type") == "group":
        return (GROUP_ID, message["groupId"])
    user_id = message.get("userId")
    return (USER_ID, user_id) if user_id else (ANONYMOUS_ID, message["anonymousId"])


def keyed_message_id(ihash: int, message_id: str) -> str:
    """Prefix a messageId with the identity hash: ``<16 hex>-<messageId>`` (53 characters for ours)."""
    return f"{format_identity_hash(ihash)}-{message_id}"


def changed_only(
    messages: Iterable[dict[str, Any]],
    run: SyncRun,
    counts: CohortCounts,
    events: CohortEvents | None = None,
) -> Iterator[dict]:
    """
    Classify every message's identity in ``run`` and yield only the new and changed ones, their messageId
    prefixed with the identity hash, each new one followed by its entry event when ``events`` asks for one.
    The digest covers the traits (or properties) as sent, membership trait included.
    """
    classify = run.classify
    entered = events.entered_event if events is not None else None
    for message in messages:
        kind, identity = identity_of(message)
        ihash = identity_hash(kind, identity)
        values = message["traits"] if "traits" in message else message["properties"]
        verdict = classify(kind, identity, traits_digest(values), ihash=ihash)
        if verdict == UNCHANGED:
            counts.unchanged += 1
            continue
        if verdict == NEW:
            counts.new += 1
        else:
            counts.changed += 1
        keyed = keyed_message_id(ihash, message["messageId"])
        if isinstance(message, EncodedMessage):
            message.set_message_id(keyed)  # keeps its encoding in step
        else:
            message["messageId"] = keyed
        yield message
        if entered and verdict == NEW:
            counts.entered_events += 1
            yield entry_event(message, ihash, kind, identity, events)  # type: ignore[arg-type]


def entry_event(
    message: Mapping[str, Any], ihash: int, kind: str, identity: str, events: CohortEvents
) -> dict[str, Any]:
    """The track call telling that ``message``'s identity entered the cohort (see the module's rules)."""
    entry: dict[str, Any] = {"type": "track", "event": events.entered_event}
    for key in ("userId", "anonymousId"):
        if key in message:
            entry[key] = message[key]
    entry["properties"] = dict(message["traits"] if "traits" in message else message["properties"])
    context = {"groupId": message["groupId"]} if "groupId" in message else None
    events.finish(entry, context)
    entry["messageId"] = events.message_id(ihash, "entered", kind, identity)
    return entry


def exit_calls(departed: ExitIdentity, events: CohortEvents) -> list[dict[str, Any]]:
    """
    The calls of an identity that left the cohort: the membership call (the run's call type, membership trait
    ``false``) when there is a membership trait, and the exit event when ``exited_event`` is set.
    """
    calls: list[dict[str, Any]] = []
    trait = events.membership_trait
    if departed.kind == GROUP_ID:
        who: dict[str, Any] = {"anonymousId": anonymous_id_from_group(departed.identity)}
        context: dict[str, Any] | None = {"groupId": departed.identity}
    else:
        who, context = {departed.kind: departed.identity}, None
    if trait:
        call: dict[str, Any] = {"type": events.call}
        if events.call == "track":
            call |= {"event": events.event, **who, "properties": {trait: False}}
        elif events.call == "group":
            call |= {"groupId": departed.identity, **who, "traits": {trait: False}}
        else:
            call |= {**who, "traits": {trait: False}}
        events.finish(call)
        call["messageId"] = events.message_id(departed.ihash, "exit", departed.kind, departed.identity)
        calls.append(call)
    if events.exited_event:
        exited: dict[str, Any] = {"type": "track", "event": events.exited_event, **who}
        exited["properties"] = {trait: False} if trait else {}
        events.finish(exited, context)
        exited["messageId"] = events.message_id(departed.ihash, "exited", departed.kind, departed.identity)
        calls.append(exited)
    return calls


def exit_messages(
    run: SyncRun,
    counts: CohortCounts,
    events: CohortEvents,
    *,
    max_exit_ratio: float,
    possibly_truncated: bool,
) -> Iterator[dict[str, Any]]:
    """
    Yield the exit calls and events, after every row was classified, unless it is unsafe or pointless.

    No exit is sent (``counts.exits_skipped`` says why) when the Look may be truncated, when more than
    ``max_exit_ratio`` of the previous cohort would leave (then ``counts.guard_tripped`` holds the error
    message: the caller fails the task after saving the state), or when there is neither a membership trait
    nor an exit event. In the first two cases the departed identities stay in the state
    (``counts.keep_departed``); otherwise they just leave it.
    """
    counts.exits = run.exit_count
    if not counts.exits:
        counts.keep_departed = False
        return
    if possibly_truncated:
        counts.exits_skipped = "the Look may be truncated (as many rows as the limit)"
        return
    if run.exit_ratio > max_exit_ratio:
        counts.exits_skipped = "max_exit_ratio exceeded"
        counts.guard_tripped = (
            f"{counts.exits:,} of the {run.previous_count:,} identities of the previous run "
            f"({run.exit_ratio:.0%}) are not in the Look any more, more than max_exit_ratio="
            f"{max_exit_ratio:g}: they stay in the state and no exit call was sent. A broken or truncated "
            "query looks like this; if the cohort really shrank, run once with a higher max_exit_ratio (1 "
            "allows any share)."
        )
        return
    counts.keep_departed = False
    if not events.sends_exits:
        counts.exits_skipped = (
            "no membership_trait nor exited_event: departed identities are only removed from the state"
        )
        return
    for departed in run.iter_exits():
        counts.exits_sent += 1
        counts.exited_events += 1 if events.exited_event else 0
        yield from exit_calls(departed, events)


def undelivered_identities(message_ids: Iterable[Any], complete: bool) -> set[int] | None:
    """
    The identity hashes of rejected and failed events, from their messageIds; ``None`` when the list is
    incomplete (capped), so that nothing sent advances in the state.
    """
    if not complete:
        return None
    hashes: set[int] = set()
    for message_id in message_ids:
        ihash = identity_hash_from_message_id(message_id)
        if ihash is None:  # not one of ours: we cannot tell which identity it was
            return None
        hashes.add(ihash)
    return hashes
