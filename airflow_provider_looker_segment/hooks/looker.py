"""
Hook for the Looker API 4.0: a Look's definition, and its result streamed row by row with field metadata.

This is the only module of the provider that talks to Looker. The ``looker_sdk`` client is built from the
Airflow connection alone (no ``looker.ini``, ``LOOKERSDK_*`` variables ignored). Look results are streamed:
the SDK's authentication headers are reused for a streaming ``requests`` call whose ``json_detail`` body is
read by :class:`~airflow_provider_looker_segment.look_stream.LookStream`, so peak memory does not depend on
the number of rows. :meth:`LookerHook.close` logs out of Looker: use the hook as a context manager.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlsplit

import requests
import urllib3
from airflow.sdk import BaseHook
from cattrs.errors import CattrsError
from looker_sdk import error as sdk_error
from looker_sdk.rtl import api_settings, auth_session, auth_token, requests_transport, serialize
from looker_sdk.sdk import constants as sdk_constants
from looker_sdk.sdk.api40 import methods as methods40
from looker_sdk.sdk.api40 import models as models40
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from airflow_provider_looker_segment.exceptions import (
    ConnectionConfigError,
    LookDeletedError,
    LookerApiError,
    LookerSegmentError,
    LookNotFoundError,
)
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo
from airflow_provider_looker_segment.net import (
    PLAIN_HTTP,
    TIMEOUT,
    TLS,
    normalise_base_url,
    redact,
    transport_problem,
)
from airflow_provider_looker_segment.params import to_bool, to_number

T = TypeVar("T")
_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
API_VERSION = "4.0"
#: Statuses retried with backoff (before a body starts), as are connection errors.
RETRY_STATUSES = (429, 500, 502, 503, 504)

#: What looker_sdk raises on a body it cannot deserialize.
_DESERIALIZE_ERRORS = (serialize.DeserializeError, CattrsError, KeyError, TypeError, ValueError)


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
        missing = "Login (API client ID)" if not client_id else "Password (API client secret)"
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


class ConnectionApiSettings(api_settings.ApiSettings):
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
    """urllib3 ``Retry`` whose ``Retry-After`` waits are capped by ``backoff_max`` and logged."""

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
    session's ``verify=False``) and remembers, per thread, the last request's URL, status and error, so
    that errors looker_sdk reports without a status can be explained.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last = threading.local()

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        """Send a request (see :meth:`requests.Session.request`), recording its outcome."""
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        last = self.last
        last.url, last.status, last.error = str(url), None, None
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as exc:
            last.error = exc
            raise
        last.status = response.status_code
        return response


def _make_session(retries: int, backoff_factor: float, max_backoff: float) -> LookerSession:
    """Return a session that retries connection errors, 429 and 5xx (idempotent methods) with backoff."""
    retry = _BoundedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        backoff_factor=backoff_factor,
        backoff_max=max_backoff,
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


# --- Looker's answers -----------------------------------------------------------------------------------


def _looker_message(text: str) -> str:
    """Return Looker's ``message`` from an error body (or the text itself, shortened)."""
    text = text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return text[:500]


def _look_info(look_id: str, look: models40.LookWithQuery) -> LookInfo:
    """Build :class:`LookInfo` from looker_sdk's ``LookWithQuery``."""
    query = look.query
    vis = (query.vis_config if query else None) or {}
    limit_text = (query.limit if query else None) or ""
    return LookInfo(
        id=str(look.id or look_id),
        title=look.title or "",
        model=query.model if query else None,
        view=query.view if query else None,
        fields=tuple(query.fields or ()) if query else (),
        limit=int(limit_text) if re.fullmatch(r"-?\d+", limit_text.strip()) else None,
        pivots=tuple(query.pivots or ()) if query else (),
        hidden_fields=tuple(vis.get("hidden_fields") or ()),
        deleted=bool(look.deleted),
    )


def _normalise_look_id(look_id: str | int) -> str:
    text = str(look_id).strip()
    if not text:
        raise LookerApiError("A Look id is required (got an empty value)")
    return text


# --- the hook ---------------------------------------------------------------------------------------------


class LookerHook(BaseHook):
    """
    Talk to the Looker API 4.0 with the credentials of an Airflow connection.

    The connection (type ``looker``): Host = the API base URL (``https://company.cloud.looker.com``, a port
    such as ``:19999`` in the URL or in Port), Login = API client ID, Password = API client secret; extras
    ``verify_ssl`` (default true) and ``timeout`` (seconds, default 120).

    Use it as a context manager: on exit, failed or not, it logs out of Looker (:meth:`close`)::

        with LookerHook("looker_default") as looker, looker.stream_look(42) as stream:
            for row in stream.rows:
                ...

    :param looker_conn_id: the Airflow connection id.
    :param retries: retries of a request that failed with a connection error, 429 or 5xx before its body
        started (idempotent requests only).
    :param backoff_factor: exponential backoff between retries: ``backoff_factor * 2 ** (retry - 1)`` s.
    :param max_backoff: longest wait between two retries, ``Retry-After`` included (seconds).
    """

    conn_name_attr = "looker_conn_id"
    default_conn_name = "looker_default"
    conn_type = "looker"
    hook_name = "Looker"

    def __init__(
        self,
        looker_conn_id: str = default_conn_name,
        *,
        retries: int = 3,
        backoff_factor: float = 1.0,
        max_backoff: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.looker_conn_id = looker_conn_id
        self.retries = retries
        self.backoff_factor = backoff_factor
        self.max_backoff = max_backoff

    # --- client -------------------------------------------------------------------------------------------

    @cached_property
    def settings(self) -> LookerConnectionSettings:
        """The connection's settings, resolved once per hook."""
        return settings_from_connection(self.get_connection(self.looker_conn_id))

    @cached_property
    def session(self) -> LookerSession:
        """The HTTP session (with retries) shared by looker_sdk and result streams."""
        return _make_session(self.retries, self.backoff_factor, self.max_backoff)

    @cached_property
    def sdk(self) -> methods40.Looker40SDK:
        """A looker_sdk 4.0 client configured from the connection alone."""
        settings = ConnectionApiSettings(self.settings)
        transport = requests_transport.RequestsTransport(settings, self.session)
        auth = auth_session.AuthSession(settings, transport, serialize.deserialize40, API_VERSION)
        return methods40.Looker40SDK(
            auth, serialize.deserialize40, serialize.serialize40, transport, API_VERSION
        )

    def get_conn(self) -> methods40.Looker40SDK:
        """Return the looker_sdk 4.0 client."""
        return self.sdk

    def close(self) -> None:
        """
        Log out of Looker (``DELETE /api/4.0/logout``, when logged in) and close the HTTP session.

        Never raises: a failed logout is logged without its details (they could echo the access token), and
        the token then expires on its own. The hook can still be used afterwards (it logs in again).
        """
        if "sdk" in self.__dict__ and self.sdk.auth.is_authenticated:
            try:
                self.sdk.logout()  # DELETE /api/4.0/logout with the current token
            except Exception as exc:  # closing must not hide the run's own outcome
                self.log.warning(
                    "Could not log out of Looker (%s); the token expires on its own", type(exc).__name__
                )
            finally:
                self._forget_token()
        if "session" in self.__dict__:
            self.session.close()

    def __enter__(self) -> LookerHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- public API ---------------------------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Log in and read the API user; return ``(ok, message)`` for the UI's Test button."""
        try:
            user = self._call("Reading the API user", lambda: self.sdk.me(fields="id,display_name,email"))
        except LookerSegmentError as exc:
            return False, self._redact(str(exc))
        except Exception as exc:  # e.g. the connection does not exist: the UI shows the message
            return False, self._redact(f"{type(exc).__name__}: {exc}")
        name = user.display_name or user.email or f"user {user.id}"
        return True, f"Connected to {self.settings.base_url} as {name}"

    def get_look(self, look_id: str | int) -> LookInfo:
        """
        Return a Look's saved definition.

        :param look_id: the Look id.
        :raises LookNotFoundError: the Look does not exist or the API user cannot see it.
        :raises LookDeletedError: the Look is in the trash.
        """
        look_id = _normalise_look_id(look_id)
        look = self._call(f"Reading Look {look_id}", lambda: self.sdk.look(look_id), look_id=look_id)
        info = _look_info(look_id, look)
        if info.deleted:
            raise LookDeletedError(
                f"Look {look_id} is deleted (it is in Looker's trash): restore it or use another Look",
                look_id=look_id,
            )
        return info

    @contextmanager
    def stream_look(
        self, look_id: str | int, *, limit: int | None = -1, cache: bool = True, strict_limit: bool = False
    ) -> Iterator[LookStream]:
        """
        Run a Look and stream its result (``json_detail``, raw values, visualisation not applied).

        :param look_id: the Look id.
        :param limit: row limit; ``-1`` (default) for all rows, ``None`` for the Look's saved limit.
        :param cache: let Looker answer from its cache.
        :param strict_limit: raise :class:`LookTruncatedError` instead of warning when the number of rows
            equals the limit in effect (the result may be truncated).
        :return: a context manager giving a :class:`LookStream`; the HTTP response is closed on exit (the
            hook stays logged in until :meth:`close`).
        """
        look_id = _normalise_look_id(look_id)
        info = self.get_look(look_id)
        effective = info.limit if limit is None else int(limit)
        self.log.info("Running Look %s (%s): limit %s, cache %s", look_id, info.title, effective, cache)
        response = self._open_result(look_id, None if limit is None else int(limit), cache)
        try:
            yield LookStream(
                look_id,
                response.raw,
                info,
                effective,
                strict_limit=strict_limit,
                read_timeout=self.settings.timeout,
                logger=self.log,
                redact=self._redact,
            )
        finally:
            response.close()

    # --- internals ----------------------------------------------------------------------------------------

    def _open_result(self, look_id: str, limit: int | None, cache: bool) -> requests.Response:
        """Start the ``json_detail`` run and return the response once its status is 200 (body unread)."""
        url = f"{self.settings.base_url}/api/{API_VERSION}/looks/{quote(look_id, safe='')}/run/json_detail"
        params = {"apply_formatting": "false", "apply_vis": "false", "cache": "true" if cache else "false"}
        if limit is not None:
            params["limit"] = str(limit)
        action = f"Running Look {look_id}"
        for attempt in range(2):
            headers = self._call("Logging in to Looker", lambda: self.sdk.auth.authenticate({}))
            try:
                response = self.session.get(
                    url, params=params, headers=headers, stream=True, timeout=self.settings.timeout
                )
            except requests.RequestException as exc:
                raise LookerApiError(self._transport_message(action, exc), look_id=look_id) from exc
            if response.status_code == 401 and attempt == 0:
                response.close()
                self.log.info("Looker refused the access token (expired?); logging in again")
                self._forget_token()
                continue
            if response.status_code != 200:
                message = _looker_message(response.text[:65536])
                response.close()
                raise self._http_error(action, response.status_code, message, look_id=look_id)
            response.raw.decode_content = True
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, action: str, func: Callable[[], T], *, look_id: str | None = None) -> T:
        """Run a looker_sdk call; log in again once on 401; turn SDK errors into :class:`LookerApiError`."""
        for attempt in range(2):
            try:
                return func()
            except sdk_error.SDKError as exc:
                last = self.session.last
                status, url = getattr(last, "status", None), getattr(last, "url", "")
                transport_error = getattr(last, "error", None)
                login = url.endswith("/login")
                if status == 401 and not login and attempt == 0:
                    self._forget_token()
                    continue
                if transport_error is not None:
                    raise LookerApiError(
                        self._transport_message(action, transport_error), look_id=look_id
                    ) from None
                message = _looker_message(exc.message or "")
                raise self._http_error(action, status, message, look_id=look_id, login=login) from None
            except _DESERIALIZE_ERRORS as exc:
                status = getattr(self.session.last, "status", None)
                raise LookerApiError(
                    f"{action}: Looker's answer could not be read ({type(exc).__name__}); "
                    f"is Host the Looker API URL ({self.settings.base_url})?",
                    status=status,
                    look_id=look_id,
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(
        self,
        action: str,
        status: int | None,
        message: str,
        *,
        look_id: str | None = None,
        login: bool = False,
    ) -> LookerApiError:
        """Turn an HTTP error answer into the provider's exception, with a message a user can act on."""
        message = self._redact(message)
        if login:
            return LookerApiError(
                f"Looker rejected the API credentials of connection '{self.looker_conn_id}' "
                f"(client ID {self.settings.client_id}) at {self.settings.base_url}: "
                f"HTTP {status} {message}. Check the client ID and secret.",
                status=status,
            )
        if status == 404 and look_id is not None:
            return LookNotFoundError(
                f"Look {look_id} not found, or the API user cannot see it", status=404, look_id=look_id
            )
        if status == 401:
            return LookerApiError(
                f"{action}: Looker refused the API user even after logging in again (HTTP 401): {message}",
                status=status,
                look_id=look_id,
            )
        shown = f"HTTP {status}" if status else "error"
        return LookerApiError(f"{action} failed ({shown}): {message}", status=status, look_id=look_id)

    def _transport_message(self, action: str, exc: BaseException) -> str:
        """Describe a connection-level failure (TLS, timeout, unreachable host, closed connection)."""
        kind, reason = transport_problem(exc)
        base = self.settings.base_url
        if kind == PLAIN_HTTP:
            text = (
                f"{action}: TLS failure talking to {base}: {reason}. The Host says https:// but this port "
                "speaks plain HTTP: use http://, or the port of Looker's HTTPS API"
            )
        elif kind == TLS:
            text = (
                f"{action}: TLS failure talking to {base}: {reason}. Install the server's CA certificate, "
                "or set verify_ssl to false in the connection (test servers only)"
            )
        elif kind == TIMEOUT:
            text = f"{action}: {base} did not answer within {self.settings.timeout:g} seconds (timeout)"
        else:
            text = f"{action}: cannot reach {base}: {reason}"
        return self._redact(text)

    def _forget_token(self) -> None:
        """Drop the access token so that the next call logs in again."""
        self.sdk.auth.token = auth_token.AuthToken()

    def _redact(self, text: str) -> str:
        """Remove the client secret and the access token from a text that may echo a server's answer."""
        secrets = [self.settings.client_secret] if "settings" in self.__dict__ else []
        if "sdk" in self.__dict__:
            secrets.append(self.sdk.auth.token.access_token)
        return redact(text, secrets)
