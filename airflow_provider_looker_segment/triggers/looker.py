"""
The Looker triggers, run in Airflow's triggerer; they only loop and yield, every Looker request is the async
client's (:mod:`airflow_provider_looker_segment.hooks.looker_async`):

* :class:`LookerQueryTaskTrigger` waits for a Looker async query task without holding a worker slot and
  fires one event when the task ends (or on its own timeout);
* :class:`LookerDatagroupTrigger` (:mod:`.looker_datagroup`) fires each time a datagroup of a LookML model
  is triggered (Looker's data refreshed): event-driven scheduling with an ``AssetWatcher``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_looker_segment.hooks.looker_async import (
    AsyncLookerClient,
    LookerCallFailed,
    LookerTimedOut,
)
from airflow_provider_looker_segment.hooks.looker_connection import RetryPolicy
from airflow_provider_looker_segment.triggers.looker_datagroup import (
    DEFAULT_DATAGROUP_POLL_INTERVAL,
    LookerDatagroupTrigger,
)

__all__ = ["DEFAULT_DATAGROUP_POLL_INTERVAL", "LookerDatagroupTrigger", "LookerQueryTaskTrigger"]

_ENDED = {
    "error": "the query failed in the database",
    "killed": "its query was killed in Looker (by an admin, or through the API)",
    "expired": "Looker dropped it before it completed (its results expired); start the query again",
}


class LookerQueryTaskTrigger(BaseTrigger):
    """
    Wait for a Looker async query task (``create_query_task``) to end, polling its status.

    It fires exactly one event: ``{"status": "success", "query_task_id": ..., "looker_status": "complete",
    "looker_api_calls": {...}}`` when the task is complete, or ``{"status": "error", "query_task_id": ...,
    "looker_status": ..., "message": ...}`` when it ended ``error``, ``killed`` or ``expired``, when the
    trigger's own ``timeout`` passed, or when Looker could not be asked (``looker_status``: the last status
    seen, or ``None``). Retries and the deadline (nothing waits past it) are the async client's.

    :param looker_conn_id: the Looker connection (the same as the hook's).
    :param query_task_id: the query task (from ``LookerHook.start_query_task``).
    :param poll_interval: seconds between two status requests.
    :param timeout: give up after this long (seconds or a ``timedelta``); ``None`` waits as long as Looker
        runs the query. Counted from the trigger's creation, so a triggerer restart does not extend it.
    :param deadline: the moment (Unix time) the timeout ends; set by :meth:`serialize`, not by callers.
    :param retries: retries of a request that failed with a connection error, HTTP 429 or 5xx.
    :param retry_backoff: seconds before the first retry, doubled for each further one.
    :param resume_with: JSON values handed back in the event's payload (key ``resume_with``) for the task
        that resumes (the deferral's own ``kwargs`` do not reach the task under ``dag.test()``).
    """

    def __init__(
        self,
        looker_conn_id: str,
        query_task_id: str,
        poll_interval: float = 5.0,
        timeout: float | timedelta | None = None,
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
        yield TriggerEvent(payload)

    async def on_kill(self) -> None:
        """Ask Looker to kill the query when a user kills the deferred task (mark failed, clear...)."""
        client = await self._client(deadline=None)  # a kill is never too late
        try:
            status = await client.kill_query_task(self.query_task_id)
            self.log.info("Asked Looker to kill query task %s (HTTP %s)", self.query_task_id, status)
        finally:
            await client.close()

    async def wait(self) -> dict[str, Any]:
        """
        Wait for the query task to end (or the timeout); return the event's payload, with the Looker API
        calls the wait made (``looker_api_calls``, the logout included).
        """
        try:
            client = await self._client(deadline=self.deadline)
        except LookerCallFailed as failed:
            return {**self._error(str(failed), None), "looker_api_calls": {}}
        try:
            payload = await self._wait(client)
        finally:
            await client.close()
        return {**payload, "looker_api_calls": client.calls.to_dict()}

    async def _wait(self, client: AsyncLookerClient) -> dict[str, Any]:
        task_id, last = self.query_task_id, None
        try:
            while True:
                status = await client.get_query_task_status(task_id)
                if status != last:
                    self.log.info("Looker query task %s: %s", task_id, status)
                last = status
                if status == "complete":
                    return {"status": "success", "query_task_id": task_id, "looker_status": status}
                if status in _ENDED:
                    message = f"Looker query task {task_id} ended with status {status}: {_ENDED[status]}"
                    details = await client.get_query_task_error(task_id) if status == "error" else ""
                    return self._error(f"{message}: {details}" if details else message, status)
                remaining = None if self.deadline is None else self.deadline - time.time()
                if remaining is not None and remaining <= 0:
                    raise LookerTimedOut
                await asyncio.sleep(
                    self.poll_interval if remaining is None else min(self.poll_interval, remaining)
                )
        except LookerTimedOut:
            seen = f"its last status was {last}" if last else "Looker did not answer in time"
            return self._error(
                f"Looker query task {task_id} did not complete within {self.timeout:g} seconds "
                f"(timeout; {seen}); Looker may still be running it",
                last,
            )
        except LookerCallFailed as failed:
            return self._error(str(failed), last)

    async def _client(self, *, deadline: float | None) -> AsyncLookerClient:
        return await AsyncLookerClient.for_connection(
            self.looker_conn_id,
            log=self.log,
            retry=RetryPolicy(self.retries, self.retry_backoff),
            deadline=deadline,
        )

    def _error(self, message: str, looker_status: str | None) -> dict[str, Any]:
        return {
            "status": "error",
            "query_task_id": self.query_task_id,
            "looker_status": looker_status,
            "message": message,
        }
