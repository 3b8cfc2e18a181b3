"""
The Looker API from Airflow's triggerer (``httpx``, which ships with Airflow): :class:`AsyncLookerClient` logs
in with the connection's API key, retries with backoff (or Looker's ``Retry-After``) never past an optional
deadline, logs in again when a token expires, counts its API calls and logs out; the triggers of
:mod:`airflow_provider_looker_segment.triggers.looker` only ``await`` its ``get_...`` methods (what they do:
docs/sources.md, Deferrable mode and Looker's API budget). Its messages use :mod:`.looker_errors`'s words and
never carry the client secret or the access token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import httpx
from airflow.sdk import BaseHook

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.hooks.looker_connection import (
    CREDENTIAL_STATUSES,
    RETRY_STATUSES,
    LookerConnectionSettings,
    RetryPolicy,
    settings_from_connection,
)
from airflow_provider_looker_segment.hooks.looker_errors import (
    DETAILS_CHARS,
    http_error,
    looker_message,
    transport_words,
)
from airflow_provider_looker_segment.net import (
    TIMEOUT,
    UNREACHABLE,
    exception_chain,
    redact,
    transport_problem,
)

API_PREFIX = "/api/4.0"
#: Seconds allowed for logging out at the end.
LOGOUT_TIMEOUT = 10.0
#: Seconds before a token's announced expiry at which it is renewed (no request is sent with a stale token).
TOKEN_MARGIN = 60.0


class LookerCallFailed(Exception):
    """A call cannot go on: the message says why (already redacted)."""


class LookerCallRefused(LookerCallFailed):
    """An answer no retry changes (HTTP 4xx other than 408 and 429, an unusable connection)."""


class LookerCredentialsRefused(LookerCallRefused):
    """Looker refused the connection's API credentials (no retry changes that)."""


class LookerTimedOut(Exception):
    """The deadline: a request or a wait before a retry would have gone past it."""


class AsyncLookerClient:
    """
    A Looker API session for a trigger: login, requests with retries and a second login on 401, logout.

    :param conn_id: the Airflow connection (for messages).
    :param settings: its settings (``settings_from_connection``).
    :param log: where retries and re-logins are logged.
    :param retry: how a request that failed with a connection error, HTTP 429 or 5xx is retried (its
        ``backoff``: seconds before the first retry, doubled for each further one).
    :param deadline: with a deadline (Unix time), no request nor wait before a retry goes past it
        (:class:`LookerTimedOut`).
    """

    def __init__(
        self,
        conn_id: str,
        settings: LookerConnectionSettings,
        *,
        log: logging.Logger | Any,
        retry: RetryPolicy = RetryPolicy(backoff=2.0),
        deadline: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.settings = settings
        self.log = log
        self.retry = retry
        self.deadline = deadline
        self.token: str | None = None
        self.token_expires: float | None = None
        self.calls = ApiCallCounts()
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
        if response.status_code != 200:
            failed = (
                LookerCredentialsRefused if response.status_code in CREDENTIAL_STATUSES else LookerCallFailed
            )
            raise failed(self.failure("Logging in to Looker", response, login=True))
        body = json_object(response)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise LookerCallFailed(
                f"Logging in to Looker: the answer has no access token; is Host the Looker API URL "
                f"({self.settings.base_url})?"
            )
        self.token = token
        expires_in = body.get("expires_in")
        self.token_expires = (
            time.monotonic() + float(expires_in) - TOKEN_MARGIN
            if isinstance(expires_in, int | float) and not isinstance(expires_in, bool)
            else None
        )

    async def ensure_login(self) -> None:
        """Log in unless a token is held that has not (nearly) expired."""
        if self.token is None or (self.token_expires is not None and time.monotonic() >= self.token_expires):
            self.token = None
            await self.login()

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
                    raise LookerTimedOut
                kwargs["timeout"] = min(self.settings.timeout, left)  # the answer must come by the deadline
            self.calls.add(method, f"{API_PREFIX}{path}")
            try:
                response = await self.http.request(method, path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                if self.deadline is not None and time.time() >= self.deadline:
                    raise LookerTimedOut from None
                problem = self._transport_problem(exc)
            else:
                if response.status_code == 401 and auth and not logged_in_again:
                    logged_in_again = True
                    self.log.info("Looker refused the access token (expired?); logging in again")
                    await self.login()
                    continue
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem = f"Looker answered HTTP {response.status_code}"
                retry_after = _retry_after(response)
            failures += 1
            if failures > self.retry.retries:
                retries = f"{self.retry.retries} {'retry' if self.retry.retries == 1 else 'retries'}"
                raise LookerCallFailed(self.redact(f"{action}: {problem} (gave up after {retries})"))
            wait = self.retry.wait(failures, retry_after)
            left = None if self.deadline is None else self.deadline - time.time()
            if left is not None and wait >= left:  # the retry would come after the deadline
                self.log.warning(
                    "%s",
                    self.redact(
                        f"{action}: {problem}; a retry in {wait:g} s would come after the timeout, in "
                        f"{max(0.0, left):.1f} s"
                    ),
                )
                await asyncio.sleep(max(0.0, left))
                raise LookerTimedOut
            self.log.warning(
                "%s",
                self.redact(f"{action}: {problem}; retry {failures} of {self.retry.retries} in {wait:g} s"),
            )
            await asyncio.sleep(wait)

    def _transport_problem(self, exc: BaseException) -> str:
        """Describe a transport failure in a few words (no secret: only the base URL and the reason)."""
        kind, reason = (TIMEOUT, "") if isinstance(exc, httpx.TimeoutException) else transport_problem(exc)
        errno = next((e.errno for e in exception_chain(exc) if isinstance(e, OSError) and e.errno), None)
        if kind == UNREACHABLE and errno:  # asyncio words it "Connect call failed (host, port)"
            reason = f"[Errno {errno}] {os.strerror(errno)}"
        return transport_words(kind, reason, self.settings.base_url, self.settings.timeout)

    def failure(self, action: str, response: httpx.Response, *, login: bool = False) -> str:
        """The message of an error answer (:func:`~.looker_errors.http_error`'s words), redacted."""
        message = self.redact(looker_message(response.content[:65536].decode("utf-8", "replace")))
        error = http_error(
            action,
            response.status_code,
            message,
            conn_id=self.conn_id,
            settings=self.settings,
            retries=self.retry.retries,
            login=login,
        )
        return self.redact(str(error))

    @classmethod
    async def for_connection(
        cls, conn_id: str, *, log: logging.Logger | Any, **options: Any
    ) -> AsyncLookerClient:
        """
        A client for an Airflow connection, read with the async hook method.

        :param options: ``retry``, ``deadline``: as for the class.
        :raises LookerCallRefused: the connection is missing or unusable (the message says why).
        """
        try:
            settings = settings_from_connection(await BaseHook.aget_connection(conn_id))
        except Exception as exc:
            raise LookerCallRefused(
                f"The Looker connection '{conn_id}' cannot be used: {type(exc).__name__}: {exc}"
            ) from None
        return cls(conn_id, settings, log=log, **options)

    # --- Looker's answers ---------------------------------------------------------------------------------

    async def get_query_task_status(self, task_id: str) -> str:
        """A query task's status (``GET /query_tasks/{id}?fields=id,status``), logging in when needed."""
        await self.ensure_login()
        action = f"Reading Looker query task {task_id}"
        response = await self.request(
            "GET", f"/query_tasks/{task_id}", action, params={"fields": "id,status"}
        )
        if response.status_code == 404:
            raise LookerCallFailed(
                f"Looker has no query task {task_id} (HTTP 404): it is unknown, or its results expired"
            )
        if response.status_code != 200:
            raise LookerCallFailed(self.failure(action, response))
        status = json_object(response).get("status")
        if not isinstance(status, str) or not status:
            raise LookerCallFailed(
                f"{action}: Looker's answer has no status; is Host the Looker API URL "
                f"({self.settings.base_url})?"
            )
        return status

    async def get_query_task_error(self, task_id: str) -> str:
        """The database's error of a failed query task, from its results (best effort: ``""`` if unknown)."""
        path = f"/query_tasks/{task_id}/results"
        try:
            response = await self.request("GET", path, "Reading the error of the query task")
        except (LookerCallFailed, LookerTimedOut):
            return ""
        if response.status_code != 200:
            text = response.content[:65536].decode("utf-8", "replace")
            return self.redact(looker_message(text))[:DETAILS_CHARS] if response.status_code == 400 else ""
        errors = json_object(response).get("errors")
        texts = [
            ": ".join(str(part).strip() for part in (e.get("message"), e.get("message_details")) if part)
            for e in (errors if isinstance(errors, list) else [])
            if isinstance(e, dict)
        ]
        return self.redact(" | ".join(text for text in texts if text))[:DETAILS_CHARS]

    async def kill_query_task(self, task_id: str) -> int:
        """Ask Looker to kill a query task's query (``DELETE /running_queries/{id}``); return the status."""
        await self.ensure_login()
        response = await self.request("DELETE", f"/running_queries/{task_id}", "Killing")
        return response.status_code

    async def get_datagroups(self) -> list[dict[str, Any]]:
        """
        Every datagroup Looker lists (``GET /datagroups``), logging in when needed.

        :raises LookerCallRefused: an answer no retry changes (a missing permission...).
        """
        await self.ensure_login()
        action = "Reading Looker's datagroups (GET /datagroups)"
        response = await self.request("GET", "/datagroups", action)
        if response.status_code != 200:
            hint = (
                " The API user needs a role with the see_datagroups permission."
                if response.status_code in (403, 404)
                else ""
            )
            raise LookerCallRefused(f"{self.failure(action, response)}.{hint}")
        body = json_value(response)
        if not isinstance(body, list):
            raise LookerCallRefused(
                f"{action}: Looker's answer is not a list of datagroups; is Host the Looker API URL "
                f"({self.settings.base_url})?"
            )
        return [entry for entry in body if isinstance(entry, dict)]

    async def close(self) -> None:
        """Log out (``DELETE /logout``, when logged in; failures only logged) and close the HTTP client."""
        try:
            if self.token:
                headers = {"Authorization": f"Bearer {self.token}"}
                self.calls.add("DELETE", f"{API_PREFIX}/logout")
                await self.http.delete(
                    "/logout", headers=headers, timeout=min(self.settings.timeout, LOGOUT_TIMEOUT)
                )
        except Exception as exc:  # logging out must not hide the outcome; the token expires on its own
            self.log.warning(
                "Could not log out of Looker (%s); the token expires on its own", type(exc).__name__
            )
        finally:
            self.token = None
            await self.http.aclose()


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object (``{}`` when it is not one)."""
    value = json_value(response)
    return value if isinstance(value, dict) else {}


def json_value(response: httpx.Response) -> Any:
    """The response's JSON value (``None`` when it is not JSON)."""
    try:
        return json.loads(response.content[:16_777_216])
    except ValueError:
        return None


def _retry_after(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds, when it gives a number."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
