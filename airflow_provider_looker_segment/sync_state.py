"""
Per-sync state for ``sync_mode="changed"``: which identities were delivered, with which traits.

A *sync* is one Look delivered to one Segment destination (see :func:`sync_key`). Its state is one file,
``<base>/<sync key>.state``, holding for every identity Segment accepted: a 64-bit identity hash, a 64-bit
digest of the traits last delivered and the identity itself (so that an identity that left the cohort can be
sent a last ``identify``). Traits are never stored.

Run protocol::

    store = CohortStateStore(ObjectStoragePath("s3://bucket/looker-segment-state/"), key)
    with store.begin(run_id) as run:  # locks the sync (renewed in the background), loads the previous state
        for kind, identity, traits in rows:
            ihash = identity_hash(kind, identity)  # goes at the start of the messageId
            if run.classify(kind, identity, traits_digest(traits), ihash=ihash) != UNCHANGED:
                ...  # send identify
        for exit in run.iter_exits():  # previous identities not seen in this run
            ...  # send identify with the membership trait false
        run.commit(not_delivered=failed_identity_hashes)  # state advances only for accepted events

File format, version 1 (all integers little-endian)::

    line 1   b"LSG-SYNC-STATE 1\\n"                      magic and format version
    line 2   header: one line of JSON + b"\\n"           sync_key, generation, state_id, count,
                                                         identities_size, checksum, run_id, written_at
    body     identity hashes   count x uint64            strictly increasing
             traits digests    count x uint64            same order
             identities        zlib stream (identities_size bytes) of count records, same order:
                               kind uint8 (1 = userId, 2 = anonymousId), length uint32, UTF-8 bytes
    checksum = blake2b (16 bytes, hex) of the whole body.

The identity hash is blake2b (8 bytes, big-endian integer) of ``"<kind>:<identity>"`` in UTF-8, e.g.
``"userId:42"``; :func:`format_identity_hash` gives its 16 hex digits. About 16 bytes of hashes plus the
compressed identity per entry: 1 M identities take 20 to 40 MB depending on how long and random the
identities are.

Memory stays bounded whatever the cohort's size: the previous hashes and digests are loaded into two
``array('Q')`` (16 bytes per identity) searched by bisection, presence is one byte per previous identity,
new and changed entries are spooled to a local temporary file in sorted runs, and identities are streamed
back (from a local copy of the previous file) only to list exits and to write the next state.

Safety: the state is written to ``<key>.state.tmp-<uuid>`` then moved onto ``<key>.state`` (readers only
read the final name, so they never see a half-written file); a run holds the lock ``<key>.lock`` (created
exclusively where the filesystem supports it) as a lease: a background thread rewrites its ``renewed_at``
every ``lock_renew_interval``; a lock not renewed for ``lock_stale_after``, or whose holder's process is gone
(same host), is taken over. As a second guard, a commit fails if the stored state changed since the run
loaded it.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import uuid
import zlib
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from itertools import islice
from operator import itemgetter, lt
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, NamedTuple
from urllib.parse import urlsplit

import orjson
from airflow.sdk import ObjectStoragePath

from airflow_provider_looker_segment.exceptions import LookerSegmentError

log = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS_ID",
    "CHANGED",
    "DEFAULT_LOCK_STALE_AFTER",
    "IDENTITY_KINDS",
    "NEW",
    "UNCHANGED",
    "USER_ID",
    "CohortStateStore",
    "CommitResult",
    "ExitIdentity",
    "LockOwner",
    "StateEntry",
    "StateHeader",
    "SyncRun",
    "SyncStateConflictError",
    "SyncStateCorruptError",
    "SyncStateError",
    "SyncStateLockedError",
    "format_identity_hash",
    "identity_hash",
    "identity_hash_from_message_id",
    "sync_key",
    "traits_digest",
]

#: Identity kinds, named like the Segment message fields they fill.
USER_ID: Final = "userId"
ANONYMOUS_ID: Final = "anonymousId"
IDENTITY_KINDS: Final = (USER_ID, ANONYMOUS_ID)

#: What :meth:`SyncRun.classify` returns.
NEW: Final = "new"
CHANGED: Final = "changed"
UNCHANGED: Final = "unchanged"
Classification = Literal["new", "changed", "unchanged"]

#: A lock not renewed for this long is considered left behind by a crashed run and is taken over.
DEFAULT_LOCK_STALE_AFTER: Final = timedelta(seconds=60)

FORMAT_MAGIC: Final = b"LSG-SYNC-STATE"
FORMAT_VERSION: Final = 1

_KIND_CODES: Final = {USER_ID: 1, ANONYMOUS_ID: 2}
_KIND_NAMES: Final = {code: name for name, code in _KIND_CODES.items()}
_U64_LIMIT: Final = 1 << 64
_HEAD_MAX: Final = 64 * 1024
_IO_CHUNK: Final = 1 << 20
_LITTLE_ENDIAN: Final = sys.byteorder == "little"
_IDENTITY_RECORD: Final = struct.Struct("<BI")  # kind, length; then the UTF-8 identity
_SPOOL_RECORD: Final = struct.Struct("<QQBI")  # identity hash, digest, kind, length; then the identity
#: Entries sorted in memory before a sorted run is written to the spool (about 200 bytes each).
_SPOOL_RUN_RECORDS = 32_768
_HEX16: Final = re.compile(r"[0-9a-fA-F]{16}")
_UNSAFE_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9._-]+")
_STATE_ABSENT: Final = "absent"
_STATE_UNREADABLE: Final = "unreadable"

# Presence of a previous identity in this run (one byte per previous identity).
_UNSEEN: Final = 0
_SEEN_UNCHANGED: Final = 1
_SEEN_CHANGED: Final = 2


# --------------------------------------------------------------------------------------------- errors


class SyncStateError(LookerSegmentError):
    """The state of a ``sync_mode="changed"`` sync cannot be used or saved."""


class SyncStateCorruptError(SyncStateError):
    """
    A state file is unreadable, damaged or of an unknown format version.

    :param path: the state file (URI).
    :param reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"The sync state file {path} is unreadable: {reason}. Delete it, or run the task once with "
            "full_refresh=True to rebuild it (every identity in the Look is then sent again)."
        )
        self.path = path
        self.reason = reason


class SyncStateLockedError(SyncStateError):
    """
    Another run of the same sync holds its lock.

    :param sync_key: the sync.
    :param lock_path: the lock file (URI).
    :param owner: who holds the lock, if it could be read.
    :param stale_after: how long a lock may go without renewal before it is taken over.
    """

    def __init__(
        self, sync_key: str, lock_path: str, owner: LockOwner | None, stale_after: timedelta
    ) -> None:
        held_by = owner.describe() if owner else "another run (its lock could not be read)"
        super().__init__(
            f"Sync {sync_key} is locked by {held_by}: another run of this sync appears to be in progress, "
            "and two concurrent runs would corrupt its state. Wait for it to finish (and set "
            f"max_active_runs=1). The lock is taken over automatically once not renewed for "
            f"{stale_after.total_seconds():g} seconds (at once if its holder's process is gone, on the same "
            f"host); if no such run is active, you may delete {lock_path}."
        )
        self.sync_key = sync_key
        self.lock_path = lock_path
        self.owner = owner


class SyncStateConflictError(SyncStateError):
    """The stored state changed since this run loaded it (another run wrote it concurrently)."""


# --------------------------------------------------------------------------------------------- hashing


def _check_kind(kind: str) -> int:
    try:
        return _KIND_CODES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"identity kind must be one of {IDENTITY_KINDS}, not {kind!r}") from None


def _encode_identity(identity: str) -> bytes:
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"an identity must be a non-empty string, not {identity!r}")
    return identity.encode("utf-8", "surrogatepass")


def identity_hash(kind: str, identity: str) -> int:
    """
    Return the 64-bit hash that stands for an identity in the state and in messageIds.

    blake2b (8 bytes, read as a big-endian integer) of ``"<kind>:<identity>"`` in UTF-8, stable across runs,
    processes and machines.

    :param kind: :data:`USER_ID` or :data:`ANONYMOUS_ID`.
    :param identity: the userId or anonymousId.
    """
    _check_kind(kind)
    data = kind.encode("ascii") + b":" + _encode_identity(identity)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def format_identity_hash(ihash: int) -> str:
    """
    Return an identity hash as 16 lower-case hex digits, the form put at the start of a messageId.

    :param ihash: a value returned by :func:`identity_hash`.
    """
    return f"{ihash:016x}"


def identity_hash_from_message_id(message_id: str) -> int | None:
    """
    Return the identity hash at the start of a messageId, or ``None`` if it does not start with one.

    :param message_id: a messageId whose first 16 characters are :func:`format_identity_hash`'s output.
    """
    if not isinstance(message_id, str) or not _HEX16.match(message_id):
        return None
    return int(message_id[:16], 16)


def traits_digest(traits: Mapping[str, Any]) -> int:
    """
    Return a 64-bit digest of the traits (or of any JSON-serialisable mapping covering what is sent).

    blake2b (8 bytes) of ``orjson.dumps(traits, option=OPT_SORT_KEYS)``: independent of key order and
    stable across runs and processes. Values of different JSON types differ (``1`` is not ``1.0``).

    :param traits: the traits of the identify call, e.g. with the membership trait included.
    """
    data = orjson.dumps(traits, option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _normalise_host(segment_host: str) -> str:
    host = segment_host.strip()
    if "://" in host:
        host = urlsplit(host).netloc or host
    return host.strip("/").lower()


def _filename_part(value: str, max_length: int) -> str:
    return _UNSAFE_KEY_CHARS.sub("_", value).strip("._-")[:max_length] or "_"


def sync_key(look_id: str, segment_host: str, write_key: str) -> str:
    """
    Return the key (a short, filename-safe string) of the sync of a Look to a Segment destination.

    The key shows the Look id and the host, and ends with a hash of the Look id, the host and the write key;
    the write key itself never appears. E.g. ``look-42-api.segment.io-1f0c9a3e5b7d2c4a``.

    :param look_id: the Look.
    :param segment_host: the Segment Tracking API host or base URL (``api.segment.io``).
    :param write_key: the source's write key.
    """
    host = _normalise_host(segment_host)
    data = "\n".join((str(look_id), host, write_key)).encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8, person=b"lsg-sync-key").hexdigest()
    return f"look-{_filename_part(str(look_id), 32)}-{_filename_part(host, 48)}-{digest}"


# --------------------------------------------------------------------------------------------- records


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


class _Truncated(Exception):
    """A record stream ended in the middle of a record."""


def _refill(buf: bytes, pos: int, need: int, chunks: Iterator[bytes]) -> bytes:
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < need:
        chunk = next(chunks, None)
        if chunk is None:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _iter_records(chunks: Iterable[bytes], head: struct.Struct) -> Iterator[tuple[Any, ...]]:
    """
    Yield each record as ``(*head fields without the length, payload)``.

    :param chunks: the byte stream, in chunks of any size.
    :param head: the record head; its last field is the payload length.
    :raises _Truncated: the stream ends inside a record.
    """
    chunks = iter(chunks)
    size, unpack = head.size, head.unpack_from
    buf, pos = b"", 0
    while True:
        if len(buf) - pos < size:
            buf, pos = _refill(buf, pos, size, chunks), 0
            if not buf:
                return
            if len(buf) < size:
                raise _Truncated
        fields = unpack(buf, pos)
        pos += size
        end = pos + fields[-1]
        if end > len(buf):
            buf, pos = _refill(buf, pos, fields[-1], chunks), 0
            end = fields[-1]
            if end > len(buf):
                raise _Truncated
        yield (*fields[:-1], buf[pos:end])
        pos = end


def _file_chunks(raw: IO[bytes], start: int, end: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """Yield ``raw[start:end]`` in chunks; seeks before every read, so several readers can share ``raw``."""
    while start < end:
        raw.seek(start)
        chunk = raw.read(min(size, end - start))
        if not chunk:
            raise _Truncated
        start += len(chunk)
        yield chunk


def _inflate_chunks(raw: IO[bytes], compressed_size: int) -> Iterator[bytes]:
    """
    Yield the decompressed content of a zlib stream of ``compressed_size`` bytes read from ``raw``.

    :raises _Truncated: the stream is shorter than announced or incomplete.
    :raises zlib.error: the stream is damaged or followed by extra bytes.
    """
    inflater = zlib.decompressobj()
    remaining = compressed_size
    while remaining:
        data = raw.read(min(_IO_CHUNK, remaining))
        if not data:
            raise _Truncated
        remaining -= len(data)
        while data:
            out = inflater.decompress(data, _IO_CHUNK)
            data = inflater.unconsumed_tail
            if out:
                yield out
    if not inflater.eof or inflater.unused_data:
        raise zlib.error("the identities' zlib stream is incomplete or followed by extra bytes")


class _U64Writer:
    """Append unsigned 64-bit integers to a local file, little-endian, through a small buffer."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # closed by close()
        self._buffer = array("Q")

    def append(self, value: int) -> None:
        self._buffer.append(value)
        if len(self._buffer) >= 65_536:
            self._flush()

    def _flush(self) -> None:
        if not _LITTLE_ENDIAN:
            self._buffer.byteswap()
        self._buffer.tofile(self._file)
        self._buffer = array("Q")

    def close(self) -> None:
        self._flush()
        self._file.close()


class _IdentityWriter:
    """Write identity records to a local file as one zlib stream."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # closed by close()
        self._compressor = zlib.compressobj(6)
        self._pending: list[bytes] = []
        self._pending_size = 0

    def append(self, kind_code: int, identity: bytes) -> None:
        self._pending.append(_IDENTITY_RECORD.pack(kind_code, len(identity)))
        self._pending.append(identity)
        self._pending_size += _IDENTITY_RECORD.size + len(identity)
        if self._pending_size >= 256 * 1024:
            self._flush()

    def _flush(self) -> None:
        self._file.write(self._compressor.compress(b"".join(self._pending)))
        self._pending, self._pending_size = [], 0

    def close(self) -> None:
        self._flush()
        self._file.write(self._compressor.flush())
        self._file.close()


# --------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class StateHeader:
    """
    The header line of a state file.

    :param sync_key: the sync the file belongs to.
    :param generation: 1 for the first state written, then +1 at every commit.
    :param state_id: a random id of this version of the file (the optimistic concurrency check compares it).
    :param count: number of identities.
    :param identities_size: size in bytes of the compressed identities section.
    :param checksum: blake2b (16 bytes, hex) of the body.
    :param run_id: the run that wrote the file.
    :param written_at: when the file was written (UTC, ISO 8601).
    """

    sync_key: str
    generation: int
    state_id: str
    count: int
    identities_size: int
    checksum: str
    run_id: str
    written_at: str

    @property
    def body_size(self) -> int:
        """Size in bytes of the body (hashes, digests and compressed identities)."""
        return 16 * self.count + self.identities_size

    def to_bytes(self) -> bytes:
        """Return the magic line and the header line, as written at the start of the file."""
        fields = {
            "format": "airflow-provider-looker-segment sync state",
            "version": FORMAT_VERSION,
            "sync_key": self.sync_key,
            "generation": self.generation,
            "state_id": self.state_id,
            "count": self.count,
            "identities_size": self.identities_size,
            "checksum": self.checksum,
            "run_id": self.run_id,
            "written_at": self.written_at,
            "identity_hash": "blake2b-64 of '<kind>:<identity>', big-endian",
            "traits_digest": "blake2b-64, computed by the caller",
            "layout": "u64le ihash[count] | u64le digest[count] | zlib((u8 kind, u32le len, utf8)[count])",
        }
        return b"%s %d\n%s\n" % (FORMAT_MAGIC, FORMAT_VERSION, orjson.dumps(fields))

    @classmethod
    def parse(cls, head: bytes, path: str) -> tuple[StateHeader, int]:
        """
        Parse the magic and header lines at the start of a state file.

        :param head: the first bytes of the file (at least both lines).
        :param path: the file, for error messages.
        :return: the header and the offset of the body in the file.
        :raises SyncStateCorruptError: not a state file, unknown version or damaged header.
        """
        first_end = head.find(b"\n", 0, 64)
        magic, _, version = head[: max(first_end, 0)].partition(b" ")
        if first_end < 0 or magic != FORMAT_MAGIC:
            raise SyncStateCorruptError(path, "it is not a sync state file (unexpected first bytes)")
        if version != str(FORMAT_VERSION).encode():
            raise SyncStateCorruptError(
                path,
                f"its format version {version.decode('ascii', 'replace')!r} is not supported by this "
                f"provider version (it reads version {FORMAT_VERSION})",
            )
        second_end = head.find(b"\n", first_end + 1)
        if second_end < 0:
            raise SyncStateCorruptError(path, "its header line is truncated")
        try:
            header = cls._from_fields(orjson.loads(head[first_end + 1 : second_end]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise SyncStateCorruptError(path, f"its header is damaged ({error})") from None
        return header, second_end + 1

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> StateHeader:
        header = cls(
            sync_key=str(fields["sync_key"]),
            generation=int(fields["generation"]),
            state_id=str(fields["state_id"]),
            count=int(fields["count"]),
            identities_size=int(fields["identities_size"]),
            checksum=str(fields["checksum"]),
            run_id=str(fields["run_id"]),
            written_at=str(fields["written_at"]),
        )
        if header.count < 0 or header.identities_size < 0 or header.generation < 0:
            raise ValueError("negative count, size or generation")
        return header


# --------------------------------------------------------------------------------------------- lock


@dataclass(frozen=True)
class LockOwner:
    """
    The content of a lock file: which run holds the sync.

    :param run_id: the run holding the lock.
    :param token: a random token identifying this acquisition.
    :param host: the machine of the run.
    :param pid: the process of the run.
    :param acquired_at: when the lock was taken (UTC), if known.
    :param renewed_at: when its holder last renewed it (UTC); lock files of older versions have none, then
        :attr:`last_renewed` is ``acquired_at`` (or the file's modification time).
    :param pid_space: the holder's pid namespace (:func:`_pid_space`), if known: its pid is only comparable
        with ours within the same one.
    """

    run_id: str
    token: str
    host: str
    pid: int | None
    acquired_at: datetime | None
    renewed_at: datetime | None = None
    pid_space: str | None = None

    @property
    def last_renewed(self) -> datetime | None:
        """When the lock was last known alive: ``renewed_at``, else ``acquired_at``."""
        return self.renewed_at or self.acquired_at

    def to_bytes(self) -> bytes:
        """Return the lock file's content (JSON)."""
        return orjson.dumps(
            {
                "run_id": self.run_id,
                "token": self.token,
                "host": self.host,
                "pid": self.pid,
                "acquired_at": self.acquired_at.isoformat() if self.acquired_at else None,
                "renewed_at": self.renewed_at.isoformat() if self.renewed_at else None,
                "pid_space": self.pid_space,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, fallback_time: datetime | None) -> LockOwner:
        """
        Read a lock file's content; an unreadable content gives an owner named ``<unreadable lock file>``.

        :param data: the lock file's content.
        :param fallback_time: the file's modification time, used when the content does not say.
        """
        try:
            fields = orjson.loads(data)
            acquired, renewed = fields.get("acquired_at"), fields.get("renewed_at")
            pid, pid_space = fields.get("pid"), fields.get("pid_space")
            return cls(
                run_id=str(fields["run_id"]),
                token=str(fields["token"]),
                host=str(fields.get("host") or "?"),
                pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                acquired_at=datetime.fromisoformat(acquired) if acquired else fallback_time,
                renewed_at=datetime.fromisoformat(renewed) if renewed else None,
                pid_space=str(pid_space) if pid_space else None,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return cls("<unreadable lock file>", "", "?", None, fallback_time)

    def age(self, now: datetime) -> timedelta | None:
        """Return how long the lock has been held, if known."""
        return now - self.acquired_at if self.acquired_at else None

    def describe(self) -> str:
        """Return a one-line description for messages."""
        now = _utcnow()
        since = f" since {self.acquired_at.isoformat(timespec='seconds')}" if self.acquired_at else ""
        if self.last_renewed:
            since += f", last renewed {_format_duration(now - self.last_renewed)} ago"
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"run {self.run_id!r} (host {self.host}{pid}){since}"


def _format_duration(duration: timedelta | None) -> str:
    if duration is None:
        return "unknown"
    seconds = max(int(duration.total_seconds()), 0)
    return str(timedelta(seconds=seconds))


def _modification_time(info: Mapping[str, Any]) -> datetime | None:
    """Return a file's modification time from an fsspec ``info()`` mapping, whatever the backend."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, timezone.utc)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def _pid_space() -> str | None:
    """Identify this process's pid namespace (boot id and namespace), where Linux tells; else ``None``."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            return f"{boot_id.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _holder_is_dead(owner: LockOwner) -> bool:
    """
    Whether the lock's holder provably died: it ran on this host (same host name, and same pid namespace when
    the lock says) and its pid names no process. Pids of other hosts or containers prove nothing.
    """
    pid = owner.pid
    if os.name != "posix" or owner.host != socket.gethostname() or pid is None or pid <= 0:
        return False
    if owner.pid_space is not None and owner.pid_space != _pid_space():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists, under another user
        return False
    return False


class _SyncLock:
    """
    The lock object ``<key>.lock`` of a sync, held as a lease: a daemon thread renews it every
    ``renew_interval`` while the run holds it.
    """

    def __init__(
        self, path: ObjectStoragePath, key: str, stale_after: timedelta, renew_interval: timedelta
    ) -> None:
        self.path = path
        self.key = key
        self.stale_after = stale_after
        self.renew_interval = renew_interval
        self.owner: LockOwner | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def read_owner(self) -> LockOwner | None:
        """Return the current owner, or ``None`` if the sync is not locked."""
        try:
            data = self.path.read_bytes()
            info = self.path.fs.info(self.path.path)
        except FileNotFoundError:
            return None
        return LockOwner.from_bytes(data, _modification_time(info))

    def acquire(self, run_id: str) -> LockOwner:
        """
        Take the lock for ``run_id`` and start renewing it.

        :raises SyncStateLockedError: another run holds it.
        """
        current = self.read_owner()
        if current is not None:
            self._take_over(current, run_id)
        now = _utcnow()
        owner = LockOwner(run_id, uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, _pid_space())
        self._create(owner)
        confirmed = self.read_owner()
        if confirmed is None or confirmed.token != owner.token:
            raise self._locked(confirmed)
        self.owner = owner
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(owner,), name=f"lsg-lock-{self.key}", daemon=True
        )
        self._renewer.start()
        return owner

    def _take_over(self, current: LockOwner, run_id: str) -> None:
        renewed = current.last_renewed
        if current.run_id == run_id:
            log.warning("Taking over the lock of sync %s left by an earlier try of this run.", self.key)
        elif _holder_is_dead(current):
            log.warning(
                "Taking over the lock of sync %s held by %s: its process is gone.",
                self.key,
                current.describe(),
            )
        elif renewed is not None and _utcnow() - renewed > self.stale_after:
            log.warning(
                "Taking over the stale lock of sync %s held by %s (not renewed for more than %g seconds).",
                self.key,
                current.describe(),
                self.stale_after.total_seconds(),
            )
        else:
            raise self._locked(current)
        self.path.unlink(missing_ok=True)

    def _create(self, owner: LockOwner) -> None:
        try:
            with self.path.open("xb") as lock_file:
                lock_file.write(owner.to_bytes())
        except FileExistsError:
            raise self._locked(self.read_owner()) from None
        except (NotImplementedError, ValueError, TypeError):
            log.warning(
                "The filesystem of %s cannot create a file exclusively: the lock of sync %s is weaker there "
                "(two runs starting at the same moment could both take it; the state check at commit still "
                "keeps the second from saving its state).",
                self.path,
                self.key,
            )
            self.path.write_bytes(owner.to_bytes())

    def _locked(self, owner: LockOwner | None) -> SyncStateLockedError:
        return SyncStateLockedError(self.key, str(self.path), owner, self.stale_after)

    def _renew_loop(self, owner: LockOwner) -> None:
        """Rewrite ``renewed_at`` every ``renew_interval`` while this run still holds the lock (its token)."""
        while not self._stop.wait(self.renew_interval.total_seconds()):
            try:
                current = self.read_owner()
                if current is None or current.token != owner.token:
                    log.warning(
                        "Sync %s: this run lost its lock (now held by %s) and stops renewing it; its commit "
                        "fails if another run saves the state meanwhile.",
                        self.key,
                        current.describe() if current else "nobody",
                    )
                    return
                if not self._stop.is_set():
                    self.path.write_bytes(replace(owner, renewed_at=_utcnow()).to_bytes())
            except Exception:
                log.warning("Could not renew the lock %s; trying again.", self.path, exc_info=True)

    def release(self) -> None:
        """Stop renewing and remove the lock if this process still holds it (never raises)."""
        if self.owner is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(self.stale_after.total_seconds())  # so that no renewal follows the removal
        try:
            current = self.read_owner()
            if current is not None and current.token == self.owner.token:
                self.path.unlink(missing_ok=True)
            else:
                log.warning(
                    "The lock of sync %s was taken over by %s.", self.key, current and current.describe()
                )
        except Exception:
            log.warning("Could not remove the lock %s; delete it by hand.", self.path, exc_info=True)
        self.owner = None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _as_timedelta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


# --------------------------------------------------------------------------------------------- previous state


@dataclass
class _PreviousState:
    """The state a run started from: hashes and digests in memory, the body in a local file."""

    header: StateHeader | None
    hashes: array
    digests: array
    body_path: Path | None
    source: str

    @classmethod
    def empty(cls, source: str) -> _PreviousState:
        return cls(None, array("Q"), array("Q"), None, source)

    @property
    def count(self) -> int:
        return len(self.hashes)

    def iter_identities(self) -> Iterator[tuple[int, bytes]]:
        """Stream ``(kind code, identity bytes)`` for every entry, in hash order."""
        if self.header is None or self.body_path is None:
            return
        produced = 0
        try:
            with open(self.body_path, "rb") as body:
                body.seek(16 * self.header.count)
                for kind_code, identity in _iter_records(
                    _inflate_chunks(body, self.header.identities_size), _IDENTITY_RECORD
                ):
                    if kind_code not in _KIND_NAMES:
                        raise SyncStateCorruptError(self.source, f"unknown identity kind {kind_code}")
                    produced += 1
                    yield kind_code, identity
        except (_Truncated, zlib.error) as error:
            raise SyncStateCorruptError(self.source, f"its identities are damaged ({error!r})") from None
        if produced != self.header.count:
            raise SyncStateCorruptError(
                self.source, f"it lists {produced} identities, its header says {self.header.count}"
            )

    def iter_entries(self, presence: bytes | None = None) -> Iterator[tuple[int, int, int, bytes, int]]:
        """
        Stream ``(hash, digest, kind code, identity, presence)`` for every entry, in hash order.

        :param presence: one byte per entry (this run's presence), or ``None`` for all :data:`_UNSEEN`.
        """
        presence = presence if presence is not None else bytes(self.count)
        identities = self.iter_identities()
        # Not strict: iter_identities() itself reports an identity count different from the header's.
        for ihash, digest, (kind_code, identity), seen in zip(
            self.hashes, self.digests, identities, presence, strict=False
        ):
            yield ihash, digest, kind_code, identity, seen
        for _ in identities:  # drain, so that extra identities are reported
            pass


def _read_body(source: IO[bytes], head: bytes, offset: int, target: Path) -> tuple[int, str]:
    """Copy the body (``head[offset:]`` then the rest of ``source``) to ``target``; return size, checksum."""
    hasher = hashlib.blake2b(digest_size=16)
    size = 0
    with open(target, "wb") as out:
        chunk = head[offset:]
        while chunk:
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
            chunk = source.read(_IO_CHUNK)
    return size, hasher.hexdigest()


def _load_u64(body: IO[bytes], count: int) -> array:
    values = array("Q")
    values.fromfile(body, count)
    if not _LITTLE_ENDIAN:
        values.byteswap()
    return values


def _strictly_increasing(values: array) -> bool:
    return all(map(lt, values, islice(values, 1, None)))


# --------------------------------------------------------------------------------------------- spool


class _Spool:
    """Append-only record of this run's new and changed entries: sorted runs in a local file."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w+b", buffering=0)  # closed by close()
        self._pending: list[tuple[int, int, int, bytes]] = []
        self._runs: list[tuple[int, int]] = []
        self._size = 0
        self.duplicates = 0

    def add(self, ihash: int, digest: int, kind_code: int, identity: bytes) -> None:
        self._pending.append((ihash, digest, kind_code, identity))
        if len(self._pending) >= _SPOOL_RUN_RECORDS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._pending.sort(key=itemgetter(0))  # stable: equal hashes stay in arrival order
        pack = _SPOOL_RECORD.pack
        data = b"".join(pack(h, d, k, len(i)) + i for h, d, k, i in self._pending)
        self._file.seek(self._size)
        self._file.write(data)
        self._runs.append((self._size, self._size + len(data)))
        self._size += len(data)
        self._pending = []

    def iter_sorted(self) -> Iterator[tuple[int, int, int, bytes]]:
        """Yield the entries by increasing hash; of several entries with one hash, the last recorded."""
        self._flush()
        runs = [
            _iter_records(_file_chunks(self._file, start, end), _SPOOL_RECORD) for start, end in self._runs
        ]
        pending: tuple[int, int, int, bytes] | None = None
        for entry in heapq.merge(*runs, key=itemgetter(0)):
            if pending is not None and pending[0] != entry[0]:
                yield pending
            elif pending is not None:
                self.duplicates += 1
            pending = entry
        if pending is not None:
            yield pending

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------- commit


@dataclass(frozen=True)
class CommitResult:
    """
    What a commit wrote.

    :param generation: the generation of the new state.
    :param entries: identities in the new state.
    :param size: size of the state file in bytes.
    :param added: new identities whose event was accepted (now in the state).
    :param updated: changed identities whose event was accepted (digest updated).
    :param removed: exited identities whose exit was accepted (removed from the state).
    :param not_advanced: new, changed or exited identities whose event was not accepted (sent again next run).
    :param duplicates: identities recorded more than once in this run (the last occurrence was kept).
    """

    generation: int
    entries: int
    size: int
    added: int
    updated: int
    removed: int
    not_advanced: int
    duplicates: int


@dataclass
class _MergeStats:
    entries: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    not_advanced: int = 0


_Entry = tuple[int, int, int, bytes]  # identity hash, digest, kind code, identity


class _StateFileWriter:
    """Build the body of a new state file in local files, then publish it."""

    def __init__(self, workdir: Path) -> None:
        self.paths = (workdir / "new.hashes", workdir / "new.digests", workdir / "new.identities")
        self._hashes = _U64Writer(self.paths[0])
        self._digests = _U64Writer(self.paths[1])
        self._identities = _IdentityWriter(self.paths[2])
        self._last = -1
        self.count = 0

    def add(self, entry: _Entry) -> None:
        if entry[0] <= self._last:
            raise SyncStateError(f"internal error: state entries out of order ({entry[0]:016x})")
        self._last = entry[0]
        self._hashes.append(entry[0])
        self._digests.append(entry[1])
        self._identities.append(entry[2], entry[3])
        self.count += 1

    def finish(self, key: str, generation: int, run_id: str) -> StateHeader:
        """Close the local files and return the header describing them."""
        for writer in (self._hashes, self._digests, self._identities):
            writer.close()
        hasher = hashlib.blake2b(digest_size=16)
        for path in self.paths:
            with open(path, "rb") as part:
                while chunk := part.read(_IO_CHUNK):
                    hasher.update(chunk)
        return StateHeader(
            sync_key=key,
            generation=generation,
            state_id=uuid.uuid4().hex,
            count=self.count,
            identities_size=self.paths[2].stat().st_size,
            checksum=hasher.hexdigest(),
            run_id=run_id,
            written_at=_utcnow().isoformat(timespec="seconds"),
        )

    def write_to(self, out: IO[bytes], header: StateHeader) -> int:
        """Write the whole file to ``out``; return its size."""
        head = header.to_bytes()
        out.write(head)
        for path in self.paths:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, out, _IO_CHUNK)
        return len(head) + header.body_size


def _merge_entries(
    previous: Iterator[tuple[int, int, int, bytes, int]],
    fresh: Iterator[_Entry],
    delivered: Callable[[int], bool],
    exits_sent: bool,
    stats: _MergeStats,
) -> Iterator[_Entry]:
    """
    Merge the previous entries (with their presence) and this run's new/changed entries into the next state.

    Per identity: a delivered new/changed entry replaces the previous one; otherwise the previous entry is
    kept, except an exited identity whose exit was delivered.
    """
    old = next(previous, None)
    new = next(fresh, None)
    while old is not None or new is not None:
        if new is None or (old is not None and old[0] < new[0]):
            if _keep_previous(old, delivered, exits_sent, stats):
                yield old[:4]
            old = next(previous, None)
        elif old is None or new[0] < old[0]:
            if delivered(new[0]):
                stats.added += 1
                yield new
            else:
                stats.not_advanced += 1
            new = next(fresh, None)
        else:
            if delivered(new[0]):
                stats.updated += 1
                yield new
            else:
                stats.not_advanced += 1
                yield old[:4]
            old, new = next(previous, None), next(fresh, None)


def _keep_previous(
    old: tuple[int, int, int, bytes, int],
    delivered: Callable[[int], bool],
    exits_sent: bool,
    stats: _MergeStats,
) -> bool:
    if old[4] != _UNSEEN:
        return True
    if exits_sent and delivered(old[0]):
        stats.removed += 1
        return False
    stats.not_advanced += 1
    return True


def _delivery_check(not_delivered: Collection[int] | None) -> Callable[[int], bool]:
    if not_delivered is None:
        return lambda _ihash: False
    failed = not_delivered if isinstance(not_delivered, (set, frozenset)) else frozenset(not_delivered)
    return lambda ihash: ihash not in failed


# --------------------------------------------------------------------------------------------- store


class CohortStateStore:
    """
    The state of one sync, stored as ``<base_path>/<key>.state`` next to its lock ``<key>.lock``.

    :param base_path: the folder of the state files: an :class:`~airflow.sdk.ObjectStoragePath` or a URL
        (``file:///...``, ``s3://...``, ``gs://...``, any fsspec URL Airflow knows); a local folder is
        created if missing.
    :param key: the sync's key, from :func:`sync_key`.
    :param lock_stale_after: a lock not renewed for this long (timedelta or seconds) is taken over. Hosts
        sharing the state must have synchronised clocks (well within this).
    :param lock_renew_interval: how often a run renews its lock (default: a third of ``lock_stale_after``).
    :param tmp_dir: local folder for the run's temporary files (default: the system's temporary folder).
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
        self.base_path = (
            base_path if isinstance(base_path, ObjectStoragePath) else ObjectStoragePath(base_path)
        )
        self.key = key
        self.lock_stale_after = _as_timedelta(lock_stale_after)
        self.lock_renew_interval = (
            self.lock_stale_after / 3 if lock_renew_interval is None else _as_timedelta(lock_renew_interval)
        )
        if not timedelta(0) < self.lock_renew_interval < self.lock_stale_after:
            raise ValueError("lock_renew_interval must be positive and shorter than lock_stale_after")
        self.tmp_dir = tmp_dir

    @property
    def state_path(self) -> ObjectStoragePath:
        """The state file."""
        return self.base_path / f"{self.key}.state"

    @property
    def lock_path(self) -> ObjectStoragePath:
        """The lock file."""
        return self.base_path / f"{self.key}.lock"

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
        self._prepare_base()
        lock = _SyncLock(self.lock_path, self.key, self.lock_stale_after, self.lock_renew_interval)
        lock.acquire(run_id)
        workdir = Path(tempfile.mkdtemp(prefix="lsg-sync-state-", dir=self.tmp_dir))
        try:
            self._sweep_temporaries()
            if full_refresh:
                previous, token = self._load_for_refresh(workdir / "previous.body")
            else:
                previous = self._load(workdir / "previous.body")
                token = previous.header.state_id if previous.header else _STATE_ABSENT
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            lock.release()
            raise
        log.info(
            "Sync %s: %s previous identities (generation %s)%s.",
            self.key,
            previous.count,
            previous.header.generation if previous.header else 0,
            ", full refresh" if full_refresh else "",
        )
        return SyncRun(self, run_id, full_refresh, lock, workdir, previous, token)

    def read_header(self) -> StateHeader | None:
        """
        Return the stored state's header, or ``None`` if there is no state yet.

        :raises SyncStateCorruptError: the file is not a readable state file.
        """
        head = self._read_head()
        return None if head is None else StateHeader.parse(head, str(self.state_path))[0]

    def iter_entries(self) -> Iterator[StateEntry]:
        """Stream the stored state's entries (without locking; for inspection and tests)."""
        with tempfile.TemporaryDirectory(prefix="lsg-sync-state-", dir=self.tmp_dir) as workdir:
            previous = self._load(Path(workdir) / "previous.body")
            for ihash, digest, kind_code, identity, _seen in previous.iter_entries():
                yield StateEntry(
                    ihash, digest, _KIND_NAMES[kind_code], identity.decode("utf-8", "surrogatepass")
                )

    # -- internals

    def _prepare_base(self) -> None:
        if self.base_path.protocol in ("", "file", "local"):
            self.base_path.mkdir(parents=True, exist_ok=True)

    def _read_head(self) -> bytes | None:
        try:
            return self.state_path.fs.cat_file(self.state_path.path, start=0, end=_HEAD_MAX)
        except FileNotFoundError:
            return None

    def _state_token(self) -> str:
        """Identify the stored version: its ``state_id``, or absent / unreadable."""
        try:
            head = self._read_head()
            return (
                _STATE_ABSENT if head is None else StateHeader.parse(head, str(self.state_path))[0].state_id
            )
        except SyncStateCorruptError:
            return _STATE_UNREADABLE

    def _load(self, body_path: Path) -> _PreviousState:
        source = str(self.state_path)
        try:
            stream = self.state_path.open("rb")
        except FileNotFoundError:
            return _PreviousState.empty(source)
        with stream:
            head = stream.read(_HEAD_MAX)
            header, offset = StateHeader.parse(head, source)
            size, checksum = _read_body(stream, head, offset, body_path)
        self._check_body(header, size, checksum)
        with open(body_path, "rb") as body:
            hashes = _load_u64(body, header.count)
            digests = _load_u64(body, header.count)
        if not _strictly_increasing(hashes):
            raise SyncStateCorruptError(source, "its identity hashes are not in increasing order")
        return _PreviousState(header, hashes, digests, body_path, source)

    def _load_for_refresh(self, body_path: Path) -> tuple[_PreviousState, str]:
        """Load the previous state for a full refresh; if it is unreadable, warn and start from none."""
        try:
            previous = self._load(body_path)
            for _ in previous.iter_identities():  # fail now, not at the exits, if its identities are damaged
                pass
        except SyncStateCorruptError as error:
            log.warning(
                "Sync %s: full refresh without the previous state, which is unreadable (%s): the identities "
                "that left the cohort cannot be computed, so no exit is sent for them.",
                self.key,
                error.reason,
            )
            return _PreviousState.empty(str(self.state_path)), self._state_token()
        return previous, previous.header.state_id if previous.header else _STATE_ABSENT

    def _check_body(self, header: StateHeader, size: int, checksum: str) -> None:
        source = str(self.state_path)
        if header.sync_key != self.key:
            raise SyncStateCorruptError(source, f"it belongs to sync {header.sync_key}, not {self.key}")
        if size != header.body_size:
            raise SyncStateCorruptError(
                source, f"its body has {size} bytes, its header says {header.body_size}"
            )
        if checksum != header.checksum:
            raise SyncStateCorruptError(source, "its checksum does not match its content")

    def _sweep_temporaries(self) -> None:
        """Remove temporary state files left by crashed runs (safe: this run holds the lock)."""
        prefix = f"{self.key}.state.tmp-"
        try:
            names = self.base_path.fs.ls(self.base_path.path, detail=False)
        except FileNotFoundError:
            return
        for name in names:
            if name.rstrip("/").rsplit("/", 1)[-1].startswith(prefix):
                log.info("Removing %s, left behind by an interrupted run.", name)
                self.base_path.fs.rm_file(name)

    def _publish(self, writer: _StateFileWriter, header: StateHeader, expected_token: str) -> int:
        """Write the new state next to the current one, check for a concurrent writer, then replace."""
        tmp = self.base_path / f"{self.key}.state.tmp-{uuid.uuid4().hex}"
        try:
            with tmp.open("wb") as out:
                size = writer.write_to(out, header)
            self._check_unchanged(expected_token)
            tmp.fs.mv(tmp.path, self.state_path.path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except Exception:
                log.warning("Could not remove %s; it is removed by the next run.", tmp, exc_info=True)
            raise
        return size

    def _check_unchanged(self, expected_token: str) -> None:
        current = self._state_token()
        if current != expected_token:
            raise SyncStateConflictError(
                f"The state of sync {self.key} ({self.state_path}) changed since this run loaded it "
                f"({expected_token} -> {current}): another run wrote it concurrently. This run's state was "
                "not saved, so the next run sends its changes again. Make sure only one run of this sync "
                "is active at a time (max_active_runs=1)."
            )


class SyncRun:
    """
    One run of a sync, from :meth:`CohortStateStore.begin`: classify identities, list exits, commit.

    Use it as a context manager: leaving it releases the lock and removes local temporary files; without a
    :meth:`commit` the stored state is left as it was.
    """

    def __init__(
        self,
        store: CohortStateStore,
        run_id: str,
        full_refresh: bool,
        lock: _SyncLock,
        workdir: Path,
        previous: _PreviousState,
        state_token: str,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.full_refresh = full_refresh
        self._lock = lock
        self._workdir = workdir
        self._previous = previous
        self._state_token = state_token
        self._presence = bytearray(previous.count)
        self._spool = _Spool(workdir / "spool")
        self._closed = False
        self._committed = False
        #: identities classified new, changed and unchanged so far.
        self.new_count = 0
        self.changed_count = 0
        self.unchanged_count = 0

    def __enter__(self) -> SyncRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def previous_count(self) -> int:
        """Identities in the previous state (0 on a first run or when a full refresh could not read it)."""
        return self._previous.count

    @property
    def previous_generation(self) -> int:
        """Generation of the previous state (0 if none was loaded)."""
        return self._previous.header.generation if self._previous.header else 0

    @property
    def exit_count(self) -> int:
        """Previous identities not classified in this run (so far): they left the cohort."""
        return self._presence.count(_UNSEEN)

    @property
    def exit_ratio(self) -> float:
        """:attr:`exit_count` / :attr:`previous_count` (0.0 without a previous state)."""
        return self.exit_count / self.previous_count if self.previous_count else 0.0

    def counts(self) -> dict[str, int]:
        """Return the counters, e.g. for the operator's summary."""
        return {
            "previous": self.previous_count,
            "new": self.new_count,
            "changed": self.changed_count,
            "unchanged": self.unchanged_count,
            "exits": self.exit_count,
        }

    def classify(self, kind: str, identity: str, digest: int, *, ihash: int | None = None) -> Classification:
        """
        Record an identity as present in this run and say whether its event must be sent.

        :param kind: :data:`USER_ID` or :data:`ANONYMOUS_ID`.
        :param identity: the userId or anonymousId.
        :param digest: the digest of what is sent (see :func:`traits_digest`), 0 <= digest < 2**64.
        :param ihash: ``identity_hash(kind, identity)`` if already computed (e.g. for the messageId).
        :return: :data:`NEW` (not in the previous state), :data:`CHANGED` (digest differs, or any digest in
            a full refresh) or :data:`UNCHANGED` (nothing to send). An identity given twice is classified
            twice; the state keeps its last occurrence.
        """
        self._check_usable()
        kind_code = _check_kind(kind)
        if not 0 <= digest < _U64_LIMIT:
            raise ValueError(f"a digest must be an unsigned 64-bit integer, not {digest!r}")
        if ihash is None:
            ihash = identity_hash(kind, identity)
        hashes = self._previous.hashes
        index = bisect.bisect_left(hashes, ihash)
        if index < len(hashes) and hashes[index] == ihash:
            if self._previous.digests[index] == digest and not self.full_refresh:
                self._presence[index] = max(self._presence[index], _SEEN_UNCHANGED)
                self.unchanged_count += 1
                return UNCHANGED
            self._presence[index] = _SEEN_CHANGED
            self.changed_count += 1
            result: Classification = CHANGED
        else:
            self.new_count += 1
            result = NEW
        self._spool.add(ihash, digest, kind_code, _encode_identity(identity))
        return result

    def iter_exits(self) -> Iterator[ExitIdentity]:
        """
        Stream the previous identities not classified in this run, read back from the previous state file.

        Call it after every identity of the run was classified.
        """
        self._check_usable()
        presence = self._previous_entries()
        for ihash, _digest, kind_code, identity, seen in presence:
            if seen == _UNSEEN:
                yield ExitIdentity(_KIND_NAMES[kind_code], identity.decode("utf-8", "surrogatepass"), ihash)

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
        stats = _MergeStats()
        writer = _StateFileWriter(self._workdir)
        entries = _merge_entries(
            self._previous_entries(),
            self._spool.iter_sorted(),
            _delivery_check(not_delivered),
            exits_sent,
            stats,
        )
        for entry in entries:
            writer.add(entry)
        header = writer.finish(self.store.key, self.previous_generation + 1, self.run_id)
        size = self.store._publish(writer, header, self._state_token)
        self._committed = True
        result = CommitResult(
            header.generation,
            header.count,
            size,
            stats.added,
            stats.updated,
            stats.removed,
            stats.not_advanced,
            self._spool.duplicates,
        )
        log.info("Sync %s: state generation %s saved: %s", self.store.key, header.generation, result)
        return result

    def close(self) -> None:
        """Release the lock and remove local temporary files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._spool.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._lock.release()
        if not self._committed:
            log.info(
                "Sync %s: run %s ended without a commit; the state is unchanged.", self.store.key, self.run_id
            )

    def _check_usable(self) -> None:
        if self._closed or self._committed:
            raise SyncStateError(
                f"the run {self.run_id} of sync {self.store.key} is already committed or closed"
            )

    def _previous_entries(self) -> Iterator[tuple[int, int, int, bytes, int]]:
        """Stream ``(hash, digest, kind code, identity, presence)`` for every previous entry."""
        return self._previous.iter_entries(self._presence)
