"""
The lock of a changed-only sync, ``<key>.lock`` next to its state: a lease its holder renews while it runs.

When a lock is taken over and when a run is refused: docs/changed-only.md, "Locking" ("provably gone" means
same host name and pid namespace, no such pid). A holder that finds its lock taken over, or cannot renew it
for longer than the lease, sets :attr:`SyncLock.lost` and calls the ``on_lost`` callbacks, so that the run
stops sending at once and fails.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone

import orjson
from airflow.sdk import ObjectStoragePath

from airflow_provider_looker_segment import exceptions as errors

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class LockOwner:
    """
    The content of a lock file: the run holding the sync, a token of this acquisition, its host, pid and pid
    namespace (:func:`_pid_space`), when it took the lock and last renewed it (UTC; locks of earlier versions
    have no ``renewed_at``).
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
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes, fallback_time: datetime | None) -> LockOwner:
        """Read a lock file (``fallback_time``: its modification time); an unreadable one names no run."""
        try:
            fields = orjson.loads(data)
            for name in ("acquired_at", "renewed_at"):
                fields[name] = datetime.fromisoformat(fields[name]) if fields.get(name) else None
            owner = cls(**fields)
            return replace(owner, acquired_at=owner.acquired_at or fallback_time)
        except (ValueError, TypeError, AttributeError):
            return cls("<unreadable lock file>", "", "?", None, fallback_time)

    def __str__(self) -> str:
        since = f" since {self.acquired_at.isoformat(timespec='seconds')}" if self.acquired_at else ""
        if self.last_renewed:
            ago = _utcnow() - self.last_renewed
            if ago < -timedelta(seconds=1):
                ahead = timedelta(seconds=int(-ago.total_seconds()))
                since += (
                    f", last renewed {ahead} in the future (its host's clock is ahead of this one: "
                    "synchronise the clocks of the hosts that share the state)"
                )
            else:
                ago = max(ago, timedelta(0))
                since += f", last renewed {timedelta(seconds=int(ago.total_seconds()))} ago"
        return f"run {self.run_id!r} (host {self.host}{f', pid {self.pid}' if self.pid else ''}){since}"


def _pid_space() -> str | None:
    """Identify this process's pid namespace (boot id and namespace), where Linux tells; else ``None``."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            return f"{boot_id.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _holder_is_dead(owner: LockOwner) -> bool:
    """Whether the holder ran on this host (and pid namespace, when the lock says) and its pid is gone."""
    if os.name != "posix" or owner.host != socket.gethostname() or not isinstance(owner.pid, int):
        return False
    if owner.pid <= 0 or owner.pid_space not in (None, _pid_space()):
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists, under another user
        pass
    return False


class SyncLock:
    """
    The lock ``<key>.lock`` of a sync, held as a lease renewed by a daemon thread.

    :param path: the lock file.
    :param key: the sync's key, for messages.
    :param stale_after: a lock not renewed for this long is taken over.
    :param renew_interval: how often the holder renews it.
    """

    def __init__(
        self, path: ObjectStoragePath, key: str, stale_after: timedelta, renew_interval: timedelta
    ) -> None:
        self.path, self.key, self.stale_after = path, key, stale_after
        self.renew_every = renew_interval.total_seconds()
        self.owner: LockOwner | None = None
        #: Set once this run knows it no longer holds the lock (taken over, or not renewable for a lease).
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self._on_lost: list[Callable[[str], object]] = []
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"lsg-lock-{self.key}", daemon=True)

    def on_lost(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(reason)`` (from the renewing thread) when the lock is lost; at once if it is."""
        self._on_lost.append(callback)
        if self.lost.is_set():
            callback(self.lost_reason or "lost")

    def read_owner(self) -> LockOwner | None:
        """Return the current owner, or ``None`` if the sync is not locked."""
        try:
            data, modified = self.path.read_bytes(), None
            with suppress(NotImplementedError):
                modified = self.path.fs.modified(self.path.path)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise errors.SyncStateError(
                f"The lock of sync {self.key} cannot be taken: {self.path} is a folder, where the lock file "
                "should be. Remove that folder (this provider never creates it), then run again."
            ) from None
        if modified is not None and modified.tzinfo is None:
            modified = modified.replace(tzinfo=timezone.utc)
        return LockOwner.from_bytes(data, modified)

    def acquire(self, run_id: str) -> None:
        """Take the lock for ``run_id`` (taking over a dead or stale one) and start renewing it."""
        if current := self.read_owner():
            if current.run_id == run_id:
                reason = "left by an earlier try of this run"
            elif _holder_is_dead(current):
                reason = f"held by {current}: its process is gone"
            elif current.last_renewed and _utcnow() - current.last_renewed > self.stale_after:
                reason = (
                    f"held by {current} (not renewed for more than {self.stale_after.total_seconds():g} s)"
                )
            else:
                raise self._locked(current)
            log.warning("Taking over the lock of sync %s %s.", self.key, reason)
            self.path.unlink(missing_ok=True)
        now = _utcnow()
        owner = LockOwner(run_id, uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, _pid_space())
        try:
            with self.path.open("xb") as lock_file:
                lock_file.write(owner.to_bytes())
        except FileExistsError:
            raise self._locked(self.read_owner()) from None
        except (NotImplementedError, ValueError, TypeError):
            log.warning(
                "The filesystem of %s cannot create a file exclusively: the lock of sync %s is weaker there "
                "(two runs starting at once could both take it; the state check at commit still keeps the "
                "second from saving its state).",
                self.path,
                self.key,
            )
            self.path.write_bytes(owner.to_bytes())
        if (confirmed := self.read_owner()) is None or confirmed.token != owner.token:
            raise self._locked(confirmed)
        self.owner = owner
        self._renewer.start()

    def _locked(self, owner: LockOwner | None) -> errors.SyncStateLockedError:
        return errors.SyncStateLockedError(self.key, str(self.path), owner, self.stale_after.total_seconds())

    def _renew(self) -> None:
        """
        Rewrite ``renewed_at`` every ``renew_every`` seconds while the lock still has this run's token; mark
        the lock lost when another run holds it, or when it could not be renewed for a whole lease.
        """
        owner = self.owner
        renewed = time.monotonic()
        while owner is not None and not self._stop.wait(self.renew_every):
            try:
                current = self.read_owner()
                if current is None or current.token != owner.token:
                    self._lose(f"another run took it over (now held by {current or 'nobody'})")
                    return
                if not self._stop.is_set():
                    self.path.write_bytes(replace(owner, renewed_at=_utcnow()).to_bytes())
                    renewed = time.monotonic()
            except Exception:
                log.warning("Could not renew the lock %s; trying again.", self.path, exc_info=True)
                if time.monotonic() - renewed > self.stale_after.total_seconds():
                    self._lose(
                        f"it could not be renewed for more than {self.stale_after.total_seconds():g} s, so "
                        "another run may have taken it over"
                    )
                    return

    def _lose(self, reason: str) -> None:
        """Mark the lock lost and tell the callbacks (once)."""
        if self.lost.is_set() or self._stop.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        log.error("Sync %s: this run lost its lock: %s. It stops sending and fails.", self.key, reason)
        for callback in self._on_lost:
            try:
                callback(reason)
            except Exception:
                log.warning("A lost-lock callback of sync %s failed.", self.key, exc_info=True)

    def release(self) -> None:
        """Stop renewing and remove the lock if this run still holds it (never raises)."""
        if self.owner is None:
            return
        self._stop.set()
        self._renewer.join(self.stale_after.total_seconds())  # so that no renewal follows the removal
        try:
            current = self.read_owner()
            if current is not None and current.token == self.owner.token:
                self.path.unlink(missing_ok=True)
            else:
                log.warning("The lock of sync %s was taken over by %s.", self.key, current)
        except Exception:
            log.warning("Could not remove the lock %s; delete it by hand.", self.path, exc_info=True)
        self.owner = None
