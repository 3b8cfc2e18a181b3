"""
The Looker stand-in's queries by id and slug, the SQL of a query, and the datagroups, as the Looker API 4.0
reference documents them (``query``, ``query_for_slug``, ``run_query`` with ``result_format=sql``,
``all_datagroups``), read with the unmodified looker_sdk and over plain HTTP.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import looker_sdk
import pytest
import requests
from looker_helpers import CLIENT_ID, CLIENT_SECRET, unmodified_sdk
from looker_sdk import error as sdk_error
from standins.looker_fixtures import ACCOUNT_USERS_LOOK_ID, TOASTMATES_LOOK_ID, fixture_looks, look_query_id
from standins.looker_sql import query_slug
from standins.looker_standin import DOCS_BASE, LookerStandIn

#: Every key of the ``Datagroup`` schema of the API 4.0 reference.
DATAGROUP_KEYS = {
    "can",
    "created_at",
    "id",
    "model_name",
    "name",
    "stale_before",
    "trigger_check_at",
    "trigger_error",
    "trigger_value",
    "triggered_at",
}


@pytest.fixture
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def sdk(looker, monkeypatch):
    return unmodified_sdk(looker.base_url, monkeypatch)


def _get(looker: LookerStandIn, path: str, token: str | None, **params: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{looker.base_url}/api/4.0/{path}", params=params, headers=headers, timeout=10)


def _token(looker: LookerStandIn) -> str:
    answer = requests.post(
        f"{looker.base_url}/api/4.0/login",
        data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        timeout=10,
    )
    return answer.json()["access_token"]


# --- queries by id and by slug ----------------------------------------------------------------------------


def test_a_looks_query_is_read_by_id_and_by_slug_with_the_sdk(sdk):
    query_id = look_query_id(TOASTMATES_LOOK_ID)
    query = sdk.query(query_id)
    slug = query.slug
    assert re.fullmatch(r"[A-Za-z0-9]{22}", slug), slug  # as Looker's slugs
    assert (query.id, query.model, query.view) == (query_id, "toastmates", "users")
    assert query.url == f"/explore/toastmates/users?qid={slug}"
    assert sdk.look(TOASTMATES_LOOK_ID).query.slug == slug  # the Look's query is that query
    by_slug = sdk.query_for_slug(slug)
    assert (by_slug.id, by_slug.fields, by_slug.slug) == (query_id, query.fields, slug)


def test_a_created_query_is_read_by_its_slug(sdk):
    look = sdk.look(ACCOUNT_USERS_LOOK_ID)
    created = sdk.create_query(
        looker_sdk.models40.WriteQuery(model=look.query.model, view=look.query.view, fields=look.query.fields)
    )
    assert created.slug == query_slug(created.id)
    assert sdk.query_for_slug(created.slug).id == created.id


@pytest.mark.parametrize(
    ("path", "template"),
    [("queries/999999", "queries/:query_id"), ("queries/slug/nOsUcHsLuG", "queries/slug/:slug")],
)
def test_unknown_queries_are_lookers_404(looker, path, template):
    answer = _get(looker, path, _token(looker))
    assert answer.status_code == 404
    assert answer.json() == {"message": "Not found", "documentation_url": f"{DOCS_BASE}/404/get/{template}"}
    assert _get(looker, path, None).status_code == 401  # authentication first, as every route


def test_sdk_raises_on_an_unknown_slug(sdk):
    with pytest.raises(sdk_error.SDKError):
        sdk.query_for_slug("nOsUcHsLuG")


def test_running_an_unknown_query_is_404(looker):
    answer = _get(looker, "queries/999999/run/json_detail", _token(looker))
    assert answer.status_code == 404


# --- SQL --------------------------------------------------------------------------------------------------


def test_run_sql_answers_the_sql_without_running(looker):
    token = _token(looker)
    runs = looker.counters.get("runs", 0)
    answer = _get(looker, f"queries/{look_query_id(ACCOUNT_USERS_LOOK_ID)}/run/sql", token)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    sql = answer.text
    assert sql.startswith("SELECT") and "FROM public.users  AS users" in sql
    assert "LEFT JOIN public.accounts  AS accounts" in sql
    assert looker.counters.get("runs", 0) == runs  # the SQL, not a run


def test_json_detail_results_carry_the_same_sql(looker):
    token = _token(looker)
    query_id = look_query_id(TOASTMATES_LOOK_ID)
    sql = _get(looker, f"queries/{query_id}/run/sql", token, limit="-1").text
    detail = _get(looker, f"queries/{query_id}/run/json_detail", token, limit="-1").json()
    assert detail["sql"] == sql and "LIMIT" not in sql  # limit -1: every row
    looker.add_look(replace(fixture_looks()[TOASTMATES_LOOK_ID], id="701", sql_in_results=False))
    assert "sql" not in _get(looker, "looks/701/run/json_detail", token).json()


# --- datagroups -------------------------------------------------------------------------------------------


def test_datagroups_are_listed_as_the_reference_documents_them(sdk, looker):
    groups = {(g.model_name, g.name): g for g in sdk.all_datagroups()}
    assert set(groups) >= {("toastmates", "nightly_etl"), ("toastmates", "hourly_sessions")}
    answer = _get(looker, "datagroups", _token(looker))
    assert all(set(entry) == DATAGROUP_KEYS for entry in answer.json())
    assert groups[("b2b", "accounts_refresh")].triggered_at is None  # never triggered
    assert _get(looker, "datagroups", None).status_code == 401


def test_triggered_at_advances_when_the_script_triggers_it(sdk, looker):
    before = looker.datagroups.triggered_at("toastmates", "nightly_etl")
    after = looker.datagroups.trigger("toastmates", "nightly_etl")
    assert after > before and after <= time.time() + 1
    listed = {(g.model_name, g.name): g for g in sdk.all_datagroups()}
    assert listed[("toastmates", "nightly_etl")].triggered_at == after
    # The stand-in's own control route does the same from a shell.
    answer = requests.post(f"{looker.base_url}/standin/datagroups/toastmates/nightly_etl/trigger", timeout=10)
    assert answer.status_code == 200 and answer.json()["triggered_at"] > after
    missing = requests.post(f"{looker.base_url}/standin/datagroups/toastmates/nope/trigger", timeout=10)
    assert missing.status_code == 404


def test_a_scheduled_datagroup_advances_on_its_own(looker):
    looker.datagroups.every("toastmates", "hourly_sessions", 0.2)
    first = looker.datagroups.triggered_at("toastmates", "hourly_sessions")
    deadline = time.monotonic() + 10
    while looker.datagroups.triggered_at("toastmates", "hourly_sessions") == first:
        assert time.monotonic() < deadline, "the schedule never advanced triggered_at"
        time.sleep(0.1)


def test_datagroups_faults_have_lookers_shape(looker):
    looker.fail_next_requests(1, method="GET", path="/api/4.0/datagroups", status=429, retry_after=2)
    answer = _get(looker, "datagroups", _token(looker))
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "2"
    assert answer.json()["message"] == "Too Many Requests"
