"""LookerToSegmentOperator through real Airflow (``dag.test()``) against the Looker and Segment stand-ins."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from standins.connections import segment_connection, standin_connections
from standins.demo import read_return_value
from standins.looker_fixtures import (
    ANONYMOUS_ID_LOOK_ID,
    DELETED_LOOK_ID,
    SQL_ERROR_LOOK_ID,
    TOASTMATES_LOOK_ID,
    TRUNCATED_LOOK_ID,
    VALUE_TYPES_LOOK_ID,
    FixtureField,
    FixtureLook,
    fixture_looks,
)
from standins.looker_standin import LookerStandIn
from standins.segment_standin import DEFAULT_WRITE_KEY, SegmentStandIn

from airflow_provider_looker_segment import PACKAGE_NAME, __version__

DAG_FILE = Path(__file__).resolve().parent / "dag_files" / "lsg_operator_test.py"

#: Segment's reference example of the Looker source (the seed).
SEED_CALL = {
    "type": "identify",
    "userId": "00MWWFOLRcETcTCf",
    "traits": {"name": "Ty Arthur", "email": "ty.arthur@segment.com", "sessions count": 2},
}
TOASTMATES = fixture_looks()[TOASTMATES_LOOK_ID]


@pytest.fixture(scope="module")
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def segment():
    with SegmentStandIn(record="full") as standin:
        yield standin


def _load_dag() -> Any:
    """A fresh copy of the test DAG: ``dag.test(run_conf=...)`` leaves the conf in the DAG's params."""
    spec = importlib.util.spec_from_file_location("lsg_operator_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


@pytest.fixture
def run(airflow_db, monkeypatch, looker, segment):
    """Run the test DAG once with the given conf; return (dag run, task state, summary or None)."""
    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)

    def _run(**conf: Any) -> tuple[Any, Any, dict[str, Any] | None]:
        dag_run = _load_dag().test(run_conf={"look_id": TOASTMATES_LOOK_ID, **conf})
        ti = dag_run.get_task_instance("sync")
        return dag_run, ti, read_return_value(dag_run, "sync")

    return _run


def _core(event: dict[str, Any]) -> dict[str, Any]:
    return {key: event[key] for key in ("type", "userId", "traits") if key in event}


def _message_ids_of_requests(segment: SegmentStandIn) -> list[list[str]]:
    return [list(record.message_ids or ()) for record in segment.records()]


# ------------------------------------------------------------------------------------------------ the seed


def test_seed_example_call_reproduced_exactly(run, segment, capfd):
    dag_run, ti, _summary = run()
    assert dag_run.state == "success", ti.state
    events = segment.events()
    assert _core(events[0]) == SEED_CALL
    assert [_core(e)["userId"] for e in events] == [row["users.id"] for row in TOASTMATES.rows]
    for event, row in zip(events, TOASTMATES.rows, strict=True):
        assert event["traits"] == {
            "name": row["users.name"],
            "email": row["users.email"],
            "sessions count": row["users.sessions_count"],
        }
        assert "anonymousId" not in event  # a userId is enough: no invented anonymousId
        assert event["context"] == {"library": {"name": PACKAGE_NAME, "version": __version__}}
        assert event["messageId"].startswith("lsg-") and len(event["messageId"]) < 100
        assert event["timestamp"].endswith("Z")
    assert len({e["messageId"] for e in events}) == 10
    log = capfd.readouterr()
    text = log.out + log.err
    assert "userId from field users.id (tag user_id)" in text
    assert "10 rows read, 10 sent, 0 invalid, 0 rejected, 0 failed, 1 batches" in text
    assert "each identify overwrites these traits" in text  # the seed's note about existing trait names
    assert DEFAULT_WRITE_KEY not in text and "looker-demo-secret" not in text


def test_summary_contents(run):
    _dag_run, _ti, summary = run()
    assert summary["look_id"] == TOASTMATES_LOOK_ID
    assert summary["dry_run"] is False
    assert (summary["rows"], summary["sent"], summary["invalid"]) == (10, 10, 0)
    assert (summary["rejected"], summary["failed"], summary["batches"]) == (0, 0, 1)
    assert summary["invalid_reasons"] == {}
    assert summary["identifiers"] == {
        "userId": {"field": "users.id", "how": "tag user_id"},
        "email": {"field": "users.email", "how": "tag email"},
        "anonymousId": {"field": "users.email", "how": "derived from email, for rows without a userId"},
    }
    assert summary["traits"] == {
        "users.name": "name",
        "users.email": "email",
        "users.sessions_count": "sessions count",
    }
    assert summary["possibly_truncated"] is False
    assert summary["ran_at"]
    json.dumps(summary)  # JSON-serialisable


def test_trait_options(run, segment):
    dag_run, _ti, summary = run(
        trait_key_style="snake",
        trait_names={"users.name": "full_name"},
        exclude_fields=["users.email"],
    )
    assert dag_run.state == "success"
    assert segment.events()[0]["traits"] == {"full_name": "Ty Arthur", "sessions_count": 2}
    assert summary["traits"] == {"users.name": "full_name", "users.sessions_count": "sessions_count"}


# ------------------------------------------------------------------------------------------ destinations


def test_destinations_that_the_look_satisfies(run, segment):
    dag_run, _ti, summary = run(destinations=["hubspot", "Intercom", "customer.io"])
    assert dag_run.state == "success"
    assert summary["destinations"] == ["hubspot", "intercom", "customer.io"]
    assert len(segment.events()) == 10


def test_destinations_the_look_cannot_feed_fail_before_sending(run, segment, capfd):
    dag_run, ti, summary = run(look_id=ANONYMOUS_ID_LOOK_ID, destinations=["aboardly", "intercom"])
    assert dag_run.state == "failed" and ti.state == "failed"
    assert summary is None
    assert segment.events() == []
    text = "".join(capfd.readouterr())
    assert "aboardly" in text and "userId" in text and "nothing was sent" in text


def test_unknown_destination_suggests_close_matches(run, segment, capfd):
    dag_run, _ti, _summary = run(destinations=["hubspt"])
    assert dag_run.state == "failed"
    assert segment.events() == []
    text = "".join(capfd.readouterr())
    assert "hubspt" in text and "hubspot" in text


# --------------------------------------------------------------------------------------------- dry run


def test_dry_run_sends_nothing(run, segment, capfd):
    dag_run, _ti, summary = run(dry_run=True)
    assert dag_run.state == "success"
    assert segment.stats()["requests"] == 0
    assert summary["dry_run"] is True
    assert (summary["rows"], summary["sent"], summary["would_send"], summary["batches"]) == (10, 0, 10, 1)
    text = "".join(capfd.readouterr())
    assert "Dry run: example payload 1:" in text and '"userId":"00MWWFOLRcETcTCf"' in text
    assert "nothing was sent" in text


def test_dry_run_needs_no_segment_connection(run, segment, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SEGMENT_DEFAULT")
    dag_run, _ti, summary = run(dry_run=True)
    assert dag_run.state == "success" and summary["would_send"] == 10


# ---------------------------------------------------------------------------------------------- retries


#: Segment rate-limits the first try's batch beyond the delivery's 8 attempts (429, ``Retry-After: 0``): its
#: events fail for a reason that can pass, so Airflow retries the task, and the retry delivers them.
SEGMENT_OUTAGE = {"script": ["429"] * 8, "retry_after": 0}


def test_retried_task_sends_identical_message_ids(run, segment):
    from standins.segment_standin import Faults

    segment.set_faults(Faults(**SEGMENT_OUTAGE))
    dag_run, ti, summary = run()
    assert dag_run.state == "success" and ti.try_number == 2
    requests = _message_ids_of_requests(segment)
    first, second = requests[0], requests[-1]  # the first try's first request, the retry's
    assert len(requests) == 9 and len(first) == 10 and first == second
    assert summary["sent"] == 10
    # The next run of the DAG sends new messageIds (Segment would drop repeats for about 24 hours).
    _dag_run, _ti, _summary = run()
    assert not set(_message_ids_of_requests(segment)[-1]) & set(first)


def test_rejected_events_fail_the_task_with_the_summary(run, segment, capfd):
    from standins.segment_standin import Faults

    segment.set_faults(Faults(script=["400"]))
    dag_run, ti, _summary = run()
    # Re-sending what Segment rejected would be rejected again: the task fails at once, retries unused.
    assert dag_run.state == "failed" and ti.state == "failed" and ti.try_number == 1
    text = "".join(capfd.readouterr())
    assert "10 events rejected by Segment" in text and '"rows":10' in text
    assert "UndeliverableEventsError" in text


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("look_id", "message"),
    [
        ("424242", "Look 424242 not found"),
        (DELETED_LOOK_ID, f"Look {DELETED_LOOK_ID} is deleted"),
        (SQL_ERROR_LOOK_ID, f"Look {SQL_ERROR_LOOK_ID}"),
    ],
)
def test_looker_errors_fail_before_anything_is_sent(run, segment, capfd, look_id, message):
    dag_run, _ti, _summary = run(look_id=look_id)
    assert dag_run.state == "failed"
    assert segment.stats()["requests"] == 0
    assert message in "".join(capfd.readouterr())


def test_missing_write_key_fails_before_reading_looker(run, looker, segment, monkeypatch, capfd):
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_DEFAULT", segment_connection(segment.base_url, write_key=None))
    runs_before = looker.counters.get("runs", 0)
    dag_run, _ti, _summary = run()
    assert dag_run.state == "failed"
    assert looker.counters.get("runs", 0) == runs_before
    assert "write key" in "".join(capfd.readouterr()).lower()


def test_date_times_are_sent_in_utc_from_the_zone_looker_ran_the_query_in(run, segment, capfd):
    """Look 6 runs in America/New_York: its local date-times become instants in UTC (ISO 8601, Z)."""
    dag_run, _ti, _summary = run(look_id=VALUE_TYPES_LOOK_ID)
    assert dag_run.state == "success"
    traits = [event["traits"] for event in segment.events()]
    assert [t["last seen time"] for t in traits] == ["2024-03-01T13:15:30Z", "2024-01-01T05:00:00Z", None]
    assert [t["created date"] for t in traits] == ["2024-02-29", "2023-12-31", None]  # dates stay dates
    assert [t["created month"] for t in traits] == ["2024-02", "2023-12", None]
    assert "without a UTC offset" not in "".join(capfd.readouterr())


def test_date_times_of_an_unknown_zone_keep_their_local_time_with_a_warning(run, looker, segment, capfd):
    looker.add_look(dataclasses.replace(fixture_looks()[VALUE_TYPES_LOOK_ID], id="606", query_timezone=None))
    dag_run, _ti, _summary = run(look_id="606")
    assert dag_run.state == "success"
    assert segment.events()[0]["traits"]["last seen time"] == "2024-03-01T08:15:30"
    text = "".join(capfd.readouterr())
    assert (
        "users.last_seen_time gives date-times sent without a UTC offset (e.g. 2024-01-05T10:11:12), the "
        "local time of the query: Looker did not say in which time zone it ran the query." in text
    )
    assert "set the Look's query time zone in Looker" in text


def test_invalid_rows_are_reported_and_can_fail_the_task(run, looker, segment):
    uid = FixtureField("users.id", "Users ID", "ID", tags=("user_id",))
    email = FixtureField("users.email", "Users Email", "Email", tags=("email",))
    plan = FixtureField("users.plan", "Users Plan", "Plan")
    rows = (
        {"users.id": "u1", "users.email": None, "users.plan": "pro"},
        {"users.id": None, "users.email": None, "users.plan": "free"},
        {"users.id": "", "users.email": "", "users.plan": "free"},
        {"users.id": None, "users.email": "Someone@Example.com ", "users.plan": "pro"},
    )
    looker.add_look(FixtureLook("500", "Some rows lack ids", "toastmates", "users", (uid, email, plan), rows))
    dag_run, _ti, summary = run(look_id="500")
    assert dag_run.state == "success"
    assert (summary["rows"], summary["sent"], summary["invalid"]) == (4, 2, 2)
    assert summary["invalid_reasons"] == {"no_identifier": 2}
    derived = segment.events()[1]
    assert "userId" not in derived and derived["anonymousId"] and derived["traits"]["email"]

    dag_run, ti, _summary = run(look_id="500", max_invalid_rows=1)
    assert dag_run.state == "failed" and ti.state == "failed"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"limit": -5}, "limit must be -1 (all rows) or a positive number, got -5"),
        ({"trait_key_style": "camel"}, "trait_key_style must be one of label, snake, field, got 'camel'"),
        ({"sync_mode": "sometimes"}, "sync_mode must be one of all, changed, got 'sometimes'"),
        ({"max_exit_ratio": 2}, "max_exit_ratio must be a number from 0 to 1, got 2"),
    ],
)
def test_bad_parameters_fail_naming_the_parameter(run, looker, segment, capfd, conf, message):
    runs_before = looker.counters.get("runs", 0)
    dag_run, _ti, _summary = run(**conf)
    assert dag_run.state == "failed"
    assert message in "".join(capfd.readouterr())
    assert looker.counters.get("runs", 0) == runs_before and segment.stats()["requests"] == 0


def test_possibly_truncated_look_is_reported(run, capfd):
    dag_run, _ti, summary = run(look_id=TRUNCATED_LOOK_ID, limit=5)
    assert dag_run.state == "success"
    assert summary["rows"] == 5 and summary["possibly_truncated"] is True
    assert "may be truncated" in "".join(capfd.readouterr())
    _dag_run, _ti, summary = run(look_id=TRUNCATED_LOOK_ID)
    assert summary["rows"] == 8 and summary["possibly_truncated"] is False


# ------------------------------------------------------------------------------- sync_mode="changed"

_UID = FixtureField("users.id", "Users ID", "ID", tags=("user_id",))
_EMAIL = FixtureField("users.email", "Users Email", "Email", tags=("email",))
_PLAN = FixtureField("users.plan", "Users Plan", "Plan")
COHORT_LOOK_ID = "600"


def _cohort(looker: LookerStandIn, rows: list[tuple[str, str]]) -> None:
    """(Re)define Look 600: one row per (user id, plan)."""
    looker.add_look(
        FixtureLook(
            COHORT_LOOK_ID,
            "Cohort",
            "toastmates",
            "users",
            (_UID, _EMAIL, _PLAN),
            tuple({"users.id": uid, "users.email": f"{uid}@example.com", "users.plan": p} for uid, p in rows),
        )
    )


def _user_ids(events: list[dict[str, Any]]) -> list[str]:
    return [event.get("userId") for event in events]


@pytest.fixture
def changed(run, tmp_path):
    """Run the cohort Look in changed mode with a state under tmp_path; return the runner."""

    def _run(**conf: Any) -> tuple[Any, Any, dict[str, Any] | None]:
        conf = {"look_id": COHORT_LOOK_ID, "sync_mode": "changed", "state_path": str(tmp_path), **conf}
        return run(**conf)

    return _run


def test_changed_mode_sends_only_what_changed(changed, looker, segment):
    cohort = [(f"u{n}", "free") for n in range(20)]
    _cohort(looker, cohort)
    dag_run, _ti, first = changed(membership_trait="in_cohort")
    assert dag_run.state == "success"
    assert (first["new"], first["changed"], first["unchanged"], first["exited"]) == (20, 0, 0, 0)
    assert first["sent"] == 20 and segment.events()[0]["traits"]["in_cohort"] is True
    message_id = segment.events()[0]["messageId"]
    assert len(message_id) < 100 and message_id[16] == "-"  # identity hash first

    segment.reset()
    _dag_run, _ti, second = changed(membership_trait="in_cohort")
    assert (second["rows"], second["sent"], second["unchanged"]) == (20, 0, 20)
    assert segment.events() == []

    cohort[3] = ("u3", "pro")  # one trait changed
    del cohort[7]  # one user left
    cohort.append(("u99", "free"))  # one joined
    _cohort(looker, cohort)
    _dag_run, _ti, third = changed(membership_trait="in_cohort")
    assert (third["new"], third["changed"], third["unchanged"], third["exited"]) == (1, 1, 18, 1)
    events = {event["userId"]: event for event in segment.events()}
    assert set(events) == {"u3", "u99", "u7"}
    assert events["u3"]["traits"]["plan"] == "pro"
    assert events["u7"]["traits"] == {"in_cohort": False}

    segment.reset()
    _dag_run, _ti, fourth = changed(membership_trait="in_cohort")
    assert fourth["sent"] == 0 and fourth["exited"] == 0  # the exit left the state


def test_full_refresh_resends_everything(changed, looker, segment):
    _cohort(looker, [(f"u{n}", "free") for n in range(5)])
    changed()
    segment.reset()
    _dag_run, _ti, summary = changed(full_refresh=True)
    assert summary["sent"] == 5 and summary["changed"] == 5 and summary["new"] == 0
    assert summary["full_refresh"] is True
    assert len(segment.events()) == 5


def test_mass_exit_stops_the_run_before_any_exit(changed, looker, segment, capfd):
    _cohort(looker, [(f"u{n}", "free") for n in range(10)])
    changed(membership_trait="in_cohort")
    segment.reset()
    _cohort(looker, [("u0", "free"), ("u1", "free"), ("u2", "pro")])  # 7 of 10 gone
    dag_run, ti, _summary = changed(membership_trait="in_cohort")
    assert dag_run.state == "failed" and ti.state == "failed"
    # The guard is decided before the first call: u2's change is not sent either; it fails the task at once.
    assert ti.try_number == 1
    assert segment.events() == [] and segment.stats()["requests"] == 0
    text = "".join(capfd.readouterr())
    assert "ExitGuardError" in text and "7 of the 10 identities" in text and "max_exit_ratio=0.5" in text
    assert text.count("Look 600: 3 rows read, 0 sent") == 1  # the one try logs its summary, then fails
    segment.reset()
    _dag_run, _ti, summary = changed(membership_trait="in_cohort", max_exit_ratio=1.0)
    assert summary["exited"] == 7 and summary["sent"] == 8 and summary["changed"] == 1
    assert sorted(e["userId"] for e in segment.events() if e["traits"] == {"in_cohort": False}) == [
        f"u{n}" for n in range(3, 10)
    ]


def test_truncated_look_never_produces_exits(changed, looker, segment):
    _cohort(looker, [(f"u{n}", "free") for n in range(10)])
    changed(membership_trait="in_cohort")
    segment.reset()
    _dag_run, _ti, summary = changed(membership_trait="in_cohort", limit=4, max_exit_ratio=1.0)
    assert summary["possibly_truncated"] is True
    assert summary["exited"] == 0 and summary["departed"] == 6
    assert segment.events() == []
    _dag_run, _ti, summary = changed(membership_trait="in_cohort")
    assert summary["sent"] == 0 and summary["unchanged"] == 10  # the state kept everyone


def test_failed_batch_is_sent_again_by_the_next_run(changed, looker, segment):
    from standins.segment_standin import Faults

    cohort = [(f"u{n}", "free") for n in range(6)]
    _cohort(looker, cohort)
    changed()
    cohort[0], cohort[1] = ("u0", "pro"), ("u1", "pro")
    _cohort(looker, cohort)
    segment.reset()
    segment.set_faults(Faults(script=["400"]))  # run 2: Segment refuses the batch (no retry)
    dag_run, _ti, _summary = changed()
    assert dag_run.state == "failed"
    segment.reset()
    dag_run, _ti, summary = changed()  # run 3
    assert dag_run.state == "success"
    assert (summary["changed"], summary["sent"]) == (2, 2)
    assert sorted(_user_ids(segment.events())) == ["u0", "u1"]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_state_on_object_storage(run, looker, segment, tmp_path, scheme):
    from airflow.sdk import ObjectStoragePath

    if scheme == "memory":
        from sync_state_helpers import attach_memory_fs

        attach_memory_fs()
        base = f"memory://lsg-operator-test/{tmp_path.name}"
    else:
        base = f"file://{tmp_path}/state"
    _cohort(looker, [(f"u{n}", "free") for n in range(4)])
    conf = {"look_id": COHORT_LOOK_ID, "sync_mode": "changed", "state_path": base}
    _dag_run, _ti, first = run(**conf)
    _dag_run, _ti, second = run(**conf)
    assert (first["sent"], second["sent"], second["unchanged"]) == (4, 0, 4)
    files = [p.name for p in ObjectStoragePath(base).iterdir()]
    assert (
        len(files) == 1
        and files[0].startswith(f"look-{COHORT_LOOK_ID}-127.0.0.1")
        and files[0].endswith(".state")
    )
    assert DEFAULT_WRITE_KEY not in files[0]


def test_changed_mode_dry_run_reads_but_keeps_the_state(changed, looker, segment):
    _cohort(looker, [(f"u{n}", "free") for n in range(3)])
    _dag_run, _ti, summary = changed(dry_run=True)
    assert summary["would_send"] == 3 and summary["new"] == 3 and segment.stats()["requests"] == 0
    _dag_run, _ti, summary = changed()
    assert summary["new"] == 3 and summary["sent"] == 3


# ------------------------------------------------------------------------------- duplicates, limits


def _duplicated_cohort(looker: LookerStandIn, plans: tuple[str, str]) -> None:
    """Look 600 listing u1 twice (a join gone wrong), with the given plans for its two rows."""
    rows = [("u0", "free"), ("u1", plans[0]), ("u2", "free"), ("u1", plans[1]), ("u1", plans[1])]
    _cohort(looker, rows)


def test_duplicate_identities_send_the_first_row_only(run, looker, segment, capfd):
    _duplicated_cohort(looker, ("pro", "free"))
    dag_run, _ti, summary = run(look_id=COHORT_LOOK_ID)
    assert dag_run.state == "success"
    assert (summary["rows"], summary["sent"], summary["duplicates"], summary["invalid"]) == (5, 3, 2, 0)
    assert summary["events_by_type"] == {"identify": 3}  # the duplicates were never handed to Segment
    events = segment.events()
    assert _user_ids(events) == ["u0", "u1", "u2"]
    assert events[1]["traits"]["plan"] == "pro"  # the first row of u1 in the Look's order
    warnings = [line for line in capfd.readouterr().out.splitlines() if "repeat an identity" in line]
    assert len(warnings) == 1 and "2 rows" in warnings[0] and "userId u1" in warnings[0]


def test_duplicate_identities_do_not_flip_a_changed_sync(changed, looker, segment):
    _duplicated_cohort(looker, ("pro", "free"))
    _dag_run, _ti, first = changed(membership_trait="in_cohort")
    assert (first["sent"], first["new"], first["duplicates"]) == (3, 3, 2)
    for _ in range(2):  # the same data again: nothing to send, whichever row the state kept
        segment.reset()
        dag_run, _ti, again = changed(membership_trait="in_cohort")
        assert dag_run.state == "success"
        assert (again["sent"], again["unchanged"], again["duplicates"], again["exited"]) == (0, 3, 2, 0)
        assert segment.events() == []


def test_limit_beyond_what_looker_takes_is_refused(run, looker, segment, capfd):
    runs_before = looker.counters.get("runs", 0)
    dag_run, _ti, _summary = run(limit=10**30)
    assert dag_run.state == "failed"
    text = "".join(capfd.readouterr())
    assert "limit must be at most 9,223,372,036,854,775,807" in text and "use -1 for all rows" in text
    assert looker.counters.get("runs", 0) == runs_before and segment.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("executor", "warned"),
    [("CeleryExecutor", True), ("LocalExecutor", False), ("LocalExecutor,KubernetesExecutor", True)],
)
def test_local_state_under_a_distributed_executor_is_warned(
    changed, looker, segment, capfd, monkeypatch, executor, warned
):
    _cohort(looker, [("u0", "free")])
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    dag_run, _ti, summary = changed()
    assert dag_run.state == "success" and summary["sent"] == 1
    text = "".join(capfd.readouterr())
    assert ("keeps its state on this worker's local disk" in text) is warned


def test_an_empty_look_never_wipes_the_state(changed, looker, segment, capfd):
    cohort = [(f"u{n}", "free") for n in range(10)]
    _cohort(looker, cohort)
    changed()  # no membership trait
    segment.reset()
    _cohort(looker, [])  # the query broke: no rows at all
    dag_run, _ti, _summary = changed()
    assert dag_run.state == "failed" and segment.events() == []
    assert "10 of the 10 identities" in "".join(capfd.readouterr())
    _cohort(looker, cohort)  # fixed: nobody is sent again under new messageIds
    dag_run, _ti, summary = changed()
    assert dag_run.state == "success"
    assert (summary["sent"], summary["unchanged"]) == (0, 10) and segment.events() == []


def test_full_refresh_still_sends_the_exits(changed, looker, segment):
    _cohort(looker, [(f"u{n}", "free") for n in range(5)])
    changed(membership_trait="in_cohort")
    segment.reset()
    _cohort(looker, [(f"u{n}", "free") for n in range(4)])  # u4 left
    _dag_run, _ti, summary = changed(membership_trait="in_cohort", full_refresh=True)
    assert (summary["sent"], summary["changed"], summary["exited"]) == (5, 4, 1)
    exits = [e for e in segment.events() if e["traits"] == {"in_cohort": False}]
    assert [e["userId"] for e in exits] == ["u4"]
