"""
What a run of the example DAG leaves in Airflow's metadata database (``dag.test()`` against the stand-ins):
how many tries a failure took, and which asset events a run emitted.

The example DAG ``looker_cohort_to_segment`` retries twice, five minutes apart. An error that no retry can
fix fails its task after one try, whatever ``retries`` says; an error that can heal is retried. The tests
keep the DAG's ``retries=2`` and only drop the delay between tries (``dag.test()`` would wait it out).
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from standins.connections import standin_connections
from standins.demo import read_return_value
from standins.looker_fixtures import (
    ANONYMOUS_ID_LOOK_ID,
    DELETED_LOOK_ID,
    TOASTMATES_LOOK_ID,
    TWO_USER_IDS_LOOK_ID,
)
from standins.looker_standin import LookerStandIn
from standins.segment_standin import Faults, SegmentStandIn

DAGS = Path(__file__).resolve().parents[1] / "dags"
TASK_ID = "sync_cohort"
ASSET_NAME = "looker_cohort_synced_to_segment"


@pytest.fixture(scope="module")
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def segment():
    with SegmentStandIn(record="full") as standin:
        yield standin


@pytest.fixture
def run(airflow_db, monkeypatch, looker, segment):
    """Run the example DAG once with the given trigger-form conf; return the DAG run."""
    for name, value in standin_connections(looker.base_url, segment.base_url).items():
        monkeypatch.setenv(name, value)
    looker.clear_faults()

    def _run(**conf: Any) -> Any:
        spec = importlib.util.spec_from_file_location(
            "looker_cohort_to_segment", DAGS / "looker_cohort_to_segment.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dag = module.dag
        task = dag.get_task(TASK_ID)
        assert task.retries == 2  # as the DAG says
        task.retry_delay = timedelta(0)  # dag.test() would otherwise wait five minutes between tries
        return dag.test(run_conf=conf)

    return _run


def tries(dag_run: Any, task_id: str = TASK_ID) -> tuple[str, int]:
    """The task's final state and its number of tries, as the metadata database records them."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    key = {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id, "task_id": task_id}
    with create_session() as session:
        ti = session.scalars(select(TaskInstance).filter_by(**key)).one()
        earlier = session.scalar(select(func.count()).select_from(TaskInstanceHistory).filter_by(**key))
        state, try_number = ti.state, ti.try_number
    assert earlier == try_number - 1  # one history row per try that was retried
    return state, try_number


def asset_events(dag_run: Any) -> list[dict[str, Any]]:
    """The extras of the asset events the run emitted for the DAG's outlet, from the metadata database."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        extras = session.scalars(
            select(AssetEvent.extra)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == ASSET_NAME, AssetEvent.source_run_id == dag_run.run_id)
        ).all()
    return [dict(extra or {}) for extra in extras]


# ------------------------------------------------------------------------------------ errors that cannot heal


@pytest.mark.parametrize(
    ("conf", "error", "message"),
    [
        ({"look_id": DELETED_LOOK_ID}, "LookDeletedError", f"Look {DELETED_LOOK_ID} is deleted"),
        ({"look_id": "424242"}, "LookNotFoundError", "Look 424242 not found"),
        (
            {"look_id": TWO_USER_IDS_LOOK_ID},
            "TransformConfigError",
            "all qualify as the userId field (tag user_id)",
        ),
        (
            {"look_id": TOASTMATES_LOOK_ID, "destinations": ["hubspt"]},
            "DestinationError",
            "did you mean hubspot",
        ),
        (
            {"look_id": ANONYMOUS_ID_LOOK_ID, "destinations": ["aboardly"]},
            "DestinationError",
            "aboardly needs a userId",
        ),
        (
            {"look_id": TOASTMATES_LOOK_ID, "call": "track"},
            "InvalidParameterError",
            "call='track' needs event",
        ),
    ],
    ids=["deleted-look", "missing-look", "two-user-ids", "unknown-destination", "destination-check", "track"],
)
def test_an_error_no_retry_fixes_fails_after_one_try(run, segment, capfd, conf, error, message):
    dag_run = run(**conf)
    assert dag_run.state == "failed"
    assert tries(dag_run) == ("failed", 1)  # retries=2, unused
    text = "".join(capfd.readouterr())
    assert error in text and message in text  # the same clear message
    assert segment.stats()["requests"] == 0


def test_track_without_an_event_is_refused_before_looker_is_read(run, looker, segment, capfd):
    requests_before = len(looker.requests)
    dag_run = run(look_id=TOASTMATES_LOOK_ID, call="track", event=None)
    assert tries(dag_run) == ("failed", 1)
    assert len(looker.requests) == requests_before  # not even a login
    assert "call='track' needs event, the name of the track event" in "".join(capfd.readouterr())


def test_rejected_events_fail_after_one_try(run, segment, capfd):
    segment.set_faults(Faults(script=["400"]))  # Segment refuses the batch: the same batch again would be too
    dag_run = run(look_id=TOASTMATES_LOOK_ID)
    assert tries(dag_run) == ("failed", 1)
    assert len(segment.records()) == 1
    assert "UndeliverableEventsError" in "".join(capfd.readouterr())


# ----------------------------------------------------------------------------------- errors that can heal


def test_a_result_that_breaks_off_is_retried(run, looker, segment, capfd):
    looker.cut_connection_after(TOASTMATES_LOOK_ID, 3)  # the first try's result breaks off after 3 rows
    dag_run = run(look_id=TOASTMATES_LOOK_ID)
    assert dag_run.state == "success"
    assert tries(dag_run) == ("success", 2)
    assert "result ended after 3 rows: connection closed" in "".join(capfd.readouterr())
    assert read_return_value(dag_run, TASK_ID)["sent"] == 10


def test_a_looker_outage_is_retried_until_the_tries_run_out(run, looker, segment):
    looker.fail_next_runs(100, status=503)  # beyond the hook's own retries, on every try
    dag_run = run(look_id=TOASTMATES_LOOK_ID)
    assert tries(dag_run) == ("failed", 3)  # the first try and both retries
    assert segment.stats()["requests"] == 0


def test_a_segment_outage_is_retried(run, segment):
    segment.set_faults(Faults(script=["429"] * 8, retry_after=0))  # beyond the delivery's 8 attempts
    dag_run = run(look_id=TOASTMATES_LOOK_ID)
    assert tries(dag_run) == ("success", 2)
    assert len(segment.events()) == 10


# ------------------------------------------------------------------------------------------- asset events


def test_a_dry_run_emits_no_asset_event(run, segment, capfd):
    dry = run(look_id=TOASTMATES_LOOK_ID, dry_run=True)
    assert tries(dry) == ("success", 1)
    assert read_return_value(dry, TASK_ID)["would_send"] == 10
    assert asset_events(dry) == []  # no downstream DAG is told that a sync happened
    assert f"Dry run: no asset event for {ASSET_NAME}" in "".join(capfd.readouterr())

    real = run(look_id=TOASTMATES_LOOK_ID)
    [extra] = asset_events(real)
    assert {key: extra[key] for key in ("look_id", "rows", "sent", "invalid")} == {
        "look_id": TOASTMATES_LOOK_ID,
        "rows": 10,
        "sent": 10,
        "invalid": 0,
    }
    assert segment.stats()["events"] == 10  # from the real run only


# -------------------------------------------------------------------------------------------- trigger form


def test_empty_form_fields_mean_their_defaults(run, segment):
    """Fields with defaults are not required in the form: left empty (null), the default applies."""
    empty = {"dry_run": None, "call": None, "trait_key_style": None, "sync_mode": None, "full_refresh": None}
    dag_run = run(look_id=TOASTMATES_LOOK_ID, **empty)
    assert tries(dag_run) == ("success", 1)
    summary = read_return_value(dag_run, TASK_ID)
    assert (summary["call"], summary["dry_run"], summary["sync_mode"], summary["sent"]) == (
        "identify",
        False,
        "all",
        10,
    )
    assert segment.events()[0]["traits"] == {
        "name": "Ty Arthur",
        "email": "ty.arthur@segment.com",
        "sessions count": 2,
    }
