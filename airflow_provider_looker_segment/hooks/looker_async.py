"""
The Looker API from Airflow's triggerer: an asynchronous client (``httpx``, which ships with Airflow) that
logs in with the connection's API key, retries transport errors and HTTP 429/5xx with backoff (or the
``Retry-After`` Looker asks for), logs in again when a token expires, never waits past an optional deadline,
counts its API calls per kind, and logs out at the end. Used by the triggers of
:mod:`airflow_provider_looker_segment.triggers.looker`; its messages never carry the client secret or the
access token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import httpx

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.hooks.looker_connection import (
    CREDENTIAL_STATUSES,
    RETRY_STATUSES,
    LookerConnectionSettings,
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

__all__ = [
    "API_PREFIX",
    "DETAILS_CHARS",
    "MAX_RETRY_WAIT",
    "AsyncLookerClient",
    "LookerCallFailed",
    "LookerCredentialsRefused",
    "LookerTimedOut",
    "json_object",
    "looker_message",
]

API_PREFIX = "/api/4.0"
#: Longest wait between two retries of a request that failed (``Retry-After`` included), in seconds.
MAX_RETRY_WAIT = 60.0
#: Seconds allowed for logging out at the end.
LOGOUT_TIMEOUT = 10.0
#: Characters of Looker's error details kept in a message.
DETAILS_CHARS = 500
#: Seconds before a token's announced expiry at which it is renewed (no request is sent with a stale token).
TOKEN_MARGIN = 60.0


class LookerCallFailed(Exception):
    """A call cannot go on: the message says why (already redacted)."""


class LookerCredentialsRefused(LookerCallFailed):
    """Looker refused the connection's API credentials (no retry changes that)."""


class LookerTimedOut(Exception):
    """The deadline: a request or a wait before a retry would have gone past it."""


class AsyncLookerClient:
    """
    A Looker API session for a trigger: login, requests with retries and a second login on 401, logout.

    :param conn_id: the Airflow connection (for messages).
    :param settings: its settings (``settings_from_connection``).
    :param log: where retries and re-logins are logged.
    :param retries: retries of a request that failed with a connection error, HTTP 429 or 5xx.
    :param retry_backoff: seconds before the first retry, doubled for each further one.
    :param deadline: with a deadline (Unix time), no request nor wait before a retry goes past it
        (:class:`LookerTimedOut`).
    """

    def __init__(
        self,
        conn_id: str,
        settings: LookerConnectionSettings,
        *,
        log: logging.Logger | Any,
        retries: int = 3,
        retry_backoff: float = 2.0,
        deadline: float | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.settings = settings
        self.log = log
        self.retries = retries
        self.retry_backoff = retry_backoff
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
        if response.status_code in CREDENTIAL_STATUSES:
            raise LookerCredentialsRefused(
                self.redact(
                    f"Looker rejected the API credentials of connection '{self.conn_id}' "
                    f"(client ID {self.settings.client_id}) at {self.settings.base_url}: HTTP "
                    f"{response.status_code} {looker_message(response)}. Check the client ID and secret."
                )
            )
        if response.status_code != 200:
            raise LookerCallFailed(
                self.redact(
                    f"Logging in to Looker at {self.settings.base_url} failed (HTTP {response.status_code}): "
                    f"{looker_message(response)}"
                )
            )
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
            if failures > self.retries:
                retries = f"{self.retries} {'retry' if self.retries == 1 else 'retries'}"
                raise LookerCallFailed(self.redact(f"{action}: {problem} (gave up after {retries})"))
            wait = min(
                MAX_RETRY_WAIT,
                retry_after if retry_after is not None else self.retry_backoff * 2 ** (failures - 1),
            )
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
                "%s", self.redact(f"{action}: {problem}; retry {failures} of {self.retries} in {wait:g} s")
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


def looker_message(response: httpx.Response) -> str:
    """Looker's ``message`` from an error answer (or the start of the body)."""
    message = json_object(response).get("message")
    if isinstance(message, str) and message:
        return message
    return " ".join(response.content[:DETAILS_CHARS].decode("utf-8", "replace").split())


def _retry_after(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds, when it gives a number."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
