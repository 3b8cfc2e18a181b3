"""
The state file of a changed-only sync (``sync_mode="changed"``): identity hashes and keys, the SQLite layout
and its check, download and publish with retries. The layout and its guarantees: docs/changed-only.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Final, NamedTuple
from urllib.parse import urlsplit

import orjson
from airflow.sdk import ObjectStoragePath

from airflow_provider_looker_segment import exceptions as errors

log = logging.getLogger(__name__)

#: Identity kinds: the keys of the Segment message fields they fill (stored as their index).
USER_ID_KEY: Final = "userId"
ANONYMOUS_ID_KEY: Final = "anonymousId"
GROUP_ID_KEY: Final = "groupId"
IDENTITY_KINDS: Final = (USER_ID_KEY, ANONYMOUS_ID_KEY, GROUP_ID_KEY)
#: Seconds waited before each new attempt to save the state (so 4 attempts in about 15 s).
DEFAULT_SAVE_RETRY_DELAYS = (1.0, 4.0, 10.0)

_APPLICATION_ID: Final = b"LSG\x01"  # "LSG" and the format version
_SCHEMA: Final = f"""
    PRAGMA application_id = {int.from_bytes(_APPLICATION_ID, "big")};
    CREATE TABLE identities (ihash INTEGER PRIMARY KEY, digest INTEGER NOT NULL, kind INTEGER NOT NULL,
                             identity BLOB NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
"""
_PENDING: Final = """
    CREATE TABLE IF NOT EXISTS pending (ihash INTEGER PRIMARY KEY, transition INTEGER NOT NULL,
        generation INTEGER NOT NULL, view INTEGER NOT NULL, kind INTEGER NOT NULL, identity BLOB NOT NULL);
"""
#: The columns each table must have, as (name, declared type, primary key position), in order.
_LAYOUT: Final = {
    "identities": (("ihash", "INTEGER", 1), ("digest", "INTEGER", 0), ("kind", "INTEGER", 0),
                   ("identity", "BLOB", 0)),
    "meta": (("key", "TEXT", 1), ("value", "", 0)),
    "pending": (("ihash", "INTEGER", 1), ("transition", "INTEGER", 0), ("generation", "INTEGER", 0),
                ("view", "INTEGER", 0), ("kind", "INTEGER", 0), ("identity", "BLOB", 0)),
}  # fmt: skip
_U64: Final = 1 << 64
_HEX16: Final = re.compile(r"[0-9a-fA-F]{16}")
UNSAFE_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9._-]+")
_KIND_PREFIXES: Final = {kind: kind.encode("ascii") + b":" for kind in IDENTITY_KINDS}


def check_kind(kind: str) -> int:
    """Return the stored code of an identity kind."""
    if kind not in IDENTITY_KINDS:
        raise ValueError(f"identity kind must be one of {IDENTITY_KINDS}, not {kind!r}")
    return IDENTITY_KINDS.index(kind)


def encode_identity(identity: str) -> bytes:
    """An identity as stored (UTF-8, lone surrogates kept)."""
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"an identity must be a non-empty string, not {identity!r}")
    return identity.encode("utf-8", "surrogatepass")


def _blake2b_64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def identity_hash(kind: str, identity: str) -> int:
    """Return the 64-bit hash of an identity: blake2b (8 bytes, big-endian) of ``"<kind>:<identity>"``."""
    check_kind(kind)
    return _blake2b_64(_KIND_PREFIXES[kind] + encode_identity(identity))


def format_identity_hash(ihash: int) -> str:
    """Return an identity hash as 16 lower-case hex digits, the form put at the start of a messageId."""
    return f"{ihash:016x}"


def identity_hash_from_message_id(message_id: str) -> int | None:
    """Return the identity hash at the start of a messageId, or ``None`` if it does not start with one."""
    if not isinstance(message_id, str) or not _HEX16.match(message_id):
        return None
    return int(message_id[:16], 16)


def signed(value: int) -> int:
    """The signed 64-bit integer with the bits of an unsigned one (SQLite integers are signed)."""
    return value - _U64 if value >> 63 else value


def _safe(value: str, length: int) -> str:
    return UNSAFE_KEY_CHARS.sub("_", value).strip("._-")[:length] or "_"


def sync_key(
    look_id: str | None,
    segment_host: str,
    write_key: str,
    *,
    call: str = "identify",
    state_key: str | None = None,
    event: str | None = None,
    query_id: str | None = None,
) -> str:
    """
    Return the filename-safe key of the state of a sync, e.g. ``look-42-api.segment.io-1f0c9a3e5b7d2c4a``.

    What goes into it (never a value rendered per run, never the write key itself): docs/changed-only.md,
    "The sync and its key". ``segment_host`` may be a base URL.

    :param state_key: the user's own key (the operator's ``state_key``) instead of the Look and call type:
        ``vip-2026`` gives ``vip-2026-api.segment.io-<hash>``; it must be a filename-safe text.
    :param event: only for the key versions up to 0.x, which hashed the track event name in
        (:func:`legacy_sync_keys`).
    :param query_id: a query's sync instead of a Look's: ``query-123-api.segment.io-<hash>`` (a query
        given by slug is keyed by the id Looker resolved it to), never the key of a Look of the same id.
    """
    host = segment_host.strip()
    host = (urlsplit(host).netloc or host if "://" in host else host).strip("/").lower()
    if state_key is not None:
        parts = ["state_key", state_key, host, write_key]
        label = _safe(state_key, 64)
    elif query_id is not None:
        parts = ["query", str(query_id), host, write_key, call]
        label = f"query-{_safe(str(query_id), 32)}" + ("" if call == "identify" else f"-{_safe(call, 16)}")
    else:
        parts = [str(look_id), host, write_key]
        if call != "identify":
            parts += [call, event or ""]
        label = f"look-{_safe(str(look_id), 32)}" + ("" if call == "identify" else f"-{_safe(call, 16)}")
    digest = hashlib.blake2b(
        "\n".join(parts).encode("utf-8", "surrogatepass"), digest_size=8, person=b"lsg-sync-key"
    ).hexdigest()
    return f"{label}-{_safe(host, 48)}-{digest}"


def legacy_sync_keys(
    look_id: str, segment_host: str, write_key: str, *, call: str = "identify", event: str | None = None
) -> tuple[str, ...]:
    """
    The keys earlier versions gave the same sync, whose state a run adopts when its own key has none: a track
    sync's key used to hash the event name in (so a templated event started a new state on every run).
    """
    if call != "track" or not event:
        return ()
    return (sync_key(look_id, segment_host, write_key, call=call, event=event),)


def check_state_key(state_key: str) -> str:
    """Refuse a ``state_key`` that is not a short, filename-safe text (so it names the file as given)."""
    if not state_key or len(state_key) > 64 or UNSAFE_KEY_CHARS.search(state_key) or state_key[0] in "._-":
        raise errors.InvalidParameterError(
            f"state_key {state_key!r} cannot name a state file: use 1 to 64 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit (e.g. 'vip-cohort-2026')"
        )
    return state_key


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(timezone.utc)


class StateEntry(NamedTuple):
    """One identity of a state: identity hash, traits digest, kind and identity."""

    ihash: int
    digest: int
    kind: str
    identity: str


def state_entry(row: tuple[int, int, int, bytes], path: str) -> StateEntry:
    """
    Return a stored row as an entry, checking that its identity matches its hash.

    :param path: the state file's path, for the error.
    :raises SyncStateCorruptError: the row's identity does not match its hash.
    """
    ihash, digest, kind, identity = row[0] % _U64, row[1] % _U64, row[2], row[3]
    with suppress(IndexError, TypeError, AttributeError, ValueError):
        entry = StateEntry(ihash, digest, IDENTITY_KINDS[kind], identity.decode("utf-8", "surrogatepass"))
        if identity_hash(entry.kind, entry.identity) == ihash:
            return entry
    raise errors.SyncStateCorruptError(path, f"its identity {ihash:016x} is damaged")


def state_token(head: bytes | None) -> str:
    """Identify a stored version from its first 100 bytes: its state id, or ``absent`` / ``unreadable``."""
    if head is None:
        return "absent"
    ours = head[:16] == b"SQLite format 3\x00" and head[68:72] == _APPLICATION_ID
    return head[60:64].hex() if ours else "unreadable"


def connect(path: Path) -> sqlite3.Connection:
    """Open a local copy of a state: a scratch file (a failed run discards it), hence no journal nor sync."""
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    return db


def _copy(source: IO[bytes], target: IO[bytes]) -> None:
    shutil.copyfileobj(source, target, 1 << 20)


def layout_problem(db: sqlite3.Connection) -> str | None:
    """What is wrong with the tables of a state file of our application id, or ``None``."""
    for table, expected in _LAYOUT.items():
        columns = tuple(
            (name, kind.upper(), pk) for _, name, kind, _, _, pk in db.execute(f"PRAGMA table_info({table})")
        )
        if not columns:
            if table == "pending":  # files of versions before it
                continue
            return f"it has no table {table!r}"
        if columns != expected:
            have = ", ".join(f"{name} {kind or 'ANY'}" for name, kind, _ in columns)
            want = ", ".join(f"{name} {kind or 'ANY'}" for name, kind, _ in expected)
            return f"its table {table!r} has the columns ({have}) instead of ({want})"
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('sync_key', 'generation')"))
    if not isinstance(meta.get("generation", 0), int):
        return f"its generation {meta['generation']!r} is not a number"
    return None


class StateFile:
    """
    The stored state of one sync, ``<base_path>/<key>.state``: download, check, publish.

    :param base_path: the folder of the state files.
    :param key: the sync's key.
    :param legacy_keys: keys of earlier versions for the same sync, adopted when ``key`` has no state yet.
    :param save_retry_delays: seconds waited before each new attempt of a failed save.
    :param sleep: how to wait between attempts.
    """

    def __init__(
        self,
        base_path: ObjectStoragePath,
        key: str,
        *,
        legacy_keys: Sequence[str] = (),
        save_retry_delays: Sequence[float] | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.base_path, self.key, self.legacy_keys = base_path, key, tuple(legacy_keys)
        delays = DEFAULT_SAVE_RETRY_DELAYS if save_retry_delays is None else save_retry_delays
        self.save_retry_delays, self.sleep = tuple(delays), sleep
        self.path = base_path / f"{key}.state"
        self.unsaved_marker = base_path / f"{key}.state.unsaved"

    def open(self, workdir: Path, *, full_refresh: bool) -> tuple[sqlite3.Connection, str]:
        """
        Download the state (or the state of a legacy key) to ``workdir`` and open it; return the connection
        and the stored version's token (what :meth:`publish` expects to replace).

        :raises SyncStateCorruptError: the file is unreadable and ``full_refresh`` is false. With
            ``full_refresh``, a copy of it is kept beside it and the run starts from an empty state.
        """
        local = workdir / "state.db"
        head, source = self._download(self.path, local), self.path
        token = state_token(head)
        if head is None:
            for legacy in self.legacy_keys:
                legacy_path = self.base_path / f"{legacy}.state"
                if (head := self._download(legacy_path, local)) is not None:
                    log.info(
                        "Sync %s: adopting the state %s, written by an earlier version under another key; "
                        "from now on the state is saved as %s (the old file is no longer used).",
                        self.key,
                        legacy_path,
                        self.path,
                    )
                    source = legacy_path
                    break
        if head is not None:
            try:
                db = self._check(local, head, source)
                db.executescript(_PENDING)
                return db, token
            except errors.SyncStateCorruptError as error:
                if not full_refresh:
                    raise
                kept = self._keep_unreadable(source, local)
                log.warning(
                    "Sync %s: full refresh without the previous state, which is unreadable (%s); it was kept "
                    "as %s. The identities that left the cohort cannot be computed, so no exit is sent for "
                    "them.",
                    self.key,
                    error.reason,
                    kept,
                )
                local.unlink(missing_ok=True)
        db = connect(local)
        db.executescript(_SCHEMA + _PENDING)
        return db, token

    @staticmethod
    def _download(path: ObjectStoragePath, local: Path) -> bytes | None:
        """Copy a stored file to ``local``; return its first 100 bytes, or ``None`` when there is none."""
        try:
            with path.open("rb") as stored, open(local, "wb") as copy:
                _copy(stored, copy)
        except (FileNotFoundError, IsADirectoryError):
            local.unlink(missing_ok=True)
            return None
        with open(local, "rb") as copy:
            return copy.read(100)

    def _check(self, local: Path, head: bytes, source: ObjectStoragePath) -> sqlite3.Connection:
        """Open the local copy of a stored state, if it is a sound state of this sync in this format."""
        owners = (self.key, *self.legacy_keys)
        if head.startswith(b"LSG-SYNC-STATE"):
            problem = "it has the format of an earlier, unreleased version of this provider"
        elif state_token(head) == "unreadable":
            problem = "it is not a sync state file of this format version (unexpected first bytes)"
        else:
            db = None
            try:
                db = connect(local)
                problem = db.execute("PRAGMA quick_check").fetchone()[0]
                if problem == "ok":
                    problem = layout_problem(db) or "ok"
                if problem == "ok":
                    owner = (
                        db.execute("SELECT value FROM meta WHERE key = 'sync_key'").fetchone() or [None]
                    )[0]
                    if owner in owners:
                        return db
                    problem = f"it belongs to sync {owner}"
                else:
                    problem = problem if problem.startswith("it ") else f"it is damaged ({problem})"
            except sqlite3.DatabaseError as error:
                problem = f"it is damaged (sqlite: {error})"
            if db is not None:
                db.close()
        raise errors.SyncStateCorruptError(str(source), problem)

    def _keep_unreadable(self, source: ObjectStoragePath, local: Path) -> str:
        """Keep a copy of an unreadable state beside it, ``<name>.unreadable-<UTC time>``; return its path."""
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        kept = self.base_path / f"{source.name}.unreadable-{stamp}"
        try:
            with open(local, "rb") as copy, kept.open("wb") as target:
                _copy(copy, target)
        except Exception as error:  # keeping it is a courtesy: the full refresh goes on
            log.warning("Could not keep a copy of the unreadable state %s: %s", source, error)
            return "(not kept: the copy failed)"
        return str(kept)

    def publish(self, local: Path, expected_token: str) -> None:
        """
        Upload the new state next to the current one, check for a concurrent writer, then replace it; a
        failed upload is tried again after each of :attr:`save_retry_delays`.

        :raises SyncStateConflictError: the stored state changed since this run loaded it.
        :raises OSError: the last attempt failed too.
        """
        for attempt, delay in enumerate((*self.save_retry_delays, None), start=1):
            try:
                self._publish_once(local, expected_token)
                return
            except errors.SyncStateConflictError:
                raise
            except Exception as error:
                if delay is None:
                    raise
                log.warning(
                    "Sync %s: saving the state to %s failed (attempt %d: %s); trying again in %g s.",
                    self.key,
                    self.path,
                    attempt,
                    error,
                    delay,
                )
                self.sleep(delay)

    def _publish_once(self, local: Path, expected_token: str) -> None:
        tmp = self.base_path / f"{self.key}.state.tmp-{uuid.uuid4().hex}"
        try:
            with open(local, "rb") as source, tmp.open("wb") as target:
                _copy(source, target)
            current = "absent"
            with suppress(FileNotFoundError):
                current = state_token(self.path.fs.cat_file(self.path.path, start=0, end=100))
            if current != expected_token:
                raise errors.SyncStateConflictError(
                    f"The state of sync {self.key} ({self.path}) changed since this run loaded it "
                    f"({expected_token} -> {current}): another run wrote it concurrently. This run's state "
                    "was not saved, so the next run sends its changes again. Make sure only one run of this "
                    "sync is active at a time (max_active_runs=1)."
                )
            tmp.fs.mv(tmp.path, self.path.path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except Exception:
                log.warning("Could not remove %s; it is removed by the next run.", tmp, exc_info=True)
            raise

    def remove_leftovers(self) -> None:
        """Remove the temporary uploads of interrupted runs (call it holding the lock)."""
        fs = self.base_path.fs
        try:
            names = fs.ls(self.base_path.path, detail=False)
        except FileNotFoundError:
            return
        for name in names:
            if name.rstrip("/").rsplit("/", 1)[-1].startswith(f"{self.key}.state.tmp-"):
                log.info("Removing %s, left behind by an interrupted run.", name)
                fs.rm_file(name)

    def read_unsaved_marker(self) -> dict[str, Any] | None:
        """What a run that could not save its state left behind (:meth:`write_unsaved_marker`), if any."""
        try:
            return dict(orjson.loads(self.unsaved_marker.read_bytes()))
        except FileNotFoundError:
            return None
        except Exception:
            return {"run_id": "?"}

    def write_unsaved_marker(self, details: Mapping[str, Any]) -> bool:
        """Tell the next run that this one delivered calls without saving the state (best effort)."""
        try:
            self.unsaved_marker.write_bytes(orjson.dumps(dict(details)))
            return True
        except Exception:
            return False

    def remove_unsaved_marker(self) -> None:
        """Remove the marker once a state was saved (best effort)."""
        with suppress(Exception):
            self.unsaved_marker.unlink(missing_ok=True)
