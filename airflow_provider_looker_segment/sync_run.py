"""
One run of a changed-only sync: spool the whole Look, decide, hand the calls to Segment, commit.

1. **Spool** (:meth:`SyncRun.spool`): every message goes to a local spool
   (:mod:`~airflow_provider_looker_segment.cohort_spool`), so memory stays flat whatever the cohort's size.
2. **Decide** (:meth:`SyncRun.decide`): a 256th of the Look at a time (a partition of identity hashes) is
   grouped by identity (the first row of an identity in the Look's order wins, the others are duplicates)
   and compared with the same range of the previous state; the identities that are new, changed, unchanged,
   switched (a userId for a member known by its anonymousId) and departed are counted before anything is
   sent: the exit guard is decided on these counts. What to send is written to a plan per partition.
3. **Send**: :meth:`SyncRun.iter_units` then :meth:`SyncRun.iter_exits` give what to send (partition by
   partition, in the Look's order within one); :mod:`~airflow_provider_looker_segment.cohort_sync` makes the
   messages and marks how far it handed them to Segment (:class:`Handed`).
4. **Commit** (:meth:`SyncRun.commit`): an identity's calls of a run are one unit, judged by what Segment
   accepted of it. The state keeps what Segment was told: ``identities`` the members whose call (traits
   digest) Segment has and, in ``pending``, the identities whose entry or exit reached Segment only in part,
   as a *view* (bit :data:`CALL`: its call with the membership trait; bit :data:`EVENT`: its entry event)
   and the generation the transition departed from. The next run sends only what the view lacks (never an
   entry or exit event Segment accepted), under the same messageIds (derived from that generation).
"""

from __future__ import annotations

import logging
import marshal
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from airflow_provider_looker_segment import exceptions as errors
from airflow_provider_looker_segment.cohort_spool import PARTITIONS, Spool, iter_chunks, partition_range
from airflow_provider_looker_segment.sync_lock import SyncLock
from airflow_provider_looker_segment.sync_state import (
    ANONYMOUS_ID,
    GROUP_ID,
    IDENTITY_KINDS,
    USER_ID,
    identity_hash_from_message_id,
    signed,
    utcnow,
)

if TYPE_CHECKING:
    from airflow_provider_looker_segment.sync_state import CohortStateStore

log = logging.getLogger(__name__)

#: What :meth:`SyncRun.decide` concludes for an identity of the Look.
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

_FLUSH_ROWS = 10_000
_PENDING_COLUMNS: Final = "ihash, transition, generation, view, kind, identity"
_SCRATCH: Final = """
    CREATE TABLE run.switches (ihash INTEGER PRIMARY KEY, alt INTEGER NOT NULL UNIQUE,
                               alt_identity BLOB NOT NULL);
    CREATE TABLE run.eligible (ihash INTEGER PRIMARY KEY);
    CREATE TABLE run.failed (ihash INTEGER PRIMARY KEY, bits INTEGER NOT NULL);
"""


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


class CommitResult(NamedTuple):
    """
    What a commit wrote: the state's ``generation``, identities (``entries``) and file ``size`` (``saved``
    false when nothing changed, so nothing was written); units accepted for new identities (``added``),
    changed ones (``updated``) and exits (``removed``); units not accepted (``not_advanced``: sent again
    next run), and entries or exits left pending.
    """

    generation: int
    entries: int
    size: int
    added: int
    updated: int
    removed: int
    not_advanced: int
    pending: int
    saved: bool
    seconds: float = 0.0


def identity_of(message: Mapping[str, Any]) -> tuple[str, str]:
    """
    Return the identity a message is keyed by in the state: a group call's groupId, else its userId if any,
    else its anonymousId.
    """
    if message.get("type") == "group":
        return (GROUP_ID, message["groupId"])
    user_id = message.get("userId")
    return (USER_ID, user_id) if user_id else (ANONYMOUS_ID, message["anonymousId"])


def message_part(message_id: Any) -> tuple[int, int] | None:
    """The (unsigned identity hash, part bit) a messageId of a changed-only run stands for, or ``None``."""
    ihash = identity_hash_from_message_id(message_id)
    if ihash is None or message_id[16:17] != "-":
        return None
    word = message_id[17:].split("-", 1)[0]
    bit = PART_WORDS.get(word)
    return None if bit is None else (ihash, bit)


class SyncRun:
    """
    One run of a sync, from :meth:`CohortStateStore.begin`: spool, decide, send, commit.

    Use it as a context manager: leaving it releases the lock and removes local files; without a
    :meth:`commit` the stored state is left as it was.
    """

    def __init__(self, store: CohortStateStore, run_id: str, full_refresh: bool) -> None:
        self.store, self.run_id, self.full_refresh = store, run_id, full_refresh
        self._closed = self._committed = False
        self._db: sqlite3.Connection | None = None
        self._spool: Spool | None = None
        self._planned: list[int] = []  # partitions with a plan, in order
        self._switched_alts: set[int] = set()
        if store.base_path.protocol in ("", "file", "local"):
            store.base_path.mkdir(parents=True, exist_ok=True)
        self._lock = SyncLock(store.lock_path, store.key, store.lock_stale_after, store.lock_renew_interval)
        self._workdir = Path(tempfile.mkdtemp(prefix="lsg-sync-run-", dir=store.tmp_dir))
        started = time.monotonic()
        try:
            self._lock.acquire(run_id)
            store.file.remove_leftovers()  # safe: we hold the lock
            self.unsaved = store.file.read_unsaved_marker()
            self._db, self._token = store.file.open(self._workdir, full_refresh=full_refresh)
            self._db.execute("PRAGMA cache_size = -2000")  # 2 MB a database: a larger cache was no faster
            self._meta = dict(self._db.execute("SELECT key, value FROM meta"))
            self.previous_count = self._db.execute("SELECT count(*) FROM identities").fetchone()[0]
            self._db.execute("ATTACH DATABASE ? AS run", (str(self._workdir / "run.db"),))
            self._db.execute("PRAGMA run.journal_mode = OFF")
            self._db.executescript(_SCRATCH)
            self._spool = Spool(self._workdir)
            self._undelivered_path = self._workdir / "undelivered.txt"
            self._undelivered = open(self._undelivered_path, "w", encoding="utf-8")
        except BaseException:
            self.close()
            raise
        #: Seconds to download, check and open the previous state (with the lock).
        self.load_seconds = time.monotonic() - started
        self.decision: Decision | None = None
        log.info(
            "Sync %s: %s previous identities (generation %s)%s.",
            store.key,
            f"{self.previous_count:,}",
            self.previous_generation,
            ", full refresh" if full_refresh else "",
        )

    def __enter__(self) -> SyncRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def previous_generation(self) -> int:
        """Generation of the previous state (0 if none was loaded)."""
        return int(self._meta.get("generation", 0))

    @property
    def lock_lost(self) -> str | None:
        """Why this run lost its lock, or ``None`` while it holds it."""
        return self._lock.lost_reason if self._lock.lost.is_set() else None

    def on_lock_lost(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(reason)`` as soon as the run learns it lost its lock (from another thread)."""
        self._lock.on_lost(callback)

    # -- 1. spool ---------------------------------------------------------------------------------------

    @property
    def knows_anonymous_members(self) -> bool:
        """Whether the previous state has members known by an anonymousId (who may now have a userId)."""
        return bool(self._db.execute("SELECT EXISTS (SELECT 1 FROM identities WHERE kind = 1)").fetchone()[0])

    @property
    def rows(self) -> int:
        """Rows spooled."""
        return self._spool.rows if self._spool is not None else 0

    @property
    def spool_bytes(self) -> int:
        """Bytes of encodings spooled."""
        return self._spool.bytes if self._spool is not None else 0

    # -- 1. spool ---------------------------------------------------------------------------------------

    def spool(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        tail: bytes | None = None,
        by_group: bool = False,
        hasher: Any = None,
    ) -> None:
        """
        Spool the Look's messages, in its order (call it once, with every message of the Look).

        :param messages: the run's calls; each with an ``encoded`` attribute (the transform's
            :class:`~airflow_provider_looker_segment.batching.EncodedMessage`) or encodable JSON. An
            ``alias`` attribute (the anonymousId derived from the row's email) lets :meth:`decide` find a
            member known by that anonymousId that now has a userId.
        :param tail: the bytes every encoding of the run carries before its messageId's 32 hex digits (the
            transform's timestamp and context): kept once, not per row.
        :param by_group: the messages are group calls (keyed by their ``groupId``).
        :param hasher: the transform's messageId hash, when it deferred the messageIds
            (``defer_message_id``).
        """
        self._check_usable()
        claims = not by_group and self.knows_anonymous_members
        self._spool.write(messages, tail=tail, by_group=by_group, claims=claims, hasher=hasher)

    # -- 2. decide --------------------------------------------------------------------------------------

    def decide(self) -> Decision:
        """Compare the spooled Look with the state a partition at a time (nothing is sent or saved)."""
        self._check_usable()
        spool, db = self._spool, self._db
        spool.close_writing()
        decision = Decision(rows=spool.rows, previous=self.previous_count)
        first_duplicate: tuple[int, int, bytes] | None = None
        candidates: list[tuple[int, int, int, bytes]] = []  # (seq, claimer, alt, alt identity)
        full = self.full_refresh
        state_parts = _by_partition(db.execute("SELECT ihash, digest, kind FROM identities ORDER BY ihash"))
        pending_parts = _by_partition(db.execute(f"SELECT {_PENDING_COLUMNS} FROM pending ORDER BY ihash"))
        for part in range(PARTITIONS):
            state_rows, pending_rows = next(state_parts), next(pending_parts)
            if not (state_rows or pending_rows or spool.has(part)):
                continue
            rows, claims = spool.records(part)
            state = {h: (d, k) for h, d, k in state_rows}
            pending = {row[0]: row[1:] for row in pending_rows}
            firsts: dict[int, tuple] = {}
            for row in rows:
                if row[0] in firsts:
                    decision.duplicates += 1
                    first = firsts[row[0]]
                    if first_duplicate is None or first[1] < first_duplicate[0]:
                        first_duplicate = (first[1], first[3], first[4])
                else:
                    firsts[row[0]] = row
            units, eligible = [], []
            for ihash, (_, seq, digest, kind, identity, alt, pos, length) in firsts.items():
                previous = state.pop(ihash, None)
                before = pending.pop(ihash, None)
                if previous is None:
                    verdict = NEW
                    if alt is not None:
                        eligible.append((ihash,))
                elif before is not None:
                    verdict = REJOINED
                elif previous[0] == digest and not full:
                    decision.unchanged += 1
                    continue
                else:
                    verdict = CHANGED
                transition, generation, view = before[:3] if before is not None else (None, None, None)
                if view is None:
                    view = 0 if verdict == NEW else FULL
                units.append(
                    (seq, verdict, ihash, kind, identity, pos, length, digest, transition, generation, view)
                )
            decision.identities += len(firsts)
            for ihash, seq, claimer in claims:
                if ihash in state and state[ihash][1] == 1:  # a member known by this anonymousId, gone
                    candidates.append((seq, claimer, ihash, b""))
            departed = [(ihash, kind, None, None, None, FULL, 0) for ihash, (_, kind) in state.items()]
            for ihash, (transition, generation, view, kind, identity) in pending.items():
                if view and ihash not in firsts and ihash not in state:  # in neither: an orphan
                    departed.append((ihash, kind, identity, transition, generation, view, 1))
            for index, entry in enumerate(departed):
                if entry[0] in state:  # a member of the state: its pending row, if any, and its identity
                    transition, generation, view = (pending.get(entry[0]) or (None, None, FULL))[:3]
                    departed[index] = (entry[0], entry[1], None, transition, generation, view, 0)
            self._fill_identities(departed, candidates)
            if eligible:
                db.executemany("INSERT INTO run.eligible VALUES (?)", eligible)
            if units or departed:
                units.sort()
                departed.sort()
                with open(self._workdir / f"plan-{part}", "wb") as plan:
                    plan.write(marshal.dumps((units, departed)))
                self._planned.append(part)
            for unit in units:
                if unit[1] == NEW:
                    decision.new += 1
                elif unit[1] == REJOINED:
                    decision.rejoined += 1
                else:
                    decision.changed += 1
            decision.departed += sum(1 for entry in departed if not entry[6])
            decision.orphans += sum(1 for entry in departed if entry[6])
        if first_duplicate is not None:
            decision.duplicate_example = f"{IDENTITY_KINDS[first_duplicate[1]]} {_text(first_duplicate[2])}"
        self._switches(candidates, decision)
        self.decision = decision
        return decision

    def _fill_identities(self, departed: list[tuple], candidates: list[tuple]) -> None:
        """Read the identities of departed members (and of claimed anonymousIds) from the state."""
        wanted = [entry[0] for entry in departed if entry[2] is None]
        wanted += [candidate[2] for candidate in candidates if not candidate[3]]
        identities: dict[int, bytes] = {}
        for chunk in iter_chunks([(ihash,) for ihash in wanted], 500):
            query = f"SELECT ihash, identity FROM identities WHERE ihash IN ({','.join('?' * len(chunk))})"
            identities.update(self._db.execute(query, [ihash for (ihash,) in chunk]))
        for index, entry in enumerate(departed):
            if entry[2] is None:
                departed[index] = (entry[0], entry[1], identities[entry[0]], *entry[3:])
        for index, candidate in enumerate(candidates):
            if not candidate[3]:
                candidates[index] = (*candidate[:3], identities[candidate[2]])

    def _switches(self, candidates: list[tuple[int, int, int, bytes]], decision: Decision) -> None:
        """Members known by an anonymousId that a new userId row claims (the first claim in the Look wins)."""
        taken_alts: set[int] = set()
        switches = []
        for _seq, claimer, alt, alt_identity in sorted(candidates):
            if alt in taken_alts:
                continue
            if not self._db.execute("SELECT 1 FROM run.eligible WHERE ihash = ?", (claimer,)).fetchone():
                continue
            if any(claimer == switch[0] for switch in switches):
                continue
            taken_alts.add(alt)
            switches.append((claimer, alt, alt_identity))
        self._db.executemany("INSERT INTO run.switches VALUES (?, ?, ?)", switches)
        decision.switched = len(switches)
        decision.new -= len(switches)
        decision.departed -= len(switches)
        self._switched_alts = taken_alts

    # -- 3. send ----------------------------------------------------------------------------------------

    def _plans(self) -> Iterator[tuple[int, list[tuple], list[tuple]]]:
        """The partitions with something to send, in order: (partition, units, departed)."""
        for part in self._planned:
            with open(self._workdir / f"plan-{part}", "rb") as plan:
                units, departed = marshal.loads(plan.read())
            yield part, units, departed

    def iter_units(self) -> Iterator[Unit]:
        """The identities to send (not :data:`UNCHANGED`) by partition, in the Look's order within one."""
        self._check_decided()
        ordinal, u64, switches = 0, 1 << 64, bool(self._switched_alts)
        for _part, units, _departed in self._plans():
            for (
                seq,
                verdict,
                ihash,
                kind,
                identity,
                pos,
                length,
                _digest,
                transition,
                generation,
                view,
            ) in units:
                alt_identity = None
                if switches and verdict == NEW:
                    found = self._db.execute(
                        "SELECT alt_identity FROM run.switches WHERE ihash = ?", (ihash,)
                    ).fetchone()
                    if found:
                        verdict, alt_identity, view = SWITCHED, _text(found[0]), FULL
                yield Unit(
                    ordinal,
                    seq,
                    verdict,
                    ihash % u64,
                    IDENTITY_KINDS[kind],
                    _text(identity),
                    self._spool.body(pos, length),
                    alt_identity,
                    transition,
                    generation,
                    view,
                )
                ordinal += 1

    def iter_exits(self) -> Iterator[Departure]:
        """
        The departed identities and the orphans of the ``pending`` table, partition by partition, in
        identity-hash order.

        :raises SyncStateCorruptError: one is damaged (its identity does not match its hash); a full refresh
            skips it with a warning instead (no exit call; it leaves the state).
        """
        self._check_decided()
        ordinal = 0
        for _part, _units, departed in self._plans():
            for ihash, kind, identity, transition, generation, view, orphan in departed:
                if ihash in self._switched_alts:
                    continue
                try:
                    entry = self.store.entry((ihash, 0, kind, identity))
                except errors.SyncStateCorruptError as error:
                    if not self.full_refresh:
                        raise
                    log.warning(
                        "Sync %s: full refresh: %s, no exit is sent for it.", self.store.key, error.reason
                    )
                    ordinal += 1
                    continue
                yield Departure(
                    ordinal,
                    entry.ihash,
                    entry.kind,
                    entry.identity,
                    transition,
                    generation,
                    view,
                    bool(orphan),
                )
                ordinal += 1

    def record_undelivered(self, message_ids: Sequence[Any]) -> None:
        """Note messageIds that Segment rejected or that failed (the delivery calls it, under its lock)."""
        self._undelivered.write("".join(f"{message_id}\n" for message_id in message_ids))

    # -- 4. commit --------------------------------------------------------------------------------------

    def commit(
        self,
        handed: Handed,
        *,
        keep_departed: bool,
        membership_trait: bool,
        entered_event: bool,
        exited_event: bool,
    ) -> CommitResult:
        """
        Write the next state from what Segment accepted of each unit handed to it (the rejected and failed
        messages were given to :meth:`record_undelivered`).

        A call accepted records the identity's traits digest; the view of an identity records what its entry
        or exit told Segment; an identity whose view is complete (a member in full, or out in full) leaves
        ``pending``, one out in full leaves the state. Parts the run does not send (no membership trait, no
        entry or exit event) count as told.

        :param handed: how far the run's messages were handed to Segment.
        :param keep_departed: the departed identities stay as they are (a possibly truncated Look).
        :param membership_trait: the run's calls carry a membership trait (exit calls are sent).
        :param entered_event: the run sends entry events.
        :param exited_event: the run sends exit events.
        :raises SyncStateConflictError: the stored state changed since this run loaded it.
        :raises SyncStateSaveError: the state could not be saved (after the store's retries).
        """
        self._check_decided()
        self._undelivered.close()
        self._committed = True  # whatever happens next, the local copy has moved on: no second try
        db, generation = self._db, self.previous_generation
        if not self._load_undelivered(handed):  # a failed message of unknown identity: nothing advances
            handed = Handed()
        units_done, exits_done = handed.units_done, handed.exits_done if handed.exits_started else -1
        if handed.all_done:
            units_done = exits_done = 1 << 62
        exits_sent = membership_trait or exited_event
        drop_departed = not keep_departed and not exits_sent  # nothing to tell them: they just leave
        tally = {"added": 0, "accepted": 0, "complete": 0, "removed": 0, "changes": 0, "sent": 0}
        upserts: list[tuple] = []
        deletes: list[tuple] = []
        pending_upserts: list[tuple] = []
        pending_deletes: list[tuple] = []
        unit_ordinal = exit_ordinal = 0
        for part, units, departed in self._plans():
            lo, hi = partition_range(part)
            failed = dict(
                db.execute("SELECT ihash, bits FROM run.failed WHERE ihash BETWEEN ? AND ?", (lo, hi))
            )
            for _seq, verdict, ihash, kind, identity, _pos, _length, digest, transition, gen, view in units:
                tally["sent"] += 1
                if unit_ordinal > units_done:
                    unit_ordinal += 1
                    continue
                unit_ordinal += 1
                bits = failed.get(ihash, 0)
                alt = None
                if verdict == NEW and self._switched_alts:
                    found = db.execute("SELECT alt FROM run.switches WHERE ihash = ?", (ihash,)).fetchone()
                    if found:
                        alt, view = found[0], FULL
                # After its call was sent, Segment may hold the identity as a member (a call that failed may
                # have reached it): the call bit is set whatever the outcome, but only an accepted call
                # completes the unit (and records the digest).
                accepted_call = not bits & CALL
                if entered_event:
                    new_event = EVENT if not bits & EVENT else view & EVENT
                else:
                    new_event = EVENT
                new_view = CALL | new_event
                if accepted_call:
                    upserts.append((ihash, digest, kind, identity))
                    tally["accepted"] += 1
                    tally["added"] += verdict == NEW and alt is None
                    if alt is not None:
                        deletes.append((alt,))
                        pending_deletes.append((alt,))
                if accepted_call and new_view == FULL:
                    tally["complete"] += 1
                    if transition is not None:
                        pending_deletes.append((ihash,))
                elif verdict == CHANGED and transition is None and new_view == FULL:
                    pass  # a member in full still: its old digest makes the next run send it again
                else:
                    since = gen if transition == ENTER else generation
                    pending_upserts.append((ihash, ENTER, since, new_view, kind, identity))
            for ihash, kind, identity, transition, gen, view, orphan in departed:
                if ihash in self._switched_alts:
                    continue
                if drop_departed:
                    deletes.append((ihash,))
                    if transition is not None:
                        pending_deletes.append((ihash,))
                    tally["removed"] += not orphan
                    continue
                if keep_departed or not exits_sent:
                    continue
                if exit_ordinal > exits_done:
                    exit_ordinal += 1
                    continue
                exit_ordinal += 1
                bits = failed.get(ihash, 0)
                new_call = 0 if not membership_trait or not bits & CALL else view & CALL
                new_event = 0 if not exited_event or not bits & EVENT else view & EVENT
                if new_call | new_event:
                    since = gen if transition == EXIT else generation
                    pending_upserts.append((ihash, EXIT, since, new_call | new_event, kind, identity))
                else:
                    deletes.append((ihash,))
                    if transition is not None:
                        pending_deletes.append((ihash,))
                    tally["removed"] += not orphan
            self._apply(upserts, deletes, pending_upserts, pending_deletes, tally)
        pending = db.execute("SELECT count(*) FROM main.pending").fetchone()[0]
        stayed = 0 if keep_departed else max(self.decision.departed - tally["removed"], 0)
        not_advanced = tally["sent"] - tally["complete"] + stayed
        entries = db.execute("SELECT count(*) FROM main.identities").fetchone()[0]
        if not tally["changes"]:
            db.rollback()
            log.info(
                "Sync %s: nothing changed; the state (generation %s) is kept as it is.",
                self.store.key,
                generation,
            )
            return CommitResult(generation, entries, 0, 0, 0, 0, not_advanced, pending, False)
        accepted, added = tally["accepted"], tally["added"]
        result = self._save(entries, added, accepted, tally["removed"], not_advanced, pending)
        log.info("Sync %s: state generation %s saved: %s", self.store.key, result.generation, result)
        return result

    def _apply(
        self,
        upserts: list[tuple],
        deletes: list[tuple],
        pending_upserts: list[tuple],
        pending_deletes: list[tuple],
        tally: dict[str, int],
    ) -> None:
        """Write a partition's changes to the local copy of the state."""
        db = self._db
        if upserts:
            tally["changes"] += db.executemany(
                "INSERT OR REPLACE INTO main.identities (ihash, digest, kind, identity) VALUES (?, ?, ?, ?)",
                upserts,
            ).rowcount
        if deletes:
            tally["changes"] += db.executemany(
                "DELETE FROM main.identities WHERE ihash = ?", deletes
            ).rowcount
        if pending_deletes:
            tally["changes"] += db.executemany(
                "DELETE FROM main.pending WHERE ihash = ?", pending_deletes
            ).rowcount
        if pending_upserts:
            tally["changes"] += db.executemany(
                "INSERT OR REPLACE INTO main.pending VALUES (?, ?, ?, ?, ?, ?)", pending_upserts
            ).rowcount
        for batch in (upserts, deletes, pending_upserts, pending_deletes):
            batch.clear()

    def _save(
        self, entries: int, added: int, accepted: int, removed: int, not_advanced: int, pending: int
    ) -> CommitResult:
        db, started = self._db, time.monotonic()
        state_id = int.from_bytes(os.urandom(4), "big") & 0x7FFF_FFFF
        generation = self.previous_generation + 1
        meta = {"sync_key": self.store.key, "generation": generation, "run_id": self.run_id}
        meta |= {"state_id": f"{state_id:08x}", "written_at": utcnow().isoformat(timespec="seconds")}
        db.executemany("INSERT OR REPLACE INTO main.meta VALUES (?, ?)", meta.items())
        db.execute(f"PRAGMA main.user_version = {state_id}")
        db.commit()
        next_state = self._workdir / "next.state"
        db.execute("VACUUM main INTO ?", (str(next_state),))  # compact, in hash order
        size = next_state.stat().st_size
        try:
            self.store.file.publish(next_state, self._token)
        except errors.SyncStateConflictError:
            raise
        except Exception as error:
            marked = self.store.file.write_unsaved_marker(
                {
                    "run_id": self.run_id,
                    "generation": self.previous_generation,
                    "written_at": meta["written_at"],
                }
            )
            raise errors.SyncStateSaveError(
                self.store.key,
                str(self.store.state_path),
                error,
                attempts=len(self.store.file.save_retry_delays) + 1,
                generation=self.previous_generation,
                marked=marked,
            ) from error
        if self.unsaved is not None:
            self.store.file.remove_unsaved_marker()
        seconds = round(time.monotonic() - started, 3)
        return CommitResult(
            generation, entries, size, added, accepted - added, removed, not_advanced, pending, True, seconds
        )

    def _load_undelivered(self, handed: Handed) -> bool:
        """
        Fill ``run.failed`` with the (identity, part bits) of the rejected and failed messages and of the
        parts of the unit handed in part; ``False`` when one of them names no identity.
        """
        db = self._db
        upsert = """INSERT INTO run.failed VALUES (?, ?)
                    ON CONFLICT (ihash) DO UPDATE SET bits = bits | excluded.bits"""
        known, batch = True, []
        with open(self._undelivered_path, encoding="utf-8") as lines:
            for line in lines:
                part = message_part(line.rstrip("\n"))
                if part is None:
                    known = False
                    continue
                batch.append((signed(part[0]), part[1]))
                if len(batch) >= _FLUSH_ROWS:
                    db.executemany(upsert, batch)
                    batch.clear()
        if handed.partial is not None:
            batch.append((signed(handed.partial[0]), handed.partial[1]))
        db.executemany(upsert, batch)
        return known

    def close(self) -> None:
        """Release the lock and remove local files (idempotent; never leaves the lock behind)."""
        if self._closed:
            return
        self._closed = True
        try:
            for resource in (self._spool, self._db, getattr(self, "_undelivered", None)):
                if resource is not None:
                    try:
                        resource.close()
                    except Exception:
                        log.debug("Could not close %r", resource, exc_info=True)
            shutil.rmtree(self._workdir, ignore_errors=True)
        finally:
            self._lock.release()
        if not self._committed:
            log.info(
                "Sync %s: run %s ended without a commit, the state is unchanged.", self.store.key, self.run_id
            )

    def _check_usable(self) -> None:
        if self._closed or self._committed:
            raise errors.SyncStateError(
                f"run {self.run_id} of sync {self.store.key} is already committed or closed"
            )

    def _check_decided(self) -> None:
        self._check_usable()
        if self.decision is None:
            raise errors.SyncStateError(f"run {self.run_id} of sync {self.store.key}: call decide() first")


def _by_partition(rows: Iterable[tuple]) -> Iterator[list[tuple]]:
    """Rows in identity-hash order (the hash first), as one list per partition, all 256 in turn."""
    rows = iter(rows)
    pending = next(rows, None)
    for part in range(PARTITIONS):
        group: list[tuple] = []
        while pending is not None and (pending[0] >> 56) + 128 == part:
            group.append(pending)
            pending = next(rows, None)
        yield group


def _text(identity: bytes) -> str:
    return identity.decode("utf-8", "surrogatepass")
