"""
Templated filters, deferrable mode and the extra link, through real Airflow (``dag.test()``, which runs the
trigger in line) against the Looker and Segment stand-ins.
"""

from __future__ import annotations

import importlib.util
from datetime import date, timedelta
from typing import Any

import pytest
from standins.connections import standin_connections
from standins.demo import read_return_value
from standins.looker_fixtures import (
    ACCOUNT_USERS_LOOK_ID,
    NEW_SIGNUPS_LOOK_ID,
    SQL_ERROR_LOOK_ID,
    TOASTMATES_LOOK_ID,
)
from test_operator import DAG_FILE, looker, run, segment  # noqa: F401  (fixtures)


@pytest.fixture
def deferred(airflow_db, monkeypatch, looker, segment):
    """Run the deferrable test DAG once with the given conf; return (dag run, task instance, summary)."""
    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)

    def _run(**conf: Any) -> tuple[Any, Any, dict[str, Any] | None]:
        spec = importlib.util.spec_from_file_location("lsg_operator_test", DAG_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dag_run = module.deferrable_dag.test(run_conf={"look_id": TOASTMATES_LOOK_ID, **conf})
        return dag_run, dag_run.get_task_instance("sync"), read_return_value(dag_run, "sync")

    return _run


def _a_day_with_signups(looker) -> str:
    """A day of the sign-ups Look (dated relative to the day the stand-in started)."""
    return looker.look(NEW_SIGNUPS_LOOK_ID).rows[0]["users.created_date"]


def _task_paths(looker, method: str, prefix: str) -> list[str]:
    return [r.path for r in looker.requests if r.method == method and r.path.startswith(prefix)]


# ----------------------------------------------------------------------------------------------- filters


def test_filters_replace_the_looks_own(run, looker, segment, capfd):
    day = _a_day_with_signups(looker)
    dag_run, _ti, summary = run(look_id=NEW_SIGNUPS_LOOK_ID, filters={"users.created_date": day})
    assert dag_run.state == "success"
    signups = looker.look(NEW_SIGNUPS_LOOK_ID)
    expected = sorted(row["users.id"] for row in signups.rows if row["users.created_date"] == day)
    assert sorted(e["userId"] for e in segment.events()) == expected and len(expected) == 2
    assert summary["filters"] == {"users.created_date": day} and summary["rows"] == 2
    created = looker.queries.received[-1]
    assert created["filters"] == {"users.created_date": day}  # the Look's "7 days" replaced
    assert (created["model"], created["view"]) == (signups.model, signups.view)
    text = "".join(capfd.readouterr())
    assert f"users.created_date = '{day}'" in text and "replaces the Look's '7 days'" in text


def test_a_data_interval_range_filter(run, looker, segment):
    first = date.fromisoformat(_a_day_with_signups(looker))
    interval = f"{first.isoformat()} to {(first + timedelta(days=2)).isoformat()}"  # two days, end excluded
    dag_run, _ti, summary = run(look_id=NEW_SIGNUPS_LOOK_ID, filters={"users.created_date": interval})
    assert dag_run.state == "success" and summary["sent"] == 4


def test_a_filter_on_a_field_outside_the_explore_fails_naming_it(run, segment, capfd):
    dag_run, _ti, _summary = run(look_id=NEW_SIGNUPS_LOOK_ID, filters={"orders.status": "complete"})
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    text = "".join(capfd.readouterr())
    assert "LookFilterError" in text and "orders.status" in text


def test_an_empty_filter_expression_is_refused(run, looker, segment, capfd):
    dag_run, _ti, _summary = run(filters={"users.created_date": " "})
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert "filters['users.created_date']" in "".join(capfd.readouterr())


@pytest.mark.parametrize(
    ("expression", "users"),
    [
        ("NULL", [None]),  # Looker's "is null": the account owner without a user id (an email-derived id)
        ("-NULL", ["00MWWFOLRcETcTCf", "01HQZ3V8K2M5N7PB"]),
        ("null", [None]),  # typed by a user: Looker's to judge (it reads any case of NULL as "is null")
        ("None", []),  # the text None: no user has that id
    ],
)
def test_lookers_filter_expressions_go_to_looker_as_given(run, looker, segment, expression, users):
    dag_run, _ti, summary = run(look_id=ACCOUNT_USERS_LOOK_ID, filters={"users.id": expression})
    assert dag_run.state == "success"
    assert looker.queries.received[-1]["filters"]["users.id"] == expression
    assert [event.get("userId") for event in segment.events()] == users
    assert summary["filters"] == {"users.id": expression}


def test_filter_names_differing_only_by_blanks_are_refused_naming_both(run, looker, segment, capfd):
    created_before = len(looker.queries.received)
    dag_run, _ti, _summary = run(filters={"users.plan": "pro", "users.plan ": "free"})
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert len(looker.queries.received) == created_before
    text = "".join(capfd.readouterr())
    refusal = "filters name the field users.plan twice: 'users.plan' and 'users.plan ' differ only by blanks"
    assert refusal in text


def test_an_event_name_too_long_for_any_call_is_refused_before_looker_is_read(run, looker, segment, capfd):
    runs_before = looker.counters.get("runs", 0)
    dag_run, _ti, _summary = run(call="track", event="Joined " + "x" * 40_000)
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert looker.counters.get("runs", 0) == runs_before
    text = "".join(capfd.readouterr())
    assert "event is 40,007 characters (40,009 bytes encoded): a track call carrying it cannot fit" in text
    assert "x" * 200 not in text


def test_without_filters_the_saved_look_runs(run, looker, segment):
    created_before = len(looker.queries.received)
    _dag_run, _ti, summary = run()
    assert summary["filters"] == {} and len(looker.queries.received) == created_before


# ---------------------------------------------------------------------------------------------- deferrable


def test_deferrable_run_waits_for_the_query_task_then_syncs(deferred, looker, segment):
    dag_run, ti, summary = deferred()
    assert dag_run.state == "success", ti.state
    assert summary["sent"] == 10 and segment.events()[0]["userId"] == "00MWWFOLRcETcTCf"
    assert _task_paths(looker, "POST", "/api/4.0/query_tasks")
    polls = _task_paths(looker, "GET", "/api/4.0/query_tasks/")
    assert any(path.endswith("/results") for path in polls)
    assert len([p for p in polls if not p.endswith("/results")]) >= 2  # added -> running -> complete


def test_results_not_ready_right_after_complete_are_asked_for_again(deferred, looker, segment):
    looker.delay_results_after_complete(2)  # 202 twice after the task reported complete
    dag_run, ti, summary = deferred()
    assert dag_run.state == "success", ti.state
    assert summary["sent"] == 10
    results = [r.status for r in looker.requests if r.path.endswith("/results")]
    assert results[-3:] == [202, 202, 200]


def test_deferrable_run_with_filters(deferred, looker, segment):
    day = _a_day_with_signups(looker)
    dag_run, _ti, summary = deferred(look_id=NEW_SIGNUPS_LOOK_ID, filters={"users.created_date": day})
    assert dag_run.state == "success" and summary["sent"] == 2
    assert summary["filters"] == {"users.created_date": day}


def test_a_failed_query_fails_the_deferred_task_with_the_database_error(deferred, segment, capfd):
    dag_run, _ti, _summary = deferred(look_id=SQL_ERROR_LOOK_ID)
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    text = "".join(capfd.readouterr())
    assert "ended with status error" in text and "column users.last_login does not exist" in text


@pytest.mark.parametrize("outcome", ["killed", "expired"])
def test_a_killed_or_expired_query_task_fails_the_task(deferred, looker, segment, capfd, outcome):
    looker.end_next_query_tasks(outcome, count=3)  # every try: a retry starts a new query task
    dag_run, ti, _summary = deferred()
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert ti.try_number == 3  # retried: the next query task may complete
    assert f"ended with status {outcome}" in "".join(capfd.readouterr())


def test_a_query_that_outlives_the_timeout_is_killed(airflow_db, monkeypatch, looker, segment, capfd):
    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("lsg_operator_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.timeout_dag
    looker.end_next_query_tasks("never", count=3)
    kills_before = len(_task_paths(looker, "DELETE", "/api/4.0/running_queries/"))
    dag_run = dag.test(run_conf={"look_id": TOASTMATES_LOOK_ID})
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert len(_task_paths(looker, "DELETE", "/api/4.0/running_queries/")) - kills_before == 3  # each try
    text = "".join(capfd.readouterr())
    assert "did not complete within 0.5 seconds" in text and "Asked Looker to kill query task" in text
    assert looker.client_secret not in text


def test_a_status_poll_told_to_wait_past_the_timeout_fails_at_the_timeout(
    airflow_db, monkeypatch, looker, segment, capfd
):
    """query_timeout 0.5 s, polls answered 429 Retry-After 10: no 10 s wait, the timeout, the query killed."""
    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("lsg_operator_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    looker.end_next_query_tasks("never", count=3)
    looker.fail_next_task_polls(3, status=429, retry_after=10)  # the first poll of each try
    kills_before = len(_task_paths(looker, "DELETE", "/api/4.0/running_queries/"))
    dag_run = module.timeout_dag.test(run_conf={"look_id": TOASTMATES_LOOK_ID})
    assert dag_run.state == "failed" and segment.stats()["requests"] == 0
    assert dag_run.get_task_instance("sync").try_number == 3  # a timeout is retried (a new query task)
    assert len(_task_paths(looker, "DELETE", "/api/4.0/running_queries/")) - kills_before == 3  # each try
    text = "".join(capfd.readouterr())
    assert "a retry in 10 s would come after the timeout" in text
    assert "did not complete within 0.5 seconds (timeout; Looker did not answer in time)" in text
    assert "gave up after" not in text and "Asked Looker to kill query task" in text


# ---------------------------------------------------------------------------------------------- the link


def _stored_link(dag_run: Any) -> str:
    """The task's extra link, as Airflow stored it (XCom ``_link_LookerLookLink``) for the UI."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        link = session.scalars(
            select(XComModel.value).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.key == "_link_LookerLookLink",
            )
        ).first()
    return XComModel.deserialize_value(type("X", (), {"value": link})())


def test_the_task_links_to_the_look(run, looker):
    dag_run, _ti, _summary = run(look_id=NEW_SIGNUPS_LOOK_ID)
    assert _stored_link(dag_run) == f"{looker.base_url}/looks/17"


@pytest.mark.parametrize("mode", ["run", "deferred"])
def test_the_link_of_a_filtered_run_carries_its_filters(run, deferred, looker, mode):
    """The link opens the Look with the filters that ran, as Looker's URL filters ``f[<field>]=``."""
    from urllib.parse import parse_qsl, urlsplit

    day = looker.look(NEW_SIGNUPS_LOOK_ID).rows[0]["users.created_date"]
    filters = {"users.created_date": f"{day} to {day}", "users.plan": "pro,enterprise"}
    dag_run, _ti, summary = (run if mode == "run" else deferred)(look_id=NEW_SIGNUPS_LOOK_ID, filters=filters)
    assert dag_run.state == "success" and summary["filters"] == filters
    link = urlsplit(_stored_link(dag_run))
    assert f"{link.scheme}://{link.netloc}{link.path}" == f"{looker.base_url}/looks/17"
    assert parse_qsl(link.query) == [(f"f[{name}]", value) for name, value in filters.items()]
    assert "[" not in link.query and " " not in link.query  # encoded, as Looker writes them
    ran = looker.queries.received[-1]["filters"]
    assert {name: ran[name] for name in filters} == filters  # the link shows what Looker ran


# ------------------------------------------------------------------------------------------------ pacing


def test_operator_pacing_reaches_the_segment_hook(monkeypatch, looker, segment):
    from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)
    operator = LookerToSegmentOperator(
        task_id="paced", look_id="1", events_per_second=1000, max_in_flight=8, requests_per_second=50
    )
    settings = operator._segment_hook().config
    assert (settings.events_per_second, settings.max_in_flight, settings.requests_per_second) == (1000, 8, 50)
    unpaced = LookerToSegmentOperator(task_id="unpaced", look_id="1")._segment_hook().config
    assert unpaced.events_per_second is None and unpaced.max_in_flight == 32
