"""
Looker async query tasks: a Look's query started as a query task, its status, its result streamed once it is
complete, and killing it. Mixed into :class:`~airflow_provider_looker_segment.hooks.looker.LookerHook`, whose
plumbing (login, errors, streams) it uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

import requests
from looker_sdk.sdk.api40 import models as models40

from airflow_provider_looker_segment.exceptions import LookerApiError, LookerRequestError, QueryTaskError
from airflow_provider_looker_segment.hooks.looker_query import (
    FILTER_REFUSAL_STATUSES,
    filter_error,
    normalise_filters,
)
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo, LookRunQuery
from airflow_provider_looker_segment.models import shown_count as _count

if TYPE_CHECKING:
    import logging

    from looker_sdk.sdk.api40 import methods as methods40

    from airflow_provider_looker_segment.hooks.looker_queries import LookerQuery

T = TypeVar("T")

#: Query task statuses after which it does not change any more.
FINAL_TASK_STATUSES = frozenset({"complete", "error", "killed", "expired"})
#: What the results of a query task that has not ended answer (202 in Looker's docs, 204 in older releases).
PENDING_RESULT_STATUSES = (202, 204)
#: Seconds :meth:`LookerQueryTasks.stream_query_task` keeps asking by default while the results answer that
#: they are not ready (Looker may, right after a task reported ``complete``), and the pause between asks.
RESULTS_WAIT = 30.0
RESULTS_POLL_INTERVAL = 0.5


def normalise_id(value: str | int, what: str = "A Look id") -> str:
    """Return an id as text, stripped; raise :class:`LookerRequestError` naming ``what`` when it is empty."""
    text = str(value).strip()
    if not text:
        raise LookerRequestError(f"{what} is required (got an empty value)")
    return text


class LookerQueryTasks:
    """The query task methods of :class:`~airflow_provider_looker_segment.hooks.looker.LookerHook`."""

    if TYPE_CHECKING:  # provided by LookerHook
        sdk: methods40.Looker40SDK
        log: logging.Logger

        def _read_look(self, look_id: str) -> tuple[LookInfo, models40.LookWithQuery]: ...

        def _create_filtered_query(
            self, look_id: str, info: LookInfo, look: models40.LookWithQuery, filters: Mapping[str, str]
        ) -> LookRunQuery: ...

        def _call(self, action: str, func: Callable[[], T], *, look_id: str | None = None) -> T: ...

        def _open(
            self,
            path: str,
            params: dict[str, str],
            action: str,
            *,
            look_id: str | None = None,
            accept: tuple[int, ...] = (200,),
        ) -> requests.Response: ...

        def _stream(
            self,
            look_id: str,
            response: requests.Response,
            info: LookInfo,
            limit: int | None,
            strict_limit: bool,
            query: LookRunQuery | None,
        ) -> LookStream: ...

        def _closing(self, response: requests.Response) -> AbstractContextManager[None]: ...

        def shown_look_url(self, look_id: str, filters: Mapping[str, str] | None = None) -> str: ...

        def with_filters(self, query: LookerQuery, filters: Mapping[str, str] | None) -> LookerQuery: ...

        def explore_url(self, query: LookerQuery) -> str: ...

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
        result); return its id.

        With ``filters`` the filtered query is created first (as :meth:`stream_look` does), else the Look's
        own query runs. Follow the task with :meth:`query_task_status` (or the trigger
        :class:`~airflow_provider_looker_segment.triggers.looker.LookerQueryTaskTrigger`), then read it with
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
                run_query = self._create_filtered_query(look_id, info, look, given)
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
        strict_limit: bool = False,
        wait: float = RESULTS_WAIT,
        poll_interval: float = RESULTS_POLL_INTERVAL,
    ) -> Iterator[LookStream]:
        """
        Stream the result of a complete query task of a Look, as :meth:`stream_look` streams a run.

        :param task_id: the query task (from :meth:`start_query_task`).
        :param look_id: its Look (its metadata rules apply: hidden fields...).
        :param info: the definition of the query it runs, instead of ``look_id`` (a query source: no
            request to read it).
        :param limit: the limit the task was started with (for the truncation check); ``None`` for the
            Look's saved limit.
        :param strict_limit: as for :meth:`stream_look`.
        :param wait: seconds to keep asking while Looker answers that the results are not ready (HTTP 202, or
            204 in older releases), as it may right after the task reported ``complete``; ``0`` asks once.
        :param poll_interval: seconds between two asks while waiting.
        :return: a context manager giving a :class:`LookStream` (``meta``, ``rows``, ``possibly_truncated``).
        :raises QueryTaskError: the results were still not ready after ``wait`` (the message says what the
            task's status was then), or Looker has no results for it (unknown, killed, or its results
            expired: HTTP 404).
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
        with self._closing(response):
            yield self._stream(look_id, response, info, effective, strict_limit, None)

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
