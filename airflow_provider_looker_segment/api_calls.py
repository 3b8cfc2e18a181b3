"""
The Looker API calls a sync or a trigger makes, counted as Looker's licences meter them (by the endpoint's
``x-looker-activity-type``; ``none`` counted as ``login_logout``); see docs/sources.md, "Looker's API
budget". Every request sent is counted, a retried one once per attempt.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Mapping

__all__ = ["ADMINISTRATIVE", "KINDS", "LOGIN_LOGOUT", "QUERY_BASED", "ApiCallCounts", "activity_kind"]

QUERY_BASED = "query_based"
ADMINISTRATIVE = "administrative"
LOGIN_LOGOUT = "login_logout"
KINDS = (QUERY_BASED, ADMINISTRATIVE, LOGIN_LOGOUT)

_ID = r"[^/]+"
#: The endpoints the provider calls, with their ``x-looker-activity-type`` in the API 4.0 reference.
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(rf"^{pattern}$"), kind)
    for method, pattern, kind in (
        ("POST", "/login", LOGIN_LOGOUT),  # login: none
        ("DELETE", "/logout", LOGIN_LOGOUT),  # logout: none
        ("GET", "/versions", LOGIN_LOGOUT),  # versions: none
        ("GET", f"/looks/{_ID}/run/{_ID}", QUERY_BASED),  # run_look: db_query
        ("POST", "/queries", QUERY_BASED),  # create_query: db_query
        ("GET", f"/queries/slug/{_ID}", QUERY_BASED),  # query_for_slug: db_query
        ("GET", f"/queries/{_ID}/run/{_ID}", QUERY_BASED),  # run_query: db_query
        ("GET", f"/queries/{_ID}", QUERY_BASED),  # query: db_query
        ("POST", "/query_tasks", QUERY_BASED),  # create_query_task: db_query
        ("GET", f"/query_tasks/{_ID}/results", QUERY_BASED),  # query_task_results: db_query
        ("GET", f"/query_tasks/{_ID}", QUERY_BASED),  # query_task: db_query
        ("DELETE", f"/running_queries/{_ID}", QUERY_BASED),  # kill_query: db_query
        ("GET", f"/looks/{_ID}", ADMINISTRATIVE),  # look: non_query
        ("GET", "/datagroups", ADMINISTRATIVE),  # all_datagroups: non_query
        ("GET", "/user", ADMINISTRATIVE),  # me: non_query
    )
)
_API_PATH = re.compile(r"^.*?/api(?:/\d+\.\d+)?(/.*)$")


def activity_kind(method: str, path: str) -> str:
    """
    The kind of a Looker API call: :data:`QUERY_BASED`, :data:`ADMINISTRATIVE` or :data:`LOGIN_LOGOUT`.

    :param method: the HTTP method.
    :param path: the URL path (``/api/4.0/looks/42`` or ``/looks/42``).
    :return: the endpoint's kind; an endpoint not listed counts as administrative (most of the API is).
    """
    found = _API_PATH.match(path)
    route = (found.group(1) if found else path).rstrip("/") or "/"
    verb = method.upper()
    for known, pattern, kind in _ROUTES:
        if known == verb and pattern.match(route):
            return kind
    return ADMINISTRATIVE


class ApiCallCounts:
    """The Looker API calls made so far, per kind (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, method: str, path: str, count: int = 1) -> None:
        """Count ``count`` calls of ``method path``."""
        with self._lock:
            self._counts[activity_kind(method, path)] += count

    def merge(self, counts: Mapping[str, int] | None) -> None:
        """Add counts of another process (e.g. a trigger's, in :meth:`to_dict`'s form)."""
        with self._lock:
            for kind in KINDS:
                self._counts[kind] += int((counts or {}).get(kind) or 0)

    def to_dict(self) -> dict[str, int]:
        """``{"query_based": n, "administrative": n, "login_logout": n, "total": n}``."""
        with self._lock:
            counts = {kind: self._counts[kind] for kind in KINDS}
        return {**counts, "total": sum(counts.values())}
