"""
Hook for the Looker API 4.0: a Look's or a query's definition, and its result streamed row by row with field
metadata, at once or as a Looker async query task (started here, awaited by the trigger of
:mod:`airflow_provider_looker_segment.triggers.looker`, then read here). The plumbing (client, login, errors,
the one reader of a result) is :mod:`.looker_base`'s. The connection: docs/parameters.md (Connections); Looks,
queries, filters and query tasks: docs/sources.md; why ``json_detail``: docs/rows-to-calls.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from urllib.parse import quote

from looker_sdk.sdk.api40 import models as models40

from airflow_provider_looker_segment.exceptions import (
    LookerApiError,
    LookerRequestError,
    LookerSegmentError,
    QueryNotFoundError,
    QueryTaskError,
)
from airflow_provider_looker_segment.hooks.looker_base import LookerBaseHook, run_params
from airflow_provider_looker_segment.hooks.looker_query import (
    FILTER_REFUSAL_STATUSES,
    PENDING_RESULT_STATUSES,
    LookerQuery,
    filter_error,
    normalise_id,
    query_info,
)
from airflow_provider_looker_segment.links import explore_web_url, shown_look_url
from airflow_provider_looker_segment.look_filters import normalise_filters
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo, LookRunQuery
from airflow_provider_looker_segment.models import shown_count as _count

#: Seconds :meth:`LookerHook.stream_query_task` keeps asking while the results answer that they are not ready
#: (Looker may, right after a task reported ``complete``), and the pause between asks.
RESULTS_WAIT = 30.0
RESULTS_POLL_INTERVAL = 0.5


class LookerHook(LookerBaseHook):
    """
    Talk to the Looker API 4.0 with the credentials of an Airflow connection.

    The connection (type ``looker``): docs/parameters.md (Connections). Use it as a context manager: on
    exit, failed or not, it logs out of Looker (:meth:`close`)::

        with LookerHook("looker_default") as looker, looker.stream_look(42) as stream:
            for row in stream.rows:
                ...

    :param looker_conn_id: the Airflow connection id.
    :param retries: retries of a request that failed with a connection error, 429 or 5xx before its body
        started (idempotent requests only).
    :param backoff_factor: exponential backoff between retries: ``backoff_factor * 2 ** (retry - 1)`` s.
    :param max_backoff: longest wait between two retries, ``Retry-After`` included (seconds).
    """

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
        filters: Mapping[str, str] | None = None,
    ) -> Iterator[LookStream]:
        """
        Run a Look and stream its result (``json_detail``, raw values, visualisation not applied, no drill
        links). With ``filters`` a copy of the Look's query with them runs instead (docs/sources.md);
        ``stream.query`` tells which filters ran.

        :param look_id: the Look id.
        :param limit: row limit; ``-1`` (default) for all rows, ``None`` for the Look's saved limit.
        :param cache: let Looker answer from its cache.
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
        params = run_params(limit, cache)
        run_query: LookRunQuery | None = None
        if given:
            run_query = self._create_filtered_query(look_id, info, given, look=look)
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
        with self._result(response, info, effective, run_query) as stream:
            yield stream

    def shown_look_url(self, look_id: str, filters: Mapping[str, str] | None = None) -> str:
        """
        The Look's web page (with ``filters`` in the URL) as the task log shows it: a URL too long to log is
        replaced by the Look's own.
        """
        return shown_look_url(self.settings.base_url, look_id, filters)

    # --- queries -------------------------------------------------------------------------------------------

    def get_query(self, query_id: str | int | None = None, *, slug: str | None = None) -> LookerQuery:
        """
        Read a query by id (``GET /queries/{query_id}``) or by slug (``GET /queries/slug/{slug}``: the
        ``qid`` of an Explore URL, or a share URL's last part).

        :param query_id: the query id.
        :param slug: the slug, instead of the id.
        :raises QueryNotFoundError: Looker has no such query, or the API user cannot see it.
        :raises LookerApiError: any other failure of the Looker API.
        """
        if slug is not None:
            slug = normalise_id(slug, "A query slug")
            action, what = f"Reading the query of slug {slug}", f"No Looker query has the slug {slug}"
            read = lambda: self.sdk.query_for_slug(slug)  # noqa: E731
        else:
            query_id = normalise_id(query_id or "", "A query id")
            action, what = f"Reading Looker query {query_id}", f"Looker query {query_id} not found"
            read = lambda: self.sdk.query(str(query_id))  # noqa: E731
        try:
            query = self._call(action, read)
        except LookerApiError as exc:
            if exc.status == 404:
                raise QueryNotFoundError(
                    f"{what} (HTTP 404), or the API user cannot see it: take query_id from the query's "
                    "Explore (Explore > gear > Get LookML, or the API), or query_slug from its URL's qid",
                    status=404,
                ) from None
            raise
        return LookerQuery(query_info(query, str(query_id or query.id)), query)

    def with_filters(self, query: LookerQuery, filters: Mapping[str, str] | None) -> LookerQuery:
        """
        Copy a query with ``filters`` replacing or adding to its own (``POST /queries``; docs/sources.md);
        the copy runs instead. Without filters the query is returned as it is.

        :param query: the query (from :meth:`get_query`).
        :param filters: Looker field name → Looker filter expression.
        :raises InvalidParameterError: ``filters`` is not a mapping of field names to expressions.
        :raises LookFilterError: Looker refused the filters (e.g. a field not in the query's explore).
        """
        given = normalise_filters(filters)
        if not given:
            return query
        run = self._create_filtered_query(query.info.id, query.info, given, query=query.query)
        return replace(query, run=run)

    @contextmanager
    def stream_query(
        self,
        query: LookerQuery | str | int,
        *,
        limit: int | None = -1,
        cache: bool = True,
        filters: Mapping[str, str] | None = None,
    ) -> Iterator[LookStream]:
        """
        Run a query and stream its result, as :meth:`stream_look` runs a Look (``json_detail``, raw values,
        visualisation not applied, no drill links).

        :param query: the query (from :meth:`get_query`, possibly :meth:`with_filters`), or its id.
        :param limit: row limit; ``-1`` (default) for all rows, ``None`` for the query's own limit.
        :param cache: let Looker answer from its cache.
        :param filters: Looker field → filter expression over the query's own (:meth:`with_filters`).
        :raises QueryNotFoundError: the query does not exist or the API user cannot see it.
        :raises LookFilterError: Looker refused the filters.
        :raises LookQueryError: the query's SQL failed.
        :raises LookerApiError: any other failure of the Looker API.
        """
        if not isinstance(query, LookerQuery):
            query = self.get_query(query)
        if filters:
            query = self.with_filters(query, filters)
        info = query.info
        effective = info.limit if limit is None else int(limit)
        params = run_params(limit, cache)
        what = f" with filters: {query.run.describe()} (Looker query {query.run_id})" if query.run else ""
        self.log.info(
            "Running %s (%s::%s)%s: limit %s, cache %s; in Looker: %s",
            info.label,
            info.model,
            info.view,
            what,
            _count(effective),
            cache,
            self.explore_url(query),
        )
        path = f"queries/{quote(query.run_id, safe='')}/run/json_detail"
        try:
            response = self._open(path, params, f"Running {info.label}")
        except LookerApiError as exc:
            if exc.status == 404:
                raise QueryNotFoundError(
                    f"Looker query {query.run_id} not found (HTTP 404), or the API user cannot see it",
                    status=404,
                ) from None
            if query.run is not None and exc.status in FILTER_REFUSAL_STATUSES:
                raise filter_error(info.id, info, query.run.filters, exc) from None
            raise
        with self._result(response, info, effective, query.run) as stream:
            yield stream

    def explore_url(self, query: LookerQuery) -> str:
        """The Explore of the query that runs on the connection's Looker instance (``""`` without a slug)."""
        info, slug = query.info, query.run_slug
        if not (info.model and info.view and slug):
            return ""
        return explore_web_url(self.settings.base_url, info.model, info.view, slug)

    def query_sql(self, query_id: str | int) -> str:
        """
        The SQL Looker generates for a query, without running it (``GET /queries/{query_id}/run/sql``).

        :raises QueryNotFoundError: the query does not exist or the API user cannot see it.
        :raises LookerApiError: any other failure of the Looker API.
        """
        query_id = normalise_id(query_id, "A query id")
        action = f"Reading the SQL of Looker query {query_id}"
        try:
            response = self._open(f"queries/{quote(query_id, safe='')}/run/sql", {}, action)
        except LookerApiError as exc:
            if exc.status == 404:
                raise QueryNotFoundError(
                    f"Looker query {query_id} not found (HTTP 404), or the API user cannot see it", status=404
                ) from None
            raise
        try:
            return response.content.decode("utf-8", "replace")
        finally:
            response.close()

    # --- query tasks ---------------------------------------------------------------------------------------

    def start_query_task(
        self,
        look_id: str | int | None = None,
        *,
        query: LookerQuery | None = None,
        limit: int | None = -1,
        filters: Mapping[str, str] | None = None,
        cache: bool = True,
    ) -> str:
        """
        Start a Look's query, or a query (``query``), as a Looker async query task (``json_detail``
        result; with ``filters``, a filtered copy, as :meth:`stream_look`); return its id. Follow it with
        :meth:`query_task_status` (or the trigger: docs/sources.md, Deferrable mode), then read it with
        :meth:`stream_query_task`.

        :param look_id: the Look id.
        :param query: a query (``LookerHook.get_query``, possibly ``with_filters``) instead of a Look.
        :param limit: row limit; ``-1`` for all rows, ``None`` for the Look's saved limit.
        :param filters: as for :meth:`stream_look`.
        :param cache: let Looker answer from its cache.
        :return: the query task id.
        :raises InvalidParameterError: ``filters`` is not a mapping of field names to expressions.
        :raises LookNotFoundError: the Look does not exist or the API user cannot see it.
        :raises LookDeletedError: the Look is in the trash.
        :raises LookFilterError: Looker refused the filters (e.g. a field not in the Look's explore).
        :raises LookerApiError: any other failure of the Looker API. (A failing SQL query is reported by the
            task's status, ``error``, and by :meth:`stream_query_task`.)
        """
        given = normalise_filters(filters)
        run_query: LookRunQuery | None = None
        if query is not None:
            query = self.with_filters(query, given) if given else query
            info, query_id, task_look = query.info, query.run_id, None
            run_query, given = query.run, dict(query.run.filters) if query.run else {}
            shown = self.explore_url(query)
        else:
            look_id = normalise_id(look_id or "")
            info, look = self._read_look(look_id)
            if given:
                run_query = self._create_filtered_query(look_id, info, given, look=look)
                query_id = str(run_query.query_id)
            else:
                query_id = str(look.query_id or (look.query.id if look.query else None) or "")
                if not query_id:
                    raise LookerRequestError(f"Look {look_id} has no query to run", look_id=look_id)
            task_look, shown = look_id, self.shown_look_url(look_id, given)
        # json_detail, as a run (see hooks/looker.py): its results carry a failed query's errors with HTTP 200
        body = models40.WriteCreateQueryTask(
            query_id=query_id, result_format=models40.ResultFormat.json_detail, look_id=task_look
        )
        label = info.label
        action = f"Starting the query of {label} as a Looker query task"
        try:
            task = self._call(
                action,
                lambda: self.sdk.create_query_task(
                    body,
                    limit=limit,
                    apply_formatting=False,
                    apply_vis=False,
                    cache=cache,
                    generate_drill_links=False,  # per-cell URLs the sync never reads
                ),
            )
        except LookerApiError as exc:
            if given and exc.status in FILTER_REFUSAL_STATUSES:
                raise filter_error(info.id, info, given, exc) from None
            raise
        if not task.id:
            raise LookerApiError(f"{action}: Looker answered no query task id", look_id=task_look)
        what = f"with filters: {run_query.describe()}" if given and run_query else "as saved"
        effective = info.limit if limit is None else limit
        self.log.info(
            "Started Looker query task %s for %s (%s) %s (query %s): limit %s, cache %s; in Looker: %s",
            task.id,
            label,
            info.title or f"{info.model}::{info.view}",
            what,
            query_id,
            _count(effective),
            cache,
            shown,
        )
        return str(task.id)

    def query_task_status(self, task_id: str) -> str:
        """
        Return a query task's Looker status: ``added``, ``running``, ``complete``, ``error``, ``killed`` or
        ``expired``.

        :raises QueryTaskError: Looker does not know the task (HTTP 404).
        :raises LookerApiError: any other failure of the Looker API.
        """
        task_id = normalise_id(task_id, "A query task id")
        try:
            task = self._call(
                f"Reading Looker query task {task_id}",
                lambda: self.sdk.query_task(task_id, fields="id,status"),
            )
        except LookerApiError as exc:
            if exc.status == 404:
                raise QueryTaskError(
                    f"Looker has no query task {task_id} (HTTP 404): it is unknown or its results expired",
                    task_id=task_id,
                    status=404,
                ) from None
            raise
        return str(task.status or "unknown")

    @contextmanager
    def stream_query_task(
        self,
        task_id: str,
        look_id: str | int | None = None,
        limit: int | None = -1,
        *,
        info: LookInfo | None = None,
    ) -> Iterator[LookStream]:
        """
        Stream the result of a complete query task of a Look, as :meth:`stream_look` streams a run.

        :param task_id: the query task (from :meth:`start_query_task`).
        :param look_id: its Look (its metadata rules apply: hidden fields...).
        :param info: the definition of the query it runs, instead of ``look_id`` (a query source: no
            request to read it).
        :param limit: the limit the task was started with (for the truncation check); ``None`` for the
            Look's saved limit.
        :return: a context manager giving a :class:`LookStream` (``meta``, ``rows``, ``possibly_truncated``).
        :raises QueryTaskError: the results were still not ready after :data:`RESULTS_WAIT` seconds (the
            message says what the task's status was then), or Looker has no results for it (unknown,
            killed, or its results expired: HTTP 404).
        :raises LookQueryError: the query's SQL failed (``errors`` in the ``json_detail`` result).
        :raises LookNotFoundError: the Look does not exist or the API user cannot see it.
        :raises LookerApiError: any other failure of the Looker API.
        """
        task_id = normalise_id(task_id, "A query task id")
        if info is None:
            look_id = normalise_id(look_id or "")
            info = self._read_look(look_id)[0]
        look_id, label = info.id, info.label
        effective = info.limit if limit is None else int(limit)
        path = f"query_tasks/{quote(task_id, safe='')}/results"
        action = f"Reading the results of Looker query task {task_id} ({label})"
        wait, poll_interval = RESULTS_WAIT, RESULTS_POLL_INTERVAL
        deadline = time.monotonic() + max(0.0, wait)
        asks = 0
        while True:
            asks += 1
            try:
                response = self._open(path, {}, action, accept=(200, *PENDING_RESULT_STATUSES))
            except LookerApiError as exc:
                if exc.status == 404:
                    raise QueryTaskError(
                        f"{action}: Looker has no results for it (HTTP 404): the task is unknown, was "
                        "killed, or its results expired; start a new one",
                        task_id=task_id,
                        status=404,
                        look_id=look_id if info.kind == "look" else None,
                    ) from None
                raise
            if response.status_code == 200:
                break
            response.close()
            if time.monotonic() >= deadline:
                look = look_id if info.kind == "look" else None
                raise self._results_not_ready(action, task_id, look, response.status_code, wait, asks)
            time.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))
        self.log.info(
            "Reading the results of Looker query task %s (%s, %s)",
            task_id,
            label,
            info.title or f"{info.model}::{info.view}",
        )
        with self._result(response, info, effective, None) as stream:
            yield stream

    def _results_not_ready(
        self, action: str, task_id: str, look_id: str | None, status: int, wait: float, asks: int
    ) -> QueryTaskError:
        """What happened when the results were still not ready: the answers, and the task's status then."""
        try:
            task_status: str | None = self.query_task_status(task_id)
        except LookerApiError:
            task_status = None
        waited = f" after asking {asks} times over {wait:g} s" if wait > 0 else ""
        answered = f"{action}: Looker answered HTTP {status} (results not ready){waited}"
        if task_status == "complete":
            message = (
                f"{answered}, although the task's status is complete: Looker did not hand over the results; "
                "let the task retry (it starts a new query task)"
            )
        else:
            now = f" (its status is {task_status})" if task_status else ""
            message = (
                f"{answered}: the task has not completed{now}; wait for its status to be complete before "
                "reading its results"
            )
        return QueryTaskError(
            message, task_id=task_id, task_status=task_status, status=status, look_id=look_id
        )

    def kill_query_task(self, task_id: str) -> bool:
        """
        Ask Looker to kill a query task's query (``DELETE /running_queries/{id}``).

        :return: ``True`` when Looker killed it, ``False`` when it had no such running query (HTTP 404: the
            task ended or is unknown).
        :raises LookerApiError: any other failure of the Looker API.
        """
        task_id = normalise_id(task_id, "A query task id")
        try:
            self._call(f"Killing Looker query task {task_id}", lambda: self.sdk.kill_query(task_id))
        except LookerApiError as exc:
            if exc.status == 404:
                self.log.info("Looker query task %s is not running (HTTP 404): nothing to kill", task_id)
                return False
            raise
        self.log.info("Looker killed the query of query task %s", task_id)
        return True
