"""
One call per identity and run: only the first row of an identity, in the Look's order, is sent (the rule:
docs/rows-to-calls.md). Memory stays bounded: 64-bit hashes in an ``array('q')`` table (16 bytes per
identity) up to :data:`MAX_MEMORY_IDENTITIES`, then sorted runs on local disk behind a fixed Bloom filter,
checked exactly (docs/changed-only.md, "Memory and disk"). Nothing is approximate but a 64-bit hash collision.
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: Mixed into the hash of an ``anonymousId`` so that ``userId`` "42" and ``anonymousId`` "42" differ.
_ANONYMOUS_SALT = 0x1E3779B97F4A7C15
_INITIAL_SLOTS = 1 << 16
#: Identities held in memory (a table of 2**21 slots, 16 MB) before they are written to disk.
MAX_MEMORY_IDENTITIES = 1 << 20
#: Size of the Bloom filter in front of the identities on disk (allocated at the first spill).
BLOOM_BYTES = 8 << 20
_BLOOM_HASHES = 5
_BLOCK = 512  # identities per block read from a run (4 KB)
_MASK64 = (1 << 64) - 1


class IdentitySet:
    """
    The table of :func:`drop_duplicates`, which adds to it inline: signed 64-bit integers (Python's
    ``hash()`` values) in an ``array('q')``, open addressing with linear probing, at most half full (so 16
    bytes per member at worst). 0 marks a free slot and is stored as -1, a value ``hash()`` never returns.
    """

    __slots__ = ("_count", "_limit", "_mask", "_table")

    def __init__(self, slots: int = _INITIAL_SLOTS) -> None:
        if slots < 2 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, got {slots}")
        self._table = array("q", bytes(8 * slots))
        self._mask = slots - 1
        self._limit = slots // 2
        self._count = 0

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


class SpilledIdentities:
    """
    The identities written to local disk when the table was full: sorted runs of signed 64-bit integers,
    each with every 512th value in memory, behind one Bloom filter of :data:`BLOOM_BYTES`.

    :param tmp_dir: where the runs go (the system's temporary folder by default); removed by :meth:`close`.
    """

    def __init__(self, tmp_dir: str | None = None) -> None:
        self._folder = tempfile.mkdtemp(prefix="lsg-dedupe-", dir=tmp_dir)
        self._bloom = bytearray(BLOOM_BYTES)
        self._bits = BLOOM_BYTES * 8 - 1
        self._runs: list[tuple[int, array]] = []  # (file descriptor, fence: every _BLOCK-th value)
        self.count = 0

    def add_sorted_run(self, values: Iterable[array]) -> None:
        """Write a run (chunks of ascending values, ascending across chunks) and add it to the filter."""
        path = os.path.join(self._folder, f"run-{len(self._runs)}")
        fence, written = array("q"), 0
        bloom, bits, hashes = self._bloom, self._bits, _BLOOM_HASHES
        with open(path, "wb") as run:
            for chunk in values:
                chunk.tofile(run)
                for offset in range(-written % _BLOCK, len(chunk), _BLOCK):
                    fence.append(chunk[offset])
                for value in chunk:
                    h = value & _MASK64
                    h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
                    for i in range(hashes):
                        position = (h1 + i * h2) & bits
                        bloom[position >> 3] |= 1 << (position & 7)
                written += len(chunk)
        self._runs.append((os.open(path, os.O_RDONLY), fence))
        self.count += written

    def __contains__(self, value: int) -> bool:
        h = value & _MASK64
        h1, h2, bloom, bits = h & 0xFFFFFFFF, (h >> 32) | 1, self._bloom, self._bits
        for i in range(_BLOOM_HASHES):
            position = (h1 + i * h2) & bits
            if not bloom[position >> 3] & (1 << (position & 7)):
                return False
        for fd, fence in self._runs:  # maybe: look it up exactly, one block per run
            block = bisect.bisect_right(fence, value) - 1
            if block < 0:
                continue
            values = array("q", os.pread(fd, 8 * _BLOCK, 8 * _BLOCK * block))
            index = bisect.bisect_left(values, value)
            if index < len(values) and values[index] == value:
                return True
        return False

    def close(self) -> None:
        """Close and remove the runs."""
        for fd, _fence in self._runs:
            os.close(fd)
        self._runs = []
        shutil.rmtree(self._folder, ignore_errors=True)


def _sorted_chunks(table: array) -> Iterator[array]:
    """The non-zero values of a table in ascending order, 256 chunks at a time (no list of all of them)."""
    buckets = [array("q") for _ in range(256)]
    appends = [bucket.append for bucket in buckets]
    for value in filter(None, table):
        appends[(value >> 56) + 128](value)
    for bucket in buckets:
        yield array("q", sorted(bucket))
        del bucket[:]


def _zero(table: array) -> None:
    """Set every slot of a table to 0 in place, a megabyte at a time."""
    view, zeros = memoryview(table).cast("B"), bytes(1 << 20)
    for offset in range(0, len(view), len(zeros)):
        end = min(offset + len(zeros), len(view))
        view[offset:end] = zeros[: end - offset]
    view.release()


@dataclass
class DuplicateCounts:
    """
    What :func:`drop_duplicates` removed.

    :param duplicates: rows dropped because an earlier row of the Look had the same identity.
    :param example: the identity of the first duplicate, e.g. ``userId 42``.
    """

    duplicates: int = 0
    example: str | None = None

    def warning(self, label: str) -> str | None:
        """The one warning line of a run with duplicates, or ``None``."""
        if not self.duplicates:
            return None
        return (
            f"{label}: {self.duplicates:,} rows repeat an identity of an earlier row (e.g. "
            f"{self.example}) and were not sent: only the first row of each identity, in the Look's order, "
            "is sent. A join that multiplies rows does this; fix the Look, or sort it so that the row you "
            "want comes first."
        )


def drop_duplicates(
    messages: Iterable[dict[str, Any]],
    counts: DuplicateCounts,
    *,
    by_group: bool = False,
    max_memory_identities: int = MAX_MEMORY_IDENTITIES,
    tmp_dir: str | None = None,
) -> Iterator[dict[str, Any]]:
    """
    Yield the messages whose identity was not seen earlier in ``messages``; count the others in ``counts``.

    :param messages: calls with a ``userId`` or an ``anonymousId`` (group calls: a ``groupId``).
    :param counts: updated as duplicates are found.
    :param by_group: the messages are group calls, keyed by their ``groupId``.
    :param max_memory_identities: identities held in memory before they are written to disk (a power of two).
    :param tmp_dir: where identities written to disk go.
    """
    seen = IdentitySet()
    spilled: SpilledIdentities | None = None
    # adding to the table is inlined (the row loop's hottest step after the transform)
    table, mask, count, limit = seen._table, seen._mask, 0, seen._limit
    threshold = min(limit, max_memory_identities)
    try:
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
            if not slot and (spilled is None or value not in spilled):  # a new identity
                table[index] = value
                count += 1
                if count > threshold:
                    if count > max_memory_identities:  # the table is full: to disk, and start afresh
                        if spilled is None:
                            spilled = SpilledIdentities(tmp_dir)
                        spilled.add_sorted_run(_sorted_chunks(table))
                        _zero(table)  # reused: no second table, even for a moment
                        count = 0
                    else:
                        seen._count = count
                        seen._grow()
                    table, mask, limit = seen._table, seen._mask, seen._limit
                    threshold = min(limit, max_memory_identities)
                yield message
                continue
            counts.duplicates += 1
            if counts.example is None:
                counts.example = _describe(message, by_group)
    finally:
        if spilled is not None:
            spilled.close()


def _describe(message: dict[str, Any], by_group: bool) -> str:
    """The identity of a message as the duplicate warning names it, e.g. ``userId 42``."""
    if by_group:
        return f"groupId {message['groupId']}"
    user_id = message.get("userId")
    return f"userId {user_id}" if user_id else f"anonymousId {message['anonymousId']}"
