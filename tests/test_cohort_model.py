"""
Changed-only runs against a model of what Segment and a journey tool were told, over random cohorts, failures
and interrupted deliveries: entry and exit events alternate for every identity, no accepted event is ever sent
again, and a clean run brings Segment, the journey and the state back in line with the Look.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_state_helpers import attach_memory_fs, cohort_message, run_sync, stored_versions

from airflow_provider_looker_segment.cohort_sync import CohortEvents
from airflow_provider_looker_segment.sync_run import CohortStateStore
from airflow_provider_looker_segment.sync_state import USER_ID_KEY

KEY = "look-7-api.segment.io-0123456789abcdef"
PARTS = ("lsg", "entered", "exit", "exited")


def _part(message_id: str) -> str:
    return message_id[17:].split("-", 1)[0]


class Segment:
    """What Segment accepted: the membership trait per identity and the journey (entry/exit events)."""

    def __init__(self) -> None:
        self.membership: dict[str, bool] = {}
        self.journey: dict[str, bool] = {}
        self.accepted_event_ids: set[str] = set()
        self.sent_ids: set[str] = set()

    def accept(self, message: dict) -> None:
        encoded = getattr(message, "encoded", None)
        message = orjson.loads(encoded) if encoded is not None else message  # what goes on the wire
        who = message.get("userId")
        message_id = message["messageId"]
        part = _part(message_id)
        if part in ("entered", "exited"):
            assert message_id not in self.accepted_event_ids, f"accepted event sent again: {message}"
            self.accepted_event_ids.add(message_id)
            entering = part == "entered"
            assert self.journey.get(who, False) is not entering, f"{part} twice in a row for {who}"
            self.journey[who] = entering
        elif part == "exit":
            self.membership[who] = False
        elif "m" in message["traits"]:
            self.membership[who] = True


runs = st.lists(
    st.tuples(
        st.dictionaries(st.integers(0, 6), st.integers(0, 2), max_size=7),  # the Look: identity -> version
        st.sets(st.tuples(st.integers(0, 6), st.sampled_from(PARTS)), max_size=6),  # refused messages
        st.one_of(st.none(), st.integers(0, 12)),  # delivery stopped after this many messages
        st.booleans(),  # full refresh
    ),
    min_size=1,
    max_size=6,
)
CONFIGS = {
    "membership trait and both events": ("m", "Entered", "Exited"),
    "membership trait only": ("m", None, None),
    "both events only": (None, "Entered", "Exited"),
}


@pytest.mark.parametrize("config", CONFIGS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=runs)
def test_entries_and_exits_never_lie(config, runs):
    attach_memory_fs()
    store = CohortStateStore(f"memory://cohort-model/{uuid.uuid4().hex}", KEY)
    trait, entered, exited = CONFIGS[config]
    events = CohortEvents(membership_trait=trait, entered_event=entered, exited_event=exited, sync_key=KEY)
    segment = Segment()
    for number, (look, refused, stop_after, full_refresh) in enumerate(
        [*runs, (runs[-1][0], set(), None, False)]
    ):
        cohort = [
            cohort_message(USER_ID_KEY, f"u{n}", version, f"run-{number}", m=True)
            for n, version in look.items()
        ]
        for message in cohort:  # the transform puts the membership trait into the traits
            value = message.pop("m")
            if trait:
                message["traits"]["m"] = value

        def fails(message, refused=refused):
            return (int(message["userId"][1:]), _part(message["messageId"])) in refused

        result = run_sync(
            store,
            cohort,
            events=events,
            fail=fails,
            run_id=f"run-{number}",
            stop_after=stop_after,
            full_refresh=full_refresh,
        )
        for message in result.accepted:
            segment.accept(message)
    # The last run refused nothing: Segment, the journey and the state agree with the Look.
    members = {f"u{n}" for n in runs[-1][0]}
    if entered:
        assert {who for who, value in segment.journey.items() if value} == members
    if trait:
        assert {who for who, value in segment.membership.items() if value} == members
    assert set(stored_versions(store)) == {(USER_ID_KEY, who) for who in members}
    assert {(k, i): v for (k, i), v in stored_versions(store).items()} == {
        (USER_ID_KEY, f"u{n}"): version for n, version in runs[-1][0].items()
    }
