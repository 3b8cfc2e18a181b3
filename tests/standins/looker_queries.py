"""
Queries, filters and async query tasks of the Looker API stand-in (:mod:`.looker_standin`).

**Queries.** ``POST /queries`` stores a query (``WriteQuery``) and answers it with an id; an identical query
gets the id it got before, as Looker does. A query is run on the rows of a fixture Look: the Look whose saved
query has the same ``model``, ``view``, ``fields``, ``pivots``, ``dynamic_fields``, ``filter_expression`` and
``limit``, and whose saved filters the query keeps (with the same or another expression). The Look's rows
already satisfy its saved filters; every filter the query adds or changes is applied to them here.

**Filter expressions** the stand-in applies (anything else is answered with HTTP 400 naming the field and the
expression, so that a test can never pass on a filter that was silently ignored):

- any type: ``NULL``; ``-NULL`` and ``NOT NULL``;
- strings and yes/no (case-sensitive): ``FOO`` (exactly), ``FOO,BAR`` (either), ``-FOO`` (not),
  ``-FOO,-BAR`` (neither), ``FOO%`` / ``%FOO%`` / ``F_O`` (wildcards), ``EMPTY``, ``-EMPTY``; ``^`` escapes
  ``,`` ``%`` ``_`` ``^`` and a leading ``-``. Kept values match a positive term (if any) and no negative one;
- numbers: ``5``, ``1,3,5``, ``NOT 5`` / ``!=5`` / ``<>5``, ``>5``, ``>=5``, ``<5``, ``<=5`` (``-5`` is minus
  five);
- dates (a type starting with ``date``; ``YYYY-MM-DD`` or ``YYYY/MM/DD``): ``2026-11-27`` (that day),
  ``2026-11-20 to 2026-11-27`` (the end day excluded, as in Looker), ``after 2026-11-27`` (that day
  included), ``before 2026-11-27`` (that day excluded). Relative dates (``7 days``, ``today``) are refused.

A filter on a field that is not in the explore (:data:`~.looker_fixtures.EXPLORE_FIELDS` and the fields of the
explore's Looks) is refused as Looker refuses it; a filter on an explore field the fixture rows have no values
for is refused with HTTP 400 by the stand-in.

**Query tasks** (``POST /query_tasks``) go ``added`` → ``running`` → their end (``complete``, or ``error``
for a Look whose SQL fails), one step every ``polls_per_step`` looks at them (status or results requests).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from standins.looker_fixtures import EXPLORE_FIELDS, FixtureField, FixtureLook
from standins.looker_sql import query_slug

#: The writable keys of a ``Query`` (``WriteQuery``) the stand-in keeps.
QUERY_KEYS = (
    "model",
    "view",
    "fields",
    "pivots",
    "fill_fields",
    "filters",
    "filter_expression",
    "sorts",
    "limit",
    "column_limit",
    "total",
    "row_total",
    "subtotals",
    "vis_config",
    "dynamic_fields",
    "query_timezone",
)
#: What makes a query one of a Look's (its filters aside).
MATCH_KEYS = ("model", "view", "fields", "pivots", "dynamic_fields", "filter_expression", "limit")
#: Query task statuses that do not change any more.
FINAL_STATUSES = frozenset({"complete", "error", "killed", "expired"})
#: How a query task may be told to end (``never``: it keeps running).
TASK_OUTCOMES = ("complete", "error", "killed", "expired", "never")
#: The ``result_format`` values of ``CreateQueryTask`` (the stand-in produces json_detail, json and csv).
TASK_RESULT_FORMATS = frozenset(
    {"inline_json", "json", "json_detail", "json_fe", "json_bi", "csv", "html", "md", "txt", "xlsx"}
    | {"gsxml", "sql", "odc"}
)

_DATE = r"(\d{4})[-/](\d{2})[-/](\d{2})"
_NUMBER_OP = re.compile(r"^(>=|<=|!=|<>|>|<|NOT\s+)?\s*(-?\d+(?:\.\d+)?)$", re.IGNORECASE)


class FilterRefused(Exception):
    """Looker would refuse this query: a filter names a field that is not in the explore."""

    def __init__(self, field_name: str, explore: str) -> None:
        super().__init__(f"Invalid filter: {field_name}")
        self.field_name = field_name
        self.explore = explore


class StandInCannot(Exception):
    """The stand-in cannot do what a real Looker would (an expression it does not interpret, ...)."""


# --- filter expressions ----------------------------------------------------------------------------------

Predicate = Callable[[Any], bool]


def _terms(expression: str) -> list[tuple[bool, str]]:
    """Split a string filter on unescaped commas: ``[(negated, raw term)]`` (escapes kept for later)."""
    terms: list[tuple[bool, str]] = []
    current, index = "", 0
    while index < len(expression):
        char = expression[index]
        if char == "^" and index + 1 < len(expression):
            current += expression[index : index + 2]
            index += 2
            continue
        if char == ",":
            terms.append((False, current))
            current = ""
        else:
            current += char
        index += 1
    terms.append((False, current))
    return [
        (True, raw.strip()[1:]) if raw.strip().startswith("-") else (False, raw.strip()) for _, raw in terms
    ]


def _string_term(raw: str) -> Predicate:
    """One string term: ``NULL``, ``EMPTY``, a value with ``%``/``_`` wildcards, ``^`` escapes."""
    if raw == "NULL":
        return lambda value: value is None
    if raw == "EMPTY":
        return lambda value: value is None or value == ""
    pattern, literal, wild, index = "", "", False, 0
    while index < len(raw):
        char = raw[index]
        if char == "^" and index + 1 < len(raw):
            pattern += re.escape(raw[index + 1])
            literal += raw[index + 1]
            index += 2
            continue
        if char in "%_":
            pattern += ".*" if char == "%" else "."
            wild = True
        else:
            pattern += re.escape(char)
            literal += char
        index += 1
    if not wild:
        return lambda value: value is not None and _as_text(value) == literal
    compiled = re.compile(pattern, re.DOTALL)
    return lambda value: value is not None and compiled.fullmatch(_as_text(value)) is not None


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


def _string_filter(expression: str) -> Predicate:
    positive = [_string_term(raw) for negated, raw in _terms(expression) if not negated]
    negative = [_string_term(raw) for negated, raw in _terms(expression) if negated]

    def keep(value: Any) -> bool:
        if positive and not any(term(value) for term in positive):
            return False
        return not any(term(value) for term in negative)

    return keep


def _number_term(raw: str, name: str, expression: str) -> Predicate:
    found = _NUMBER_OP.match(raw.strip())
    if not found:
        raise StandInCannot(f"the number filter {name} = {expression!r} (term {raw.strip()!r})")
    op = (found.group(1) or "").upper().strip() or "="
    target = Decimal(found.group(2))
    compare: dict[str, Callable[[Decimal], bool]] = {
        "=": lambda n: n == target,
        "NOT": lambda n: n != target,
        "!=": lambda n: n != target,
        "<>": lambda n: n != target,
        ">": lambda n: n > target,
        ">=": lambda n: n >= target,
        "<": lambda n: n < target,
        "<=": lambda n: n <= target,
    }
    test = compare[op]

    def keep(value: Any) -> bool:
        if value is None or isinstance(value, bool):
            return False
        try:
            return test(Decimal(str(value)))
        except InvalidOperation:
            raise StandInCannot(f"the number filter {name} = {expression!r} on the value {value!r}") from None

    return keep


def _number_filter(name: str, expression: str) -> Predicate:
    text = expression.strip()
    negate_all = text.upper().startswith("NOT ") and "," in text
    if negate_all:  # NOT 1,3,5
        text = text[4:]
    terms = [_number_term(raw, name, expression) for raw in text.split(",")]
    if negate_all:
        return lambda value: value is not None and not any(term(value) for term in terms)
    return lambda value: any(term(value) for term in terms)


def _parse_day(text: str, name: str, expression: str) -> date:
    found = re.fullmatch(_DATE, text.strip())
    if not found:
        raise StandInCannot(f"the date filter {name} = {expression!r}")
    try:
        return date(int(found.group(1)), int(found.group(2)), int(found.group(3)))
    except ValueError:
        raise StandInCannot(f"the date filter {name} = {expression!r} (no such day)") from None


def _row_day(value: Any, name: str) -> date:
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise StandInCannot(f"a date filter on {name}, whose value {value!r} is not a day") from None


def _date_filter(name: str, expression: str) -> Predicate:
    text = expression.strip()
    lowered = text.lower()
    if lowered.startswith("after "):
        start = _parse_day(text[6:], name, expression)
        return lambda value: value is not None and _row_day(value, name) >= start
    if lowered.startswith("before "):
        end = _parse_day(text[7:], name, expression)
        return lambda value: value is not None and _row_day(value, name) < end
    parts = re.split(r"\s+to\s+", text, maxsplit=1, flags=re.IGNORECASE)
    if len(parts) == 2:
        low, high = _parse_day(parts[0], name, expression), _parse_day(parts[1], name, expression)
        return lambda value: value is not None and low <= _row_day(value, name) < high
    day = _parse_day(text, name, expression)
    return lambda value: value is not None and _row_day(value, name) == day


def compile_filter(fixture_field: FixtureField, expression: str) -> Predicate:
    """
    Return the predicate of a Looker filter expression on a field (see the module's list).

    :raises StandInCannot: an expression the stand-in does not interpret.
    """
    name, text = fixture_field.name, str(expression).strip()
    if not text:
        raise StandInCannot(f"the empty filter on {name}")
    if text.upper() == "NULL":
        return lambda value: value is None
    if text.upper() in ("-NULL", "NOT NULL"):
        return lambda value: value is not None
    kind = fixture_field.type or "string"
    if kind.startswith("date"):
        return _date_filter(name, text)
    if fixture_field.is_numeric or kind == "number":
        return _number_filter(name, text)
    if kind in ("string", "yesno", "zipcode", "tier"):
        return _string_filter(text)
    raise StandInCannot(f"a filter on {name}, a field of type {kind}")


def filtered_look(look: FixtureLook, filters: dict[str, str]) -> FixtureLook:
    """
    Return ``look`` with only the rows that pass ``filters`` (a plain Look, its rows in memory).

    :raises StandInCannot: a filter on a field the rows have no values for, on a pivoted field, or an
        expression the stand-in does not interpret.
    """
    if not filters:
        return look
    columns = {f.name: f for f in (*look.fields, *look.pivot_fields)}
    pivoted = look.pivoted_names() | {f.name for f in look.pivot_fields}
    tests: list[tuple[str, Predicate]] = []
    for name, expression in filters.items():
        if name not in columns:
            raise StandInCannot(
                f"the filter {name} = {expression!r}: the rows of fixture Look {look.id} have no values for "
                f"{name} (add it to the Look's fields)"
            )
        if name in pivoted:
            raise StandInCannot(f"the filter {name} = {expression!r} on a pivot or pivoted field")
        tests.append((name, compile_filter(columns[name], expression)))
    rows = tuple(
        row
        for row in (look.row(index) for index in range(look.row_count))
        if all(test(row.get(name)) for name, test in tests)
    )
    values = {f.name: getattr(look, f.name) for f in dataclasses.fields(FixtureLook)}
    values.update(rows=rows, filters={**look.filters, **filters})
    return FixtureLook(**values)


# --- queries ----------------------------------------------------------------------------------------------


def writable_query(query: dict[str, Any]) -> dict[str, Any]:
    """The writable part of a query, empty values (``[]``, ``{}``, ``""``) as ``None``."""
    return {key: (query.get(key) if query.get(key) not in ([], {}, "") else None) for key in QUERY_KEYS}


def explore_fields(model: str, view: str, looks: Iterable[FixtureLook]) -> frozenset[str]:
    """The fields of an explore: :data:`EXPLORE_FIELDS` and every field and saved filter of its Looks."""
    names = set(EXPLORE_FIELDS.get((model, view), ()))
    for look in looks:
        if (look.model, look.view) == (model, view):
            names.update(f.name for f in (*look.fields, *look.pivot_fields))
            names.update(look.filters)
    return frozenset(names)


def refused_filters(query: dict[str, Any], looks: Iterable[FixtureLook]) -> None:
    """
    Raise :class:`FilterRefused` for the first filter on a field that is not in the query's explore.

    :param query: a query body (``model``, ``view``, ``filters``).
    :param looks: every Look of the stand-in.
    """
    model, view = str(query.get("model")), str(query.get("view"))
    known = explore_fields(model, view, looks)
    for name in query.get("filters") or {}:
        if name not in known:
            raise FilterRefused(name, f"{model}::{view}")


def resolve_query(query: dict[str, Any], looks: Iterable[FixtureLook]) -> FixtureLook:
    """
    Return the rows a query gives: those of the fixture Look it was made from, filtered.

    :raises StandInCannot: no fixture Look, or several, could have given this query; a filter the stand-in
        cannot apply.
    """
    wanted = writable_query(query)
    key = tuple(repr(wanted[k]) for k in MATCH_KEYS)
    filters = {str(k): str(v) for k, v in (wanted["filters"] or {}).items()}
    found: list[tuple[int, FixtureLook, dict[str, str]]] = []
    for look in looks:
        if look.deleted:
            continue
        saved_query = writable_query(look.look_json()["query"])
        if tuple(repr(saved_query[k]) for k in MATCH_KEYS) != key:
            continue
        saved = look.filters
        if any(name not in filters for name in saved):
            continue  # the query drops a saved filter: the Look's rows cannot be "unfiltered"
        changes = {name: value for name, value in filters.items() if saved.get(name) != value}
        found.append((len(saved), look, changes))
    if not found:
        raise StandInCannot(
            "this query: no fixture Look has a query with its model, view, fields, pivots, dynamic fields, "
            "filter expression and limit, and all of its saved filters"
        )
    best = max(score for score, _, _ in found)
    chosen = [(look, changes) for score, look, changes in found if score == best]
    if len(chosen) > 1:
        ids = ", ".join(look.id for look, _ in chosen)
        raise StandInCannot(f"this query: it could come from several fixture Looks ({ids})")
    look, changes = chosen[0]
    return filtered_look(look, changes)


class QueryStore:
    """The queries created through ``POST /queries`` (ids ``2000001``, ``2000002``, ...); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queries: dict[str, dict[str, Any]] = {}
        self._by_body: dict[str, str] = {}
        self._received: list[dict[str, Any]] = []

    @property
    def received(self) -> list[dict[str, Any]]:
        """Every ``POST /queries`` body received, as sent (read-only keys and all)."""
        with self._lock:
            return [dict(body) for body in self._received]

    def create(self, query: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Store a query (or find the identical one); return its id and its stored form."""
        stored = writable_query(query)
        fingerprint = repr(sorted(stored.items()))
        with self._lock:
            self._received.append(dict(query))
            query_id = self._by_body.get(fingerprint)
            if query_id is None:
                query_id = str(2_000_001 + len(self._queries))
                self._queries[query_id] = stored
                self._by_body[fingerprint] = query_id
        return query_id, dict(stored)

    def get(self, query_id: str) -> dict[str, Any] | None:
        """A created query by id, or ``None``."""
        with self._lock:
            found = self._queries.get(query_id)
        return dict(found) if found is not None else None

    def id_of_slug(self, slug: str) -> str | None:
        """The id of the created query with this slug, or ``None``."""
        with self._lock:
            ids = list(self._queries)
        return next((query_id for query_id in ids if query_slug(query_id) == slug), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queries)


def query_json(query_id: str, query: dict[str, Any]) -> dict[str, Any]:
    """A ``Query`` as Looker answers it."""
    body = dict(query)
    body.update(
        id=query_id,
        can={"run": True, "see_results": True, "explore": True, "create": True, "show": True},
        slug=query_slug(query_id),
        share_url=None,
        expanded_share_url=None,
        url=f"/explore/{query.get('model')}/{query.get('view')}?qid={query_slug(query_id)}",
        client_id=f"standin{query_id:0>15}",
        has_table_calculations=bool(query.get("dynamic_fields")),
        filter_config=None,
        visible_ui_sections=None,
    )
    return body


def only_fields(body: dict[str, Any], fields: str | None) -> dict[str, Any]:
    """Keep the keys named in a ``fields`` request parameter (``id,status``), or everything."""
    if not fields:
        return body
    wanted = {name.strip() for name in fields.split(",") if name.strip()}
    return {key: value for key, value in body.items() if key in wanted}


# --- query tasks ------------------------------------------------------------------------------------------


@dataclass
class QueryTask:
    """
    An async query task.

    :param id: the task id (32 hex digits, as Looker's).
    :param query_id: the query it runs.
    :param result_format: the result format asked for.
    :param params: the run parameters (``limit``, ``apply_vis``, ``cache``...).
    :param look: the rows it gives (resolved and filtered when it was created).
    :param outcome: how it ends: ``complete``, ``error``, ``killed``, ``expired``, or ``never``.
    :param look_id: the Look given in the request, if any.
    :param source: the source given in the request, if any.
    """

    id: str
    query_id: str
    result_format: str
    params: dict[str, str]
    look: FixtureLook
    outcome: str = "complete"
    look_id: str | None = None
    source: str | None = None
    status: str = "added"
    looks_at: int = 0
    error: tuple[str, str | None] | None = None
    history: list[str] = field(default_factory=list)

    def look_at(self, polls_per_step: int) -> str:
        """The status a request sees now; each look moves the task on (one step per ``polls_per_step``)."""
        if self.status not in FINAL_STATUSES:
            step = self.looks_at // max(1, polls_per_step)
            if step >= 2:
                self.status = "running" if self.outcome == "never" else self.outcome
            else:
                self.status = ("added", "running")[step]
        self.looks_at += 1
        self.history.append(self.status)
        return self.status

    def json(self) -> dict[str, Any]:
        """The task as ``GET /query_tasks/{id}`` answers it (``QueryTask``)."""
        return {
            "id": self.id,
            "query_id": self.query_id,
            "generate_links": self.params.get("generate_drill_links", "true").lower() != "false",
            "force_production": False,
            "path_prefix": None,
            "cache": self.params.get("cache", "true").lower() != "false",
            "server_table_calcs": False,
            "cache_only": False,
            "cache_key": None,
            "status": self.status,
            "source": self.source,
            "runtime": 0.042 if self.status in ("complete", "error") else None,
            "rebuild_pdts": False,
            "result_source": "query" if self.status == "complete" else None,
            "look_id": self.look_id,
            "dashboard_id": None,
            "result_format": self.result_format,
            "can": {"cancel": self.status not in FINAL_STATUSES},
        }


class QueryTasks:
    """The query tasks of the stand-in, with their fault settings; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, QueryTask] = {}
        self._outcomes: list[str] = []

    def end_next(self, outcome: str, count: int = 1) -> None:
        """The next ``count`` tasks end with ``outcome`` (see :data:`TASK_OUTCOMES`)."""
        if outcome not in TASK_OUTCOMES:
            raise ValueError(f"outcome must be one of {TASK_OUTCOMES}, got {outcome!r}")
        with self._lock:
            self._outcomes.extend([outcome] * count)

    def clear(self) -> None:
        """Forget the outcomes asked for."""
        with self._lock:
            self._outcomes.clear()

    def add(
        self, query_id: str, result_format: str, params: dict[str, str], look: FixtureLook, **kw: Any
    ) -> QueryTask:
        """Create a task (it starts ``added``)."""
        with self._lock:
            outcome = self._outcomes.pop(0) if self._outcomes else "complete"
            if outcome == "complete" and look.looker_error is not None:
                outcome = "error"
            task = QueryTask(
                secrets.token_hex(16), query_id, result_format, dict(params), look, outcome, **kw
            )
            if outcome == "error":
                task.error = (
                    (look.looker_error, None)
                    if look.looker_error is not None
                    else ("Query failed", "the stand-in was told to fail this query task")
                )
            self._tasks[task.id] = task
        return task

    def look_at(self, task_id: str, polls_per_step: int) -> QueryTask | None:
        """Look at a task (moving it on); ``None`` when unknown."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                task.look_at(polls_per_step)
        return task

    def kill(self, task_id: str) -> bool:
        """Kill a task that has not ended; return whether there was one."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.status in FINAL_STATUSES:
                return False
            task.status = "killed"
            task.history.append("killed")
        return True

    def get(self, task_id: str) -> QueryTask | None:
        """A task by id (without moving it on)."""
        with self._lock:
            return self._tasks.get(task_id)

    def all(self) -> list[QueryTask]:
        """Every task, oldest first."""
        with self._lock:
            return list(self._tasks.values())
