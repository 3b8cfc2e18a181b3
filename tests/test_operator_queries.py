"""
Any Looker query as the source of LookerToSegmentOperator (``query_id``, ``query_slug``), through real
Airflow (``dag.test()``) against the Looker and Segment stand-ins: as saved and with filters, deferred,
changed-only (a state of its own), dry runs, entry events, the summary, the "Looker Explore" link, and the
Looker API calls each sync counts.
"""

from __future__ import annotations

from typing import Any

import pytest
from standins.looker_fixtures import NEW_SIGNUPS_LOOK_ID, TOASTMATES_LOOK_ID, fixture_looks, look_query_id
from standins.looker_sql import query_slug
from test_operator import COHORT_LOOK_ID, _cohort, looker, run, segment  # noqa: F401  (fixtures)
from test_operator_native import deferred  # noqa: F401  (fixture)

TOASTMATES = fixture_looks()[TOASTMATES_LOOK_ID]
QUERY_ID = look_query_id(TOASTMATES_LOOK_ID)
SLUG = query_slug(QUERY_ID)


@pytest.fixture(autouse=True)
def _fresh_records(looker):
    """The Looker stand-in serves the whole module: each test reads its own requests."""
    looker.clear_records()


def _stored_link(dag_run: Any, name: str) -> str:
    """A task's extra link as Airflow stored it for the UI (XCom ``_link_<class>``)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        link = session.scalars(
            select(XComModel.value).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.key == f"_link_{name}",
            )
        ).first()
    return XComModel.deserialize_value(type("X", (), {"value": link})())


def _paths(looker, prefix: str) -> list[str]:
    return [r.path for r in looker.requests if r.path.startswith(prefix)]


def test_a_query_by_id_is_synced_as_its_look(run, looker, segment):
    dag_run, _ti, summary = run(look_id=None, query_id=QUERY_ID)
    assert dag_run.state == "success"
    assert [e["userId"] for e in segment.events()] == [row["users.id"] for row in TOASTMATES.rows]
    assert segment.events()[0]["traits"] == {
        "name": "Ty Arthur",
        "email": "ty.arthur@segment.com",
        "sessions count": 2,
    }
    assert (summary["source"], summary["look_id"], summary["query_id"]) == ("query", None, QUERY_ID)
    assert summary["query_slug"] == SLUG and (summary["rows"], summary["sent"]) == (10, 10)
    # login, GET /queries/{id} and its run (query-based), logout; no Look read.
    assert summary["looker_api_calls"] == {
        "query_based": 2,
        "administrative": 0,
        "login_logout": 2,
        "total": 4,
    }
    assert not _paths(looker, "/api/4.0/looks/")
    assert (
        _stored_link(dag_run, "LookerExploreLink") == f"{looker.base_url}/explore/toastmates/users?qid={SLUG}"
    )
    assert _stored_link(dag_run, "LookerLookLink") == ""


def test_a_query_by_slug_resolves_it_first(run, looker, segment, capfd):
    dag_run, _ti, summary = run(look_id=None, query_slug=SLUG)
    assert dag_run.state == "success" and summary["sent"] == 10
    assert (summary["query_id"], summary["query_slug"]) == (QUERY_ID, SLUG)
    assert f"/api/4.0/queries/slug/{SLUG}" in _paths(looker, "/api/4.0/queries/")
    text = "".join(capfd.readouterr())
    assert f"Query {QUERY_ID}: 10 rows read, 10 sent" in text


def test_a_look_sync_counts_its_api_calls_too(run):
    _dag_run, _ti, summary = run()
    assert (summary["source"], summary["look_id"], summary["query_id"]) == ("look", TOASTMATES_LOOK_ID, None)
    assert summary["looker_api_calls"] == {
        "query_based": 1,
        "administrative": 1,
        "login_logout": 2,
        "total": 4,
    }


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"query_id": QUERY_ID}, f"got look_id='1' and query_id='{QUERY_ID}'"),
        ({"look_id": None, "query_id": QUERY_ID, "query_slug": SLUG}, "got query_id="),
        ({"look_id": None}, "none was given"),
    ],
)
def test_not_exactly_one_source_fails_at_once_before_looker_is_read(run, looker, segment, capfd, conf, named):
    requests_before = len(looker.requests)
    dag_run, ti, _summary = run(**conf)
    assert dag_run.state == "failed" and ti.try_number == 1  # no retry: InvalidParameterError
    text = "".join(capfd.readouterr())
    assert "Give exactly one of look_id (a saved Look" in text and named in text
    assert len(looker.requests) == requests_before and segment.stats()["requests"] == 0


def test_an_unknown_query_fails_at_once(run, segment, capfd):
    dag_run, ti, _summary = run(look_id=None, query_id="999999")
    assert dag_run.state == "failed" and ti.try_number == 1
    text = "".join(capfd.readouterr())
    assert "QueryNotFoundError" in text and "Looker query 999999 not found" in text
    assert segment.stats()["requests"] == 0


def test_filters_run_a_copy_of_the_query_and_the_link_opens_it(run, looker, segment):
    query_id = look_query_id(NEW_SIGNUPS_LOOK_ID)
    dag_run, _ti, summary = run(look_id=None, query_id=query_id, filters={"users.plan": "pro"})
    assert dag_run.state == "success"
    signups = looker.look(NEW_SIGNUPS_LOOK_ID).rows
    expected = sorted(row["users.id"] for row in signups if row["users.plan"] == "pro")
    assert sorted(e["userId"] for e in segment.events()) == expected and expected
    created = looker.queries.received[-1]
    assert created["filters"] == {"users.created_date": "7 days", "users.plan": "pro"}
    copy_id = looker.run_requests()[-1].path.split("/")[4]
    assert copy_id != query_id and summary["query_id"] == query_id  # the summary names the query given
    link = _stored_link(dag_run, "LookerExploreLink")
    assert link == f"{looker.base_url}/explore/toastmates/users?qid={query_slug(copy_id)}"


def test_a_deferred_query_runs_as_a_query_task(deferred, looker, segment):
    dag_run, _ti, summary = deferred(look_id=None, query_slug=SLUG)
    assert dag_run.state == "success" and summary["sent"] == 10
    task = looker.query_tasks.all()[-1]
    assert (task.query_id, task.look_id, task.params["generate_drill_links"]) == (QUERY_ID, None, "false")
    assert not _paths(looker, "/api/4.0/looks/")
    polls = len(task.history) - 1  # the status polls (the last look at it is the results request)
    calls = summary["looker_api_calls"]
    # execute: login, GET slug, POST /query_tasks, logout; the trigger: login, polls, logout; the results:
    # login, GET results, logout.
    assert calls == {
        "query_based": 3 + polls,
        "administrative": 0,
        "login_logout": 6,
        "total": 9 + polls,
    }
    assert _stored_link(dag_run, "LookerExploreLink").endswith(f"?qid={SLUG}")


def test_a_query_keeps_a_changed_only_state_of_its_own(run, looker, segment, tmp_path):
    _cohort(looker, [(f"u{n}", "free") for n in range(4)])
    conf = {"sync_mode": "changed", "state_path": str(tmp_path), "membership_trait": "in_cohort"}
    _dag_run, _ti, look_run = run(look_id=COHORT_LOOK_ID, **conf)
    query = look_query_id(COHORT_LOOK_ID)
    _dag_run, _ti, first = run(look_id=None, query_id=query, entered_event="Entered", **conf)
    assert (look_run["new"], first["new"], first["sent"]) == (4, 4, 8)  # not the Look's state: all new
    assert first["events_by_type"] == {"identify": 4, "track": 4}
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".state"))
    assert (
        len(names) == 2
        and names[0].startswith(f"look-{COHORT_LOOK_ID}-")
        and names[1].startswith(f"query-{query}-127.0.0.1")
    )
    segment.reset()
    _cohort(looker, [("u0", "free"), ("u1", "pro"), ("u2", "free"), ("u3", "free"), ("u9", "free")])
    _dag_run, _ti, second = run(look_id=None, query_id=query, entered_event="Entered", **conf)
    assert (second["new"], second["changed"], second["unchanged"]) == (1, 1, 3)
    assert sorted(e.get("event") or e["userId"] for e in segment.events()) == ["Entered", "u1", "u9"]


def test_a_dry_run_of_a_query_sends_nothing(run, segment):
    dag_run, _ti, summary = run(look_id=None, query_id=QUERY_ID, dry_run=True)
    assert dag_run.state == "success"
    assert (summary["would_send"], summary["sent"], segment.stats()["requests"]) == (10, 0, 0)


# --- the API budget table of docs/sources.md, as the syncs count it -----------------------------------------


@pytest.mark.parametrize(
    ("source", "counts"),
    [
        ({}, (1, 1, 2)),  # a Look as saved
        ({"look_id": NEW_SIGNUPS_LOOK_ID, "filters": {"users.plan": "pro"}}, (2, 1, 2)),  # with filters
        ({"look_id": None, "query_id": QUERY_ID}, (2, 0, 2)),  # a query
        (
            {
                "look_id": None,
                "query_id": look_query_id(NEW_SIGNUPS_LOOK_ID),
                "filters": {"users.plan": "pro"},
            },
            (3, 0, 2),
        ),  # a query with filters
    ],
)
def test_the_budget_table_of_a_run(run, source, counts):
    _dag_run, _ti, summary = run(**source)
    calls = summary["looker_api_calls"]
    assert (calls["query_based"], calls["administrative"], calls["login_logout"]) == counts
    assert calls["total"] == sum(counts)


def test_the_budget_table_of_a_deferred_look(deferred, looker):
    _dag_run, _ti, summary = deferred()
    polls = len(looker.query_tasks.all()[-1].history) - 1
    # POST /query_tasks, the polls, the results; the Look read before deferring and after; three sessions.
    assert summary["looker_api_calls"] == {
        "query_based": 2 + polls,
        "administrative": 2,
        "login_logout": 6,
        "total": 10 + polls,
    }
