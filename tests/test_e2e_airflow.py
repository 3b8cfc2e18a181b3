"""
End to end through real Airflow services: the example DAG ``looker_cohort_to_segment``, triggered over the
REST API like the UI's "Trigger DAG" button, run by the scheduler (LocalExecutor) against the Looker and
Segment stand-ins.

One api-server, scheduler, dag-processor and triggerer (loopback only, a throw-away AIRFLOW_HOME with
SQLite) serve the whole module; they are stopped by PID when the module ends, also when a test fails.
Nothing leaves the machine: the stand-ins listen on 127.0.0.1 in this process and the task reaches them
over HTTP.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from airflow_services import AirflowServices, quote
from standins.connections import standin_connections
from standins.looker_fixtures import DELETED_LOOK_ID, NEW_SIGNUPS_LOOK_ID, TOASTMATES_LOOK_ID, fixture_looks
from standins.looker_standin import LookerStandIn
from standins.segment_standin import DEFAULT_WRITE_KEY, SegmentStandIn

from airflow_provider_looker_segment import PACKAGE_NAME, __version__
from airflow_provider_looker_segment.get_provider_info import get_provider_info

pytestmark = pytest.mark.e2e

DAG_ID = "looker_cohort_to_segment"
SIGNUPS_DAG_ID = "looker_new_signups_to_segment"
MAPPED_DAG_ID = "looker_cohorts_to_segment_mapped"
TASK_ID = "sync_cohort"
DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"
TOASTMATES = fixture_looks()[TOASTMATES_LOOK_ID]
MISSING_LOOK_ID = "424242"
#: Segment's reference example of the Looker source (the seed): the first row of Look 1.
SEED_CALL = {
    "type": "identify",
    "userId": "00MWWFOLRcETcTCf",
    "traits": {"name": "Ty Arthur", "email": "ty.arthur@segment.com", "sessions count": 2},
}
#: Every key of an identify call the operator sends for Look 1.
EVENT_KEYS = {"type", "userId", "traits", "timestamp", "context", "messageId"}
RUN_TIMEOUT = 240
DATAGROUP_DAG_ID = "looker_datagroup_to_segment"
DATAGROUP_POLL_INTERVAL = 2


@dataclass
class Stack:
    """The running services and stand-ins, with the REST calls the tests make."""

    airflow: AirflowServices
    looker: LookerStandIn
    segment: SegmentStandIn

    def trigger(self, conf: dict[str, Any]) -> requests.Response:
        """``POST /api/v2/dags/{dag}/dagRuns``, as the UI's "Trigger DAG" form does."""
        return self.airflow.api(
            "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}
        )

    def trigger_ok(self, conf: dict[str, Any]) -> str:
        response = self.trigger(conf)
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def run_path(self, run_id: str) -> str:
        return f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id)}"

    def run_count(self) -> int:
        response = self.airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")
        assert response.status_code == 200, response.text
        return response.json()["total_entries"]

    def log(self, run_id: str, try_number: int = 1) -> str:
        return self.airflow.task_log(DAG_ID, run_id, TASK_ID, try_number)

    def wait_for_log(self, run_id: str, needle: str, try_number: int = 1, timeout: float = 30) -> str:
        """The task log once it contains ``needle`` (the log can trail the task's state by a moment)."""
        deadline = time.monotonic() + timeout
        text = self.log(run_id, try_number)
        while needle not in text and time.monotonic() < deadline:
            time.sleep(0.5)
            text = self.log(run_id, try_number)
        return text

    def raw_log(self, run_id: str, try_number: int = 1) -> str:
        """Every field of every log event, as JSON (to look for secrets anywhere in it)."""
        return json.dumps(self.airflow.task_log_events(DAG_ID, run_id, TASK_ID, try_number))


def _connections(looker: LookerStandIn, segment: SegmentStandIn) -> dict[str, str]:
    """
    ``looker_default`` and ``segment_default`` in JSON form for every Airflow process, and the datagroup
    DAG's poll interval (seconds: the test waits for polls, not for an hour).
    """
    return {
        **standin_connections(looker.base_url, segment.base_url),
        "LOOKER_SEGMENT_DATAGROUP_POLL_INTERVAL": str(DATAGROUP_POLL_INTERVAL),
    }


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("airflow-home")
    with ExitStack() as resources:
        looker = resources.enter_context(LookerStandIn())
        segment = resources.enter_context(SegmentStandIn(record="full"))
        airflow = AirflowServices(home, DAGS_FOLDER, _connections(looker, segment))
        resources.enter_context(airflow)  # stopped first (LIFO), also when a test or the set-up fails
        dag = airflow.wait_for_dag(DAG_ID)
        assert dag["is_paused"], "new DAGs start paused: the test unpauses it as a user would"
        for dag_id in (DAG_ID, SIGNUPS_DAG_ID):
            airflow.wait_for_dag(dag_id)
            response = airflow.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
            assert response.status_code == 200, response.text
            assert response.json()["is_paused"] is False
        yield Stack(airflow, looker, segment)
    # Every service and its children were stopped by PID; nothing of ours is left listening.
    assert airflow.leftovers() == {}, "processes left in the services' process groups (group -> PIDs)"
    assert not _listening(airflow.port), f"something still listens on the api-server's port {airflow.port}"


# ---------------------------------------------------------------------------------------------- the API


def test_api_wants_a_token(stack: Stack):
    base = stack.airflow.base_url
    with requests.Session() as session:
        session.trust_env = False
        assert session.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=30).status_code == 401
        wrong = session.post(
            f"{base}/auth/token", json={"username": "admin", "password": "not-the-password"}, timeout=30
        )
        assert wrong.status_code == 401, wrong.text
    token = stack.airflow.token()
    assert isinstance(token, str) and token.count(".") == 2  # a JWT
    assert stack.airflow.api("GET", f"/api/v2/dags/{DAG_ID}").status_code == 200


# ------------------------------------------------------------------------------------------ the seed run


def test_triggered_run_sends_the_look_to_segment(stack: Stack):
    stack.segment.reset()
    run_id = stack.trigger_ok({"look_id": TOASTMATES_LOOK_ID})

    run = stack.airflow.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT)
    assert run["state"] == "success", f"run {run['state']}; task log:\n{stack.log(run_id)}"
    assert run["conf"] == {"look_id": TOASTMATES_LOOK_ID}

    # The task's summary, as the UI's XCom tab reads it.
    response = stack.airflow.api(
        "GET", f"{stack.run_path(run_id)}/taskInstances/{TASK_ID}/xcomEntries/return_value"
    )
    assert response.status_code == 200, response.text
    summary = response.json()["value"]
    rows = len(TOASTMATES.rows)
    assert summary["look_id"] == TOASTMATES_LOOK_ID
    assert (summary["rows"], summary["sent"], summary["invalid"]) == (rows, rows, 0)
    assert (summary["rejected"], summary["failed"]) == (0, 0)
    assert summary["dry_run"] is False
    assert summary["identifiers"]["userId"]["field"] == "users.id"
    assert summary["identifiers"]["email"]["field"] == "users.email"

    # The task log, as the UI's Logs tab reads it: the summary line, and no secret anywhere.
    summary_line = f"Look {TOASTMATES_LOOK_ID}: {rows} rows read, {rows} sent, 0 invalid"
    log = stack.wait_for_log(run_id, summary_line)
    assert summary_line in log, log
    # No looker_sdk line per request (POST(.../login), GET(...), DELETE(.../logout)); the Look's URL once.
    assert "POST(" not in log and "GET(" not in log and "DELETE(" not in log, log
    assert log.count(f"{stack.looker.base_url}/looks/{TOASTMATES_LOOK_ID}") == 1, log
    assert [line for line in log.splitlines() if line.startswith("warning") and "Look " in line] == [], log
    raw_log = stack.raw_log(run_id)
    assert DEFAULT_WRITE_KEY not in raw_log
    assert stack.looker.client_secret not in raw_log

    # What Segment received: one identify call per row of the Look, the first one the seed's.
    events = stack.segment.events()
    assert len(events) == rows
    assert {key: events[0][key] for key in SEED_CALL} == SEED_CALL
    expected = {
        row["users.id"]: {
            "type": "identify",
            "userId": row["users.id"],
            "traits": {
                "name": row["users.name"],
                "email": row["users.email"],
                "sessions count": row["users.sessions_count"],
            },
        }
        for row in TOASTMATES.rows
    }
    assert {event["userId"] for event in events} == set(expected)
    ran_at = datetime.fromisoformat(summary["ran_at"])
    for event in events:
        assert set(event) == EVENT_KEYS, event
        assert {key: event[key] for key in ("type", "userId", "traits")} == expected[event["userId"]]
        assert event["context"] == {"library": {"name": PACKAGE_NAME, "version": __version__}}
        assert event["timestamp"].endswith("Z")
        assert datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")) == ran_at
        assert event["messageId"].startswith("lsg-"), event["messageId"]
    assert len({event["messageId"] for event in events}) == rows
    stats = stack.segment.stats()
    assert (stats["events"], stats["duplicate_message_ids"], stats["rejected_events"]) == (rows, 0, 0)


# ------------------------------------------------------------------------------------------- bad input


def test_a_run_without_a_look_is_skipped_saying_what_to_set(stack: Stack):
    """No look_id in the form and no Airflow Variable: the run is skipped (never a daily failure)."""
    events_before = len(stack.segment.events())
    run_id = stack.trigger_ok({})
    run = stack.airflow.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT)
    assert run["state"] == "success", run
    for task_id in ("resolve_look", TASK_ID):
        ti = stack.airflow.wait_for_task(DAG_ID, run_id, task_id, ("skipped",), timeout=RUN_TIMEOUT)
        assert ti["state"] == "skipped"
    needle, deadline = "set the Airflow Variable looker_segment_daily_look_id", time.monotonic() + 30
    log = stack.airflow.task_log(DAG_ID, run_id, "resolve_look", 1)
    while needle not in log and time.monotonic() < deadline:  # the log can trail the state by a moment
        time.sleep(0.5)
        log = stack.airflow.task_log(DAG_ID, run_id, "resolve_look", 1)
    assert needle in log, log
    assert len(stack.segment.events()) == events_before


def test_missing_look_fails_the_task_at_once_naming_the_look(stack: Stack):
    events_before = len(stack.segment.events())
    run_id = stack.trigger_ok({"look_id": MISSING_LOOK_ID})
    try:
        # The DAG retries twice, five minutes apart; a missing Look is not worth a retry: failed at once.
        ti = stack.airflow.wait_for_task(
            DAG_ID, run_id, TASK_ID, ("up_for_retry", "failed", "success"), timeout=RUN_TIMEOUT
        )
        assert ti["state"] == "failed", ti
        assert ti["try_number"] == 1
        assert ti["max_tries"] == 2
        assert stack.airflow.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT)["state"] == "failed"
        needle = f"Look {MISSING_LOOK_ID} not found"
        log = stack.wait_for_log(run_id, needle, try_number=1)
        assert needle in log, log
        assert "LookNotFoundError" in log
        assert len(stack.segment.events()) == events_before  # nothing was sent
    finally:
        # End the run now rather than in five minutes: the DAG allows one active run at a time.
        stack.airflow.api("PATCH", stack.run_path(run_id), json={"state": "failed"})
    run = stack.airflow.api("GET", stack.run_path(run_id)).json()
    assert run["state"] == "failed"


# -------------------------------------------------------------------------------- the connection forms


def _conn_types() -> dict[str, dict[str, Any]]:
    return {item["connection-type"]: item for item in get_provider_info()["connection-types"]}


@pytest.mark.parametrize("conn_type", ["looker", "segment_tracking"])
def test_connection_form_shows_the_provider_fields(stack: Stack, conn_type: str):
    response = stack.airflow.api("GET", "/ui/connections/hook_meta")
    assert response.status_code == 200, response.text
    metas = {meta["connection_type"]: meta for meta in response.json()}
    assert conn_type in metas, sorted(metas)
    meta, info = metas[conn_type], _conn_types()[conn_type]
    assert meta["hook_class_name"] == info["hook-class-name"]
    assert meta["hook_name"] == info["hook-name"]

    extra_fields = meta["extra_fields"]
    assert set(extra_fields) == set(info["conn-fields"])
    for name, field in info["conn-fields"].items():
        assert extra_fields[name]["schema"]["title"] == field["label"]
        assert extra_fields[name]["description"] == field["description"]
        assert extra_fields[name]["value"] == field["schema"].get("default")

    behaviour = info["ui-field-behaviour"]
    standard = meta["standard_fields"]
    for name, label in behaviour["relabeling"].items():
        assert standard[name]["title"] == label
    for name, placeholder in behaviour["placeholders"].items():
        assert standard[name]["placeholder"] == placeholder
    for name in behaviour["hidden-fields"]:
        key = "url_schema" if name == "schema" else name
        if key in standard:  # "extra" is not a standard field
            assert standard[key]["hidden"] is True, name


def test_connection_forms_name_the_documented_extras(stack: Stack):
    metas = {
        meta["connection_type"]: meta for meta in stack.airflow.api("GET", "/ui/connections/hook_meta").json()
    }
    assert {"verify_ssl", "timeout"} <= set(metas["looker"]["extra_fields"])
    assert {"gzip", "max_in_flight", "timeout", "requests_per_second"} <= set(
        metas["segment_tracking"]["extra_fields"]
    )


# ------------------------------------------------------------------------------------------ deferrable


def test_deferrable_signups_run_waits_in_the_triggerer(stack: Stack):
    """The sign-ups DAG: filtered on its data interval, deferred to a real triggerer, then synced."""
    stack.segment.reset()
    response = stack.airflow.api(
        "POST",
        f"/api/v2/dags/{SIGNUPS_DAG_ID}/dagRuns",
        json={"logical_date": None, "conf": {"look_id": NEW_SIGNUPS_LOOK_ID}},
    )
    assert response.status_code == 200, response.text
    run = response.json()
    run_id, task_id = run["dag_run_id"], "sync_signups"
    # While Looker runs the query the task is deferred: no worker slot is held.
    ti = stack.airflow.wait_for_task(SIGNUPS_DAG_ID, run_id, task_id, ("deferred", "success", "failed"))
    assert ti["state"] == "deferred", ti
    run = stack.airflow.wait_for_run(SIGNUPS_DAG_ID, run_id, timeout=RUN_TIMEOUT)
    log = stack.airflow.task_log(SIGNUPS_DAG_ID, run_id, task_id, 1)
    assert run["state"] == "success", f"run {run['state']}; task log:\n{log}"
    # Triggered without a logical date, the run has no data interval: it sends the day before it started.
    assert run["data_interval_start"] is None
    day = (
        datetime.fromisoformat(run["run_after"].replace("Z", "+00:00")).date() - timedelta(days=1)
    ).isoformat()
    signups = stack.looker.look(NEW_SIGNUPS_LOOK_ID)
    expected = sorted(row["users.id"] for row in signups.rows if row["users.created_date"] == day)
    assert expected and sorted(event["userId"] for event in stack.segment.events()) == expected
    assert stack.looker.client_secret not in json.dumps(
        stack.airflow.task_log_events(SIGNUPS_DAG_ID, run_id, task_id, 1)
    )
    # The task's extra link, as the UI's button (Details > Extra Links) reads it: the Look with the filter
    # that ran, as Looker's URL filter parameter.
    links = stack.airflow.api(
        "GET", f"/api/v2/dags/{SIGNUPS_DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/links"
    )
    assert links.status_code == 200, links.text
    link = urlsplit(links.json()["extra_links"]["Looker Look"])
    assert (
        f"{link.scheme}://{link.netloc}{link.path}" == f"{stack.looker.base_url}/looks/{NEW_SIGNUPS_LOOK_ID}"
    )
    ran = stack.looker.queries.received[-1]["filters"]
    interval = f"{day} to {(date.fromisoformat(day) + timedelta(days=1)).isoformat()}"
    assert ran["users.created_date"] == interval
    assert parse_qsl(link.query) == [("f[users.created_date]", interval)]


# ------------------------------------------------------------------------------------------ mapped Looks


def test_unpausing_a_dag_whose_variable_is_set_syncs_at_once(stack: Stack):
    """As the README warns ("Unpausing syncs at once"): no trigger needed, the latest day's run sends."""
    variable = {"key": "looker_segment_look_ids", "value": json.dumps([TOASTMATES_LOOK_ID])}
    response = stack.airflow.api("POST", "/api/v2/variables", json=variable)
    assert response.status_code in (200, 201), response.text
    try:
        stack.segment.reset()
        assert stack.airflow.wait_for_dag(MAPPED_DAG_ID)["is_paused"]
        response = stack.airflow.api("PATCH", f"/api/v2/dags/{MAPPED_DAG_ID}", json={"is_paused": False})
        assert response.status_code == 200, response.text
        deadline, runs = time.monotonic() + RUN_TIMEOUT, []
        while not runs and time.monotonic() < deadline:
            found = stack.airflow.api("GET", f"/api/v2/dags/{MAPPED_DAG_ID}/dagRuns").json()["dag_runs"]
            runs = [run for run in found if run["run_type"] == "scheduled"]
            time.sleep(1)
        assert runs, "no scheduled run after unpausing"
        run = stack.airflow.wait_for_run(MAPPED_DAG_ID, runs[0]["dag_run_id"], timeout=RUN_TIMEOUT)
        assert run["state"] == "success", run
        assert len(stack.segment.events()) == len(TOASTMATES.rows)  # a real sync, to the marketing tools
    finally:
        stack.airflow.api("DELETE", "/api/v2/variables/looker_segment_look_ids")


def test_mapped_tasks_are_named_after_their_looks(stack: Stack):
    """The grid names each mapped task after its Look, the one that failed included (at once: deleted)."""
    response = stack.airflow.api("PATCH", f"/api/v2/dags/{MAPPED_DAG_ID}", json={"is_paused": False})
    assert response.status_code == 200, response.text
    response = stack.airflow.api(
        "POST",
        f"/api/v2/dags/{MAPPED_DAG_ID}/dagRuns",
        json={
            "logical_date": None,
            "conf": {"look_ids": [TOASTMATES_LOOK_ID, DELETED_LOOK_ID], "dry_run": True},
        },
    )
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    run = stack.airflow.wait_for_run(MAPPED_DAG_ID, run_id, timeout=RUN_TIMEOUT)
    assert run["state"] == "failed", run  # Look 11 is deleted
    mapped = stack.airflow.api(
        "GET", f"/api/v2/dags/{MAPPED_DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/{TASK_ID}/listMapped"
    )
    assert mapped.status_code == 200, mapped.text
    tasks = {ti["rendered_map_index"]: ti for ti in mapped.json()["task_instances"]}
    assert set(tasks) == {f"Look {TOASTMATES_LOOK_ID}", f"Look {DELETED_LOOK_ID}"}, tasks
    assert tasks[f"Look {TOASTMATES_LOOK_ID}"]["state"] == "success"
    failed = tasks[f"Look {DELETED_LOOK_ID}"]
    assert (failed["state"], failed["try_number"], failed["max_tries"]) == ("failed", 1, 2)


# ------------------------------------------------------------------------------ Looker's data refreshes


def _datagroup_polls(looker: LookerStandIn) -> int:
    return sum(1 for r in looker.requests if r.path == "/api/4.0/datagroups" and r.status == 200)


def _wait_for_polls(stack: Stack, at_least: int, timeout: float = RUN_TIMEOUT) -> None:
    """Wait until the triggerer's watcher has polled the stand-in's datagroups ``at_least`` times."""
    deadline = time.monotonic() + timeout
    while _datagroup_polls(stack.looker) < at_least:
        stack.airflow.check_alive()
        assert time.monotonic() < deadline, (
            f"the watcher polled {_datagroup_polls(stack.looker)} times, not {at_least}:\n"
            f"{stack.airflow.log_tail('triggerer')}"
        )
        time.sleep(0.5)


def _datagroup_runs(stack: Stack) -> list[dict[str, Any]]:
    response = stack.airflow.api("GET", f"/api/v2/dags/{DATAGROUP_DAG_ID}/dagRuns")
    assert response.status_code == 200, response.text
    return response.json()["dag_runs"]


def _wait_for_runs(stack: Stack, count: int) -> list[dict[str, Any]]:
    deadline, runs = time.monotonic() + RUN_TIMEOUT, _datagroup_runs(stack)
    while len(runs) < count:
        assert time.monotonic() < deadline, f"{len(runs)} runs, not {count}:\n{stack.airflow.log_tails()}"
        time.sleep(1)
        runs = _datagroup_runs(stack)
    return runs


def test_a_datagroup_refresh_starts_a_sync_once_even_across_a_triggerer_restart(stack: Stack):
    """
    The example DAG scheduled on an Asset watched by LookerDatagroupTrigger, in a real triggerer: no run
    until the stand-in's datagroup advances, then one run that syncs the Look; a restarted triggerer
    remembers what it saw (the asset state store): no second run until the datagroup advances again.
    """
    model, name = "toastmates", "nightly_etl"
    variable = {"key": "looker_segment_datagroup_look_id", "value": TOASTMATES_LOOK_ID}
    response = stack.airflow.api("POST", "/api/v2/variables", json=variable)
    assert response.status_code in (200, 201), response.text
    stack.airflow.wait_for_dag(DATAGROUP_DAG_ID)
    response = stack.airflow.api("PATCH", f"/api/v2/dags/{DATAGROUP_DAG_ID}", json={"is_paused": False})
    assert response.status_code == 200, response.text

    _wait_for_polls(stack, _datagroup_polls(stack.looker) + 2)  # the watcher runs and has its baseline
    assert _datagroup_runs(stack) == []  # the datagroup has not advanced: no run
    stack.segment.reset()
    triggered_at = stack.looker.datagroups.trigger(model, name)
    (run,) = _wait_for_runs(stack, 1)
    assert run["run_type"] == "asset_triggered", run
    run = stack.airflow.wait_for_run(DATAGROUP_DAG_ID, run["dag_run_id"], timeout=RUN_TIMEOUT)
    assert run["state"] == "success", run
    assert len(stack.segment.events()) == len(TOASTMATES.rows)  # the Look was synced
    events = stack.airflow.api(
        "GET", f"/api/v2/dags/{DATAGROUP_DAG_ID}/dagRuns/{quote(run['dag_run_id'])}/upstreamAssetEvents"
    ).json()["asset_events"]
    payload = events[0]["extra"]["payload"]
    assert (payload["model_name"], payload["datagroup_name"], payload["triggered_at"]) == (
        model,
        name,
        triggered_at,
    )

    # A triggerer restart: the watcher starts again from the value it saved, not from a new baseline.
    stack.airflow.restart("triggerer")
    _wait_for_polls(stack, _datagroup_polls(stack.looker) + 3)
    assert len(_datagroup_runs(stack)) == 1, "a restart fired again for a refresh already synced"
    stack.looker.datagroups.trigger(model, name)
    runs = _wait_for_runs(stack, 2)
    assert len(runs) == 2
    log = stack.airflow.log_tail("triggerer", 200_000)
    assert "from the asset state store" in log, log[-3000:]
    assert stack.looker.client_secret not in log
