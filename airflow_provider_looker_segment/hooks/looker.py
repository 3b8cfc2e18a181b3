"""
Hook for the Looker API 4.0: a Look's definition, and its result streamed row by row with field metadata.

This is the only module of the provider that talks to Looker (with :mod:`.looker_connection`,
:mod:`.looker_query` and the trigger of :mod:`airflow_provider_looker_segment.triggers.looker`). The
``looker_sdk`` client is built from the Airflow connection alone (no ``looker.ini``, ``LOOKERSDK_*`` variables
ignored). Results are streamed: the SDK's authentication headers are reused for a streaming ``requests`` call
whose ``json_detail`` body is read by :class:`~airflow_provider_looker_segment.look_stream.LookStream`, so
peak memory does not depend on the number of rows. A Look runs as saved, or with filters over its own
(:meth:`LookerHook.stream_look`), at once or as a Looker async query task (``start_query_task``, then
``stream_query_task`` once it is complete: :mod:`.looker_tasks`). :meth:`LookerHook.close` logs out of Looker:
use the hook as a context manager.

Why ``json_detail``: the API 4.0 reference calls it legacy and recommends ``json_bi``, but ``json_bi``'s
metadata (``JsonBiMetadata``, ``JsonBiField``) has no LookML tags, no short labels and no ``ran_at``, and its
``rows`` are typed as strings; plain ``json`` has no metadata at all, so tags, labels, hidden fields, pivots
and ``ran_at`` (the messages' ``timestamp``) would need a second run of the query. ``json_detail`` carries
all of it in the same response as the rows, and is the only format whose query task results report a failed
query in the body (HTTP 200 with ``errors``) rather than as an HTTP 400.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import Any, TypeVar
from urllib.parse import quote

import requests
from airflow.sdk import BaseHook
from cattrs.errors import CattrsError
from looker_sdk import error as sdk_error
from looker_sdk.rtl import auth_session, auth_token, requests_transport, serialize
from looker_sdk.sdk.api40 import methods as methods40
from looker_sdk.sdk.api40 import models as models40

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.exceptions import (
    LookDeletedError,
    LookerApiError,
    LookerRequestError,
    LookerSegmentError,
    LookNotFoundError,
)
from airflow_provider_looker_segment.hooks.looker_connection import (
    CREDENTIAL_STATUSES,
    DEFAULT_TIMEOUT,
    RETRY_STATUSES,
    ConnectionApiSettings,
    LookerConnectionSettings,
    LookerSession,
    make_session,
    settings_from_connection,
)
from airflow_provider_looker_segment.hooks.looker_queries import LookerQueries, LookerQuery
from airflow_provider_looker_segment.hooks.looker_query import (
    FILTER_REFUSAL_STATUSES,
    filter_error,
    filtered_write_query,
    normalise_filters,
)
from airflow_provider_looker_segment.hooks.looker_tasks import (
    FINAL_TASK_STATUSES,
    PENDING_RESULT_STATUSES,
    LookerQueryTasks,
    normalise_id,
)
from airflow_provider_looker_segment.links import look_web_url, shown_look_url
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo, LookRunQuery
from airflow_provider_looker_segment.models import shown_count as _count
from airflow_provider_looker_segment.net import PLAIN_HTTP, TIMEOUT, TLS, redact, transport_problem

__all__ = [
    "API_VERSION",
    "DEFAULT_TIMEOUT",
    "FINAL_TASK_STATUSES",
    "PENDING_RESULT_STATUSES",
    "RETRY_STATUSES",
    "ConnectionApiSettings",
    "LookerConnectionSettings",
    "LookerHook",
    "LookerQuery",
    "LookerSession",
    "settings_from_connection",
]

T = TypeVar("T")

API_VERSION = "4.0"

#: Client errors that can pass (a request timeout, a rate limit): retried, unlike the other 4xx answers.
PASSING_CLIENT_STATUSES = (408, 429)
#: OpenSSL's reason when the server's certificate is not trusted (self-signed, private CA, expired).
CERTIFICATE_NOT_TRUSTED = "CERTIFICATE_VERIFY_FAILED"
#: looker_sdk's logger: it logs every request (``POST(https://.../login)``) at INFO.
SDK_LOGGER = "looker_sdk"
#: What looker_sdk raises on a body it cannot deserialize.
_DESERIALIZE_ERRORS = (serialize.DeserializeError, CattrsError, KeyError, TypeError, ValueError)


# --- Looker's answers -----------------------------------------------------------------------------------


def _looker_message(text: str) -> str:
    """Return Looker's ``message`` from an error body, with the details of a ``ValidationError``."""
    text = text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict) and body.get("message"):
        details = [e for e in body.get("errors") or () if isinstance(e, dict)]
        return _with_details(str(body["message"]), [(e.get("field"), e.get("message")) for e in details])
    return text[:500]


def _with_details(message: str, details: list[tuple[Any, Any]]) -> str:
    """``Validation Failed (filters: Invalid filter: x)``: a message with its per-field details."""
    parts = [f"{name}: {text}" if name else str(text) for name, text in details if text or name]
    return f"{message} ({'; '.join(parts)})" if parts else message


def _sdk_message(exc: sdk_error.SDKError) -> str:
    """Looker's message from a looker_sdk error, with the details of a ``ValidationError``."""
    message = _looker_message(exc.message or "")
    return _with_details(message, [(e.field, e.message) for e in exc.errors or ()])


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
        query_timezone=(query.query_timezone if query else None) or None,
        query_id=str(look.query_id or (query.id if query else None) or "") or None,
        slug=(query.slug if query else None) or None,
    )


# --- the hook ---------------------------------------------------------------------------------------------


class LookerHook(LookerQueries, LookerQueryTasks, BaseHook):
    """
    Talk to the Looker API 4.0 with the credentials of an Airflow connection.

    The connection (type ``looker``): Host = the API base URL (``https://company.cloud.looker.com``, a port
    such as ``:19999`` in the URL or in Port), Login = the client ID of a Looker API key, Password = its
    client secret; extras ``verify_ssl`` (default true) and ``timeout`` (seconds, default 120).

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
        return make_session(self.retries, self.backoff_factor, self.max_backoff)

    @cached_property
    def sdk(self) -> methods40.Looker40SDK:
        """
        A looker_sdk 4.0 client configured from the connection alone.

        looker_sdk logs each request at INFO (``GET(https://.../api/4.0/looks/42)``): three lines a run that
        say nothing the task log does not, and that the UI turns into broken links. Its logger is raised to
        WARNING, unless logging was configured for it (its level is set).
        """
        sdk_logger = logging.getLogger(SDK_LOGGER)
        if sdk_logger.level == logging.NOTSET:
            sdk_logger.setLevel(logging.WARNING)
        settings = ConnectionApiSettings(self.settings)
        transport = requests_transport.RequestsTransport(settings, self.session)
        auth = auth_session.AuthSession(settings, transport, serialize.deserialize40, API_VERSION)
        return methods40.Looker40SDK(
            auth, serialize.deserialize40, serialize.serialize40, transport, API_VERSION
        )

    @property
    def api_calls(self) -> dict[str, int]:
        """
        The Looker API calls this hook made so far, per kind as Looker meters them (``query_based``,
        ``administrative``, ``login_logout``) and their ``total``: see
        :mod:`airflow_provider_looker_segment.api_calls`.
        """
        if "session" not in self.__dict__:
            return ApiCallCounts().to_dict()
        return self.session.calls.to_dict()

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

    # --- Looks --------------------------------------------------------------------------------------------

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
        return self._read_look(normalise_id(look_id))[0]

    @contextmanager
    def stream_look(
        self,
        look_id: str | int,
        *,
        limit: int | None = -1,
        cache: bool = True,
        strict_limit: bool = False,
        filters: Mapping[str, str] | None = None,
    ) -> Iterator[LookStream]:
        """
        Run a Look and stream its result (``json_detail``, raw values, visualisation not applied, no drill
        links).

        With ``filters``, the Look's query is copied with the given filters replacing or adding to its own
        (``create_query``) and that query runs instead; the Look's metadata rules (tags, labels, hidden
        fields) still apply, and ``stream.query`` tells which filters ran.

        :param look_id: the Look id.
        :param limit: row limit; ``-1`` (default) for all rows, ``None`` for the Look's saved limit.
        :param cache: let Looker answer from its cache.
        :param strict_limit: raise :class:`LookTruncatedError` instead of warning when the number of rows
            equals the limit in effect (the result may be truncated).
        :param filters: Looker field name → Looker filter expression (e.g.
            ``{"users.created_date": "2026-11-27"}``); ``None`` or empty runs the Look as saved.
        :return: a context manager giving a :class:`LookStream`; the HTTP response is closed on exit (the
            hook stays logged in until :meth:`close`).
        :raises InvalidParameterError: ``filters`` is not a mapping of field names to expressions.
        :raises LookNotFoundError: the Look does not exist or the API user cannot see it.
        :raises LookDeletedError: the Look is in the trash.
        :raises LookFilterError: Looker refused the filters (e.g. a field not in the Look's explore).
        :raises LookQueryError: the query's SQL failed (on entering, or while reading rows).
        :raises LookerApiError: any other failure of the Looker API (HTTP status, transport, TLS, timeout).
        """
        look_id = normalise_id(look_id)
        given = normalise_filters(filters)
        info, look = self._read_look(look_id)
        effective = info.limit if limit is None else int(limit)
        # Drill links (Looker's default) are per-cell URLs the sync never reads: leave them out of the body.
        params = {
            "apply_formatting": "false",
            "apply_vis": "false",
            "cache": "true" if cache else "false",
            "generate_drill_links": "false",
        }
        if limit is not None:
            params["limit"] = str(limit)
        run_query: LookRunQuery | None = None
        if given:
            run_query = self._create_filtered_query(look_id, info, look, given)
            path = f"queries/{quote(str(run_query.query_id), safe='')}/run/json_detail"
            self.log.info(
                "Running Look %s (%s) with filters: %s (Looker query %s): limit %s, cache %s; in Looker: %s",
                look_id,
                info.title,
                run_query.describe(),
                run_query.query_id,
                _count(effective),
                cache,
                self.shown_look_url(look_id, given),
            )
        else:
            path = f"looks/{quote(look_id, safe='')}/run/json_detail"
            self.log.info(
                "Running Look %s (%s): limit %s, cache %s; in Looker: %s",
                look_id,
                info.title,
                _count(effective),
                cache,
                self.shown_look_url(look_id),
            )
        try:
            response = self._open(path, params, f"Running Look {look_id}", look_id=look_id)
        except LookerApiError as exc:
            if given and exc.status in FILTER_REFUSAL_STATUSES:
                raise filter_error(look_id, info, given, exc) from None
            raise
        with self._closing(response):
            yield self._stream(look_id, response, info, effective, strict_limit, run_query)

    def look_url(self, look_id: str, filters: Mapping[str, str] | None = None) -> str:
        """
        The Look's web page on the connection's Looker instance (with ``filters`` in the URL), as the
        operator's extra link gives it.
        """
        return look_web_url(self.settings.base_url, look_id, filters)

    def shown_look_url(self, look_id: str, filters: Mapping[str, str] | None = None) -> str:
        """:meth:`look_url` as the task log shows it (a URL too long to log is replaced by the Look's own)."""
        return shown_look_url(self.settings.base_url, look_id, filters)

    # --- internals ----------------------------------------------------------------------------------------

    def _read_look(self, look_id: str) -> tuple[LookInfo, models40.LookWithQuery]:
        """Read a Look (``GET /looks/{id}``); refuse a deleted one."""
        look = self._call(f"Reading Look {look_id}", lambda: self.sdk.look(look_id), look_id=look_id)
        info = _look_info(look_id, look)
        if info.deleted:
            raise LookDeletedError(
                f"Look {look_id} is deleted (it is in Looker's trash): restore it or use another Look",
                look_id=look_id,
            )
        return info, look

    def _create_filtered_query(
        self, look_id: str, info: LookInfo, look: models40.LookWithQuery, filters: Mapping[str, str]
    ) -> LookRunQuery:
        """Create the Look's query with ``filters`` over its own (``POST /queries``)."""
        write, run_query = filtered_write_query(look_id, look, filters)
        action = f"Creating the query of Look {look_id} with filters"
        try:
            created = self._call(action, lambda: self.sdk.create_query(write))
        except LookerApiError as exc:
            if exc.status in FILTER_REFUSAL_STATUSES:
                raise filter_error(look_id, info, filters, exc) from None
            raise
        if not created.id:
            raise LookerApiError(f"{action}: Looker answered no query id", look_id=look_id)
        return replace(run_query, query_id=str(created.id))

    def _stream(
        self,
        look_id: str,
        response: requests.Response,
        info: LookInfo,
        limit: int | None,
        strict_limit: bool,
        query: LookRunQuery | None,
    ) -> LookStream:
        return LookStream(
            look_id,
            response.raw,
            info,
            limit,
            strict_limit=strict_limit,
            read_timeout=self.settings.timeout,
            logger=self.log,
            redact=self._redact,
            query=query,
            label=info.label,
        )

    @contextmanager
    def _closing(self, response: requests.Response) -> Iterator[None]:
        try:
            yield
        finally:
            response.close()

    def _open(
        self,
        path: str,
        params: dict[str, str],
        action: str,
        *,
        look_id: str | None = None,
        accept: tuple[int, ...] = (200,),
    ) -> requests.Response:
        """
        Send ``GET /api/4.0/<path>`` as a stream; return the response once its status is accepted (body
        unread). A 401 logs in again once; other statuses raise :class:`LookerApiError`.
        """
        url = f"{self.settings.base_url}/api/{API_VERSION}/{path}"
        for attempt in range(2):
            headers = self._call("Logging in to Looker", lambda: self.sdk.auth.authenticate({}))
            try:
                response = self.session.get(
                    url, params=params, headers=headers, stream=True, timeout=self.settings.timeout
                )
            except requests.RequestException as exc:
                raise self._transport_error(action, exc, look_id=look_id) from exc
            if response.status_code == 401 and attempt == 0:
                response.close()
                self.log.info("Looker refused the access token (expired?); logging in again")
                self._forget_token()
                continue
            if response.status_code not in accept:
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
                    raise self._transport_error(action, transport_error, look_id=look_id) from None
                message = _sdk_message(exc)
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
        """
        Turn an HTTP error answer into the provider's exception, with a message a user can act on: a
        :class:`LookerRequestError` (the task fails at once) when no retry would change the answer, i.e. a
        4xx other than 408 and 429; a :class:`LookerApiError` (retried) otherwise.
        """
        message = self._redact(message)
        lasting = status is not None and 400 <= status < 500 and status not in PASSING_CLIENT_STATUSES
        if login and status in CREDENTIAL_STATUSES:
            return LookerRequestError(
                f"Looker rejected the API credentials of connection '{self.looker_conn_id}' "
                f"(client ID {self.settings.client_id}) at {self.settings.base_url}: "
                f"HTTP {status} {message}. Check the client ID and secret.",
                status=status,
            )
        if login and lasting:  # another 4xx (405, 422...): no retry changes it, nor is it the credentials
            return LookerRequestError(
                f"Logging in to Looker at {self.settings.base_url} failed (HTTP {status}): "
                f"{message.rstrip('.')}. Is Host the Looker API URL?",
                status=status,
            )
        if login:  # 429, 5xx...: Looker busy or unavailable (an upgrade), not refusing the credentials
            retried = f", still after {self.retries} retries" if status in RETRY_STATUSES else ""
            return LookerApiError(
                f"Logging in to Looker at {self.settings.base_url} failed (HTTP {status}{retried}): "
                f"{message.rstrip('.')}. Looker is limiting requests or unavailable (e.g. during an "
                "upgrade); this is not about the credentials: let the task retry later.",
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

    def _transport_error(self, action: str, exc: BaseException, *, look_id: str | None) -> LookerApiError:
        """
        Describe a connection-level failure (TLS, timeout, unreachable host, closed connection): a
        :class:`LookerRequestError` (no retry) for a wrong scheme or port and an untrusted certificate, a
        :class:`LookerApiError` (retried) for the rest.
        """
        kind, reason = transport_problem(exc)
        lasting = kind == PLAIN_HTTP or (kind == TLS and reason == CERTIFICATE_NOT_TRUSTED)
        error = LookerRequestError if lasting else LookerApiError
        return error(self._transport_message(kind, reason, action), look_id=look_id)

    def _transport_message(self, kind: str, reason: str, action: str) -> str:
        """The words for a connection-level failure of ``action``."""
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
