"""
The operator's extra link: what the task ran on the Looker instance, shown as a button on the task in the UI
(Details → Extra Links): the Look, with the run's filters in its URL when it ran with ``filters``.

Airflow 3 calls :meth:`LookerLookLink.get_link` on the worker once the task has run and keeps the URL as an
XCom (``_link_LookerLookLink``), so the API server needs neither the connection nor this package's code.
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
    Return the web URL of a Look from the Looker API's base URL: same scheme and host, without the legacy API
    port ``:19999``, path ``/looks/<id>``; with ``filters``, each one as Looker's URL filter parameter
    ``f[<field>]=<expression>`` (URL-encoded), so that the page opens on what the run read.

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
        try:
            conn = BaseHook.get_connection(conn_id)
            base_url = normalise_base_url(conn.host, conn.schema, conn.port, what="The Looker connection")
        except Exception as exc:  # a link must never fail the task (no connection, no Host...)
            log.warning("No link to Look %s: %s", look_id, type(exc).__name__)
            return ""
        return look_web_url(base_url, look_id, filters)


def _run_filters(value: Any) -> dict[str, str]:
    """The filters a (rendered) task ran with, as the sync reads them; ``{}`` when they cannot be read."""
    try:
        return parse_filters(value)
    except InvalidParameterError:
        return {}
