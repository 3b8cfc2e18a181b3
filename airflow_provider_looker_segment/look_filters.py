"""
The filters given for a run of a Look, checked before Looker is asked anything (pure, no I/O).

Only what this side can judge is refused (see :func:`normalise_filters`); the expression itself is Looker's
to judge (docs/sources.md, "Templated filters"). :func:`shorten` keeps log lines showing long values short.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from airflow_provider_looker_segment.exceptions import InvalidParameterError

#: Characters of a filter expression shown in a log line or a message (the summary keeps it whole).
SHOWN_CHARS = 200

_HINT = "e.g. '2026-11-28', 'pro,enterprise', 'NULL' (is null) or '-NULL' (is not null)"


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """
    ``text`` as a log line may show it: whole up to ``limit`` characters, else its start and its length.

    :param text: e.g. a filter expression.
    :param limit: the most characters kept.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def normalise_filters(filters: Mapping[str, Any] | None) -> dict[str, str]:
    """
    Check the filters given for a run: a mapping of Looker field name → Looker filter expression.

    :param filters: e.g. ``{"users.created_date": "2026-11-27"}``; ``None`` or empty for none. Numbers are
        taken as their text (``5`` → ``"5"``).
    :return: the filters, names and expressions stripped of surrounding blanks.
    :raises InvalidParameterError: not a mapping, an empty field name, two names that differ only by blanks,
        or a missing, empty or non-text expression (an empty expression would make Looker ignore the filter
        silently).
    """
    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise InvalidParameterError(
            "filters must be a mapping of Looker field name to filter expression, e.g. "
            f"{{'users.created_date': '2026-11-27'}}; got a {type(filters).__name__}"
        )
    checked: dict[str, str] = {}
    given: dict[str, Any] = {}
    for name, expression in filters.items():
        field_name = name.strip() if isinstance(name, str) else ""
        if not field_name:
            raise InvalidParameterError(f"filters: {name!r} is not a Looker field name (e.g. 'users.state')")
        if field_name in given:
            raise InvalidParameterError(
                f"filters name the field {field_name} twice: {given[field_name]!r} and {name!r} differ only "
                "by blanks, and only one filter per field can run; keep one"
            )
        given[field_name] = name
        checked[field_name] = _expression(field_name, expression)
    return checked


def _expression(field_name: str, expression: Any) -> str:
    """One filter's expression as text, or the reason it is not one."""
    if expression is None:
        raise InvalidParameterError(
            f"filters[{field_name!r}] has no expression (None): give a Looker filter expression ({_HINT}), "
            "or leave the field out to keep the Look's own filter"
        )
    if isinstance(expression, bool) or not isinstance(expression, str | int | float | Decimal):
        shown = shorten(repr(expression))
        raise InvalidParameterError(
            f"filters[{field_name!r}] must be a Looker filter expression (text), got {shown}"
        )
    text = str(expression).strip()
    if not text:
        raise InvalidParameterError(
            f"filters[{field_name!r}] is empty: Looker would ignore it; give a filter expression ({_HINT}), "
            "or leave the field out"
        )
    return text
