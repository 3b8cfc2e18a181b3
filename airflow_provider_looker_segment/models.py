"""Plain data types shared by the Looker hook and the pure transform (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Field categories as Looker's ``json_detail`` format groups them.
DIMENSION = "dimension"
MEASURE = "measure"
TABLE_CALCULATION = "table_calculation"


@dataclass(frozen=True)
class LookField:
    """
    One column of a Look's result, from the ``fields`` block of Looker's ``json_detail`` format.

    :param name: Looker field name, e.g. ``users.email``.
    :param label: full label, e.g. ``Users Email``.
    :param label_short: short label, e.g. ``Email``.
    :param type: LookML type (``string``, ``number``, ``date_date``, ``yesno``, ...).
    :param tags: LookML tags, e.g. ``("email",)``.
    :param hidden: hidden in the Look's visualisation (``vis_config.hidden_fields``) or in LookML.
    :param category: ``dimension``, ``measure`` or ``table_calculation``.
    :param pivoted: the field's cell is a mapping ``{pivot key: value}`` (a measure of a pivoted query).
    """

    name: str
    label: str | None = None
    label_short: str | None = None
    type: str | None = None
    tags: tuple[str, ...] = ()
    hidden: bool = False
    category: str = DIMENSION
    pivoted: bool = False


@dataclass(frozen=True)
class PivotValue:
    """
    One pivot column of a pivoted Look.

    :param key: Looker's pivot key (the key of the pivoted cells), e.g. ``complete`` or ``2024-01|FIELD|CA``.
    :param data: the pivot dimension values, e.g. ``{"orders.status": "complete"}``.
    :param label: a readable label for the pivot value (the values joined with ``" | "``).
    """

    key: str
    data: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class LookInfo:
    """A Look's saved definition, from ``GET /looks/{id}``."""

    id: str
    title: str
    model: str | None
    view: str | None
    fields: tuple[str, ...]
    limit: int | None
    pivots: tuple[str, ...]
    hidden_fields: tuple[str, ...]
    deleted: bool


@dataclass(frozen=True)
class LookRunQuery:
    """
    The query a filtered run of a Look ran: the Look's saved query with the run's filters.

    :param look_id: the Look.
    :param query_id: the id Looker gave the query (``None`` until it is created).
    :param filters: the filters given for the run (field → Looker filter expression).
    :param query_filters: every filter of the query run: the Look's own, with the given ones.
    :param replaced: the Look's own filters that a given filter replaced (field → the Look's expression).
    """

    look_id: str
    query_id: str | None
    filters: Mapping[str, str]
    query_filters: Mapping[str, str]
    replaced: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The given filters in words, e.g. ``users.plan = 'pro' (added); users.created_date = ...``."""
        parts = []
        for name, expression in self.filters.items():
            if name not in self.replaced:
                how = "added"
            elif self.replaced[name] == expression:
                how = "the Look's own"
            else:
                how = f"replaces the Look's {self.replaced[name]!r}"
            parts.append(f"{name} = {expression!r} ({how})")
        return "; ".join(parts)


@dataclass(frozen=True)
class LookResultMeta:
    """
    What is known about a Look's result before its first row.

    :param look_id: the Look.
    :param fields: every column, in result order (dimensions, measures, table calculations).
    :param pivots: pivot values, empty for an unpivoted Look.
    :param ran_at: when Looker ran the query (timezone-aware); ``None`` if Looker did not say.
    :param limit: the row limit in effect (``-1`` or ``None`` for no limit).
    """

    look_id: str
    fields: tuple[LookField, ...]
    pivots: tuple[PivotValue, ...] = ()
    ran_at: datetime | None = None
    limit: int | None = None

    def field_by_name(self, name: str) -> LookField | None:
        """Return the field called ``name``, or ``None``."""
        for f in self.fields:
            if f.name == name:
                return f
        return None


#: A row as the Looker hook yields it: field name → raw value (``{"value": x}`` unwrapped).
#: A pivoted measure's value is a dict ``{pivot key: raw value}``.
Row = dict[str, Any]
