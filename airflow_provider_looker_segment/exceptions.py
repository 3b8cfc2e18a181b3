"""
Exceptions raised by the provider; every message names the cause and what to do about it.

An error that can heal on its own (Looker or Segment unavailable, a timeout, a lock held by a live run...) is
a plain :class:`LookerSegmentError`, so Airflow retries the task; one that no retry can fix also derives from
:class:`~airflow.sdk.exceptions.AirflowFailException` and fails the task at once. :func:`is_retryable` tells
them apart; docs/troubleshooting.md lists both.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class LookerSegmentError(AirflowException):
    """Base class of every error this provider raises (those that can heal: Airflow retries them)."""


def is_retryable(error: BaseException) -> bool:
    """
    Whether Airflow's retries may help: ``False`` for the errors that fail a task at once (subclasses of
    :class:`~airflow.sdk.exceptions.AirflowFailException`).

    :param error: an exception a task raised.
    """
    return not isinstance(error, AirflowFailException)


class LookerApiError(LookerSegmentError):
    """
    A Looker API call failed.

    :param message: what went wrong, in words a user can act on (never a secret).
    :param status: the HTTP status when it is known.
    :param look_id: the Look concerned, if any.
    """

    def __init__(self, message: str, *, status: int | None = None, look_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.look_id = look_id


class LookerRequestError(LookerApiError, AirflowFailException):
    """
    Looker refused the request for a reason no retry changes: rejected credentials, an HTTP 4xx other than
    408 and 429 (no permission, an invalid request), a Look that cannot run as asked, or a Host whose scheme
    or port is wrong, or whose TLS certificate the worker does not trust. The task fails at once.
    """


class LookNotFoundError(LookerRequestError):
    """The Look does not exist or the API user cannot see it."""


class LookDeletedError(LookerRequestError):
    """The Look is in the trash."""


class QueryNotFoundError(LookerRequestError):
    """The query (by id or slug) does not exist, or the API user cannot see it."""


class LookQueryError(LookerApiError):
    """
    Looker ran the Look's SQL and it failed (HTTP 200 with a ``looker_error`` row). Retried: the database's
    error can be an outage (a warehouse that is down, overloaded or restarting) as well as a SQL mistake.
    """


class LookStreamError(LookerApiError):
    """The result body ended early or could not be parsed (a closed connection, a proxy's error page)."""


class LookFilterError(LookerRequestError):
    """
    Looker refused the filters given for a run of a Look (e.g. a field that is not in the Look's explore).

    :param fields: the given filter fields Looker's answer names (all the given ones when it names none).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        look_id: str | None = None,
        fields: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, status=status, look_id=look_id)
        self.fields = fields


class QueryTaskError(LookerApiError):
    """
    A Looker async query task cannot give a result: it ended ``error``, ``killed`` or ``expired``, is
    unknown to Looker, or has not completed yet. Retried: a retry starts a new query task.

    :param task_id: the query task.
    :param task_status: its Looker status when known (``running``, ``killed``, ``expired``...).
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str,
        task_status: str | None = None,
        status: int | None = None,
        look_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, look_id=look_id)
        self.task_id = task_id
        self.task_status = task_status


class SegmentConfigurationError(LookerSegmentError, AirflowFailException):
    """The Segment connection or the delivery settings are unusable (e.g. no write key)."""


class SegmentDeliveryError(LookerSegmentError):
    """
    Some events could not be delivered for a reason that can pass (Segment unavailable or rate-limiting
    beyond the delivery's own retries, timeouts, connection errors): Airflow retries the task, which sends
    the same messageIds again (Segment drops the ones it already has).
    """


class UndeliverableEventsError(SegmentDeliveryError, AirflowFailException):
    """
    Events that no retry can deliver: Segment rejected them (HTTP 400 or 413, over 32 KB), refused the
    connection for good (HTTP 401, 403, 404, a redirect, ``https://`` to a plain-HTTP port), or more rows
    than ``max_invalid_rows`` produced no event. The task fails at once.
    """


class TransformConfigError(LookerSegmentError, AirflowFailException):
    """The Look's fields and the operator's settings do not give a usable row → identify mapping."""


class DestinationError(LookerSegmentError, AirflowFailException):
    """The requested Segment destinations are unknown or need identifiers the Look does not provide."""


class InvalidParameterError(LookerSegmentError, ValueError, AirflowFailException):
    """An operator argument (after template rendering) has a value that cannot be used."""


class ConnectionConfigError(LookerSegmentError, AirflowFailException):
    """An Airflow connection's fields (Host, Login, Password) cannot be used."""


class SyncStateError(LookerSegmentError):
    """The state of a ``sync_mode="changed"`` sync cannot be used or saved."""


class SyncStateCorruptError(SyncStateError, AirflowFailException):
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
    Another run of the same sync holds its lock. Retried: the lock is released when that run ends, and taken
    over once it is not renewed any more.

    :param sync_key: the sync.
    :param lock_path: the lock file (URI).
    :param owner: who holds the lock (a :class:`~airflow_provider_looker_segment.sync_state.LockOwner`, whose
        ``str()`` describes it), if it could be read.
    :param stale_after: seconds without renewal after which the lock is taken over.
    """

    def __init__(self, sync_key: str, lock_path: str, owner: object | None, stale_after: float) -> None:
        held_by = owner if owner is not None else "another run (its lock could not be read)"
        super().__init__(
            f"Sync {sync_key} is locked by {held_by}: another run of this sync appears to be in progress, "
            "and two concurrent runs would corrupt its state. Wait for it to finish (and set "
            f"max_active_runs=1). The lock is taken over automatically once not renewed for {stale_after:g} "
            "seconds (at once if its holder's process is gone, on the same host); if no such run is active, "
            f"you may delete {lock_path}."
        )
        self.sync_key = sync_key
        self.lock_path = lock_path
        self.owner = owner


class SyncStateSaveError(SyncStateError):
    """
    Segment accepted the run's calls but the state could not be saved after every attempt. Retried: the
    storage may heal (space freed, credentials renewed), and the retry's entry and exit events carry the same
    messageIds.

    :param sync_key: the sync.
    :param state_path: where the state should have been saved (URI).
    :param error: the last error.
    :param attempts: how many times saving was tried.
    :param generation: the generation of the state that stays in place.
    :param marked: whether a marker telling the next run about it could be written.
    """

    def __init__(
        self,
        sync_key: str,
        state_path: str,
        error: BaseException,
        *,
        attempts: int,
        generation: int,
        marked: bool,
    ) -> None:
        super().__init__(
            f"The calls were delivered to Segment, but the state of sync {sync_key} could not be saved to "
            f"{state_path} ({attempts} attempts; last error: {type(error).__name__}: {error}). The state "
            f"stays at generation {generation}, so the next run compares the Look with it and sends these "
            "changes again; its entry and exit events carry the same messageIds as this run's (derived from "
            "the transition), so Segment drops the repeats within its deduplication window (about 24 hours). "
            "Fix the storage (space, permissions, credentials) before the next run."
            + ("" if marked else " (The next run cannot be told about this: the storage refused that too.)")
        )
        self.sync_key = sync_key
        self.state_path = state_path
        self.generation = generation


class SyncStateLockLostError(SyncStateError):
    """
    The run lost the lock of its sync while it ran (it was frozen past its lease) and stopped sending.
    Retried: the retry waits for the lock like any run.
    """


class SyncStateConflictError(SyncStateError):
    """The stored state changed since this run loaded it (another run wrote it concurrently). Retried."""


class ExitGuardError(LookerSegmentError, AirflowFailException):
    """
    More of the previous cohort would leave in one run than ``max_exit_ratio`` allows. The task fails at
    once: check the Look, or run once with a higher ``max_exit_ratio``.
    """
