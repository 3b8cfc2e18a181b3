"""
A changed-only sync's store (:class:`CohortStateStore`) and one run of it (:class:`SyncRun`): spool the whole
Look, decide a partition at a time against the state, give what to send; the commit is
:func:`~airflow_provider_looker_segment.sync_commit.commit_run`. How and why: docs/changed-only.md.
"""

from __future__ import annotations

import logging
import marshal
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from airflow.sdk import ObjectStoragePath

from airflow_provider_looker_segment import exceptions as errors
from airflow_provider_looker_segment.cohort_spool import PARTITIONS, Spool, iter_chunks
from airflow_provider_looker_segment.cohort_units import (
    CHANGED,
    FULL,
    NEW,
    REJOINED,
    SWITCHED,
    Decision,
    Departure,
    Unit,
)
from airflow_provider_looker_segment.sync_lock import SyncLock
from airflow_provider_looker_segment.sync_state import (
    IDENTITY_KINDS,
    UNSAFE_KEY_CHARS,
    StateFile,
    state_entry,
)

log = logging.getLogger(__name__)

#: A lock not renewed for this long is considered left behind by a crashed run and is taken over.
DEFAULT_LOCK_STALE_AFTER = timedelta(seconds=60)

_PENDING_COLUMNS: Final = "ihash, transition, generation, view, kind, identity"
_SCRATCH: Final = """
    CREATE TABLE run.switches (ihash INTEGER PRIMARY KEY, alt INTEGER NOT NULL UNIQUE,
                               alt_identity BLOB NOT NULL);
    CREATE TABLE run.eligible (ihash INTEGER PRIMARY KEY);
    CREATE TABLE run.failed (ihash INTEGER PRIMARY KEY, bits INTEGER NOT NULL);
"""


class CohortStateStore:
    """
    The state of one sync, stored as ``<base_path>/<key>.state`` next to its lock ``<key>.lock``.

    :param base_path: the folder of the state files: an :class:`~airflow.sdk.ObjectStoragePath` or a URL
        (``file:///...``, ``s3://...``, any fsspec URL Airflow knows); a local folder is created if missing.
    :param key: the sync's key, from :func:`~airflow_provider_looker_segment.sync_state.sync_key`.
    :param legacy_keys: keys that earlier versions gave this sync (``sync_state.legacy_sync_keys``).
    :param lock_stale_after: a lock not renewed for this long (timedelta or seconds) is taken over (default
        :data:`DEFAULT_LOCK_STALE_AFTER`). Hosts sharing the state must have synchronised clocks (well within
        this).
    :param lock_renew_interval: how often a run renews its lock (default: a third of ``lock_stale_after``).
    :param tmp_dir: local folder for the run's copies of the state and its spool (default: the system's
        temporary folder).
    :param save_retry_delays: seconds waited before each new attempt of a failed save (default
        ``sync_state.DEFAULT_SAVE_RETRY_DELAYS``).
    :param sleep: how to wait between save attempts.
    """

    def __init__(
        self,
        base_path: ObjectStoragePath | str,
        key: str,
        *,
        legacy_keys: Sequence[str] = (),
        lock_stale_after: timedelta | float | None = None,
        lock_renew_interval: timedelta | float | None = None,
        tmp_dir: str | None = None,
        save_retry_delays: Sequence[float] | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        if not key or UNSAFE_KEY_CHARS.search(key):
            raise ValueError(f"a sync key must be non-empty and filename-safe, not {key!r}")
        self.base_path = ObjectStoragePath(base_path) if isinstance(base_path, str) else base_path
        self.key, self.tmp_dir = key, tmp_dir
        delta = lambda value: value if isinstance(value, timedelta) else timedelta(seconds=value)  # noqa: E731
        self.lock_stale_after = delta(
            DEFAULT_LOCK_STALE_AFTER if lock_stale_after is None else lock_stale_after
        )
        renew = self.lock_stale_after / 3 if lock_renew_interval is None else lock_renew_interval
        self.lock_renew_interval = delta(renew)
        if not timedelta(0) < self.lock_renew_interval < self.lock_stale_after:
            raise ValueError("lock_renew_interval must be positive and shorter than lock_stale_after")
        self.file = StateFile(
            self.base_path, key, legacy_keys=legacy_keys, save_retry_delays=save_retry_delays, sleep=sleep
        )
        self.state_path = self.file.path
        self.lock_path = self.base_path / f"{key}.lock"

    def begin(self, run_id: str, *, full_refresh: bool = False) -> SyncRun:
        """
        Lock the sync and load its previous state; use the returned run as a context manager.

        :param run_id: identifies the task instance (not the try): a lock left by the same ``run_id`` (an
            earlier, crashed try) is taken over.
        :param full_refresh: send every identity whatever the state says (docs/changed-only.md, "Full
            refresh"); an unreadable previous state is then kept beside it and ignored.
        :raises SyncStateLockedError: another run of this sync holds the lock.
        :raises SyncStateCorruptError: the previous state is unreadable (and ``full_refresh`` is false).
        """
        return SyncRun(self, run_id, full_refresh)


class SyncRun:
    """
    One run of a sync, from :meth:`CohortStateStore.begin`: spool, decide, send, commit.

    Use it as a context manager: leaving it releases the lock and removes local files; without a commit
    (:func:`~airflow_provider_looker_segment.sync_commit.commit_run`) the stored state is left as it was.
    """

    def __init__(self, store: CohortStateStore, run_id: str, full_refresh: bool) -> None:
        self.store, self.run_id, self.full_refresh = store, run_id, full_refresh
        self._closed = self._committed = False
        self.db: sqlite3.Connection | None = None
        self._spool: Spool | None = None
        self._planned: list[tuple[int, int]] = []  # the hash ranges of the plans, in order
        self.switched_alts: set[int] = set()
        if store.base_path.protocol in ("", "file", "local"):
            store.base_path.mkdir(parents=True, exist_ok=True)
        self._lock = SyncLock(store.lock_path, store.key, store.lock_stale_after, store.lock_renew_interval)
        self.workdir = Path(tempfile.mkdtemp(prefix="lsg-sync-run-", dir=store.tmp_dir))
        started = time.monotonic()
        try:
            self._lock.acquire(run_id)
            store.file.remove_leftovers()  # safe: we hold the lock
            self.unsaved = store.file.read_unsaved_marker()
            self.db, self.token = store.file.open(self.workdir, full_refresh=full_refresh)
            self.db.execute("PRAGMA cache_size = -2000")  # 2 MB a database: a larger cache was no faster
            self._meta = dict(self.db.execute("SELECT key, value FROM meta"))
            self.previous_count = self.db.execute("SELECT count(*) FROM identities").fetchone()[0]
            self.db.execute("ATTACH DATABASE ? AS run", (str(self.workdir / "run.db"),))
            self.db.execute("PRAGMA run.journal_mode = OFF")
            self.db.executescript(_SCRATCH)
            self._spool = Spool(self.workdir)
            self.undelivered_path = self.workdir / "undelivered.txt"
            self._undelivered = open(self.undelivered_path, "w", encoding="utf-8")
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
        return bool(self.db.execute("SELECT EXISTS (SELECT 1 FROM identities WHERE kind = 1)").fetchone()[0])

    @property
    def rows(self) -> int:
        """Rows spooled."""
        return self._spool.rows if self._spool is not None else 0

    @property
    def spool_bytes(self) -> int:
        """Bytes of encodings spooled."""
        return self._spool.bytes if self._spool is not None else 0

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
        spool, db = self._spool, self.db
        spool.close_writing()
        decision = Decision(rows=spool.rows, previous=self.previous_count)
        first_duplicate: tuple[int, int, bytes] | None = None
        candidates: list[tuple[int, int, int, bytes]] = []  # (seq, claimer, alt, alt identity)
        full = self.full_refresh
        state_scan = _Scan(db.execute("SELECT ihash, digest, kind FROM identities ORDER BY ihash"))
        pending_scan = _Scan(db.execute(f"SELECT {_PENDING_COLUMNS} FROM pending ORDER BY ihash"))
        expected = self.previous_count // PARTITIONS + 1
        slices = (piece for part in range(PARTITIONS) for piece in spool.slices(part, expected))
        for lo, hi, rows, claims in slices:
            state_rows, pending_rows = state_scan.take(hi), pending_scan.take(hi)
            if not (state_rows or pending_rows or rows or claims):
                continue
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
                with open(self.workdir / f"plan-{len(self._planned)}", "wb") as plan:
                    plan.write(marshal.dumps((units, departed)))
                self._planned.append((lo, hi))
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
            identities.update(self.db.execute(query, [ihash for (ihash,) in chunk]))
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
            if not self.db.execute("SELECT 1 FROM run.eligible WHERE ihash = ?", (claimer,)).fetchone():
                continue
            if any(claimer == switch[0] for switch in switches):
                continue
            taken_alts.add(alt)
            switches.append((claimer, alt, alt_identity))
        self.db.executemany("INSERT INTO run.switches VALUES (?, ?, ?)", switches)
        decision.switched = len(switches)
        decision.new -= len(switches)
        decision.departed -= len(switches)
        self.switched_alts = taken_alts

    # -- 3. send ----------------------------------------------------------------------------------------

    def plans(self) -> Iterator[tuple[tuple[int, int], list[tuple], list[tuple]]]:
        """The slices with something to send, in hash order: ((lo, hi), units, departed)."""
        for index, bounds in enumerate(self._planned):
            with open(self.workdir / f"plan-{index}", "rb") as plan:
                units, departed = marshal.loads(plan.read())
            yield bounds, units, departed

    def iter_units(self) -> Iterator[Unit]:
        """The identities to send (not :data:`UNCHANGED`) by partition, in the Look's order within one."""
        self._check_decided()
        ordinal, u64, switches = 0, 1 << 64, bool(self.switched_alts)
        for _part, units, _departed in self.plans():
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
                    found = self.db.execute(
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
        for _part, _units, departed in self.plans():
            for ihash, kind, identity, transition, generation, view, orphan in departed:
                if ihash in self.switched_alts:
                    continue
                try:
                    entry = state_entry((ihash, 0, kind, identity), str(self.store.state_path))
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

    def end_sending(self) -> None:
        """Before the commit: no second commit (the local copy moved on)."""
        self._check_decided()
        self._undelivered.close()
        self._committed = True

    def close(self) -> None:
        """Release the lock and remove local files (idempotent; never leaves the lock behind)."""
        if self._closed:
            return
        self._closed = True
        try:
            for resource in (self._spool, self.db, getattr(self, "_undelivered", None)):
                if resource is not None:
                    try:
                        resource.close()
                    except Exception:
                        log.debug("Could not close %r", resource, exc_info=True)
            shutil.rmtree(self.workdir, ignore_errors=True)
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


class _Scan:
    """Rows in identity-hash order (the hash first), taken a range at a time."""

    def __init__(self, rows: Iterable[tuple]) -> None:
        self._rows = iter(rows)
        self._next = next(self._rows, None)

    def take(self, hi: int) -> list[tuple]:
        """The rows up to the hash ``hi`` (after those already taken)."""
        taken: list[tuple] = []
        while self._next is not None and self._next[0] <= hi:
            taken.append(self._next)
            self._next = next(self._rows, None)
        return taken


def _text(identity: bytes) -> str:
    return identity.decode("utf-8", "surrogatepass")
