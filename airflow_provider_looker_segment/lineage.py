"""
OpenLineage facets of a completed
:class:`~airflow_provider_looker_segment.operators.looker_to_segment.LookerToSegmentOperator` sync (the extra
``[openlineage]``): the Look or query and the warehouse tables its SQL reads as inputs, the Segment source as
output; see docs/sources.md, "Lineage (OpenLineage)". No secret is in any of it (the write key only as a
one-way hash). Imported only when the OpenLineage provider asks for the facets.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from urllib.parse import urlsplit

import attr
from airflow.providers.openlineage.extractors import OperatorLineage
from airflow.providers.openlineage.sqlparser import SQLParser
from airflow.sdk import BaseHook
from openlineage.client.event_v2 import Dataset
from openlineage.client.facet_v2 import (
    DatasetFacet,
    datasource_dataset,
    documentation_dataset,
    schema_dataset,
)

from airflow_provider_looker_segment import __version__
from airflow_provider_looker_segment.links import explore_web_url, look_web_url
from airflow_provider_looker_segment.net import normalise_base_url

__all__ = ["LookerSourceDatasetFacet", "SegmentSourceDatasetFacet", "segment_source_name", "sync_lineage"]

log = logging.getLogger(__name__)

_SCHEMA_BASE = f"https://pypi.org/project/airflow-provider-looker-segment/{__version__}/#"
#: Hex digits of the write key's hash naming a Segment source that has no ``source_name``.
SOURCE_HASH_DIGITS = 12


@attr.define
class LookerSourceDatasetFacet(DatasetFacet):
    """What the sync read in Looker: a Look (id, title, URL) or a query (id, slug, Explore URL)."""

    kind: str
    model: str | None = None
    explore: str | None = None
    lookId: str | None = None
    title: str | None = None
    url: str | None = None
    queryId: str | None = None
    querySlug: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{_SCHEMA_BASE}LookerSourceDatasetFacet"


@attr.define
class SegmentSourceDatasetFacet(DatasetFacet):
    """Where the sync sent its calls: the Segment source, the call type, the track event."""

    call: str
    sourceName: str
    event: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{_SCHEMA_BASE}SegmentSourceDatasetFacet"


def segment_source_name(write_key: str, source_name: str | None = None) -> str:
    """The Segment source's dataset name: ``source_name`` when given, else a short one-way hash of the key."""
    if source_name and source_name.strip():
        return source_name.strip()
    digest = hashlib.blake2b(write_key.encode(), digest_size=8, person=b"lsg-ol-source").hexdigest()
    return f"source-{digest[:SOURCE_HASH_DIGITS]}"


def sync_lineage(operator: Any) -> OperatorLineage:
    """
    The lineage of the sync the operator just completed, from what it recorded (``looker_source``,
    ``looker_sql``, ``looker_run_query_id``, ``looker_explore``, ``sync_summary``).
    """
    info, summary = operator.looker_source, operator.sync_summary or {}
    if info is None:
        return OperatorLineage()
    looker_conn = BaseHook.get_connection(operator.looker_conn_id)
    base_url = normalise_base_url(
        looker_conn.host, looker_conn.schema, looker_conn.port, what="The Looker connection"
    )
    web = urlsplit(look_web_url(base_url, "0"))
    namespace = f"looker://{web.netloc}"
    inputs = [_looker_dataset(operator, info, summary, base_url, namespace, f"{web.scheme}://{web.netloc}")]
    sql = operator.looker_sql or _fetch_sql(operator)
    if sql:
        extra = looker_conn.extra_dejson or {}
        inputs += _tables(sql, str(extra.get("warehouse_namespace") or f"looker-sql://{web.netloc}"))
    return OperatorLineage(inputs=inputs, outputs=[_segment_dataset(operator, summary)])


def _looker_dataset(
    operator: Any, info: Any, summary: dict[str, Any], base_url: str, namespace: str, web_url: str
) -> Dataset:
    """The Look or query read, with the fields the sync used."""
    explore = operator.looker_explore or {}
    if info.kind == "look":
        looker = LookerSourceDatasetFacet(
            kind="look",
            model=info.model,
            explore=info.view,
            lookId=info.id,
            title=info.title or None,
            url=look_web_url(base_url, info.id),
            queryId=operator.looker_run_query_id,
        )
    else:
        slug = explore.get("slug") or info.slug
        looker = LookerSourceDatasetFacet(
            kind="query",
            model=info.model,
            explore=info.view,
            url=explore_web_url(base_url, info.model, info.view, slug)
            if info.model and info.view and slug
            else None,
            queryId=info.id,
            querySlug=slug,
        )
    facets: dict[str, DatasetFacet] = {
        "looker": looker,
        "datasource": datasource_dataset.DatasourceDatasetFacet(name=namespace, uri=web_url),
        "schema": schema_dataset.SchemaDatasetFacet(
            fields=[
                schema_dataset.SchemaDatasetFacetFields(name=name) for name in _synced_fields(info, summary)
            ]
        ),
    }
    if info.title:
        facets["documentation"] = documentation_dataset.DocumentationDatasetFacet(description=info.title)
    return Dataset(namespace=namespace, name=f"{info.model}.{info.view}", facets=facets)


def _synced_fields(info: Any, summary: dict[str, Any]) -> list[str]:
    """The Looker fields the sync read into its calls: the identifiers' fields, then the traits'."""
    fields = [choice["field"] for choice in (summary.get("identifiers") or {}).values() if choice]
    fields += list(summary.get("traits") or {})
    return list(dict.fromkeys(fields)) or list(info.fields)


def _segment_dataset(operator: Any, summary: dict[str, Any]) -> Dataset:
    """The Segment source the calls went to, named without the write key."""
    hook = operator._segment_hook()
    settings = hook.config
    extra = hook.get_connection(operator.segment_conn_id).extra_dejson or {}
    name = segment_source_name(settings.write_key, extra.get("source_name"))
    facet = SegmentSourceDatasetFacet(
        call=summary.get("call") or "identify", sourceName=name, event=summary.get("event")
    )
    return Dataset(
        namespace=f"segment://{urlsplit(settings.base_url).netloc}", name=name, facets={"segment": facet}
    )


def _fetch_sql(operator: Any) -> str | None:
    """The SQL of the query that ran, asked of Looker when its result did not carry it (one API call)."""
    query_id = operator.looker_run_query_id
    if not query_id:
        return None
    from airflow_provider_looker_segment.hooks.looker import LookerHook

    try:
        with LookerHook(looker_conn_id=operator.looker_conn_id) as looker:
            sql = looker.query_sql(query_id)
        log.info("Lineage: read the SQL of Looker query %s (GET /queries/%s/run/sql)", query_id, query_id)
        return sql
    except Exception as exc:  # lineage must never fail the task
        log.warning("Lineage: no SQL for Looker query %s (%s): no warehouse tables", query_id, exc)
        return None


def _tables(sql: str, namespace: str) -> list[Dataset]:
    """The tables the SQL reads, parsed as the OpenLineage provider parses SQL."""
    try:
        parsed = SQLParser(dialect="generic").parse(sql)
    except Exception as exc:  # an SQL the parser cannot read: the Look's lineage without its tables
        log.warning("Lineage: the query's SQL could not be parsed (%s): no warehouse tables", exc)
        return []
    if parsed is None:
        return []
    return [Dataset(namespace=namespace, name=table.qualified_name) for table in parsed.in_tables]
