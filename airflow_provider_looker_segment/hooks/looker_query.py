"""
What runs, without I/O: a Look's or a query's definition as the sync reads it, a query as a source
(:class:`LookerQuery`), the filters given for a run (checked by :mod:`..look_filters`) put over the query,
and Looker's refusal of them explained. :class:`~airflow_provider_looker_segment.hooks.looker.LookerHook`
creates the queries and runs them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from looker_sdk.sdk.api40 import models as models40

from airflow_provider_looker_segment.exceptions import LookerApiError, LookerRequestError, LookFilterError
from airflow_provider_looker_segment.look_filters import shorten
from airflow_provider_looker_segment.models import LookInfo, LookRunQuery

#: What Looker's answer says when it refuses a query (HTTP statuses of ``create_query`` and of a run).
FILTER_REFUSAL_STATUSES = (400, 422)
#: What the results of a query task that has not ended answer (202 in Looker's docs, 204 in older releases).
PENDING_RESULT_STATUSES = (202, 204)


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


def normalise_id(value: str | int, what: str = "A Look id") -> str:
    """Return an id as text, stripped; raise :class:`LookerRequestError` naming ``what`` when it is empty."""
    text = str(value).strip()
    if not text:
        raise LookerRequestError(f"{what} is required (got an empty value)")
    return text


def _limit(text: str | None) -> int | None:
    """A query's ``limit`` (text in the API) as a number; ``None`` when it is not one."""
    text = (text or "").strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def look_info(look_id: str, look: models40.LookWithQuery) -> LookInfo:
    """The definition a sync reads of a Look (``LookWithQuery``)."""
    query = look.query
    vis = (query.vis_config if query else None) or {}
    return LookInfo(
        id=str(look.id or look_id),
        title=look.title or "",
        model=query.model if query else None,
        view=query.view if query else None,
        fields=tuple(query.fields or ()) if query else (),
        limit=_limit(query.limit if query else None),
        pivots=tuple(query.pivots or ()) if query else (),
        hidden_fields=tuple(vis.get("hidden_fields") or ()),
        deleted=bool(look.deleted),
        query_timezone=(query.query_timezone if query else None) or None,
        query_id=str(look.query_id or (query.id if query else None) or "") or None,
        slug=(query.slug if query else None) or None,
    )


def query_info(query: models40.Query, query_id: str) -> LookInfo:
    """The definition a sync reads of a query (``Query``): fields, limit, hidden fields, time zone."""
    vis = query.vis_config or {}
    return LookInfo(
        id=str(query.id or query_id),
        title="",
        model=query.model,
        view=query.view,
        fields=tuple(query.fields or ()),
        limit=_limit(query.limit),
        pivots=tuple(query.pivots or ()),
        hidden_fields=tuple(vis.get("hidden_fields") or ()) if isinstance(vis, dict) else (),
        deleted=False,
        query_timezone=query.query_timezone or None,
        kind="query",
        query_id=str(query.id or query_id),
        slug=query.slug or None,
    )


def filtered_write_query(
    look_id: str,
    look: models40.LookWithQuery | None,
    filters: Mapping[str, str],
    *,
    query: models40.Query | None = None,
    label: str | None = None,
) -> tuple[models40.WriteQuery, LookRunQuery]:
    """
    Build the query of a filtered run: the Look's query (or ``query``), with ``filters`` replacing or adding
    filters.

    Everything ``WriteQuery`` allows is kept (model, view, fields, pivots, fill fields, sorts, limits,
    totals, subtotals, dynamic fields, custom filter expression, visualisation, time zone) but ``client_id``
    (it must be unique) and ``filter_config`` (Looker says to leave it empty when creating a query; it
    would override ``filters`` in the UI).

    :param look_id: the Look (or the query's id).
    :param look: the Look as Looker answers it (``LookWithQuery``); ``None`` with ``query``.
    :param filters: checked filters (see :func:`normalise_filters`).
    :param query: a query as Looker answers it (``Query``), instead of a Look's.
    :param label: how the message names the source (default ``Look <look_id>``).
    :return: the query to create, and what it changes.
    :raises LookerRequestError: the Look has no query (or one without model or explore).
    """
    if query is None:
        query = look.query if look is not None else None
    if query is None or not query.model or not query.view:
        raise LookerRequestError(
            f"{label or f'Look {look_id}'} has no query with a model and an explore: it cannot be run "
            "with filters",
            look_id=look_id if look is not None else None,
        )
    own = {str(name): str(value) for name, value in (query.filters or {}).items()}
    merged = {**own, **filters}
    write = models40.WriteQuery(
        model=query.model,
        view=query.view,
        fields=query.fields,
        pivots=query.pivots,
        fill_fields=query.fill_fields,
        filters=merged,
        filter_expression=query.filter_expression,
        sorts=query.sorts,
        limit=query.limit,
        column_limit=query.column_limit,
        total=query.total,
        row_total=query.row_total,
        subtotals=query.subtotals,
        vis_config=query.vis_config,
        dynamic_fields=query.dynamic_fields,
        query_timezone=query.query_timezone,
    )
    replaced = {name: own[name] for name in filters if name in own}
    return write, LookRunQuery(look_id, None, dict(filters), merged, replaced)


def _named(text: str, name: str) -> bool:
    """Whether ``text`` names the field ``name`` (not merely a longer name starting with it)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", text) is not None


def filter_error(
    look_id: str, info: LookInfo, filters: Mapping[str, str], error: LookerApiError
) -> LookFilterError:
    """
    Explain Looker's refusal (HTTP 400 or 422) of a filtered query, naming the filter fields it names.

    :param look_id: the Look.
    :param info: its definition (for the explore's name).
    :param filters: the filters given for the run.
    :param error: Looker's answer, as the hook reports it.
    """
    fields = tuple(name for name in filters if _named(error.message, name)) or tuple(filters)
    plural = "s" if len(fields) > 1 else ""
    explore = f"{info.model}::{info.view}" if info.model and info.view else "the Look's explore"
    label = info.label if info.kind != "look" else f"Look {look_id}"
    return LookFilterError(
        f"{label}: Looker refused the filter{plural} on {', '.join(fields)}: a filter must name a "
        f"field of the explore {explore} and give a Looker filter expression. {shorten(error.message, 1000)}",
        status=error.status,
        look_id=look_id if info.kind == "look" else None,
        fields=fields,
    )
