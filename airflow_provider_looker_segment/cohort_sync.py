"""
``sync_mode="changed"``: keep only the identify calls whose identity is new or whose traits changed, and make
the calls of identities that left the cohort.

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
    :param exits_sent: of those, exit calls handed to Segment (0 without a membership trait).
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
    exits_skipped: str | None = None
    guard_tripped: str | None = field(default=None, repr=False)
    keep_departed: bool = True


def identity_of(message: Mapping[str, Any]) -> tuple[str, str]:
    """Return the identity a message is keyed by in the state: its userId if any, else its anonymousId."""
    user_id = message.get("userId")
    return (USER_ID, user_id) if user_id else (ANONYMOUS_ID, message["anonymousId"])


def keyed_message_id(ihash: int, message_id: str) -> str:
    """Prefix a messageId with the identity hash: ``<16 hex>-<messageId>`` (53 characters for ours)."""
    return f"{format_identity_hash(ihash)}-{message_id}"


def changed_only(messages: Iterable[dict[str, Any]], run: SyncRun, counts: CohortCounts) -> Iterator[dict]:
    """
    Classify every message's identity in ``run`` and yield only the new and changed ones, their messageId
    prefixed with the identity hash. The digest covers the traits as sent (membership trait included).
    """
    classify = run.classify
    for message in messages:
        kind, identity = identity_of(message)
        ihash = identity_hash(kind, identity)
        verdict = classify(kind, identity, traits_digest(message["traits"]), ihash=ihash)
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


def exit_message(
    departed: ExitIdentity,
    *,
    membership_trait: str,
    message_id_namespace: str,
    timestamp: str | None,
    library: Mapping[str, Any],
) -> dict[str, Any]:
    """
    The identify call of an identity that left the cohort: only the membership trait, set to ``false``.

    Its messageId is deterministic (namespace + identity), so a retried task re-sends the same one.
    """
    digest = hashlib.blake2b(
        f"{message_id_namespace}\x1eexit\x1e{departed.kind}:{departed.identity}".encode(
            "utf-8", "surrogatepass"
        ),
        digest_size=16,
    ).hexdigest()
    message: dict[str, Any] = {"type": "identify", departed.kind: departed.identity}
    message["traits"] = {membership_trait: False}
    if timestamp is not None:
        message["timestamp"] = timestamp
    message["context"] = {"library": dict(library)}
    message["messageId"] = keyed_message_id(departed.ihash, MESSAGE_ID_PREFIX + digest)
    return message


def exit_messages(
    run: SyncRun,
    counts: CohortCounts,
    *,
    membership_trait: str | None,
    max_exit_ratio: float,
    possibly_truncated: bool,
    message_id_namespace: str,
    timestamp: str | None,
    library: Mapping[str, Any],
) -> Iterator[dict[str, Any]]:
    """
    Yield the exit calls, after every row was classified, unless it is unsafe or pointless to send them.

    No exit is sent (``counts.exits_skipped`` says why) when the Look may be truncated, when more than
    ``max_exit_ratio`` of the previous cohort would leave (then ``counts.guard_tripped`` holds the error
    message: the caller fails the task after saving the state), or when there is no membership trait. In the
    first two cases the departed identities stay in the state (``counts.keep_departed``); without a
    membership trait they just leave it.
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
    if not membership_trait:
        counts.exits_skipped = "no membership_trait: departed identities are only removed from the state"
        return
    for departed in run.iter_exits():
        counts.exits_sent += 1
        yield exit_message(
            departed,
            membership_trait=membership_trait,
            message_id_namespace=message_id_namespace,
            timestamp=timestamp,
            library=library,
        )


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
