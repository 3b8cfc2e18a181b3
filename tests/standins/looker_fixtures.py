"""
The Looks served by the Looker API stand-in (:mod:`.looker_standin`).

Every fixture Look is addressable by id. The ids are constants of this module so tests, the demo and the
benchmark can name them:

======  =====================================================================================
Id      What it covers
======  =====================================================================================
1       the seed's toastmates.com cohort "Active users, last 30 days" (10 rows, tagged fields)
2       untagged fields that must be recognised by name / label
3       hidden fields: one in ``vis_config.hidden_fields``, one hidden in LookML
4       a pivot on ``orders.status`` (pivoted measures, one null pivot cell)
5       table calculations (a number and a yes/no that evaluates to ``false``)
6       value types: nulls, integers, floats, big integers, dates, times, yes/no, ``0``/``""``; its query
        runs in the time zone ``America/New_York`` (its date-times are local times there)
7       an anonymous id (tag ``segment_anonymous_id``) and no user id
8       only an email (tag ``email``)
9       two fields tagged ``user_id``
10      a failing SQL query (HTTP 200 with ``[{"looker_error": ...}]``)
11      a deleted Look
12      a saved limit (5) smaller than its rows (8): truncation unless ``limit=-1``
13      a Look with no rows
14      values at JSON's edges: integers beyond 64 bits, numbers beyond a float's range (``1E+400``),
        lone-surrogate escapes (``\\ud800``), user ids with surrounding blanks
15      an account-level Look (tagged ``segment_group_id``, no user column)
16      users with their account (``segment_group_id``) and account traits
17      "New sign-ups": two sign-ups a day over the last 7 days (``users.created_date``, type ``date_date``,
        dated relative to the day the fixtures are built), saved filter ``users.created_date: 7 days``
1000000 + N   a generated Look of N rows (e.g. ``1001000`` has 1,000 rows, ``2000000`` has 1 M rows)
======  =====================================================================================

A Look's query has the id :func:`look_query_id` (``"1"`` + the Look id on five digits, e.g. ``100001``), so
that ``GET /queries/{query_id}/run/...`` and query tasks find the Look back. :data:`EXPLORE_FIELDS` lists the
fields of each explore besides those of its Looks (what a filter may name).

Generated Looks (:func:`generated_look`) have five columns — user id, email, name, plan, sessions count —
and encode their rows from string templates chunk by chunk, so a 1 M-row body is never held in memory.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from airflow_provider_looker_segment.models import DIMENSION, MEASURE, TABLE_CALCULATION
from standins.looker_sql import query_slug

#: Result formats the stand-in can produce.
JSON_DETAIL = "json_detail"
JSON = "json"
CSV = "csv"
RESULT_FORMATS = (JSON_DETAIL, JSON, CSV)

TOASTMATES_LOOK_ID = "1"
UNTAGGED_LOOK_ID = "2"
HIDDEN_FIELDS_LOOK_ID = "3"
PIVOT_LOOK_ID = "4"
TABLE_CALCULATION_LOOK_ID = "5"
VALUE_TYPES_LOOK_ID = "6"
ANONYMOUS_ID_LOOK_ID = "7"
EMAIL_ONLY_LOOK_ID = "8"
TWO_USER_IDS_LOOK_ID = "9"
SQL_ERROR_LOOK_ID = "10"
DELETED_LOOK_ID = "11"
TRUNCATED_LOOK_ID = "12"
EMPTY_LOOK_ID = "13"
EDGE_VALUES_LOOK_ID = "14"
ACCOUNTS_LOOK_ID = "15"
ACCOUNT_USERS_LOOK_ID = "16"
NEW_SIGNUPS_LOOK_ID = "17"
#: Look ids from here on are generated Looks: Look ``GENERATED_LOOK_BASE + n`` has ``n`` rows.
GENERATED_LOOK_BASE = 1_000_000
#: Look ids from here on are generated Looks that evolve: Look ``EVOLVING_LOOK_BASE + g * 10**8 + n`` is the
#: generated Look of ``n`` rows at generation ``g`` (see :class:`EvolvingLook`).
EVOLVING_LOOK_BASE = 2_000_000_000

#: The first row of Look 1, as in Segment's documentation of the Looker source.
TOASTMATES_FIRST_ROW = {
    "users.id": "00MWWFOLRcETcTCf",
    "users.name": "Ty Arthur",
    "users.email": "ty.arthur@segment.com",
    "users.sessions_count": 2,
}

#: Marks a ``Decimal`` in ``json.dumps`` output, written back as the bare number (``1E+400`` has no float).
_RAW_NUMBER = "\ue000"
_RAW_NUMBER_STRING = re.compile(f'"{_RAW_NUMBER}([-+.0-9eE]+)"'.encode())

#: Fields of each explore (model, view) besides the fields of its Looks: what a query may filter on.
EXPLORE_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("toastmates", "users"): (
        "users.id",
        "users.email",
        "users.name",
        "users.plan",
        "users.country",
        "users.created_date",
        "users.created_month",
        "users.last_active_date",
        "users.sessions_count",
    ),
}


def look_query_id(look_id: str) -> str:
    """The id of a Look's saved query: ``"1"`` + the Look id (five digits at least), e.g. ``100001``."""
    return f"1{int(look_id):05d}" if look_id.isdigit() else f"1{look_id}"


def look_id_of_query(query_id: str) -> str | None:
    """The Look whose saved query has this id (the inverse of :func:`look_query_id`), or ``None``."""
    if not query_id.startswith("1") or len(query_id) < 2:
        return None
    rest = query_id[1:]
    return str(int(rest)) if rest.isdigit() else rest


_NUMERIC_TYPES = frozenset(
    {"number", "count", "count_distinct", "sum", "sum_distinct", "average", "average_distinct", "min", "max"}
)


@dataclass(frozen=True)
class FixtureField:
    """
    One column of a fixture Look, rendered as a ``json_detail`` field entry.

    :param name: Looker field name (``view.field``, or a bare name for a table calculation).
    :param label: full label, e.g. ``Users Email``.
    :param label_short: short label, e.g. ``Email``.
    :param type: LookML type.
    :param tags: LookML tags.
    :param hidden: hidden in LookML (hidden in the visualisation is the Look's ``hidden_fields``).
    :param category: ``dimension``, ``measure`` or ``table_calculation``.
    """

    name: str
    label: str
    label_short: str
    type: str = "string"
    tags: tuple[str, ...] = ()
    hidden: bool = False
    category: str = DIMENSION

    @property
    def view(self) -> str | None:
        """The view a LookML field belongs to; ``None`` for a table calculation."""
        return self.name.split(".", 1)[0] if "." in self.name else None

    @property
    def is_numeric(self) -> bool:
        """Whether Looker marks the field numeric."""
        return self.type in _NUMERIC_TYPES

    def detail(self) -> dict[str, Any]:
        """Return the field's entry in the ``fields`` block of a ``json_detail`` result."""
        entry: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "label_short": self.label_short,
            "view": self.view,
            "view_label": self.label[: -len(self.label_short)].strip() or None,
            "type": self.type,
            "category": self.category,
            "tags": list(self.tags),
            "hidden": self.hidden,
            "is_numeric": self.is_numeric,
            "sortable": True,
        }
        if self.category == TABLE_CALCULATION:
            entry["is_table_calculation"] = True
        return entry


def _dim(
    name: str, label_short: str, type_: str = "string", *tags: str, hidden: bool = False
) -> FixtureField:
    """Return a dimension whose full label is the view's title followed by ``label_short``."""
    view = name.split(".", 1)[0].replace("_", " ").title()
    return FixtureField(name, f"{view} {label_short}", label_short, type_, tags, hidden, DIMENSION)


def _measure(name: str, label_short: str, type_: str = "count", *tags: str) -> FixtureField:
    """Return a measure whose full label is the view's title followed by ``label_short``."""
    view = name.split(".", 1)[0].replace("_", " ").title()
    return FixtureField(name, f"{view} {label_short}", label_short, type_, tags, False, MEASURE)


def _table_calc(name: str, label: str, type_: str = "number") -> FixtureField:
    """Return a table calculation (its short label is its label)."""
    return FixtureField(name, label, label, type_, (), False, TABLE_CALCULATION)


@dataclass
class FixtureLook:
    """
    A saved Look of the stand-in: its definition (``GET /looks/{id}``) and its result rows.

    :param id: the Look id.
    :param title: the Look's title.
    :param model: LookML model of the query.
    :param view: explore of the query.
    :param fields: the result columns (dimensions, measures, table calculations — not pivot dimensions).
    :param rows: the rows, field name -> raw value; a pivoted field's value is ``{pivot key: raw value}``.
    :param limit: the saved row limit, a string as Looker stores it (``None``: Looker's default of 5000).
    :param pivot_fields: the pivot dimensions.
    :param pivot_values: the pivot columns, each ``{"key": ..., "data": {pivot field: value}}``.
    :param hidden_fields: fields hidden in the visualisation (``query.vis_config.hidden_fields``).
    :param deleted: the Look is in the trash.
    :param looker_error: when set, running the Look fails with this SQL error.
    :param filters: the query's saved filters; the rows already satisfy them.
    :param query_timezone: the query's time zone (its date-times are local times of it), also the result's
        ``timezone``; ``None``: not set (the result then names no zone either).
    :param sql_in_results: its ``json_detail`` results carry the query's ``sql`` before their ``data`` (as
        the stand-in's do by default); ``False`` leaves it out (it is then only had from ``run/sql``).
    """

    id: str
    title: str
    model: str
    view: str
    fields: tuple[FixtureField, ...]
    rows: tuple[dict[str, Any], ...] = ()
    limit: str | None = "500"
    pivot_fields: tuple[FixtureField, ...] = ()
    pivot_values: tuple[dict[str, Any], ...] = ()
    hidden_fields: tuple[str, ...] = ()
    deleted: bool = False
    looker_error: str | None = None
    filters: dict[str, str] = field(default_factory=dict)
    query_timezone: str | None = "UTC"
    sql_in_results: bool = True

    @property
    def row_count(self) -> int:
        """How many rows the query returns without a limit."""
        return len(self.rows)

    def row(self, index: int) -> dict[str, Any]:
        """Return row ``index`` (0-based)."""
        return self.rows[index]

    def saved_limit(self) -> int:
        """The row limit applied when a run does not pass one (``-1``: all rows)."""
        return int(self.limit) if self.limit else 5000

    def pivoted_names(self) -> frozenset[str]:
        """Names of the fields whose cells are per-pivot mappings (measures and table calculations)."""
        if not self.pivot_fields:
            return frozenset()
        return frozenset(f.name for f in self.fields if f.category != DIMENSION)

    def columns(self, apply_vis: bool) -> tuple[FixtureField, ...]:
        """The fields a run returns; ``apply_vis`` drops the fields hidden in the visualisation."""
        if not apply_vis:
            return self.fields
        return tuple(f for f in self.fields if f.name not in self.hidden_fields)

    def look_json(self) -> dict[str, Any]:
        """Return the Look as ``GET /api/4.0/looks/{id}`` does (``LookWithQuery``)."""
        calcs = [f for f in self.fields if f.category == TABLE_CALCULATION]
        query_fields = [f.name for f in self.fields if f.category == DIMENSION]
        query_fields += [f.name for f in self.pivot_fields]
        query_fields += [f.name for f in self.fields if f.category != DIMENSION]
        return {
            "id": self.id,
            "title": self.title,
            "description": "",
            "user_id": "1",
            "deleted": self.deleted,
            "deleted_at": "2024-05-02T10:00:00.000+00:00" if self.deleted else None,
            "is_run_on_load": False,
            "public": False,
            "query_id": look_query_id(self.id),
            "folder_id": "1",
            "model": {"id": self.model, "label": self.model.replace("_", " ").title()},
            "created_at": "2024-01-15T09:30:00.000+00:00",
            "updated_at": "2024-04-01T12:00:00.000+00:00",
            "short_url": f"/x/{self.id}",
            "url": f"/looks/{self.id}",
            "can": {"run": True, "see_lookml": True, "explore": True},
            "query": {
                "id": look_query_id(self.id),
                "model": self.model,
                "view": self.view,
                "fields": query_fields,
                "pivots": [f.name for f in self.pivot_fields] or None,
                "fill_fields": None,
                "filters": dict(self.filters) or None,
                "sorts": [query_fields[0]] if query_fields else [],
                "limit": self.limit,
                "column_limit": "50" if self.pivot_fields else None,
                "total": False,
                "row_total": None,
                "vis_config": {"type": "looker_grid", "hidden_fields": list(self.hidden_fields)},
                "dynamic_fields": json.dumps([{"table_calculation": f.name, "label": f.label} for f in calcs])
                if calcs
                else None,
                "query_timezone": self.query_timezone,
                "has_table_calculations": bool(calcs),
                "client_id": f"fixture{self.id}",
                "slug": query_slug(look_query_id(self.id)),
            },
        }

    def detail_fields(self, apply_vis: bool) -> dict[str, list[dict[str, Any]]]:
        """Return the ``fields`` block of a ``json_detail`` result."""
        columns = self.columns(apply_vis)
        return {
            "dimensions": [f.detail() for f in columns if f.category == DIMENSION],
            "measures": [f.detail() for f in columns if f.category == MEASURE],
            "table_calculations": [f.detail() for f in columns if f.category == TABLE_CALCULATION],
            "pivots": [f.detail() for f in self.pivot_fields],
        }

    def detail_pivots(self) -> list[dict[str, Any]]:
        """Return the top-level ``pivots`` block of a ``json_detail`` result."""
        return [
            {
                "key": p["key"],
                "is_total": False,
                "data": dict(p["data"]),
                "sort_values": dict(p["data"]),
                "labels": {name: str(value) for name, value in p["data"].items()},
            }
            for p in self.pivot_values
        ]

    def encode_rows(
        self, fmt: str, columns: tuple[FixtureField, ...], start: int, stop: int, links: bool = False
    ) -> bytes:
        """
        Encode rows ``[start, stop)`` for ``fmt``; with ``links``, ``json_detail`` cells carry their drill
        links (:func:`drill_links`), as Looker's do unless ``generate_drill_links=false``.

        JSON rows are joined with commas (no leading or trailing comma); CSV rows end with a newline.
        """
        if fmt == CSV:
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            for index in range(start, stop):
                writer.writerow(self._csv_cells(self.row(index), columns))
            text = out.getvalue().encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
            return text.encode()  # surrogate pairs joined, lone surrogates U+FFFD
        pivoted = self.pivoted_names()
        encode = _detail_cell if fmt == JSON_DETAIL else _plain_cell
        if links and fmt == JSON_DETAIL:

            def encode(value: Any, fixture_field: FixtureField | None = None) -> dict[str, Any]:
                cell = _detail_cell(value, fixture_field)
                return {**cell, "links": drill_links(self, fixture_field, value)}

        rows = [
            json_bytes(
                {
                    f.name: _pivot_cell(self.row(i).get(f.name), lambda cell, f=f: encode(cell, f))
                    if f.name in pivoted
                    else encode(self.row(i).get(f.name), f)
                    for f in columns
                }
            )
            for i in range(start, stop)
        ]
        return b",".join(rows)

    def csv_header(self, columns: tuple[FixtureField, ...]) -> bytes:
        """Return the CSV header line (labels; one column per pivot value for pivoted fields)."""
        out = io.StringIO()
        labels: list[str] = []
        pivoted = self.pivoted_names()
        for f in columns:
            if f.name in pivoted:
                labels += [f"{f.label} {p['key']}" for p in self.pivot_values]
            else:
                labels.append(f.label)
        csv.writer(out, lineterminator="\n").writerow(labels)
        return out.getvalue().encode()

    def _csv_cells(self, row: dict[str, Any], columns: tuple[FixtureField, ...]) -> list[str]:
        """Return one CSV line's cells (pivoted fields spread over the pivot values)."""
        cells: list[Any] = []
        pivoted = self.pivoted_names()
        for f in columns:
            value = row.get(f.name)
            if f.name in pivoted:
                cells += [_csv_value((value or {}).get(p["key"])) for p in self.pivot_values]
            else:
                cells.append(_csv_value(value))
        return cells


def _raw_number(value: Any) -> str:
    """``json.dumps`` fallback: a ``Decimal`` becomes a marked string that :func:`json_bytes` unquotes."""
    if isinstance(value, Decimal) and value.is_finite():
        return f"{_RAW_NUMBER}{value}"
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")


def json_bytes(value: Any) -> bytes:
    """
    Compact UTF-8 JSON as Looker writes it; a ``Decimal`` is written as the exact number it is (``1E+400``,
    beyond a float's range) and a lone surrogate in a string as its escape (``"\\ud800"``).
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_raw_number)
    data = text.encode("utf-8", "backslashreplace")  # only lone surrogates cannot be encoded: \udXXX
    return _RAW_NUMBER_STRING.sub(rb"\1", data) if _RAW_NUMBER in text else data


def _detail_cell(value: Any, fixture_field: FixtureField | None = None) -> dict[str, Any]:
    """A ``json_detail`` cell: ``{"value": x}`` (plus ``rendered`` for dates, as Looker adds it)."""
    if fixture_field is not None and fixture_field.type.startswith("date") and value is not None:
        return {"value": value, "rendered": value}
    return {"value": value}


def drill_links(look: FixtureLook, fixture_field: FixtureField | None, value: Any) -> list[dict[str, Any]]:
    """
    The drill links of a ``json_detail`` cell: a measure's "Show All" to the rows behind it, a dimension's
    drill to the details of its value (``label``, ``url``, ``type``, ``type_label``); none for a null or a
    table calculation.
    """
    if value is None or fixture_field is None or fixture_field.category == TABLE_CALCULATION:
        return []
    view = fixture_field.view or look.view
    explore = f"/explore/{look.model}/{look.view}?fields={view}.detail*"
    if fixture_field.category == MEASURE:
        label, url, kind = f"Show All {value}", f"{explore}&limit=500", "measure_default"
    else:
        label = f"{fixture_field.label} details"
        url = f"{explore}&f[{fixture_field.name}]={quote(str(value), safe='')}&limit=500"
        kind = "drill"
    return [{"label": label, "url": url, "type": kind, "type_label": None}]


def _plain_cell(value: Any, fixture_field: FixtureField | None = None) -> Any:
    """A ``json`` cell: the raw value."""
    return value


def _pivot_cell(value: Any, encode: Any) -> dict[str, Any]:
    """A pivoted cell: ``{pivot key: cell}``."""
    return {key: encode(cell) for key, cell in (value or {}).items()}


def _csv_value(value: Any) -> str:
    """Render a raw value in a CSV cell (``null`` is empty, yes/no booleans are ``Yes``/``No``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


# --- generated Looks ------------------------------------------------------------------------------------

_GEN_NAMES = (
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Katherine Johnson",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Frances Allen",
    "Ken Thompson",
    "Radia Perlman",
    "Tim Berners-Lee",
    "Margaret Hamilton",
    "Dennis Ritchie",
    "Shafi Goldwasser",
    "John McCarthy",
    "Sophie Wilson",
    "Leslie Lamport",
    "Hedy Lamarr",
    "Niklaus Wirth",
    "Anita Borg",
)
_GEN_PLANS = ("free", "pro", "enterprise")
_GEN_CYCLE = 60  # lcm(len(_GEN_NAMES), len(_GEN_PLANS)): name and plan repeat together every 60 rows
_GEN_SESSIONS_MOD = 97

GENERATED_FIELDS = (
    _dim("users.id", "User ID", "string", "user_id"),
    _dim("users.email", "Email", "string", "email"),
    _dim("users.name", "Name"),
    _dim("users.plan", "Plan"),
    _dim("users.sessions_count", "Sessions Count", "number"),
)

# Per-row templates: everything but the id, the email and the sessions count is pre-encoded per cycle slot.
_DETAIL_MIDDLE = tuple(
    f'"users.name":{{"value":"{_GEN_NAMES[k % 20]}"}},"users.plan":{{"value":"{_GEN_PLANS[k % 3]}"}},'
    for k in range(_GEN_CYCLE)
)
_JSON_MIDDLE = tuple(
    f'"users.name":"{_GEN_NAMES[k % 20]}","users.plan":"{_GEN_PLANS[k % 3]}",' for k in range(_GEN_CYCLE)
)
_CSV_MIDDLE = tuple(f"{_GEN_NAMES[k % 20]},{_GEN_PLANS[k % 3]}" for k in range(_GEN_CYCLE))


def generated_row(index: int) -> dict[str, Any]:
    """Return row ``index`` of every generated Look (deterministic)."""
    return {
        "users.id": f"u{index:08d}",
        "users.email": f"user{index:08d}@example.com",
        "users.name": _GEN_NAMES[index % 20],
        "users.plan": _GEN_PLANS[index % 3],
        "users.sessions_count": index % _GEN_SESSIONS_MOD,
    }


@dataclass
class GeneratedLook(FixtureLook):
    """
    A Look of ``size`` deterministic rows (:func:`generated_row`), encoded from templates chunk by chunk.

    :param size: number of rows the query returns without a limit.
    """

    size: int = 0

    @property
    def row_count(self) -> int:
        """How many rows the query returns without a limit."""
        return self.size

    def row(self, index: int) -> dict[str, Any]:
        """Return row ``index`` (0-based)."""
        return generated_row(index)

    def encode_rows(
        self, fmt: str, columns: tuple[FixtureField, ...], start: int, stop: int, links: bool = False
    ) -> bytes:
        """
        Encode rows ``[start, stop)`` from string templates (about 1.5 M rows/s); with drill ``links``, as a
        fixture Look does (slower: only a test or the benchmark asks for them).
        """
        if links and fmt == JSON_DETAIL:
            return super().encode_rows(fmt, columns, start, stop, links)
        if fmt == JSON_DETAIL:
            mid = _DETAIL_MIDDLE
            text = ",".join(
                [
                    f'{{"users.id":{{"value":"u{i:08d}"}},"users.email":{{"value":"user{i:08d}@example.com"}},'
                    f'{mid[i % 60]}"users.sessions_count":{{"value":{i % 97}}}}}'
                    for i in range(start, stop)
                ]
            )
        elif fmt == JSON:
            mid = _JSON_MIDDLE
            text = ",".join(
                [
                    f'{{"users.id":"u{i:08d}","users.email":"user{i:08d}@example.com",'
                    f'{mid[i % 60]}"users.sessions_count":{i % 97}}}'
                    for i in range(start, stop)
                ]
            )
        else:
            mid = _CSV_MIDDLE
            text = "".join(
                [f"u{i:08d},user{i:08d}@example.com,{mid[i % 60]},{i % 97}\n" for i in range(start, stop)]
            )
        return text.encode()


def generated_look(
    size: int, look_id: str | int | None = None, *, limit: str | None = "5000"
) -> GeneratedLook:
    """
    Return a generated Look of ``size`` rows.

    :param size: number of rows.
    :param look_id: the Look id; defaults to ``GENERATED_LOOK_BASE + size``.
    :param limit: the saved row limit (a string, as Looker stores it).
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    look_id = str(GENERATED_LOOK_BASE + size if look_id is None else look_id)
    return GeneratedLook(
        id=look_id,
        title=f"Generated cohort of {size:,} users",
        model="toastmates",
        view="users",
        fields=GENERATED_FIELDS,
        limit=limit,
        size=size,
    )


@dataclass
class EvolvingLook(GeneratedLook):
    """
    A generated Look at a generation: at generation ``g >= 1``, 1 % of its rows changed (rows ``i`` with
    ``i % 100 == g``: another plan) and 1 % replaced by other users (rows with ``i % 100 == 50 + g``: user
    ``r<g>-<i>``) against generation 0, which is the generated Look itself. A changed-only sync of
    generation 0, then 1, then 2... sees about 1 % changed, 1 % entered and 1 % left each time.

    :param generation: 0 to 49.
    """

    generation: int = 0

    def row(self, index: int) -> dict[str, Any]:
        """Return row ``index`` (0-based)."""
        row = generated_row(index)
        g = self.generation
        if g and index % 100 == g:
            row["users.plan"] = f"changed-{g}"
        elif g and index % 100 == 50 + g:
            row["users.id"] = f"r{g}-{index:08d}"
        return row

    def encode_rows(
        self, fmt: str, columns: tuple[FixtureField, ...], start: int, stop: int, links: bool = False
    ) -> bytes:
        """Generation 0 as a generated Look; other generations patch its rows (JSON formats only)."""
        g = self.generation
        if not g or fmt not in (JSON_DETAIL, JSON) or links:
            return super().encode_rows(fmt, columns, start, stop, links)
        detail = fmt == JSON_DETAIL
        mid = _DETAIL_MIDDLE if detail else _JSON_MIDDLE
        value = (lambda text: f'{{"value":{text}}}') if detail else (lambda text: text)
        changed = f'"users.plan":{{"value":"changed-{g}"}},' if detail else f'"users.plan":"changed-{g}",'
        rows = []
        for i in range(start, stop):
            uid = f"r{g}-{i:08d}" if i % 100 == 50 + g else f"u{i:08d}"
            middle = mid[i % 60]
            if i % 100 == g:
                middle = middle[: middle.index('"users.plan"')] + changed
            rows.append(
                f'{{"users.id":{value(json.dumps(uid))},"users.email":{value(json.dumps(f"user{i:08d}@example.com"))},'
                f'{middle}"users.sessions_count":{value(str(i % 97))}}}'
            )
        return ",".join(rows).encode()


def resolve_generated(look_id: str) -> GeneratedLook | None:
    """Return the generated Look for an id ``>= GENERATED_LOOK_BASE``, else ``None``."""
    if not look_id.isdigit() or int(look_id) < GENERATED_LOOK_BASE:
        return None
    if int(look_id) >= EVOLVING_LOOK_BASE:
        generation, size = divmod(int(look_id) - EVOLVING_LOOK_BASE, 10**8)
        if generation >= 50:
            return None
        base = generated_look(size, look_id)
        return EvolvingLook(
            **{**base.__dict__, "title": f"{base.title}, generation {generation}"}, generation=generation
        )
    return generated_look(int(look_id) - GENERATED_LOOK_BASE, look_id)


# --- fixture Looks --------------------------------------------------------------------------------------

_USER_ID = _dim("users.id", "User ID", "string", "user_id")
_EMAIL = _dim("users.email", "Email", "string", "email")
_NAME = _dim("users.name", "Name")
_TOASTMATES_FIELDS = (_USER_ID, _NAME, _EMAIL, _dim("users.sessions_count", "Sessions Count", "number"))

_TOASTMATES_ROWS = (
    ("00MWWFOLRcETcTCf", "Ty Arthur", "ty.arthur@segment.com", 2),
    ("01HQZ3V8K2M5N7PB", "Priya Raman", "priya.raman@toastmates.com", 14),
    ("02J4X9C1D6F8G3HK", "Marcus Oyelaran", "marcus.oyelaran@example.org", 7),
    ("03KD7R2T5W8Y1Z4A", "Hannah Lindqvist", "hannah.lindqvist@example.com", 31),
    ("04LMP6Q9S3U7V2XB", "Diego Fernández", "diego.fernandez@example.net", 1),
    ("05NQ8T1W4Z7C2F5D", "Aiko Tanaka", "aiko.tanaka@example.jp", 9),
    ("06PR3V6Y9B2E5H8J", "Fatima Zahra Benali", "fatima.benali@example.com", 23),
    ("07QS5X8A1D4G7K2M", "Liam O'Connor", "liam.oconnor@example.ie", 4),
    ("08RT7Z2C5F8J1N4Q", "Grace Mbeki", "grace.mbeki@example.co.za", 12),
    ("09SV9B4E7H2L5P8T", "Noah Goldberg", "noah.goldberg@example.com", 5),
)


def _toastmates_rows(count: int = len(_TOASTMATES_ROWS)) -> tuple[dict[str, Any], ...]:
    """Look 1's rows as field name -> value."""
    names = ("users.id", "users.name", "users.email", "users.sessions_count")
    return tuple(dict(zip(names, values, strict=True)) for values in _TOASTMATES_ROWS[:count])


def _rows(names: tuple[str, ...], *values: tuple[Any, ...]) -> tuple[dict[str, Any], ...]:
    """Build rows from a tuple of field names and tuples of values."""
    return tuple(dict(zip(names, row, strict=True)) for row in values)


def _toastmates() -> FixtureLook:
    return FixtureLook(
        id=TOASTMATES_LOOK_ID,
        title="Active users, last 30 days",
        model="toastmates",
        view="users",
        fields=_TOASTMATES_FIELDS,
        rows=_toastmates_rows(),
        limit="500",
        filters={"users.last_active_date": "30 days"},
    )


def _untagged() -> FixtureLook:
    fields = (
        _dim("customers.customer_id", "Customer ID"),
        _dim("customers.email_address", "Email Address"),
        _dim("customers.first_name", "First Name"),
        _dim("customers.last_name", "Last Name"),
        _dim("customers.lifetime_orders", "Lifetime Orders", "number"),
    )
    rows = _rows(
        tuple(f.name for f in fields),
        ("C-1001", "jo.bloggs@example.com", "Jo", "Bloggs", 3),
        ("C-1002", "sam.lee@example.com", "Sam", "Lee", 0),
        ("C-1003", "ana.souza@example.com.br", "Ana", "Souza", 12),
        ("C-1004", "wei.zhang@example.cn", "Wei", "Zhang", 1),
    )
    return FixtureLook(UNTAGGED_LOOK_ID, "Customers (no tags)", "crm", "customers", fields, rows)


def _hidden() -> FixtureLook:
    fields = (
        _USER_ID,
        _EMAIL,
        _NAME,
        _dim("users.internal_score", "Internal Score", "number"),
        _dim("users.row_key", "Row Key", "string", hidden=True),
    )
    rows = _rows(
        tuple(f.name for f in fields),
        ("00MWWFOLRcETcTCf", "ty.arthur@segment.com", "Ty Arthur", 0.82, "rk-1"),
        ("01HQZ3V8K2M5N7PB", "priya.raman@toastmates.com", "Priya Raman", 0.35, "rk-2"),
        ("02J4X9C1D6F8G3HK", "marcus.oyelaran@example.org", "Marcus Oyelaran", None, "rk-3"),
    )
    return FixtureLook(
        HIDDEN_FIELDS_LOOK_ID,
        "Users with hidden columns",
        "toastmates",
        "users",
        fields,
        rows,
        hidden_fields=("users.internal_score",),
    )


def _pivoted() -> FixtureLook:
    status = _dim("orders.status", "Status")
    fields = (
        _USER_ID,
        _EMAIL,
        _measure("orders.count", "Count", "count"),
        _measure("orders.total_revenue", "Total Revenue", "sum"),
    )
    keys = ("complete", "pending", "cancelled")
    rows = (
        {
            "users.id": "00MWWFOLRcETcTCf",
            "users.email": "ty.arthur@segment.com",
            "orders.count": {"complete": 3, "pending": 1, "cancelled": 0},
            "orders.total_revenue": {"complete": 120.5, "pending": 19.99, "cancelled": 0.0},
        },
        {
            "users.id": "01HQZ3V8K2M5N7PB",
            "users.email": "priya.raman@toastmates.com",
            "orders.count": {"complete": 7, "pending": None, "cancelled": 2},
            "orders.total_revenue": {"complete": 310.0, "pending": None, "cancelled": 45.25},
        },
        {
            "users.id": "02J4X9C1D6F8G3HK",
            "users.email": "marcus.oyelaran@example.org",
            "orders.count": {"complete": 1, "pending": 0, "cancelled": 0},
            "orders.total_revenue": {"complete": 12.0, "pending": 0.0, "cancelled": 0.0},
        },
    )
    return FixtureLook(
        PIVOT_LOOK_ID,
        "Orders by status per user",
        "toastmates",
        "users",
        fields,
        rows,
        pivot_fields=(status,),
        pivot_values=tuple({"key": key, "data": {"orders.status": key}} for key in keys),
    )


def _table_calculations() -> FixtureLook:
    fields = (
        _USER_ID,
        _EMAIL,
        _measure("orders.count", "Count", "count"),
        _measure("orders.total_revenue", "Total Revenue", "sum"),
        _table_calc("average_order_value", "Average Order Value", "number"),
        _table_calc("is_big_spender", "Is Big Spender", "yesno"),
    )
    rows = _rows(
        tuple(f.name for f in fields),
        ("00MWWFOLRcETcTCf", "ty.arthur@segment.com", 4, 140.49, 35.1225, False),
        ("01HQZ3V8K2M5N7PB", "priya.raman@toastmates.com", 9, 355.25, 39.472222, True),
        ("02J4X9C1D6F8G3HK", "marcus.oyelaran@example.org", 0, 0.0, None, False),
    )
    return FixtureLook(TABLE_CALCULATION_LOOK_ID, "Revenue per user", "toastmates", "users", fields, rows)


def _value_types() -> FixtureLook:
    fields = (
        _USER_ID,
        _EMAIL,
        _NAME,
        _dim("users.age", "Age", "number"),
        _dim("users.balance", "Balance", "number"),
        _dim("users.external_id", "External ID", "number"),
        _dim("users.created_date", "Created Date", "date_date"),
        _dim("users.last_seen_time", "Last Seen Time", "date_time"),
        _dim("users.created_month", "Created Month", "date_month"),
        _dim("users.is_verified", "Is Verified (Yes / No)", "yesno"),
        _measure("users.lifetime_value", "Lifetime Value", "sum"),
        _table_calc("is_new", "Is New", "yesno"),
    )
    rows = _rows(
        tuple(f.name for f in fields),
        (
            "00MWWFOLRcETcTCf",
            "ty.arthur@segment.com",
            "Ty Arthur",
            34,
            120.75,
            9007199254740993,
            "2024-02-29",
            "2024-03-01 08:15:30",
            "2024-02",
            "Yes",
            512.5,
            True,
        ),
        (
            "01HQZ3V8K2M5N7PB",
            None,
            "",
            0,
            -12.5,
            0,
            "2023-12-31",
            "2024-01-01 00:00:00",
            "2023-12",
            "No",
            0,
            False,
        ),
        (
            "02J4X9C1D6F8G3HK",
            "zoe@example.com",
            "Zoë Ümlaut 😀",
            None,
            0.0,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
    )
    return FixtureLook(
        VALUE_TYPES_LOOK_ID,
        "Every value type",
        "toastmates",
        "users",
        fields,
        rows,
        query_timezone="America/New_York",
    )


def _anonymous() -> FixtureLook:
    fields = (
        _dim("sessions.anonymous_id", "Anonymous ID", "string", "segment_anonymous_id"),
        _dim("sessions.email", "Email", "string", "email"),
        _dim("sessions.browser", "Browser"),
    )
    rows = _rows(
        tuple(f.name for f in fields),
        ("anon-7f3c9a2e", "visitor.one@example.com", "Firefox"),
        ("anon-1b2d4f6a", None, "Chrome"),
        ("anon-9e8d7c6b", "visitor.three@example.com", "Safari"),
    )
    return FixtureLook(ANONYMOUS_ID_LOOK_ID, "Anonymous visitors", "toastmates", "sessions", fields, rows)


def _email_only() -> FixtureLook:
    fields = (_EMAIL, _NAME, _dim("users.plan", "Plan"))
    rows = _rows(
        tuple(f.name for f in fields),
        ("ty.arthur@segment.com", "Ty Arthur", "pro"),
        ("priya.raman@toastmates.com", "Priya Raman", "free"),
        ("marcus.oyelaran@example.org", "Marcus Oyelaran", "enterprise"),
    )
    return FixtureLook(EMAIL_ONLY_LOOK_ID, "Newsletter subscribers", "toastmates", "users", fields, rows)


def _two_user_ids() -> FixtureLook:
    fields = (_USER_ID, _dim("accounts.owner_id", "Owner ID", "string", "user_id"), _EMAIL)
    rows = _rows(
        tuple(f.name for f in fields),
        ("00MWWFOLRcETcTCf", "owner-17", "ty.arthur@segment.com"),
        ("01HQZ3V8K2M5N7PB", "owner-17", "priya.raman@toastmates.com"),
        ("02J4X9C1D6F8G3HK", "owner-42", "marcus.oyelaran@example.org"),
    )
    return FixtureLook(TWO_USER_IDS_LOOK_ID, "Users and account owners", "toastmates", "users", fields, rows)


def _sql_error() -> FixtureLook:
    return FixtureLook(
        SQL_ERROR_LOOK_ID,
        "Broken cohort",
        "toastmates",
        "users",
        (_USER_ID, _EMAIL, _dim("users.last_login_date", "Last Login Date", "date_date")),
        looker_error=(
            "An error occurred while running the query: "
            "ERROR: column users.last_login does not exist\n  Position: 87"
        ),
    )


def _deleted() -> FixtureLook:
    return FixtureLook(
        DELETED_LOOK_ID,
        "Active users, 2023 (deleted)",
        "toastmates",
        "users",
        _TOASTMATES_FIELDS,
        _toastmates_rows(3),
        deleted=True,
    )


def _truncated() -> FixtureLook:
    extra = (
        ("10TX2D5G8K1N4R7U", "Omar Haddad", "omar.haddad@example.com", 3),
        ("11UY4F7J2M5Q8T1W", "Elena Petrova", "elena.petrova@example.com", 6),
    )
    names = ("users.id", "users.name", "users.email", "users.sessions_count")
    rows = _toastmates_rows(6) + _rows(names, *extra)
    return FixtureLook(
        TRUNCATED_LOOK_ID,
        "Active users (saved limit 5)",
        "toastmates",
        "users",
        _TOASTMATES_FIELDS,
        rows,
        "5",
    )


def _empty() -> FixtureLook:
    return FixtureLook(EMPTY_LOOK_ID, "Nobody yet", "toastmates", "users", _TOASTMATES_FIELDS, (), "500")


def _edge_values() -> FixtureLook:
    fields = (
        _USER_ID,
        _EMAIL,
        _NAME,
        _dim("users.external_id", "External ID", "number"),
        _dim("users.score", "Score", "number"),
    )
    rows = _rows(
        tuple(f.name for f in fields),
        ("  00MWWFOLRcETcTCf ", "ty.arthur@segment.com", "Ty \ud800Arthur", 2**64, Decimal("1E+400")),
        (2**64, "priya.raman@toastmates.com", "Priya \udc00Raman", -(2**64) - 1, Decimal("-1E+400")),
        (Decimal("42.0"), "marcus.oyelaran@example.org", "Marcus \ud83d\ude00", 2**63 - 1, Decimal("1.5")),
        ("   ", "zoe@example.com", "Zoë \ud800\ud800", 0, Decimal("0.1")),
    )
    return FixtureLook(EDGE_VALUES_LOOK_ID, "Values at JSON's edges", "toastmates", "users", fields, rows)


_ACCOUNT_ID = _dim("accounts.id", "Account ID", "string", "segment_group_id")
_ACCOUNT_NAME = _dim("accounts.name", "Name")
_ACCOUNT_PLAN = _dim("accounts.plan", "Plan")
_ACCOUNT_SEATS = _dim("accounts.seats", "Seats", "number")
_ACCOUNTS = (
    ("acct-toastmates", "Toastmates Inc.", "enterprise", 120),
    ("acct-brightloaf", "Brightloaf Bakery", "pro", 12),
    ("acct-ferncastle", "Ferncastle Labs", "free", 3),
)


def _accounts() -> FixtureLook:
    """An account-level Look (one row per account, no user column): the group id is tagged."""
    fields = (_ACCOUNT_ID, _ACCOUNT_NAME, _ACCOUNT_PLAN, _ACCOUNT_SEATS)
    rows = _rows(tuple(f.name for f in fields), *_ACCOUNTS, (None, "No account yet", "free", 0))
    return FixtureLook(ACCOUNTS_LOOK_ID, "Paying accounts", "toastmates", "accounts", fields, rows)


def _account_users() -> FixtureLook:
    """Users with their account (tagged segment_group_id) and account traits, one row per account."""
    fields = (_USER_ID, _EMAIL, _ACCOUNT_ID, _ACCOUNT_NAME, _ACCOUNT_PLAN)
    rows = _rows(
        tuple(f.name for f in fields),
        ("00MWWFOLRcETcTCf", "ty.arthur@segment.com", "acct-toastmates", "Toastmates Inc.", "enterprise"),
        ("01HQZ3V8K2M5N7PB", "priya.raman@toastmates.com", "acct-brightloaf", "Brightloaf Bakery", "pro"),
        (None, "marcus.oyelaran@example.org", "acct-ferncastle", "Ferncastle Labs", "free"),
    )
    return FixtureLook(ACCOUNT_USERS_LOOK_ID, "Account owners", "toastmates", "users", fields, rows)


_SIGNUPS = (
    ("10SG4K7N2Q5T8W1Z", "Amara Okafor", "pro"),
    ("11SH6M9P4S7V2Y5B", "Jonas Berg", "free"),
    ("12SJ8P2R6U9X3A6D", "Lucía Morales", "free"),
    ("13SK1R4T8W2Z5C8F", "Kenji Watanabe", "enterprise"),
    ("14SL3T6V1Y4B7E1H", "Chloé Martin", "pro"),
    ("15SM5V8X3A6D9G2K", "Ravi Shankar", "free"),
    ("16SN7X1Z5C8F2J5M", "Olivia Brown", "pro"),
    ("17SP9Z3B7E1H4L7P", "Mateus Silva", "free"),
    ("18SQ2B5D9G3K6N9R", "Ingrid Holm", "enterprise"),
    ("19SR4D7F2J5M8Q2T", "Tariq Aziz", "free"),
    ("20SS6F9H4L7P1S4W", "Mei Chen", "pro"),
    ("21ST8H2K6N9R3V6Y", "Sofia Rossi", "free"),
    ("22SU1K4M8Q2T5X8A", "Ewan Campbell", "pro"),
    ("23SV3M6P1S4W7Z1C", "Nadia Haddad", "free"),
)


def new_signups(today: date | None = None) -> FixtureLook:
    """
    Look 17, "New sign-ups": two users a day from six days before ``today`` to ``today`` (the UTC date
    when ``None``), oldest first, so that a filter bound to a DAG run's data interval finds rows.

    :param today: the last day with sign-ups.
    """
    last = today or datetime.now(timezone.utc).date()
    fields = (
        _USER_ID,
        _EMAIL,
        _NAME,
        _dim("users.plan", "Plan"),
        _dim("users.created_date", "Created Date", "date_date"),
    )
    rows = tuple(
        {
            "users.id": user_id,
            "users.email": f"signup.{index + 1:02d}@toastmates.com",
            "users.name": name,
            "users.plan": plan,
            "users.created_date": (last - timedelta(days=6 - index // 2)).isoformat(),
        }
        for index, (user_id, name, plan) in enumerate(_SIGNUPS)
    )
    return FixtureLook(
        NEW_SIGNUPS_LOOK_ID,
        "New sign-ups",
        "toastmates",
        "users",
        fields,
        rows,
        filters={"users.created_date": "7 days"},
    )


def fixture_looks() -> dict[str, FixtureLook]:
    """Return a fresh registry of every fixture Look, by id (generated Looks are resolved on demand)."""
    looks = (
        _toastmates(),
        _untagged(),
        _hidden(),
        _pivoted(),
        _table_calculations(),
        _value_types(),
        _anonymous(),
        _email_only(),
        _two_user_ids(),
        _sql_error(),
        _deleted(),
        _truncated(),
        _empty(),
        _edge_values(),
        _accounts(),
        _account_users(),
        new_signups(),
    )
    return {look.id: look for look in looks}
