"""
Per-sync state for ``sync_mode="changed"``: which identities a Look last delivered, with which traits digest.

A sync (:func:`sync_key`) keeps one SQLite file, ``<base>/<sync key>.state``: table ``identities(ihash
INTEGER PRIMARY KEY, digest INTEGER, kind INTEGER, identity BLOB)``, a row per identity Segment accepted (its
:func:`identity_hash` and last :func:`traits_digest`, unsigned 64-bit values stored as the signed integers
of the same bits; kind 0 userId, 1 anonymousId, 2 groupId; the identity in UTF-8, to send a last call when it
leaves; never traits) and table ``meta(key, value)``: sync_key, generation, state_id, run_id, written_at. Its
header holds the application id ``LSG\\x01`` (format version 1) and, as user version, the state id.

A run (:meth:`CohortStateStore.begin`) locks the sync and works on a local copy in bounded memory: hashes
and digests in two ``array('q')`` searched by bisection (16 bytes per identity), a presence byte per
identity, new and changed entries appended to a scratch table on disk. Its commit applies the accepted
events, uploads a compact copy to ``<key>.state.tmp-<uuid>`` and moves it onto ``<key>.state`` unless the
stored state id changed meanwhile. The lock ``<key>.lock`` (created exclusively where the filesystem can) is
a lease renewed by a thread; one not renewed for ``lock_stale_after``, or whose holder's process is gone
(same host), is taken over.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
import shutil
import sqlite3
import tempfile
import uuid
from array import array
from collections.abc import Collection, Iterator, Mapping
from contextlib import closing, suppress
from datetime import datetime, timedelta, timezone
from itertools import compress, islice
from operator import not_
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, NamedTuple
from urllib.parse import urlsplit

import orjson
from airflow.sdk import ObjectStoragePath

from airflow_provider_looker_segment import exceptions as errors
from airflow_provider_looker_segment.sync_lock import SyncLock

log = logging.getLogger(__name__)

#: Identity kinds, named like the Segment message fields they fill (stored as their index).
USER_ID: Final = "userId"
ANONYMOUS_ID: Final = "anonymousId"
GROUP_ID: Final = "groupId"
IDENTITY_KINDS: Final = (USER_ID, ANONYMOUS_ID, GROUP_ID)
#: What :meth:`SyncRun.classify` returns.
NEW: Final = "new"
CHANGED: Final = "changed"
UNCHANGED: Final = "unchanged"
Classification = Literal["new", "changed", "unchanged"]
#: A lock not renewed for this long is considered left behind by a crashed run and is taken over.
DEFAULT_LOCK_STALE_AFTER: Final = timedelta(seconds=60)

_APPLICATION_ID: Final = b"LSG\x01"  # "LSG" and the format version
_SCHEMA: Final = f"""
    PRAGMA application_id = {int.from_bytes(_APPLICATION_ID, "big")};
    CREATE TABLE identities (ihash INTEGER PRIMARY KEY, digest INTEGER NOT NULL, kind INTEGER NOT NULL,
                             identity BLOB NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
"""
_SCRATCH: Final = """
    CREATE TABLE run.fresh (ihash INTEGER NOT NULL, digest, kind, identity);  -- in arrival order
    CREATE TABLE run.failed (ihash INTEGER PRIMARY KEY);
"""
_U64: Final = 1 << 64
_FLUSH_ROWS = 10_000  # new and changed entries appended to the scratch table at once
_HEX16: Final = re.compile(r"[0-9a-fA-F]{16}")
_UNSAFE_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9._-]+")


def _check_kind(kind: str) -> int:
    if kind not in IDENTITY_KINDS:
        raise ValueError(f"identity kind must be one of {IDENTITY_KINDS}, not {kind!r}")
    return IDENTITY_KINDS.index(kind)


def _encode_identity(identity: str) -> bytes:
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"an identity must be a non-empty string, not {identity!r}")
    return identity.encode("utf-8", "surrogatepass")


def _blake2b_64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def identity_hash(kind: str, identity: str) -> int:
    """Return the 64-bit hash of an identity: blake2b (8 bytes, big-endian) of ``"<kind>:<identity>"``."""
    _check_kind(kind)
    return _blake2b_64(kind.encode("ascii") + b":" + _encode_identity(identity))


def format_identity_hash(ihash: int) -> str:
    """Return an identity hash as 16 lower-case hex digits, the form put at the start of a messageId."""
    return f"{ihash:016x}"


def identity_hash_from_message_id(message_id: str) -> int | None:
    """Return the identity hash at the start of a messageId, or ``None`` if it does not start with one."""
    if not isinstance(message_id, str) or not _HEX16.match(message_id):
        return None
    return int(message_id[:16], 16)


def traits_digest(traits: Mapping[str, Any]) -> int:
    """
    Return a 64-bit digest of the traits (any JSON-serialisable mapping of what is sent): blake2b (8 bytes) of
    ``orjson.dumps(traits, option=OPT_SORT_KEYS)``, independent of key order, stable across processes; values
    of different JSON types differ (``1`` is not ``1.0``).
    """
    return _blake2b_64(orjson.dumps(traits, option=orjson.OPT_SORT_KEYS))


def sync_key(
    look_id: str, segment_host: str, write_key: str, *, call: str = "identify", event: str | None = None
) -> str:
    """
    Return the filename-safe key of the sync of a Look to a Segment source, e.g.
    ``look-42-api.segment.io-1f0c9a3e5b7d2c4a``: the Look id, the host (``segment_host`` may be a base URL)
    and a hash of both and of the write key, which never appears. Group and track syncs of the same Look
    have keys of their own (``look-42-group-...``, ``look-42-track-...``, the event name in the hash): a Look
    synced as identify and as group calls keeps two states, one of users, one of groups.
    """
    host = segment_host.strip()
    host = (urlsplit(host).netloc or host if "://" in host else host).strip("/").lower()
    parts = [str(look_id), host, write_key]
    if call != "identify":
        parts += [call, event or ""]
    data = "\n".join(parts).encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8, person=b"lsg-sync-key").hexdigest()
    safe = lambda value, length: _UNSAFE_KEY_CHARS.sub("_", value).strip("._-")[:length] or "_"  # noqa: E731
    kind = "" if call == "identify" else f"{safe(call, 16)}-"
    return f"look-{safe(str(look_id), 32)}-{kind}{safe(host, 48)}-{digest}"


def _signed(value: int) -> int:
    """The signed 64-bit integer with the bits of an unsigned one (SQLite integers are signed)."""
    return value - _U64 if value >> 63 else value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------------- store


class StateEntry(NamedTuple):
    """One identity of a state: identity hash, traits digest, kind and identity."""

    ihash: int
    digest: int
    kind: str
    identity: str


class ExitIdentity(NamedTuple):
    """A previous identity absent from this run: send it an identify with the membership trait false."""

    kind: str
    identity: str
    ihash: int


class StateHeader(NamedTuple):
    """What a stored state says about itself: its ``meta`` table and its number of identities."""

    sync_key: str
    generation: int
    state_id: str
    run_id: str
    written_at: str
    count: int


class CommitResult(NamedTuple):
    """
    What a commit wrote: the new state's ``generation``, identities (``entries``) and file ``size``; events
    accepted for new identities (``added``), changed ones (``updated``) and exits (``removed``); events not
    accepted (``not_advanced``: sent again next run).
    """

    generation: int
    entries: int
    size: int
    added: int
    updated: int
    removed: int
    not_advanced: int


def _state_token(head: bytes | None) -> str:
    """Identify a stored version from its first 100 bytes: its state id, or ``absent`` / ``unreadable``."""
    if head is None:
        return "absent"
    ours = head[:16] == b"SQLite format 3\x00" and head[68:72] == _APPLICATION_ID
    return head[60:64].hex() if ours else "unreadable"


def _connect(path: Path) -> sqlite3.Connection:
    """Open a local copy of a state: a scratch file (a failed run discards it), hence no journal nor sync."""
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    return db


def _copy(source: IO[bytes], target: IO[bytes]) -> None:
    shutil.copyfileobj(source, target, 1 << 20)


class CohortStateStore:
    """
    The state of one sync, stored as ``<base_path>/<key>.state`` next to its lock ``<key>.lock``.

    :param base_path: the folder of the state files: an :class:`~airflow.sdk.ObjectStoragePath` or a URL
        (``file:///...``, ``s3://...``, any fsspec URL Airflow knows); a local folder is created if missing.
    :param key: the sync's key, from :func:`sync_key`.
    :param lock_stale_after: a lock not renewed for this long (timedelta or seconds) is taken over. Hosts
        sharing the state must have synchronised clocks (well within this).
    :param lock_renew_interval: how often a run renews its lock (default: a third of ``lock_stale_after``).
    :param tmp_dir: local folder for the run's copies of the state (default: the system's temporary folder).
    """

    def __init__(
        self,
        base_path: ObjectStoragePath | str,
        key: str,
        *,
        lock_stale_after: timedelta | float = DEFAULT_LOCK_STALE_AFTER,
        lock_renew_interval: timedelta | float | None = None,
        tmp_dir: str | None = None,
    ) -> None:
        if not key or _UNSAFE_KEY_CHARS.search(key):
            raise ValueError(f"a sync key must be non-empty and filename-safe, not {key!r}")
        self.base_path = ObjectStoragePath(base_path) if isinstance(base_path, str) else base_path
        self.key, self.tmp_dir = key, tmp_dir
        delta = lambda value: value if isinstance(value, timedelta) else timedelta(seconds=value)  # noqa: E731
        self.lock_stale_after = delta(lock_stale_after)
        renew = self.lock_stale_after / 3 if lock_renew_interval is None else lock_renew_interval
        self.lock_renew_interval = delta(renew)
        if not timedelta(0) < self.lock_renew_interval < self.lock_stale_after:
            raise ValueError("lock_renew_interval must be positive and shorter than lock_stale_after")
        self.state_path = self.base_path / f"{key}.state"
        self.lock_path = self.base_path / f"{key}.lock"

    def begin(self, run_id: str, *, full_refresh: bool = False) -> SyncRun:
        """
        Lock the sync and load its previous state; use the returned run as a context manager.

        :param run_id: identifies the task instance (not the try): a lock left by the same ``run_id`` (an
            earlier, crashed try) is taken over.
        :param full_refresh: classify every identity as sent (:data:`NEW` or :data:`CHANGED`, whatever its
            digest); exits are still listed against the previous state. An unreadable previous state is then
            ignored with a warning (that is how a damaged file is recovered): the run is a first run.
        :raises SyncStateLockedError: another run of this sync holds the lock.
        :raises SyncStateCorruptError: the previous state is unreadable (and ``full_refresh`` is false).
        """
        return SyncRun(self, run_id, full_refresh)

    def read_header(self) -> StateHeader | None:
        """Return what the stored state says about itself, or ``None`` if there is none (without locking)."""
        with tempfile.TemporaryDirectory(prefix="lsg-sync-state-", dir=self.tmp_dir) as workdir:
            db, token = self._open(Path(workdir), full_refresh=False)
            with closing(db):
                meta = dict(db.execute("SELECT key, value FROM meta"))
                count = db.execute("SELECT count(*) FROM identities").fetchone()[0]
        return None if token == "absent" else StateHeader(**meta, count=count)

    def iter_entries(self) -> Iterator[StateEntry]:
        """Stream the stored state's entries (without locking; for inspection and tests)."""
        with tempfile.TemporaryDirectory(prefix="lsg-sync-state-", dir=self.tmp_dir) as workdir:
            db, _token = self._open(Path(workdir), full_refresh=False)
            with closing(db):
                yield from map(self._entry, db.execute("SELECT * FROM identities"))

    def _open(self, workdir: Path, full_refresh: bool) -> tuple[sqlite3.Connection, str]:
        """Download the state to a local copy and open it; return it and the stored version's token."""
        local, head = workdir / "state.db", None
        with suppress(FileNotFoundError):
            with self.state_path.open("rb") as stored, open(local, "wb") as copy:
                _copy(stored, copy)
            with open(local, "rb") as copy:
                head = copy.read(100)
        if head is not None:
            try:
                return self._check(local, head), _state_token(head)
            except errors.SyncStateCorruptError as error:
                if not full_refresh:
                    raise
                log.warning(
                    "Sync %s: full refresh without the previous state, which is unreadable (%s): the "
                    "identities that left the cohort cannot be computed, so no exit is sent for them.",
                    self.key,
                    error.reason,
                )
                local.unlink()
        db = _connect(local)
        db.executescript(_SCHEMA)
        return db, _state_token(head)

    def _check(self, local: Path, head: bytes) -> sqlite3.Connection:
        """Open the local copy of the stored state, if it is a sound state of this sync in this format."""
        db, owner = None, None
        if head.startswith(b"LSG-SYNC-STATE"):
            problem = "it has the format of an earlier, unreleased version of this provider"
        elif _state_token(head) == "unreadable":
            problem = "it is not a sync state file of this format version (unexpected first bytes)"
        else:
            try:
                db = _connect(local)
                problem = db.execute("PRAGMA quick_check").fetchone()[0]
                owner = (db.execute("SELECT value FROM meta WHERE key = 'sync_key'").fetchone() or [None])[0]
            except sqlite3.DatabaseError as error:
                problem = f"sqlite: {error}"
            if db is not None and (problem, owner) == ("ok", self.key):
                return db
            if db is not None:
                db.close()
            problem = f"it belongs to sync {owner}" if problem == "ok" else f"it is damaged ({problem})"
        raise errors.SyncStateCorruptError(str(self.state_path), problem)

    def _entry(self, row: tuple[int, int, int, bytes]) -> StateEntry:
        """Return a stored row as an entry, checking that its identity matches its hash."""
        ihash, digest, kind, identity = row[0] % _U64, row[1] % _U64, row[2], row[3]
        with suppress(IndexError, TypeError, AttributeError, ValueError):
            entry = StateEntry(ihash, digest, IDENTITY_KINDS[kind], identity.decode("utf-8", "surrogatepass"))
            if identity_hash(entry.kind, entry.identity) == ihash:
                return entry
        raise errors.SyncStateCorruptError(str(self.state_path), f"its identity {ihash:016x} is damaged")

    def _publish(self, local: Path, expected_token: str) -> None:
        """Upload the new state next to the current one, check for a concurrent writer, then replace it."""
        tmp = self.base_path / f"{self.key}.state.tmp-{uuid.uuid4().hex}"
        try:
            with open(local, "rb") as source, tmp.open("wb") as target:
                _copy(source, target)
            current = "absent"
            with suppress(FileNotFoundError):
                current = _state_token(self.state_path.fs.cat_file(self.state_path.path, start=0, end=100))
            if current != expected_token:
                raise errors.SyncStateConflictError(
                    f"The state of sync {self.key} ({self.state_path}) changed since this run loaded it "
                    f"({expected_token} -> {current}): another run wrote it concurrently. This run's state "
                    "was not saved, so the next run sends its changes again. Make sure only one run of this "
                    "sync is active at a time (max_active_runs=1)."
                )
            tmp.fs.mv(tmp.path, self.state_path.path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except Exception:
                log.warning("Could not remove %s; it is removed by the next run.", tmp, exc_info=True)
            raise


# --------------------------------------------------------------------------------------------- run


class SyncRun:
    """
    One run of a sync, from :meth:`CohortStateStore.begin`: classify identities, list exits, commit.

    Use it as a context manager: leaving it releases the lock and removes local temporary files; without a
    :meth:`commit` the stored state is left as it was.
    """

    def __init__(self, store: CohortStateStore, run_id: str, full_refresh: bool) -> None:
        self.store, self.run_id, self.full_refresh = store, run_id, full_refresh
        self._closed = self._committed = False
        self._db: sqlite3.Connection | None = None
        if store.base_path.protocol in ("", "file", "local"):
            store.base_path.mkdir(parents=True, exist_ok=True)
        self._lock = SyncLock(store.lock_path, store.key, store.lock_stale_after, store.lock_renew_interval)
        self._lock.acquire(run_id)
        self._workdir = Path(tempfile.mkdtemp(prefix="lsg-sync-state-", dir=store.tmp_dir))
        try:
            for name in store.base_path.fs.ls(store.base_path.path, detail=False):  # safe: we hold the lock
                if name.rstrip("/").rsplit("/", 1)[-1].startswith(f"{store.key}.state.tmp-"):
                    log.info("Removing %s, left behind by an interrupted run.", name)
                    store.base_path.fs.rm_file(name)
            self._db, self._token = store._open(self._workdir, full_refresh)
            self._meta = dict(self._db.execute("SELECT key, value FROM meta"))
            self._hashes, self._digests = array("q"), array("q")  # ascending ihash, for bisect
            for ihash, digest in self._db.execute("SELECT ihash, digest FROM identities"):
                self._hashes.append(ihash)
                self._digests.append(digest)
            self._db.execute("ATTACH DATABASE ? AS run", (str(self._workdir / "run.db"),))
            self._db.execute("PRAGMA run.journal_mode = OFF")
            self._db.executescript(_SCRATCH)
        except BaseException:
            self.close()
            raise
        self._presence = bytearray(len(self._hashes))  # 1: classified in this run
        self._pending: list[tuple[int, int, int, bytes]] = []  # new and changed entries, for run.fresh
        #: identities classified new, changed and unchanged so far.
        self.new_count = self.changed_count = self.unchanged_count = 0
        refresh = ", full refresh" if full_refresh else ""
        log.info(
            "Sync %s: %s previous identities (generation %s)%s.",
            store.key,
            len(self._hashes),
            self.previous_generation,
            refresh,
        )

    def __enter__(self) -> SyncRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def previous_count(self) -> int:
        """Identities in the previous state (0 on a first run or when a full refresh could not read it)."""
        return len(self._hashes)

    @property
    def previous_generation(self) -> int:
        """Generation of the previous state (0 if none was loaded)."""
        return int(self._meta.get("generation", 0))

    @property
    def exit_count(self) -> int:
        """Previous identities not classified in this run (so far): they left the cohort."""
        return self._presence.count(0)

    @property
    def exit_ratio(self) -> float:
        """:attr:`exit_count` / :attr:`previous_count` (0.0 without a previous state)."""
        return self.exit_count / self.previous_count if self.previous_count else 0.0

    def classify(self, kind: str, identity: str, digest: int, *, ihash: int | None = None) -> Classification:
        """
        Record an identity as present in this run and say whether its event must be sent.

        :param kind: :data:`USER_ID`, :data:`ANONYMOUS_ID` or :data:`GROUP_ID` (group calls).
        :param identity: the userId, anonymousId or groupId.
        :param digest: the digest of what is sent (see :func:`traits_digest`), 0 <= digest < 2**64.
        :param ihash: ``identity_hash(kind, identity)`` if already computed (e.g. for the messageId).
        :return: :data:`NEW` (not in the previous state), :data:`CHANGED` (digest differs, or any digest in
            a full refresh) or :data:`UNCHANGED` (nothing to send). An identity given twice is compared with
            the previous state each time; the state keeps the digest of its last occurrence sent (last wins).
        """
        self._check_usable()
        kind_code = _check_kind(kind)
        if not 0 <= digest < _U64:
            raise ValueError(f"a digest must be an unsigned 64-bit integer, not {digest!r}")
        key, value = _signed(identity_hash(kind, identity) if ihash is None else ihash), _signed(digest)
        index = bisect.bisect_left(self._hashes, key)
        if index < len(self._hashes) and self._hashes[index] == key:
            self._presence[index] = 1
            if self._digests[index] == value and not self.full_refresh:
                self.unchanged_count += 1
                return UNCHANGED
            self.changed_count += 1
            result: Classification = CHANGED
        else:
            self.new_count += 1
            result = NEW
        self._pending.append((key, value, kind_code, _encode_identity(identity)))
        if len(self._pending) >= _FLUSH_ROWS:
            self._flush()
        return result

    def iter_exits(self) -> Iterator[ExitIdentity]:
        """
        Stream the previous identities not classified in this run (call it once all are classified).

        :raises SyncStateCorruptError: one is damaged (its identity does not match its hash); a full refresh
            skips it with a warning instead (no exit call; it leaves the state).
        """
        self._check_usable()
        departed = compress(self._hashes, map(not_, self._presence))
        while chunk := list(islice(departed, 500)):  # a query per chunk: no statement stays open
            query = f"SELECT * FROM identities WHERE ihash IN ({','.join('?' * len(chunk))})"
            for row in self._db.execute(query, chunk).fetchall():
                try:
                    entry = self.store._entry(row)
                except errors.SyncStateCorruptError as error:
                    if not self.full_refresh:
                        raise
                    log.warning(
                        "Sync %s: full refresh: %s, no exit is sent for it.", self.store.key, error.reason
                    )
                    continue
                yield ExitIdentity(entry.kind, entry.identity, entry.ihash)

    def commit(self, not_delivered: Collection[int] | None, *, exits_sent: bool = True) -> CommitResult:
        """
        Write the next state: it advances only for events Segment accepted.

        A new or changed identity whose event was not accepted keeps its previous digest (or stays absent), so
        it is sent again by the next run; an exited identity whose exit was accepted leaves the state, one
        whose exit was not accepted stays (and exits again next run).

        :param not_delivered: identity hashes of the events (new, changed or exit) rejected or failed, or
            ``None`` when it is unknown which (e.g. the failure list was capped): nothing sent advances.
        :param exits_sent: ``False`` when the departed identities must stay in the state (a possibly
            truncated Look, or the exit guard tripped); ``True`` lets each leave once its exit call is
            delivered, or at once when no exit call is made (no membership trait).
        :raises SyncStateConflictError: the stored state changed since this run loaded it.
        """
        self._check_usable()
        self._flush()
        self._committed = True  # whatever happens next, the local copy has moved on: no second try
        db, added, accepted, removed = self._db, 0, 0, 0
        if not_delivered is not None:
            failed = {_signed(ihash) for ihash in not_delivered}
            db.executemany("INSERT OR IGNORE INTO run.failed VALUES (?)", ((ihash,) for ihash in failed))
            rows = "FROM run.fresh WHERE ihash NOT IN (SELECT ihash FROM run.failed)"  # the accepted ones
            new = f"SELECT count(*) {rows} AND ihash NOT IN (SELECT ihash FROM identities)"
            added = db.execute(new).fetchone()[0]
            # In hash order (a sequential write); of an identity given twice, the last one wins.
            insert = f"INSERT OR REPLACE INTO identities SELECT * {rows} ORDER BY ihash, rowid"
            accepted = db.execute(insert).rowcount
            if exits_sent:
                departed = compress(self._hashes, map(not_, self._presence))
                delete = "DELETE FROM identities WHERE ihash = ?"
                removed = db.executemany(delete, ((h,) for h in departed if h not in failed)).rowcount
        state_id = uuid.uuid4().int & 0x7FFF_FFFF
        meta = {"sync_key": self.store.key, "generation": self.previous_generation + 1, "run_id": self.run_id}
        meta |= {"state_id": f"{state_id:08x}", "written_at": _utcnow().isoformat(timespec="seconds")}
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
        db.execute(f"PRAGMA user_version = {state_id}")
        db.commit()
        next_state = self._workdir / "next.state"
        db.execute("VACUUM main INTO ?", (str(next_state),))  # compact, in hash order
        self.store._publish(next_state, self._token)
        entries, size = db.execute("SELECT count(*) FROM identities").fetchone()[0], next_state.stat().st_size
        not_advanced = self.new_count + self.changed_count - accepted + self.exit_count - removed
        result = CommitResult(
            meta["generation"], entries, size, added, accepted - added, removed, not_advanced
        )
        log.info("Sync %s: state generation %s saved: %s", self.store.key, result.generation, result)
        return result

    def close(self) -> None:
        """Release the lock and remove local temporary files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._db is not None:
            self._db.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._lock.release()
        if not self._committed:
            log.info(
                "Sync %s: run %s ended without a commit, the state is unchanged.", self.store.key, self.run_id
            )

    def _flush(self) -> None:
        """Append the pending new and changed entries to the scratch table."""
        self._db.executemany("INSERT INTO run.fresh VALUES (?, ?, ?, ?)", self._pending)
        self._pending.clear()

    def _check_usable(self) -> None:
        if self._closed or self._committed:
            raise errors.SyncStateError(
                f"run {self.run_id} of sync {self.store.key} is already committed or closed"
            )
