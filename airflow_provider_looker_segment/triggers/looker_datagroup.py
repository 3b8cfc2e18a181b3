"""
Syncs started when Looker's data refreshes: :class:`LookerDatagroupTrigger`, an event trigger for an
``AssetWatcher`` that fires each time a datagroup's ``triggered_at`` advances; see docs/sources.md,
"Syncs started when Looker's data refreshes". Sibling watchers share one ``GET /datagroups`` poll
(``shared_stream_key``); the last value seen is kept in ``asset_state_store`` (without it, the first poll
sets the baseline).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_provider_looker_segment.hooks.looker_async import (
    AsyncLookerClient,
    LookerCallFailed,
    LookerCallRefused,
)
from airflow_provider_looker_segment.hooks.looker_connection import RetryPolicy

#: One poll an hour: 24 ``GET /datagroups`` a day, 744 in a 31-day month, within the 1,000 administrative
#: API calls a month of Looker's Standard edition with room for the syncs' own (``GET /looks/{id}``).
DEFAULT_DATAGROUP_POLL_INTERVAL = 3600.0
#: The class path the triggerer imports (the public module, whatever module defines the class).
CLASSPATH = "airflow_provider_looker_segment.triggers.looker.LookerDatagroupTrigger"
#: Datagroups named in the message of an unknown one.
SHOWN_DATAGROUPS = 20

_log = logging.getLogger(__name__)


class LookerDatagroupError(Exception):
    """The watch cannot go on: bad credentials, an unknown datagroup, no permission (message redacted)."""


@dataclass(frozen=True)
class DatagroupSnapshot:
    """
    One poll's answer, shared with every sibling watcher.

    :param datagroups: ``(model_name, name)`` → ``triggered_at`` (UNIX seconds, ``None``: never triggered).
    :param errors: ``(model_name, name)`` → the ``trigger_error`` Looker reports for it, when it has one.
    :param failure: why the poll failed for a reason that can pass (Looker unavailable after the retries);
        the datagroups are then empty and the watchers wait for the next poll.
    """

    datagroups: dict[tuple[str, str], int | None] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    failure: str | None = None


class LookerDatagroupTrigger(BaseEventTrigger):
    """
    Fire a ``TriggerEvent`` each time a Looker datagroup's ``triggered_at`` advances past the last value seen.

    Payload, sharing and errors: docs/sources.md, "Syncs started when Looker's data refreshes". A lasting
    fault (refused credentials, unknown datagroup, no permission) is raised as :class:`LookerDatagroupError`
    one poll interval after it is logged: the triggerer restarts a failed watcher at once, so this keeps it
    to one attempt per interval. The serialized keyword arguments hold the connection id, never a secret.

    :param looker_conn_id: the Looker connection (Host, Login, Password; extras ``verify_ssl``, ``timeout``).
    :param model_name: the LookML model that defines the datagroup.
    :param datagroup_name: the datagroup's name in that model.
    :param poll_interval: seconds between two polls; default one hour (docs/sources.md, "Looker's API
        budget").
    :param retries: retries of a poll that failed with a connection error, HTTP 429 or 5xx.
    :param retry_backoff: seconds before the first retry, doubled for each further one.
    """

    def __init__(
        self,
        looker_conn_id: str,
        model_name: str,
        datagroup_name: str,
        poll_interval: float = DEFAULT_DATAGROUP_POLL_INTERVAL,
        *,
        retries: int = 3,
        retry_backoff: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("looker_conn_id", looker_conn_id),
            ("model_name", model_name),
            ("datagroup_name", datagroup_name),
        ):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{name} is required: give the {name.replace('_', ' ')} as text, got {value!r}"
                )
        if float(poll_interval) <= 0:
            raise ValueError(f"poll_interval must be above 0 seconds, got {poll_interval!r}")
        if int(retries) < 0 or float(retry_backoff) < 0:
            raise ValueError("retries and retry_backoff must not be negative")
        self.looker_conn_id = looker_conn_id.strip()
        self.model_name = model_name.strip()
        self.datagroup_name = datagroup_name.strip()
        self.poll_interval = float(poll_interval)
        self.retries = int(retries)
        self.retry_backoff = float(retry_backoff)

    @property
    def datagroup(self) -> str:
        """``model::name``, as Looker's UI names a datagroup."""
        return f"{self.model_name}::{self.datagroup_name}"

    @property
    def state_key(self) -> str:
        """The key of the last ``triggered_at`` seen, in the watched asset's state store."""
        return f"looker_datagroup:{self.looker_conn_id}:{self.model_name}:{self.datagroup_name}"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the keyword arguments that rebuild this trigger (no secret)."""
        return (
            CLASSPATH,
            {
                "looker_conn_id": self.looker_conn_id,
                "model_name": self.model_name,
                "datagroup_name": self.datagroup_name,
                "poll_interval": self.poll_interval,
                "retries": self.retries,
                "retry_backoff": self.retry_backoff,
            },
        )

    def shared_stream_key(self) -> Hashable | None:
        """Watchers of the same connection, poll interval and retries share one ``GET /datagroups`` poll."""
        return (
            "looker-datagroups",
            self.looker_conn_id,
            self.poll_interval,
            self.retries,
            self.retry_backoff,
        )

    # --- the shared poll ----------------------------------------------------------------------------------

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[DatagroupSnapshot]:
        """
        Poll ``GET /datagroups`` every ``poll_interval`` seconds (the first poll at once) and yield each
        answer as a :class:`DatagroupSnapshot`; raise :class:`LookerDatagroupError` (after one interval)
        when the connection or its credentials cannot be used.
        """
        conn_id, interval = str(kwargs["looker_conn_id"]), float(kwargs["poll_interval"])
        client: AsyncLookerClient | None = None
        try:
            while True:
                try:
                    if client is None:
                        client = await AsyncLookerClient.for_connection(
                            conn_id,
                            log=_log,
                            retry=RetryPolicy(int(kwargs["retries"]), float(kwargs["retry_backoff"])),
                        )
                    snapshot = _snapshot(await client.get_datagroups(), client.redact)
                except LookerCallRefused as failed:
                    _log.error("%s", failed)
                    await asyncio.sleep(interval)
                    raise LookerDatagroupError(str(failed)) from None
                except LookerCallFailed as failed:
                    _log.warning(
                        "Polling Looker's datagroups failed; next poll in %g s: %s", interval, failed
                    )
                    snapshot = DatagroupSnapshot(failure=str(failed))
                yield snapshot
                await asyncio.sleep(interval)
        finally:
            if client is not None:
                await client.close()

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """Turn the shared polls into this watcher's events: one each time its ``triggered_at`` advances."""
        store = _StateStore(self.asset_state_store, self.state_key, self.log)
        baseline = await store.load()
        known = baseline is not _UNSET
        last: int | None = baseline if known else None  # type: ignore[assignment]
        reported_error: str | None = None
        if known:
            self.log.info(
                "Datagroup %s: last triggered_at seen %s (from the asset state store)",
                self.datagroup,
                _shown(last),
            )
        async for snapshot in shared_stream:
            if snapshot.failure is not None:
                continue
            key = (self.model_name, self.datagroup_name)
            if key not in snapshot.datagroups:
                message = self._unknown(snapshot)
                self.log.error("%s", message)
                await asyncio.sleep(self.poll_interval)
                raise LookerDatagroupError(message)
            error = snapshot.errors.get(key)
            if error and error != reported_error:
                self.log.warning(
                    "Datagroup %s: Looker reports an error checking its trigger: %s", self.datagroup, error
                )
            reported_error = error
            current = snapshot.datagroups[key]
            if not known:
                known, last = True, current
                self.log.info(
                    "Datagroup %s: baseline triggered_at %s (first poll); an event fires when it advances",
                    self.datagroup,
                    _shown(current),
                )
                await store.save(current)
                continue
            if current is None or (last is not None and current <= last):
                continue
            self.log.info(
                "Datagroup %s triggered at %s (last seen %s): firing an event",
                self.datagroup,
                _shown(current),
                _shown(last),
            )
            previous, last = last, current
            try:
                yield TriggerEvent(
                    {
                        "model_name": self.model_name,
                        "datagroup_name": self.datagroup_name,
                        "triggered_at": current,
                        "previous_triggered_at": previous,
                    }
                )
            finally:  # once handed over (resumed, or closed right after): a crash before it fires it again
                await store.save(current)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Watch on its own (no sibling to share the poll with): poll and filter, as the triggerer would."""
        # Closed here, not left to the garbage collector: its close would be a task that asyncio may cancel
        # before it logs out of Looker.
        polls = self.open_shared_stream(self.serialize()[1])
        async with aclosing(polls), aclosing(self.filter_shared_stream(polls)) as events:
            async for event in events:
                yield event

    def _unknown(self, snapshot: DatagroupSnapshot) -> str:
        """The message of a datagroup Looker does not list, naming those it does (of the model first)."""
        same_model = sorted(name for model, name in snapshot.datagroups if model == self.model_name)
        others = sorted(f"{model}::{name}" for model, name in snapshot.datagroups if model != self.model_name)
        listed = [f"{self.model_name}::{name}" for name in same_model] + others
        shown = ", ".join(listed[:SHOWN_DATAGROUPS]) + (" ..." if len(listed) > SHOWN_DATAGROUPS else "")
        return (
            f"Looker has no datagroup {self.datagroup} (model_name={self.model_name!r}, "
            f"datagroup_name={self.datagroup_name!r}) among the {len(listed)} datagroups the API user of "
            f"connection '{self.looker_conn_id}' sees ({shown or 'none'}). Use the name given after "
            "'datagroup:' in the LookML model file, and the model's name, or give the API user access to "
            "that model."
        )


def _snapshot(body: list[dict[str, Any]], redact: Callable[[str], str]) -> DatagroupSnapshot:
    """Every datagroup's ``triggered_at`` (and trigger error) from Looker's list of datagroups."""
    datagroups: dict[tuple[str, str], int | None] = {}
    errors: dict[tuple[str, str], str] = {}
    for entry in body:
        if not entry.get("model_name") or not entry.get("name"):
            continue
        key = (str(entry["model_name"]), str(entry["name"]))
        value = entry.get("triggered_at")
        datagroups[key] = (
            int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )
        if isinstance(entry.get("trigger_error"), str) and entry["trigger_error"]:
            errors[key] = redact(entry["trigger_error"])
    return DatagroupSnapshot(datagroups, errors)


#: No value in the state store (or no store): the first poll sets the baseline.
_UNSET: Any = object()


class _StateStore:
    """The last ``triggered_at`` seen, in the state store of the watched asset(s), when there is one."""

    def __init__(self, store: Any, key: str, log: Any) -> None:
        self.key = key
        self.log = log
        self.accessors = _accessors(store)

    async def load(self) -> Any:
        """The value saved, :data:`_UNSET` when none (or no store)."""
        for accessor in self.accessors:
            value = await accessor.aget(self.key)
            if isinstance(value, dict) and "triggered_at" in value:
                seen = value["triggered_at"]
                return int(seen) if isinstance(seen, int | float) and not isinstance(seen, bool) else None
        return _UNSET

    async def save(self, triggered_at: int | None) -> None:
        """Save the value (every watched asset's store); a failure is logged, the watch goes on."""
        for accessor in self.accessors:
            try:
                await accessor.aset(self.key, {"triggered_at": triggered_at})
            except Exception as exc:  # the next restart would use the older value: an event may repeat
                self.log.warning(
                    "Could not save the last triggered_at seen (%s): %s", type(exc).__name__, exc
                )


def _accessors(store: Any) -> list[Any]:
    """The per-asset accessors of Airflow's ``AssetStateStoreAccessors`` (one per watched asset)."""
    if store is None:
        return []
    by_name = getattr(store, "_by_name", None)
    by_uri = getattr(store, "_by_uri", None)
    if isinstance(by_name, dict) and isinstance(by_uri, dict):  # a trigger shared by several assets
        return [*by_name.values(), *by_uri.values()]
    return [store]


def _shown(triggered_at: int | None) -> str:
    """``1733000000 (2024-11-30T20:53:20Z)``; ``None`` as ``never``."""
    if triggered_at is None:
        return "never"
    when = datetime.fromtimestamp(triggered_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{triggered_at} ({when})"
