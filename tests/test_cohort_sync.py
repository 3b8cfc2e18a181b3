"""
The pure parts of sync_mode="changed": identity keys, messageIds, exit calls, undelivered identities, and
what the exit decisions do to a real state (file://).
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_looker_segment.cohort_sync import (
    CohortCounts,
    CohortEvents,
    changed_only,
    exit_calls,
    exit_messages,
    identity_of,
    keyed_message_id,
    undelivered_identities,
)
from airflow_provider_looker_segment.sync_state import CohortStateStore, ExitIdentity, identity_hash
from airflow_provider_looker_segment.values import anonymous_id_from_group

NAMESPACE = '["dag","task","run",-1,"42"]'


def test_identity_prefers_user_id():
    assert identity_of({"userId": "42", "anonymousId": "a-1"}) == ("userId", "42")
    assert identity_of({"anonymousId": "a-1"}) == ("anonymousId", "a-1")


def test_a_group_call_is_keyed_by_its_group_id():
    assert identity_of({"type": "group", "groupId": "g-1", "userId": "42"}) == ("groupId", "g-1")


def test_keyed_message_ids_map_back_to_identities():
    ihash = identity_hash("userId", "42")
    keyed = keyed_message_id(ihash, "lsg-" + "0" * 32)
    assert len(keyed) == 53 and keyed.endswith("lsg-" + "0" * 32)
    assert undelivered_identities([keyed], complete=True) == {ihash}
    assert undelivered_identities([keyed], complete=False) is None  # capped list: advance nothing
    assert undelivered_identities(["not-ours"], complete=True) is None


def _events(**kwargs: Any) -> CohortEvents:
    defaults = {
        "membership_trait": "in_cohort",
        "message_id_namespace": NAMESPACE,
        "timestamp": "2026-11-29T00:00:00.000Z",
        "library": {"name": "x", "version": "1"},
    }
    return CohortEvents(**{**defaults, **kwargs})


def test_exit_message_is_deterministic_and_minimal():
    departed = ExitIdentity("anonymousId", "anon-1", identity_hash("anonymousId", "anon-1"))
    (message,) = exit_calls(departed, _events())
    assert message["type"] == "identify" and message["anonymousId"] == "anon-1" and "userId" not in message
    assert message["traits"] == {"in_cohort": False}
    assert message["timestamp"] == "2026-11-29T00:00:00.000Z"
    assert [message] == exit_calls(departed, _events())
    assert undelivered_identities([message["messageId"]], complete=True) == {departed.ihash}
    (other_run,) = exit_calls(departed, _events(message_id_namespace='["dag","task","run2",-1,"42"]'))
    assert other_run["messageId"] != message["messageId"]


def test_exit_calls_follow_the_call_type_and_the_exit_event():
    user = ExitIdentity("userId", "u1", identity_hash("userId", "u1"))
    group = ExitIdentity("groupId", "acct-1", identity_hash("groupId", "acct-1"))
    track = _events(call="track", event="In VIP cohort", exited_event="Left VIP cohort")
    membership, exited = exit_calls(user, track)
    assert (membership["type"], membership["event"], membership["properties"]) == (
        "track",
        "In VIP cohort",
        {"in_cohort": False},
    )
    assert (exited["type"], exited["event"], exited["userId"]) == ("track", "Left VIP cohort", "u1")
    assert exited["properties"] == {"in_cohort": False} and "traits" not in exited
    assert membership["messageId"] != exited["messageId"]
    assert undelivered_identities([exited["messageId"]], complete=True) == {user.ihash}

    membership, exited = exit_calls(group, _events(call="group", exited_event="Account left"))
    derived = anonymous_id_from_group("acct-1")
    assert membership == {
        "type": "group",
        "groupId": "acct-1",
        "anonymousId": derived,
        "traits": {"in_cohort": False},
        "timestamp": "2026-11-29T00:00:00.000Z",
        "context": {"library": {"name": "x", "version": "1"}},
        "messageId": membership["messageId"],
    }
    assert exited["anonymousId"] == derived and exited["context"]["groupId"] == "acct-1"
    # Without a membership trait, only the exit event, with no properties (nothing undelivered is sent).
    (only,) = exit_calls(user, _events(membership_trait=None, exited_event="Left"))
    assert (only["event"], only["properties"]) == ("Left", {})


def test_entry_events_follow_new_identities_only(store):
    events = _events(membership_trait=None, entered_event="Entered")
    counts, sent = _run(store, _rows(range(3)), events=events)
    assert [(m["type"], m.get("event"), m["userId"]) for m in sent] == [
        ("identify", None, "u0"),
        ("track", "Entered", "u0"),
        ("identify", None, "u1"),
        ("track", "Entered", "u1"),
        ("identify", None, "u2"),
        ("track", "Entered", "u2"),
    ]
    assert sent[1]["properties"] == {"plan": "free"} and counts.entered_events == 3
    rows = _rows(range(4))
    rows[0]["traits"]["plan"] = "pro"  # changed: sent, but it did not enter
    counts, sent = _run(store, rows, events=events)
    assert [(m["type"], m["userId"]) for m in sent] == [
        ("identify", "u0"),
        ("identify", "u3"),
        ("track", "u3"),
    ]
    assert counts.entered_events == 1 and (counts.new, counts.changed) == (1, 1)


# ------------------------------------------------------------------------------- exits on a real state


def _rows(numbers: range | list[int], plan: str = "free", trait: str | None = None) -> list[dict[str, Any]]:
    """The identify calls of users ``u<n>`` as the transform makes them (membership trait included)."""
    rows = []
    for n in numbers:
        traits: dict[str, Any] = {"plan": plan}
        if trait:
            traits[trait] = True
        rows.append({"type": "identify", "userId": f"u{n}", "traits": traits, "messageId": f"lsg-{n:032x}"})
    return rows


def _run(
    store: CohortStateStore,
    rows: list[dict[str, Any]],
    *,
    trait: str | None = None,
    max_exit_ratio: float = 0.5,
    truncated: bool = False,
    full_refresh: bool = False,
    run_id: str = "run",
    events: CohortEvents | None = None,
) -> tuple[CohortCounts, list[dict[str, Any]]]:
    """One run as the operator wires it (everything delivered); return the counts and the messages sent."""
    counts = CohortCounts()
    if events is None:
        events = CohortEvents(
            membership_trait=trait, message_id_namespace=NAMESPACE, library={"name": "x", "version": "1"}
        )
    with store.begin(run_id, full_refresh=full_refresh) as run:
        sent = list(changed_only(rows, run, counts, events))
        sent += exit_messages(
            run, counts, events, max_exit_ratio=max_exit_ratio, possibly_truncated=truncated
        )
        run.commit(set(), exits_sent=not counts.keep_departed)
    return counts, sent


def _stored_ids(store: CohortStateStore) -> set[str]:
    return {entry.identity for entry in store.iter_entries()}


@pytest.fixture
def store(tmp_path) -> CohortStateStore:
    return CohortStateStore(f"file://{tmp_path}/state", "look-600-test-0123456789abcdef")


@pytest.mark.parametrize("trait", [None, "in_cohort"])
def test_an_empty_look_trips_the_guard_and_keeps_the_state(store, trait):
    """The guard protects the state whether or not exits are sent: nobody is re-sent by the next run."""
    _run(store, _rows(range(10), trait=trait), trait=trait)
    counts, sent = _run(store, [], trait=trait)
    assert sent == [] and counts.exits == 10 and counts.keep_departed
    assert counts.guard_tripped.startswith("10 of the 10 identities of the previous run (100%)")
    assert "max_exit_ratio=0.5: they stay in the state and no exit call was sent" in counts.guard_tripped
    assert _stored_ids(store) == {f"u{n}" for n in range(10)}
    counts, sent = _run(store, _rows(range(10), trait=trait), trait=trait)
    assert sent == [] and counts.unchanged == 10


def test_without_a_membership_trait_departed_identities_just_leave(store):
    _run(store, _rows(range(10)))
    counts, sent = _run(store, _rows(range(7)))
    assert sent == [] and counts.exits == 3 and counts.exits_sent == 0 and counts.guard_tripped is None
    assert (
        counts.exits_skipped.startswith("no membership_trait nor exited_event") and not counts.keep_departed
    )
    assert _stored_ids(store) == {f"u{n}" for n in range(7)}


def test_a_possibly_truncated_look_keeps_departed_identities(store):
    _run(store, _rows(range(10), trait="in_cohort"), trait="in_cohort")
    counts, sent = _run(store, _rows(range(4), trait="in_cohort"), trait="in_cohort", truncated=True)
    assert sent == [] and counts.exits == 6 and counts.keep_departed and counts.guard_tripped is None
    assert _stored_ids(store) == {f"u{n}" for n in range(10)}


def test_departed_identities_stay_until_exit_messages_decides():
    assert CohortCounts().keep_departed  # e.g. the message stream was not consumed to its end


def test_full_refresh_resends_everyone_and_sends_exits(store):
    trait = "in_cohort"
    _run(store, _rows(range(10), trait=trait), trait=trait)
    rows = _rows(range(2, 10), trait=trait) + _rows([10, 11], trait=trait)  # u0, u1 left; u10, u11 joined
    rows[0]["traits"]["plan"] = "pro"  # u2 changed
    counts, sent = _run(store, rows, trait=trait, full_refresh=True)
    assert (counts.new, counts.changed, counts.unchanged, counts.exits_sent) == (2, 8, 0, 2)
    calls = {message["userId"]: message["traits"] for message in sent}
    assert set(calls) == {f"u{n}" for n in range(12)}
    assert calls["u0"] == calls["u1"] == {trait: False}
    assert _stored_ids(store) == {f"u{n}" for n in range(2, 12)}
    counts, sent = _run(store, rows, trait=trait)  # the refreshed state is the baseline of the next run
    assert sent == [] and counts.unchanged == 10


def test_full_refresh_is_guarded_like_any_run(store):
    _run(store, _rows(range(10), trait="in_cohort"), trait="in_cohort")
    counts, sent = _run(store, _rows(range(3), trait="in_cohort"), trait="in_cohort", full_refresh=True)
    assert [m["userId"] for m in sent] == ["u0", "u1", "u2"] and counts.guard_tripped and counts.keep_departed
    assert _stored_ids(store) == {f"u{n}" for n in range(10)}


def test_full_refresh_of_an_unreadable_state_is_a_first_run(store):
    _run(store, _rows(range(10), trait="in_cohort"), trait="in_cohort")
    store.state_path.write_bytes(b"damaged")
    counts, sent = _run(store, _rows(range(3), trait="in_cohort"), trait="in_cohort", full_refresh=True)
    assert (counts.new, counts.exits, len(sent)) == (3, 0, 3)
    assert _stored_ids(store) == {"u0", "u1", "u2"}
