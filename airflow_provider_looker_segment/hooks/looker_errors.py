"""
The words of a failed Looker request, shared by the sync hook and the triggers' async client: Looker's message
from an error answer, a transport failure in a few words, and the provider's exception for an HTTP error or a
transport error (:class:`LookerRequestError` when no retry would change it). See docs/troubleshooting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from airflow_provider_looker_segment.exceptions import LookerApiError, LookerRequestError, LookNotFoundError
from airflow_provider_looker_segment.hooks.looker_connection import (
    CREDENTIAL_STATUSES,
    RETRY_STATUSES,
    LookerConnectionSettings,
)
from airflow_provider_looker_segment.net import PLAIN_HTTP, TIMEOUT, TLS, transport_problem

#: Client errors that can pass (a request timeout, a rate limit): retried, unlike the other 4xx answers.
PASSING_CLIENT_STATUSES = (408, 429)
#: Characters of an error answer kept in a message when it is not Looker's JSON.
DETAILS_CHARS = 500


def looker_message(text: str) -> str:
    """Return Looker's ``message`` from an error body, with the details of a ``ValidationError``."""
    text = text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:DETAILS_CHARS]
    if isinstance(body, dict) and body.get("message"):
        details = [e for e in body.get("errors") or () if isinstance(e, dict)]
        return with_details(str(body["message"]), [(e.get("field"), e.get("message")) for e in details])
    return text[:DETAILS_CHARS]


def with_details(message: str, details: list[tuple[Any, Any]]) -> str:
    """``Validation Failed (filters: Invalid filter: x)``: a message with its per-field details."""
    parts = [f"{name}: {text}" if name else str(text) for name, text in details if text or name]
    return f"{message} ({'; '.join(parts)})" if parts else message


def transport_words(kind: str, reason: str, base_url: str, timeout: float) -> str:
    """A transport failure (:func:`~airflow_provider_looker_segment.net.transport_problem`) in a few words."""
    if kind in (PLAIN_HTTP, TLS):
        return f"TLS failure talking to {base_url}: {reason}"
    if kind == TIMEOUT:
        return f"{base_url} did not answer within {timeout:g} seconds (timeout)"
    return f"cannot reach {base_url}: {reason}"


def transport_error(
    action: str,
    exc: BaseException,
    settings: LookerConnectionSettings,
    *,
    look_id: str | None = None,
    redact: Callable[[str], str] = str,
) -> LookerApiError:
    """
    Describe a connection-level failure (TLS, timeout, unreachable host, closed connection): a
    :class:`LookerRequestError` (no retry) for a wrong scheme or port and an untrusted certificate, a
    :class:`LookerApiError` (retried) for the rest. The text holds no secret (the base URL and the reason).
    """
    kind, reason = transport_problem(exc)
    text = f"{action}: {transport_words(kind, reason, settings.base_url, settings.timeout)}"
    if kind == PLAIN_HTTP:
        text += (
            ". The Host says https:// but this port speaks plain HTTP: use http://, or the port of Looker's "
            "HTTPS API"
        )
    elif kind == TLS:
        text += (
            ". Install the server's CA certificate, or set verify_ssl to false in the connection (test "
            "servers only)"
        )
    lasting = kind == PLAIN_HTTP or (kind == TLS and reason == "CERTIFICATE_VERIFY_FAILED")
    return (LookerRequestError if lasting else LookerApiError)(redact(text), look_id=look_id)


def http_error(
    action: str,
    status: int | None,
    message: str,
    *,
    conn_id: str,
    settings: LookerConnectionSettings,
    retries: int,
    look_id: str | None = None,
    login: bool = False,
) -> LookerApiError:
    """
    Turn an HTTP error answer into the provider's exception, with a message a user can act on: a
    :class:`LookerRequestError` (the task fails at once) when no retry would change the answer, i.e. a 4xx
    other than 408 and 429; a :class:`LookerApiError` (retried) otherwise.

    :param message: Looker's message (:func:`looker_message`), already redacted.
    :param login: the request was ``POST /login``.
    """
    base = settings.base_url
    lasting = status is not None and 400 <= status < 500 and status not in PASSING_CLIENT_STATUSES
    if login and status in CREDENTIAL_STATUSES:
        return LookerRequestError(
            f"Looker rejected the API credentials of connection '{conn_id}' (client ID {settings.client_id}) "
            f"at {base}: HTTP {status} {message}. Check the client ID and secret.",
            status=status,
        )
    if login and lasting:  # another 4xx (405, 422...): no retry changes it, nor is it the credentials
        return LookerRequestError(
            f"Logging in to Looker at {base} failed (HTTP {status}): {message.rstrip('.')}. "
            "Is Host the Looker API URL?",
            status=status,
        )
    if login:  # 429, 5xx...: Looker busy or unavailable (an upgrade), not refusing the credentials
        retried = f", still after {retries} retries" if status in RETRY_STATUSES else ""
        return LookerApiError(
            f"Logging in to Looker at {base} failed (HTTP {status}{retried}): {message.rstrip('.')}. "
            "Looker is limiting requests or unavailable (e.g. during an upgrade); this is not about the "
            "credentials: let the task retry later.",
            status=status,
        )
    if status == 404 and look_id is not None:
        return LookNotFoundError(
            f"Look {look_id} not found, or the API user cannot see it", status=404, look_id=look_id
        )
    if status == 401:
        return LookerRequestError(
            f"{action}: Looker refused the API user even after logging in again (HTTP 401): {message}",
            status=status,
            look_id=look_id,
        )
    shown = f"HTTP {status}" if status else "error"
    error = LookerRequestError if lasting else LookerApiError
    return error(f"{action} failed ({shown}): {message}", status=status, look_id=look_id)
