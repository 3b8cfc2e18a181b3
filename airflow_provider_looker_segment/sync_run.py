"""
One run of a changed-only sync: spool the whole Look, decide, hand the calls to Segment, commit.

1. **Spool** (:meth:`SyncRun.spool`): every message is appended to local disk (its encoding to a flat file;
   its identity hash, traits digest, identity and offset to a scratch SQLite table), so memory stays flat
   whatever the cohort's size.
2. **Decide** (:meth:`SyncRun.decide`): SQLite groups the rows by identity (the first row of an identity in
   the Look's order wins, the others are duplicates), compares them with the previous state and counts the
   identities that are new, changed, unchanged, switched (a userId for a member known by its anonymousId)
   and departed, before anything is sent: the exit guard is decided on these counts.
3. **Send**: :meth:`SyncRun.iter_units` (in the Look's order) then :meth:`SyncRun.iter_exits` give what to
   send; :mod:`~airflow_provider_looker_segment.cohort_sync` makes the messages and marks how far it handed
   them to Segment (:class:`Handed`).
4. **Commit** (:meth:`SyncRun.commit`): an identity's calls of a run are one unit, judged by what Segment
   accepted of it. The state keeps what Segment was told: ``identities`` the members whose call (traits
   digest) Segment has and, in ``pending``, the identities whose entry or exit reached Segment only in part,
   as a *view* (bit :data:`CALL`: its call with the membership trait; bit :data:`EVENT`: its entry event)
   and the generation the transition departed from. The next run sends only what the view lacks (never an
   entry or exit event Segment accepted), under the same messageIds (derived from that generation).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

from airflow_provider_looker_segment import exceptions as errors
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
_READ_CHUNK = 2_000
_MESSAGE_ID_TAIL = 34  # 32 hex digits of the messageId and '"}' end every message the transform encodes
_SCRATCH: Final = """
    CREATE TABLE run.rows (seq INTEGER PRIMARY KEY, ihash INTEGER NOT NULL, digest INTEGER NOT NULL,
                           kind INTEGER NOT NULL, identity BLOB NOT NULL, alt INTEGER, pos INTEGER NOT NULL,
                           len INTEGER NOT NULL);
    CREATE TABLE run.firsts (ihash INTEGER PRIMARY KEY, seq INTEGER NOT NULL, digest INTEGER NOT NULL,
                             kind INTEGER NOT NULL, identity BLOB NOT NULL, alt INTEGER, pos INTEGER NOT NULL,
                             len INTEGER NOT NULL, n INTEGER NOT NULL, verdict INTEGER NOT NULL);
    CREATE TABLE run.switches (ihash INTEGER PRIMARY KEY, alt INTEGER NOT NULL UNIQUE,
                               alt_identity BLOB NOT NULL);
    CREATE TABLE run.failed (ihash INTEGER PRIMARY KEY, bits INTEGER NOT NULL);
    CREATE TABLE run.departed (ihash INTEGER PRIMARY KEY, kind INTEGER NOT NULL, identity BLOB NOT NULL,
                               orphan INTEGER NOT NULL);
    CREATE TABLE run.outcome (ihash INTEGER PRIMARY KEY, view INTEGER NOT NULL, advanced INTEGER NOT NULL,
                              transition INTEGER NOT NULL, generation INTEGER NOT NULL, kind INTEGER NOT NULL,
                              identity BLOB NOT NULL, digest INTEGER, verdict INTEGER);
"""
#: Who gets an exit: previous identities absent from the Look (and not switched), and the orphans of the
#: ``pending`` table: identities neither in the state nor in the Look whose entry reached Segment in part
#: before they left again, or whose exit did not complete.
_FIND_DEPARTED: Final = """
    INSERT INTO run.departed
    SELECT s.ihash, s.kind, s.identity, 0 FROM main.identities s
    WHERE s.ihash NOT IN (SELECT ihash FROM run.firsts) AND s.ihash NOT IN (SELECT alt FROM run.switches)
    UNION ALL
    SELECT p.ihash, p.kind, p.identity, 1 FROM main.pending p
    WHERE p.view != 0 AND p.ihash NOT IN (SELECT ihash FROM run.firsts)
      AND p.ihash NOT IN (SELECT ihash FROM main.identities)
    ORDER BY 1
"""


class Unit(NamedTuple):
    """
    An identity of the Look to send: its call (the row's, as encoded by the transform) and what it needs.

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
    table (see :data:`_ORPHANS`).
    """

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

    units_done: int = -1  # seq of the last unit handed whole
    exits_started: bool = False
    exits_done: int | None = None  # signed ihash of the last exit handed whole
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
        self._spool_file: Any = None
        self._cursors: list[sqlite3.Cursor] = []
        if store.base_path.protocol in ("", "file", "local"):
            store.base_path.mkdir(parents=True, exist_ok=True)
        self._lock = SyncLock(store.lock_path, store.key, store.lock_stale_after, store.lock_renew_interval)
        self._workdir = Path(tempfile.mkdtemp(prefix="lsg-sync-run-", dir=store.tmp_dir))
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
            self._spool_path = self._workdir / "spool.bin"
            self._spool_file = open(self._spool_path, "wb", buffering=1 << 20)
            self._undelivered_path = self._workdir / "undelivered.txt"
            self._undelivered = open(self._undelivered_path, "w", encoding="utf-8")
        except BaseException:
            self.close()
            raise
        self.rows = 0
        self.spool_bytes = 0
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

    def spool(self, messages: Iterable[Mapping[str, Any]], *, tail: bytes | None = None) -> None:
        """
        Append messages to the spool, in the Look's order (call it once, with every message of the Look).

        :param messages: the run's calls; each with an ``encoded`` attribute (the transform's
            :class:`~airflow_provider_looker_segment.batching.EncodedMessage`) or encodable JSON. An
            ``alias`` attribute (the anonymousId derived from the row's email) lets :meth:`decide` find a
            member known by that anonymousId that now has a userId.
        :param tail: the bytes every encoding of the run carries before its messageId's 32 hex digits (the
            transform's timestamp and context): kept once, not per row.
        """
        self._check_usable()
        blake2b, dumps, sort_keys = hashlib.blake2b, orjson.dumps, orjson.OPT_SORT_KEYS
        from_bytes, u64 = int.from_bytes, 1 << 64
        write = self._spool_file.write
        insert = "INSERT INTO run.rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        executemany = self._db.executemany
        tail_start = -(_MESSAGE_ID_TAIL + len(tail)) if tail else 0
        pos, seq, batch = self.spool_bytes, self.rows, []
        user_prefix, anon_prefix, group_prefix = b"userId:", b"anonymousId:", b"groupId:"
        for message in messages:
            if message.get("type") == "group":
                kind, identity_text, prefix = 2, message["groupId"], group_prefix
                alt = None
            else:
                user_id = message.get("userId")
                if user_id:
                    kind, identity_text, prefix = 0, user_id, user_prefix
                    other = message.get("anonymousId") or getattr(message, "alias", None)
                    alt = None
                    if other:
                        value = from_bytes(
                            blake2b(
                                anon_prefix + other.encode("utf-8", "surrogatepass"), digest_size=8
                            ).digest(),
                            "big",
                        )
                        alt = value - u64 if value >> 63 else value
                else:
                    kind, identity_text, prefix, alt = 1, message["anonymousId"], anon_prefix, None
            identity = identity_text.encode("utf-8", "surrogatepass")
            value = from_bytes(blake2b(prefix + identity, digest_size=8).digest(), "big")
            ihash = value - u64 if value >> 63 else value
            values = message["traits"] if "traits" in message else message["properties"]
            value = from_bytes(blake2b(dumps(values, option=sort_keys), digest_size=8).digest(), "big")
            digest = value - u64 if value >> 63 else value
            body = getattr(message, "encoded", None)
            if body is None:
                body = _encode(message)
            if tail_start and body[tail_start:-_MESSAGE_ID_TAIL] == tail:
                body = body[:tail_start] + body[-_MESSAGE_ID_TAIL:]
                length = len(body) * 2 + 1  # odd: the tail was taken out
            else:
                length = len(body) * 2
            write(body)
            batch.append((seq, ihash, digest, kind, identity, alt, pos, length))
            pos += len(body)
            seq += 1
            if len(batch) >= _FLUSH_ROWS:
                executemany(insert, batch)
                batch.clear()
        if batch:
            executemany(insert, batch)
        self._tail = tail or b""
        self.rows, self.spool_bytes = seq, pos

    # -- 2. decide --------------------------------------------------------------------------------------

    def decide(self) -> Decision:
        """Compare the spooled Look with the previous state; nothing is sent or saved."""
        self._check_usable()
        self._spool_file.close()
        db = self._db
        full = 1 if self.full_refresh else 0
        db.execute(
            f"""INSERT INTO run.firsts
            SELECT g.ihash, g.seq, g.digest, g.kind, g.identity, g.alt, g.pos, g.len, g.n,
                   CASE WHEN s.ihash IS NULL THEN {NEW}
                        WHEN s.digest = g.digest AND NOT {full} THEN {UNCHANGED}
                        ELSE {CHANGED} END
            FROM (SELECT ihash, min(seq) AS seq, digest, kind, identity, alt, pos, len, count(*) AS n
                  FROM run.rows GROUP BY ihash) AS g
            LEFT JOIN main.identities AS s ON s.ihash = g.ihash
            ORDER BY g.ihash"""
        )
        db.execute(  # members whose last exit or re-entry reached Segment in part
            f"""UPDATE run.firsts SET verdict = {REJOINED} WHERE verdict IN ({CHANGED}, {UNCHANGED})
            AND ihash IN (SELECT ihash FROM main.pending)"""
        )
        if db.execute("SELECT 1 FROM run.rows WHERE alt IS NOT NULL LIMIT 1").fetchone():
            db.execute(
                f"""INSERT OR IGNORE INTO run.switches
                SELECT f.ihash, f.alt, s.identity FROM run.firsts f JOIN main.identities s ON s.ihash = f.alt
                WHERE f.verdict = {NEW} AND f.alt IS NOT NULL AND s.kind = 1
                  AND f.alt NOT IN (SELECT ihash FROM run.firsts)
                ORDER BY f.seq"""
            )
            db.execute(
                f"UPDATE run.firsts SET verdict = {SWITCHED} WHERE ihash IN (SELECT ihash FROM run.switches)"
            )
        decision = Decision(rows=self.rows, previous=self.previous_count)
        by_verdict = dict(db.execute("SELECT verdict, count(*) FROM run.firsts GROUP BY verdict"))
        decision.identities = sum(by_verdict.values())
        decision.duplicates = self.rows - decision.identities
        decision.new, decision.changed = by_verdict.get(NEW, 0), by_verdict.get(CHANGED, 0)
        decision.unchanged, decision.switched = by_verdict.get(UNCHANGED, 0), by_verdict.get(SWITCHED, 0)
        decision.rejoined = by_verdict.get(REJOINED, 0)
        present = decision.changed + decision.unchanged + decision.rejoined + decision.switched
        decision.departed = self.previous_count - present
        db.execute(_FIND_DEPARTED)
        decision.orphans = db.execute("SELECT count(*) FROM run.departed WHERE orphan").fetchone()[0]
        if decision.duplicates:
            row = db.execute(
                "SELECT kind, identity FROM run.firsts WHERE n > 1 ORDER BY seq LIMIT 1"
            ).fetchone()
            decision.duplicate_example = f"{IDENTITY_KINDS[row[0]]} {_text(row[1])}"
        self.decision = decision
        return decision

    # -- 3. send ----------------------------------------------------------------------------------------

    def iter_units(self) -> Iterator[Unit]:
        """The identities to send (not :data:`UNCHANGED`), in the Look's order, with their call's encoding."""
        self._check_decided()
        cursor = self._db.execute(
            f"""SELECT f.seq, f.verdict, f.ihash, f.kind, f.identity, f.pos, f.len, sw.alt_identity,
                   p.transition, p.generation,
                   coalesce(p.view, CASE WHEN f.verdict = {NEW} THEN 0 ELSE {FULL} END)
            FROM run.firsts f LEFT JOIN run.switches sw ON sw.ihash = f.ihash
            LEFT JOIN main.pending p ON p.ihash = f.ihash
            WHERE f.verdict != {UNCHANGED} ORDER BY f.seq"""
        )
        self._cursors.append(cursor)
        tail, cut = self._tail, -_MESSAGE_ID_TAIL
        u64 = 1 << 64
        with open(self._spool_path, "rb") as spool:
            seek, read = spool.seek, spool.read
            while rows := cursor.fetchmany(_READ_CHUNK):
                for (
                    seq,
                    verdict,
                    ihash,
                    kind,
                    identity,
                    pos,
                    length,
                    alt,
                    transition,
                    generation,
                    view,
                ) in rows:
                    seek(pos)
                    body = read(length >> 1)
                    if length & 1:
                        body = body[:cut] + tail + body[cut:]
                    yield Unit(
                        seq,
                        verdict,
                        ihash % u64,
                        IDENTITY_KINDS[kind],
                        _text(identity),
                        body,
                        None if alt is None else _text(alt),
                        transition,
                        generation,
                        view,
                    )

    def iter_exits(self) -> Iterator[Departure]:
        """
        The departed identities, then the orphans of the ``pending`` table, in identity-hash order.

        :raises SyncStateCorruptError: one is damaged (its identity does not match its hash); a full refresh
            skips it with a warning instead (no exit call; it leaves the state).
        """
        self._check_decided()
        cursor = self._db.execute(
            f"""SELECT d.ihash, d.kind, d.identity, p.transition, p.generation, coalesce(p.view, {FULL}),
                d.orphan
            FROM run.departed d LEFT JOIN main.pending p ON p.ihash = d.ihash ORDER BY d.ihash"""
        )
        self._cursors.append(cursor)
        while rows := cursor.fetchmany(_READ_CHUNK):
            for ihash, kind, identity, transition, generation, view, orphan in rows:
                try:
                    entry = self.store.entry((ihash, 0, kind, identity))
                except errors.SyncStateCorruptError as error:
                    if not self.full_refresh:
                        raise
                    log.warning(
                        "Sync %s: full refresh: %s, no exit is sent for it.", self.store.key, error.reason
                    )
                    continue
                yield Departure(
                    entry.ihash,
                    entry.kind,
                    entry.identity,
                    transition,
                    generation,
                    view,
                    bool(orphan),
                )

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
        for cursor in self._cursors:
            cursor.close()
        self._undelivered.close()
        self._committed = True  # whatever happens next, the local copy has moved on: no second try
        db, generation = self._db, self.previous_generation
        if not self._load_undelivered(handed):  # a failed message of unknown identity: nothing advances
            handed = Handed()
        done = handed.units_done
        exits_done = handed.exits_done if handed.exits_started else None
        if handed.all_done:
            done, exits_done = 1 << 62, (1 << 63) - 1
        # The units handed: their new view (without entry events, the event bit follows the call: there is
        # no journey to tell), and whether the call (the digest) went through.
        new_call = f"(CASE WHEN coalesce(fl.bits, 0) & {CALL} = 0 THEN {CALL} ELSE old.view & {CALL} END)"
        new_event = (
            f"(CASE WHEN coalesce(fl.bits, 0) & {EVENT} = 0 THEN {EVENT} ELSE old.view & {EVENT} END)"
            if entered_event
            else f"({new_call} * {EVENT})"
        )
        db.execute(
            f"""INSERT INTO run.outcome
            SELECT f.ihash, {new_call} | {new_event}, coalesce(fl.bits, 0) & {CALL} = 0, {ENTER},
                   CASE WHEN p.transition = {ENTER} THEN p.generation ELSE {generation} END,
                   f.kind, f.identity, f.digest, f.verdict
            FROM run.firsts f LEFT JOIN run.failed fl ON fl.ihash = f.ihash
            LEFT JOIN main.pending p ON p.ihash = f.ihash
            JOIN (SELECT f2.ihash,
                         coalesce(p2.view, CASE WHEN f2.verdict = {NEW} THEN 0 ELSE {FULL} END) AS view
                  FROM run.firsts f2 LEFT JOIN main.pending p2 ON p2.ihash = f2.ihash) old
                ON old.ihash = f.ihash
            WHERE f.verdict != {UNCHANGED} AND f.seq <= {done}"""
        )
        exits_sent = membership_trait or exited_event
        if exits_done is not None and exits_sent and not keep_departed:
            told_exit = "coalesce(fl.bits, 0) & {bit} = 0 THEN 0 ELSE old & {bit} END"
            db.execute(
                f"""INSERT INTO run.outcome
                SELECT d.ihash,
                       (CASE WHEN {0 if membership_trait else 1} OR {told_exit.format(bit=CALL)})
                       | (CASE WHEN {0 if exited_event else 1} OR {told_exit.format(bit=EVENT)}),
                       0, {EXIT}, CASE WHEN p.transition = {EXIT} THEN p.generation ELSE {generation} END,
                       d.kind, d.identity, NULL, NULL
                FROM (SELECT d.*, coalesce(p.view, CASE WHEN d.orphan THEN 0 ELSE {FULL} END) AS old
                      FROM run.departed d LEFT JOIN main.pending p ON p.ihash = d.ihash) d
                LEFT JOIN run.failed fl ON fl.ihash = d.ihash LEFT JOIN main.pending p ON p.ihash = d.ihash
                WHERE d.ihash <= {exits_done}"""
            )
        added = db.execute(f"SELECT count(*) FROM run.outcome WHERE advanced AND verdict = {NEW}").fetchone()[
            0
        ]
        accepted = db.execute(
            """INSERT OR REPLACE INTO main.identities (ihash, digest, kind, identity)
            SELECT ihash, digest, kind, identity FROM run.outcome WHERE advanced ORDER BY ihash"""
        ).rowcount
        changes = accepted
        changes += db.execute(  # a switched member leaves under its anonymousId once its userId call went
            """DELETE FROM main.identities WHERE ihash IN
            (SELECT alt FROM run.switches WHERE ihash IN (SELECT ihash FROM run.outcome WHERE advanced))"""
        ).rowcount
        changes += db.execute(
            """DELETE FROM main.pending WHERE ihash IN
            (SELECT alt FROM run.switches WHERE ihash IN (SELECT ihash FROM run.outcome WHERE advanced))"""
        ).rowcount
        removed = 0
        if not keep_departed and not exits_sent:  # nothing to tell them: they just leave
            removed = db.execute(
                "DELETE FROM main.identities WHERE ihash IN (SELECT ihash FROM run.departed)"
            ).rowcount
            changes += (
                removed
                + db.execute(
                    "DELETE FROM main.pending WHERE ihash IN (SELECT ihash FROM run.departed)"
                ).rowcount
            )
        gone = f"SELECT ihash FROM run.outcome WHERE transition = {EXIT} AND view = 0"
        removed += db.execute(f"DELETE FROM main.identities WHERE ihash IN ({gone})").rowcount
        changes += removed
        entered_view = 0 if entered_event else FULL
        complete = f"""SELECT ihash FROM run.outcome
            WHERE (transition = {ENTER} AND view IN ({FULL}, {entered_view}))
               OR (transition = {EXIT} AND view = 0)"""
        changes += db.execute(f"DELETE FROM main.pending WHERE ihash IN ({complete})").rowcount
        changes += db.execute(
            f"""INSERT OR REPLACE INTO main.pending
            SELECT ihash, transition, generation, view, kind, identity FROM run.outcome
            WHERE (transition = {ENTER} AND view != {FULL} AND (view != 0 OR {1 if entered_event else 0}))
               OR (transition = {EXIT} AND view != 0)"""
        ).rowcount
        changes += db.execute(  # an identity of neither the Look nor the state that Segment was told nothing
            """DELETE FROM main.pending WHERE view = 0 AND ihash NOT IN (SELECT ihash FROM run.firsts)
            AND ihash NOT IN (SELECT ihash FROM main.identities)"""
        ).rowcount
        sent_units = db.execute(f"SELECT count(*) FROM run.firsts WHERE verdict != {UNCHANGED}").fetchone()[0]
        complete_units = db.execute(
            f"SELECT count(*) FROM run.outcome WHERE transition = {ENTER} AND advanced AND view = {FULL}"
        ).fetchone()[0]
        pending = db.execute("SELECT count(*) FROM main.pending").fetchone()[0]
        stayed = 0 if keep_departed else max(self.decision.departed - removed, 0)
        not_advanced = sent_units - complete_units + stayed
        entries = db.execute("SELECT count(*) FROM main.identities").fetchone()[0]
        if not changes:
            db.rollback()
            log.info(
                "Sync %s: nothing changed; the state (generation %s) is kept as it is.",
                self.store.key,
                generation,
            )
            return CommitResult(generation, entries, 0, 0, 0, 0, not_advanced, pending, False)
        result = self._save(entries, added, accepted, removed, not_advanced, pending)
        log.info("Sync %s: state generation %s saved: %s", self.store.key, result.generation, result)
        return result

    def _save(
        self, entries: int, added: int, accepted: int, removed: int, not_advanced: int, pending: int
    ) -> CommitResult:
        db = self._db
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
        return CommitResult(
            generation, entries, size, added, accepted - added, removed, not_advanced, pending, True
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
            for resource in (*self._cursors, self._db, self._spool_file, getattr(self, "_undelivered", None)):
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


def _text(identity: bytes) -> str:
    return identity.decode("utf-8", "surrogatepass")


def _encode(message: Mapping[str, Any]) -> bytes:
    """Encode a message that carries no encoding, its messageId last (as the transform writes it)."""
    from airflow_provider_looker_segment.batching import encode_event

    if not isinstance(message.get("messageId"), str):
        raise ValueError(f"a message to spool needs a messageId, not {message.get('messageId')!r}")
    return encode_event(
        {**{k: v for k, v in message.items() if k != "messageId"}, "messageId": message["messageId"]}
    )
