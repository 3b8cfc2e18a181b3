"""LookerQueryTaskTrigger run directly (``asyncio.run``) against the Looker API stand-in, with real httpx."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from datetime import timedelta

import pytest
from airflow.triggers.base import BaseTrigger, TriggerEvent
from looker_helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    connection_json,
    make_self_signed_cert,
    only_event,
    set_connection,
    trigger_events,
)
from standins.looker_fixtures import SQL_ERROR_LOOK_ID, TOASTMATES_LOOK_ID
from standins.looker_standin import LookerStandIn

from airflow_provider_looker_segment.exceptions import QueryTaskError
from airflow_provider_looker_segment.hooks import looker as looker_hook
from airflow_provider_looker_segment.hooks.looker import LookerHook
from airflow_provider_looker_segment.triggers.looker import LookerQueryTaskTrigger

CONN_ID = "looker_trigger_test"
WRONG_SECRET = "Wr0ng-S3cret-trigger-9d2e"
CLASSPATH = "airflow_provider_looker_segment.triggers.looker.LookerQueryTaskTrigger"


@pytest.fixture
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def conn(looker, monkeypatch):
    """The connection ``CONN_ID`` (an ``AIRFLOW_CONN_...`` variable) pointing at the stand-in."""
    set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url))
    return CONN_ID


@pytest.fixture
def start(conn):
    """Start a query task of a Look with the hook (as the deferrable operator does); return its id."""
    hook = LookerHook(CONN_ID, retries=0)
    yield lambda look_id=TOASTMATES_LOOK_ID, **kwargs: hook.start_query_task(look_id, **kwargs)
    hook.close()


def trigger(task_id: str, **kwargs) -> LookerQueryTaskTrigger:
    kwargs.setdefault("poll_interval", 0.01)
    kwargs.setdefault("retry_backoff", 0)
    return LookerQueryTaskTrigger(kwargs.pop("conn_id", CONN_ID), task_id, **kwargs)


def without_calls(payload: dict) -> dict:
    """An event's payload without its count of Looker API calls (checked where it is the point)."""
    return {key: value for key, value in payload.items() if key != "looker_api_calls"}


def logged(caplog, capfd) -> str:
    output = capfd.readouterr()
    return caplog.text + output.out + output.err


# --- the wait ---------------------------------------------------------------------------------------------


def test_success_after_added_running_complete(looker, start, caplog, capfd):
    caplog.set_level(logging.INFO)
    task_id = start()
    logins = looker.counters["logins"]
    event = only_event(trigger(task_id))
    assert type(event) is TriggerEvent
    assert event.payload == {
        "status": "success",
        "query_task_id": task_id,
        "looker_status": "complete",
        # A login and a logout, and three status polls: query-based calls (Looker's activity type db_query).
        "looker_api_calls": {"query_based": 3, "administrative": 0, "login_logout": 2, "total": 5},
    }
    assert looker.query_tasks.get(task_id).history == ["added", "running", "complete"]
    polls = [r for r in looker.requests if r.path == f"/api/4.0/query_tasks/{task_id}"]
    assert [(r.method, r.query, r.auth_scheme, r.status) for r in polls] == [
        ("GET", {"fields": "id,status"}, "bearer", 200)
    ] * 3
    assert looker.counters["logins"] == logins + 1
    assert looker.counters["logouts"] == 1  # the trigger's own session (the hook's is still open)
    assert (looker.requests[-1].method, looker.requests[-1].path) == ("DELETE", "/api/4.0/logout")
    text = logged(caplog, capfd)
    for status in ("added", "running", "complete"):
        assert f"Looker query task {task_id}: {status}" in text


@pytest.mark.parametrize(
    ("outcome", "ending"),
    [
        (
            "error",
            "the query failed in the database: Query failed: the stand-in was told to fail this query task",
        ),
        ("killed", "its query was killed in Looker (by an admin, or through the API)"),
        ("expired", "Looker dropped it before it completed (its results expired); start the query again"),
    ],
)
def test_a_task_that_ends_error_killed_or_expired(looker, start, outcome, ending):
    looker.end_next_query_tasks(outcome)
    task_id = start()
    event = only_event(trigger(task_id))
    assert without_calls(event.payload) == {
        "status": "error",
        "query_task_id": task_id,
        "looker_status": outcome,
        "message": f"Looker query task {task_id} ended with status {outcome}: {ending}",
    }
    assert looker.counters["logouts"] == 1


def test_a_failed_query_names_the_database_error(looker, start):
    task_id = start(SQL_ERROR_LOOK_ID)
    payload = only_event(trigger(task_id)).payload
    assert payload["looker_status"] == "error"
    assert payload["message"] == (
        f"Looker query task {task_id} ended with status error: the query failed in the database: An error "
        "occurred while running the query: ERROR: column users.last_login does not exist\n  Position: 87"
    )


@pytest.mark.parametrize("timeout", [0.2, timedelta(seconds=0.2)])
def test_the_triggers_own_timeout(looker, start, timeout):
    looker.end_next_query_tasks("never")
    task_id = start()
    payload = only_event(trigger(task_id, timeout=timeout)).payload
    assert without_calls(payload) == {
        "status": "error",
        "query_task_id": task_id,
        "looker_status": "running",
        "message": f"Looker query task {task_id} did not complete within 0.2 seconds (timeout; its last "
        "status was running); Looker may still be running it",
    }
    assert looker.query_tasks.get(task_id).status == "running"  # not killed: the operator decides
    assert looker.counters["logouts"] == 1


def test_no_wait_goes_past_the_timeout(looker, start, caplog, capfd):
    """A poll answered 429 Retry-After 10 with 0.5 s left: the timeout at 0.5 s, no 10 s wait, no retry."""
    caplog.set_level(logging.INFO)
    looker.end_next_query_tasks("never")
    task_id = start()
    looker.fail_next_task_polls(5, status=429, retry_after=10)
    payload = only_event(trigger(task_id, timeout=0.5, retries=3)).payload
    assert without_calls(payload) == {
        "status": "error",
        "query_task_id": task_id,
        "looker_status": None,  # never seen: the operator asks Looker to kill the query
        "message": f"Looker query task {task_id} did not complete within 0.5 seconds (timeout; Looker did "
        "not answer in time); Looker may still be running it",
    }
    polls = [r.status for r in looker.requests if r.path == f"/api/4.0/query_tasks/{task_id}"]
    assert polls == [429]  # not asked again after the deadline
    text = logged(caplog, capfd)
    told = f"Reading Looker query task {task_id}: Looker answered HTTP 429; a retry in 10 s would come "
    assert told in text


def test_a_login_retried_after_a_503_with_retry_after(looker, start):
    task_id = start()
    looker.fail_next_requests(2, path="/api/4.0/login", status=503, retry_after=0)
    assert only_event(trigger(task_id, retries=3)).payload["status"] == "success"
    logins = [r.status for r in looker.requests if r.path == "/api/4.0/login"]
    assert logins[-3:] == [503, 503, 200]


def test_the_wait_does_not_block_the_event_loop(looker, start):
    """Other coroutines run while the trigger waits: they see the task between the trigger's polls."""
    looker.polls_per_step = 2
    task_id = start()
    seen: set[int] = set()

    async def both() -> list:
        task = asyncio.ensure_future(trigger_events(trigger(task_id, poll_interval=0.05)))
        while not task.done():
            seen.add(len(looker.query_tasks.get(task_id).history))
            await asyncio.sleep(0.005)
        return task.result()

    (event,) = asyncio.run(both())
    assert event.payload["status"] == "success"
    assert {1, 2, 3, 4} <= seen  # every intermediate poll count was observed from the same event loop


# --- retries and failures -----------------------------------------------------------------------------------


def test_transient_errors_are_retried_with_backoff(looker, start, caplog, capfd):
    caplog.set_level(logging.INFO)
    task_id = start()
    looker.fail_next_task_polls(2, status=503)
    looker.fail_next_task_polls(1, status=None)  # the connection closed without an answer
    event = only_event(trigger(task_id, retries=3))
    assert event.payload["status"] == "success"
    text = logged(caplog, capfd)
    action = f"Reading Looker query task {task_id}"
    assert f"{action}: Looker answered HTTP 503; retry 1 of 3 in 0 s" in text
    assert f"{action}: Looker answered HTTP 503; retry 2 of 3 in 0 s" in text
    assert f"{action}: cannot reach {looker.base_url}: " in text and "retry 3 of 3" in text


def test_giving_up_after_the_retries(looker, start):
    task_id = start()
    looker.fail_next_task_polls(5, status=503)
    payload = only_event(trigger(task_id, retries=2)).payload
    assert without_calls(payload) == {
        "status": "error",
        "query_task_id": task_id,
        "looker_status": None,
        "message": f"Reading Looker query task {task_id}: Looker answered HTTP 503 (gave up after 2 retries)",
    }
    assert looker.counters["logouts"] == 1


def test_an_unreachable_looker(looker, conn):
    url = looker.base_url
    looker.stop()
    payload = only_event(trigger("abc", retries=1)).payload
    assert payload["message"] == (
        f"Logging in to Looker: cannot reach {url}: [Errno 111] Connection refused (gave up after 1 retry)"
    )


def test_wrong_credentials_are_named_never_shown(looker, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url, password=WRONG_SECRET))
    payload = only_event(trigger("abc")).payload
    assert payload["message"] == (
        f"Looker rejected the API credentials of connection '{CONN_ID}' (client ID {CLIENT_ID}) at "
        f"{looker.base_url}: HTTP 404 Not found. Check the client ID and secret."
    )
    assert looker.counters["failed_logins"] == 1  # a refusal is not retried
    assert WRONG_SECRET not in logged(caplog, capfd) + json.dumps(payload)


def test_an_unknown_task(looker, conn):
    payload = only_event(trigger("0123abc")).payload
    assert (
        payload["message"]
        == "Looker has no query task 0123abc (HTTP 404): it is unknown, or its results expired"
    )


def test_a_missing_connection():
    payload = only_event(trigger("abc", conn_id="no_such_looker_connection")).payload
    assert payload["message"].startswith(
        "The Looker connection 'no_such_looker_connection' cannot be used: AirflowNotFoundException:"
    )


def test_the_token_expiring_during_the_wait(looker, start):
    looker.polls_per_step = 50  # the task ends after 100 polls: plenty of time for the token to go
    task_id = start()
    unauthorized = looker.counters.get("unauthorized", 0)

    async def revoke_once_polled() -> list:
        task = asyncio.ensure_future(trigger_events(trigger(task_id, poll_interval=0.001)))
        while not looker.query_tasks.get(task_id).history:
            await asyncio.sleep(0.001)
        looker.revoke_tokens()
        return await task

    (event,) = asyncio.run(revoke_once_polled())
    assert event.payload["status"] == "success"
    assert looker.counters["unauthorized"] == unauthorized + 1
    assert looker.counters["logins"] == 3  # the hook's, the trigger's, the trigger's second


def test_no_secret_or_token_in_events_or_logs(looker, start, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    payloads = []
    for outcome in ("complete", "error", "killed"):
        looker.end_next_query_tasks(outcome)
        payloads.append(only_event(trigger(start())).payload)
    looker.fail_next_task_polls(3, status=503)
    payloads.append(only_event(trigger(start(), retries=2)).payload)
    text = logged(caplog, capfd) + json.dumps(payloads)
    assert len(looker.issued_tokens) >= 2
    for secret in (CLIENT_SECRET, *looker.issued_tokens):
        assert secret not in text


# --- the connection: read with aget_connection, the hook's extras -------------------------------------------


def test_the_connections_timeout_extra_applies(looker, start, monkeypatch):
    task_id = start()
    set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url, timeout=0.3))
    looker.set_delay(2.0, path_prefix="/api/4.0/query_tasks/")
    payload = only_event(trigger(task_id, retries=0)).payload
    assert payload["message"] == (
        f"Reading Looker query task {task_id}: {looker.base_url} did not answer within 0.3 seconds (timeout) "
        "(gave up after 0 retries)"
    )
    looker.clear_faults()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_the_connections_verify_ssl_extra_applies(tmp_path, monkeypatch):
    cert, key = make_self_signed_cert(tmp_path)
    with LookerStandIn(tls_certfile=cert, tls_keyfile=key) as looker:
        set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url, verify_ssl="false"))
        with LookerHook(CONN_ID, retries=0) as hook:
            task_id = hook.start_query_task(TOASTMATES_LOOK_ID)
        assert only_event(trigger(task_id)).payload["status"] == "success"
        set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url))
        message = only_event(trigger(task_id, retries=0)).payload["message"]
        assert message.startswith(f"Logging in to Looker: TLS failure talking to {looker.base_url}: ")
        assert "CERTIFICATE_VERIFY_FAILED" in message


# --- serialisation, arguments, ending from the trigger, killing --------------------------------------------


def test_serialize_round_trips():
    original = LookerQueryTaskTrigger(
        CONN_ID,
        "abc123",
        poll_interval=2,
        timeout=timedelta(minutes=5),
        retries=5,
        resume_with={"looker_api_calls": {"query_based": 1}},
    )
    classpath, kwargs = original.serialize()
    assert classpath == CLASSPATH
    assert isinstance(original, BaseTrigger)
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {
        "looker_conn_id": CONN_ID,
        "query_task_id": "abc123",
        "poll_interval": 2.0,
        "timeout": 300.0,
        "deadline": original.deadline,
        "retries": 5,
        "retry_backoff": 2.0,
        "resume_with": {"looker_api_calls": {"query_based": 1}},  # handed back in the event's payload
    }
    assert rebuilt.deadline == original.deadline  # a rebuilt trigger does not restart its timeout
    assert LookerQueryTaskTrigger(CONN_ID, "abc").serialize()[1]["deadline"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_task_id": " "}, "query_task_id is required"),
        ({"poll_interval": 0}, "poll_interval must be above 0 seconds"),
        ({"timeout": 0}, "timeout must be above 0 seconds or None"),
        ({"retries": -1}, "retries and retry_backoff must not be negative"),
    ],
)
def test_unusable_arguments(kwargs, message):
    arguments = {"looker_conn_id": CONN_ID, "query_task_id": "abc", **kwargs}
    with pytest.raises(ValueError, match=message):
        LookerQueryTaskTrigger(**arguments)


def test_on_kill_asks_looker_to_kill_the_query(looker, start):
    looker.end_next_query_tasks("never")
    task_id = start()
    asyncio.run(trigger(task_id).on_kill())
    assert looker.query_tasks.get(task_id).status == "killed"
    assert looker.counters["queries_killed"] == 1
    assert looker.counters["logouts"] == 1


# --- the deferrable flow: start, wait, read (202 or 204 while running) -------------------------------------


@pytest.mark.parametrize("pending", [202, 204])
def test_results_are_read_once_the_trigger_fired_whatever_looker_answers_before(pending, monkeypatch):
    with LookerStandIn(pending_results_status=pending) as looker:
        set_connection(monkeypatch, CONN_ID, connection_json(looker.base_url))
        with LookerHook(CONN_ID, retries=0) as hook:
            task_id = hook.start_query_task(TOASTMATES_LOOK_ID, limit=3)
            monkeypatch.setattr(looker_hook, "RESULTS_WAIT", 0)  # ask once
            with pytest.raises(QueryTaskError) as caught:  # before: "not finished", not an empty result
                with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID, 3):
                    pytest.fail("no stream expected")
            assert (caught.value.status, caught.value.task_status) == (pending, "running")
            assert only_event(trigger(task_id)).payload["status"] == "success"
            with hook.stream_query_task(task_id, TOASTMATES_LOOK_ID, 3) as stream:
                rows = list(stream.rows)
        assert len(rows) == 3 and stream.possibly_truncated
        results = [r for r in looker.requests if r.path.endswith("/results")]
        assert [r.status for r in results] == [pending, 200]
