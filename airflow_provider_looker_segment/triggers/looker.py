"""
A trigger that waits for a Looker async query task without holding a worker slot.

:class:`LookerQueryTaskTrigger` runs in Airflow's triggerer: it reads the Looker connection with the async
hook method, logs in with an asynchronous HTTP client (``httpx``, which ships with Airflow), polls
``GET /api/4.0/query_tasks/{id}`` every ``poll_interval`` seconds without blocking the event loop, and fires
one event when the task ends (or on its own timeout), then logs out. Its messages never carry the client
secret or the access token.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
from airflow.sdk import BaseHook
from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_provider_looker_segment.hooks.looker_connection import (
    CREDENTIAL_STATUSES,
    RETRY_STATUSES,
    LookerConnectionSettings,
    settings_from_connection,
)
from airflow_provider_looker_segment.net import (
    PLAIN_HTTP,
    TIMEOUT,
    TLS,
    UNREACHABLE,
    exception_chain,
    redact,
    transport_problem,
)

API_PREFIX = "/api/4.0"
#: Looker's statuses of a query task that failed to give a result.
FAILED_STATUSES = ("error", "killed", "expired")
#: Longest wait between two retries of a request that failed (``Retry-After`` included), in seconds.
MAX_RETRY_WAIT = 60.0
#: Seconds allowed for logging out at the end.
LOGOUT_TIMEOUT = 10.0
#: Characters of Looker's error details kept in a message.
DETAILS_CHARS = 500

_ENDED = {
    "error": "the query failed in the database",
    "killed": "its query was killed in Looker (by an admin, or through the API)",
    "expired": "Looker dropped it before it completed (its results expired); start the query again",
}


class _Failed(Exception):
    """The wait cannot go on: the message says why (already redacted)."""


class _TimedOut(Exception):
    """The trigger's timeout: a request or a wait before a retry would have gone past its deadline."""


class LookerQueryTaskTrigger(BaseTrigger):
    """
    Wait for a Looker async query task (``create_query_task``) to end.

    It fires exactly one event: ``{"status": "success", "query_task_id": ..., "looker_status": "complete"}``
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
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Wait for the query task to end; yield one event (see the class)."""
        payload = await self.wait()
        if not self.end_from_trigger:
            yield TriggerEvent(payload)
        elif payload["status"] == "success":
            yield TaskSuccessEvent(xcoms={"return_value": payload})
        else:
            self.log.error("%s", payload["message"])
            yield TaskFailedEvent()

    async def on_kill(self) -> None:
        """Ask Looker to kill the query when a user kills the deferred task (mark failed, clear...)."""
        client = _LookerClient(self, await self._settings(), deadline=None)  # a kill is never too late
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
        """Wait for the query task to end (or the timeout); return the event's payload."""
        last: str | None = None
        try:
            client = _LookerClient(self, await self._settings(), deadline=self.deadline)
        except _Failed as failed:
            return self._error(str(failed), last)
        try:
            await client.login()
            while True:
                status = await client.status()
                if status != last:
                    self.log.info("Looker query task %s: %s", self.query_task_id, status)
                last = status
                if status == "complete":
                    return {"status": "success", "query_task_id": self.query_task_id, "looker_status": status}
                if status in FAILED_STATUSES:
                    return self._error(await self._ended_message(client, status), status)
                remaining = None if self.deadline is None else self.deadline - time.time()
                if remaining is not None and remaining <= 0:
                    raise _TimedOut
                await asyncio.sleep(
                    self.poll_interval if remaining is None else min(self.poll_interval, remaining)
                )
        except _TimedOut:
            seen = f"its last status was {last}" if last else "Looker did not answer in time"
            return self._error(
                f"Looker query task {self.query_task_id} did not complete within {self.timeout:g} seconds "
                f"(timeout; {seen}); Looker may still be running it",
                last,
            )
        except _Failed as failed:
            return self._error(str(failed), last)
        finally:
            await client.close()

    async def _settings(self) -> LookerConnectionSettings:
        """The connection's settings, read with the async hook method."""
        try:
            return settings_from_connection(await BaseHook.aget_connection(self.looker_conn_id))
        except Exception as exc:  # a missing or unusable connection ends the wait with its reason
            raise _Failed(
                f"The Looker connection '{self.looker_conn_id}' cannot be used: {type(exc).__name__}: {exc}"
            ) from None

    async def _ended_message(self, client: _LookerClient, status: str) -> str:
        """The message of a task that ended ``error``, ``killed`` or ``expired`` (with the SQL error)."""
        message = f"Looker query task {self.query_task_id} ended with status {status}: {_ENDED[status]}"
        if status == "error":
            details = await client.error_details()
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


class _LookerClient:
    """
    The trigger's Looker session: login, requests with retries and a second login on 401, logout; with a
    ``deadline`` (Unix time), no request nor wait before a retry goes past it (:class:`_TimedOut`).
    """

    def __init__(
        self, trigger: LookerQueryTaskTrigger, settings: LookerConnectionSettings, *, deadline: float | None
    ) -> None:
        self.trigger = trigger
        self.settings = settings
        self.deadline = deadline
        self.token: str | None = None
        self.http = httpx.AsyncClient(
            base_url=f"{settings.base_url}{API_PREFIX}", verify=settings.verify_ssl, timeout=settings.timeout
        )

    def redact(self, text: str) -> str:
        """Remove the client secret and the access token from a text."""
        return redact(text, [self.settings.client_secret, self.token])

    async def login(self) -> None:
        """``POST /login`` with the client id and secret (form data); keep the access token."""
        form = {"client_id": self.settings.client_id, "client_secret": self.settings.client_secret}
        response = await self.request("POST", "/login", "Logging in to Looker", data=form, auth=False)
        if response.status_code in CREDENTIAL_STATUSES:
            raise _Failed(
                self.redact(
                    f"Looker rejected the API credentials of connection '{self.trigger.looker_conn_id}' "
                    f"(client ID {self.settings.client_id}) at {self.settings.base_url}: HTTP "
                    f"{response.status_code} {_message(response)}. Check the client ID and secret."
                )
            )
        if response.status_code != 200:
            raise _Failed(
                self.redact(
                    f"Logging in to Looker at {self.settings.base_url} failed (HTTP {response.status_code}): "
                    f"{_message(response)}"
                )
            )
        token = _json(response).get("access_token")
        if not isinstance(token, str) or not token:
            raise _Failed(
                f"Logging in to Looker: the answer has no access token; is Host the Looker API URL "
                f"({self.settings.base_url})?"
            )
        self.token = token

    async def status(self) -> str:
        """The query task's status (``GET /query_tasks/{id}?fields=id,status``)."""
        task_id = self.trigger.query_task_id
        action = f"Reading Looker query task {task_id}"
        response = await self.request(
            "GET", f"/query_tasks/{task_id}", action, params={"fields": "id,status"}
        )
        if response.status_code == 404:
            raise _Failed(
                f"Looker has no query task {task_id} (HTTP 404): it is unknown, or its results expired"
            )
        if response.status_code != 200:
            raise _Failed(self.redact(f"{action} failed (HTTP {response.status_code}): {_message(response)}"))
        status = _json(response).get("status")
        if not isinstance(status, str) or not status:
            raise _Failed(
                f"{action}: Looker's answer has no status; is Host the Looker API URL "
                f"({self.settings.base_url})?"
            )
        return status

    async def error_details(self) -> str:
        """The database's error of a failed task, from its results (best effort: ``""`` when unknown)."""
        path = f"/query_tasks/{self.trigger.query_task_id}/results"
        try:
            response = await self.request("GET", path, "Reading the error of the query task")
        except (_Failed, _TimedOut):
            return ""
        if response.status_code != 200:
            return self.redact(_message(response))[:DETAILS_CHARS] if response.status_code == 400 else ""
        errors = _json(response).get("errors")
        texts = [
            ": ".join(str(part).strip() for part in (e.get("message"), e.get("message_details")) if part)
            for e in (errors if isinstance(errors, list) else [])
            if isinstance(e, dict)
        ]
        return self.redact(" | ".join(text for text in texts if text))[:DETAILS_CHARS]

    async def request(
        self, method: str, path: str, action: str, *, auth: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """Send a request; retry transport errors and 429/5xx with backoff; log in again once on 401."""
        failures, logged_in_again = 0, False
        while True:
            headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
            retry_after: float | None = None
            left = None if self.deadline is None else self.deadline - time.time()
            if left is not None:
                if left <= 0:
                    raise _TimedOut
                kwargs["timeout"] = min(self.settings.timeout, left)  # the answer must come by the deadline
            try:
                response = await self.http.request(method, path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                if self.deadline is not None and time.time() >= self.deadline:
                    raise _TimedOut from None
                problem = self._transport_problem(exc)
            else:
                if response.status_code == 401 and auth and not logged_in_again:
                    logged_in_again = True
                    self.trigger.log.info("Looker refused the access token (expired?); logging in again")
                    await self.login()
                    continue
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem = f"Looker answered HTTP {response.status_code}"
                retry_after = _retry_after(response)
            failures += 1
            if failures > self.trigger.retries:
                retries = f"{self.trigger.retries} {'retry' if self.trigger.retries == 1 else 'retries'}"
                raise _Failed(self.redact(f"{action}: {problem} (gave up after {retries})"))
            wait = min(
                MAX_RETRY_WAIT,
                retry_after if retry_after is not None else self.trigger.retry_backoff * 2 ** (failures - 1),
            )
            left = None if self.deadline is None else self.deadline - time.time()
            if left is not None and wait >= left:  # the retry would come after the deadline
                self.trigger.log.warning(
                    "%s",
                    self.redact(
                        f"{action}: {problem}; a retry in {wait:g} s would come after the timeout, in "
                        f"{max(0.0, left):.1f} s"
                    ),
                )
                await asyncio.sleep(max(0.0, left))
                raise _TimedOut
            self.trigger.log.warning(
                "%s",
                self.redact(f"{action}: {problem}; retry {failures} of {self.trigger.retries} in {wait:g} s"),
            )
            await asyncio.sleep(wait)

    def _transport_problem(self, exc: BaseException) -> str:
        """Describe a transport failure in a few words (no secret: only the base URL and the reason)."""
        base = self.settings.base_url
        if isinstance(exc, httpx.TimeoutException):
            return f"{base} did not answer within {self.settings.timeout:g} seconds (timeout)"
        kind, reason = transport_problem(exc)
        errno = next((e.errno for e in exception_chain(exc) if isinstance(e, OSError) and e.errno), None)
        if kind == UNREACHABLE and errno:  # asyncio words it "Connect call failed (host, port)"
            reason = f"[Errno {errno}] {os.strerror(errno)}"
        if kind in (PLAIN_HTTP, TLS):
            return f"TLS failure talking to {base}: {reason}"
        if kind == TIMEOUT:
            return f"{base} did not answer within {self.settings.timeout:g} seconds (timeout)"
        return f"cannot reach {base}: {reason}"

    async def close(self) -> None:
        """Log out (``DELETE /logout``, when logged in; failures only logged) and close the HTTP client."""
        try:
            if self.token:
                headers = {"Authorization": f"Bearer {self.token}"}
                await self.http.delete(
                    "/logout", headers=headers, timeout=min(self.settings.timeout, LOGOUT_TIMEOUT)
                )
        except Exception as exc:  # logging out must not hide the outcome; the token expires on its own
            self.trigger.log.warning(
                "Could not log out of Looker (%s); the token expires on its own", type(exc).__name__
            )
        finally:
            self.token = None
            await self.http.aclose()


def _json(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object (``{}`` when it is not one)."""
    try:
        value = json.loads(response.content[:1_048_576])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _message(response: httpx.Response) -> str:
    """Looker's ``message`` from an error answer (or the start of the body)."""
    message = _json(response).get("message")
    if isinstance(message, str) and message:
        return message
    return " ".join(response.content[:DETAILS_CHARS].decode("utf-8", "replace").split())


def _retry_after(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds, when it gives a number."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
