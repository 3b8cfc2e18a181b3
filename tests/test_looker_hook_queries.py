"""LookerHook with a Looker query as the source (by id, by slug, with filters, as a query task), its SQL, and
the Looker API calls it counts per kind, against the Looker stand-in with the real looker_sdk."""

from __future__ import annotations

import pytest
from looker_helpers import CLIENT_ID, CLIENT_SECRET, connection_json, set_connection
from standins.looker_fixtures import (
    HIDDEN_FIELDS_LOOK_ID,
    NEW_SIGNUPS_LOOK_ID,
    TOASTMATES_LOOK_ID,
    fixture_looks,
    look_query_id,
)
from standins.looker_sql import query_slug
from standins.looker_standin import LookerStandIn

from airflow_provider_looker_segment.api_calls import activity_kind
from airflow_provider_looker_segment.exceptions import LookFilterError, QueryNotFoundError, is_retryable
from airflow_provider_looker_segment.hooks.looker import LookerHook

CONN_ID = "looker_queries_test"
TOASTMATES_QUERY = look_query_id(TOASTMATES_LOOK_ID)
SIGNUPS_QUERY = look_query_id(NEW_SIGNUPS_LOOK_ID)


@pytest.fixture
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def hook(looker, monkeypatch):
    set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url, CLIENT_ID, CLIENT_SECRET))
    hook = LookerHook(CONN_ID, retries=2, backoff_factor=0, max_backoff=0.1)
    yield hook
    hook.close()


def _api_requests(looker: LookerStandIn) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in looker.requests if r.path.startswith("/api/4.0/")]


# --- reading a query --------------------------------------------------------------------------------------


def test_a_query_is_read_by_id_and_by_slug(hook, looker):
    by_id = hook.get_query(TOASTMATES_QUERY)
    info = by_id.info
    assert (info.kind, info.id, info.label) == ("query", TOASTMATES_QUERY, f"Query {TOASTMATES_QUERY}")
    assert (info.model, info.view, info.slug) == ("toastmates", "users", query_slug(TOASTMATES_QUERY))
    assert info.fields == ("users.id", "users.name", "users.email", "users.sessions_count")
    by_slug = hook.get_query(slug=info.slug)
    assert by_slug.info == info
    assert ("GET", f"/api/4.0/queries/slug/{info.slug}") in _api_requests(looker)


def test_a_querys_hidden_fields_and_time_zone_are_read_as_a_looks(hook):
    info = hook.get_query(look_query_id(HIDDEN_FIELDS_LOOK_ID)).info
    look = fixture_looks()[HIDDEN_FIELDS_LOOK_ID]
    assert info.hidden_fields == look.hidden_fields and info.query_timezone == look.query_timezone


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"query_id": "999999"}, "Looker query 999999 not found (HTTP 404), or the API user cannot see it"),
        ({"slug": "nOsUcHsLuG"}, "No Looker query has the slug nOsUcHsLuG (HTTP 404)"),
    ],
)
def test_an_unknown_query_fails_at_once_naming_it(hook, arguments, message):
    with pytest.raises(QueryNotFoundError) as raised:
        hook.get_query(**arguments)
    assert message in str(raised.value) and "query_slug from its URL's qid" in str(raised.value)
    assert not is_retryable(raised.value)


# --- running it -------------------------------------------------------------------------------------------


def test_a_query_streams_its_rows_with_its_sql(hook, looker):
    query = hook.get_query(TOASTMATES_QUERY)
    with hook.stream_query(query) as stream:
        rows = list(stream.rows)
    assert rows == list(fixture_looks()[TOASTMATES_LOOK_ID].rows)
    assert stream.label == stream.meta.source_label == f"Query {TOASTMATES_QUERY}"
    assert stream.meta.sql.startswith("SELECT") and "FROM public.users  AS users" in stream.meta.sql
    run = looker.run_requests()[-1]
    assert run.path == f"/api/4.0/queries/{TOASTMATES_QUERY}/run/json_detail"
    assert run.query["generate_drill_links"] == "false" and run.query["limit"] == "-1"


def test_filters_copy_the_query_and_the_copy_runs(hook, looker):
    query = hook.with_filters(hook.get_query(SIGNUPS_QUERY), {"users.plan": "pro"})
    assert query.run is not None and query.run_id != SIGNUPS_QUERY
    assert looker.queries.received[-1]["filters"] == {"users.created_date": "7 days", "users.plan": "pro"}
    assert query.run_slug == query_slug(query.run_id)
    assert hook.explore_url(query) == f"{looker.base_url}/explore/toastmates/users?qid={query.run_slug}"
    with hook.stream_query(query) as stream:
        rows = list(stream.rows)
    signups = fixture_looks()[NEW_SIGNUPS_LOOK_ID].rows
    assert rows == [row for row in signups if row["users.plan"] == "pro"] and rows
    assert stream.query.filters == {"users.plan": "pro"}
    assert looker.run_requests()[-1].path == f"/api/4.0/queries/{query.run_id}/run/json_detail"


def test_filters_looker_refuses_name_the_field_and_the_query(hook):
    with pytest.raises(LookFilterError) as raised:
        hook.stream_query(hook.get_query(SIGNUPS_QUERY), filters={"users.nope": "1"}).__enter__()
    assert str(raised.value).startswith(f"Query {SIGNUPS_QUERY}: Looker refused the filter on users.nope")
    assert raised.value.fields == ("users.nope",) and not is_retryable(raised.value)


def test_the_sql_of_a_query(hook, looker):
    sql = hook.query_sql(TOASTMATES_QUERY)
    assert sql.startswith("SELECT") and 'users.email  AS "users.email"' in sql
    assert looker.counters.get("runs", 0) == 0
    with pytest.raises(QueryNotFoundError):
        hook.query_sql("999999")


def test_a_query_as_a_query_task(hook, looker):
    query = hook.with_filters(hook.get_query(SIGNUPS_QUERY), {"users.plan": "pro"})
    task_id = hook.start_query_task(query=query)
    task = looker.query_tasks.get(task_id)
    assert (task.query_id, task.look_id) == (query.run_id, None)
    while hook.query_task_status(task_id) != "complete":
        pass
    with hook.stream_query_task(task_id, info=query.info) as stream:
        rows = list(stream.rows)
    assert rows and all(row["users.plan"] == "pro" for row in rows)
    assert stream.label == f"Query {SIGNUPS_QUERY}"
    assert not [r for r in looker.requests if r.path.startswith("/api/4.0/looks/")]  # no Look read


# --- API calls --------------------------------------------------------------------------------------------


def test_the_calls_of_a_look_run_are_counted_per_kind(hook):
    with hook.stream_look(TOASTMATES_LOOK_ID) as stream:
        list(stream.rows)
    hook.close()
    # POST /login and DELETE /logout (activity type none), GET /looks/1 (non_query), its run (db_query).
    assert hook.api_calls == {"query_based": 1, "administrative": 1, "login_logout": 2, "total": 4}


def test_retried_calls_count_each_attempt(hook, looker):
    looker.fail_next_runs(2, status=503, retry_after=0)
    with hook.stream_query(TOASTMATES_QUERY) as stream:
        list(stream.rows)
    # GET /queries/{id}, then three attempts of its run (two answered 503): four query-based calls.
    assert hook.api_calls["query_based"] == 4


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/api/4.0/login", "login_logout"),
        ("DELETE", "/api/4.0/logout", "login_logout"),
        ("GET", "/api/4.0/looks/42", "administrative"),
        ("GET", "/api/4.0/looks/42/run/json_detail", "query_based"),
        ("GET", "/api/4.0/queries/7", "query_based"),
        ("GET", "/api/4.0/queries/slug/aBc", "query_based"),
        ("GET", "/api/4.0/queries/7/run/sql", "query_based"),
        ("POST", "/api/4.0/queries", "query_based"),
        ("POST", "/api/4.0/query_tasks", "query_based"),
        ("GET", "/api/4.0/query_tasks/abc", "query_based"),
        ("GET", "/api/4.0/query_tasks/abc/results", "query_based"),
        ("DELETE", "/api/4.0/running_queries/abc", "query_based"),
        ("GET", "/api/4.0/datagroups", "administrative"),
        ("GET", "/api/4.0/user", "administrative"),
        ("GET", "/api/4.0/folders/1", "administrative"),
    ],
)
def test_each_endpoint_has_the_kind_of_the_api_reference(method, path, kind):
    """x-looker-activity-type in Looker.4.0.oas.json: db_query, non_query, none (login, logout)."""
    assert activity_kind(method, path) == kind
