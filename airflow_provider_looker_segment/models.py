"""Plain data types shared by the Looker hook and the pure transform (no I/O here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_looker_segment.look_filters import shorten

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

    @classmethod
    def from_detail(
        cls, entry: Mapping[str, Any], category: str, *, hidden: bool, pivoted: bool
    ) -> LookField:
        """
        Build a column from its entry in the ``fields`` block of a ``json_detail`` result.

        :param entry: the entry (``name``, ``label``, ``label_short``, ``type``, ``tags``, ``hidden``).
        :param category: the list it is in: :data:`DIMENSION`, :data:`MEASURE` or :data:`TABLE_CALCULATION`.
        :param hidden: hidden in the Look's visualisation (hidden in LookML is the entry's ``hidden``).
        :param pivoted: its cells are per-pivot mappings.
        """
        return cls(
            name=str(entry.get("name")),
            label=entry.get("label"),
            label_short=entry.get("label_short"),
            type=entry.get("type"),
            tags=tuple(str(t) for t in entry.get("tags") or ()),
            hidden=bool(entry.get("hidden")) or hidden,
            category=category,
            pivoted=pivoted,
        )


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

    @classmethod
    def from_detail(cls, entry: Mapping[str, Any]) -> PivotValue:
        """Build a pivot column from an entry of the top-level ``pivots`` list of a ``json_detail`` result."""
        data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        label = " | ".join("" if v is None else str(v) for v in data.values())
        return cls(key=str(entry.get("key")), data=dict(data), label=label)


@dataclass(frozen=True)
class LookInfo:
    """
    What a sync reads, as Looker defines it: a Look's saved definition (``GET /looks/{id}``), or a query's
    (``GET /queries/{id}``, ``GET /queries/slug/{slug}``; then ``kind`` is ``"query"`` and ``id`` the query
    id).

    :ivar query_timezone: the time zone its query runs in (``America/New_York``), ``None`` when not set
        (Looker then uses its default).
    :ivar kind: ``"look"`` or ``"query"``.
    :ivar query_id: the id of the query it runs (a Look's saved query; a query's own id).
    :ivar slug: the query's slug (the ``qid`` of its Explore URL), when Looker gave it.
    """

    id: str
    title: str
    model: str | None
    view: str | None
    fields: tuple[str, ...]
    limit: int | None
    pivots: tuple[str, ...]
    hidden_fields: tuple[str, ...]
    deleted: bool
    query_timezone: str | None = None
    kind: str = "look"
    query_id: str | None = None
    slug: str | None = None

    @property
    def label(self) -> str:
        """``Look 42`` or ``Query 123``: how logs and messages name it."""
        return f"Look {self.id}" if self.kind == "look" else f"Query {self.id}"

    def to_dict(self) -> dict[str, Any]:
        """The definition as JSON-serialisable values (to hand it to the run after a deferral)."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in vars(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LookInfo:
        """The definition :meth:`to_dict` gave."""
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


@dataclass(frozen=True)
class LookRunQuery:
    """
    The query a filtered run of a Look ran: the Look's saved query with the run's filters.

    :param look_id: the Look.
    :param query_id: the id Looker gave the query (``None`` until it is created).
    :param filters: the filters given for the run (field → Looker filter expression).
    :param query_filters: every filter of the query run: the Look's own, with the given ones.
    :param replaced: the Look's own filters that a given filter replaced (field → the Look's expression).
    :param slug: the slug Looker gave the query (the ``qid`` of its Explore URL), once created.
    """

    look_id: str
    query_id: str | None
    filters: Mapping[str, str]
    query_filters: Mapping[str, str]
    replaced: Mapping[str, str] = field(default_factory=dict)
    slug: str | None = None

    def describe(self) -> str:
        """
        The given filters in words, e.g. ``users.plan = 'pro' (added); users.created_date = ...``; a long
        expression is shortened (:func:`~airflow_provider_looker_segment.look_filters.shorten`).
        """
        parts = []
        for name, expression in self.filters.items():
            if name not in self.replaced:
                how = "added"
            elif self.replaced[name] == expression:
                how = "the Look's own"
            else:
                how = f"replaces the Look's {shorten(self.replaced[name])!r}"
            parts.append(f"{name} = {shorten(expression)!r} ({how})")
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
    :param timezone: the time zone the query ran in, whose local times its date-time values are (the
        result's ``timezone``, else the query's ``query_timezone``); ``None`` when Looker did not say.
    :param label: how messages name the source (``Look 42``, ``Query 123``); default ``Look <look_id>``.
    :param sql: the SQL Looker generated for the query, when the result carries it (``sql`` before ``data``).
    """

    look_id: str
    fields: tuple[LookField, ...]
    pivots: tuple[PivotValue, ...] = ()
    ran_at: datetime | None = None
    limit: int | None = None
    timezone: str | None = None
    label: str | None = None
    sql: str | None = None

    @property
    def source_label(self) -> str:
        """How messages name the source: ``label``, else ``Look <look_id>``."""
        return self.label or f"Look {self.look_id}"

    @classmethod
    def from_detail(
        cls,
        look_id: str,
        head: Mapping[str, Any],
        *,
        hidden_fields: Iterable[str] = (),
        first_row: Mapping[str, Any] | None = None,
        limit: int | None = None,
        query_timezone: str | None = None,
        label: str | None = None,
    ) -> LookResultMeta:
        """
        Build the metadata of a ``json_detail`` result from its top-level keys (``fields``, ``pivots``,
        ``ran_at``, ``timezone``).

        :param look_id: the Look.
        :param head: the result's top-level keys.
        :param hidden_fields: the fields hidden in the Look's visualisation.
        :param first_row: the first raw row: a cell without ``value`` is pivoted (``{pivot key: cell}``);
            without rows, the measures and table calculations of a result with pivots are.
        :param limit: the row limit in effect.
        :param query_timezone: the query's ``query_timezone``, for a result that does not name its zone.
        :param label: how messages name the source (``Query 123``); default ``Look <look_id>``.
        """
        pivots = tuple(PivotValue.from_detail(p) for p in head.get("pivots") or () if isinstance(p, dict))
        block, hidden = head.get("fields") or {}, set(hidden_fields)
        fields = []
        for key, category in (
            ("dimensions", DIMENSION),
            ("measures", MEASURE),
            ("table_calculations", TABLE_CALCULATION),
        ):
            for entry in block.get(key) or ():
                name = str(entry.get("name"))
                if first_row is not None and name in first_row:
                    cell = first_row[name]
                    pivoted = isinstance(cell, dict) and "value" not in cell
                else:
                    pivoted = bool(pivots) and category != DIMENSION
                fields.append(LookField.from_detail(entry, category, hidden=name in hidden, pivoted=pivoted))
        ran_at = parse_ran_at(head.get("ran_at"))
        zones = (head.get("timezone"), query_timezone)
        zone = next((z.strip() for z in zones if isinstance(z, str) and z.strip()), None)
        sql = head.get("sql")
        return cls(
            look_id=look_id,
            fields=tuple(fields),
            pivots=pivots,
            ran_at=ran_at,
            limit=limit,
            timezone=zone,
            label=label,
            sql=sql if isinstance(sql, str) and sql.strip() else None,
        )

    def field_by_name(self, name: str) -> LookField | None:
        """Return the field called ``name``, or ``None``."""
        for f in self.fields:
            if f.name == name:
                return f
        return None


#: A row as the Looker hook yields it: field name → raw value (``{"value": x}`` unwrapped).
#: A pivoted measure's value is a dict ``{pivot key: raw value}``.
Row = dict[str, Any]


def parse_ran_at(value: Any) -> datetime | None:
    """Parse Looker's ``ran_at`` into a timezone-aware datetime (UTC when Looker gives no offset)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace(" ", "T", 1)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def shown_count(value: int | None) -> str:
    """A count as the task log shows it: thousands separators (``2,000,000``); ``None`` as is."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
