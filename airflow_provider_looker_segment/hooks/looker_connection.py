"""
The Looker connection: its settings (:func:`settings_from_connection`, shared by the hook and the triggers),
looker_sdk settings taken from it alone (:class:`LookerSdkSettings`), the one retry policy of Looker requests
(:class:`RetryPolicy`), and the HTTP session (``verify`` always applied) that looker_sdk and the result
streams share.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import requests
import urllib3
from looker_sdk.rtl import api_settings
from looker_sdk.sdk import constants as sdk_constants
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.exceptions import ConnectionConfigError
from airflow_provider_looker_segment.net import normalise_base_url
from airflow_provider_looker_segment.params import to_bool, to_number

#: The hook's logger: retries are logged under the hook module's name.
_log = logging.getLogger("airflow_provider_looker_segment.hooks.looker")

DEFAULT_TIMEOUT = 120.0
#: Statuses retried with backoff (before a body starts), as are connection errors.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Longest wait between two retries of a request that failed (``Retry-After`` included), in seconds.
MAX_RETRY_WAIT = 60.0
#: What ``POST /login`` answers to credentials it refuses (Looker answers 404 to a wrong client id or secret;
#: 400 to a malformed login): only these are reported as a credentials problem.
CREDENTIAL_STATUSES = (400, 401, 403, 404)
#: The POST paths retried like idempotent calls on 429 and 5xx answers (and connection errors): a login, a
#: query or a query task Looker refused with such an answer was not made. A POST whose answer broke off is not
#: retried (it may have been made).
RETRIED_POSTS = ("/login", "/queries", "/query_tasks")
#: Whether the request being sent in this thread is one of :data:`RETRIED_POSTS` (read by the retry policy).
_retried_post = threading.local()


# --- connection settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LookerConnectionSettings:
    """
    What the hook needs from the Airflow connection, validated and normalised.

    :param base_url: ``scheme://host[:port]`` of the Looker API (no path, no trailing slash).
    :param client_id: API client id (connection Login).
    :param client_secret: API client secret (connection Password); never shown in ``repr``.
    :param verify_ssl: verify the server's TLS certificate.
    :param timeout: seconds allowed for connecting and for each read.
    """

    base_url: str
    client_id: str
    client_secret: str = field(repr=False)
    verify_ssl: bool = True
    timeout: float = DEFAULT_TIMEOUT


def settings_from_connection(conn: Any) -> LookerConnectionSettings:
    """
    Build :class:`LookerConnectionSettings` from an Airflow connection (JSON or URI form).

    :param conn: an ``airflow.sdk.Connection``.
    :raises ConnectionConfigError: no Login or Password, or an unusable Host.
    :raises InvalidParameterError: an extra that is not a boolean (``verify_ssl``) or a positive number
        (``timeout``).
    """
    extra = conn.extra_dejson or {}
    client_id = (conn.login or "").strip()
    client_secret = conn.password or ""
    if not client_id or not client_secret:
        missing = (
            "Login (the client ID of a Looker API key)"
            if not client_id
            else "Password (the client secret of the Looker API key)"
        )
        raise ConnectionConfigError(f"The Looker connection '{conn.conn_id}' has no {missing}")
    of = f"extra of connection '{conn.conn_id}'"
    timeout = to_number(extra.get("timeout"), name=f"timeout ({of})", default=DEFAULT_TIMEOUT, above=0)
    return LookerConnectionSettings(
        base_url=normalise_base_url(conn.host, conn.schema, conn.port, what="The Looker connection"),
        client_id=client_id,
        client_secret=client_secret,
        verify_ssl=to_bool(extra.get("verify_ssl"), name=f"verify_ssl ({of})", default=True),
        timeout=float(timeout),
    )


class LookerSdkSettings(api_settings.ApiSettings):
    """
    looker_sdk settings taken from the Airflow connection only: no ``looker.ini``, no ``LOOKERSDK_*``.

    ``read_config`` returns strings only — looker_sdk silently drops settings that are not strings.

    :param settings: the connection's settings.
    """

    def __init__(self, settings: LookerConnectionSettings) -> None:
        self._config = {
            "base_url": settings.base_url,
            "client_id": settings.client_id,
            "client_secret": settings.client_secret,
            "verify_ssl": "true" if settings.verify_ssl else "false",
            "timeout": str(max(1, math.ceil(settings.timeout))),
        }
        super().__init__(filename="", sdk_version=sdk_constants.sdk_version, env_prefix=None)
        # The transport hands this to requests as is, so a fractional timeout is kept exactly.
        self.timeout = settings.timeout  # type: ignore[assignment]

    def read_config(self) -> api_settings.SettingsConfig:
        """Return the connection's settings (strings only)."""
        return cast(api_settings.SettingsConfig, dict(self._config))


# --- HTTP session -----------------------------------------------------------------------------------------


class _BoundedRetry(Retry):
    """
    urllib3 ``Retry`` whose ``Retry-After`` waits are capped by ``backoff_max`` and logged, and that retries
    the answers of :data:`RETRIED_POSTS` as those of idempotent calls (429 and 5xx: Looker did not act).
    """

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        """Whether an answer is retried: as urllib3 decides, a POST of :data:`RETRIED_POSTS` as a GET."""
        if method == "POST" and getattr(_retried_post, "active", False):
            method = "GET"
        return super().is_retry(method, status_code, has_retry_after)

    def get_retry_after(self, response: Any) -> float | None:
        """Return the server's ``Retry-After`` in seconds, at most ``backoff_max`` (unreadable: ``None``)."""
        try:
            value = super().get_retry_after(response)
        except urllib3.exceptions.InvalidHeader:
            return None
        return None if value is None else min(value, self.backoff_max)

    def sleep(self, response: Any = None) -> None:
        """Log the wait before the next attempt (what failed, which call, how long, which try), then wait."""
        last = self.history[-1] if self.history else None
        asked = self.get_retry_after(response) if response is not None else None
        wait, why = (asked, "Retry-After") if asked else (self.get_backoff_time(), "backoff")
        if last is not None:
            call = f"{last.method} {urlsplit(last.url or '').path}"  # the path only: no query, no secret
            what = f"answered HTTP {last.status} to {call}" if last.status else f"request {call} failed"
            what += "" if last.status else f" ({type(last.error).__name__})"
            done = len(self.history)
            of = done + int(self.total or 0)
            _log.warning("%s", f"Looker {what}; retry {done} of {of} in {wait:g} s ({why})")
        if wait > 0:
            time.sleep(wait)


class LookerSession(requests.Session):
    """
    The HTTP session shared by looker_sdk and the result streams.

    It always applies its own ``verify`` (plain ``requests`` lets ``REQUESTS_CA_BUNDLE`` override a
    session's ``verify=False``), remembers, per thread, the last request's URL, status and error, so
    that errors looker_sdk reports without a status can be explained, and counts the API calls sent per
    kind (:attr:`calls`; a retried request once per attempt).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last = threading.local()
        self.calls = ApiCallCounts()

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        """Send a request (see :meth:`requests.Session.request`), recording its outcome."""
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        last = self.last
        last.url, last.status, last.error = str(url), None, None
        verb = method.decode() if isinstance(method, bytes) else str(method)
        path = urlsplit(str(url)).path
        _retried_post.active = verb.upper() == "POST" and path.endswith(RETRIED_POSTS)
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as exc:
            last.error = exc
            self.calls.add(verb, path)
            raise
        finally:
            _retried_post.active = False
        retries = getattr(getattr(response, "raw", None), "retries", None)
        self.calls.add(verb, path, 1 + len(getattr(retries, "history", None) or ()))
        last.status = response.status_code
        return response


@dataclass(frozen=True)
class RetryPolicy:
    """
    The one retry policy of Looker requests, sync (:meth:`session`: urllib3 retries under looker_sdk and the
    result streams) and async (the triggers' client, :meth:`wait`): connection errors and
    :data:`RETRY_STATUSES` answers are retried ``retries`` times, after the ``Retry-After`` Looker asks for or
    an exponential backoff, never waiting longer than ``max_wait``.

    :param retries: retries of a failed request.
    :param backoff: the backoff factor, doubled for each further retry.
    :param max_wait: longest wait between two tries (seconds).
    """

    retries: int = 3
    backoff: float = 1.0
    max_wait: float = MAX_RETRY_WAIT

    def wait(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds before the next try after ``failures`` failures: ``Retry-After``, else the backoff."""
        return min(
            self.max_wait, retry_after if retry_after is not None else self.backoff * 2 ** (failures - 1)
        )

    def session(self) -> LookerSession:
        """
        A session that retries with this policy (urllib3's backoff: the first retry at once): idempotent
        methods, and the logins, queries and query tasks of :data:`RETRIED_POSTS`.
        """
        retry = _BoundedRetry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=0,
            backoff_factor=self.backoff,
            backoff_max=self.max_wait,
            status_forcelist=RETRY_STATUSES,
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        session = LookerSession()
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session
