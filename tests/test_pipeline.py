"""The sync pipeline without Airflow's task machinery: real hooks against the stand-ins, no DAG."""

from __future__ import annotations

import logging

import pytest
from standins.connections import standin_connections
from standins.looker_fixtures import TOASTMATES_LOOK_ID
from standins.looker_standin import LookerStandIn
from standins.segment_standin import Faults, SegmentStandIn

from airflow_provider_looker_segment.destinations import resolve_destinations
from airflow_provider_looker_segment.exceptions import InvalidParameterError, SegmentDeliveryError
from airflow_provider_looker_segment.hooks.looker import LookerHook
from airflow_provider_looker_segment.hooks.segment import SegmentHook
from airflow_provider_looker_segment.pipeline import sync_look
from airflow_provider_looker_segment.settings import SyncOptions
from airflow_provider_looker_segment.summary import outcome_error
from airflow_provider_looker_segment.sync_run import CohortStateStore

NAMESPACE = '["pipeline_test", "sync", "run-1", -1, "1"]'


@pytest.fixture(scope="module")
def looker():
    with LookerStandIn() as standin:
        yield standin


@pytest.fixture
def segment(looker, monkeypatch):
    with SegmentStandIn(record="full") as standin:
        for name, value in standin_connections(looker.base_url, standin.base_url).items():
            monkeypatch.setenv(name, value)
        yield standin


def _sync(settings: SyncOptions, *, state=None, destinations=()):
    hook = SegmentHook()
    looker = LookerHook()
    try:
        with looker.stream_look(settings.look_id, limit=settings.limit) as stream:
            return sync_look(
                settings,
                stream,
                send=None if settings.dry_run else hook.send,
                destinations=resolve_destinations(list(destinations)),
                message_id_namespace=NAMESPACE,
                state=state,
                log=logging.getLogger("test_pipeline"),
            )
    finally:
        looker.close()


def test_a_look_is_sent_and_summarised(segment):
    settings = SyncOptions(look_id=TOASTMATES_LOOK_ID)
    summary = _sync(settings, destinations=["hubspot"])
    assert (summary.rows, summary.sent, summary.invalid, summary.duplicates) == (10, 10, 0, 0)
    assert summary.destinations == ["hubspot"] and summary.cohort is None
    assert outcome_error(settings, summary) is None
    assert len(segment.events()) == 10
    data = summary.to_dict()
    assert data["sent"] == 10 and "new" not in data and list(data)[-1] == "seconds"


def test_a_dry_run_sends_nothing(segment):
    summary = _sync(SyncOptions(look_id=TOASTMATES_LOOK_ID, dry_run=True))
    assert (summary.would_send, summary.sent, summary.requests) == (10, 0, 0)
    assert segment.stats()["requests"] == 0


def test_rejected_events_make_a_failure_with_the_summary(segment):
    segment.set_faults(Faults(script=["400"]))
    settings = SyncOptions(look_id=TOASTMATES_LOOK_ID)
    summary = _sync(settings)
    error = outcome_error(settings, summary)
    assert isinstance(error, SegmentDeliveryError)
    assert str(error).startswith("Look 1: 10 events rejected by Segment") and '"sent":0' in str(error)


def test_changed_only_state_through_the_pipeline(segment, tmp_path):
    settings = SyncOptions(look_id=TOASTMATES_LOOK_ID, sync_mode="changed", membership_trait="in_cohort")
    store = CohortStateStore(f"file://{tmp_path}", "pipeline-test")
    with store.begin("run-1") as state:
        first = _sync(settings, state=state)
    with store.begin("run-2") as state:
        second = _sync(settings, state=state)
    assert (first.cohort.new, first.sent, first.cohort.state_identities) == (10, 10, 10)
    assert (second.cohort.unchanged, second.sent) == (10, 0)
    data = second.to_dict()  # nothing changed: the state is not rewritten
    assert (data["state_generation"], data["state_saved"], first.cohort.state_saved) == (1, False, True)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"look_id": " "}, "Give exactly one of look_id"),
        ({"limit": "ten"}, "limit must be a whole number, got 'ten'"),
        ({"limit": -5}, "limit must be -1 (all rows) or a positive number, got -5"),
        ({"limit": 10**30}, "limit must be at most 9,223,372,036,854,775,807"),
        ({"trait_key_style": "camel"}, "trait_key_style must be one of label, snake, field, got 'camel'"),
        ({"sync_mode": "sometimes"}, "sync_mode must be one of all, changed, got 'sometimes'"),
        ({"max_exit_ratio": 2}, "max_exit_ratio must be a number from 0 to 1, got 2"),
        ({"max_invalid_rows": -1}, "max_invalid_rows must be a whole number at least 0, got -1"),
        ({"dry_run": "maybe"}, "dry_run must be true or false, got 'maybe'"),
        ({"destinations": "[1,"}, "destinations is not a valid list"),
        ({"trait_names": "{"}, "trait_names is not a valid mapping"),
    ],
)
def test_every_bad_argument_is_one_error_class_naming_it(arguments, message):
    with pytest.raises(InvalidParameterError) as raised:
        SyncOptions.from_arguments(**{"look_id": "1", **arguments})
    assert message in str(raised.value)


def test_rendered_strings_are_read_back_into_their_types():
    settings = SyncOptions.from_arguments(
        look_id=" 42 ",
        limit="0",
        dry_run="True",
        destinations="hubspot, intercom",
        trait_names='{"users.name": "full_name"}',
        exclude_fields="['users.score']",
        max_exit_ratio="0.25",
        max_invalid_rows="None",
        membership_trait="",
    )
    assert settings == SyncOptions(
        look_id="42",
        limit=-1,
        dry_run=True,
        destinations=("hubspot", "intercom"),
        trait_names={"users.name": "full_name"},
        exclude_fields=("users.score",),
        max_exit_ratio=0.25,
    )
