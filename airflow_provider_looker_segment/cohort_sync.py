"""
``sync_mode="changed"``: the messages of a run, from what
:class:`~airflow_provider_looker_segment.sync_run.SyncRun` decided (the calls, entry and exit events, exit
calls, their messageIds), and the exit guard. Pure message logic; the run owns the spool and the state. The
rules: docs/changed-only.md and docs/rows-to-calls.md (cohort entry and exit events).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from airflow_provider_looker_segment.batching import EncodedMessage
from airflow_provider_looker_segment.cohort_units import (
    CALL,
    ENTER,
    EVENT,
    EXIT,
    SWITCHED,
    Decision,
    Departure,
    Handed,
    Unit,
)
from airflow_provider_looker_segment.sync_run import SyncRun
from airflow_provider_looker_segment.sync_state import GROUP_ID_KEY, format_identity_hash
from airflow_provider_looker_segment.values import anonymous_id_from_group


@dataclass
class CohortCounts:
    """
    What a changed-only run did with the Look's identities.

    :param new: identities not in the previous state (sent).
    :param changed: identities whose traits changed (sent); in a full refresh, every identity of the previous
        state in the Look (sent whatever its traits).
    :param unchanged: identities whose traits did not change (not sent; 0 in a full refresh).
    :param switched: members known by an anonymousId that now have a userId (one call with both).
    :param rejoined: identities back in the Look whose last exit reached Segment only in part (sent again).
    :param departed: identities of the previous state absent from the Look.
    :param exited: identities whose exit (membership call and/or exit event) was handed to Segment.
    :param entered_events: entry events (``entered_event``) handed to Segment.
    :param exited_events: exit events (``exited_event``) handed to Segment.
    :param exits_skipped: why the exits were not sent, if they were not.
    :param exit_guard: the exit guard's error message, if it tripped (nothing is sent, the task fails).
    :param keep_departed: the departed identities stay in the state (the Look may be truncated, or the guard
        tripped).
    """

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    switched: int = 0
    rejoined: int = 0
    departed: int = 0
    exited: int = 0
    entered_events: int = 0
    exited_events: int = 0
    exits_skipped: str | None = None
    exit_guard: str | None = field(default=None, repr=False)
    keep_departed: bool = False


@dataclass(frozen=True)
class CohortEvents:
    """
    What a changed-only run sends besides its calls, and how it writes them.

    :param call: the run's call type (``identify``, ``group`` or ``track``): the type of exit calls.
    :param event: the event of the run's track calls (``call="track"``).
    :param membership_trait: the trait set on every call; exit calls set it to ``false``.
    :param entered_event: the track event sent for each identity that entered the cohort, or ``None``.
    :param exited_event: the track event sent for each identity that left, or ``None``.
    :param sync_key: the sync's state key, part of every transition's messageId.
    :param timestamp: the messages' ``timestamp`` (when Looker ran the query), or ``None``.
    :param library: ``context.library``.
    """

    call: str = "identify"
    event: str | None = None
    membership_trait: str | None = None
    entered_event: str | None = None
    exited_event: str | None = None
    sync_key: str = ""
    timestamp: str | None = None
    library: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sends_exits(self) -> bool:
        """Whether identities that left get anything (a membership call or an exit event)."""
        return bool(self.membership_trait or self.exited_event)

    def transition_id(self, ihash: int, word: str, kind: str, identity: str, generation: int) -> str:
        """
        The messageId of a transition's message: ``<identity hash>-<word>-<32 hex>``, derived from the sync,
        the identity, the transition (``entered``, ``exit``, ``exited``) and the generation it departs from.
        """
        digest = hashlib.blake2b(
            f"{self.sync_key}\x1e{word}\x1e{kind}:{identity}\x1e{generation}".encode(
                "utf-8", "surrogatepass"
            ),
            digest_size=16,
        ).hexdigest()
        return f"{format_identity_hash(ihash)}-{word}-{digest}"

    def finish(self, message: dict[str, Any], context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add the timestamp and context (``library`` and ``context``'s keys) to a message."""
        if self.timestamp is not None:
            message["timestamp"] = self.timestamp
        message["context"] = {"library": dict(self.library), **(context or {})}
        return message


def plan_exits(
    decision: Decision,
    counts: CohortCounts,
    events: CohortEvents,
    *,
    max_exit_ratio: float,
    possibly_truncated: bool,
) -> None:
    """
    Decide, before anything is sent, what becomes of the identities that left (set in ``counts``).

    No exit is sent for a possibly truncated Look, a tripped exit guard (``counts.exit_guard`` holds the
    error), or without a membership trait and exit event: see docs/changed-only.md, "Cohort exits" to "A
    possibly truncated Look never produces exits".
    """
    counts.departed = decision.departed
    if not decision.departed and not decision.orphans:
        return
    if possibly_truncated:
        counts.exits_skipped = "the Look may be truncated (as many rows as the limit)"
        counts.keep_departed = True
        return
    if decision.exit_ratio > max_exit_ratio:
        counts.exits_skipped = "max_exit_ratio exceeded"
        counts.keep_departed = True
        counts.exit_guard = (
            f"{decision.departed:,} of the {decision.previous:,} identities of the previous run "
            f"({decision.exit_ratio:.0%}) are not in the Look any more, more than max_exit_ratio="
            f"{max_exit_ratio:g}: nothing was sent and the state was not changed ({decision.new:,} new, "
            f"{decision.changed:,} changed identities not sent either). A broken or truncated query looks "
            "like this; if the cohort really changed that much, run once with a higher max_exit_ratio (1 "
            "allows any share)."
        )
        return
    if not events.sends_exits:
        counts.exits_skipped = (
            "no membership_trait nor exited_event: departed identities are only removed from the state"
        )


class CohortMessages:
    """
    The messages of a changed-only run, in order: each unit's calls (in the Look's order), then the exits.
    :attr:`handed` says how far they were read (handed to Segment), for :meth:`SyncRun.commit`.

    :param run: the decided run.
    :param events: what to send besides the calls.
    :param counts: updated as messages are made.
    """

    def __init__(self, run: SyncRun, events: CohortEvents, counts: CohortCounts) -> None:
        self.run, self.events, self.counts = run, events, counts
        self.handed = Handed()
        self.generation = run.previous_generation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        handed = self.handed
        for unit in self.run.iter_units():
            messages = self._unit_messages(unit)
            handed.units_done, remaining = unit.ordinal, (1 << len(messages)) - 1
            handed.partial = (unit.ihash, _bits(messages, remaining))
            for index, (_bit, message) in enumerate(messages):
                remaining &= ~(1 << index)
                handed.partial = (unit.ihash, _bits(messages, remaining)) if remaining else None
                yield message
        decision = self.run.decision
        departures = self.counts.departed + (decision.orphans if decision else 0)
        if departures and self.events.sends_exits and not self.counts.keep_departed:
            handed.exits_started = True
            for departure in self.run.iter_exits():
                messages = self._exit_messages(departure)
                handed.exits_done, remaining = departure.ordinal, (1 << len(messages)) - 1
                handed.partial = (departure.ihash, _bits(messages, remaining)) if messages else None
                if messages:
                    self.counts.exited += 1
                for index, (bit, message) in enumerate(messages):
                    remaining &= ~(1 << index)
                    handed.partial = (departure.ihash, _bits(messages, remaining)) if remaining else None
                    if bit == EVENT:
                        self.counts.exited_events += 1
                    yield message
        handed.all_done = True

    def _unit_messages(self, unit: Unit) -> list[tuple[int, dict[str, Any]]]:
        """The calls of one identity of the Look, as (part bit, message)."""
        events = self.events
        messages = [(CALL, self._call(unit))]
        if not events.entered_event:
            return messages
        if unit.view & EVENT:
            return messages  # Segment was told it entered (a changed member, or an earlier attempt)
        generation = (
            unit.generation if unit.transition == ENTER and unit.generation is not None else self.generation
        )
        self.counts.entered_events += 1
        messages.append((EVENT, entry_event(orjson.loads(unit.body), unit, events, generation)))
        return messages

    def _call(self, unit: Unit) -> dict[str, Any]:
        """The unit's call, as encoded by the transform, its messageId prefixed with the identity hash."""
        prefix = f"{format_identity_hash(unit.ihash)}-".encode()
        if unit.verdict == SWITCHED and unit.alt_identity is not None:
            parsed = orjson.loads(unit.body)
            parsed["anonymousId"] = unit.alt_identity
            parsed["messageId"] = prefix.decode() + parsed["messageId"]
            message = EncodedMessage(parsed)
            message.encoded = orjson.dumps(parsed)
            return message
        if unit.kind == GROUP_ID_KEY:
            message = EncodedMessage(orjson.loads(unit.body))
        else:  # what the batcher reads of a message; the encoding is sent as it is
            message = EncodedMessage(type=self.events.call, **{unit.kind: unit.identity})
        body = unit.body
        cut = body.rindex(b'"messageId":"') + len(b'"messageId":"')
        message.encoded = body[:cut] + prefix + body[cut:]
        message["messageId"] = prefix.decode() + body[cut:-2].decode()
        return message

    def _exit_messages(self, departure: Departure) -> list[tuple[int, dict[str, Any]]]:
        """The exit calls of one identity, as (part bit, message): only what Segment was told of its entry."""
        pending_exit = departure.transition == EXIT and departure.generation is not None
        generation = departure.generation if pending_exit else self.generation
        return exit_calls(
            departure,
            self.events,
            generation,
            with_call=bool(departure.view & CALL),
            with_event=bool(departure.view & EVENT),
        )


def entry_event(
    message: Mapping[str, Any], unit: Unit, events: CohortEvents, generation: int
) -> dict[str, Any]:
    """
    The track call telling that ``message``'s identity entered the cohort (docs/rows-to-calls.md, "Cohort
    entry and exit events").
    """
    entry: dict[str, Any] = {"type": "track", "event": events.entered_event}
    for key in ("userId", "anonymousId"):
        if key in message:
            entry[key] = message[key]
    entry["properties"] = dict(message["traits"] if "traits" in message else message["properties"])
    context = {"groupId": message["groupId"]} if "groupId" in message else None
    events.finish(entry, context)
    entry["messageId"] = events.transition_id(unit.ihash, "entered", unit.kind, unit.identity, generation)
    return entry


def exit_calls(
    departed: Departure,
    events: CohortEvents,
    generation: int,
    *,
    with_call: bool = True,
    with_event: bool = True,
) -> list[tuple[int, dict[str, Any]]]:
    """
    The calls of an identity that left the cohort, as (part bit, message): the membership call (the run's
    call type, membership trait ``false``) when there is a membership trait, and the exit event when
    ``exited_event`` is set.
    """
    calls: list[tuple[int, dict[str, Any]]] = []
    trait = events.membership_trait
    if departed.kind == GROUP_ID_KEY:
        who: dict[str, Any] = {"anonymousId": anonymous_id_from_group(departed.identity)}
        context: dict[str, Any] | None = {"groupId": departed.identity}
    else:
        who, context = {departed.kind: departed.identity}, None
    if trait and with_call:
        call: dict[str, Any] = {"type": events.call}
        if events.call == "track":
            call |= {"event": events.event, **who, "properties": {trait: False}}
        elif events.call == "group":
            call |= {"groupId": departed.identity, **who, "traits": {trait: False}}
        else:
            call |= {**who, "traits": {trait: False}}
        events.finish(call)
        call["messageId"] = events.transition_id(
            departed.ihash, "exit", departed.kind, departed.identity, generation
        )
        calls.append((CALL, call))
    if events.exited_event and with_event:
        exited: dict[str, Any] = {"type": "track", "event": events.exited_event, **who}
        exited["properties"] = {trait: False} if trait else {}
        events.finish(exited, context)
        exited["messageId"] = events.transition_id(
            departed.ihash, "exited", departed.kind, departed.identity, generation
        )
        calls.append((EVENT, exited))
    return calls


def _bits(messages: list[tuple[int, dict[str, Any]]], remaining: int) -> int:
    """The part bits of the messages whose index bit is set in ``remaining``."""
    return sum(bit for index, (bit, _message) in enumerate(messages) if remaining >> index & 1)
