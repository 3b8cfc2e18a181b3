"""
What the Looker stand-in says of a query besides its rows: its slug (the ``qid`` of its Explore URL) and the
SQL Looker would generate for it, from a fixture Look's fields (``GET /queries/{id}/run/sql``, and the
``sql`` of every ``json_detail`` result).

The SQL reads one table per LookML view of the query (:data:`VIEW_TABLES`: ``users`` is
``public.users``...), the explore's view first, the others joined to it, as Looker writes it: fields
``AS "view.field"``, a ``WHERE`` for the filters, ``GROUP BY`` the dimensions, ``LIMIT``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from airflow_provider_looker_segment.models import DIMENSION, MEASURE

if TYPE_CHECKING:
    from standins.looker_fixtures import FixtureLook

#: The warehouse table of each LookML view (``sql_table_name``); a view not listed reads ``public.<view>``.
VIEW_TABLES = {
    "users": "public.users",
    "accounts": "public.accounts",
    "orders": "public.orders",
    "sessions": "analytics.sessions",
}
_SLUG_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def query_slug(query_id: str) -> str:
    """A query's slug: 22 letters and digits, as Looker's (derived from the id, so stable)."""
    digest = int.from_bytes(hashlib.blake2b(f"slug:{query_id}".encode(), digest_size=16).digest(), "big")
    letters = []
    for _ in range(22):
        digest, index = divmod(digest, len(_SLUG_LETTERS))
        letters.append(_SLUG_LETTERS[index])
    return "".join(letters)


def table_of(view: str) -> str:
    """The table a view reads."""
    return VIEW_TABLES.get(view, f"public.{view}")


def generated_sql(look: FixtureLook, limit: Any = None, filters: dict[str, str] | None = None) -> str:
    """
    The SQL Looker would run for a fixture Look's query (with ``filters``, when a query changed them).

    :param look: the rows' Look (its model, explore, fields, pivots, saved filters).
    :param limit: the row limit of the run (``-1``: none), else the Look's.
    :param filters: the query's filters (default: the Look's own).
    """
    columns = [*look.fields, *look.pivot_fields]
    joined = {c.view for c in columns if c.view} | {
        name.split(".", 1)[0] for name in (filters or look.filters) if "." in name
    }
    views = [look.view, *sorted(joined - {look.view})]
    select = []
    for column in columns:
        if column.view is None:  # a table calculation: computed by Looker, not in the SQL
            continue
        expression = column.name
        if column.category == MEASURE:
            expression = f"COUNT(DISTINCT {column.name})" if column.type == "count_distinct" else "COUNT(*)"
        select.append(f'    {expression}  AS "{column.name}"')
    lines = ["SELECT", ",\n".join(select) or "    1", f"FROM {table_of(views[0])}  AS {views[0]}"]
    for view in views[1:]:
        lines.append(f"LEFT JOIN {table_of(view)}  AS {view} ON {views[0]}.{view}_id = {view}.id")
    where = [f"({name} = '{value}')" for name, value in sorted((filters or look.filters).items())]
    if where:
        lines.append("WHERE " + " AND ".join(where))
    dimensions = [str(n) for n, c in enumerate((c for c in columns if c.view), 1) if c.category == DIMENSION]
    if dimensions and len(dimensions) < len(select):
        lines.append(f"GROUP BY {','.join(dimensions)}")
    lines.append("ORDER BY 1")
    shown = (look.limit or "5000") if limit in (None, "") else str(limit)
    if str(shown) != "-1":
        lines.append(f"LIMIT {shown}")
    return "\n".join(lines)
