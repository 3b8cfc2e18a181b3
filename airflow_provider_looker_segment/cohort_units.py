"""
What a changed-only run decides and hands over, identity by identity: verdicts, the parts of a unit and how
their messageIds name them, units to send, departures, and how far they were handed to Segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from airflow_provider_looker_segment.sync_state import identity_hash_from_message_id

#: What a run decides for an identity of the Look (see ``SyncRun.decide``).
NEW: Final = 0  # not in the previous state: sent, with its entry event
CHANGED: Final = 1  # its traits changed (or a full refresh): sent
UNCHANGED: Final = 2  # nothing to send
SWITCHED: Final = 3  # a userId for a member the state knew by its anonymousId: one call with both, no entry
REJOINED: Final = 4  # a member of ``pending``: its call is sent again, its entry event if the view lacks it
#: Transitions of the ``pending`` table.
ENTER: Final = 1
EXIT: Final = 2
#: The parts of a unit (bits of the failed parts, and of ``pending.view``): the call (the row's call, or the
#: membership call of an exit) and the event (entry or exit event). A member in full has view 3, an identity
#: out of the cohort in full view 0.
CALL: Final = 1
EVENT: Final = 2
FULL: Final = CALL | EVENT
#: The word after the identity hash in the messageIds of each part (see :func:`message_part`).
PART_WORDS: Final = {"lsg": CALL, "entered": EVENT, "exit": CALL, "exited": EVENT}


class Unit(NamedTuple):
    """
    An identity of the Look to send: its call (the row's, as encoded by the transform) and what it needs.

    :param ordinal: its place among the units of the run, in the order they are given.
    :param seq: its row's position in the Look.
    :param verdict: :data:`NEW`, :data:`CHANGED`, :data:`SWITCHED` or :data:`REJOINED`.
    :param ihash: its identity hash (unsigned).
    :param kind: ``userId``, ``anonymousId`` or ``groupId``.
    :param identity: the identity.
    :param body: the call's encoding.
    :param alt_identity: with :data:`SWITCHED`, the anonymousId the state knew the member by.
    :param transition: the pending transition of the identity (:data:`ENTER`, :data:`EXIT`) or ``None``.
    :param generation: the generation that pending transition departed from.
    :param view: what Segment was told of it (bits :data:`CALL` and :data:`EVENT`).
    """

    ordinal: int
    seq: int
    verdict: int
    ihash: int
    kind: str
    identity: str
    body: bytes
    alt_identity: str | None
    transition: int | None
    generation: int | None
    view: int


class Departure(NamedTuple):
    """
    An identity to send an exit: a departed member of the previous state, or an orphan of the ``pending``
    table (an identity neither in the state nor in the Look that Segment was told something of).
    """

    ordinal: int
    ihash: int
    kind: str
    identity: str
    transition: int | None
    generation: int | None
    view: int
    orphan: bool


@dataclass
class Decision:
    """What :meth:`SyncRun.decide` found: counts of the Look's rows and identities against the state."""

    rows: int = 0
    identities: int = 0
    duplicates: int = 0
    duplicate_example: str | None = None
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    switched: int = 0
    rejoined: int = 0
    departed: int = 0
    orphans: int = 0
    previous: int = 0

    @property
    def exit_ratio(self) -> float:
        """Departed identities / previous identities (0.0 without a previous state)."""
        return self.departed / self.previous if self.previous else 0.0


@dataclass
class Handed:
    """
    How far the messages of a run were handed to Segment, in the order :meth:`SyncRun.iter_units` and
    :meth:`SyncRun.iter_exits` give them: every unit up to a mark was handed whole; ``partial`` is the unit
    whose first parts were handed when sending stopped, with the bits of its parts that were not.
    """

    units_done: int = -1  # ordinal of the last unit handed (in part, see ``partial``)
    exits_started: bool = False
    exits_done: int = -1  # ordinal of the last exit handed (in part, see ``partial``)
    all_done: bool = False
    partial: tuple[int, int] | None = None  # (unsigned ihash, bits not handed)


def message_part(message_id: Any) -> tuple[int, int] | None:
    """The (unsigned identity hash, part bit) a messageId of a changed-only run stands for, or ``None``."""
    ihash = identity_hash_from_message_id(message_id)
    if ihash is None or message_id[16:17] != "-":
        return None
    word = message_id[17:].split("-", 1)[0]
    bit = PART_WORDS.get(word)
    return None if bit is None else (ihash, bit)
