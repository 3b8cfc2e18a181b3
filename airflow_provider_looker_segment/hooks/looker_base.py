"""
The plumbing of :class:`~airflow_provider_looker_segment.hooks.looker.LookerHook`: the looker_sdk client
built from the Airflow connection alone (no ``looker.ini``, ``LOOKERSDK_*`` variables ignored), one login
(again once on a 401), Looker's errors in the words of :mod:`.looker_errors`, and the one reader of a
result: a streaming ``GET`` with the SDK's headers whose ``json_detail`` body
:class:`~airflow_provider_looker_segment.look_stream.LookStream` reads (memory flat whatever the rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import Any, TypeVar

import requests
from airflow.sdk import BaseHook
from cattrs.errors import CattrsError
from looker_sdk import error as sdk_error
from looker_sdk.rtl import auth_session, auth_token, requests_transport, serialize
from looker_sdk.sdk.api40 import methods as methods40
from looker_sdk.sdk.api40 import models as models40

from airflow_provider_looker_segment.api_calls import ApiCallCounts
from airflow_provider_looker_segment.exceptions import LookDeletedError, LookerApiError
from airflow_provider_looker_segment.hooks.looker_connection import (
    MAX_RETRY_WAIT,
    LookerConnectionSettings,
    LookerSdkSettings,
    LookerSession,
    RetryPolicy,
    settings_from_connection,
)
from airflow_provider_looker_segment.hooks.looker_errors import (
    http_error,
    looker_message,
    transport_error,
    with_details,
)
from airflow_provider_looker_segment.hooks.looker_query import (
    FILTER_REFUSAL_STATUSES,
    filter_error,
    filtered_write_query,
    look_info,
)
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo, LookRunQuery
from airflow_provider_looker_segment.net import redact

T = TypeVar("T")

API_VERSION = "4.0"
#: What looker_sdk raises on a body it cannot deserialize.
_DESERIALIZE_ERRORS = (serialize.DeserializeError, CattrsError, KeyError, TypeError, ValueError)


def run_params(limit: int | None, cache: bool) -> dict[str, str]:
    """
    The parameters of a run (``json_detail``): raw values, visualisation not applied, no drill links (per-cell
    URLs the sync never reads).
    """
    params = {
        "apply_formatting": "false",
        "apply_vis": "false",
        "cache": "true" if cache else "false",
        "generate_drill_links": "false",
    }
    if limit is not None:
        params["limit"] = str(limit)
    return params


class LookerBaseHook(BaseHook):
    """
    The connection, the client, the login and the errors of
    :class:`~airflow_provider_looker_segment.hooks.looker.LookerHook` (see it for the parameters).
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
        max_backoff: float = MAX_RETRY_WAIT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.looker_conn_id = looker_conn_id
        self.retries = retries
        self.backoff_factor = backoff_factor
        self.max_backoff = max_backoff

    @cached_property
    def settings(self) -> LookerConnectionSettings:
        """The connection's settings, resolved once per hook."""
        return settings_from_connection(self.get_connection(self.looker_conn_id))

    @cached_property
    def session(self) -> LookerSession:
        """The HTTP session (with retries) shared by looker_sdk and result streams."""
        return RetryPolicy(self.retries, self.backoff_factor, self.max_backoff).session()

    @cached_property
    def sdk(self) -> methods40.Looker40SDK:
        """
        A looker_sdk 4.0 client configured from the connection alone.

        looker_sdk logs each request at INFO (``GET(https://.../api/4.0/looks/42)``): three lines a run that
        say nothing the task log does not, and that the UI turns into broken links. Its logger is raised to
        WARNING, unless logging was configured for it (its level is set).
        """
        sdk_logger = logging.getLogger("looker_sdk")
        if sdk_logger.level == logging.NOTSET:
            sdk_logger.setLevel(logging.WARNING)
        settings = LookerSdkSettings(self.settings)
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

    # --- Looks and queries read and created ---------------------------------------------------------------

    def _read_look(self, look_id: str) -> tuple[LookInfo, models40.LookWithQuery]:
        """Read a Look (``GET /looks/{id}``); refuse a deleted one."""
        look = self._call(f"Reading Look {look_id}", lambda: self.sdk.look(look_id), look_id=look_id)
        info = look_info(look_id, look)
        if info.deleted:
            raise LookDeletedError(
                f"Look {look_id} is deleted (it is in Looker's trash): restore it or use another Look",
                look_id=look_id,
            )
        return info, look

    def _create_filtered_query(
        self,
        source_id: str,
        info: LookInfo,
        filters: Mapping[str, str],
        *,
        look: models40.LookWithQuery | None = None,
        query: models40.Query | None = None,
    ) -> LookRunQuery:
        """
        Copy a Look's query (``look``) or ``query`` with ``filters`` over its own (``POST /queries``), the
        one creator of both paths' filtered queries (see docs/sources.md).

        :param source_id: the Look's id, or the query's.
        :param info: the source's definition.
        :param filters: checked filters (``look_filters.normalise_filters``).
        :param look: the Look as Looker answers it; ``None`` with ``query``.
        :param query: the query as Looker answers it, instead of a Look.
        :return: the copy's run: its query id (and, a query's copy, its slug).
        :raises LookFilterError: Looker refused the filters (HTTP 400 or 422).
        """
        is_look = look is not None
        label = f"Look {source_id}" if is_look else info.label
        write, run_query = filtered_write_query(source_id, look, filters, query=query, label=label)
        action = f"Creating the query of {label} with filters"
        try:
            created = self._call(action, lambda: self.sdk.create_query(write))
        except LookerApiError as exc:
            if exc.status in FILTER_REFUSAL_STATUSES:
                raise filter_error(source_id, info, filters, exc) from None
            raise
        if not created.id:
            look_id = source_id if is_look else None
            raise LookerApiError(f"{action}: Looker answered no query id", look_id=look_id)
        return replace(run_query, query_id=str(created.id), slug=None if is_look else created.slug or None)

    # --- requests -----------------------------------------------------------------------------------------

    @contextmanager
    def _result(
        self, response: requests.Response, info: LookInfo, limit: int | None, query: LookRunQuery | None
    ) -> Iterator[LookStream]:
        """The one reader of a result: ``response``'s ``json_detail`` body as a stream, closed on exit."""
        try:
            yield LookStream(
                info.id,
                response.raw,
                info,
                limit,
                read_timeout=self.settings.timeout,
                logger=self.log,
                redact=self._redact,
                query=query,
                label=info.label,
            )
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
                message = looker_message(response.text[:65536])
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
                failure = getattr(last, "error", None)
                login = url.endswith("/login")
                if status == 401 and not login and attempt == 0:
                    self._forget_token()
                    continue
                if failure is not None:
                    raise self._transport_error(action, failure, look_id=look_id) from None
                message = with_details(
                    looker_message(exc.message or ""), [(e.field, e.message) for e in exc.errors or ()]
                )
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
        """:func:`~.looker_errors.http_error` for this hook's connection, the message redacted."""
        return http_error(
            action,
            status,
            self._redact(message),
            conn_id=self.looker_conn_id,
            settings=self.settings,
            retries=self.retries,
            look_id=look_id,
            login=login,
        )

    def _transport_error(self, action: str, exc: BaseException, *, look_id: str | None) -> LookerApiError:
        """:func:`~.looker_errors.transport_error` for this hook's connection, the message redacted."""
        return transport_error(action, exc, self.settings, look_id=look_id, redact=self._redact)

    def _forget_token(self) -> None:
        """Drop the access token so that the next call logs in again."""
        self.sdk.auth.token = auth_token.AuthToken()

    def _redact(self, text: str) -> str:
        """Remove the client secret and the access token from a text that may echo a server's answer."""
        secrets = [self.settings.client_secret] if "settings" in self.__dict__ else []
        if "sdk" in self.__dict__:
            secrets.append(self.sdk.auth.token.access_token)
        return redact(text, secrets)
