"""
Any Looker query as a sync's source: a query read by id (``GET /queries/{query_id}``) or by the slug of an
Explore URL (``GET /queries/slug/{slug}``), copied with a run's filters (``POST /queries``), streamed
(``GET /queries/{query_id}/run/json_detail``), and its SQL (``GET /queries/{query_id}/run/sql``). Mixed into
:class:`~airflow_provider_looker_segment.hooks.looker.LookerHook`, whose plumbing (login, errors, streams)
it uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

import requests
from looker_sdk.sdk.api40 import models as models40

from airflow_provider_looker_segment.exceptions import LookerApiError, QueryNotFoundError
from airflow_provider_looker_segment.hooks.looker_query import (
    FILTER_REFUSAL_STATUSES,
    filter_error,
    filtered_write_query,
    normalise_filters,
)
from airflow_provider_looker_segment.hooks.looker_tasks import normalise_id
from airflow_provider_looker_segment.links import explore_web_url
from airflow_provider_looker_segment.look_stream import LookStream
from airflow_provider_looker_segment.models import LookInfo, LookRunQuery
from airflow_provider_looker_segment.models import shown_count as _count

if TYPE_CHECKING:
    import logging

    from looker_sdk.sdk.api40 import methods as methods40

    from airflow_provider_looker_segment.hooks.looker_connection import LookerConnectionSettings

T = TypeVar("T")

__all__ = ["LookerQueries", "LookerQuery", "query_info"]


@dataclass(frozen=True)
class LookerQuery:
    """
    A Looker query as a sync's source.

    :param info: its definition as the sync reads it (``kind="query"``, ``id`` the query id, its slug).
    :param query: the query as Looker answered it, to copy with a run's filters.
    :param run: with filters, the copy that runs (its id, slug and filters); ``None``: the query itself runs.
    """

    info: LookInfo
    query: models40.Query
    run: LookRunQuery | None = None

    @property
    def run_id(self) -> str:
        """The id of the query that runs: the filtered copy's, else the query's own."""
        return str(self.run.query_id) if self.run is not None and self.run.query_id else self.info.id

    @property
    def run_slug(self) -> str | None:
        """The slug of the query that runs (its Explore URL's ``qid``)."""
        return self.run.slug if self.run is not None else self.info.slug


def query_info(query: models40.Query, query_id: str) -> LookInfo:
    """The definition a sync reads of a query (``Query``): fields, limit, hidden fields, time zone."""
    vis = query.vis_config or {}
    limit_text = query.limit or ""
    return LookInfo(
        id=str(query.id or query_id),
        title="",
        model=query.model,
        view=query.view,
        fields=tuple(query.fields or ()),
        limit=int(limit_text) if re.fullmatch(r"-?\d+", limit_text.strip()) else None,
        pivots=tuple(query.pivots or ()),
        hidden_fields=tuple(vis.get("hidden_fields") or ()) if isinstance(vis, dict) else (),
        deleted=False,
        query_timezone=query.query_timezone or None,
        kind="query",
        query_id=str(query.id or query_id),
        slug=query.slug or None,
    )


class LookerQueries:
    """The query-source methods of :class:`~airflow_provider_looker_segment.hooks.looker.LookerHook`."""

    if TYPE_CHECKING:  # provided by LookerHook
        sdk: methods40.Looker40SDK
        log: logging.Logger
        settings: LookerConnectionSettings

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
        Copy a query with ``filters`` replacing or adding to its own (``POST /queries``); the copy runs
        instead. Without filters the query is returned as it is.

        :raises InvalidParameterError: ``filters`` is not a mapping of field names to expressions.
        :raises LookFilterError: Looker refused the filters (e.g. a field not in the query's explore).
        """
        given = normalise_filters(filters)
        if not given:
            return query
        info = query.info
        write, run = filtered_write_query(info.id, None, given, query=query.query, label=info.label)
        action = f"Creating the query of {info.label} with filters"
        try:
            created = self._call(action, lambda: self.sdk.create_query(write))
        except LookerApiError as exc:
            if exc.status in FILTER_REFUSAL_STATUSES:
                raise filter_error(info.id, info, given, exc) from None
            raise
        if not created.id:
            raise LookerApiError(f"{action}: Looker answered no query id")
        return replace(query, run=replace(run, query_id=str(created.id), slug=created.slug or None))

    @contextmanager
    def stream_query(
        self,
        query: LookerQuery | str | int,
        *,
        limit: int | None = -1,
        cache: bool = True,
        strict_limit: bool = False,
        filters: Mapping[str, str] | None = None,
    ) -> Iterator[LookStream]:
        """
        Run a query and stream its result, as :meth:`stream_look` runs a Look (``json_detail``, raw values,
        visualisation not applied, no drill links).

        :param query: the query (from :meth:`get_query`, possibly :meth:`with_filters`), or its id.
        :param limit: row limit; ``-1`` (default) for all rows, ``None`` for the query's own limit.
        :param cache: let Looker answer from its cache.
        :param strict_limit: as for :meth:`stream_look`.
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
        params = {
            "apply_formatting": "false",
            "apply_vis": "false",
            "cache": "true" if cache else "false",
            "generate_drill_links": "false",  # per-cell URLs the sync never reads
        }
        if limit is not None:
            params["limit"] = str(limit)
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
        with self._closing(response):
            yield self._stream(info.id, response, info, effective, strict_limit, query.run)

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
        with self._closing(response):
            return response.content.decode("utf-8", "replace")
