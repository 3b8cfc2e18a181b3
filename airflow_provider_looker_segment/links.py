"""
The operator's extra links (the Look, with the run's filters, or the Explore of the query it ran); see
docs/sources.md, "A link to what ran". ``get_link`` runs on the worker and the URL is kept as an XCom, so the
API server needs neither the connection nor this package's code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from airflow.sdk import BaseHook, BaseOperatorLink

from airflow_provider_looker_segment.exceptions import InvalidParameterError
from airflow_provider_looker_segment.net import normalise_base_url
from airflow_provider_looker_segment.params import to_optional_str
from airflow_provider_looker_segment.settings import parse_filters

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey

log = logging.getLogger(__name__)

#: The API port of Looker instances hosted on premises (and of older hosted ones); the web UI is not there.
LEGACY_API_PORT = 19999
#: The longest Look URL a task log shows whole (a long filter value would make it a megabyte).
MAX_SHOWN_URL = 2_000


def look_web_url(api_base_url: str, look_id: str, filters: Mapping[str, str] | None = None) -> str:
    """
    Return a Look's web URL (API host without the legacy port ``:19999``, ``/looks/<id>``, each filter as
    ``f[<field>]=<expression>``).

    :param api_base_url: ``scheme://host[:port]`` as the Looker connection gives it.
    :param look_id: the Look id.
    :param filters: Looker field → filter expression, as the run applied them over the Look's own.
    """
    parts = urlsplit(api_base_url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host if parts.port in (None, LEGACY_API_PORT) else f"{host}:{parts.port}"
    query = urlencode([(f"f[{name}]", value) for name, value in (filters or {}).items()])
    return urlunsplit((parts.scheme, netloc, f"/looks/{quote(look_id, safe='')}", query, ""))


def explore_web_url(api_base_url: str, model: str, view: str, slug: str) -> str:
    """
    Return a query's Explore web URL as Looker's ``Query.url`` gives it (``/explore/<model>/<explore>?qid=``).

    :param api_base_url: ``scheme://host[:port]`` as the Looker connection gives it.
    :param model: the query's LookML model.
    :param view: its explore.
    :param slug: its slug (a filtered run's: the copy Looker created with the filters).
    """
    parts = urlsplit(look_web_url(api_base_url, "0"))
    path = f"/explore/{quote(model, safe='')}/{quote(view, safe='')}"
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode({"qid": slug}), ""))


def shown_look_url(api_base_url: str, look_id: str, filters: Mapping[str, str] | None = None) -> str:
    """
    :func:`look_web_url` as a task log shows it: whole up to :data:`MAX_SHOWN_URL` characters; longer (a
    long filter value, e.g. a list of user ids), the Look's own URL and the length of the one with filters.
    """
    url = look_web_url(api_base_url, look_id, filters)
    if len(url) <= MAX_SHOWN_URL:
        return url
    return (
        f"{look_web_url(api_base_url, look_id)} (with the filters, its URL has {len(url):,} characters: "
        "too long to log; the task's Looker Look link carries it)"
    )


class LookerLookLink(BaseOperatorLink):
    """
    "Looker Look": the Look the task synced, on the Looker instance of its connection, with the filters the
    run applied (``f[<field>]=<expression>`` in the URL) when it ran with ``filters``.
    """

    name = "Looker Look"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        """
        The Look's web URL (with the run's filters), or ``""`` when the Look id or the connection's Host is
        unusable. Filters that cannot be read (a template left unrendered, not a mapping) are left out.

        :param operator: the (rendered) task, with ``look_id``, ``looker_conn_id`` and ``filters``.
        :param ti_key: the task instance (unused: everything is on the operator).
        """
        look_id = to_optional_str(getattr(operator, "look_id", None))
        conn_id = getattr(operator, "looker_conn_id", None)
        if not look_id or not conn_id or "{{" in look_id:
            return ""
        filters = _run_filters(getattr(operator, "filters", None))
        base_url = _api_base_url(conn_id, f"Look {look_id}")
        return look_web_url(base_url, look_id, filters) if base_url else ""


def _run_filters(value: Any) -> dict[str, str]:
    """The filters a (rendered) task ran with, as the sync reads them; ``{}`` when they cannot be read."""
    try:
        return parse_filters(value)
    except InvalidParameterError:
        return {}


class LookerExploreLink(BaseOperatorLink):
    """
    "Looker Explore": the Explore of the query the task ran (``/explore/<model>/<explore>?qid=<slug>``), on
    the Looker instance of its connection; a filtered run's is the copy of the query Looker made with the
    filters. Empty for a Look, and for a run that failed before Looker named the query.
    """

    name = "Looker Explore"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        """
        The Explore's web URL, from what the run recorded on the task (``looker_explore``: model, view and
        slug of the query that ran), or ``""``.

        :param operator: the task that ran.
        :param ti_key: the task instance (unused).
        """
        explore = getattr(operator, "looker_explore", None)
        conn_id = getattr(operator, "looker_conn_id", None)
        if not isinstance(explore, dict) or not conn_id:
            return ""
        model, view, slug = (to_optional_str(explore.get(key)) for key in ("model", "view", "slug"))
        if not (model and view and slug):
            return ""
        base_url = _api_base_url(conn_id, f"the Explore of query {slug}")
        return explore_web_url(base_url, model, view, slug) if base_url else ""


def _api_base_url(conn_id: str, what: str) -> str | None:
    """The Looker connection's API URL, or ``None`` (logged, naming ``what``): a link never fails the task."""
    try:
        conn = BaseHook.get_connection(conn_id)
        return normalise_base_url(conn.host, conn.schema, conn.port, what="The Looker connection")
    except Exception as exc:  # no connection, no Host...
        log.warning("No link to %s: %s", what, type(exc).__name__)
        return None
