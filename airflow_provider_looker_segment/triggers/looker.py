"""
The Looker triggers, run in Airflow's triggerer with the asynchronous client of
:mod:`airflow_provider_looker_segment.hooks.looker_async` (the connection read with the async hook method;
messages never carry the client secret or the access token):

* :class:`LookerQueryTaskTrigger` waits for a Looker async query task without holding a worker slot: it
  polls ``GET /api/4.0/query_tasks/{id}`` every ``poll_interval`` seconds and fires one event when the task
  ends (or on its own timeout), then logs out;
* :class:`LookerDatagroupTrigger` (:mod:`.looker_datagroup`) fires each time a datagroup of a LookML model
  is triggered (Looker's data refreshed): event-driven scheduling with an ``AssetWatcher``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseHook
from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_provider_looker_segment.hooks.looker_async import (
    API_PREFIX,
    DETAILS_CHARS,
    MAX_RETRY_WAIT,
    AsyncLookerClient,
    LookerCallFailed,
    LookerTimedOut,
    json_object,
    looker_message,
)
from airflow_provider_looker_segment.hooks.looker_connection import (
    LookerConnectionSettings,
    settings_from_connection,
)
from airflow_provider_looker_segment.triggers.looker_datagroup import (
    DEFAULT_DATAGROUP_POLL_INTERVAL,
    LookerDatagroupTrigger,
)

__all__ = [
    "API_PREFIX",
    "DEFAULT_DATAGROUP_POLL_INTERVAL",
    "DETAILS_CHARS",
    "MAX_RETRY_WAIT",
    "LookerDatagroupTrigger",
    "LookerQueryTaskTrigger",
]

#: Looker's statuses of a query task that failed to give a result.
FAILED_STATUSES = ("error", "killed", "expired")

_ENDED = {
    "error": "the query failed in the database",
    "killed": "its query was killed in Looker (by an admin, or through the API)",
    "expired": "Looker dropped it before it completed (its results expired); start the query again",
}


class LookerQueryTaskTrigger(BaseTrigger):
    """
    Wait for a Looker async query task (``create_query_task``) to end.

    It fires exactly one event: ``{"status": "success", "query_task_id": ..., "looker_status": "complete",
    "looker_api_calls": {...}}``
    when the task is complete, or ``{"status": "error", "query_task_id": ..., "looker_status": ...,
    "message": ...}`` when it ended ``error``, ``killed`` or ``expired`` (``looker_status`` is that status),
    when the trigger's own ``timeout`` passed (``looker_status``: the last status seen), or when Looker could
    not be asked (``looker_status``: the last status seen, or ``None``). Connection errors and HTTP 429/5xx
    answers are retried ``retries`` times with exponential backoff (or the ``Retry-After`` Looker asks for)
    before giving up. Nothing waits past the timeout's deadline: neither a request (its HTTP timeout is cut
    to the time left) nor a wait before a retry (a ``Retry-After`` beyond the deadline ends the wait at the
    deadline, with the timeout as the outcome).

    :param looker_conn_id: the Looker connection (the same as the hook's: Host, Login, Password; extras
        ``verify_ssl`` and ``timeout``).
    :param query_task_id: the query task (from ``LookerHook.start_query_task``).
    :param poll_interval: seconds between two status requests.
    :param timeout: give up after this long (seconds or a ``timedelta``); ``None`` waits as long as Looker
        runs the query. Counted from the trigger's creation, so a triggerer restart does not extend it.
    :param end_from_trigger: end the task from the triggerer instead of resuming it: successful (the event's
        payload as its XCom ``return_value``) when the query task is complete, failed otherwise.
    :param deadline: the moment (Unix time) the timeout ends; set by :meth:`serialize`, not by callers.
    :param retries: retries of a request that failed with a connection error, HTTP 429 or 5xx.
    :param retry_backoff: seconds before the first retry, doubled for each further one.
    :param resume_with: JSON values handed back in the event's payload (key ``resume_with``) for the task
        that resumes: what it read before deferring (the deferral's own ``kwargs`` do not reach the task
        under ``dag.test()``).
    """

    def __init__(
        self,
        looker_conn_id: str,
        query_task_id: str,
        poll_interval: float = 5.0,
        timeout: float | timedelta | None = None,
        end_from_trigger: bool = False,
        *,
        deadline: float | None = None,
        retries: int = 3,
        retry_backoff: float = 2.0,
        resume_with: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not str(query_task_id or "").strip():
            raise ValueError("query_task_id is required")
        if isinstance(timeout, timedelta):
            timeout = timeout.total_seconds()
        if timeout is not None and float(timeout) <= 0:
            raise ValueError(f"timeout must be above 0 seconds or None, got {timeout!r}")
        if float(poll_interval) <= 0:
            raise ValueError(f"poll_interval must be above 0 seconds, got {poll_interval!r}")
        if int(retries) < 0 or float(retry_backoff) < 0:
            raise ValueError("retries and retry_backoff must not be negative")
        self.looker_conn_id = looker_conn_id
        self.query_task_id = str(query_task_id).strip()
        self.poll_interval = float(poll_interval)
        self.timeout = None if timeout is None else float(timeout)
        self.end_from_trigger = bool(end_from_trigger)
        if deadline is None and self.timeout is not None:
            deadline = time.time() + self.timeout
        self.deadline = deadline
        self.retries = int(retries)
        self.retry_backoff = float(retry_backoff)
        self.resume_with = resume_with

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "looker_conn_id": self.looker_conn_id,
                "query_task_id": self.query_task_id,
                "poll_interval": self.poll_interval,
                "timeout": self.timeout,
                "end_from_trigger": self.end_from_trigger,
                "deadline": self.deadline,
                "retries": self.retries,
                "retry_backoff": self.retry_backoff,
                "resume_with": self.resume_with,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Wait for the query task to end; yield one event (see the class)."""
        payload = await self.wait()
        if self.resume_with is not None:
            payload["resume_with"] = self.resume_with
        if not self.end_from_trigger:
            yield TriggerEvent(payload)
        elif payload["status"] == "success":
            yield TaskSuccessEvent(xcoms={"return_value": payload})
        else:
            self.log.error("%s", payload["message"])
            yield TaskFailedEvent()

    async def on_kill(self) -> None:
        """Ask Looker to kill the query when a user kills the deferred task (mark failed, clear...)."""
        client = self._client(await self._settings(), deadline=None)  # a kill is never too late
        try:
            await client.login()
            response = await client.request("DELETE", f"/running_queries/{self.query_task_id}", "Killing")
            self.log.info(
                "Asked Looker to kill query task %s (HTTP %s)", self.query_task_id, response.status_code
            )
        finally:
            await client.close()

    # --- the wait -----------------------------------------------------------------------------------------

    async def wait(self) -> dict[str, Any]:
        """
        Wait for the query task to end (or the timeout); return the event's payload, with the Looker API
        calls the wait made (``looker_api_calls``, the logout included).
        """
        try:
            client = self._client(await self._settings(), deadline=self.deadline)
        except LookerCallFailed as failed:
            return {**self._error(str(failed), None), "looker_api_calls": {}}
        try:
            payload = await self._wait(client)
        finally:
            await client.close()
        return {**payload, "looker_api_calls": client.calls.to_dict()}

    async def _wait(self, client: AsyncLookerClient) -> dict[str, Any]:
        last: str | None = None
        try:
            await client.login()
            while True:
                status = await self._status(client)
                if status != last:
                    self.log.info("Looker query task %s: %s", self.query_task_id, status)
                last = status
                if status == "complete":
                    return {"status": "success", "query_task_id": self.query_task_id, "looker_status": status}
                if status in FAILED_STATUSES:
                    return self._error(await self._ended_message(client, status), status)
                remaining = None if self.deadline is None else self.deadline - time.time()
                if remaining is not None and remaining <= 0:
                    raise LookerTimedOut
                await asyncio.sleep(
                    self.poll_interval if remaining is None else min(self.poll_interval, remaining)
                )
        except LookerTimedOut:
            seen = f"its last status was {last}" if last else "Looker did not answer in time"
            return self._error(
                f"Looker query task {self.query_task_id} did not complete within {self.timeout:g} seconds "
                f"(timeout; {seen}); Looker may still be running it",
                last,
            )
        except LookerCallFailed as failed:
            return self._error(str(failed), last)

    async def _settings(self) -> LookerConnectionSettings:
        """The connection's settings, read with the async hook method."""
        try:
            return settings_from_connection(await BaseHook.aget_connection(self.looker_conn_id))
        except Exception as exc:  # a missing or unusable connection ends the wait with its reason
            raise LookerCallFailed(
                f"The Looker connection '{self.looker_conn_id}' cannot be used: {type(exc).__name__}: {exc}"
            ) from None

    def _client(self, settings: LookerConnectionSettings, *, deadline: float | None) -> AsyncLookerClient:
        return AsyncLookerClient(
            self.looker_conn_id,
            settings,
            log=self.log,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            deadline=deadline,
        )

    async def _status(self, client: AsyncLookerClient) -> str:
        """The query task's status (``GET /query_tasks/{id}?fields=id,status``)."""
        task_id = self.query_task_id
        action = f"Reading Looker query task {task_id}"
        response = await client.request(
            "GET", f"/query_tasks/{task_id}", action, params={"fields": "id,status"}
        )
        if response.status_code == 404:
            raise LookerCallFailed(
                f"Looker has no query task {task_id} (HTTP 404): it is unknown, or its results expired"
            )
        if response.status_code != 200:
            raise LookerCallFailed(
                client.redact(f"{action} failed (HTTP {response.status_code}): {looker_message(response)}")
            )
        status = json_object(response).get("status")
        if not isinstance(status, str) or not status:
            raise LookerCallFailed(
                f"{action}: Looker's answer has no status; is Host the Looker API URL "
                f"({client.settings.base_url})?"
            )
        return status

    async def _error_details(self, client: AsyncLookerClient) -> str:
        """The database's error of a failed task, from its results (best effort: ``""`` when unknown)."""
        path = f"/query_tasks/{self.query_task_id}/results"
        try:
            response = await client.request("GET", path, "Reading the error of the query task")
        except (LookerCallFailed, LookerTimedOut):
            return ""
        if response.status_code != 200:
            return (
                client.redact(looker_message(response))[:DETAILS_CHARS] if response.status_code == 400 else ""
            )
        errors = json_object(response).get("errors")
        texts = [
            ": ".join(str(part).strip() for part in (e.get("message"), e.get("message_details")) if part)
            for e in (errors if isinstance(errors, list) else [])
            if isinstance(e, dict)
        ]
        return client.redact(" | ".join(text for text in texts if text))[:DETAILS_CHARS]

    async def _ended_message(self, client: AsyncLookerClient, status: str) -> str:
        """The message of a task that ended ``error``, ``killed`` or ``expired`` (with the SQL error)."""
        message = f"Looker query task {self.query_task_id} ended with status {status}: {_ENDED[status]}"
        if status == "error":
            details = await self._error_details(client)
            if details:
                message += f": {details}"
        return message

    def _error(self, message: str, looker_status: str | None) -> dict[str, Any]:
        return {
            "status": "error",
            "query_task_id": self.query_task_id,
            "looker_status": looker_status,
            "message": message,
        }
