"""
One call per identity and run: a Look that lists the same user twice (a join gone wrong) sends only the
first of its rows.

Which row is kept: the **first one in the Look's order**. The rule is deterministic for a Look with a sort
(Looker returns rows in the Look's sort order), and the sort is how a user chooses the row that wins (for
example ``updated_at`` descending keeps the newest). The other rows of that identity are dropped before any
call is made, counted, and reported once with an example id.

The identity of a call is its ``userId`` or, without one, its ``anonymousId``; a group call's identity is
its ``groupId`` (one group call per account and run). It is the key of the changed-only state (see
:func:`~airflow_provider_looker_segment.cohort_sync.identity_of`), so a run never sends two calls for one
identity and a changed-only sync never flips a trait between two rows from one run to the next.

Memory is about 16 bytes per distinct identity: 64-bit hashes in an open-addressing table backed by one
``array('q')`` (a Python ``set`` of ints needs about 60 bytes each). Two distinct identities share a hash
with a probability of about 3e-8 in a Look of a million rows; the second would then be counted as a
duplicate, never silently dropped.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: Mixed into the hash of an ``anonymousId`` so that ``userId`` "42" and ``anonymousId`` "42" differ.
_ANONYMOUS_SALT = 0x1E3779B97F4A7C15
_INITIAL_SLOTS = 1 << 16


class IdentitySet:
    """
    A set of signed 64-bit integers (Python's ``hash()`` values) in an ``array('q')``, open addressing with
    linear probing, at most half full (so 16 bytes per member at worst). 0 marks a free slot and is stored
    as -1, a value ``hash()`` never returns.
    """

    __slots__ = ("_count", "_limit", "_mask", "_table")

    def __init__(self, slots: int = _INITIAL_SLOTS) -> None:
        if slots < 2 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        self._table = array("q", bytes(8 * slots))
        self._mask = slots - 1
        self._limit = slots // 2
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, value: int) -> bool:
        """
        Add ``value``, a signed 64-bit integer such as a ``hash()``.

        :return: ``True`` if it was not in the set yet.
        """
        value = value or -1
        table, mask = self._table, self._mask
        index = value & mask
        while True:
            slot = table[index]
            if slot == value:
                return False
            if not slot:
                break
            index = (index + 1) & mask
        table[index] = value
        self._count += 1
        if self._count > self._limit:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._table
        slots = len(old) * 2
        table = array("q", bytes(8 * slots))
        mask = slots - 1
        for value in filter(None, old):  # the free slots (0) are skipped in C
            index = value & mask
            while table[index]:
                index = (index + 1) & mask
            table[index] = value
        self._table, self._mask, self._limit = table, mask, slots // 2


@dataclass
class DuplicateCounts:
    """
    What :func:`drop_duplicates` removed.

    :param duplicates: rows dropped because an earlier row of the Look had the same identity.
    :param example: the identity of the first duplicate, e.g. ``userId 42``.
    """

    duplicates: int = 0
    example: str | None = None

    def warning(self, look_id: str) -> str | None:
        """The one warning line of a run with duplicates, or ``None``."""
        if not self.duplicates:
            return None
        return (
            f"Look {look_id}: {self.duplicates:,} rows repeat an identity of an earlier row (e.g. "
            f"{self.example}) and were not sent: only the first row of each identity, in the Look's order, "
            "is sent. A join that multiplies rows does this; fix the Look, or sort it so that the row you "
            "want comes first."
        )


def drop_duplicates(
    messages: Iterable[dict[str, Any]], counts: DuplicateCounts, *, by_group: bool = False
) -> Iterator[dict[str, Any]]:
    """
    Yield the messages whose identity was not seen earlier in ``messages``; count the others in ``counts``.

    :param messages: calls with a ``userId`` or an ``anonymousId`` (group calls: a ``groupId``).
    :param counts: updated as duplicates are found.
    :param by_group: the messages are group calls, keyed by their ``groupId``.
    """
    seen = IdentitySet()
    # IdentitySet.add, inlined (the row loop's hottest step after the transform)
    table, mask, count, limit = seen._table, seen._mask, 0, seen._limit
    for message in messages:
        if by_group:
            value = hash(message["groupId"])
        else:
            user_id = message.get("userId")
            value = hash(user_id) if user_id else hash(message["anonymousId"]) ^ _ANONYMOUS_SALT
        value = value or -1
        index = value & mask
        slot = table[index]
        while slot and slot != value:
            index = (index + 1) & mask
            slot = table[index]
        if not slot:  # a new identity
            table[index] = value
            count += 1
            if count > limit:
                seen._count = count
                seen._grow()
                table, mask, limit = seen._table, seen._mask, seen._limit
            yield message
            continue
        counts.duplicates += 1
        if counts.example is None:
            counts.example = _describe(message, by_group)


def _describe(message: dict[str, Any], by_group: bool) -> str:
    """The identity of a message as the duplicate warning names it, e.g. ``userId 42``."""
    if by_group:
        return f"groupId {message['groupId']}"
    user_id = message.get("userId")
    return f"userId {user_id}" if user_id else f"anonymousId {message['anonymousId']}"
